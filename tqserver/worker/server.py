"""The WSGI server: the listening socket, the accept loop, a thread per connection, and
the graceful drain on SIGTERM."""

from __future__ import annotations

import _socket
import _thread
import os
import select
import sys
import time

try:
    import _signal as _sig  # the C module: ``signal`` builds enums (slow on PyPy)
except ImportError:  # pragma: no cover
    import signal as _sig

from tqserver.worker.body import FileWrapper
from tqserver.worker.common import env_float, log, readable, worker_info
from tqserver.worker.connection import Connection, ConnState


class Server:
    """Listening socket, accept loop, connection threads, graceful drain."""

    def __init__(
        self,
        host: str,
        port: int,
        app,
        health_path: str,
        idle_timeout: float,
        read_timeout: float,
        app_health: bool = False,
    ) -> None:
        self.family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
        sock = _socket.socket(self.family, _socket.SOCK_STREAM)
        try:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.host = host
        self.port = sock.getsockname()[1]
        self.app = app
        self.health_path = health_path
        # app_health: the health path goes to the app; only a 404 from it is answered "ok".
        self.app_health = app_health
        self.health_app = health_fallback(app) if app_health else app
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.draining = False
        self.lock = _thread.allocate_lock()
        self.conns: set[ConnState] = set()
        self._changed = _thread.allocate_lock()  # released when conns changes
        self._changed.acquire()
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.base_environ = {
            "SCRIPT_NAME": "",
            "SERVER_NAME": host,
            "SERVER_PORT": str(self.port),
            "SERVER_SOFTWARE": "tqserver.worker",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": FileWrapper,
        }

    # -- connections ------------------------------------------------------------

    def _start(self, fd: int, addr) -> None:
        conn = _socket.socket(self.family, _socket.SOCK_STREAM, 0, fd)
        state = ConnState(conn)
        with self.lock:
            self.conns.add(state)
        try:
            _thread.start_new_thread(self._serve_connection, (conn, addr, state))
        except Exception as e:  # can't start new thread
            log(f"cannot serve a connection: {e}")
            conn.close()
            self._forget(state)

    def _serve_connection(self, conn, addr, state: ConnState) -> None:
        handler = None
        try:
            try:
                conn.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            except OSError:
                pass
            handler = Connection(self, conn, addr, state)
            handler.handle()
        except OSError:
            pass
        except BaseException:
            try:
                import traceback

                log(f"connection from {addr} failed:\n{traceback.format_exc().rstrip()}")
            except BaseException:
                pass
        finally:
            try:
                if handler is not None:
                    handler.close()
                else:
                    conn.close()
            except BaseException:
                pass
            self._forget(state)

    def _forget(self, state: ConnState) -> None:
        with self.lock:
            self.conns.discard(state)
            if self._changed.locked():
                self._changed.release()

    # -- accept loop ------------------------------------------------------------

    def request_stop(self) -> bool:
        """Async-signal friendly; returns False if a stop was already requested."""
        if self._stop:
            return False
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        return True

    def _accept_pending(self) -> None:
        while True:
            try:
                # The C-level accept: a file descriptor, no socket object per connection.
                fd, addr = self.sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:  # EMFILE and friends: back off a little
                log(f"accept failed: {e}")
                time.sleep(0.05)
                return
            self._start(fd, addr)

    def run(self) -> None:
        lfd = self.sock.fileno()
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(lfd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            wait = lambda: [fd for fd, _ in poller.poll()]  # noqa: E731
        else:  # pragma: no cover - no poll() on this platform
            wait = lambda: select.select([lfd, self._wake_r], [], [])[0]  # noqa: E731
        while not self._stop:
            for fd in wait():
                if fd == lfd and not self._stop:
                    self._accept_pending()

    def drain(self, seconds: float) -> int:
        """Stop accepting, close idle connections, wait for the busy ones."""
        # Connections the kernel has already completed are ours to serve.
        self._accept_pending()
        self.close()
        with self.lock:
            self.draining = True
            for state in list(self.conns):
                # An idle keep-alive connection is closed, unless a request is
                # arriving on it right now (then it is served, then closed).
                if state.idle and not readable(state.sock):
                    try:
                        state.sock.shutdown(_socket.SHUT_RD)  # wakes its reader
                    except OSError:
                        pass
        end = time.monotonic() + seconds
        while True:
            with self.lock:
                left_over = len(self.conns)
            left = end - time.monotonic()
            if not left_over or left <= 0:
                return left_over
            self._changed.acquire(True, min(left, 1.0))

    def close(self) -> None:
        self.sock.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1


def health_fallback(app):
    """``app`` for health probes: its own answer, or "ok" when it has no such route."""

    def answer(environ, start_response):
        missing = []  # the app answered 404 while app() ran: it has no health route

        def start(status, headers, exc_info=None):
            if status[:3] == "404" and deciding:
                missing.append(status)
                return lambda data: None
            return start_response(status, headers, exc_info)

        deciding = True
        result = app(environ, start)
        deciding = False
        if not missing:
            return result
        close = getattr(result, "close", None)
        if close is not None:
            close()
        start_response(
            "200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
        )
        return [b"ok"]

    return answer


def serve_wsgi(
    app, host: str, port: int, health_path: str, drain_seconds: float, app_health: bool = False
) -> None:
    try:
        server = Server(
            host,
            port,
            app,
            health_path,
            env_float("WORKER_IDLE_TIMEOUT_SECONDS", 300.0),
            env_float("WORKER_READ_TIMEOUT_SECONDS", 60.0),
            app_health,
        )
    except OSError as e:
        raise SystemExit(
            f"tqserver.worker: cannot listen on {host}:{port}: {e.strerror or e}"
        ) from None

    def on_signal(signum, frame):
        if not server.request_stop():
            log("second signal: exiting without waiting for in-flight requests")
            os._exit(1)

    installed = []
    try:
        for sig in (_sig.SIGTERM, _sig.SIGINT):
            installed.append((sig, _sig.signal(sig, on_signal)))
    except ValueError:
        log("serve() not called from the main thread: no SIGTERM handling")

    info = worker_info()
    log(
        f"{info['name'] or 'worker'} listening on "
        f"http://{host if ':' not in host else f'[{host}]'}:{server.port} (WSGI)"
    )
    try:
        server.run()
        log(f"stopping: draining {len(server.conns)} connection(s) (at most {drain_seconds:g}s)")
        left = server.drain(drain_seconds)
        if left:
            log(f"drain timed out with {left} connection(s) still busy")
        log("stopped")
    finally:
        if server._wake_r != -1:
            server.close()
        for sig, old in installed:
            try:
                _sig.signal(sig, old)
            except (TypeError, ValueError):
                pass
