"""Go workers: ``go build -o bin/<name> ./src``, then run the binary.

Prod builds are release builds (``-trimpath -ldflags "-s -w"``: no local paths, no symbol
table, no DWARF). A stamp next to the binary records the inputs and flags it was built
from: an unchanged worker is not rebuilt (nor is Go needed) when the supervisor restarts,
and a binary built elsewhere and shipped with its stamp runs as it is."""

from __future__ import annotations

import glob
import os

from tqserver.config.discovery import WorkerSpec
from tqserver.runtimes import BuildStep, Runtime, ToolchainMissing, binary_name, find_tool
from tqserver.runtimes.stamps import inputs_digest, is_fresh, stamp_step, walk_files

INSTALL_HINT = (
    "Go is not installed: install Go (apt-get install golang-go, or "
    "bin/install-toolchains --only go) and make sure `go` is on PATH"
)
# VCS stamping runs git on every build and is of no use for a worker.
BASE_FLAGS = ("-buildvcs=false",)
PROD_FLAGS = ("-trimpath", "-ldflags=-s -w")


class GoRuntime(Runtime):
    type = "go"

    def go(self) -> str:
        tool = find_tool("go", "/usr/local/go/bin/go", "/usr/lib/go/bin/go")
        if tool is None:
            raise ToolchainMissing(INSTALL_HINT)
        return tool

    def artifact(self, spec: WorkerSpec) -> str:
        return os.path.join(spec.directory, "bin", binary_name(spec))

    def stamp(self, spec: WorkerSpec) -> str:
        return os.path.join(spec.directory, "bin", f".{binary_name(spec)}.inputs")

    def flags(self, spec: WorkerSpec, mode: str) -> list[str]:
        """The build flags; the worker's own go.build_flags come last and so win."""
        return (
            list(BASE_FLAGS)
            + (list(PROD_FLAGS) if mode == "prod" else [])
            + list(spec.config.go.build_flags)
        )

    def digest(self, spec: WorkerSpec, mode: str) -> str:
        env = self.build_env(spec, mode).get("GOFLAGS", os.environ.get("GOFLAGS", ""))
        how = "\0".join(["go", *self.flags(spec, mode), "GOFLAGS=" + env])
        return inputs_digest(spec.directory, how, walk_files(self.build_inputs(spec)))

    def build_steps(self, spec: WorkerSpec, mode: str = "dev") -> list[BuildStep]:
        digest = self.digest(spec, mode)
        if is_fresh(self.artifact(spec), self.stamp(spec), digest):
            return []
        go = self.go()
        flags = self.flags(spec, mode)
        out = self.artifact(spec)
        src = os.path.join(spec.directory, "src")
        if os.path.exists(os.path.join(spec.directory, "go.mod")):
            argv = [go, "build", *flags, "-o", out, "./src"]
            cwd = spec.directory
        elif os.path.exists(os.path.join(src, "go.mod")):
            argv = [go, "build", *flags, "-o", out, "."]
            cwd = src
        else:
            # No module: build the files as one command-line package.
            files = sorted(
                f for f in glob.glob(os.path.join(src, "*.go")) if not f.endswith("_test.go")
            )
            argv = [go, "build", *flags, "-o", out, *files]
            cwd = spec.directory
        return [BuildStep(argv, cwd), stamp_step(spec.directory, self.stamp(spec), digest)]

    def build_env(self, spec: WorkerSpec, mode: str) -> dict[str, str]:
        # Dev builds skip the symbol table and DWARF: the link is ~30% faster, and the
        # edit loop is mostly link time. Panics still show file:line.
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
