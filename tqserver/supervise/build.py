"""Running a worker's build commands off the reactor thread's back: as child processes,
output kept, cancellable (a newer change supersedes an older build)."""

from __future__ import annotations

import os
import signal

import attrs
from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol

from tqserver.runtimes import BuildStep
from tqserver.supervise import instance as process

MAX_OUTPUT = 256 * 1024  # keep the head of a build's output; compilers can be verbose


@attrs.define
class BuildResult:
    ok: bool
    output: str
    started: float
    duration: float
    command: str = ""
    cancelled: bool = False


class _Collector(ProcessProtocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None  # connected
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if self.size < MAX_OUTPUT:
            self.chunks.append(data[: MAX_OUTPUT - self.size])
        self.size += len(data)

    def processEnded(self, reason) -> None:
        code = reason.value.exitCode if isinstance(reason.value, error.ProcessTerminated) else 0
        self.done.callback(code)

    def output(self) -> str:
        text = b"".join(self.chunks).decode("utf-8", "replace")
        if self.size > MAX_OUTPUT:
            text += f"\n... ({self.size - MAX_OUTPUT} more bytes of output cut)\n"
        return text


def plan(runtime, spec, mode: str) -> tuple[list[BuildStep], dict[str, str]]:
    """What building ``spec`` in ``mode`` takes: the runtime's steps (empty when the output
    is up to date) and their environment. Raises CannotBuild. The supervisor and the
    ahead-of-time build (bin/build-dev, bin/build-prod) both build through this."""
    steps = runtime.build_steps(spec, mode)
    env = dict(os.environ)
    env.update(runtime.build_env(spec, mode))
    return steps, env


def run_build(
    reactor, steps: list[BuildStep], base_env: dict[str, str] | None = None
) -> defer.Deferred:
    """Run ``steps`` in order; fires with a BuildResult. Cancelling the Deferred kills the
    running step's whole process group (the Deferred then fails with CancelledError)."""
    started = reactor.seconds()
    outputs: list[str] = []
    current: dict[str, _Collector] = {}
    state = {"cancelled": False}

    def cancel(_d) -> None:
        state["cancelled"] = True
        proto = current.get("proto")
        if proto is not None and proto.transport is not None:
            process.signal_group(proto.transport.pid, signal.SIGKILL)

    async def run() -> BuildResult:
        command = ""
        for step in steps:
            command = " ".join(step.argv)
            env = dict(base_env if base_env is not None else os.environ)
            env.update(step.env)
            proto = _Collector()
            current["proto"] = proto
            try:
                argv = process.in_new_session(step.argv)
                reactor.spawnProcess(proto, argv[0], argv, env=env, path=step.cwd)
            except OSError as e:
                return BuildResult(
                    False,
                    f"$ {command}\ncannot run: {e}\n",
                    started,
                    reactor.seconds() - started,
                    command,
                )
            code = await proto.done
            outputs.append(f"$ {command}\n{proto.output()}")
            if state["cancelled"]:
                return BuildResult(
                    False,
                    "".join(outputs) + "\n(superseded by a newer change)\n",
                    started,
                    reactor.seconds() - started,
                    command,
                    cancelled=True,
                )
            if code != 0:
                outputs.append(f"(exit status {code})\n")
                return BuildResult(
                    False, "".join(outputs), started, reactor.seconds() - started, command
                )
        return BuildResult(True, "".join(outputs), started, reactor.seconds() - started, command)

    inner = defer.ensureDeferred(run())
    outer: defer.Deferred = defer.Deferred(cancel)
    # After a cancel, `outer` has already failed with CancelledError; drop the late result.
    inner.addBoth(lambda result: None if outer.called else outer.callback(result))
    return outer
