"""Bounded fuzzing (hypothesis) of what reads untrusted bytes: the proxy's request parser and
head relay (the real ProxyChannel/Forward/UpstreamConnection over memory transports, see
memproxy), the routing helpers, the config loaders and the FastCGI codec.

Each property says what must hold for any input, not what one input gives: the proxy never
logs an error, answers only with well-formed HTTP/1.1, forwards only requests a strict
parser reads exactly as it framed them (no smuggling), sends nothing after a response
that closes the connection, and leaves nothing in flight; decoders raise their own error
and nothing else. The run is bounded: TQSERVER_FUZZ_EXAMPLES examples per property
(default 150), no deadline. A failure prints the smallest input hypothesis found; it
becomes a regression test (an @example here, or a test of its own)."""
from __future__ import annotations

import functools
import os
import tempfile

import attrs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from tqserver.config.errors import ConfigError
from tqserver.config.server import default_server_config, load_server_config
from tqserver.config.worker import load_worker_config
from tqserver.fastcgi import codec
from tqserver.proxy.forward import IDEMPOTENT
from tqserver.proxy.response_head import UpstreamError, parse_response_head
from tqserver.proxy.router import RoutingTable, normalize_route, route_key, strip_prefix
from tqserver.proxy.site import remove_dot_segments

from .memproxy import MemoryProxy, Violation

EXAMPLES = int(os.environ.get("TQSERVER_FUZZ_EXAMPLES", "150"))
_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    report_multiple_bugs=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)


def FUZZ(test):
    """The settings above, and the falsifying example in the failure itself (trial does
    not show the notes hypothesis attaches to the exception)."""
    test = _SETTINGS(test)

    @functools.wraps(test)
    def run(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        except Exception as e:
            notes = getattr(e, "__notes__", None)
            if not notes:
                raise
            raise AssertionError(f"{type(e).__name__}: {e}\n" + "\n".join(notes)) from e
    return run


# ---------------------------------------------------------------------------------------
# request strategies: mostly plausible requests, with the parts smuggling plays with

METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"get",
           b"G ET", b"", b"CONNECT", b"TRACE"]
TARGETS = [b"/", b"/a/b?x=1", b"/../etc/passwd", b"/%2e%2e/x", b"/a/./b/../c", b"*",
           b"http://example.com/x?y", b"https://h:1/", b"//x", b"/a%00b", b"/\x7f",
           b"/\xb0", b"/\xc3\xa9", b"/a b", b"/a\tb", b"/a\"b", b"/<x>", b"/%zz", b"/#f",
           b"/?a[]=1", b"", b"/" + b"a" * 300]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b""]
NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect",
         b"Upgrade", b"X-Forwarded-For", b"X-Request-ID", b"Keep-Alive", b"TE", b"Trailer",
         b"Content-Type", b"Cookie", b"Proxy", b"content-length", b"Content-Length ",
         b" Transfer-Encoding", b"Transfer_Encoding", b"X"]
VALUES = [b"example.com", b"0", b"5", b"-1", b"+5", b"5, 5", b"5,6", b" 5", b"0x5",
          b"99999999999999999999", b"chunked", b"Chunked", b" chunked", b"chunked, identity",
          b"identity", b"gzip, chunked", b"\x0bchunked", b"chunked\x00", b"close",
          b"keep-alive", b"Content-Length", b"content-length, close", b"Transfer-Encoding",
          b"upgrade", b"websocket", b"100-continue", b"a\rb", b"a\nb", b""]
ENDINGS = [b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n"]


@st.composite
def chunked_body(draw) -> bytes:
    out = []
    for data in draw(st.lists(st.binary(min_size=1, max_size=40), max_size=3)):
        size = draw(st.sampled_from([b"%x" % len(data), b"%X" % len(data), b"%x" % (len(data) + 1),
                                     b"%x;ext=1" % len(data), b"-1", b"0x%x" % len(data),
                                     b" %x" % len(data), b"ffffffffffffffffff"]))
        out += [size, b"\r\n", data, draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"xx"]))]
    out.append(draw(st.sampled_from([b"0\r\n\r\n", b"0\r\n\r\n", b"0\r\nX: y\r\n\r\n",
                                     b"0\n\n", b"", b"0\r\n"])))
    return b"".join(out)


def mostly(common, rare):
    """Draws from ``common`` about four times in five, else from ``rare``."""
    return st.sampled_from(list(common) * 4 + list(rare))


GOOD_METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]
GOOD_NAMES = [b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect", b"Upgrade",
              b"X-Forwarded-For", b"X-Request-ID", b"Content-Type", b"Cookie", b"Keep-Alive"]
GOOD_VALUES = [b"0", b"5", b"chunked", b"close", b"keep-alive", b"Content-Length",
               b"upgrade", b"websocket", b"100-continue", b"text/plain"]


@st.composite
def request_bytes(draw) -> bytes:
    ending = draw(mostly([b"\r\n"] * 2, ENDINGS[8:]))
    method = draw(mostly(GOOD_METHODS, METHODS))
    target = draw(mostly([b"/", b"/a/b?x=1", b"/x/"], TARGETS))
    version = draw(mostly([b"HTTP/1.1"] * 2 + [b"HTTP/1.0"], VERSIONS))
    lines = [method + b" " + target + b" " + version]
    headers = draw(st.lists(
        st.tuples(mostly(GOOD_NAMES, NAMES), mostly([b": "], [b":", b" : ", b":\t", b"::"]),
                  mostly(GOOD_VALUES, VALUES)),
        max_size=5))
    if draw(mostly([True], [False])):
        headers.insert(draw(st.integers(0, len(headers))), (b"Host", b": ", b"example.com"))
    if draw(st.integers(0, 7)) == 0:
        headers.append((draw(st.binary(min_size=1, max_size=8)), b": ",
                        draw(st.binary(max_size=12))))
    lines += [n + s + v for n, s, v in headers]
    if draw(st.integers(0, 9)) == 0:
        lines.append(b" folded")
    head = ending.join(lines) + ending + ending
    body = draw(st.sampled_from([b"", b"hello", b"x" * 100]) | chunked_body()
                | st.binary(max_size=30))
    return head + body


def split(data: bytes, cuts) -> list:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        if p > last:
            out.append(data[last:p])
            last = p
    return out


REPLIES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close",
    b"HTTP/1.0 200 OK\r\n\r\nold",
    b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
]


@st.composite
def reply_bytes(draw) -> bytes:
    """A worker's response: a known one, or a head built from risky parts."""
    if draw(st.booleans()):
        return draw(st.sampled_from(REPLIES))
    code = draw(st.sampled_from([b"200", b"204", b"304", b"404", b"500", b"101", b"100",
                                 b"999", b"20", b"abc", b"1000"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"ICY"]))
    reason = draw(st.sampled_from([b"OK", b"", b"Weird \x01 reason"]))
    names = [b"Content-Length", b"Transfer-Encoding", b"Connection", b"Keep-Alive", b"Set-Cookie",
             b"X-Request-ID", b"Content-Type", b"Upgrade", b"X-Hop", b"Trailer", b"Location",
             b"Content-Encoding"]
    values = [b"0", b"2", b"10", b"-1", b"2, 2", b"chunked", b"gzip, chunked", b"close",
              b"X-Hop", b"keep-alive, X-Hop", b"a=b", b"text/html", b"a\rb", b"a\nb", b"",
              b"Content-Length", b"transfer-encoding"]
    headers = draw(st.lists(
        st.tuples(st.sampled_from(names) | st.binary(min_size=1, max_size=8),
                  st.sampled_from(values) | st.binary(max_size=10)),
        max_size=6))
    head = b"\r\n".join([version + b" " + code + b" " + reason]
                        + [n + b": " + v for n, v in headers])
    body = draw(st.sampled_from([b"", b"ok", b"2\r\nok\r\n0\r\n\r\n", b"x" * 50])
                | st.binary(max_size=20))
    return head + b"\r\n\r\n" + body


def check_proxy(testcase, proxy: MemoryProxy) -> None:
    """The properties every run of the proxy must have, whatever came in."""
    try:
        stream = proxy.finish()
    finally:
        proxy.close()
    if hasattr(testcase, "_observer"):
        testcase.flushLoggedErrors()
    if proxy.errors:
        raise AssertionError(f"the proxy logged an error: {proxy.errors[0]!r}")
    closing = [i for i, (start, fields, body) in enumerate(stream.messages)
               if (b"connection", b"close") in fields]
    if closing and closing[0] != len(stream.messages) - 1:
        raise AssertionError(f"responses after 'Connection: close': {stream.messages!r}")
    started = len([r for r in proxy.site.created if r.forward is not None])
    by_id: dict = {}
    for start, fields, _ in proxy.upstream_requests:
        rid = dict(fields).get(b"x-request-id")
        by_id.setdefault(rid, []).append(start.split(b" ")[0])
    if len(by_id) > started:
        raise AssertionError(f"{len(by_id)} requests reached the worker for {started} "
                             f"forwarded: {proxy.upstream_requests!r}")
    for rid, methods in by_id.items():
        # sent again only when idempotent, and only once (Forward._may_send_again)
        if len(methods) > 2 or (len(methods) == 2 and methods[0] not in IDEMPOTENT):
            raise AssertionError(f"request {rid!r} reached the worker as {methods!r}")
    if len(stream.messages) > len(proxy.site.created):
        raise AssertionError(f"{len(stream.messages)} responses to "
                             f"{len(proxy.site.created)} requests")
    inst = proxy.pool.serving[0]
    if inst.inflight != 0:
        raise AssertionError(f"{inst.inflight} requests still in flight on the instance")
    if len(proxy.front.deadlines):
        raise AssertionError("timeouts left armed after every connection closed")


class ProxyFuzzTests(unittest.TestCase):
    """Client bytes in, strictly-parsed bytes out, both sides."""

    @FUZZ
    @given(requests=st.lists(request_bytes(), min_size=1, max_size=3),
           garbage=st.binary(max_size=8), cuts=st.lists(st.integers(0, 4000), max_size=6),
           mode=st.sampled_from(["prod", "dev"]), small_limits=st.booleans())
    @example(  # a stray "200 OK" followed the 413 of a chunked body over the limit
        requests=[b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"a\r\n0123456789\r\n0\r\n\r\n"],
        garbage=b"", cuts=[], mode="prod", small_limits=True)
    def test_requests(self, requests, garbage, cuts, mode, small_limits) -> None:
        config = default_server_config()
        if small_limits:  # bodies over max_body_bytes (413) and a short read timeout (408)
            config = attrs.evolve(config, server=attrs.evolve(
                config.server, max_body_bytes=8, read_timeout_seconds=0.5))
        proxy = MemoryProxy(mode=mode, config=config)
        try:
            proxy.send(split(b"".join(requests) + garbage, cuts))
        except Violation as e:
            proxy.close()
            raise AssertionError(f"forwarded upstream: {e}") from e
        check_proxy(self, proxy)

    @FUZZ
    @given(replies=st.lists(reply_bytes(), min_size=1, max_size=3),
           methods=st.lists(st.sampled_from([b"GET", b"HEAD", b"POST"]), min_size=1, max_size=3),
           mode=st.sampled_from(["prod", "dev"]))
    def test_worker_responses(self, replies, methods, mode) -> None:
        proxy = MemoryProxy(mode=mode, replies=replies)
        data = b"".join(
            m + b" /r HTTP/1.1\r\nHost: h\r\n"
            + (b"Content-Length: 3\r\n\r\nabc" if m == b"POST" else b"\r\n")
            for m in methods)
        proxy.send([data])
        check_proxy(self, proxy)


# ---------------------------------------------------------------------------------------
# routing

SEGMENTS = st.sampled_from(["", "a", "b", "api", "v1", ".", "..", "%2e", "%2E%2e", "x y", "é"])
PATHS = st.lists(SEGMENTS, max_size=6).map(lambda parts: "/" + "/".join(parts))


def reference_match(routes, path: str):
    """Longest route that is the path or a whole-segment prefix of it; '/' else."""
    best = None
    for route in routes:
        if route == "/" or path == route or path.startswith(route + "/"):
            if best is None or len(route) > len(best):
                best = route
    return best


class RoutingFuzzTests(unittest.TestCase):

    @FUZZ
    @given(routes=st.sets(PATHS.map(normalize_route), max_size=6), path=PATHS)
    @example(routes={"/é"}, path="/é/a")
    def test_match_is_longest_segment_prefix(self, routes, path) -> None:
        # (found by this test: a non-ASCII route was matched against raw UTF-8 bytes and
        # its prefix stripped by its length in characters)
        table = RoutingTable((r, r) for r in routes)
        target = route_key(path)  # as a client sends it: percent-encoded
        hit = table.match(target)
        expected = reference_match(routes, path)
        self.assertEqual(hit[0] if hit else None, expected)
        if hit:
            rest = strip_prefix(hit[0], target)
            self.assertTrue(rest.startswith(b"/"), rest)
            if hit[0] != "/":
                self.assertEqual(route_key(hit[0]) + (b"" if rest == b"/" else rest),
                                 target.rstrip(b"/") if rest == b"/" else target)

    @FUZZ
    @given(path=PATHS | st.binary(max_size=40).map(lambda b: "/" + b.decode("latin-1")))
    def test_dot_segments_removed(self, path) -> None:
        out = remove_dot_segments(path.encode("latin-1"))
        self.assertTrue(out.startswith(b"/"), out)
        segments = out.split(b"/")[1:]
        for segment in segments:
            self.assertNotIn(segment.lower(), (b".", b"..", b"%2e", b"%2e%2e", b".%2e", b"%2e."))
        self.assertEqual(remove_dot_segments(out), out)   # idempotent


# ---------------------------------------------------------------------------------------
# config loaders: any text gives a config or a ConfigError naming the file

YAML_KEYS = st.sampled_from(["server", "workers", "port", "host", "path", "type", "scaling",
                             "min_workers", "max_workers", "php", "pool", "env", "command",
                             "timeouts", "logging", "log_file", "memory_limit", "enabled",
                             "go", "runtime", "metrics", "admin", "token", "ignore"])
YAML_SCALARS = st.sampled_from(["1", "0", "-1", "65536", "8080", "true", "null", "~", "''",
                                "\"x\"", "/api", "api", "1.5", "512MiB", "1X", "[]", "{}",
                                "[a, 1]", "go", "php", "production", "!!binary aGk=",
                                "&a 1", "*a", "? x", "|\n  text", "'unterminated"])


@st.composite
def yaml_text(draw) -> str:
    def node(depth):
        if depth > 2 or draw(st.booleans()):
            return [draw(YAML_SCALARS)]
        out = []
        for key in draw(st.lists(YAML_KEYS, max_size=4)):
            child = node(depth + 1)
            if len(child) == 1:
                out.append(f"{key}: {child[0]}")
            else:
                out.append(f"{key}:")
                out += ["  " + line for line in child]
        return out or ["{}"]
    text = "\n".join(node(0)) + "\n"
    if draw(st.integers(0, 4)) == 0:  # damage it
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.text(max_size=5)) + text[pos + draw(st.integers(0, 5)):]
    return text


class ConfigFuzzTests(unittest.TestCase):

    def setUp(self) -> None:
        fd, self.path = tempfile.mkstemp(suffix=".yaml")
        os.close(fd)
        self.addCleanup(os.unlink, self.path)

    def _load(self, loader, text: str) -> None:
        with open(self.path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        try:
            loader(self.path)
        except ConfigError as e:
            self.assertTrue(str(e).startswith(self.path), str(e))

    @FUZZ
    @given(text=yaml_text())
    @example(text="scaling: {min_workers: 2, max_workers: 1}\n")
    def test_worker_yaml(self, text) -> None:
        self._load(load_worker_config, text)

    @FUZZ
    @given(text=yaml_text())
    def test_server_yaml(self, text) -> None:
        self._load(load_server_config, text)

    @FUZZ
    @given(text=st.text(max_size=60))
    def test_any_text(self, text) -> None:
        self._load(load_worker_config, text)
        self._load(load_server_config, text)


# ---------------------------------------------------------------------------------------
# FastCGI codec and the response heads the proxy parses

class CodecFuzzTests(unittest.TestCase):

    @FUZZ
    @given(pairs=st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=300)),
                          max_size=8))
    def test_pairs_round_trip(self, pairs) -> None:
        self.assertEqual(codec.decode_pairs(codec.encode_pairs(pairs)), pairs)

    @FUZZ
    @given(data=st.binary(max_size=200))
    def test_decode_pairs_any_bytes(self, data) -> None:
        try:
            codec.decode_pairs(data)
        except codec.FastCGIError:
            pass

    @FUZZ
    @given(content=st.binary(max_size=70000), rtype=st.integers(1, 11),
           cuts=st.lists(st.integers(0, 80000), max_size=5))
    def test_records_round_trip(self, content, rtype, cuts) -> None:
        wire = b"".join(codec.encode_records(rtype, content))
        reader = codec.RecordReader()
        records = []
        for piece in split(wire, cuts):
            records += reader.feed(piece)
        self.assertEqual(b"".join(c for _, _, c in records), content)
        self.assertTrue(all(t == rtype for t, _, _ in records))
        self.assertEqual(reader.pending, 0)

    @FUZZ
    @given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=4))
    def test_record_reader_any_bytes(self, data, cuts) -> None:
        reader = codec.RecordReader()
        try:
            for piece in split(data, cuts):
                reader.feed(piece)
        except codec.FastCGIError:
            pass

    @FUZZ
    @given(pairs=st.lists(st.tuples(st.binary(min_size=1, max_size=70),
                                    st.binary(max_size=70000)), max_size=4))
    def test_params_records_hold_whole_pairs(self, pairs) -> None:
        try:
            records = codec.encode_params(pairs)
        except codec.FastCGIError:
            self.assertTrue(any(len(n) + len(v) + 8 > codec.MAX_CONTENT for n, v in pairs))
            return
        reader = codec.RecordReader()
        decoded = []
        for rtype, _, content in reader.feed(b"".join(records)):
            self.assertEqual(rtype, codec.PARAMS)
            decoded += codec.decode_pairs(content)   # each record on its own, as php-fpm
        self.assertEqual(decoded, pairs)

    @FUZZ
    @given(head=st.binary(max_size=200))
    @example(head=b"Status: 200\nLocation: /x")
    def test_cgi_head_any_bytes(self, head) -> None:
        try:
            status, _reason, headers = codec.parse_cgi_head(head)
        except codec.FastCGIError:
            return
        self.assertTrue(200 <= status <= 999)
        for name, value in headers:
            self.assertNotIn(b"\n", name + value)

    @FUZZ
    @given(data=st.binary(max_size=100))
    def test_split_head(self, data) -> None:
        found = codec.split_head(data)
        if found is not None:
            head, rest = found
            self.assertTrue(data.startswith(head))
            self.assertTrue(data.endswith(rest))

    @FUZZ
    @given(head=st.binary(max_size=200))
    def test_response_head_any_bytes(self, head) -> None:
        try:
            parsed = parse_response_head(head)
        except UpstreamError:
            return
        self.assertTrue(parsed.version.startswith(b"HTTP/1."))
        self.assertTrue(100 <= parsed.code <= 999)
