"""Any command: argv from worker.yaml, with ``{port}`` replaced in every argv element and in
the values of ``env:`` (for programs that take their address from a flag or a variable)."""

from __future__ import annotations

import os
import shutil

from tqserver.config.discovery import WorkerSpec
from tqserver.runtimes import BuildStep, CannotBuild, Runtime, worker_files


def substitute(text: str, port: int) -> str:
    return text.replace("{port}", str(port))


class CommandRuntime(Runtime):
    type = "command"

    def build_steps(self, spec: WorkerSpec, mode: str = "dev") -> list[BuildStep]:
        """Nothing to build; but say so now, on the build-error page, when the command
        cannot run at all, rather than retrying a process that can never start."""
        argv = spec.config.command
        if not argv or not argv[0]:
            raise CannotBuild(
                "type: command needs a non-empty `command:` list in "
                'worker.yaml, e.g. ["python3", "-m", "http.server", "{port}"]'
            )
        program = argv[0]
        if os.sep not in program:
            path = spec.config.env.get("PATH", os.environ.get("PATH", os.defpath))
            if shutil.which(program, path=path) is None:
                raise CannotBuild(f"command not found: {program!r} is not on PATH ({path})")
        elif os.path.isabs(program) and not os.access(program, os.X_OK):
            raise CannotBuild(f"command not found: {program} does not exist or is not executable")
        return []

    def run_argv(self, spec: WorkerSpec, port: int) -> list[str]:
        return [substitute(part, port) for part in spec.config.command]

    def config_env(self, spec: WorkerSpec, port: int) -> dict[str, str]:
        return {k: substitute(v, port) for k, v in spec.config.env.items()}

    def build_inputs(self, spec: WorkerSpec) -> list[str]:
        return worker_files(spec)
