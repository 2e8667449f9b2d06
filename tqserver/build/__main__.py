"""python -m tqserver.build --mode dev|prod [--root DIR] [--jobs N] [WORKER...]

Exit status: 0 when every selected worker built or was up to date, 1 when a build failed
or a worker's configuration is invalid, 2 for a usage error (such as an unknown worker).
"""

from __future__ import annotations

import argparse
import os
import sys

from twisted.internet import defer, task

from tqserver.build import FAILED, build_all, find_workers, select, workers_dir
from tqserver.config.errors import ConfigError
from tqserver.config.server import default_server_config, load_server_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tqserver.build",
        description="Build the workers that are out of date, as the server builds them in "
        "that mode, and print per worker what was built and how long it took.",
    )
    parser.add_argument("workers", nargs="*", metavar="WORKER", help="only these workers")
    parser.add_argument("--mode", choices=("dev", "prod"), default="dev")
    parser.add_argument("--root", default=".", help="project root (default: .)")
    parser.add_argument("--config", default="etc/server.yaml", help="relative to --root")
    parser.add_argument("--jobs", "-j", type=int, default=1, help="builds at a time")
    parser.add_argument("--quiet", "-q", action="store_true", help="print failures only")
    return parser.parse_args(argv)


def load_config(root: str, path: str):
    path = path if os.path.isabs(path) else os.path.join(root, path)
    if not os.path.exists(path) and path == os.path.join(root, "etc/server.yaml"):
        return default_server_config()
    return load_server_config(path)[0]


def print_outcome(outcome, quiet: bool) -> None:
    if quiet and outcome.status != FAILED:
        return
    timing = f"{outcome.seconds:6.2f}s" if outcome.seconds else " " * 7
    what = f"  {outcome.command}" if outcome.command else ""
    print(f"{outcome.worker:<20} {outcome.type:<8} {outcome.status:<10} {timing}{what}")
    if outcome.status == FAILED:
        for line in outcome.output.rstrip().splitlines():
            print(f"    | {line}")
    sys.stdout.flush()


async def run(reactor, args: argparse.Namespace) -> int:
    root = os.path.abspath(args.root)
    try:
        config = load_config(root, args.config)
    except ConfigError as e:
        print(f"build-{args.mode}: {e}", file=sys.stderr)
        return 1
    found = find_workers(root, config, args.mode)
    chosen = select(found, workers_dir(root, config), args.workers)
    if chosen.unknown:
        known = ", ".join(s.name for s in found.workers) or "none"
        print(
            f"no worker named {', '.join(map(repr, chosen.unknown))} in {args.mode} mode "
            f"(workers: {known})",
            file=sys.stderr,
        )
        return 2
    for error in chosen.errors:
        print(f"error: {error}")
    started = reactor.seconds()
    outcomes = await build_all(
        reactor, chosen.specs, args.mode, args.jobs, lambda o: print_outcome(o, args.quiet)
    )
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    failed = counts.get(FAILED, 0) + len(chosen.errors)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    if chosen.errors:
        summary += f"{', ' if summary else ''}{len(chosen.errors)} with configuration errors"
    print(
        f"build-{args.mode}: {len(outcomes)} worker(s): {summary or 'nothing to do'} "
        f"in {reactor.seconds() - started:.2f}s"
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    async def react(reactor) -> None:
        code = await run(reactor, args)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: defer.ensureDeferred(react(reactor)))


if __name__ == "__main__":
    main()
