"""Go workers: ``go build -o bin/<name> ./src``, then run the binary."""

from __future__ import annotations

import glob
import os

from tqserver.config.discovery import WorkerSpec
from tqserver.runtimes import BuildStep, Runtime, ToolchainMissing, binary_name, find_tool

INSTALL_HINT = (
    "Go is not installed: install Go (apt-get install golang-go, or "
    "bin/install-toolchains --only go) and make sure `go` is on PATH"
)


class GoRuntime(Runtime):
    type = "go"

    def go(self) -> str:
        tool = find_tool("go", "/usr/local/go/bin/go", "/usr/lib/go/bin/go")
        if tool is None:
            raise ToolchainMissing(INSTALL_HINT)
        return tool

    def artifact(self, spec: WorkerSpec) -> str:
        return os.path.join(spec.directory, "bin", binary_name(spec))

    def build_steps(self, spec: WorkerSpec) -> list[BuildStep]:
        go = self.go()
        # VCS stamping runs git on every build and is of no use for a worker.
        flags = ["-buildvcs=false"] + list(spec.config.go.build_flags)
        out = self.artifact(spec)
        src = os.path.join(spec.directory, "src")
        if os.path.exists(os.path.join(spec.directory, "go.mod")):
            argv = [go, "build"] + flags + ["-o", out, "./src"]
            cwd = spec.directory
        elif os.path.exists(os.path.join(src, "go.mod")):
            argv = [go, "build"] + flags + ["-o", out, "."]
            cwd = src
        else:
            # No module: build the files as one command-line package.
            files = sorted(
                f for f in glob.glob(os.path.join(src, "*.go")) if not f.endswith("_test.go")
            )
            argv = [go, "build"] + flags + ["-o", out] + files
            cwd = spec.directory
        return [BuildStep(argv, cwd)]

    def build_env(self, spec: WorkerSpec, mode: str) -> dict[str, str]:
        # Dev builds skip the symbol table and DWARF: the link is faster, and the edit
        # loop is mostly link time. Panics still show file:line. Prod keeps them.
        if mode == "dev" and "GOFLAGS" not in os.environ:
            return {"GOFLAGS": "-ldflags=-s"}
        return {}

    def build_inputs(self, spec: WorkerSpec) -> list[str]:
        d = spec.directory
        return [os.path.join(d, "src"), os.path.join(d, "go.mod"), os.path.join(d, "go.sum")]

    def run_argv(self, spec: WorkerSpec, port: int) -> list[str]:
        return [self.artifact(spec)]

    def env(self, spec: WorkerSpec, port: int) -> dict[str, str]:
        go = spec.config.go
        env = {"GOMAXPROCS": str(go.go_max_procs)}
        if go.go_mem_limit:
            env["GOMEMLIMIT"] = go.go_mem_limit
        return env
