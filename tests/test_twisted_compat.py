"""Every private part of Twisted that tqserver.twisted_compat uses, against the installed
Twisted. A failure here names what a Twisted release changed; fix the adapter before
moving the upper bound on Twisted in setup.cfg."""
from __future__ import annotations

import inspect
import socket

from twisted.application import app
from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web import http

from tqserver import twisted_compat


class Holding(http.Request):
    """A request that is never answered, so the channel holds what comes after it."""

    def process(self) -> None:
        pass


class Channel(twisted_compat.HTTPChannelHooks):
    requestFactory = Holding

    def __init__(self) -> None:
        twisted_compat.HTTPChannelHooks.__init__(self)
        self.lines: list = []
        self.refused: list = []

    def allHeadersReceived(self) -> None:
        self.lines.append(self.request_line)
        twisted_compat.HTTPChannelHooks.allHeadersReceived(self)

    def bad_request(self, head_too_large: bool) -> None:
        self.refused.append(head_too_large)
        twisted_compat.HTTPChannelHooks.bad_request(self, head_too_large)


class HTTPChannelTests(unittest.TestCase):
    def channel(self) -> Channel:
        channel = Channel()
        channel.makeConnection(StringTransport())
        self.addCleanup(channel.connectionLost, None)
        return channel

    def test_request_line_while_the_head_is_read(self) -> None:
        channel = self.channel()
        channel.dataReceived(b"POST /up?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n")
        self.assertEqual(channel.lines, [(b"POST", b"/up?x=1", b"HTTP/1.1")])

    def test_unread_bytes_after_a_request_are_handed_over(self) -> None:
        channel = self.channel()
        channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
                             b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(channel.take_unread(), b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(channel.take_unread(), b"")

    def test_a_head_too_large_is_told_apart(self) -> None:
        channel = self.channel()
        channel.totalHeadersSize = 100
        channel.dataReceived(b"GET / HTTP/1.1\r\nX-Big: " + b"x" * 200 + b"\r\n")
        self.assertEqual(channel.refused, [True])
        channel = self.channel()
        channel.maxHeaders = 2
        channel.dataReceived(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
        self.assertEqual(channel.refused, [True])

    def test_a_malformed_head_is_a_bad_request(self) -> None:
        channel = self.channel()
        channel.dataReceived(b"NONSENSE\r\n")
        self.assertEqual(channel.refused, [False])
        self.assertIn(b"400", channel.transport.value())


class Sink(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.connected.callback(self)


class WriteNowTests(unittest.TestCase):
    """write_now reads four private attributes of tcp.Connection to know that nothing is
    queued: bytes written this turn, the buffer, and a close after them."""

    @defer.inlineCallbacks
    def test_what_it_reads_means_what_it_expects(self):
        server = protocol.Factory.forProtocol(protocol.Protocol)
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        factory = protocol.ClientFactory.forProtocol(Sink)
        factory.connected = defer.Deferred()
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        client = yield factory.connected
        transport = client.transport
        self.addCleanup(transport.abortConnection)
        self.assertIsInstance(transport, tcp.Connection)
        idle = (transport._tempDataBuffer, transport.dataBuffer,
                transport._writeDisconnecting, transport._writeDisconnected)
        self.assertFalse(any(idle))
        transport.write(b"queued")  # until the reactor sees the socket writable
        self.assertEqual(b"".join(transport._tempDataBuffer), b"queued")
        transport.loseWriteConnection()
        self.assertTrue(transport._writeDisconnecting or transport._writeDisconnected)

    @defer.inlineCallbacks
    def test_sent_at_once_when_nothing_is_queued(self):
        received = defer.Deferred()

        class Receiver(protocol.Protocol):
            def dataReceived(self, data):
                received.callback(data)

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Receiver),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        factory = protocol.ClientFactory.forProtocol(Sink)
        factory.connected = defer.Deferred()
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        client = yield factory.connected
        self.addCleanup(client.transport.abortConnection)
        twisted_compat.write_now(client.transport, b"now")
        self.assertFalse(client.transport._tempDataBuffer)  # not queued: sent
        self.assertEqual((yield received), b"now")


class AdoptTests(unittest.TestCase):
    def test_adopted_port_is_of_our_class_and_accepts(self) -> None:
        class Mine(tcp.Port):
            pass

        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(5)
        sock.setblocking(False)
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        port = twisted_compat.adopt_listening_port(
            Mine, reactor, sock.fileno(), socket.AF_INET, factory)
        self.assertIsInstance(port, Mine)
        port.startListening()
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().port, sock.getsockname()[1])


class ExitSignalTests(unittest.TestCase):
    def test_twistd_reads_the_signal_where_we_clear_it(self) -> None:
        self.assertIn("reactor._exitSignal", inspect.getsource(app.ApplicationRunner.startReactor))
        self.assertTrue(hasattr(type(reactor), "_exitSignal"))
        previous = reactor._exitSignal
        self.addCleanup(setattr, reactor, "_exitSignal", previous)
        reactor._exitSignal = 15
        twisted_compat.forget_exit_signal(reactor)
        self.assertIsNone(reactor._exitSignal)
