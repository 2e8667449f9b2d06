"""python -m tqserver.deploy [--dry-run] [--rolling] [--rollback] TARGET [WORKER...]

TARGET is a target or group of etc/deployment.yaml, or a comma-separated list of them.
Exit status: 0 when every target serves the release, 1 when a step failed (the message
names it and what serves), 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys

from tqserver.config.deployment import load_deployment_config
from tqserver.config.errors import ConfigError
from tqserver.config.server import default_server_config, load_server_config
from tqserver.deploy.procedure import Deployer, StepFailed, git_label, release_name


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bin/deploy",
        description="Ship the project (or only some workers) to the targets of "
        "etc/deployment.yaml as a new release, HUP the server there and wait until its "
        "/health says the release serves.",
    )
    parser.add_argument("target", metavar="TARGET", help="a target, a group, or a,b,c")
    parser.add_argument("workers", nargs="*", metavar="WORKER", help="only these workers")
    parser.add_argument("--root", default=".", help="the project to deploy (default: .)")
    parser.add_argument(
        "--config", default="etc/deployment.yaml", help="relative to --root (default: %(default)s)"
    )
    parser.add_argument("--dry-run", "-n", action="store_true", help="show what would happen")
    parser.add_argument(
        "--rolling", action="store_true", help="one node at a time, drained through the balancer"
    )
    parser.add_argument(
        "--rollback", action="store_true", help="switch back to the release before the current one"
    )
    parser.add_argument(
        "--revision",
        default=None,
        help="the label in the release name (default: the git commit, if any)",
    )
    return parser.parse_args(argv)


def workers_directory(root: str) -> str:
    """workers.directory of the project's server.yaml, relative to the root."""
    path = os.path.join(root, "etc", "server.yaml")
    config = load_server_config(path)[0] if os.path.exists(path) else default_server_config()
    directory = config.workers.directory
    if os.path.isabs(directory):
        directory = os.path.relpath(directory, root)
    return directory.strip("/")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    root = os.path.abspath(args.root)
    path = args.config if os.path.isabs(args.config) else os.path.join(root, args.config)
    try:
        config, warnings = load_deployment_config(path, root)
        workers_dir = workers_directory(root)
    except ConfigError as e:
        print(f"bin/deploy: {e}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"bin/deploy: warning: {warning}", file=sys.stderr)
    try:
        targets = config.resolve(args.target)
    except KeyError as e:
        known = ", ".join(list(config.targets) + list(config.groups))
        print(
            f"bin/deploy: no target or group {e.args[0]!r} in {path} (known: {known})",
            file=sys.stderr,
        )
        return 2
    if args.rollback and args.workers:
        print("bin/deploy: --rollback switches whole releases; name no workers", file=sys.stderr)
        return 2
    missing = [w for w in args.workers if not os.path.isdir(os.path.join(root, workers_dir, w))]
    if missing:
        print(
            f"bin/deploy: no worker {', '.join(map(repr, missing))} under "
            f"{os.path.join(root, workers_dir)}",
            file=sys.stderr,
        )
        return 2
    label = args.revision if args.revision is not None else git_label(root)
    deployer = Deployer(
        root=root,
        config=config,
        workers_dir=workers_dir,
        release=release_name(label),
        workers=list(args.workers),
        dry_run=args.dry_run,
        out=lambda line: print(line, flush=True),
    )
    action = deployer.rollback if args.rollback else deployer.deploy
    try:
        deployer.each(targets, action, rolling=args.rolling)
    except StepFailed as e:
        print(f"bin/deploy: {e}", file=sys.stderr)
        return 1
    if not args.dry_run:
        what = "rolled back" if args.rollback else f"release {deployer.release}"
        print(f"bin/deploy: {what} on {', '.join(t.name for t in targets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
