"""How each kind of worker is built, started and told where to listen.

A runtime only describes commands; running them belongs to build.py and process.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys

import attrs

from tqserver.config.discovery import WorkerSpec


class CannotBuild(Exception):
    """The worker cannot be built or started as it stands; the message says why. The pool
    shows it like a failed build (dev: the build-error page) instead of retrying."""


class ToolchainMissing(CannotBuild):
    """The worker's language toolchain is not installed; the message says what to install."""


@attrs.frozen
class BuildStep:
    argv: list[str]
    cwd: str
    env: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Probe:
    """How an instance's health is asked: HTTP GET of the worker's health_path, or a
    FastCGI request for a fixed path whose answer must carry ``expect``."""

    protocol: str = "http"  # "http" | "fastcgi"
    path: str | None = None  # None: the worker's health_path
    expect: bytes | None = None  # the body a healthy answer carries (None: any)


HTTP_PROBE = Probe()


@attrs.frozen
class Launch:
    """What starting one instance takes: its argv, and the files generated for it (removed
    when it exits)."""

    argv: list[str]
    files: tuple[str, ...] = ()


HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "buildhelper.py")


def helper_step(cwd: str, *args: str) -> BuildStep:
    """A build step running buildhelper.py (see there) with the supervisor's interpreter."""
    return BuildStep([sys.executable, HELPER] + list(args), cwd)


class Runtime:
    """Base: a worker type with no build step that runs ``command``."""

    type = "command"
    probe: Probe = HTTP_PROBE
    stop_signal: int = signal.SIGTERM  # the worker contract: finish in-flight requests, exit

    def build_steps(self, spec: WorkerSpec, mode: str = "dev") -> list[BuildStep]:
        """Commands that turn sources into something runnable in ``mode`` ("dev" | "prod"):
        empty when there is nothing to build or the output is up to date."""
        return []

    def run_argv(self, spec: WorkerSpec, port: int) -> list[str]:
        raise NotImplementedError

    def build_env(self, spec: WorkerSpec, mode: str) -> dict[str, str]:
        """Extra environment for the build steps in this mode ("dev" | "prod")."""
        return {}

    def launch(self, spec: WorkerSpec, port: int, instance_id: str, root: str, mode: str) -> Launch:
        """Everything one instance needs on disk and its argv (most runtimes: just argv)."""
        return Launch(self.run_argv(spec, port))

    def drain_seconds(self, spec: WorkerSpec, settings) -> float:
        """How long a retired instance may take to finish the requests the proxy still has
        in flight on it, before it is sent ``stop_signal``."""
        return settings.shutdown_grace_period_ms / 1000.0

    def env(self, spec: WorkerSpec, port: int) -> dict[str, str]:
        """Runtime-specific environment on top of the worker contract's."""
        return {}

    def config_env(self, spec: WorkerSpec, port: int) -> dict[str, str]:
        """worker.yaml's ``env:`` as the instance gets it (applied last, so it wins)."""
        return dict(spec.config.env)

    def build_inputs(self, spec: WorkerSpec) -> list[str]:
        """Paths whose mtimes decide whether a rebuild is needed (prod reload)."""
        return [os.path.join(spec.directory, "src")]

    def artifact(self, spec: WorkerSpec) -> str | None:
        """The file a build produces (a deployed one is restarted without a build)."""
        return None

    def outputs(self, spec: WorkerSpec) -> list[str]:
        """Files the server's build leaves and running needs: one missing (an rsync
        --delete removed it) means rebuild, whatever the sources say."""
        artifact = self.artifact(spec)
        return [artifact] if artifact else []


# Not a program's sources: checked on their own, static, or written while it runs.
_NOT_INPUTS = frozenset(
    ["config", "public", "views", "bin", "logs", "data", "node_modules", "vendor", "__pycache__"]
)


def worker_files(spec: WorkerSpec) -> list[str]:
    """The worker's own files (its program, scripts, data it ships, dependency manifests),
    so a prod reload redoes it when they change; not config/ (its own check), public/
    (static) or views/, nor hidden ones (.venv) or what the program writes."""
    try:
        names = os.listdir(spec.directory)
    except OSError:
        return []
    return sorted(
        os.path.join(spec.directory, n)
        for n in names
        if not n.startswith(".") and n not in _NOT_INPUTS
    )


def find_tool(name: str, *fallbacks: str) -> str | None:
    """A toolchain binary on PATH, else at a well-known install location."""
    found = shutil.which(name)
    if found:
        return found
    for path in fallbacks:
        if os.access(path, os.X_OK):
            return path
    return None


def binary_name(spec: WorkerSpec) -> str:
    """File name for a worker's build output: its last path segment."""
    return spec.name.rsplit("/", 1)[-1] or "worker"


def _registry() -> dict[str, Runtime]:
    from tqserver.runtimes import bun, command, go, kotlin, php, python

    return {
        "go": go.GoRuntime(),
        "python": python.PythonRuntime(),
        "bun": bun.BunRuntime(),
        "kotlin": kotlin.KotlinRuntime(),
        "php": php.PhpRuntime(),
        "command": command.CommandRuntime(),
    }


def runtime_for(type_: str) -> Runtime:
    """The runtime for a worker.yaml ``type``; runtimes are stateless, one per call."""
    try:
        return _registry()[type_]
    except KeyError:
        raise ToolchainMissing(
            f"the {type_!r} runtime is not supported by this TQServer yet"
        ) from None
