"""Bun workers: ``bun install`` (prod: ``bun install --production``, no devDependencies)
when package.json or the lockfile changed since the last successful install, then
``bun run <bun.entrypoint>`` with ``bun.env`` in the environment.

The last successful install is remembered by a stamp file in node_modules/, whose mtime
is compared with package.json's and the lockfile's and which names the kind of install
(a dev install is not a production one): stat calls and one small read, so deciding costs
the reactor nothing, and an unchanged worker is swapped without waiting for bun.
"""

from __future__ import annotations

import os

from tqserver.config.discovery import WorkerSpec
from tqserver.runtimes import BuildStep, Runtime, ToolchainMissing, find_tool
from tqserver.runtimes.stamps import read_stamp, stamp_step

INSTALL_HINT = (
    "Bun is not installed (not on PATH nor in npm's global bin): "
    "install Bun: npm install -g bun (or bin/install-toolchains --only bun)"
)
LOCKFILES = ("bun.lock", "bun.lockb")
STAMP = os.path.join("node_modules", ".tqserver-installed")
SOURCE_SUFFIXES = (".ts", ".tsx", ".mts", ".cts", ".js", ".jsx", ".mjs", ".cjs")
_NOT_SOURCES = {"node_modules", "bin", "public", "config", "logs"}


def npm_global_bins() -> list[str]:
    """Where ``npm install -g`` (and Bun's own installer) put executables, found without
    running npm: a supervisor started by systemd may have a bare PATH."""
    home = os.path.expanduser("~")
    prefixes = [
        os.environ.get("NPM_CONFIG_PREFIX"),
        os.environ.get("npm_config_prefix"),
        _npmrc_prefix(os.path.join(home, ".npmrc")),
    ]
    bins = [os.path.join(p, "bin") for p in prefixes if p]
    node = find_tool("node")
    if node:  # npm's default global prefix is the one node itself is installed under
        bins += [os.path.dirname(node), os.path.dirname(os.path.realpath(node))]
    bins += [
        "/usr/local/bin",
        "/usr/bin",
        os.path.join(home, ".npm-global", "bin"),
        os.path.join(os.environ.get("BUN_INSTALL") or os.path.join(home, ".bun"), "bin"),
    ]
    return list(dict.fromkeys(bins))


def _npmrc_prefix(path: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                key, sep, value = line.partition("=")
                if sep and key.strip() == "prefix":
                    return os.path.expanduser(value.strip())
    except OSError:
        pass
    return None


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def install_kind(mode: str) -> str:
    """What the stamp of an install in ``mode`` says."""
    return "production" if mode == "prod" else "development"


class BunRuntime(Runtime):
    type = "bun"

    def bun(self) -> str:
        tool = find_tool("bun", *(os.path.join(d, "bun") for d in npm_global_bins()))
        if tool is None:
            raise ToolchainMissing(INSTALL_HINT)
        return tool

    def entrypoint(self, spec: WorkerSpec) -> str:
        return os.path.join(spec.directory, spec.config.bun.entrypoint)

    def lockfile(self, spec: WorkerSpec) -> str | None:
        for name in LOCKFILES:
            path = os.path.join(spec.directory, name)
            if os.path.exists(path):
                return path
        return None

    def outputs(self, spec: WorkerSpec) -> list[str]:
        """node_modules' install stamp, when there is a package.json to install."""
        if _mtime(os.path.join(spec.directory, "package.json")) is None:
            return []
        return [os.path.join(spec.directory, STAMP)]

    def install_needed(self, spec: WorkerSpec, mode: str = "dev") -> bool:
        """package.json exists and node_modules is missing, or the stamp of the last
        successful install is missing, of the other mode, or not newer than package.json
        and the lockfile."""
        d = spec.directory
        manifest = _mtime(os.path.join(d, "package.json"))
        if manifest is None:
            return False
        if not os.path.isdir(os.path.join(d, "node_modules")):
            return True
        stamp = _mtime(os.path.join(d, STAMP))
        if stamp is None or read_stamp(os.path.join(d, STAMP)) != install_kind(mode):
            return True
        lock = self.lockfile(spec)
        newest = max(manifest, _mtime(lock) or 0) if lock else manifest
        # ">=": mtimes tick coarsely; an edit in the same tick as the stamp must count.
        return newest >= stamp

    def build_steps(self, spec: WorkerSpec, mode: str = "dev") -> list[BuildStep]:
        bun = self.bun()  # also checked when there is nothing to install: run needs it
        if not self.install_needed(spec, mode):
            return []
        argv = [bun, "install"] + (["--production"] if mode == "prod" else [])
        stamp = os.path.join(spec.directory, STAMP)
        return [
            BuildStep(argv, spec.directory),
            stamp_step(spec.directory, stamp, install_kind(mode)),
        ]

    def run_argv(self, spec: WorkerSpec, port: int) -> list[str]:
        return [self.bun(), "run", self.entrypoint(spec)]

    def env(self, spec: WorkerSpec, port: int) -> dict[str, str]:
        return dict(spec.config.bun.env)

    def build_inputs(self, spec: WorkerSpec) -> list[str]:
        """The entry point, every script under the worker but outside node_modules, the
        manifest and the lockfile."""
        d = spec.directory
        found = {self.entrypoint(spec)}
        for parent, dirs, files in os.walk(d):
            dirs[:] = sorted(
                n
                for n in dirs
                if not n.startswith(".")
                and not (parent == d and n in _NOT_SOURCES)
                and n != "node_modules"
            )
            found.update(os.path.join(parent, n) for n in files if n.endswith(SOURCE_SUFFIXES))
        found.add(os.path.join(d, "package.json"))
        found.update(os.path.join(d, n) for n in LOCKFILES)
        return sorted(found)
