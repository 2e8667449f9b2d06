"""Any command: argv from worker.yaml with ``{port}`` replaced."""
from __future__ import annotations

from typing import List

from ..discovery import WorkerSpec
from . import Runtime


class CommandRuntime(Runtime):
    type = "command"

    def run_argv(self, spec: WorkerSpec, port: int) -> List[str]:
        return [part.replace("{port}", str(port)) for part in spec.config.command]

    def build_inputs(self, spec: WorkerSpec) -> List[str]:
        return []
