"""The Supervisor owns the desired state: configuration, which workers exist, their pools,
the routing snapshot the proxy reads, and the health checker."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Callable

from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.logger import Logger

from tqserver.config.discovery import WorkerSpec, discover, route_taken
from tqserver.config.errors import ConfigError
from tqserver.config.server import ServerConfig, load_server_config
from tqserver.proxy.router import RoutingTable
from tqserver.proxy.state import ProxyState
from tqserver.runtimes import ToolchainMissing, runtime_for
from tqserver.supervise.cgroups import CgroupParent
from tqserver.supervise.events import PoolEvent, PoolListener
from tqserver.supervise.health import HealthChecker
from tqserver.supervise.instance import Instance
from tqserver.supervise.pool import PoolContext, WorkerPool
from tqserver.supervise.ports import PortPool
from tqserver.supervise.probe import Prober
from tqserver.supervise.proctree import ProcTable
from tqserver.supervise.records import InstanceRecords
from tqserver.supervise.revision import read_revision

log = Logger()

# How often every instance's process tree is noted (ProcTable.descendants: one read of
# /proc for all), so that a process that leaves its group is still known when it is stopped.
TRACK_SECONDS = 2.0


class Supervisor(MultiService):
    """Parent of every WorkerPool, of the Prober and of the HealthChecker. Changes (start,
    reload, a worker added or removed) come here. The proxy reads only ``state`` (the
    routes and the configuration), which this replaces whole on each change.

    It knows nothing of what watches it: what happens to its pools goes to ``listeners``
    (``listener(pool, PoolEvent)``: metrics, the live-reload hub, the proxy processes), a
    reloaded server.yaml to ``config_listeners`` (``listener(ServerConfig)``), and ``idle``
    (``idle(instance) -> Deferred``) says when an instance leaving the rotation has no
    request left in flight (with proxy processes: in any of them)."""

    name = "supervisor"  # type: ignore[assignment]  # Twisted types Service.name as None

    def __init__(
        self,
        reactor,
        root: str,
        config_path: str,
        state: ProxyState,
        public_url: str = "",
        listeners: Iterable[PoolListener] = (),
        config_listeners: Iterable[Callable[[ServerConfig], None]] = (),
        idle: Callable[[Instance], defer.Deferred] | None = None,
        procs: ProcTable | None = None,
    ) -> None:
        MultiService.__init__(self)
        self.reactor = reactor
        self.root = root
        self.config_path = config_path
        self.state = state
        self.mode = state.mode
        self.public_url = public_url
        self.listeners = tuple(listeners)
        self.config_listeners = tuple(config_listeners)
        self.pools: dict[str, WorkerPool] = {}
        self.config_errors: list[Exception] = []
        self.draining = False  # shutdown began (server.shutdown_delay_seconds, then the stop)
        w = state.config.workers
        self.ports = PortPool(w.port_range_start, w.port_range_end)
        # /proc, where instances' processes are tracked (None: only their process groups,
        # as with fake processes in tests); then a cgroup each too, where allowed.
        self.procs = procs
        self.records = InstanceRecords(os.path.join(root, "run"), root, procs, reactor)
        self._tracker = task.LoopingCall(self.track)
        self._tracker.clock = reactor
        self.prober = Prober(reactor)
        self.prober.setServiceParent(self)
        self.checker = HealthChecker(
            reactor,
            lambda: list(self.pools.values()),
            self.prober,
            lambda: self.config.workers,
            on_result=self._probed,
        )
        self.checker.setServiceParent(self)
        self.revision = read_revision(root)
        base_env = dict(os.environ)
        if public_url:
            base_env["TQSERVER_URL"] = public_url
        self.ctx = PoolContext(
            reactor=reactor,
            root=root,
            mode=self.mode,
            ports=self.ports,
            settings=lambda: self.config.workers,
            probe=self.prober,
            base_env=base_env,
            changed=self._pool_changed,
            started=self.records.record,
            exited=self.records.forget,
            idle=idle or Instance.idle,
            revision=lambda: self.revision,
            procs=self.procs,
        )

    @property
    def config(self) -> ServerConfig:
        return self.state.config

    @property
    def routes(self) -> RoutingTable:
        return self.state.routes

    @property
    def workers_dir(self) -> str:
        d = self.config.workers.directory
        return d if os.path.isabs(d) else os.path.join(self.root, d)

    # -- lifecycle -------------------------------------------------------------------
    def startService(self) -> None:
        self.records.reap()
        if self.procs is not None:
            if self.config.workers.cgroups:
                self.ctx.cgroups = CgroupParent.find()
            self._tracker.start(TRACK_SECONDS, now=False)
        MultiService.startService(self)
        # Once the reactor runs: twistd installs its SIGTERM/SIGINT handlers then, so a
        # signal during a long first spawn (hundreds of instances) still stops them all.
        self.reactor.callWhenRunning(self._start_workers)

    def stopService(self) -> defer.Deferred:
        if self._tracker.running:
            self._tracker.stop()
        d = defer.maybeDeferred(MultiService.stopService, self)
        d.addBoth(self._stopped)
        return d

    def _stopped(self, result):
        if self.ctx.cgroups is not None:
            self.ctx.cgroups.remove()
        return result

    def track(self) -> None:
        """Note the processes below every instance (and rewrite the records of those whose
        family changed, for the next start after a crash)."""
        if self.procs is None:
            return
        table = list(self.procs.all())
        for pool in self.pools.values():
            for inst in list(pool.instances):
                if inst.track(table):
                    try:
                        self.records.record(inst)
                    except OSError as e:
                        log.warn("cannot record {id}: {error}", id=inst.id, error=e)

    def _start_workers(self) -> None:
        if self.running:
            self.sync_workers()

    # -- workers ---------------------------------------------------------------------
    def sync_workers(self) -> dict[str, str]:
        """Make the pools match what is on disk: new workers start, removed ones stop,
        changed specs are redeployed. Returns {name: what happened}."""
        found = discover(self.workers_dir, self.mode, self.config.file_watcher.ignore)
        self.config_errors = list(found.errors)
        for warning in found.warnings:
            log.warn("{warning}", warning=str(warning))
        for error in found.errors:
            log.error("{error}", error=str(error))
        wanted = {spec.name: spec for spec in found.workers}
        held = self._held(found, wanted)
        actions: dict[str, str] = {}
        removed = []
        for name in list(self.pools):
            if name in held:
                # A worker.yaml that cannot be applied (invalid, emptied mid-save, its
                # route taken): the worker keeps running as it is, and says why.
                wanted.pop(name, None)
                actions[name] = "kept"
                self.pools[name].set_config_error(held[name])
            elif name not in wanted:
                removed.append(self._remove(name))
                actions[name] = "removed"
            else:
                self.pools[name].set_config_error(None)
        for name, spec in wanted.items():
            pool = self.pools.get(name)
            if pool is None:
                if name in held:  # a new worker with an empty worker.yaml: every default
                    log.warn("{error}", error=str(held[name]))
                if self._add(spec):
                    actions[name] = "added"
            elif pool.spec != spec:
                if spec.type != pool.spec.type:
                    try:
                        runtime = runtime_for(spec.type)
                    except ToolchainMissing as e:
                        self.config_errors.append(e)
                        log.error("worker {name}: {error}", name=name, error=str(e))
                        continue
                else:
                    runtime = pool.runtime
                pool.reconfigure(spec, runtime)
                pool.deploy("configuration changed")
                actions[name] = "reconfigured"
        self.publish_routes()
        for pool in removed:
            self._pool_changed(pool, PoolEvent.REMOVED)
        for name, what in actions.items():
            if what not in ("removed", "kept"):
                self._pool_changed(self.pools[name], PoolEvent(what))
        return actions

    def _held(self, found, wanted: dict[str, WorkerSpec]) -> dict[str, ConfigError]:
        """The running workers whose worker.yaml cannot be applied now, with why. Besides
        what discovery holds back: a worker that wants the route a held one keeps serving."""
        held = dict(found.held)
        kept_routes = {self.pools[name].spec.route: name for name in held if name in self.pools}
        for name, spec in list(wanted.items()):
            owner = kept_routes.get(spec.route)
            if owner is not None and owner != name and name not in held:
                error = route_taken(spec, owner)
                log.error("{error}", error=str(error))
                self.config_errors.append(error)
                held[name] = error
                if name not in self.pools:
                    del wanted[name]  # a new one: not started on a route in use
        return held

    def _add(self, spec: WorkerSpec) -> bool:
        try:
            runtime = runtime_for(spec.type)
        except ToolchainMissing as e:
            self.config_errors.append(e)
            log.error("worker {name}: {error}", name=spec.name, error=str(e))
            return False
        pool = WorkerPool(spec, runtime, self.ctx)
        self.pools[spec.name] = pool
        pool.setServiceParent(self)
        return True

    def _remove(self, name: str) -> WorkerPool:
        pool = self.pools.pop(name)
        log.info("worker {name} removed: draining and stopping it", name=name)
        pool.disownServiceParent()
        return pool

    def publish_routes(self) -> None:
        """Swap in a new routing snapshot in one assignment."""
        self.state.routes = RoutingTable((pool.spec.route, pool) for pool in self.pools.values())

    # -- reload ----------------------------------------------------------------------
    def reload_config(self) -> ServerConfig | None:
        """Re-read server.yaml; an invalid file is reported and the running config stays."""
        try:
            config, warnings = load_server_config(self.config_path)
        except ConfigError as e:
            if os.path.exists(self.config_path) or self.config.source:
                log.error("{error} (keeping the running configuration)", error=str(e))
                return None
            return self.config
        for warning in warnings:
            log.warn("{warning}", warning=str(warning))
        old = self.config
        if (old.server.port, old.server.host) != (config.server.port, config.server.host):
            log.warn(
                "server.port/host changed in {path}: restart TQServer to listen there",
                path=self.config_path,
            )
        if old.server.proxy_processes != config.server.proxy_processes:
            log.warn(
                "server.proxy_processes changed in {path}: it applies at the next start",
                path=self.config_path,
            )
        w = config.workers
        if (w.port_range_start, w.port_range_end) != (
            old.workers.port_range_start,
            old.workers.port_range_end,
        ):
            self.ports.reconfigure(w.port_range_start, w.port_range_end)
        self.state.config = config
        self.checker.reconfigure()
        for listener in self.config_listeners:
            try:
                listener(config)
            except Exception:
                log.failure(
                    "applying the reloaded configuration failed ({listener!r})", listener=listener
                )
        return config

    def reload(self, why: str, everything: bool = False) -> dict[str, str]:
        """SIGHUP (and the admin API): re-read all configuration, start new workers, stop
        removed ones, and redo only what changed on disk for the rest — a rebuild for
        changed sources, a restart for a deployed binary, views or config. With
        ``everything``, every worker is rebuilt and swapped."""
        log.info("reloading ({why})", why=why)
        self.revision = read_revision(self.root)
        self.reload_config()
        actions = self.sync_workers()
        for name, pool in self.pools.items():
            if name in actions:
                continue
            what = "requested" if everything else pool.changed_on_disk()
            if what is None:
                if pool.serving and not pool.deploying:
                    pool.revision = self.revision  # the new release has the same code
                    pool.forget_failed_deploy()
                continue
            build = what in ("sources", "requested")
            pool.deploy(f"{why}: {what} changed" if what != "requested" else why, build=build)
            actions[name] = "rebuilt" if build else "restarted"
        if actions:
            log.info(
                "reload: {summary}",
                summary=", ".join(f"{name} {what}" for name, what in sorted(actions.items())),
            )
        else:
            log.info("reload: nothing changed")
        return actions

    def apply_changes(self, changes) -> None:
        """Dev mode: act on a debounced batch of classified file changes (watch.Change)."""
        kinds = {c.kind for c in changes}
        log.debug(
            "file changes: {changes}",
            changes=sorted(f"{c.kind}:{c.worker}" if c.worker else c.kind for c in changes),
        )
        if "server_config" in kinds:
            log.info("{path} changed: applying it", path=self.config_path)
            self.reload_config()
        actions: dict[str, str] = {}
        if kinds & {"discover", "config", "server_config"}:
            actions = self.sync_workers()
        for change in sorted(changes, key=lambda c: (c.kind, c.worker or "")):
            pool = self.pools.get(change.worker or "")
            if pool is None or change.worker in actions:
                continue
            if change.kind == "source":
                pool.deploy("source changed")
                actions[change.worker] = "rebuilt"
            elif change.kind == "views":
                pool.deploy("views changed", build=False)
                actions[change.worker] = "restarted"
            elif change.kind == "public":
                self._pool_changed(pool, PoolEvent.PUBLIC_CHANGED)

    def _pool_changed(self, pool: WorkerPool, event: PoolEvent) -> None:
        for listener in self.listeners:
            try:
                listener(pool, event)
            except Exception:
                log.failure(
                    "a listener failed on {event} of {worker} ({listener!r})",
                    event=event.value,
                    worker=pool.name,
                    listener=listener,
                )

    def _probed(self, pool: WorkerPool, ok: bool) -> None:
        self._pool_changed(pool, PoolEvent.PROBE_OK if ok else PoolEvent.PROBE_FAILED)
