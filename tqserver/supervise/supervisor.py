"""The Supervisor owns the desired state: configuration, which workers exist, their pools,
the routing snapshot the proxy reads, and the health checker."""

from __future__ import annotations

import os

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from tqserver.config.discovery import WorkerSpec, discover
from tqserver.config.errors import ConfigError
from tqserver.config.server import ServerConfig, load_server_config
from tqserver.control.events import EventHub
from tqserver.control.metrics import Metrics
from tqserver.proxy.router import RoutingTable
from tqserver.runtimes import ToolchainMissing, runtime_for
from tqserver.supervise.health import HealthChecker
from tqserver.supervise.pool import PoolContext, WorkerPool
from tqserver.supervise.ports import PortPool
from tqserver.supervise.probe import Prober
from tqserver.supervise.records import InstanceRecords

log = Logger()


class Supervisor(MultiService):
    """Parent of every WorkerPool and of the HealthChecker. Changes (start, reload, a worker
    added or removed) come here; the proxy only reads ``routes`` and ``pools``."""

    def __init__(
        self,
        reactor,
        root: str,
        config_path: str,
        mode: str,
        config: ServerConfig,
        public_url: str = "",
    ) -> None:
        MultiService.__init__(self)
        self.reactor = reactor
        self.root = root
        self.config_path = config_path
        self.mode = mode
        self.config = config
        self.public_url = public_url
        self.pools: dict[str, WorkerPool] = {}
        self.routes = RoutingTable()
        self.config_errors: list[Exception] = []
        self.metrics = Metrics()
        w = config.workers
        self.ports = PortPool(w.port_range_start, w.port_range_end)
        self.records = InstanceRecords(os.path.join(root, "run"), root)
        self.prober = Prober(reactor)
        self.checker = HealthChecker(
            reactor, lambda: list(self.pools.values()), self.prober, lambda: self.config.workers
        )
        self.checker.on_result = lambda pool, ok: self.metrics.health_checks.labels(
            pool.name, "ok" if ok else "fail"
        ).inc()
        self.checker.setServiceParent(self)
        base_env = dict(os.environ)
        if public_url:
            base_env["TQSERVER_URL"] = public_url
        self.ctx = PoolContext(
            reactor=reactor,
            root=root,
            mode=mode,
            ports=self.ports,
            settings=lambda: self.config.workers,
            probe=self.prober,
            base_env=base_env,
            changed=self._pool_changed,
            started=self.records.record,
            exited=self.records.forget,
            idle=self._instance_idle,
        )
        self.front = None  # the proxy's Front, set by tap.py
        self.watcher = None  # dev mode's watch.DevWatcher, set by tap.py
        self.fleet = None  # proxy_fleet.ProxyFleet when server.proxy_processes > 1
        self.events = EventHub(reactor)
        self.config_listeners: list = []  # called with the new ServerConfig on reload

    @property
    def workers_dir(self) -> str:
        d = self.config.workers.directory
        return d if os.path.isabs(d) else os.path.join(self.root, d)

    # -- lifecycle -------------------------------------------------------------------
    def startService(self) -> None:
        self.records.reap()
        MultiService.startService(self)
        # Once the reactor runs: twistd installs its SIGTERM/SIGINT handlers then, so a
        # signal during a long first spawn (hundreds of instances) still stops them all.
        self.reactor.callWhenRunning(self._start_workers)

    def _start_workers(self) -> None:
        if self.running:
            self.sync_workers()

    def stopService(self) -> defer.Deferred:
        d = defer.maybeDeferred(MultiService.stopService, self)

        def cleanup(result):
            self.events.close()
            if self.front is not None:
                self.front.upstreams.close_all()
                self.front.fastcgi.close_all()
            return self.prober.close()

        return d.addBoth(cleanup)

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
        actions: dict[str, str] = {}
        for name in list(self.pools):
            if name not in wanted:
                self._remove(name)
                actions[name] = "removed"
        for name, spec in wanted.items():
            pool = self.pools.get(name)
            if pool is None:
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
        return actions

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

    def _remove(self, name: str) -> defer.Deferred:
        pool = self.pools.pop(name)
        log.info("worker {name} removed: draining and stopping it", name=name)
        return defer.maybeDeferred(pool.disownServiceParent)

    def publish_routes(self) -> None:
        """Swap in a new routing snapshot in one assignment."""
        self.routes = RoutingTable((pool.spec.route, pool) for pool in self.pools.values())
        if self.fleet is not None:
            self.fleet.publish()

    def _instance_idle(self, inst) -> defer.Deferred:
        """Fires once no request is in flight on ``inst``, in any proxy process."""
        return inst.idle() if self.fleet is None else self.fleet.idle(inst)

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
        self.config = config
        self.checker.reconfigure()
        for listener in self.config_listeners:
            listener(config)
        return config

    def reload(self, why: str, everything: bool = False) -> dict[str, str]:
        """SIGHUP (and the admin API): re-read all configuration, start new workers, stop
        removed ones, and redo only what changed on disk for the rest — a rebuild for
        changed sources, a restart for a deployed binary, views or config. With
        ``everything``, every worker is rebuilt and swapped."""
        log.info("reloading ({why})", why=why)
        self.reload_config()
        actions = self.sync_workers()
        for name, pool in self.pools.items():
            if name in actions:
                continue
            what = "requested" if everything else pool.changed_on_disk()
            if what is None:
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
                self.events.publish("public", change.worker)

    def _pool_changed(self, pool: WorkerPool, what: str) -> None:
        if self.fleet is not None:
            self.fleet.publish()
        if what == "swap":
            self.events.publish("swap", pool.name)
            self.metrics.swap_duration.labels(pool.name).observe(pool.last_swap_seconds)
        elif (what == "error" and pool.build_error) or what == "start-failed":
            self.events.publish("build-failed", pool.name)  # the page shows the output
        if what == "build" and pool.last_build is not None:
            result = (
                "cancelled"
                if pool.last_build.cancelled
                else ("success" if pool.last_build.ok else "failure")
            )
            self.metrics.builds.labels(pool.name, result).inc()
            self.metrics.build_duration.labels(pool.name).observe(pool.last_build.duration)
        elif what in ("crash", "restart"):
            self.metrics.restarts.labels(pool.name, what if what == "crash" else "health").inc()
