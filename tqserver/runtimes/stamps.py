"""Whether a build's output is up to date, without running the build tool: a digest of the
build inputs (relative names, sizes, mtimes) and of how they were built, recorded next to
the output by the build's last step. Relative names make the stamp valid on another machine
that received the tree with its mtimes (rsync -a): artifacts built here and shipped there
are not rebuilt there."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from tqserver.runtimes import BuildStep, helper_step

# Build outputs and dependency trees: never inputs.
_OUTPUT_DIRS = frozenset(["bin", "build", "target", "out", "node_modules", "logs", ".venv"])


def walk_files(paths: Iterable[str]) -> list[str]:
    """The files under ``paths`` (files or directories), skipping build outputs."""
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
            continue
        for parent, dirs, files in os.walk(path):
            dirs[:] = [n for n in dirs if not n.startswith(".") and n not in _OUTPUT_DIRS]
            found.extend(os.path.join(parent, n) for n in files)
    return sorted(found)


def inputs_digest(root: str, how: str, files: Iterable[str]) -> str:
    """A digest of the input files' names (relative to ``root``), sizes and mtimes, and of
    ``how`` they are built (the build kind, mode and flags)."""
    h = hashlib.sha256(how.encode())
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            continue
        h.update(f"\0{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def read_stamp(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def is_fresh(artifact: str, stamp: str, digest: str) -> bool:
    """The artifact exists and its stamp says it was built from inputs with ``digest``."""
    return os.path.isfile(artifact) and read_stamp(stamp) == digest


def stamp_step(cwd: str, stamp: str, digest: str) -> BuildStep:
    """The build's last step: record ``digest`` as what the output was built from."""
    return helper_step(cwd, "stamp", stamp, digest)
