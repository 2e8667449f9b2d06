"""Writing to a TCP transport without waiting for the reactor's next turn.

Twisted's ``transport.write`` only queues: the bytes go out when the reactor sees the
socket writable, which costs two ``epoll_ctl`` calls (register for writability, then
unregister) and one more reactor event per write. The proxy's small responses and
upstream request heads fit in the socket buffer, so ``write_now`` sends them at once when
nothing is queued, and hands whatever the kernel did not take to ``transport.write`` (with
its buffering, producer pausing and error handling) as before.
"""

from __future__ import annotations

from errno import EAGAIN, EINTR, ENOBUFS, EWOULDBLOCK

from twisted.internet import tcp

_RETRY = (EAGAIN, EWOULDBLOCK, EINTR, ENOBUFS)


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, sent at once when ``transport`` is a plain TCP connection
    with nothing queued (never reordered: else it is queued behind the rest)."""
    if (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport.TLS
        and not transport._tempDataBuffer
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
