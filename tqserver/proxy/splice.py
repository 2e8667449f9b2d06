"""After a worker answers 101 Switching Protocols (WebSocket and other Upgrades), the client
connection and the upstream connection become one byte pipe, with backpressure both ways."""

from __future__ import annotations

from twisted.internet import protocol

from tqserver.proxy.upstream import UpstreamSink


class _Pipe(UpstreamSink):
    """Upstream side of a spliced connection (it replaces the Forward as the sink)."""

    def __init__(self, client_transport, done) -> None:
        self.client = client_transport
        self.done = done
        self.sent = 0  # bytes relayed to the client, for the access log

    def upstream_data(self, data: bytes) -> None:
        self.sent += len(data)
        self.client.write(data)

    def upstream_flush(self) -> None:
        pass

    def upstream_done(self) -> None:
        # Unregister first: a paused producer would keep a closing transport open forever.
        self.client.unregisterProducer()
        self.client.loseConnection()
        self.done()

    def upstream_failed(self, reason) -> None:
        self.upstream_done()


def splice_upgrade(request, conn, rest: bytes, code: int, reason: bytes, headers) -> None:
    channel = request.channel
    client = channel.transport
    head = [b"HTTP/1.1 %d %s" % (code, reason or b"Switching Protocols")]
    head += [name + b": " + value for name, value in headers]
    client.write(b"\r\n".join(head) + b"\r\n\r\n")
    if rest:
        client.write(rest)
    channel.setTimeout(None)
    finished: list[bool] = []

    def done() -> None:
        if not finished:
            finished.append(True)
            forward = request.forward
            forward.conn = None  # both sides are closed in order here, never reset:
            forward.client_gone()  # this only does the request accounting
            # One access-log line (and the metrics) for the whole upgraded session.
            request.code = code
            request.sentLength = len(rest) + pipe.sent
            channel.site.log(request)

    pipe = conn.sink = _Pipe(client, done)
    # The channel no longer parses HTTP: client bytes go straight upstream.
    channel.dataReceived = conn.transport.write

    def client_lost(reason=protocol.connectionDone) -> None:
        # The client's last bytes (a WebSocket close frame) may still be in the upstream
        # send buffer: close after them, do not abort.
        conn.transport.unregisterProducer()
        conn.transport.loseConnection()
        done()

    channel.connectionLost = client_lost
    client.unregisterProducer()
    client.registerProducer(conn.transport, True)
    conn.transport.registerProducer(client, True)
    unread = channel.take_unread()  # what the client sent after its Upgrade request
    if unread:
        conn.transport.write(unread)
