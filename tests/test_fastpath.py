"""The proxy's per-request fast path: Deadlines (one timer for many timeouts), write_now
(an immediate send on plain TCP) and the channel's cork (one send per response read)."""
from __future__ import annotations

import socket

from twisted.internet import protocol, task, tcp
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.http_headers import Headers

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # older Twisted
    from twisted.test.proto_helpers import StringTransport

from tqserver.proxy.deadlines import Deadlines
from tqserver.proxy.site import ProxyChannel, ProxySite
from tqserver.twisted_compat import write_now


class DeadlinesTests(unittest.TestCase):

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.deadlines = Deadlines(self.clock)
        self.fired = []

    def cb(self, name):
        return lambda: self.fired.append((name, self.clock.seconds()))

    def test_fires_within_one_resolution(self) -> None:
        cb = self.cb("a")
        self.deadlines.set(cb, 30)
        self.assertEqual(self.deadlines.resolution, 1.0)
        self.clock.advance(29.9)
        self.assertEqual(self.fired, [])
        self.clock.pump([0.1] * 11)
        self.assertEqual(len(self.fired), 1)
        self.assertTrue(30 <= self.fired[0][1] <= 31, self.fired)
        self.assertEqual(self.clock.getDelayedCalls(), [])   # nothing left: no timer

    def test_one_timer_for_many(self) -> None:
        for i in range(100):
            self.deadlines.set(self.cb(i), 10 + i / 100)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.pump([1] * 12)
        self.assertEqual(len(self.fired), 100)

    def test_cancel_and_last_cancel_stops_the_timer(self) -> None:
        a, b = self.cb("a"), self.cb("b")
        self.deadlines.set(a, 5)
        self.deadlines.set(b, 5)
        self.deadlines.cancel(a)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.deadlines.cancel(b)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.fired, [])
        self.deadlines.cancel(a)   # cancelling twice is harmless

    def test_set_again_moves_and_reset_only_when_pending(self) -> None:
        a = self.cb("a")
        self.deadlines.set(a, 5)
        self.clock.advance(4)
        self.deadlines.reset(a, 5)       # now due at 9
        self.clock.pump([1] * 4)
        self.assertEqual(self.fired, [])
        self.clock.pump([1] * 2)
        self.assertEqual([n for n, _ in self.fired], ["a"])
        self.deadlines.reset(a, 5)       # fired: reset does not re-arm it
        self.assertFalse(self.deadlines.pending(a))
        self.clock.advance(10)
        self.assertEqual(len(self.fired), 1)

    def test_short_timeouts_get_a_finer_resolution(self) -> None:
        self.deadlines.set(self.cb("slow"), 30)
        self.deadlines.set(self.cb("fast"), 0.3)
        self.assertAlmostEqual(self.deadlines.resolution, 0.075)
        self.clock.pump([0.025] * 15)
        self.assertEqual([n for n, _ in self.fired], ["fast"])
        self.assertTrue(0.3 <= self.fired[0][1] <= 0.375 + 1e-9, self.fired)

    def test_a_callback_may_cancel_another(self) -> None:
        b = self.cb("b")

        def a():
            self.fired.append(("a", 0))
            self.deadlines.cancel(b)
        self.deadlines.set(a, 1)
        self.deadlines.set(b, 1)
        self.clock.advance(2)
        self.assertEqual([n for n, _ in self.fired], ["a"])

    def test_a_failing_callback_does_not_stop_the_others(self) -> None:
        def boom():
            raise RuntimeError("boom")
        self.deadlines.set(boom, 1)
        self.deadlines.set(self.cb("b"), 1)
        self.clock.advance(2)
        self.assertEqual([n for n, _ in self.fired], ["b"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class _FDReactor:
    """Just enough of IReactorFDSet for a tcp.Connection over a socketpair."""

    def __init__(self) -> None:
        self.writers = set()
        self.readers = set()

    def addWriter(self, w) -> None:
        self.writers.add(w)

    def removeWriter(self, w) -> None:
        self.writers.discard(w)

    def addReader(self, r) -> None:
        self.readers.add(r)

    def removeReader(self, r) -> None:
        self.readers.discard(r)


class WriteNowTests(unittest.TestCase):

    def setUp(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.reactor = _FDReactor()
        self.conn = tcp.Connection(self.ours, protocol.Protocol(), self.reactor)
        self.conn.connected = 1

    def test_sent_at_once_without_registering_for_writability(self) -> None:
        write_now(self.conn, b"hello")
        self.assertEqual(self.theirs.recv(100), b"hello")
        self.assertEqual(self.reactor.writers, set())

    def test_queued_behind_data_already_queued(self) -> None:
        self.conn.write(b"first ")
        write_now(self.conn, b"second")
        self.assertEqual(self.conn._tempDataBuffer, [b"first ", b"second"])
        self.conn.doWrite()
        self.assertEqual(self.theirs.recv(100), b"first second")

    def test_what_the_kernel_does_not_take_is_queued(self) -> None:
        big = b"x" * (8 << 20)
        write_now(self.conn, big)
        queued = sum(len(d) for d in self.conn._tempDataBuffer)
        self.assertGreater(queued, 0)
        self.assertIn(self.conn, self.reactor.writers)
        received = 0
        self.theirs.setblocking(False)
        while received + queued < len(big):
            received += len(self.theirs.recv(1 << 20))
        self.assertEqual(received + queued, len(big))

    def test_other_transports_just_write(self) -> None:
        transport = StringTransport()
        write_now(transport, b"data")
        self.assertEqual(transport.value(), b"data")

    def test_nothing_after_lose_connection(self) -> None:
        self.conn.disconnecting = True
        write_now(self.conn, b"late")   # queued by write(), never sent by us
        self.theirs.setblocking(False)
        self.assertRaises(BlockingIOError, self.theirs.recv, 100)


class CorkTests(unittest.TestCase):
    """ProxyChannel.cork/flush with a StringTransport client."""

    def setUp(self) -> None:
        self.channel = ProxyChannel()
        self.channel.site = ProxySite(None, lambda request: None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.addCleanup(self.channel.connectionLost, Failure(ConnectionDone()))

    def test_writes_collect_until_flush_in_order(self) -> None:
        headers = Headers({b"content-length": [b"5"]})
        self.channel.cork()
        self.channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
        self.channel.write(b"he")
        self.channel.writeSequence([b"l", b"lo"])
        self.assertEqual(self.transport.value(), b"")
        self.channel.flush()
        self.assertEqual(self.transport.value(),
                         b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        self.channel.write(b"!")   # uncorked: straight through
        self.assertEqual(self.transport.value()[-1:], b"!")

    def test_reject_flushes_first(self) -> None:
        self.channel.cork()
        self.channel.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.channel.reject(408)
        data = self.transport.value()
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n"), data)
        self.assertIn(b"HTTP/1.1 408 ", data)

    def test_lose_connection_flushes_first(self) -> None:
        self.channel.cork()
        self.channel.write(b"last words")
        self.channel.loseConnection()
        self.assertEqual(self.transport.value(), b"last words")
        self.assertTrue(self.transport.disconnecting)

    def test_connection_lost_drops_the_cork(self) -> None:
        self.channel.cork()
        self.channel.write(b"never sent")
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.channel.flush()
        self.assertEqual(self.transport.value(), b"")
