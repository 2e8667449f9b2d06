"""The proxy in front of a real php-fpm: a ProxySite on loopback with a stand-in PHP pool
(as in test_proxy) whose instance is a php-fpm started from TQServer's generated config.
Routing to scripts, CGI params as PHP sees them, static files beside scripts, bodies both
ways, chunked uploads, errors (404, 405, 413, 502, 503, 504), retries, and the FastCGI
health probe."""
from __future__ import annotations

import hashlib
import json
import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tqserver.fastcgi import forward as fastcgi_forward
from tqserver.runtimes.php import PhpRuntime
from tqserver.supervise.probe import Prober

from .php_support import PhpFpm, php_spec, require_php_fpm
from .test_proxy import (
    FakeInstance,
    FakePool,
    ProxyTestCase,
    closed_port,
    parse_response,
    pattern,
    wait_until,
)

INFO_PHP = r"""<?php
$input = file_get_contents('php://input');
$keys = ['REQUEST_METHOD', 'REQUEST_URI', 'QUERY_STRING', 'SCRIPT_NAME', 'SCRIPT_FILENAME',
         'PATH_INFO', 'PATH_TRANSLATED', 'DOCUMENT_ROOT', 'DOCUMENT_URI', 'PHP_SELF',
         'CONTENT_TYPE', 'CONTENT_LENGTH', 'REMOTE_ADDR', 'REMOTE_PORT', 'SERVER_PORT',
         'SERVER_NAME', 'SERVER_PROTOCOL', 'GATEWAY_INTERFACE', 'HTTPS', 'HTTP_HOST',
         'HTTP_PROXY', 'HTTP_X_FORWARDED_FOR', 'HTTP_X_FORWARDED_PROTO', 'HTTP_X_FORWARDED_HOST',
         'HTTP_X_FORWARDED_PREFIX', 'HTTP_X_REQUEST_ID', 'HTTP_COOKIE', 'HTTP_X_CUSTOM',
         'HTTP_CONNECTION', 'HTTP_X_SECRET_HOP'];
$server = [];
foreach ($keys as $k) { $server[$k] = $_SERVER[$k] ?? null; }
header('Content-Type: application/json');
echo json_encode(['script' => basename(__FILE__), 'server' => $server, 'get' => $_GET,
                  'post' => $_POST, 'length' => strlen($input), 'md5' => md5($input)]);
"""
FILES = {
    "index.php": INFO_PHP,
    "info.php": INFO_PHP,
    "admin/index.php": INFO_PHP,
    "cookies.php": "<?php\nheader('Content-Type: text/plain');\nsetcookie('a', '1');\nsetcookie('b', '2', ['httponly' => true]);\n"
                   "header('X-Multi: one');\nheader('X-Multi: two', false);\necho 'cookies';\n",
    "slow.php": "<?php\nusleep((int) ($_GET['ms'] ?? 100) * 1000);\necho 'slow';\n",
    "stream.php": "<?php\nheader('Content-Type: text/plain');\n"
                  "while (ob_get_level()) { ob_end_flush(); }\necho 'started... ';\n"
                  "flush();\nusleep((int) $_GET['ms'] * 1000);\n"
                  "echo 'done';\n",
    "big.php": "<?php\nheader('Content-Type: application/octet-stream');\n"
               "$n = (int) $_GET['n'];\n$block = str_repeat(hash('sha256', 'tq', true), 2048);\n"
               "while ($n > 0) { $p = substr($block, 0, min($n, strlen($block))); echo $p; "
               "$n -= strlen($p); }\n",
    "redirect.php": "<?php\nheader('Location: /blog/info.php');\n",
    "style.css": "body { color: plum }\n",
    "exit.php": "<?php\nposix_kill(getmypid(), 9);\n",
    # copies of a script an editor or a deploy leaves behind, and PHP under another name
    "index.php~": INFO_PHP,
    "index.php.bak": INFO_PHP,
    "#index.php#": INFO_PHP,
    "index.php.swp": INFO_PHP,
    "config.inc": "<?php $password = 'file_get_contents';\n",
    "notes.txt": "plain text\n",
}


class PhpProxyTestCase(ProxyTestCase):
    timeout = 120
    php_pool = {"max_workers": 6, "start_workers": 6}

    @defer.inlineCallbacks
    def setUp(self):
        require_php_fpm()
        ProxyTestCase.setUp(self)
        self.root = os.path.abspath(self.mktemp())
        self.worker_dir = os.path.join(self.root, "workers", "blog")
        self.public = os.path.join(self.worker_dir, "public")
        for name, text in FILES.items():
            path = os.path.join(self.public, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        self.fpm = PhpFpm(php_spec(self.worker_dir, **self.php_pool), self.root)
        self.addCleanup(lambda: defer.ensureDeferred(self.fpm.stop()))
        yield defer.ensureDeferred(self.fpm.start())
        self.inst = FakeInstance(self.fpm.port, "blog#1")
        self.pool = FakePool("blog", "/blog", [self.inst], public_dir=self.public,
                             worker_type="php")
        self.start_proxy(self.pool)
        self.addCleanup(self._close_fastcgi)

    def _close_fastcgi(self):
        self.fastcgi.close_all()
        return wait_until(lambda: self.fastcgi.open_count(self.fpm.port) == 0,
                          what="FastCGI connections to close")

    @defer.inlineCallbacks
    def info(self, path: str, **kw):
        response = yield self.request(kw.pop("method", "GET"), path, **kw)
        body = yield response.content()
        self.assertEqual(response.code, 200, body[:2000])
        return json.loads(body)


class RoutingTests(PhpProxyTestCase):

    @defer.inlineCallbacks
    def test_root_runs_index_php(self):
        data = yield self.info("/blog/")
        self.assertEqual(data["script"], "index.php")
        server = data["server"]
        self.assertEqual(server["SCRIPT_NAME"], "/blog/index.php")
        self.assertEqual(server["PATH_INFO"], "")
        self.assertEqual(server["DOCUMENT_ROOT"], os.path.realpath(self.public))
        data = yield self.info("/blog")
        self.assertEqual(data["script"], "index.php")

    @defer.inlineCallbacks
    def test_script_with_path_info_and_query(self):
        data = yield self.info("/blog/info.php/extra/bits?x=1&y=%20two")
        server = data["server"]
        self.assertEqual(data["script"], "info.php")
        self.assertEqual(server["SCRIPT_NAME"], "/blog/info.php")
        self.assertEqual(server["SCRIPT_FILENAME"],
                         os.path.realpath(os.path.join(self.public, "info.php")))
        self.assertEqual(server["PATH_INFO"], "/extra/bits")
        self.assertEqual(server["PATH_TRANSLATED"], os.path.realpath(self.public) + "/extra/bits")
        self.assertEqual(server["PHP_SELF"], "/blog/info.php/extra/bits")
        self.assertEqual(server["DOCUMENT_URI"], "/blog/info.php/extra/bits")
        self.assertEqual(server["REQUEST_URI"], "/blog/info.php/extra/bits?x=1&y=%20two")
        self.assertEqual(server["QUERY_STRING"], "x=1&y=%20two")
        self.assertEqual(data["get"], {"x": "1", "y": " two"})

    @defer.inlineCallbacks
    def test_front_controller(self):
        data = yield self.info("/blog/posts/7?page=2")
        self.assertEqual(data["script"], "index.php")
        self.assertEqual(data["server"]["PATH_INFO"], "/posts/7")
        self.assertEqual(data["server"]["SCRIPT_NAME"], "/blog/index.php")
        self.assertEqual(data["server"]["REQUEST_URI"], "/blog/posts/7?page=2")
        self.assertEqual(data["server"]["PHP_SELF"], "/blog/index.php/posts/7")
        self.assertEqual(data["server"]["DOCUMENT_URI"], "/blog/index.php/posts/7")
        data = yield self.info("/blog/admin/")
        self.assertEqual(data["server"]["SCRIPT_NAME"], "/blog/admin/index.php")

    @defer.inlineCallbacks
    def test_php_source_never_served_under_another_name(self):
        # public/index.php~, index.php.bak... came back as text with the PHP source.
        for path in ("/blog/index.php~", "/blog/index.php.bak", "/blog/%23index.php%23",
                     "/blog/index.php.swp", "/blog/config.inc"):
            response = yield self.request("GET", path)
            body = yield response.content()
            self.assertNotIn(b"file_get_contents", body, path)
        response = yield self.request("GET", "/blog/notes.txt")
        self.assertEqual((yield response.content()), b"plain text\n")

    @defer.inlineCallbacks
    def test_connection_cannot_name_host_or_the_length(self):
        # HTTP_HOST was dropped when Connection named it.
        raw = yield self.raw(b"POST /blog/info.php HTTP/1.1\r\nHost: shop.example\r\n"
                             b"Content-Length: 3\r\nContent-Type: text/plain\r\n"
                             b"Connection: close, Host, Content-Length\r\n\r\nabc")
        code, headers, body = parse_response(raw)
        self.assertEqual(code, 200, body)
        data = json.loads(body)
        self.assertEqual(data["server"]["HTTP_HOST"], "shop.example")
        self.assertEqual((data["server"]["CONTENT_LENGTH"], data["length"]), ("3", 3))

    @defer.inlineCallbacks
    def test_request_environment(self):
        raw = yield self.raw(b"GET /blog/info.php HTTP/1.1\r\nHost: shop.example:8080\r\n"
                             b"Proxy: http://evil.example:3128\r\nX-Custom: yes\r\n"
                             b"X-Forwarded-For: 6.6.6.6\r\nCookie: a=1\r\nCookie: b=2\r\n"
                             b"X-Request-ID: rid-42\r\nX-Secret-Hop: 1\r\n"
                             b"Connection: close, X-Secret-Hop\r\n\r\n")
        code, headers, body = parse_response(raw)
        self.assertEqual(code, 200, body)
        server = json.loads(body)["server"]
        self.assertIsNone(server["HTTP_PROXY"])                          # httpoxy
        self.assertIsNone(server["HTTP_CONNECTION"])                     # hop-by-hop
        self.assertIsNone(server["HTTP_X_SECRET_HOP"])                   # named in Connection
        self.assertEqual(server["HTTP_HOST"], "shop.example:8080")
        self.assertEqual(server["SERVER_NAME"], "shop.example")
        self.assertEqual(server["SERVER_PORT"], str(self.proxy_port))
        self.assertEqual(server["SERVER_PROTOCOL"], "HTTP/1.1")
        self.assertEqual(server["GATEWAY_INTERFACE"], "CGI/1.1")
        self.assertEqual(server["REMOTE_ADDR"], "127.0.0.1")
        self.assertTrue(server["REMOTE_PORT"].isdigit())
        self.assertIsNone(server["HTTPS"])
        self.assertEqual(server["HTTP_X_CUSTOM"], "yes")
        self.assertEqual(server["HTTP_X_FORWARDED_FOR"], "127.0.0.1")    # not the client's
        self.assertEqual(server["HTTP_X_FORWARDED_PROTO"], "http")
        self.assertEqual(server["HTTP_X_FORWARDED_HOST"], "shop.example:8080")
        # The prefix is in REQUEST_URI and SCRIPT_NAME already, as nginx gives it; apps
        # that honour X-Forwarded-Prefix would double it (cookie path /blog/blog/).
        self.assertIsNone(server["HTTP_X_FORWARDED_PREFIX"])
        self.assertEqual(server["HTTP_X_REQUEST_ID"], "rid-42")
        self.assertEqual(server["HTTP_COOKIE"], "a=1; b=2")
        self.assertEqual(headers[b"x-request-id"], [b"rid-42"])
        self.assertEqual(headers[b"x-tqserver-worker-type"], [b"php"])
        self.assertEqual(headers[b"x-tqserver-worker-port"], [str(self.fpm.port).encode()])

    @defer.inlineCallbacks
    def test_static_files_beside_scripts(self):
        response = yield self.get("/blog/style.css")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.content()), b"body { color: plum }\n")
        self.assertIsNone(response.headers.getRawHeaders("x-tqserver-worker-type"))  # proxy's own
        for path in ("/blog/info.php", "/blog/index.php", "/blog/admin/index.php"):
            response = yield self.get(path)
            body = yield response.content()
            self.assertNotIn(b"<?php", body, path)
            self.assertEqual(json.loads(body)["server"]["SCRIPT_NAME"], path)
        response = yield self.request("POST", "/blog/style.css", data=b"x")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, HEAD"])
        yield response.content()

    @defer.inlineCallbacks
    def test_cookies_and_repeated_headers(self):
        response = yield self.get("/blog/cookies.php")
        self.assertEqual((yield response.content()), b"cookies")
        cookies = response.headers.getRawHeaders("set-cookie")
        self.assertEqual([c.split(";")[0] for c in cookies], ["a=1", "b=2"])
        self.assertIn("HttpOnly", cookies[1])
        self.assertEqual(response.headers.getRawHeaders("x-multi"), ["one", "two"])

    @defer.inlineCallbacks
    def test_redirect_and_head(self):
        response = yield self.get("/blog/redirect.php", allow_redirects=False)
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/blog/info.php"])
        yield response.content()
        raw = yield self.raw(b"HEAD /blog/info.php HTTP/1.1\r\nHost: h\r\n"
                             b"Connection: close\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertEqual(body, b"")

    @defer.inlineCallbacks
    def test_no_index_php(self):
        os.unlink(os.path.join(self.public, "index.php"))
        response = yield self.get("/blog/anything")
        self.assertEqual(response.code, 404)
        self.assertIn(b"no PHP script", (yield response.content()))
        response = yield self.get("/blog/info.php")
        self.assertEqual(response.code, 200)
        yield response.content()


class BodyTests(PhpProxyTestCase):

    @defer.inlineCallbacks
    def test_form_post(self):
        data = yield self.info("/blog/info.php", method="POST", data={"name": "Ada", "msg": "hi"})
        self.assertEqual(data["post"], {"name": "Ada", "msg": "hi"})
        self.assertEqual(data["server"]["CONTENT_TYPE"], "application/x-www-form-urlencoded")

    @defer.inlineCallbacks
    def test_large_upload_streams_through(self):
        body = pattern(3 * 1024 * 1024 + 17)
        data = yield self.info("/blog/info.php", method="PUT", data=body,
                               headers={"Content-Type": "application/octet-stream"})
        self.assertEqual((data["length"], data["md5"]),
                         (len(body), hashlib.md5(body).hexdigest()))
        self.assertEqual(data["server"]["CONTENT_LENGTH"], str(len(body)))

    @defer.inlineCallbacks
    def test_large_download_streams_through(self):
        n = 2 * 1024 * 1024 + 5
        response = yield self.get(f"/blog/big.php?n={n}")
        body = yield response.content()
        self.assertEqual((response.code, len(body)), (200, n))
        self.assertEqual(body, pattern(n))

    @defer.inlineCallbacks
    def test_chunked_upload_is_buffered_and_sent_with_its_length(self):
        body = pattern(300000)
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 70000]), body[i:i + 70000])
                          for i in range(0, len(body), 70000))
        raw = yield self.raw(b"POST /blog/info.php HTTP/1.1\r\nHost: h\r\n"
                             b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                             + chunks + b"0\r\n\r\n")
        code, _, payload = parse_response(raw)
        data = json.loads(payload)
        self.assertEqual(code, 200)
        self.assertEqual((data["length"], data["md5"]),
                         (len(body), hashlib.md5(body).hexdigest()))
        self.assertEqual(data["server"]["CONTENT_LENGTH"], str(len(body)))
        self.assertNotIn("HTTP_TRANSFER_ENCODING", data["server"])

    @defer.inlineCallbacks
    def test_chunked_upload_over_the_buffer_limit_is_413(self):
        self.patch(fastcgi_forward, "MAX_BUFFERED_BODY", 1000)
        raw = yield self.raw(b"POST /blog/info.php HTTP/1.1\r\nHost: h\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n"
                             b"3e8\r\n" + b"x" * 1000 + b"\r\n5\r\nhello\r\n0\r\n\r\n")
        self.assertEqual(parse_response(raw)[0], 413)
        self.assertEqual(self.fastcgi.open_count(self.fpm.port), 0)

    @defer.inlineCallbacks
    def test_keep_alive_client_many_requests_few_connections(self):
        for i in range(20):
            data = yield self.info(f"/blog/info.php?i={i}")
            self.assertEqual(data["get"], {"i": str(i)})
        self.assertLessEqual(self.fastcgi.open_count(self.fpm.port), 2)
        self.assertEqual(self.inst.inflight, 0)


class ErrorTests(PhpProxyTestCase):

    @defer.inlineCallbacks
    def test_write_timeout_is_504(self):
        self.server_config(write_timeout_seconds=0.3)
        self.state.config = self.config
        response = yield self.get("/blog/slow.php?ms=3000")
        self.assertEqual(response.code, 504)
        yield response.content()
        self.assertEqual(self.inst.inflight, 0)
        data = yield self.info("/blog/info.php")      # the pool still works
        self.assertEqual(data["script"], "info.php")

    @defer.inlineCallbacks
    def test_waiting_for_a_busy_pool_is_bounded_by_the_write_timeout(self):
        """Every connection the proxy may hold (max_workers - 1 = 4) is busy: the fifth
        request waits for one, up to the write timeout (504); the busy four complete."""
        self.server_config(write_timeout_seconds=1.0)
        self.state.config = self.config
        slow = [self.get("/blog/stream.php?ms=2500") for _ in range(4)]
        yield wait_until(lambda: self.fastcgi.open_count(self.fpm.port) == 4,
                         what="four connections in use")
        started = reactor.seconds()
        response = yield self.get("/blog/info.php")
        self.assertEqual(response.code, 504)
        self.assertIn(b"stayed busy", (yield response.content()))
        self.assertLess(reactor.seconds() - started, 2.0)
        self.assertEqual(self.fastcgi.open_count(self.fpm.port), 4)
        for d in slow:
            response = yield d
            self.assertEqual((yield response.content()), b"started... done")
        self.assertEqual(self.inst.inflight, 0)

    @defer.inlineCallbacks
    def test_child_dying_mid_request_is_502(self):
        response = yield self.get("/blog/exit.php")
        self.assertEqual(response.code, 502)
        yield response.content()
        data = yield self.info("/blog/info.php")
        self.assertEqual(data["script"], "info.php")

    @defer.inlineCallbacks
    def test_refused_instance_is_retried_on_another(self):
        dead = FakeInstance(closed_port(), "blog#0")
        self.pool.serving = (dead, self.inst)
        for _ in range(4):
            data = yield self.info("/blog/info.php")
            self.assertEqual(data["script"], "info.php")
        self.assertEqual((dead.inflight, self.inst.inflight), (0, 0))

    @defer.inlineCallbacks
    def test_no_instance_is_503(self):
        self.pool.serving = ()
        response = yield self.get("/blog/info.php")
        self.assertEqual(response.code, 503)
        self.assertTrue(response.headers.getRawHeaders("retry-after"))
        yield response.content()

    @defer.inlineCallbacks
    def test_client_gone_aborts_the_fastcgi_request(self):
        client = yield self.connect()
        client.transport.write(b"GET /blog/slow.php?ms=2000 HTTP/1.1\r\nHost: h\r\n\r\n")
        yield wait_until(lambda: self.fastcgi.open_count(self.fpm.port) == 1,
                         what="the FastCGI request to start")
        client.transport.abortConnection()
        yield wait_until(lambda: self.fastcgi.open_count(self.fpm.port) == 0,
                         what="the FastCGI connection to be dropped")
        self.assertEqual(self.inst.inflight, 0)


class RecycledChildrenTests(PhpProxyTestCase):
    """php-fpm children exit after 3 requests (pm.max_requests), closing the connections
    they were kept on: no request may fail for it, with a body or without."""

    php_pool = {"manager": "static", "max_workers": 4, "max_requests": 3}

    @defer.inlineCallbacks
    def test_no_request_fails(self):
        body = pattern(30000)

        @defer.inlineCallbacks
        def client(i):
            for n in range(12):
                if n % 2:
                    data = yield self.info(f"/blog/info.php?i={i}", method="POST", data=body)
                    self.assertEqual(data["md5"], hashlib.md5(body).hexdigest())
                else:
                    data = yield self.info(f"/blog/info.php?i={i}")
                    self.assertEqual(data["get"], {"i": str(i)})
        yield defer.gatherResults([client(i) for i in range(6)])
        self.assertEqual(self.inst.inflight, 0)


class FastCGIProbeTests(unittest.TestCase):
    """health.Prober with the PHP runtime's probe: php-fpm's ping, never PHP code."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        require_php_fpm()
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "w", "public"))
        self.fpm = PhpFpm(php_spec(os.path.join(root, "w")), root)
        self.addCleanup(lambda: defer.ensureDeferred(self.fpm.stop()))
        yield defer.ensureDeferred(self.fpm.start())
        self.prober = Prober(reactor)
        self.addCleanup(self.prober.close)

    def target(self, port):
        inst = FakeInstance(port, "t#1")
        inst.probe = PhpRuntime.probe
        return inst

    @defer.inlineCallbacks
    def test_ping_answers_pong(self):
        self.assertTrue((yield self.prober(self.target(self.fpm.port), "/health", 2.0)))

    @defer.inlineCallbacks
    def test_refused_is_unhealthy(self):
        self.assertFalse((yield self.prober(self.target(closed_port()), "/health", 2.0)))

    @defer.inlineCallbacks
    def test_wrong_answer_is_unhealthy(self):
        inst = self.target(self.fpm.port)
        inst.probe = PhpRuntime.probe.__class__("fastcgi", "/fpm-ping", b"something else")
        self.assertFalse((yield self.prober(inst, "/health", 2.0)))

    @defer.inlineCallbacks
    def test_stopped_pool_is_unhealthy(self):
        yield defer.ensureDeferred(self.fpm.stop())
        self.assertFalse((yield self.prober(self.target(self.fpm.port), "/health", 2.0)))
