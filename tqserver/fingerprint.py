"""What a worker was deployed from, by modification time: the sources it was built from,
the artifact it runs, its views and its worker.yaml. A prod reload (SIGHUP) compares a
fresh fingerprint with the deployed one to redo only what changed."""
from __future__ import annotations

import os
from typing import Iterable, Optional

import attrs

# Inside a worker: directories of build output (ours in bin/, Gradle's, Maven's),
# dependencies, logs and data. Changes there are not source changes.
NOT_SOURCE_DIRS = frozenset(["bin", "node_modules", "vendor", "build", "target", ".gradle",
                             ".git", "__pycache__", "logs", "data"])


def newest_mtime(paths: Iterable[str]) -> int:
    """The newest mtime (ns) of the files under ``paths`` (files or directories), 0 if none.
    Directory mtimes count too, so a deleted file shows as a change."""
    newest = 0
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        newest = max(newest, st.st_mtime_ns)
        if os.path.isdir(path):
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = [d for d in dirnames if d not in NOT_SOURCE_DIRS]
                for name in filenames + dirnames:
                    try:
                        newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime_ns)
                    except OSError:
                        pass
    return newest


def _mtime(path: Optional[str]) -> int:
    if not path:
        return 0
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


@attrs.frozen
class Fingerprint:
    sources: int
    artifact: int
    views: int
    config: int

    @classmethod
    def take(cls, spec, runtime) -> "Fingerprint":
        return cls(sources=newest_mtime(runtime.build_inputs(spec)),
                   artifact=_mtime(runtime.artifact(spec)),
                   views=newest_mtime([os.path.join(spec.directory, "views")]),
                   config=_mtime(spec.config_file))

    def difference(self, now: "Fingerprint") -> Optional[str]:
        """What changed since this fingerprint: 'artifact' (a deployed binary: restart it
        as is), 'sources' (rebuild), 'views' or 'config' (restart), or None."""
        if now.artifact != self.artifact and now.artifact:
            return "artifact"
        if now.sources != self.sources:
            return "sources"
        if now.views != self.views:
            return "views"
        if now.config != self.config:
            return "config"
        return None
