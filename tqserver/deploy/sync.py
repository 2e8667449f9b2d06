"""The rsync that brings a project into a new release. ``--delete`` makes the release the
same tree as the project, except for what is excluded — and rsync never deletes excluded
files on the receiving side — so what the target built (workers/*/bin when it builds,
node_modules, every .venv) and what it writes (the shared paths) stay."""

from __future__ import annotations

import os

from tqserver.config.deployment import TargetConfig
from tqserver.deploy.host import Host

# Never shipped: the project's own checkout state and what this machine ran or installed.
ALWAYS_EXCLUDED = (
    "/.git/",
    "/.venv/",
    "/.venv-pypy/",
    "/logs/",
    "/run/",
    "/releases/",
    "/current",
    "/shared/",
    "/_trial_temp*/",
    "/REVISION",
    # dependencies and caches, at any depth: built on the target, for the target
    ".venv/",
    "node_modules/",
    "__pycache__/",
)


def filters(target: TargetConfig, workers_dir: str, workers: list[str]) -> list[str]:
    """rsync filter arguments, in order (the first rule that matches a path decides)."""
    rules = [f"--exclude=/{p.strip('/')}" for p in target.shared]
    rules += [f"--exclude={p}" for p in ALWAYS_EXCLUDED + tuple(target.exclude)]
    if target.build == "target":
        rules.append(f"--exclude=/{workers_dir}/*/bin/")  # the target builds its own
    else:
        rules.append(f"--filter=P /{workers_dir}/*/bin/***")  # shipped, never deleted
    if workers:  # only these workers' directories; everything else stays as it was
        rules.append(f"--include=/{workers_dir}/")
        rules += [f"--include=/{workers_dir}/{w}/***" for w in workers]
        rules += [f"--exclude=/{workers_dir}/*", "--exclude=/*"]
    return rules


def rsync_argv(
    source_root: str,
    host: Host,
    release_path: str,
    workers_dir: str,
    workers: list[str],
    dry_run: bool = False,
) -> list[str]:
    # Times compared to the nanosecond: an edit of the same size within the second of the
    # last deploy is still seen (rsync's quick check otherwise compares whole seconds).
    argv = ["rsync", "-a", "--delete", "--modify-window=-1"]
    if dry_run:
        argv += ["--dry-run", "--itemize-changes"]
    argv += host.rsync_shell()
    argv += filters(host.target, workers_dir, workers)
    argv += [os.path.join(source_root, ""), host.rsync_dest(release_path.rstrip("/") + "/")]
    return argv
