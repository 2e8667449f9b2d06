"""Ahead-of-time builds (bin/build-dev, bin/build-prod): every worker built the way the
supervisor builds it in that mode, through the same runtime build steps and the same build
runner, so what a deploy ships is what the server would have built itself."""

from __future__ import annotations

import os

import attrs
from twisted.internet import defer

from tqserver.config.discovery import Discovery, WorkerSpec, discover
from tqserver.runtimes import HELPER, CannotBuild, runtime_for
from tqserver.supervise import build

BUILT, UP_TO_DATE, FAILED = "built", "up to date", "failed"


@attrs.frozen
class Outcome:
    """What happened to one worker."""

    worker: str
    type: str
    status: str  # BUILT | UP_TO_DATE | FAILED
    seconds: float = 0.0
    command: str = ""  # the main build command, shortened
    output: str = ""  # the build's output (shown when it failed)


def workers_dir(root: str, config) -> str:
    directory = config.workers.directory
    return directory if os.path.isabs(directory) else os.path.join(root, directory)


def find_workers(root: str, config, mode: str) -> Discovery:
    """The workers enabled in ``mode`` under the configured workers directory."""
    return discover(workers_dir(root, config), mode, config.file_watcher.ignore)


@attrs.frozen
class Selection:
    specs: list[WorkerSpec]
    errors: list  # configuration errors of the selected workers (all of them: every error)
    unknown: list[str]  # names that are no worker, not even a broken one


def select(found: Discovery, workers_dir: str, names: list[str]) -> Selection:
    """The workers named (all when ``names`` is empty). A named worker whose worker.yaml is
    invalid is one of the errors; an error of another worker is not."""
    if not names:
        return Selection(list(found.workers), list(found.errors), [])
    by_name = {spec.name: spec for spec in found.workers}
    errors, unknown = [], []
    for name in names:
        if name in by_name:
            continue
        directory = os.path.join(workers_dir, name) + os.sep
        own = [e for e in found.errors if str(e.file or "").startswith(directory)]
        errors.extend(own)
        if not own:
            unknown.append(name)
    return Selection([by_name[n] for n in names if n in by_name], errors, unknown)


def short_command(argv: list[str], cwd: str, width: int = 72) -> str:
    """A build command as a reader recognises it: tool names without their directories,
    paths relative to the worker, the build helper by its job, cut at ``width``."""
    if len(argv) > 2 and argv[1] == HELPER:
        argv = [argv[2], *argv[3:]]
    parts = [os.path.basename(argv[0])] if argv else []
    for arg in argv[1:]:
        if os.path.isabs(arg) and arg.startswith(cwd + os.sep):
            arg = os.path.relpath(arg, cwd)
        parts.append(arg)
    text = " ".join(parts)
    return text if len(text) <= width else text[: width - 1] + "…"


async def build_worker(reactor, spec: WorkerSpec, mode: str) -> Outcome:
    try:
        runtime = runtime_for(spec.type)
        steps, env = build.plan(runtime, spec, mode)
    except CannotBuild as e:
        return Outcome(spec.name, spec.type, FAILED, output=str(e))
    if not steps:
        return Outcome(spec.name, spec.type, UP_TO_DATE)
    command = short_command(steps[0].argv, spec.directory)
    result = await build.run_build(reactor, steps, env)
    return Outcome(
        spec.name,
        spec.type,
        BUILT if result.ok else FAILED,
        result.duration,
        command,
        result.output,
    )


async def build_all(reactor, specs: list[WorkerSpec], mode: str, jobs: int, report) -> list:
    """Build ``specs``, ``jobs`` at a time; ``report(outcome)`` as each one finishes."""
    limit = defer.DeferredSemaphore(max(1, jobs))

    async def one(spec: WorkerSpec) -> Outcome:
        await limit.acquire()
        try:
            outcome = await build_worker(reactor, spec, mode)
        finally:
            limit.release()
        report(outcome)
        return outcome

    return await defer.gatherResults([defer.ensureDeferred(one(s)) for s in specs])
