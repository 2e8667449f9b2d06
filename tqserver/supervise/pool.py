"""WorkerPool: the instances of one worker, and every change to them (build, blue/green
swap, drain, crash restart with backoff)."""

from __future__ import annotations

import os
import random
from collections.abc import Coroutine
from typing import Any, Callable

import attrs
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from tqserver.config.discovery import WorkerSpec
from tqserver.config.server import WorkersSection
from tqserver.logs.files import FailSafeLog, resolve_template
from tqserver.logs.tail import LogTail
from tqserver.runtimes import CannotBuild, Runtime
from tqserver.supervise import build
from tqserver.supervise.build import BuildResult
from tqserver.supervise.cgroups import CgroupParent
from tqserver.supervise.events import PoolEvent
from tqserver.supervise.fingerprint import Fingerprint
from tqserver.supervise.instance import Instance, InstanceState
from tqserver.supervise.lifecycle import Backoff
from tqserver.supervise.ports import PortPool, PortsExhausted
from tqserver.supervise.proctree import ProcTable
from tqserver.supervise.rotation import Rotation

log = Logger()

CRASH_LOOP_WINDOW = 60.0  # this many crashes in this window is reported as a crash loop
CRASH_LOOP_COUNT = 5
READY_POLL_SECONDS = 0.025  # readiness probe cadence while an instance starts


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@attrs.define
class PoolContext:
    """What every pool shares; owned by the Supervisor."""

    reactor: Any  # IReactorTime and IReactorProcess
    root: str
    mode: str  # "dev" | "prod"
    ports: PortPool
    settings: Callable[[], WorkersSection]  # the current one (server.yaml may be reloaded)
    probe: Callable[[Instance, str, float], defer.Deferred]  # -> bool
    base_env: dict[str, str] = attrs.field(factory=dict)
    changed: Callable[[WorkerPool, PoolEvent], None] = lambda pool, event: None
    started: Callable[[Instance], None] = lambda inst: None
    exited: Callable[[Instance], None] = lambda inst: None
    # Fires when no request is in flight on an instance anywhere (proxy processes included).
    idle: Callable[[Instance], defer.Deferred] = lambda inst: inst.idle()
    revision: Callable[[], str] = lambda: ""  # the release on disk now (REVISION)
    # Where an instance's processes are found besides its process group (None: only
    # there, as in tests on fake processes): /proc, and a cgroup per instance if allowed.
    procs: ProcTable | None = None
    cgroups: CgroupParent | None = None


class WorkerPool(Rotation, Service):
    """One worker's instances. ``serving`` is the rotation the proxy picks from; it is only
    ever replaced whole, after the new instances answered their first health probe."""

    name: str  # type: ignore[assignment]  # the worker's; Twisted types Service.name as None

    _public_of = None  # the spec _public_dir was computed for
    _public_dir = ""

    def __init__(self, spec: WorkerSpec, runtime: Runtime, ctx: PoolContext) -> None:
        self.spec = spec
        self.runtime = runtime
        self.ctx = ctx
        self.name = spec.name
        self.serving: tuple[Instance, ...] = ()
        self.instances: set[Instance] = set()
        self.last_build: BuildResult | None = None
        self.error: str | None = None
        self.build_error: str | None = None  # compiler output while the build is broken
        self.start_error: str | None = None  # last output of new code that exited at start
        self.deploying = False
        self.restarts: dict[str, int] = {}
        self.crash_times: list[float] = []
        self._counter = 0
        self._backoff = Backoff()  # between restarts after crashes or failed starts
        self._restart_call = None
        self._queue: tuple[str, bool] | None = None
        self._queue_waiters: list[defer.Deferred] = []
        self._serving_waiters: list[defer.Deferred] = []
        self._log_file: FailSafeLog | None = None
        self.log_tail = LogTail()  # its last output lines (status page, tqserver logs)
        self._build_d: defer.Deferred | None = None
        self._building_from: Fingerprint | None = None  # what the build in flight builds
        self._joined: list[defer.Deferred] = []  # asked for exactly the deploy in flight
        self.fingerprint: Fingerprint | None = None
        self.revision: str | None = None  # the release the serving code came from
        self._deploy_started = 0.0
        self.last_swap_seconds: float | None = None  # deploy start -> new code serving
        self._last_busy = 0.0

    # -- what the proxy uses (and Rotation's pick/wait_serving) -------------------------
    def _may_serve_soon(self) -> bool:
        return bool(self.running) and (self.deploying or self._restart_call is not None)

    @property
    def _reactor(self):
        return self.ctx.reactor

    @property
    def public_dir(self) -> str:
        """The worker's public/ directory. It may not exist (dev mode may create it at any
        time); static.resolve_public_file answers None for paths that do not exist."""
        spec = self.spec
        if self._public_of is not spec:  # computed once per spec (a deploy brings a new one)
            self._public_dir = os.path.join(spec.directory, "public")
            self._public_of = spec
        return self._public_dir

    @property
    def max_requests(self) -> int:
        config = self.spec.config
        return config.max_requests or (config.go.max_requests if self.spec.type == "go" else 0)

    def _request_limit(self, inst: Instance) -> None:
        log.info("{id} served {n} requests: recycling it", id=inst.id, n=inst.requests)
        self.replace(inst, "max_requests")

    def check_memory(self, inst: Instance) -> None:
        """Recycle ``inst`` when its process tree uses more than memory_limit (RSS)."""
        limit = self.spec.config.memory_limit
        if not limit or inst.state is not InstanceState.READY:
            return
        rss = tree_rss(inst.pid)
        if rss > limit:
            log.info(
                "{id} uses {mb:.0f} MiB, over memory_limit {limit:.0f} MiB: recycling it",
                id=inst.id,
                mb=rss / 2**20,
                limit=limit / 2**20,
            )
            self.replace(inst, "memory")

    # -- autoscaling: min_workers..max_workers ------------------------------------------
    def _note_load(self) -> None:
        """On each request start: scale up when in-flight requests per serving instance
        exceed scaling.queue_threshold (one instance at a time)."""
        serving = self.serving
        scaling = self.spec.config.scaling
        inflight = sum(i.inflight + i.inflight_elsewhere for i in serving)
        now = self.ctx.reactor.seconds()
        if inflight > scaling.queue_threshold * (len(serving) - 1):
            self._last_busy = now  # this load needs every instance we have
        if (
            serving
            and inflight > scaling.queue_threshold * len(serving)
            and len(serving) < scaling.max_workers
            and not self.deploying
            and self.running
        ):
            log.info(
                "{worker}: {n} requests in flight on {k} instance(s): scaling up",
                worker=self.name,
                n=inflight,
                k=len(serving),
            )
            self._run_deploy(self._rollout(1, [], "scale up"))

    def maybe_scale_down(self) -> None:
        """Called periodically: retire one instance once the load has fit in one fewer for
        scaling.scale_down_delay seconds."""
        scaling = self.spec.config.scaling
        serving = self.serving
        if len(serving) <= self.desired or self.deploying or not self.running:
            return
        now = self.ctx.reactor.seconds()
        if now - self._last_busy < scaling.scale_down_delay:
            return
        victim = min(serving, key=lambda inst: inst.inflight + inst.inflight_elsewhere)
        log.info(
            "{worker}: load fits in {k} instance(s): scaling down ({id})",
            worker=self.name,
            k=len(serving) - 1,
            id=victim.id,
        )
        self._set_serving(tuple(i for i in serving if i is not victim))
        self._last_busy = now
        self._retire(victim)

    @property
    def desired(self) -> int:
        return max(1, self.spec.config.scaling.min_workers)

    @property
    def status(self) -> str:
        if not self.running:
            return "stopped"
        if not self.serving:
            # (a crash loop is failed, also while its next try starts)
            if not self.crash_loop and (self.deploying or self._restart_call is not None):
                return "starting"
            return "failed"
        if (
            len(self.serving) < self.desired
            or self.build_error
            or self.start_error
            or self.config_error
            or self.log_error
            or self.crash_loop
            or any(inst.health_failures for inst in self.serving)
        ):
            return "degraded"
        return "healthy"

    @property
    def crash_loop(self) -> bool:
        now = self.ctx.reactor.seconds()
        return sum(1 for t in self.crash_times if now - t < CRASH_LOOP_WINDOW) >= CRASH_LOOP_COUNT

    @property
    def log_error(self) -> str | None:
        """Why its log file cannot be written, while it cannot (its lines are dropped)."""
        return None if self._log_file is None else self._log_file.error

    def _log_problem(self, message: str) -> None:
        log.warn("{worker}: {message}", worker=self.name, message=message)

    config_error = None  # a ConfigError: its worker.yaml cannot be applied, the last good one runs
    # An instance of it passed its first healthy probe (so went into rotation) since the pool
    # started; kept when it later fails (/health/ready: startup is over for this worker).
    ready = False

    def set_config_error(self, error) -> None:
        """The worker.yaml on disk cannot be applied (``error``), or it is fine again
        (None); the pool keeps running with the spec it has either way."""
        if str(error) == str(self.config_error):
            return
        if error is not None:
            log.warn(
                "{worker} keeps running with its last good configuration until {file} is valid",
                worker=self.name,
                file=error.relative_to(self.ctx.root).file or "its worker.yaml",
            )
        self.config_error = error
        self.ctx.changed(self, PoolEvent.CONFIG_ERROR)

    @property
    def config_error_text(self) -> str | None:
        """The error as file:line:column: key: message, the file relative to the project
        root (no absolute paths in /health)."""
        error = self.config_error
        return None if error is None else str(error.relative_to(self.ctx.root))

    def describe(self) -> dict:
        """The JSON-able state shown by /health and the status page."""
        return {
            "status": self.status,
            "route": self.spec.route,
            "type": self.spec.type,
            "instances": len(self.serving),
            "healthy_instances": sum(1 for i in self.serving if not i.health_failures),
            "error": self.error,
            "config_error": self.config_error_text,
            "log_error": self.log_error,
            "crash_loop": self.crash_loop,
            "restarts": dict(self.restarts),
            "last_build": None
            if self.last_build is None
            else {"ok": self.last_build.ok, "duration_seconds": round(self.last_build.duration, 3)},
            "ports": [i.port for i in self.serving],
            "last_swap_seconds": (
                None if self.last_swap_seconds is None else round(self.last_swap_seconds, 3)
            ),
            "revision": self.revision,
            "deploying": self.deploying,
            "ready": self.ready,
        }

    # -- lifecycle -------------------------------------------------------------------
    def startService(self) -> None:
        Service.startService(self)
        self.deploy("start")

    def stopService(self) -> defer.Deferred:
        Service.stopService(self)
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        if self._build_d is not None:
            self._build_d.cancel()
        self._set_serving(())
        kill_timeout = self.settings.kill_timeout_ms / 1000.0
        stops = [inst.stop(kill_timeout) for inst in list(self.instances)]
        d = defer.gatherResults(stops, consumeErrors=True)
        d.addBoth(self._close_log)
        return d

    def _close_log(self, result):
        if self._log_file is not None:
            self._log_file.close()
        return None

    @property
    def settings(self):
        return self.ctx.settings()

    # -- deploys ---------------------------------------------------------------------
    def deploy(self, reason: str, build: bool = True) -> defer.Deferred:
        """Build (when ``build``) and swap in fresh instances. One deploy runs at a time; later
        requests coalesce into one queued deploy, so a burst of changes costs one more swap.
        Fires with True when new instances took over."""
        if self.deploying:
            if build and self._builds_the_same():
                # A HUP storm, or a save that changed nothing: join the build in flight.
                # (Restarted by every such request, it might never finish.)
                joined: defer.Deferred = defer.Deferred()
                self._joined.append(joined)
                return joined
            if self._queue is None:
                self._queue = (reason, build)
            else:
                self._queue = (self._queue[0], self._queue[1] or build)
            if build and self._build_d is not None:
                self._build_d.cancel()  # the queued build supersedes the one in flight
            waiter: defer.Deferred = defer.Deferred()
            self._queue_waiters.append(waiter)
            return waiter
        return self._run_deploy(self._deploy(reason, build))

    def _builds_the_same(self) -> bool:
        """A build deploy is in flight (building or swapping) of the very files on disk now,
        and nothing is queued after it: a new build request would only build it again."""
        building = self._building_from
        if building is None or self._queue is not None:
            return False
        now = Fingerprint.take(self.spec, self.runtime)
        return (now.sources, now.views, now.config) == (
            building.sources,
            building.views,
            building.config,
        )

    def _run_deploy(self, work: Coroutine[Any, Any, bool]) -> defer.Deferred:
        """Run ``work`` (a build and swap, a scale-up, a replacement) as the one deploy in
        progress; fires with whether new instances took over."""
        self.deploying = True
        self._deploy_started = self.ctx.reactor.seconds()
        d = defer.ensureDeferred(work)
        d.addErrback(self._deploy_crashed)
        d.addBoth(self._deploy_done)
        return d

    def _deploy_crashed(self, failure) -> bool:
        log.failure("deploy of {worker} failed", failure, worker=self.name)
        return False

    def _deploy_done(self, result):
        self.deploying = False
        self._building_from = None
        joined, self._joined = self._joined, []
        for waiter in joined:
            waiter.callback(result)
        self.ctx.changed(self, PoolEvent.DEPLOYED)
        if self._queue is not None and self.running:
            (reason, build), self._queue = self._queue, None
            waiters, self._queue_waiters = self._queue_waiters, []
            d = self.deploy(reason, build)
            for waiter in waiters:
                d.addBoth(_pass_on, waiter)
        elif not self.serving:
            self._wake_waiters()
        return result

    async def _deploy(self, reason: str, build: bool) -> bool:
        # Taken before building: an edit made during the build counts as newer.
        before = Fingerprint.take(self.spec, self.runtime)
        revision = self.ctx.revision()
        if build:
            self._building_from = before
            if not await self._build(reason):
                return False
        old = list(self.serving)
        # A swap keeps the current scale (autoscaling may have added instances).
        swapped = await self._rollout(max(self.desired, len(old)), old, reason)
        if swapped:
            after = Fingerprint.take(self.spec, self.runtime)  # what the build left
            self.fingerprint = attrs.evolve(before, artifact=after.artifact, missing=after.missing)
            self.revision = revision
        return swapped

    def reconfigure(self, spec: WorkerSpec, runtime: Runtime) -> None:
        """A changed worker.yaml, applied whole: the next instances start from ``spec`` with
        ``runtime`` (a new ``type:`` brings a new one) and log where it says."""
        if spec.config.log_file != self.spec.config.log_file and self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.spec = spec
        self.runtime = runtime

    def forget_failed_deploy(self) -> None:
        """The code on disk is the serving code again (a release was rolled back): a build
        or start of other code that failed is no longer pending, so no longer reported."""
        if self.build_error is not None or self.start_error is not None:
            self.error = self.build_error = self.start_error = None
            self.ctx.changed(self, PoolEvent.ERROR)

    def changed_on_disk(self) -> str | None:
        """What changed since the serving code was deployed (see Fingerprint.difference)."""
        if self.fingerprint is None:
            return "sources"
        return self.fingerprint.difference(Fingerprint.take(self.spec, self.runtime))

    async def _build(self, reason: str) -> bool:
        try:
            steps, base_env = build.plan(self.runtime, self.spec, self.ctx.mode)
        except CannotBuild as e:
            log.error("{worker}: {error}", worker=self.name, error=str(e))
            self._fail(str(e), build_output=str(e))
            return False
        if not steps:
            self.build_error = None  # nothing to build (any more): an old error is stale
            return True
        log.info("building {worker} ({reason})", worker=self.name, reason=reason)
        self._build_d = build.run_build(self.ctx.reactor, steps, base_env)
        try:
            result: BuildResult = await self._build_d
        except defer.CancelledError:
            log.info(
                "build of {worker} cancelled ({why})",
                worker=self.name,
                why="superseded by a newer change" if self.running else "stopping",
            )
            return False
        finally:
            self._build_d = None
        self.last_build = result
        self.ctx.changed(self, PoolEvent.BUILD)
        if not result.ok:
            keep = " (the previous version keeps serving)" if self.serving else ""
            log.error(
                "build of {worker} failed{keep}:\n{output}",
                worker=self.name,
                keep=keep,
                output=result.output.rstrip(),
            )
            self._fail(f"build failed: {result.command}", build_output=result.output)
            return False
        self.build_error = None
        log.info("built {worker} in {seconds:.2f}s", worker=self.name, seconds=result.duration)
        return True

    def _fail(self, message: str, build_output: str | None = None) -> None:
        self.error = message
        if build_output is not None:
            self.build_error = build_output
        self.ctx.changed(self, PoolEvent.ERROR)

    async def _rollout(self, count: int, replacing: list[Instance], reason: str) -> bool:
        """Start ``count`` new instances, and once all answer their first health probe put
        them in rotation in place of ``replacing``, which are then drained and stopped."""
        new: list[Instance] = []
        try:
            for _ in range(count):
                new.append(self._spawn())
        except (PortsExhausted, CannotBuild, OSError) as e:
            keep = " (the running instances keep serving)" if self.serving else ""
            log.error(
                "{worker}: cannot start an instance for {reason}: {error}{keep}",
                worker=self.name,
                reason=reason,
                error=str(e),
                keep=keep,
            )
            self._fail(f"cannot start an instance: {e}")
            await self._stop_all(new)
            self._schedule_retry()
            return False
        results = await defer.gatherResults(
            [defer.ensureDeferred(self._wait_ready(i)) for i in new]
        )
        problems = [problem for problem in results if problem]
        if problems or not self.running:
            if problems:
                self._fail(problems[0])
                self._exited_at_start([i for i in new if i.state == "exited" and not i.stopping])
                log.error(
                    "{worker}: new instance not started ({problem}); {keep}",
                    worker=self.name,
                    problem=problems[0],
                    keep="the old one keeps serving" if self.serving else "nothing serves it",
                )
            await self._stop_all(new)
            self._schedule_retry()
            return False
        for inst in new:
            inst.state = InstanceState.READY
            inst.ready_at = self.ctx.reactor.seconds()
        kept = [inst for inst in self.serving if inst not in replacing]
        self.error = self.start_error = None
        self._set_serving(tuple(kept + new))
        self.last_swap_seconds = self.ctx.reactor.seconds() - self._deploy_started
        self.ctx.changed(self, PoolEvent.SWAP)
        log.info(
            "{worker} now served by {ids} on port {ports} ({reason})",
            worker=self.name,
            ids=", ".join(i.id for i in new),
            ports=", ".join(str(i.port) for i in new),
            reason=reason,
        )
        for inst in replacing:
            self._retire(inst)
        return True

    def _exited_at_start(self, exited: list[Instance]) -> None:
        """New instances that exited before their first healthy probe: each counts as a
        crash (a worker that keeps doing it is crash-looping), and what the last one wrote
        (a traceback, a missing module) is shown on the worker's routes in dev mode."""
        if not exited:
            return
        now = self.ctx.reactor.seconds()
        self.crash_times = [t for t in self.crash_times if now - t < CRASH_LOOP_WINDOW]
        self.crash_times += [now] * len(exited)
        self.restarts["start"] = self.restarts.get("start", 0) + len(exited)
        inst = exited[-1]
        output = inst.last_output()
        self.start_error = f"{self.error}\n\n{output}" if output else self.error
        self.ctx.changed(self, PoolEvent.START_FAILED)

    def _schedule_retry(self) -> None:
        """Nothing serving and the start failed: try again later (not spinning)."""
        if self.serving or not self.running or self.build_error is not None:
            return
        self._restart_later("start-failed")

    def _spawn(self) -> Instance:
        self._counter += 1
        port = self.ctx.ports.acquire()
        instance_id = f"{self.name}#{self._counter}"
        launch = None
        try:
            launch = self.runtime.launch(self.spec, port, instance_id, self.ctx.root, self.ctx.mode)
            inst = Instance(
                self.ctx.reactor,
                self.name,
                instance_id,
                port,
                launch.argv,
                self._env(port, self._counter),
                self._cwd(),
                self._write_output,
                on_exit=self._exited,
                probe=self.runtime.probe,
                files=launch.files,
                stop_signal=self.runtime.stop_signal,
                procs=self.ctx.procs,
                cgroup=None if self.ctx.cgroups is None else self.ctx.cgroups.create(instance_id),
            )
            inst.recycle_after = jitter(self.max_requests)
            inst.on_request_limit = self._request_limit
            if self.spec.config.scaling.max_workers > self.desired:
                inst.on_request = self._note_load
            inst.start()
        except BaseException:
            self.ctx.ports.release(port)
            for path in launch.files if launch is not None else ():
                _remove(path)
            raise
        self.instances.add(inst)
        self.ctx.started(inst)
        return inst

    async def _wait_ready(self, inst: Instance) -> str | None:
        """None once ``inst`` answers a health probe; else why it never did."""
        s = self.settings
        reactor = self.ctx.reactor
        deadline = reactor.seconds() + s.startup_timeout_ms / 1000.0
        await task.deferLater(reactor, s.startup_delay_ms / 1000.0, lambda: None)
        timeout = s.health_check_timeout_ms / 1000.0
        while True:
            if inst.state is InstanceState.EXITED:
                return f"instance {inst.id} {inst.describe_exit()} before becoming healthy"
            if not self.running:
                return "stopping"
            if await self.ctx.probe(inst, self.spec.config.health_path, timeout):
                return None
            if reactor.seconds() >= deadline:
                method = "GET" if inst.probe.protocol == "http" else inst.probe.protocol
                path = inst.probe.path or self.spec.config.health_path
                return (
                    f"instance {inst.id} not healthy within "
                    f"{s.startup_timeout_ms} ms ({method} {path} on port {inst.port})"
                )
            await task.deferLater(reactor, READY_POLL_SECONDS, lambda: None)

    def _retire(self, inst: Instance) -> defer.Deferred:
        """Out of rotation already: let in-flight requests finish, then stop it."""
        s = self.settings
        reactor = self.ctx.reactor
        inst.state = InstanceState.DRAINING

        async def drain() -> None:
            await task.deferLater(reactor, s.restart_delay_ms / 1000.0, lambda: None)
            idle = self.ctx.idle(inst)
            if not idle.called:
                grace = task.deferLater(
                    reactor, self.runtime.drain_seconds(self.spec, s), lambda: None
                )
                await defer.DeferredList([grace, idle], fireOnOneCallback=True, consumeErrors=True)
                grace.cancel()
            await inst.stop(s.kill_timeout_ms / 1000.0)

        d = defer.ensureDeferred(drain())
        d.addErrback(
            lambda f: (
                None
                if f.check(defer.CancelledError)
                else log.failure("draining {id} failed", f, id=inst.id)
            )
        )
        return d

    async def _stop_all(self, instances: list[Instance]) -> None:
        kill_timeout = self.settings.kill_timeout_ms / 1000.0
        await defer.gatherResults([inst.stop(kill_timeout) for inst in instances])

    def replace(self, inst: Instance, reason: str) -> None:
        """Swap out one serving instance (failed health checks, recycling)."""
        if inst not in self.serving or self.deploying:
            return
        self.restarts[reason] = self.restarts.get(reason, 0) + 1
        self.ctx.changed(self, PoolEvent.RESTART)
        self._run_deploy(self._rollout(1, [inst], reason))

    # -- exits and crashes -----------------------------------------------------------
    def _exited(self, inst: Instance, reason) -> None:
        self.ctx.ports.release(inst.port)
        self.ctx.exited(inst)
        self.instances.discard(inst)
        if inst.stopping or inst not in self.serving:
            return
        # It left the rotation without being asked: a crash.
        self._set_serving(tuple(i for i in self.serving if i is not inst))
        now = self.ctx.reactor.seconds()
        self.crash_times = [t for t in self.crash_times if now - t < CRASH_LOOP_WINDOW] + [now]
        self.restarts["crash"] = self.restarts.get("crash", 0) + 1
        self.error = f"instance {inst.id} {inst.describe_exit()}"
        log.warn("{worker}: {error}", worker=self.name, error=self.error)
        self._backoff.died(None if inst.ready_at is None else now - inst.ready_at)
        self.ctx.changed(self, PoolEvent.CRASH)
        self._restart_later("crash")

    def _restart_later(self, why: str) -> None:
        if self._restart_call is not None or not self.running:
            return
        s = self.settings
        delay = self._backoff.next(
            s.restart_backoff_min_ms / 1000.0, s.restart_backoff_max_ms / 1000.0
        )
        if self.crash_loop:
            log.error(
                "{worker} is crash-looping; next restart in {delay:.1f}s",
                worker=self.name,
                delay=delay,
            )

        def restart() -> None:
            self._restart_call = None
            missing = self.desired - len(self.serving)
            if missing <= 0 or not self.running:
                return
            if self.deploying:
                self.deploy(why, build=False)
                return
            self._run_deploy(self._rollout(missing, [], why))

        self._restart_call = self.ctx.reactor.callLater(delay, restart)

    # -- plumbing --------------------------------------------------------------------
    def _set_serving(self, serving: tuple[Instance, ...]) -> None:
        self.serving = serving
        if serving:
            self.ready = True
            self._wake_waiters()
        self.ctx.changed(self, PoolEvent.SERVING)

    def _cwd(self) -> str:
        if self.spec.config.working_directory == "project":
            return self.ctx.root
        return self.spec.directory

    def _env(self, port: int, number: int) -> dict[str, str]:
        spec = self.spec
        env = dict(self.ctx.base_env)
        env.update(
            {
                "WORKER_PORT": str(port),
                "PORT": str(port),
                "WORKER_HOST": "127.0.0.1",
                "WORKER_NAME": spec.name,
                "WORKER_ROUTE": spec.route,
                "WORKER_PATH": spec.route,
                "WORKER_TYPE": spec.type,
                "WORKER_MODE": "production" if self.ctx.mode == "prod" else "development",
                "WORKER_DIR": spec.directory,
                "TQSERVER_ROOT": self.ctx.root,
                "WORKER_INSTANCE": f"{spec.name}#{number}",
                "WORKER_HEALTH_PATH": spec.config.health_path,
            }
        )
        env.update(self.runtime.env(spec, port))
        env.update(self.runtime.config_env(spec, port))
        return env

    def _write_output(self, data: bytes) -> None:
        self.log_tail.feed(data)
        if self._log_file is None:
            path = resolve_template(self.spec.config.log_file, self.ctx.root, self.name)
            if path is not None:
                self._log_file = FailSafeLog(
                    path,
                    f"worker:{self.name}",
                    self._log_problem,
                    shown=os.path.relpath(path, self.ctx.root),
                )
        if self._log_file is not None:
            self._log_file.write(data)
        if self._log_file is None or self.ctx.mode == "dev":
            for line in data.decode("utf-8", "replace").splitlines():
                log.info("{worker}: {line}", worker=self.name, line=line.split(" ", 1)[-1])


def _pass_on(result, waiter: defer.Deferred):
    """A queued deploy's result to one who asked for it too."""
    waiter.callback(result)
    return result


def jitter(limit: int, fraction: float = 0.1) -> int:
    """``limit`` plus up to 10%, so instances started together are not recycled together."""
    if limit <= 0:
        return 0
    return limit + random.randint(0, int(limit * fraction))


def tree_rss(pid: int | None) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total
