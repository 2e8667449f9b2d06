"""Python workers: the supervisor's own interpreter runs the entry point."""

from __future__ import annotations

import os
import sys

from tqserver.config.discovery import WorkerSpec
from tqserver.runtimes import Runtime

# So `from tqserver.worker import serve` works even when tqserver is not installed.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PythonRuntime(Runtime):
    type = "python"

    def entrypoint(self, spec: WorkerSpec) -> str:
        return os.path.join(spec.directory, spec.config.python.entrypoint)

    def run_argv(self, spec: WorkerSpec, port: int) -> list[str]:
        return [sys.executable, self.entrypoint(spec)]

    def build_inputs(self, spec: WorkerSpec) -> list[str]:
        return [os.path.join(spec.directory, "src")]

    def env(self, spec: WorkerSpec, port: int) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH")
        return {
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": _PACKAGE_PARENT + (os.pathsep + path if path else ""),
        }
