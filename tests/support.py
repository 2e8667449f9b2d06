"""Running the real thing in tests: a temp project, `twistd tqserver` as a child process,
HTTP on loopback, and checks that nothing we started is left behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
from typing import Dict, List, Optional

import psutil
from twisted.internet import defer, protocol, reactor, task
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short_dir(testcase) -> str:
    """A directory short enough to hold Unix sockets (their path has at most 107 bytes;
    trial's temporary directories are deeper): a project root with the default
    run/tqserver-admin.sock, an HAProxy stats socket. Removed by the test's cleanup."""
    import tempfile
    path = tempfile.mkdtemp(prefix="tqs-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_port(testcase) -> int:
    """A loopback port taken by a listening socket until ``testcase`` ends."""
    sock = socket.socket()
    testcase.addCleanup(sock.close)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock.getsockname()[1]


def free_port_range(size: int = 40) -> int:
    """Start of ``size`` consecutive free ports (best effort), away from other tests."""
    import random
    for _ in range(50):
        start = random.randint(20000, 60000 - size)
        if all(_bindable(p) for p in range(start, start + size, 7)):
            return start
    return 30000


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def twistd_argv() -> List[str]:
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def find_go() -> Optional[str]:
    return shutil.which("go") or next(
        (p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go") if os.access(p, os.X_OK)), None)


class Project:
    """A throwaway project root: etc/server.yaml plus workers copied or written into it."""

    def __init__(self, root: str, **workers_settings) -> None:
        self.root = root
        os.makedirs(os.path.join(root, "etc"), exist_ok=True)
        os.makedirs(os.path.join(root, "workers"), exist_ok=True)
        self.port = free_port()
        start = free_port_range()
        settings = {"port_range_start": start, "port_range_end": start + 39,
                    "startup_delay_ms": 20, "health_check_interval_ms": 500,
                    "kill_timeout_ms": 3000, "restart_delay_ms": 20,
                    "shutdown_grace_period_ms": 500}
        settings.update(workers_settings)
        self.admin_port = free_port()   # the control plane (admin.listen) on loopback TCP
        lines = ["server:", f"  port: {self.port}", '  host: "127.0.0.1"',
                 '  log_file: "logs/tqserver_{date}.log"', "workers:"]
        lines += [f"  {k}: {v}" for k, v in settings.items()]
        lines += ["admin:", f'  listen: "tcp:{self.admin_port}:interface=127.0.0.1"']
        self.write("etc/server.yaml", "\n".join(lines) + "\n")

    def add_server_settings(self, lines: str) -> None:
        """``lines`` (indented YAML, newline-ended) added to etc/server.yaml's server:."""
        path = os.path.join(self.root, "etc", "server.yaml")
        with open(path) as f:
            text = f.read()
        self.write("etc/server.yaml", text.replace("server:\n", "server:\n" + lines, 1))

    def write(self, relpath: str, text: str) -> str:
        path = os.path.join(self.root, relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return path

    def copy_worker(self, name: str) -> None:
        shutil.copytree(os.path.join(REPO, "workers", name),
                        os.path.join(self.root, "workers", name),
                        ignore=shutil.ignore_patterns("bin", "node_modules", "__pycache__", ".venv"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        """The admin listener (status page, /_tqserver/api, /metrics, full /health)."""
        return f"http://127.0.0.1:{self.admin_port}"


class TwistdProcess(protocol.ProcessProtocol):
    """`twistd ... tqserver ...` as a child, its output kept for assertions."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.exit_code: Optional[int] = None
        self.exit_signal: Optional[int] = None
        self.done = False

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.done = True
        self.exit_code = reason.value.exitCode
        self.exit_signal = getattr(reason.value, "signal", None)
        self.ended.callback(self.exit_code)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


def spawn_twistd(project: Project, *args: str, daemon: bool = False,
                 env: Optional[Dict[str, str]] = None, make_dirs: bool = True,
                 prefix: Optional[List[str]] = None) -> TwistdProcess:
    """``make_dirs``: run/ and logs/ made first (False: as on a fresh clone); ``prefix``:
    a command twistd runs under (prlimit ...)."""
    proto = TwistdProcess()
    child_env = dict(os.environ)
    # Only the code under test: under `trial -j`, PYTHONPATH holds this interpreter's whole
    # sys.path (its stdlib too), which breaks any other Python a worker runs (python3).
    child_env["PYTHONPATH"] = (env or {}).get("PYTHONPATH", REPO)
    go = find_go()
    if go:
        child_env["PATH"] = os.path.dirname(go) + os.pathsep + child_env.get("PATH", "")
    child_env.update({k: v for k, v in (env or {}).items() if k != "PYTHONPATH"})
    argv = list(prefix or []) + twistd_argv()
    argv += (["--pidfile", os.path.join(project.root, "run", "tqserver.pid"),
              "--logfile", os.path.join(project.root, "logs", "twistd.log")] if daemon
             else ["-n", "--pidfile", ""])
    argv += ["tqserver", "--root", project.root] + list(args)
    if make_dirs:
        os.makedirs(os.path.join(project.root, "run"), exist_ok=True)
        os.makedirs(os.path.join(project.root, "logs"), exist_ok=True)
    reactor.spawnProcess(proto, argv[0], argv, env=child_env, path=project.root)
    return proto


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class _UnixEndpoints:
    """Agent's endpoint factory for a Unix socket: every URL's host is that socket."""

    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri):
        from twisted.internet.endpoints import UNIXClientEndpoint
        return UNIXClientEndpoint(reactor, self.path)


class Client:
    """A small HTTP client over one connection pool, closed by the test's cleanup;
    ``unix_socket``: every request goes to that socket (the URL gives path and Host)."""

    def __init__(self, testcase, unix_socket: Optional[str] = None) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        if unix_socket is None:
            self.agent = Agent(reactor, pool=self.pool)
        else:
            self.agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(unix_socket),
                                                    pool=self.pool)
        testcase.addCleanup(self.pool.closeCachedConnections)

    async def get(self, url: str, headers: Optional[Dict[str, str]] = None,
                  method: bytes = b"GET", timeout: float = 10.0):
        h = Headers({k: [v] for k, v in (headers or {}).items()})
        d = self.agent.request(method, url.encode(), h)
        d.addTimeout(timeout, reactor)
        response = await d
        body = await readBody(response)
        return response, body

    async def request(self, method: bytes, url: str, body: bytes = b"",
                      headers: Optional[Dict[str, str]] = None, timeout: float = 10.0):
        """(response, body) of one request with a body (POST, PUT...)."""
        from io import BytesIO

        from twisted.web.client import FileBodyProducer
        h = Headers({k: [v] for k, v in (headers or {}).items()})
        d = self.agent.request(method, url.encode(), h, FileBodyProducer(BytesIO(body)))
        d.addTimeout(timeout, reactor)
        response = await d
        return response, await readBody(response)

    async def get_json(self, url: str):
        response, body = await self.get(url)
        return response.code, json.loads(body)


async def wait_until(predicate, timeout: float, what: str, proc: Optional[TwistdProcess] = None):
    """Poll an async predicate until it is true, or fail naming ``what``."""
    deadline = reactor.seconds() + timeout
    last_error = None
    while reactor.seconds() < deadline:
        if proc is not None and proc.done:
            raise AssertionError(f"twistd exited ({proc.exit_code}) while waiting for {what}:\n"
                                 f"{proc.text[-4000:]}")
        try:
            if await predicate():
                return
        except Exception as e:   # not up yet
            last_error = e
        await sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error!r})\n"
                         + (proc.text[-4000:] if proc else ""))


def processes_of(root: str) -> List[psutil.Process]:
    """Every live process started for this project root (workers carry TQSERVER_ROOT)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get("TQSERVER_ROOT") == root:
                found.append(p)
        except psutil.Error:
            continue
    return found


async def stop_twistd(proc: TwistdProcess, timeout: float = 20.0) -> Optional[int]:
    """SIGTERM the foreground twistd and wait for it (SIGKILL on timeout, then fail)."""
    if not proc.done and proc.transport is not None:
        proc.transport.signalProcess("TERM")
        deadline = reactor.seconds() + timeout
        while not proc.done and reactor.seconds() < deadline:
            await sleep(0.05)
        if not proc.done:
            proc.transport.signalProcess("KILL")
            await proc.ended
            raise AssertionError("twistd did not stop on SIGTERM:\n" + proc.text[-4000:])
    return proc.exit_code


def kill_leftovers(root: str) -> None:
    """Last-resort cleanup so a failing test does not leak processes into the next one."""
    for p in processes_of(root):
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
