"""The private parts of Twisted that TQServer uses, all here and nowhere else.

Each one is used because no public API does the job (or not at its cost), and
tests/test_twisted_compat.py checks every one against the installed Twisted, so a release
that changes them fails that test by name instead of breaking the proxy quietly. setup.cfg
bounds Twisted from above: raising the bound means running that test first.
"""

from __future__ import annotations

from errno import EAGAIN, EINTR, ENOBUFS, EWOULDBLOCK

from twisted.internet import tcp
from twisted.web import http

# twisted.web.http is wrapped in a deprecation proxy whose attribute lookups are slow.
_HTTPChannel = http.HTTPChannel


class HTTPChannelHooks(_HTTPChannel):
    """HTTPChannel with public names for the private state a proxy needs: the request line
    before the body (the request is routed on its head, so the body can stream), what is
    left unread after a request (the bytes after an Upgrade head belong to the new
    protocol), and why a head was refused (431 for a head too large, 400 otherwise)."""

    @property
    def request_line(self) -> tuple[bytes, bytes, bytes]:
        """(method, target, version) of the request whose head is being read."""
        return self._command, self._path, self._version

    def take_unread(self) -> bytes:
        """The bytes received after the current request that HTTPChannel holds for the
        next one; they are the caller's from now on."""
        buffered = self._dataBuffer
        data = b"".join(buffered)
        del buffered[:]
        return data

    def bad_request(self, head_too_large: bool) -> None:
        """A request head HTTPChannel refuses; Twisted's answer is a 400 and a close."""
        _HTTPChannel._respondToBadRequestAndDisconnect(self)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.bad_request(
            self._receivedHeaderSize > self.totalHeadersSize
            or self._receivedHeaderCount > self.maxHeaders
        )


_RETRY = (EAGAIN, EWOULDBLOCK, EINTR, ENOBUFS)


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, sent at once when ``transport`` is a plain TCP connection
    with nothing queued (never reordered: else it is queued behind the rest).

    Twisted's ``transport.write`` only queues: the bytes go out when the reactor sees the
    socket writable, which costs two ``epoll_ctl`` calls (register for writability, then
    unregister) and one more reactor event per write. The proxy's small responses and
    upstream request heads fit in the socket buffer, so they are sent here at once, and
    whatever the kernel did not take goes to ``transport.write`` (with its buffering,
    producer pausing and error handling) as before. It pays: a proxied request costs a
    third more instructions without it (docs/performance.md)."""
    if (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport.TLS
        and not transport._tempDataBuffer  # bytes written this reactor turn
        and not transport.dataBuffer
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
    ):
        try:
            sent = transport.socket.send(data)
        except OSError as e:
            if e.errno not in _RETRY:
                # Let Twisted find the error on its own write and close as it does.
                transport.write(data)
                return
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def adopt_listening_port(port_class: type[tcp.Port], reactor, fd: int, family: int, factory):
    """``reactor.adoptStreamPort`` with a Port subclass of ours (proxy processes accept
    one connection per wake-up: fleet.child.OneAcceptPort)."""
    return port_class._fromListeningDescriptor(reactor, fd, family, factory)


def forget_exit_signal(reactor) -> None:
    """twistd re-raises the SIGTERM/SIGINT that stopped the reactor on itself once the
    application has stopped, so the exit status says "killed". After a clean stop the
    supervisor exits with 0 instead."""
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None
