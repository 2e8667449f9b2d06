"""``twistd tqserver``: command-line options, and makeService, the one place where the
service tree is assembled (docs/architecture.md, "Service tree", draws it)."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys

import attrs
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from tqserver.config.errors import ConfigError
from tqserver.config.server import (
    ServerConfig,
    default_server_config,
    load_server_config,
    read_admin_token,
    unguarded_admin_listener,
)
from tqserver.control.admin import AdminFront, AdminToken, endpoint_description, socket_path
from tqserver.control.events import EventHub
from tqserver.control.live import LiveStatus
from tqserver.control.live_api import LiveAPI
from tqserver.control.metrics import Metrics
from tqserver.control.reserved import Reserved
from tqserver.control.stream import StatusStream
from tqserver.control.windows import RequestWindows
from tqserver.fastcgi.client import FastCGIPool
from tqserver.fastcgi.forward import forwarding as fastcgi_forwarding
from tqserver.fleet.parent import ProxyFleet, RelayListener, RelaySite, proxy_process_count
from tqserver.heap import freeze_startup_heap
from tqserver.limits import raise_open_files_limit
from tqserver.logs.files import LOG_FILES, resolve_template
from tqserver.logs.observer import ServerLogObserver
from tqserver.logs.reopen import ReopenLogs
from tqserver.proxy.access_log import AccessLog
from tqserver.proxy.front import Front
from tqserver.proxy.site import ProxySite
from tqserver.proxy.state import ProxyState
from tqserver.signals import take_over
from tqserver.supervise.proctree import ProcTable
from tqserver.supervise.supervisor import Supervisor
from tqserver.supervise.watch import DevWatcher, HangupReload
from tqserver.twisted_compat import forget_exit_signal

log = Logger()

MODES = {"dev": "dev", "development": "dev", "prod": "prod", "production": "prod"}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the workers found under workers/ behind one reverse proxy, with health "
        "checks and zero-downtime reloads (dev: on file save; prod: on SIGHUP)."
    )
    optParameters = [
        [
            "config",
            "c",
            "etc/server.yaml",
            "Server configuration file, relative to --root or absolute.",
        ],
        ["root", "r", ".", "Project root: holds etc/, workers/, logs/ and run/."],
        [
            "mode",
            "m",
            None,
            "dev or prod (also development/production). Default: $TQSERVER_MODE, else dev.",
        ],
        [
            "admin-listen",
            None,
            None,
            "The control plane's endpoint (e.g. tcp:8081:interface=127.0.0.1); overrides "
            "admin.listen.",
        ],
    ]
    optFlags = [
        ["quiet", "q", "No console log; log to the configured files only."],
        [
            "reload",
            None,
            "Dev only: restart the supervisor when TQServer's own Python "
            "source changes (uses hupper).",
        ],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this Twisted endpoint (e.g. tcp:8080:interface=127.0.0.1); repeatable;
        overrides server.port/server.host."""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        self["root"] = os.path.abspath(self["root"])
        if not os.path.isdir(self["root"]):
            raise usage.UsageError(f"--root {self['root']}: no such directory")
        mode = self["mode"] or os.environ.get("TQSERVER_MODE") or "dev"
        if mode.lower() not in MODES:
            raise usage.UsageError(f"--mode {mode!r}: expected dev or prod")
        self["mode"] = MODES[mode.lower()]
        path = self["config"]
        self["config"] = path if os.path.isabs(path) else os.path.join(self["root"], path)
        self["server_config"], self["warnings"] = self._load_config(path != "etc/server.yaml")
        if not self["listen"]:
            s = self["server_config"].server
            self["listen"] = [f"tcp:{s.port}:interface={s.host}"]
        for description in self["listen"]:
            problem = _listen_problem(description)
            if problem:
                raise fatal(problem)
        try:
            read_admin_token(self["server_config"].admin, self["root"])
        except OSError as e:
            raise fatal(f"admin.token_file: cannot read it: {e}") from None
        if self["admin-listen"] is not None:
            self["server_config"] = _with_admin_listen(
                self["server_config"], self["admin-listen"].strip()
            )
        admin_listen = self["server_config"].admin.listen
        problem = _listen_problem(admin_listen, self["root"])
        if problem:
            where = "--admin-listen" if self["admin-listen"] is not None else "admin.listen"
            raise fatal(f"{where}: {problem}")
        self["proxy_processes"] = proxy_process_count(self["server_config"].server.proxy_processes)
        if self["proxy_processes"] > 1:
            for description in self["listen"]:
                if tcp_address(description) is None:
                    raise fatal(
                        f"--listen {description}: server.proxy_processes > 1 shares "
                        "TCP listening sockets only (tcp: or tcp6: endpoints)"
                    )
        self["twistd_logfile"] = self._prepare_twistd_files()
        if self["reload"]:
            if self["mode"] != "dev":
                raise fatal("--reload is for dev mode only")
            start_self_reloader()

    def _prepare_twistd_files(self) -> str | None:
        """twistd's --pidfile and --logfile: their directories made (a fresh clone has no
        run/ nor logs/; twistd failed writing the pidfile). The --logfile of a daemon
        becomes the server log, so that twistd's "look at log file" on a failed start
        points at the file holding the traceback; None when there is none."""
        parent = self.parent
        if parent is None:
            return None
        logfile = parent.get("logfile")
        for path in (parent.get("pidfile"), logfile):
            if path and path != "-":
                try:
                    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                except OSError as e:
                    raise fatal(f"cannot create the directory of {path}: {e.strerror}") from None
        if logfile and logfile != "-" and not parent.get("nodaemon"):
            return os.path.abspath(logfile)
        return None

    def _load_config(self, explicit: bool):
        path = self["config"]
        if not explicit and not os.path.exists(path):
            return default_server_config(), []
        try:
            return load_server_config(path)
        except ConfigError as e:
            raise fatal(str(e)) from None


def _with_admin_listen(config: ServerConfig, listen: str) -> ServerConfig:
    """``config`` with the control plane on ``listen`` (--admin-listen), refused where
    admin.listen would be: off loopback without a token."""
    admin = attrs.evolve(config.admin, listen=listen)
    problem = unguarded_admin_listener(admin)
    if problem:
        raise fatal(f"--admin-listen: {problem}")
    return attrs.evolve(config, admin=admin)


def start_self_reloader() -> None:
    """--reload: hupper keeps a small monitor process that re-runs this very twistd command
    in a fresh child whenever a loaded Python module (TQServer's own code included)
    changes. In the child, hupper is active and startup continues normally."""
    import hupper

    if hupper.is_active():
        return
    twistd_args = sys.argv[1 : sys.argv.index("tqserver")] if "tqserver" in sys.argv else []
    if not any(
        arg == "--nodaemon" or (arg[:1] == "-" and arg[1:2] != "-" and "n" in arg)
        for arg in twistd_args
    ):
        raise fatal("--reload needs the foreground: twistd -n tqserver --reload")
    hupper.start_reloader("tqserver.tap.run_twistd", shutdown_interval=10)


def run_twistd() -> None:
    """The command hupper re-runs (with the original sys.argv)."""
    from twisted.scripts.twistd import run

    run()


def fatal(message: str) -> SystemExit:
    """A startup problem the user must fix: one line on stderr, exit status 1 (a
    UsageError would bury it under twistd's whole usage text)."""
    return SystemExit(f"tqserver: {message}")


def tcp_address(description: str) -> tuple[str, int | None] | None:
    """(interface, port) of a tcp:/tcp6: endpoint description, None for other kinds; the
    port is None when the description has no valid one."""
    parts = re.split(r"(?<!\\):", description)
    if parts[0] not in ("tcp", "tcp6"):
        return None
    args = [p for p in parts[1:] if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    host = kwargs.get("interface", "").replace("\\:", ":")
    try:
        return host, int(kwargs.get("port", args[0] if args else ""))
    except ValueError:
        return host, None


UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path, less its NUL) on Linux


def _listen_problem(description: str, root: str = "") -> str | None:
    """A clear sentence when an endpoint cannot be listened on now: a TCP port taken or a
    bad address; a Unix socket path (relative ones under ``root``) the kernel refuses."""
    path = socket_path(endpoint_description(description, root or os.getcwd()))
    if path is not None:
        size = len(os.fsencode(path))
        if size <= UNIX_PATH_MAX:
            return None
        return (
            f"the socket path {path} is {size} bytes, more than a Unix socket allows "
            f"({UNIX_PATH_MAX}): give a shorter one (unix:/run/tqserver/admin.sock) or a "
            "loopback port (tcp:8081:interface=127.0.0.1)"
        )
    address = tcp_address(description)
    if address is None:
        return None
    host, port = address
    if port is None:
        return f"--listen {description}: no TCP port in it"
    family = socket.AF_INET6 if ":" in host or description.startswith("tcp6") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        return f"cannot listen on {host or '*'}:{port}: {e.strerror}"
    finally:
        sock.close()
    return None


def listen_address(description: str) -> tuple[str, int, int]:
    """(host, port, address family) of a tcp:/tcp6: endpoint description."""
    address = tcp_address(description)
    assert address is not None, description  # a tcp: or tcp6: one (Options checks)
    host, port = address
    assert port is not None, description
    family = socket.AF_INET6 if ":" in host or description.startswith("tcp6") else socket.AF_INET
    return host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port, family


def _public_url(listen: list[str]) -> str:
    """Where workers can reach the supervisor itself (TQSERVER_URL)."""
    for description in listen:
        address = tcp_address(description)
        if address is not None and address[1]:
            loopback = "[::1]" if description.startswith("tcp6") else "127.0.0.1"
            return f"http://{loopback}:{address[1]}"
    return ""


class TQServer(MultiService):
    """The root service. It also supplies twistd's log observer (console unless --quiet,
    plus server.log_file), which twistd picks up from the application."""

    def __init__(self, observer: ServerLogObserver, reactor) -> None:
        MultiService.__init__(self)
        self.observer = observer
        self.reactor = reactor
        self.supervisor: Supervisor | None = None  # (set once made: the delay reads it)
        self.owns_signals = False  # under twistd (the global reactor): SIGTERM again, below
        self._delay = None  # the server.shutdown_delay_seconds call, while it waits
        self._stopping: defer.Deferred | None = None

    def setServiceParent(self, parent) -> None:
        MultiService.setServiceParent(self, parent)
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:
            set_component(ILogObserver, self.observer)

    def stopService(self):
        """Stop everything; with server.shutdown_delay_seconds, first be not ready (and
        serve on) that long. Every child stops at once, so the delay is the root's. A
        second SIGTERM or SIGINT cuts the delay short."""
        if self.owns_signals:
            take_over(self.reactor, (signal.SIGTERM, signal.SIGINT), self._signalled_again)
        supervisor = self.supervisor
        delay = supervisor.config.server.shutdown_delay_seconds if supervisor else 0.0
        if delay <= 0 or supervisor is None or supervisor.draining:
            return self._stop_now()
        supervisor.draining = True
        log.info(
            "shutting down: not ready (/health/ready 503) and serving on for {delay} s "
            "(server.shutdown_delay_seconds)",
            delay=delay,
        )
        self._stopping = defer.Deferred()
        self._delay = self.reactor.callLater(delay, self._end_delay)
        return self._stopping

    def _end_delay(self) -> None:
        self._delay = None
        stopping, self._stopping = self._stopping, None
        d = self._stop_now()
        if stopping is not None:
            d.chainDeferred(stopping)

    def _signalled_again(self, name: str) -> None:
        if self._delay is not None and self._delay.active():
            log.info("{signal} again: stopping now", signal=name)
            self._delay.cancel()
            self._end_delay()
        else:
            log.info("{signal} again: already stopping (the workers drain)", signal=name)

    def _stop_now(self) -> defer.Deferred:
        if self.supervisor is not None:
            self.supervisor.draining = True
        d = MultiService.stopService(self)
        d.addBoth(self._stopped)
        return d

    def _stopped(self, result):
        log.info("TQServer stopped")
        # twistd re-raises SIGTERM/SIGINT on itself after a clean shutdown, so the exit
        # status would say "killed". Every worker was drained and stopped: report success.
        forget_exit_signal(self.reactor)
        return result


def makeService(options: Options, reactor=None) -> TQServer:
    """The service tree for ``options``, on ``reactor`` (the global one by default)."""
    owns_signals = reactor is None  # twistd's: the process's own signals
    if reactor is None:
        from twisted.internet import reactor
    root = options["root"]
    mode = options["mode"]
    config: ServerConfig = options["server_config"]
    LOG_FILES.configure(config.server.log_file_mode, config.server.log_retention_days)
    twistd_logfile = options.get("twistd_logfile")

    def server_log(c: ServerConfig) -> str | None:
        return twistd_logfile or resolve_template(c.server.log_file, root)

    observer = ServerLogObserver(quiet=options["quiet"], file_template=server_log(config))
    top = TQServer(observer, reactor)
    top.owns_signals = owns_signals
    for warning in options["warnings"]:
        log.warn("{warning}", warning=str(warning))

    def log_file_follows(new: ServerConfig) -> None:
        LOG_FILES.configure(new.server.log_file_mode, new.server.log_retention_days)
        observer.set_file(server_log(new))

    state = ProxyState(mode, config)
    fleet = None
    if options["proxy_processes"] > 1:
        fleet = ProxyFleet(
            reactor,
            state,
            root,
            [listen_address(d) for d in options["listen"]],
            options["proxy_processes"],
            quiet=options["quiet"],
        )
    metrics = Metrics(elsewhere=fleet.request_stats if fleet else lambda: ())
    events = EventHub(reactor)
    windows = RequestWindows(reactor, metrics.request_stats)
    stream = StatusStream(reactor)
    supervisor = Supervisor(
        reactor,
        root,
        options["config"],
        state,
        public_url=_public_url(options["listen"]),
        listeners=[metrics.pool_changed, events.pool_changed, stream.pool_changed]
        + ([fleet.pool_changed] if fleet else []),
        config_listeners=[log_file_follows] + ([fleet.configure] if fleet else []),
        idle=fleet.idle if fleet else None,
        procs=ProcTable(),
    )
    supervisor.setServiceParent(top)
    top.supervisor = supervisor
    events.setServiceParent(top)
    windows.setServiceParent(top)
    stream.setServiceParent(top)
    HangupReload(
        reactor,
        supervisor.reload,
        delay=lambda: supervisor.config.file_watcher.debounce_ms / 1000.0,
    ).setServiceParent(top)
    ReopenLogs(reactor, also=[fleet.reopen_logs] if fleet else []).setServiceParent(top)
    watcher = None
    if mode == "dev":
        watcher = DevWatcher(reactor, supervisor, supervisor.apply_changes)
        watcher.setServiceParent(top)
    stream.live = LiveStatus(supervisor, windows, watcher)
    fastcgi = FastCGIPool(reactor)
    reserved = Reserved(
        supervisor,
        metrics,
        events,
        LiveAPI(stream.live, stream),
        watcher,
        token=AdminToken(supervisor, root),
    )
    front = Front(state, reactor, reserved=reserved, forwards={"php": fastcgi_forwarding(fastcgi)})
    fastcgi.setServiceParent(front)
    front.setServiceParent(top)
    if fleet is not None:
        RelayListener(reactor, RelaySite(front, fleet.relay_secret)).setServiceParent(fleet)
        fleet.setServiceParent(top)
    else:
        site = ProxySite(front, log_access=AccessLog(state, metrics, reactor, root=root))
        for description in options["listen"]:
            # strports.service: a port that cannot be bound stops the start, not just logs
            strports.service(description, site, reactor=reactor).setServiceParent(front)
    if config.admin.listen:
        AdminFront(reactor, reserved, config.admin.listen, root).setServiceParent(top)
    reactor.callWhenRunning(freeze_startup_heap)
    before, soft, hard = raise_open_files_limit()
    log.info(
        "open files limit (RLIMIT_NOFILE): {soft} (soft, was {before}), {hard} (hard)",
        soft=soft,
        before=before,
        hard=hard,
    )
    log.info(
        "TQServer starting in {mode} mode, root {root}, listening on {listen}",
        mode=mode,
        root=root,
        listen=", ".join(options["listen"]),
    )
    return top


__all__ = ["Options", "makeService"]
