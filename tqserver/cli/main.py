"""The ``tqserver`` command: argument parsing and the subcommands.

Exit status: 0 done, 1 the server refused or failed (an unknown worker, a reload
refused), 2 bad usage (argparse), 3 no server answers (it is not running, or not where
server.yaml says)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqserver.cli.client import Client, ControlError, NoServer, Target
from tqserver.cli.locate import LocateError, target
from tqserver.cli.render import table, top_frame

NOT_RUNNING = 3


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--root",
        "-r",
        default=os.environ.get("TQSERVER_ROOT", "."),
        help="project root (default: $TQSERVER_ROOT, else the current directory)",
    )
    common.add_argument(
        "--config",
        "-c",
        default="etc/server.yaml",
        help="server configuration, relative to the root (default: etc/server.yaml)",
    )
    common.add_argument(
        "--url",
        help="the control plane to talk to instead of the one server.yaml names: "
        "http://HOST:PORT or unix:/path/to/socket",
    )
    common.add_argument(
        "--token",
        default=os.environ.get("TQSERVER_TOKEN"),
        help="the admin token (default: $TQSERVER_TOKEN, else the one server.yaml names)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def parser() -> argparse.ArgumentParser:
    common = _common()
    p = argparse.ArgumentParser(
        prog="tqserver",
        description="Look at and steer a running TQServer (started with twistd tqserver).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("status", parents=[common], help="one line per worker (like pm2 list)")
    reload = sub.add_parser(
        "reload", parents=[common], help="zero-downtime reload of one worker, or of all"
    )
    reload.add_argument("worker", nargs="?", help="the worker (default: every worker)")
    logs = sub.add_parser("logs", parents=[common], help="a worker's last output lines")
    logs.add_argument("worker")
    logs.add_argument("-n", "--lines", type=int, default=50, help="how many (default 50)")
    logs.add_argument("-f", "--follow", action="store_true", help="then follow new ones")
    top = sub.add_parser("top", parents=[common], help="live rates, latency, CPU and memory")
    top.add_argument(
        "--count", "-n", type=int, default=0, help="stop after this many updates (default: never)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        where = target(args.root, args.config, args.url, args.token)
    except LocateError as e:
        print(f"tqserver: {e}", file=sys.stderr)
        return 2
    client = Client(where)
    try:
        return COMMANDS[args.command](client, args)
    except NoServer as e:
        print(
            f"tqserver: no server is answering at {where.shown} ({e}); "
            f"{where.source or 'is it running? (twistd tqserver)'}",
            file=sys.stderr,
        )
        return NOT_RUNNING
    except ControlError as e:
        print(f"tqserver: {e.message} (HTTP {e.status})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # | head
        sys.stderr.close()
        return 0


def _color() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def status(client: Client, args) -> int:
    snapshot = client.status()
    if args.json:
        print(json.dumps(snapshot, indent=1))
    else:
        print(table(snapshot, _color()))
    return 0


def reload(client: Client, args) -> int:
    answer = client.reload(args.worker)
    if args.json:
        print(json.dumps(answer))
    elif args.worker:
        print(f"reloading {answer['reloading']}")
    else:
        names = answer["reloading"]
        print("reloading " + (", ".join(names) if names else "nothing (no worker)"))
    return 0


def logs(client: Client, args) -> int:
    if not args.follow:
        lines = client.logs(args.worker, args.lines)
        if args.json:
            print(json.dumps(lines))
        else:
            for line in lines:
                print(line)
        return 0
    for batch in client.follow_logs(args.worker, args.lines):
        for line in batch:
            print(json.dumps(line) if args.json else line, flush=True)
    print("tqserver: the server closed the log stream (it stopped)", file=sys.stderr)
    return NOT_RUNNING


def top(client: Client, args) -> int:
    color = _color()
    for shown, snapshot in enumerate(client.stream(), 1):
        if args.json:
            print(json.dumps(snapshot, separators=(",", ":")), flush=True)
        else:
            clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
            print(clear + top_frame(snapshot, color), flush=True)
        if args.count and shown >= args.count:
            return 0
    print("tqserver: the server closed the status stream (it stopped)", file=sys.stderr)
    return NOT_RUNNING


COMMANDS = {"status": status, "reload": reload, "logs": logs, "top": top}

__all__ = ["Target", "main"]
