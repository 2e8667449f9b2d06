"""Tests for tqserver.static: path resolution safety and HTTP file semantics."""
from __future__ import annotations

import hashlib
import os

import treq
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers

from tqserver.config.server import DEFAULT_STATIC_DENY
from tqserver.proxy import static
from tqserver.proxy.static import resolve_public_file, serve_file

MTIME = 1700000000  # 2023-11-14 22:13:20 GMT, fixed so date headers are predictable


def _write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, (MTIME, MTIME))
    return path


class ResolveTests(unittest.TestCase):
    """resolve_public_file must find real files and never escape public/."""

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.public = os.path.join(base, "public")
        self.real_public = os.path.realpath(self.public)
        _write(os.path.join(self.public, "site.css"), b"body{}")
        _write(os.path.join(self.public, "css", "deep", "a.css"), b"a{}")
        _write(os.path.join(self.public, "docs", "index.html"), b"<p>docs</p>")
        os.makedirs(os.path.join(self.public, "empty"))
        _write(os.path.join(self.public, ".env"), b"SECRET=1")
        _write(os.path.join(self.public, ".git", "config"), b"[core]")
        _write(os.path.join(self.public, "a b.txt"), b"space")
        _write(os.path.join(base, "secret.txt"), b"outside")
        _write(os.path.join(self.public, "%2e%2e", "secret.txt"), b"decoy")

    def expect(self, subpath: str, *rel: str) -> None:
        self.assertEqual(
            resolve_public_file(self.public, subpath),
            os.path.join(self.real_public, *rel),
        )

    def test_plain_file(self) -> None:
        self.expect("/site.css", "site.css")

    def test_bytes_path(self) -> None:
        """twisted.web hands out request.path as bytes."""
        self.expect(b"/site.css", "site.css")

    def test_nested_file(self) -> None:
        self.expect("/css/deep/a.css", "css", "deep", "a.css")

    def test_percent_encoded_name(self) -> None:
        self.expect("/a%20b.txt", "a b.txt")

    def test_directory_index(self) -> None:
        self.expect("/docs/", "docs", "index.html")

    def test_directory_without_slash(self) -> None:
        self.assertIsNone(resolve_public_file(self.public, "/docs"))

    def test_directory_without_index(self) -> None:
        self.assertIsNone(resolve_public_file(self.public, "/empty/"))

    def test_root_without_index(self) -> None:
        self.assertIsNone(resolve_public_file(self.public, "/"))
        self.assertIsNone(resolve_public_file(self.public, ""))

    def test_missing(self) -> None:
        self.assertIsNone(resolve_public_file(self.public, "/nope.css"))

    def test_file_with_trailing_slash(self) -> None:
        self.assertIsNone(resolve_public_file(self.public, "/site.css/"))

    def test_dotdot(self) -> None:
        for p in ("/../secret.txt", "/css/../../secret.txt", "/css/../site.css", "/./site.css"):
            self.assertIsNone(resolve_public_file(self.public, p), p)

    def test_encoded_dotdot(self) -> None:
        for p in ("/%2e%2e/secret.txt", "/%2E%2E%2Fsecret.txt", "/css/%2e%2e%2f%2e%2e%2fsecret.txt"):
            self.assertIsNone(resolve_public_file(self.public, p), p)

    def test_double_encoding_decoded_once(self) -> None:
        """%252e%252e is the literal name "%2e%2e": a plain directory, no escape."""
        self.assertIsNone(resolve_public_file(self.public, "/%252e%252e/%252e%252e/secret.txt"))
        self.expect("/%252e%252e/secret.txt", "%2e%2e", "secret.txt")

    def test_backslash(self) -> None:
        for p in ("/..\\secret.txt", "/css\\deep\\a.css", "/%5c..%5csecret.txt"):
            self.assertIsNone(resolve_public_file(self.public, p), p)

    def test_nul(self) -> None:
        self.assertIsNone(resolve_public_file(self.public, "/site.css%00.txt"))
        self.assertIsNone(resolve_public_file(self.public, "/site.css\x00"))

    def test_symlink_out_of_public(self) -> None:
        os.symlink(os.path.join(self.public, "..", "secret.txt"), os.path.join(self.public, "out.txt"))
        os.symlink(os.path.join(self.public, ".."), os.path.join(self.public, "up"))
        self.assertIsNone(resolve_public_file(self.public, "/out.txt"))
        self.assertIsNone(resolve_public_file(self.public, "/up/secret.txt"))

    def test_symlink_inside_public(self) -> None:
        os.symlink("css/deep/a.css", os.path.join(self.public, "link.css"))
        os.symlink("css", os.path.join(self.public, "styles"))
        self.expect("/link.css", "css", "deep", "a.css")
        self.expect("/styles/deep/a.css", "css", "deep", "a.css")

    def test_symlink_to_hidden(self) -> None:
        os.symlink(".git/config", os.path.join(self.public, "cfg"))
        self.assertIsNone(resolve_public_file(self.public, "/cfg"))

    def test_public_dir_itself_a_symlink(self) -> None:
        """Containment compares real paths on both sides."""
        alias = os.path.abspath(self.mktemp())
        os.symlink(self.public, alias)
        self.assertEqual(
            resolve_public_file(alias, "/site.css"), os.path.join(self.real_public, "site.css")
        )

    def test_php_never_served(self) -> None:
        for name in ("index.php", "A.PHP", "x.Php", "x.phps", "x.phtml", "x.php7", "x.PHAR"):
            _write(os.path.join(self.public, name), b"<?php echo 1;")
            self.assertIsNone(resolve_public_file(self.public, "/" + name), name)
        self.assertIsNone(resolve_public_file(self.public, "/index%2ephp"))

    def test_php_index_not_served_as_directory_index(self) -> None:
        os.symlink("index.php", os.path.join(self.public, "docs", "alias.txt"))
        _write(os.path.join(self.public, "docs", "index.php"), b"<?php")
        self.assertIsNone(resolve_public_file(self.public, "/docs/alias.txt"))

    def test_copies_of_php_never_served(self) -> None:
        # index.php~, index.php.bak... came back as text with the PHP source.
        for name in ("index.php~", "index.php.bak", "index.PHP.orig", "#index.php#",
                     "index.php.1", "index.php_old", "index.php.swp", "x.phtml.save"):
            _write(os.path.join(self.public, name), b"<?php echo 1;")
            self.assertIsNone(resolve_public_file(self.public, "/" + name), name)
        _write(os.path.join(self.public, "phpinfo.txt"), b"about php")
        self.assertIsNotNone(resolve_public_file(self.public, "/phpinfo.txt"))

    def test_deny_list(self) -> None:
        deny = DEFAULT_STATIC_DENY
        for name in ("notes.txt~", "#draft.md#", "page.html.swp", "a.swo", "db.sql.bak",
                     "site.css.orig", "x.rej", "y.old", "z.save", "w.tmp", "k.kate-swp"):
            _write(os.path.join(self.public, name), b"backup")
            self.assertIsNotNone(resolve_public_file(self.public, "/" + name), name)
            self.assertIsNone(resolve_public_file(self.public, "/" + name, deny), name)
        self.assertIsNone(resolve_public_file(self.public, "/%23draft.md%23", deny))
        self.assertIsNotNone(resolve_public_file(self.public, "/site.css", deny))
        # through a symlink whose target is a backup
        os.symlink("notes.txt~", os.path.join(self.public, "notes.txt"))
        self.assertIsNone(resolve_public_file(self.public, "/notes.txt", deny))
        # a configured list replaces the default one
        self.assertIsNone(resolve_public_file(self.public, "/site.css", ("*.css",)))
        self.assertIsNotNone(resolve_public_file(self.public, "/y.old", ("*.css",)))

    def test_php_source_under_any_name_in_a_php_worker(self) -> None:
        for name, text in (("config.inc", b"<?php $db = 'secret';"),
                           ("lib.txt", b"notes\n<?PHP echo 1;"), ("tpl.html", b"<p><?= $x ?>")):
            _write(os.path.join(self.public, name), text)
            self.assertIsNotNone(resolve_public_file(self.public, "/" + name), name)  # not PHP
            self.assertIsNone(resolve_public_file(self.public, "/" + name, php=True), name)
        _write(os.path.join(self.public, "logo.svg"), b"<?xml version='1.0'?><svg/>")
        self.assertIsNotNone(resolve_public_file(self.public, "/logo.svg", php=True))
        self.assertIsNotNone(resolve_public_file(self.public, "/site.css", php=True))
        # an edit that adds a tag is seen (the answer is kept per version of the file)
        path = os.path.join(self.public, "later.txt")
        _write(path, b"plain")
        self.assertIsNotNone(resolve_public_file(self.public, "/later.txt", php=True))
        _write(path, b"<?php now")
        os.utime(path, ns=(1, 2_000_000_000_000))
        self.assertIsNone(resolve_public_file(self.public, "/later.txt", php=True))

    def test_hidden(self) -> None:
        for p in ("/.env", "/.git/config", "/%2eenv", "/css/.hidden"):
            self.assertIsNone(resolve_public_file(self.public, p), p)

    def test_non_regular_file(self) -> None:
        os.mkfifo(os.path.join(self.public, "pipe"))
        self.assertIsNone(resolve_public_file(self.public, "/pipe"))


class _Files(resource.Resource):
    """What the proxy does: resolve, then serve or 404."""

    isLeaf = True

    def __init__(self, public: str) -> None:
        super().__init__()
        self.public = public

    def render(self, request: server.Request) -> bytes:
        path = resolve_public_file(self.public, request.path)
        if path is None:
            request.setResponseCode(404)
            return b"no"
        serve_file(request, path)
        return server.NOT_DONE_YET


class _TrackingSite(server.Site):
    """Records a Deferred per server connection that fires once it is closed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.closed = []

    def buildProtocol(self, addr):
        proto = super().buildProtocol(addr)
        done = defer.Deferred()
        self.closed.append(done)
        lost = proto.connectionLost

        def connectionLost(reason):
            lost(reason)
            done.callback(None)

        proto.connectionLost = connectionLost
        return proto


class _FirstChunkThenAbort(protocol.Protocol):
    """Body receiver that hangs up after the first chunk, like a cancelled download."""

    def __init__(self) -> None:
        self.done = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        self.done.callback(None)


class ServeTests(unittest.TestCase):
    """serve_file over a real loopback server and client."""

    def setUp(self) -> None:
        self.public = os.path.abspath(self.mktemp())
        self.body = b"hello, static world\n" * 50  # 1000 bytes
        self.path = _write(os.path.join(self.public, "hello.txt"), self.body)
        _write(os.path.join(self.public, "app.js"), b"console.log(1)")
        _write(os.path.join(self.public, "empty.bin"), b"")
        self.site = _TrackingSite(_Files(self.public))
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.base = "http://127.0.0.1:%d" % self.port.getHost().port
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self._cleanup)

    @defer.inlineCallbacks
    def _cleanup(self):
        yield self.pool.closeCachedConnections()
        yield self.port.stopListening()
        yield defer.gatherResults(self.site.closed)

    @defer.inlineCallbacks
    def get(self, path: str, method: str = "GET", **headers: str):
        hdrs = Headers({k.replace("_", "-"): [v] for k, v in headers.items()})
        resp = yield treq.request(method, self.base + path, headers=hdrs, pool=self.pool)
        body = yield treq.content(resp)
        return resp, body

    def header(self, resp, name: str):
        values = resp.headers.getRawHeaders(name)
        return values[0] if values else None

    @defer.inlineCallbacks
    def test_full_get(self):
        resp, body = yield self.get("/hello.txt")
        self.assertEqual(resp.code, 200)
        self.assertEqual(body, self.body)
        self.assertEqual(self.header(resp, "Content-Type"), "text/plain; charset=utf-8")
        self.assertEqual(resp.length, 1000)  # the client's view of Content-Length
        self.assertEqual(self.header(resp, "Last-Modified"), "Tue, 14 Nov 2023 22:13:20 GMT")
        self.assertEqual(self.header(resp, "Accept-Ranges"), "bytes")
        self.assertEqual(self.header(resp, "Cache-Control"), "no-cache")
        st = os.stat(self.path)
        self.assertEqual(
            self.header(resp, "ETag"), '"%x-%x-%x"' % (st.st_mtime_ns, 1000, st.st_ino)
        )

    @defer.inlineCallbacks
    def test_javascript_charset(self):
        resp, body = yield self.get("/app.js")
        self.assertEqual(self.header(resp, "Content-Type"), "text/javascript; charset=utf-8")

    @defer.inlineCallbacks
    def test_empty_file(self):
        resp, body = yield self.get("/empty.bin", Range="bytes=0-")
        self.assertEqual((resp.code, body), (200, b""))
        self.assertEqual(resp.length, 0)

    @defer.inlineCallbacks
    def test_not_found(self):
        resp, body = yield self.get("/%2e%2e/x")
        self.assertEqual(resp.code, 404)

    @defer.inlineCallbacks
    def test_head(self):
        resp, body = yield self.get("/hello.txt", method="HEAD")
        self.assertEqual((resp.code, body), (200, b""))
        self.assertEqual(self.header(resp, "Content-Length"), "1000")
        self.assertIsNotNone(self.header(resp, "ETag"))

    @defer.inlineCallbacks
    def test_if_none_match(self):
        first, _ = yield self.get("/hello.txt")
        etag = self.header(first, "ETag")
        for value in (etag, "W/" + etag, '"nope", ' + etag, "*"):
            resp, body = yield self.get("/hello.txt", If_None_Match=value)
            self.assertEqual((resp.code, body), (304, b""), value)
            self.assertEqual(self.header(resp, "ETag"), etag)
            self.assertIsNotNone(self.header(resp, "Last-Modified"))

    @defer.inlineCallbacks
    def test_if_none_match_mismatch_ignores_date(self):
        resp, body = yield self.get(
            "/hello.txt", If_None_Match='"old"', If_Modified_Since="Tue, 14 Nov 2023 22:13:20 GMT"
        )
        self.assertEqual((resp.code, body), (200, self.body))

    @defer.inlineCallbacks
    def test_if_modified_since(self):
        resp, body = yield self.get("/hello.txt", If_Modified_Since="Tue, 14 Nov 2023 22:13:20 GMT")
        self.assertEqual((resp.code, body), (304, b""))
        resp, body = yield self.get("/hello.txt", If_Modified_Since="Tue, 14 Nov 2023 22:13:19 GMT")
        self.assertEqual((resp.code, body), (200, self.body))
        resp, body = yield self.get("/hello.txt", If_Modified_Since="not a date")
        self.assertEqual(resp.code, 200)

    @defer.inlineCallbacks
    def test_failed_preconditions(self):
        resp, body = yield self.get("/hello.txt", If_Match='"other"')
        self.assertEqual(resp.code, 412)
        resp, body = yield self.get(
            "/hello.txt", If_Unmodified_Since="Tue, 14 Nov 2023 22:13:19 GMT"
        )
        self.assertEqual(resp.code, 412)

    @defer.inlineCallbacks
    def test_range_forms(self):
        for spec, first, last in (("0-9", 0, 9), ("990-", 990, 999), ("-5", 995, 999),
                                  ("995-5000", 995, 999), ("-5000", 0, 999)):
            resp, body = yield self.get("/hello.txt", Range="bytes=" + spec)
            self.assertEqual(resp.code, 206, spec)
            self.assertEqual(body, self.body[first:last + 1], spec)
            self.assertEqual(self.header(resp, "Content-Range"), "bytes %d-%d/1000" % (first, last))
            self.assertEqual(resp.length, last - first + 1)

    @defer.inlineCallbacks
    def test_range_head(self):
        resp, body = yield self.get("/hello.txt", method="HEAD", Range="bytes=10-19")
        self.assertEqual((resp.code, body), (206, b""))
        self.assertEqual(self.header(resp, "Content-Length"), "10")

    @defer.inlineCallbacks
    def test_range_unsatisfiable(self):
        for spec in ("1000-", "5000-6000", "-0"):
            resp, body = yield self.get("/hello.txt", Range="bytes=" + spec)
            self.assertEqual(resp.code, 416, spec)
            self.assertEqual(self.header(resp, "Content-Range"), "bytes */1000")
            self.assertEqual(body, b"")

    @defer.inlineCallbacks
    def test_range_ignored(self):
        """Several ranges, other units and malformed specs get the whole file."""
        for value in ("bytes=0-1,5-6", "items=0-1", "bytes=abc", "bytes=9-3", "bytes=-"):
            resp, body = yield self.get("/hello.txt", Range=value)
            self.assertEqual((resp.code, body), (200, self.body), value)

    @defer.inlineCallbacks
    def test_if_range(self):
        first, _ = yield self.get("/hello.txt")
        etag = self.header(first, "ETag")
        resp, body = yield self.get("/hello.txt", Range="bytes=0-4", If_Range=etag)
        self.assertEqual((resp.code, body), (206, self.body[:5]))
        resp, body = yield self.get(
            "/hello.txt", Range="bytes=0-4", If_Range="Tue, 14 Nov 2023 22:13:20 GMT"
        )
        self.assertEqual((resp.code, body), (206, self.body[:5]))
        for stale in ('"stale"', "W/" + etag, "Tue, 14 Nov 2023 22:13:19 GMT", "junk"):
            resp, body = yield self.get("/hello.txt", Range="bytes=0-4", If_Range=stale)
            self.assertEqual((resp.code, body), (200, self.body), stale)

    @defer.inlineCallbacks
    def test_large_file_streamed_intact(self):
        data = os.urandom(5 * 1024 * 1024 + 3)
        _write(os.path.join(self.public, "big.bin"), data)
        resp, body = yield self.get("/big.bin")
        self.assertEqual(resp.code, 200)
        self.assertEqual(self.header(resp, "Content-Type"), "application/octet-stream")
        self.assertEqual(len(body), len(data))
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(data).digest())
        resp, body = yield self.get("/big.bin", Range="bytes=1000000-3999999")
        self.assertEqual(body, data[1000000:4000000])

    @defer.inlineCallbacks
    def test_file_truncated_while_streaming(self):
        """The promised length can't be met: the client must see an error, not hang."""
        path = self.path

        class Truncating(static._FileProducer):
            def resumeProducing(self):
                super().resumeProducing()
                with open(path, "r+b") as f:
                    f.truncate(100)

        self.patch(static, "_FileProducer", Truncating)
        self.patch(static, "_CHUNK", 64)
        yield self.assertFailure(self.get("/hello.txt"), ResponseFailed)

    @defer.inlineCallbacks
    def test_client_disconnect_closes_file(self):
        producers = []

        class Recording(static._FileProducer):
            def __init__(self, *args):
                super().__init__(*args)
                producers.append(self)

        self.patch(static, "_FileProducer", Recording)
        big = os.path.join(self.public, "huge.bin")
        with open(big, "wb") as f:
            f.truncate(256 * 1024 * 1024)  # sparse: far more than socket buffers hold
        resp = yield treq.get(self.base + "/huge.bin", pool=self.pool)
        receiver = _FirstChunkThenAbort()
        resp.deliverBody(receiver)
        yield receiver.done
        yield defer.gatherResults(self.site.closed)
        self.assertEqual(len(producers), 1)
        self.assertIsNone(producers[0]._fd)
        self.assertGreater(producers[0]._remaining, 0)
