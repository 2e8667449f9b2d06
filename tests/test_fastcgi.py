"""tqserver.fastcgi: the record and name-value codec and CGI head parsing (unit tests on
bytes), the connection and its pool (StringTransport, memory reactor), and the same code
against a real php-fpm started from TQServer's generated config."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import List, Optional

from twisted.internet import defer, error, reactor
from twisted.python.failure import Failure
from twisted.trial import unittest

try:
    from twisted.internet.testing import MemoryReactorClock
except ImportError:  # older Twisted
    from twisted.test.proto_helpers import MemoryReactorClock

from tqserver.fastcgi import client
from tqserver.fastcgi import codec as fastcgi_codec
from tqserver.fastcgi.client import FastCGIConnection, FastCGIPool
from tqserver.fastcgi.codec import (
    BEGIN_REQUEST,
    END_REQUEST,
    HEADER,
    PARAMS,
    STDERR,
    STDIN,
    STDOUT,
    FastCGIError,
    RecordReader,
    decode_pairs,
    encode_pairs,
    encode_params,
    encode_records,
    parse_cgi_head,
    split_head,
)

from .php_support import PhpFpm, php_spec, require_php_fpm
from .test_upstream import Transport  # the recording transport of the HTTP upstream tests

LOST = Failure(error.ConnectionLost("gone"))


def records_of(data: bytes):
    """Every (type, request id, content, padding) in a byte string of records."""
    out = []
    pos = 0
    while pos < len(data):
        version, rtype, rid, length, padding = HEADER.unpack_from(data, pos)
        assert version == 1
        out.append((rtype, rid, data[pos + 8:pos + 8 + length], padding))
        pos += 8 + length + padding
    assert pos == len(data)
    return out


def record(rtype: int, content: bytes = b"", rid: int = 1, padding: int = 0) -> bytes:
    return HEADER.pack(1, rtype, rid, len(content), padding) + content + b"\0" * padding


def end_request(app_status: int = 0, protocol_status: int = 0) -> bytes:
    return record(END_REQUEST, struct.pack("!IB3x", app_status, protocol_status))


# -- the codec ---------------------------------------------------------------------------

class RecordTests(unittest.TestCase):

    def test_65535_bytes_fit_one_record(self):
        content = os.urandom(65535)
        recs = records_of(b"".join(encode_records(STDIN, content)))
        self.assertEqual([(r[0], len(r[2])) for r in recs], [(STDIN, 65535)])
        self.assertEqual(recs[0][2], content)

    def test_65536_bytes_split_in_two(self):
        content = os.urandom(65536)
        recs = records_of(b"".join(encode_records(STDOUT, content)))
        self.assertEqual([len(r[2]) for r in recs], [65535, 1])
        self.assertEqual(b"".join(r[2] for r in recs), content)

    def test_large_content_splits_at_65535(self):
        content = os.urandom(3 * 65535 + 10)
        recs = records_of(b"".join(encode_records(PARAMS, content, request_id=7)))
        self.assertEqual([len(r[2]) for r in recs], [65535, 65535, 65535, 10])
        self.assertEqual({r[1] for r in recs}, {7})

    def test_records_padded_to_eight(self):
        for size in (1, 5, 7, 8, 9, 65528):
            data = b"".join(encode_records(STDIN, b"x" * size))
            self.assertEqual(len(data) % 8, 0, size)
            (rec,) = records_of(data)
            self.assertEqual(rec[3], -size % 8)

    def test_no_padding_past_65535(self):
        """php-fpm refuses a record whose content and padding pass 65535 bytes."""
        for size in (65529, 65534, 65535):
            (rec,) = records_of(b"".join(encode_records(PARAMS, b"x" * size)))
            self.assertEqual(rec[3], 0, size)

    def test_empty_content_is_one_empty_record(self):
        self.assertEqual(b"".join(encode_records(STDIN, b"")), bytes([1, STDIN, 0, 1, 0, 0, 0, 0]))

    def test_reader_byte_by_byte_with_padding(self):
        data = (record(STDOUT, b"hello", padding=3) + record(STDERR, b"oops")
                + record(STDOUT, b"", padding=0) + end_request(3))
        reader = RecordReader()
        got = []
        for i in range(len(data)):
            got.extend(reader.feed(data[i:i + 1]))
        self.assertEqual([(t, c) for t, _, c in got[:3]],
                         [(STDOUT, b"hello"), (STDERR, b"oops"), (STDOUT, b"")])
        self.assertEqual(got[3][0], END_REQUEST)
        self.assertEqual(reader.pending, 0)

    def test_reader_rejects_other_versions(self):
        with self.assertRaises(FastCGIError):
            RecordReader().feed(b"\x02" + record(STDOUT, b"x")[1:])


class PairTests(unittest.TestCase):

    def test_short_lengths_take_one_byte(self):
        self.assertEqual(encode_pairs([(b"A", b"bc")]), b"\x01\x02Abc")
        name = b"n" * 127
        encoded = encode_pairs([(name, b"")])
        self.assertEqual(encoded[:2], b"\x7f\x00")
        self.assertEqual(len(encoded), 2 + 127)

    def test_128_bytes_take_four_bytes_with_the_top_bit(self):
        name, value = b"n" * 128, b"v" * 127
        encoded = encode_pairs([(name, value)])
        self.assertEqual(encoded[:5], b"\x80\x00\x00\x80\x7f")
        self.assertEqual(len(encoded), 5 + 128 + 127)
        encoded = encode_pairs([(b"N", b"v" * 128)])
        self.assertEqual(encoded[:5], b"\x01\x80\x00\x00\x80")

    def test_large_value(self):
        value = os.urandom(70000)
        encoded = encode_pairs([(b"BIG", value)])
        self.assertEqual(encoded[:5], b"\x03" + struct.pack("!I", 70000 | 0x80000000))
        self.assertEqual(decode_pairs(encoded), [(b"BIG", value)])

    def test_round_trip_around_the_boundary(self):
        pairs = [(b"a" * n, b"b" * m) for n in (0, 1, 126, 127, 128, 129, 300)
                 for m in (0, 127, 128, 1000)]
        self.assertEqual(decode_pairs(encode_pairs(pairs)), pairs)

    def test_params_records_hold_whole_pairs(self):
        """php-fpm decodes each PARAMS record on its own: pairs never span two."""
        pairs = [(b"HTTP_X_%d" % i, os.urandom(10000).hex().encode()) for i in range(7)]
        recs = records_of(b"".join(encode_params(pairs)))
        self.assertEqual({r[0] for r in recs}, {PARAMS})
        self.assertGreater(len(recs), 3)
        self.assertEqual(recs[-1][2], b"")
        self.assertTrue(all(len(r[2]) <= 65535 for r in recs))
        self.assertEqual([p for r in recs for p in decode_pairs(r[2])], pairs)

    def test_a_pair_larger_than_a_record_is_refused(self):
        encode_params([(b"X", b"v" * (65535 - 6))])           # fits exactly
        with self.assertRaises(FastCGIError):
            encode_params([(b"X", b"v" * (65535 - 5))])

    def test_truncated_pairs_are_errors(self):
        encoded = encode_pairs([(b"NAME", b"x" * 200)])
        for cut in (1, 3, 6, len(encoded) - 1):
            with self.assertRaises(FastCGIError):
                decode_pairs(encoded[:cut])


class CGIHeadTests(unittest.TestCase):

    def test_no_status_is_200(self):
        code, reason, headers = parse_cgi_head(b"Content-type: text/html\r\nX-A: 1")
        self.assertEqual((code, reason), (200, b""))
        self.assertEqual(headers, [(b"Content-type", b"text/html"), (b"X-A", b"1")])

    def test_status_sets_code_and_reason_and_is_not_a_header(self):
        code, reason, headers = parse_cgi_head(b"Status: 404 Not Found\r\nContent-Type: x")
        self.assertEqual((code, reason, headers), (404, b"Not Found", [(b"Content-Type", b"x")]))
        self.assertEqual(parse_cgi_head(b"status: 201")[:2], (201, b""))

    def test_location_without_status_is_302(self):
        code, _, headers = parse_cgi_head(b"Location: /elsewhere")
        self.assertEqual(code, 302)
        self.assertEqual(headers, [(b"Location", b"/elsewhere")])
        self.assertEqual(parse_cgi_head(b"Status: 301 Moved\r\nLocation: /x")[0], 301)

    def test_repeated_headers_stay_separate_and_in_order(self):
        _, _, headers = parse_cgi_head(
            b"Set-Cookie: a=1; path=/\r\nX-B: 2\r\nSet-Cookie: b=2; HttpOnly\r\nSet-Cookie: c=3")
        self.assertEqual([v for n, v in headers if n == b"Set-Cookie"],
                         [b"a=1; path=/", b"b=2; HttpOnly", b"c=3"])

    def test_bare_lf_heads(self):
        self.assertEqual(parse_cgi_head(b"Status: 418 Teapot\nX: y")[0], 418)
        self.assertEqual(split_head(b"A: b\n\nbody"), (b"A: b", b"body"))
        self.assertEqual(split_head(b"A: b\r\n\r\nbody\n\nmore"), (b"A: b", b"body\n\nmore"))
        self.assertIsNone(split_head(b"A: b\r\n"))

    def test_bad_heads(self):
        for head in (b"no colon here", b"Status: abc", b"Status: 99 Low", b"Status: 101 Up",
                     b" Folded: x", b"Bad Name: x"):
            with self.assertRaises(FastCGIError, msg=head):
                parse_cgi_head(head)


# -- the connection on a StringTransport -------------------------------------------------



async def start_fpm_with_pool(testcase, spec):
    """A real php-fpm for ``spec`` and a FastCGIPool to it, both stopped in cleanup (the pool
    first, waiting until its connections are closed)."""
    fpm = PhpFpm(spec, testcase.root)
    testcase.addCleanup(lambda: defer.ensureDeferred(fpm.stop()))
    await fpm.start()
    pool = FastCGIPool(reactor)

    async def close_pool():
        pool.close_all()
        deadline = reactor.seconds() + 10
        while pool.open_count(fpm.port) and reactor.seconds() < deadline:
            await _sleep(0.01)
    testcase.addCleanup(lambda: defer.ensureDeferred(close_pool()))
    return fpm, pool


class Sink(client.FastCGISink):
    def __init__(self) -> None:
        self.response = None
        self.chunks: List[bytes] = []
        self.stderr: List[bytes] = []
        self.done = False
        self.failure: Optional[Failure] = None

    def upstream_response(self, code, reason, headers) -> None:
        self.response = (code, reason, headers)

    def upstream_data(self, data) -> None:
        self.chunks.append(data)

    def upstream_stderr(self, data) -> None:
        self.stderr.append(data)

    def upstream_done(self) -> None:
        self.done = True

    def upstream_failed(self, reason) -> None:
        self.failure = reason


class FakePool:
    def __init__(self) -> None:
        self.released: list = []
        self.forgotten: list = []

    def release(self, conn) -> None:
        self.released.append(conn)

    def forget(self, conn) -> None:
        self.forgotten.append(conn)


class ConnectionTests(unittest.TestCase):

    def connect(self, keep_conn: bool = True):
        self.pool = FakePool()
        conn = FastCGIConnection(self.pool, 9000, keep_conn)
        self.transport = Transport()
        conn.makeConnection(self.transport)
        return conn

    def sent(self):
        data = self.transport.value()
        self.transport.clear()
        return records_of(data)

    def test_request_records(self):
        conn = self.connect()
        sink = Sink()
        conn.send(encode_params([(b"REQUEST_METHOD", b"GET"), (b"X", b"y" * 200)]), sink,
                  False, False)
        recs = self.sent()
        self.assertEqual([r[0] for r in recs], [BEGIN_REQUEST, PARAMS, PARAMS, STDIN])
        self.assertEqual(recs[0][2], b"\x00\x01\x01\x00\x00\x00\x00\x00")  # responder, keep-conn
        self.assertEqual(decode_pairs(recs[1][2]),
                         [(b"REQUEST_METHOD", b"GET"), (b"X", b"y" * 200)])
        self.assertEqual((recs[2][2], recs[3][2]), (b"", b""))
        self.assertEqual({r[1] for r in recs}, {1})

    def test_without_keep_conn_the_flag_is_clear(self):
        conn = self.connect(keep_conn=False)
        conn.send(encode_params([]), Sink(), False, False)
        self.assertEqual(self.sent()[0][2][2], 0)

    def test_body_is_streamed_as_stdin_records(self):
        conn = self.connect()
        conn.send(encode_params([(b"CONTENT_LENGTH", b"70000")]), Sink(), False, True)
        self.assertEqual([r[0] for r in self.sent()], [BEGIN_REQUEST, PARAMS, PARAMS])
        conn.write_body(b"a" * 70000)
        self.assertEqual([(r[0], len(r[2])) for r in self.sent()], [(STDIN, 65535), (STDIN, 4465)])
        conn.write_body(b"")
        self.assertEqual(self.sent(), [])
        conn.finish_body()
        conn.finish_body()
        self.assertEqual([(r[0], r[2]) for r in self.sent()], [(STDIN, b"")])

    def test_response_parsed_and_streamed(self):
        conn = self.connect()
        sink = Sink()
        conn.send(encode_params([]), sink, False, False)
        data = (record(STDERR, b"PHP message: hi\n")
                + record(STDOUT, b"Status: 201 Created\r\nSet-")
                + record(STDOUT, b"Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nfirst ")
                + record(STDOUT, b"second") + record(STDOUT) + end_request())
        for i in range(0, len(data), 3):
            conn.dataReceived(data[i:i + 3])
        self.assertEqual(sink.response, (201, b"Created", [(b"Set-Cookie", b"a=1"),
                                                          (b"Set-Cookie", b"b=2")]))
        self.assertEqual(b"".join(sink.chunks), b"first second")
        self.assertEqual(sink.stderr, [b"PHP message: hi\n"])
        self.assertTrue(sink.done)
        self.assertEqual(self.pool.released, [conn])
        self.assertIsNone(conn.sink)

    def test_head_request_drops_the_body(self):
        conn = self.connect()
        sink = Sink()
        conn.send(encode_params([]), sink, True, False)
        conn.dataReceived(record(STDOUT, b"Content-Type: text/plain\r\n\r\nbody") + end_request())
        self.assertEqual((sink.response[0], sink.chunks, sink.done), (200, [], True))

    def test_released_only_after_the_body_is_sent(self):
        conn = self.connect()
        sink = Sink()
        conn.send(encode_params([]), sink, False, True)
        conn.dataReceived(record(STDOUT, b"X: 1\r\n\r\n") + end_request())
        self.assertTrue(sink.done)
        self.assertEqual(self.pool.released, [])
        conn.finish_body()
        self.assertEqual(self.pool.released, [conn])

    def test_not_kept_when_keep_conn_is_off(self):
        conn = self.connect(keep_conn=False)
        conn.send(encode_params([]), Sink(), False, False)
        conn.dataReceived(record(STDOUT, b"X: 1\r\n\r\n") + end_request())
        self.assertEqual(self.pool.released, [])
        self.assertTrue(self.transport.disconnecting)

    def test_bytes_after_end_request_make_it_unreusable(self):
        conn = self.connect()
        sink = Sink()
        conn.send(encode_params([]), sink, False, False)
        conn.dataReceived(record(STDOUT, b"X: 1\r\n\r\n") + end_request() + record(STDOUT, b"?"))
        self.assertTrue(sink.done)
        self.assertEqual(self.pool.released, [])

    def test_broken_head_fails(self):
        conn = self.connect()
        sink = Sink()
        conn.send(encode_params([]), sink, False, False)
        conn.dataReceived(record(STDOUT, b"garbage without colon\r\n\r\n"))
        self.assertIsInstance(sink.failure.value, FastCGIError)
        self.assertTrue(self.transport.aborted)

    def test_end_before_any_head_fails(self):
        for stdout in (b"", b"Status: 200"):
            conn = self.connect()
            sink = Sink()
            conn.send(encode_params([]), sink, False, False)
            conn.dataReceived(record(STDOUT, stdout) + end_request())
            self.assertIsInstance(sink.failure.value, FastCGIError)
            self.assertFalse(sink.done)

    def test_overloaded_is_a_failure(self):
        conn = self.connect()
        sink = Sink()
        conn.send(encode_params([]), sink, False, False)
        conn.dataReceived(end_request(0, fastcgi_codec.OVERLOADED))
        self.assertIn("overloaded", sink.failure.getErrorMessage())

    def test_head_too_large(self):
        conn = self.connect()
        sink = Sink()
        conn.send(encode_params([]), sink, False, False)
        for _ in range(3):
            conn.dataReceived(record(STDOUT, b"X-Long: " + b"a" * 30000))
        self.assertIsInstance(sink.failure.value, FastCGIError)

    def test_management_records_are_ignored(self):
        conn = self.connect()
        sink = Sink()
        conn.send(encode_params([]), sink, False, False)
        conn.dataReceived(record(fastcgi_codec.GET_VALUES_RESULT, b"", rid=0)
                          + record(STDOUT, b"X: 1\r\n\r\nok") + end_request())
        self.assertTrue(sink.done)

    def test_lost_before_the_end_fails(self):
        for first in (b"", record(STDOUT, b"X: 1\r\n")):
            conn = self.connect()
            sink = Sink()
            conn.send(encode_params([]), sink, False, False)
            conn.dataReceived(first)
            conn.connectionLost(LOST)
            self.assertIsInstance(sink.failure.value, error.ConnectionLost)
            self.assertIn(conn, self.pool.forgotten)

    def test_producer_calls_reach_the_transport(self):
        conn = self.connect()
        conn.send(encode_params([]), Sink(), False, False)
        conn.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        conn.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        conn.pauseProducing()
        conn.dataReceived(record(STDOUT, b"X: 1\r\n\r\n") + end_request())
        self.assertEqual(self.transport.producerState, "producing")  # idle ones read
        conn.stopProducing()
        self.assertTrue(self.transport.aborted)

    def test_data_on_an_idle_connection_closes_it(self):
        conn = self.connect()
        conn.dataReceived(record(STDOUT, b"X: 1\r\n\r\n"))
        self.assertTrue(self.transport.aborted)


class PoolTests(unittest.TestCase):
    """FastCGIPool's limit, waiters and idle expiry, on a memory reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = FastCGIPool(self.reactor, idle_timeout=5.0)

    def connect_pending(self, index: int = -1) -> FastCGIConnection:
        host, port, factory, timeout, bind = self.reactor.tcpClients[index]
        proto = factory.buildProtocol(None)
        proto.makeConnection(Transport())
        return proto._wrappedProtocol if hasattr(proto, "_wrappedProtocol") else proto

    def test_limit_queues_and_release_hands_over(self):
        got = []
        self.pool.acquire(9000, limit=2).addCallback(got.append)
        self.pool.acquire(9000, limit=2).addCallback(got.append)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        first = self.connect_pending(0)
        self.connect_pending(1)
        self.assertEqual(len(got), 2)
        waiting = self.pool.acquire(9000, limit=2)
        waiting.addCallback(got.append)
        self.assertEqual(len(self.reactor.tcpClients), 2)   # no third connection
        self.pool.release(first)
        self.assertIs(got[2], first)
        self.assertEqual(self.pool.open_count(9000), 2)

    def test_idle_reused_lifo_then_expires(self):
        got = []
        for _ in range(2):
            self.pool.acquire(9000, limit=4).addCallback(got.append)
        a, b = self.connect_pending(0), self.connect_pending(1)
        self.pool.release(a)
        self.pool.release(b)
        self.assertEqual(self.pool.idle_count(9000), 2)
        self.pool.acquire(9000, limit=4).addCallback(got.append)
        self.assertIs(got[-1], b)
        self.reactor.advance(5.0)
        self.assertTrue(a.transport.disconnecting)   # idle too long: closed
        self.assertFalse(b.transport.disconnecting)  # in use: untouched
        a.connectionLost(LOST)
        self.assertEqual(self.pool.idle_count(9000), 0)
        self.assertEqual(self.pool.open_count(9000), 1)

    def test_a_closed_connection_frees_its_slot_for_a_waiter(self):
        got = []
        self.pool.acquire(9000, limit=1).addCallback(got.append)
        conn = self.connect_pending()
        self.pool.acquire(9000, limit=1).addCallback(got.append)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        conn.connectionLost(LOST)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.connect_pending()
        self.assertEqual(len(got), 2)
        self.assertIsNot(got[1], conn)

    def test_failed_connect_frees_its_slot(self):
        failures, got = [], []
        self.pool.acquire(9000, limit=1).addErrback(failures.append)
        self.pool.acquire(9000, limit=1).addCallback(got.append)
        host, port, factory, timeout, bind = self.reactor.tcpClients[0]
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.assertEqual(len(failures), 1)
        self.assertEqual(len(self.reactor.tcpClients), 2)   # the waiter tries its own
        self.connect_pending()
        self.assertEqual(len(got), 1)

    def test_fresh_replaces_an_idle_connection(self):
        got = []
        self.pool.acquire(9000, limit=1).addCallback(got.append)
        old = self.connect_pending()
        self.pool.release(old)
        self.pool.acquire(9000, limit=1, fresh=True).addCallback(got.append)
        self.assertTrue(old.transport.disconnecting)      # its php-fpm child is freed
        self.assertEqual(len(self.reactor.tcpClients), 2)
        new = self.connect_pending()
        self.assertIs(got[-1], new)
        self.assertIsNot(new, old)
        old.connectionLost(LOST)
        self.assertEqual(self.pool.open_count(9000), 1)

    def test_fresh_waiter_gets_a_new_connection(self):
        got = []
        self.pool.acquire(9000, limit=1).addCallback(got.append)
        busy = self.connect_pending()
        self.pool.acquire(9000, limit=1, fresh=True).addCallback(got.append)
        self.pool.acquire(9000, limit=1).addCallback(got.append)
        self.pool.release(busy)
        self.assertTrue(busy.transport.disconnecting)
        new = self.connect_pending()
        self.assertIs(got[1], new)
        busy.connectionLost(LOST)
        self.pool.release(new)
        self.assertIs(got[2], new)          # a plain waiter takes the kept one

    def test_cancelled_waiter_leaves_the_queue(self):
        self.pool.acquire(9000, limit=1)
        conn = self.connect_pending()
        waiting = self.pool.acquire(9000, limit=1)
        waiting.addErrback(lambda f: f.trap(defer.CancelledError))
        waiting.cancel()
        self.pool.release(conn)
        self.assertEqual(self.pool.idle_count(9000), 1)

    def test_close_all(self):
        self.pool.acquire(9000)
        conn = self.connect_pending()
        self.pool.release(conn)
        self.pool.close_all()
        self.assertTrue(conn.transport.disconnecting)


# -- against a real php-fpm --------------------------------------------------------------

ECHO_PHP = b"""<?php
$input = file_get_contents('php://input');
header('Content-Type: application/json');
$keys = ['REQUEST_METHOD', 'REQUEST_URI', 'QUERY_STRING', 'SCRIPT_NAME', 'SCRIPT_FILENAME',
         'PATH_INFO', 'CONTENT_TYPE', 'CONTENT_LENGTH', 'HTTP_X_LONG', 'HTTP_X_HUGE'];
$server = [];
foreach ($keys as $k) { $server[$k] = $_SERVER[$k] ?? null; }
foreach ($_SERVER as $k => $v) { if (strlen($k) >= 120) { $server['long_names'][$k] = $v; } }
echo json_encode(['server' => $server, 'get' => $_GET, 'length' => strlen($input),
                  'md5' => md5($input), 'pid' => getmypid()]);
"""
BIG_PHP = b"""<?php
header('Content-Type: application/octet-stream');
$n = (int) $_GET['n'];
$block = str_repeat(hash('sha256', 'tq', true), 2048);
while ($n > 0) {
    $piece = substr($block, 0, min($n, strlen($block)));
    echo $piece;
    $n -= strlen($piece);
}
"""
STDERR_PHP = b"""<?php
error_log('hello from the log sink test');
header('Set-Cookie: one=1');
header('Set-Cookie: two=2', false);
header('Status: 202 Accepted');
echo 'logged';
"""


def pattern(n: int) -> bytes:
    block = hashlib.sha256(b"tq").digest() * 2048
    full, rest = divmod(n, len(block))
    return block * full + block[:rest]


class RealPhpFpmTests(unittest.TestCase):
    """The codec and the pool against php-fpm itself (not only against our own decoder)."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        require_php_fpm()
        self.root = os.path.abspath(self.mktemp())
        self.public = os.path.join(self.root, "worker", "public")
        os.makedirs(self.public)
        for name, text in (("echo.php", ECHO_PHP), ("big.php", BIG_PHP),
                           ("stderr.php", STDERR_PHP)):
            with open(os.path.join(self.public, name), "wb") as f:
                f.write(text)
        # fastcgi.logging on: PHP's messages then come back as STDERR records.
        spec = php_spec(os.path.join(self.root, "worker"), {"fastcgi.logging": "1"},
                        max_workers=3, start_workers=2)
        self.fpm, self.pool = yield defer.ensureDeferred(start_fpm_with_pool(self, spec))

    def params(self, script: str, **extra):
        params = [(b"REQUEST_METHOD", b"GET"), (b"SCRIPT_NAME", b"/t/" + script.encode()),
                  (b"SCRIPT_FILENAME", os.path.join(self.public, script).encode()),
                  (b"REQUEST_URI", b"/t/" + script.encode()), (b"QUERY_STRING", b"")]
        params += [(k.encode(), v) for k, v in extra.items()]
        return params

    def run_request(self, script: str, body: bytes = b"", **extra):
        return client.request(reactor, self.fpm.port, self.params(script, **extra), body,
                               timeout=60)

    @defer.inlineCallbacks
    def test_server_vars_and_long_pairs(self):
        long_name = b"HTTP_" + b"N" * 123          # 128 bytes: a 4-byte length
        short_name = b"HTTP_" + b"M" * 122         # 127 bytes: a 1-byte length
        huge = os.urandom(30000).hex().encode()    # 60000 bytes: PARAMS over two records
        params = self.params("echo.php", QUERY_STRING=b"a=1&b=two", PATH_INFO=b"/extra",
                             HTTP_X_LONG=b"v" * 128, HTTP_X_HUGE=huge)
        params += [(long_name, b"v" * 127), (short_name, b"w" * 128)]
        response = yield client.request(reactor, self.fpm.port, params, timeout=30)
        self.assertEqual(response.code, 200)
        data = json.loads(response.body)
        server = data["server"]
        self.assertEqual(server["REQUEST_METHOD"], "GET")
        self.assertEqual(server["PATH_INFO"], "/extra")
        self.assertEqual(server["SCRIPT_NAME"], "/t/echo.php")
        self.assertEqual(data["get"], {"a": "1", "b": "two"})
        self.assertEqual(server["HTTP_X_LONG"], "v" * 128)
        self.assertEqual(server["HTTP_X_HUGE"], huge.decode())
        self.assertEqual(server["long_names"], {long_name.decode(): "v" * 127,
                                                short_name.decode(): "w" * 128})

    @defer.inlineCallbacks
    def test_body_lengths_at_the_record_boundary(self):
        for size in (65535, 65536, 1):
            body = os.urandom(size)
            response = yield self.run_request("echo.php", body, REQUEST_METHOD=b"POST")
            data = json.loads(response.body)
            self.assertEqual((data["length"], data["md5"]),
                             (size, hashlib.md5(body).hexdigest()), size)

    @defer.inlineCallbacks
    def test_5mb_post_body(self):
        body = os.urandom(5 * 1024 * 1024)
        response = yield self.run_request("echo.php", body, REQUEST_METHOD=b"POST",
                                          CONTENT_TYPE=b"application/octet-stream")
        data = json.loads(response.body)
        self.assertEqual(data["length"], len(body))
        self.assertEqual(data["md5"], hashlib.md5(body).hexdigest())
        self.assertEqual(data["server"]["CONTENT_LENGTH"], str(len(body)))

    @defer.inlineCallbacks
    def test_response_larger_than_one_record(self):
        n = 300000
        response = yield self.run_request("big.php", QUERY_STRING=b"n=%d" % n)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header(b"content-type"), [b"application/octet-stream"])
        self.assertEqual(response.body, pattern(n))

    @defer.inlineCallbacks
    def test_stderr_status_and_cookies(self):
        response = yield self.run_request("stderr.php")
        self.assertEqual((response.code, response.reason), (202, b"Accepted"))
        self.assertEqual(response.header(b"set-cookie"), [b"one=1", b"two=2"])
        self.assertIn(b"hello from the log sink test", b"".join(response.stderr))
        self.assertEqual(response.body, b"logged")

    @defer.inlineCallbacks
    def test_keep_conn_reuses_one_connection(self):
        port = self.fpm.port
        pids = []
        conns = []
        for _ in range(2):
            conn = yield self.pool.acquire(port, limit=2)
            conns.append(conn)
            sink = client.Response()
            conn.send(encode_params(self.params("echo.php")), sink, False, False)
            response = yield sink.done
            pids.append(json.loads(response.body)["pid"])
            yield defer.ensureDeferred(_sleep(0))   # done fires just before the release
        self.assertIs(conns[0], conns[1])
        self.assertEqual(pids[0], pids[1])            # the same php-fpm child served both
        self.assertEqual(self.pool.open_count(port), 1)
        self.assertEqual(self.pool.idle_count(port), 1)

    @defer.inlineCallbacks
    def test_pool_limit_against_php_fpm(self):
        """More requests than the limit: they queue in the pool and all complete."""
        port = self.fpm.port

        @defer.inlineCallbacks
        def one(i):
            conn = yield self.pool.acquire(port, limit=2)
            sink = client.Response()
            conn.send(encode_params(self.params("echo.php", QUERY_STRING=b"i=%d" % i)), sink,
                      False, False)
            response = yield sink.done
            return json.loads(response.body)["get"]["i"]
        results = yield defer.gatherResults([one(i) for i in range(10)])
        self.assertEqual(sorted(results, key=int), [str(i) for i in range(10)])
        self.assertLessEqual(self.pool.open_count(port), 2)

    @defer.inlineCallbacks
    def test_missing_script(self):
        response = yield self.run_request("nope.php")
        self.assertEqual(response.code, 404)


async def _sleep(seconds: float) -> None:
    from twisted.internet import task
    await task.deferLater(reactor, seconds, lambda: None)


class RecyclingPhpFpmTests(unittest.TestCase):
    """php-fpm children that exit after a few requests (pm.max_requests) close the
    connection they were kept on right after their last END_REQUEST: the pool must not
    hand that connection to a waiting request (it would fail, and a request with a body
    cannot be retried)."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        require_php_fpm()
        self.root = os.path.abspath(self.mktemp())
        self.public = os.path.join(self.root, "worker", "public")
        os.makedirs(self.public)
        with open(os.path.join(self.public, "echo.php"), "wb") as f:
            f.write(ECHO_PHP)
        spec = php_spec(os.path.join(self.root, "worker"), manager="static", max_workers=3,
                        max_requests=3)
        self.fpm, self.pool = yield defer.ensureDeferred(start_fpm_with_pool(self, spec))

    @defer.inlineCallbacks
    def test_posts_through_recycled_children_all_succeed(self):
        port = self.fpm.port
        body = os.urandom(20000)
        digest = hashlib.md5(body).hexdigest()
        params = [(b"REQUEST_METHOD", b"POST"), (b"SCRIPT_NAME", b"/echo.php"),
                  (b"SCRIPT_FILENAME", os.path.join(self.public, "echo.php").encode()),
                  (b"CONTENT_LENGTH", b"%d" % len(body))]

        @defer.inlineCallbacks
        def loop():
            pids = set()
            for _ in range(15):
                conn = yield self.pool.acquire(port, limit=2, fresh=True)
                sink = client.Response()
                conn.send(encode_params(params), sink, False, True)
                conn.write_body(body)
                conn.finish_body()
                response = yield sink.done
                data = json.loads(response.body)
                self.assertEqual(data["md5"], digest)
                pids.add(data["pid"])
            return pids
        results = yield defer.gatherResults([loop() for _ in range(5)])
        self.assertGreater(len(set().union(*results)), 6)    # children were recycled
