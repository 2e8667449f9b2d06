"""What a worker was deployed from, by file times and sizes: the sources it was built from,
the artifact it runs, its views and its worker.yaml. A prod reload (SIGHUP) compares a
fresh fingerprint with the deployed one to redo only what changed."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import attrs

# Inside a worker: directories of build output (ours in bin/, Gradle's, Maven's),
# dependencies (node_modules, a Python worker's .venv), logs and data. Changes there are
# not source changes.
NOT_SOURCE_DIRS = frozenset(
    [
        "bin",
        "node_modules",
        ".venv",
        "vendor",
        "build",
        "target",
        ".gradle",
        ".git",
        "__pycache__",
        "logs",
        "data",
    ]
)


def tree_signature(paths: Iterable[str]) -> str:
    """A digest of (path, mtime, size) of every file under ``paths`` (files or directories),
    "" when there are none. Any edit, addition, deletion or rename changes it — also an
    rsync that sets a file's mtime to an *older* time than its neighbours have."""
    digest = hashlib.sha1()
    found = False
    for path in paths:
        for name, st in _files(path):
            found = True
            digest.update(b"%s\0%d\0%d\n" % (os.fsencode(name), st.st_mtime_ns, st.st_size))
    return digest.hexdigest() if found else ""


def _files(path: str):
    """(path, stat) of ``path`` if a file, else of the files under it, in a stable order."""
    try:
        st = os.stat(path)
    except OSError:
        return
    if not os.path.isdir(path):
        yield path, st
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in NOT_SOURCE_DIRS)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                yield full, os.stat(full)
            except OSError:
                pass


def _signature(path: str | None) -> str:
    return tree_signature([path]) if path else ""


@attrs.frozen
class Fingerprint:
    sources: str
    artifact: str
    views: str
    config: str
    missing: tuple[str, ...] = ()  # build outputs not on disk (deleted by a deploy)

    @classmethod
    def take(cls, spec, runtime) -> Fingerprint:
        return cls(
            sources=tree_signature(runtime.build_inputs(spec)),
            artifact=_signature(runtime.artifact(spec)),
            views=tree_signature([os.path.join(spec.directory, "views")]),
            config=_signature(spec.config_file),
            missing=tuple(p for p in runtime.outputs(spec) if not os.path.exists(p)),
        )

    def difference(self, now: Fingerprint) -> str | None:
        """What changed since this fingerprint: 'artifact' (a deployed binary: restart it
        as is), 'sources' (rebuild; also when a build output is missing now, as after an
        rsync --delete without protect rules), 'views' or 'config' (restart), or None."""
        if set(now.missing) - set(self.missing):  # there when deployed, gone now
            return "sources"
        if now.artifact != self.artifact and now.artifact:
            return "artifact"
        if now.sources != self.sources:
            return "sources"
        if now.views != self.views:
            return "views"
        if now.config != self.config:
            return "config"
        return None
