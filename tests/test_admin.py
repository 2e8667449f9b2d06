"""The control plane's listener, in units: who the admin listener lets in (Access), where
admin.listen puts a Unix socket, the config checks of admin.*, and what the public port
answers (Reserved: 404 for /_tqserver and /metrics, a prod /health without detail)."""
from __future__ import annotations

import os
from types import SimpleNamespace

from twisted.trial import unittest
from twisted.web.http_headers import Headers

from tqserver.config.errors import ConfigError
from tqserver.config.server import default_server_config, load_server_config, read_admin_token
from tqserver.control.admin import Access, endpoint_description, socket_path
from tqserver.control.reserved import Reserved

TOKEN = "t0ken"


def request(method=b"GET", path=b"/_tqserver/api/status", **headers):
    r = SimpleNamespace(method=method, path=path, requestHeaders=Headers())
    for name, value in headers.items():
        r.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
    return r


class AccessTests(unittest.TestCase):
    def test_socket_reads_from_loopback_names_only(self) -> None:
        access = Access("unix:run/a.sock", lambda: "")
        self.assertIsNone(access.refusal(request(host="localhost")))
        self.assertIsNone(access.refusal(request(host="127.0.0.1:9180")))
        self.assertIsNone(access.refusal(request(host="[::1]:8000")))
        self.assertIn("Host", access.refusal(request(host="evil.example:9180")))

    def test_posts_refused_cross_site(self) -> None:
        access = Access("tcp:9180:interface=127.0.0.1", lambda: "")
        post = b"POST"
        self.assertIsNone(access.refusal(request(post, host="127.0.0.1:9180")))  # the CLI
        self.assertIsNone(access.refusal(request(
            post, host="127.0.0.1:9180", origin="http://127.0.0.1:9180",
            sec_fetch_site="same-origin")))
        for headers in ({"origin": "http://evil.example"},
                        {"origin": "http://127.0.0.1:9999"},     # another port: another site
                        {"origin": "null"},
                        {"sec_fetch_site": "cross-site"},
                        {"sec_fetch_site": "same-site"}):
            why = access.refusal(request(post, host="127.0.0.1:9180", **headers))
            self.assertIsNotNone(why, headers)
        # a GET (the page, a stream) is not cross-site checked: it changes nothing
        self.assertIsNone(access.refusal(request(host="127.0.0.1:9180",
                                                 sec_fetch_site="cross-site")))

    def test_token_opens_everything_and_is_needed_off_loopback(self) -> None:
        access = Access("tcp:9180:interface=10.0.0.5", lambda: TOKEN)
        self.assertIsNotNone(access.refusal(request(host="10.0.0.5:9180")))
        self.assertIsNotNone(access.refusal(request(host="10.0.0.5:9180",
                                                    authorization="Bearer nope")))
        self.assertIsNone(access.refusal(request(b"POST", host="x", origin="http://evil",
                                                 authorization=f"Bearer {TOKEN}")))

    def test_unix_socket_description(self) -> None:
        d = endpoint_description("unix:run/tqserver-admin.sock", "/srv/app")
        self.assertEqual(d, "unix:/srv/app/run/tqserver-admin.sock:mode=600:lockfile=1")
        self.assertEqual(socket_path(d), "/srv/app/run/tqserver-admin.sock")
        d = endpoint_description("unix:/run/x.sock:mode=660", "/srv/app")
        self.assertEqual(d, "unix:/run/x.sock:mode=660:lockfile=1")
        self.assertEqual(endpoint_description("tcp:9180", "/srv"), "tcp:9180")


class AdminConfigTests(unittest.TestCase):
    def load(self, text: str):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path, load_server_config

    def test_default_is_the_socket_under_the_root(self) -> None:
        admin = default_server_config().admin
        self.assertEqual((admin.listen, admin.public), ("unix:run/tqserver-admin.sock", False))

    def test_all_interfaces_without_a_token_refused_where_written(self) -> None:
        for listen in ("tcp:9180", "tcp:9180:interface=0.0.0.0", "tcp6:9180:interface=\\:\\:"):
            path, load = self.load(f"admin:\n  path: /ops\n  listen: '{listen}'\n")
            err = self.assertRaises(ConfigError, load, path)
            self.assertEqual((err.line, err.column, err.key), (3, 11, "admin.listen"), str(err))
            self.assertIn("admin.token", str(err))
        path, load = self.load("admin:\n  listen: tcp:9180\n  token: x\n")
        self.assertEqual(load(path)[0].admin.listen, "tcp:9180")
        path, load = self.load("admin:\n  listen: tcp:9180:interface=127.0.0.1\n")
        self.assertEqual(load(path)[0].admin.token, "")

    def test_bad_endpoint_and_public_without_token(self) -> None:
        path, load = self.load("admin:\n  listen: 'tcp:port'\n")
        err = self.assertRaises(ConfigError, load, path)
        self.assertEqual((err.line, err.key), (2, "admin.listen"))
        path, load = self.load("admin:\n  public: true\n")
        err = self.assertRaises(ConfigError, load, path)
        self.assertEqual((err.line, err.column, err.key), (2, 11, "admin.public"))

    def test_token_file(self) -> None:
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "creds"))
        with open(os.path.join(root, "creds", "admin"), "w") as f:
            f.write("from-file\n")
        os.environ["TQS_TEST_CREDS"] = os.path.join(root, "creds")
        self.addCleanup(os.environ.pop, "TQS_TEST_CREDS")
        path, load = self.load("admin:\n  token_file: ${TQS_TEST_CREDS}/admin\n")
        self.assertEqual(read_admin_token(load(path)[0].admin, root), "from-file")
        path, load = self.load("admin:\n  token_file: creds/admin\n")
        self.assertEqual(read_admin_token(load(path)[0].admin, root), "from-file")
        path, load = self.load("admin:\n  token_file: creds/none\n")
        self.assertRaises(OSError, read_admin_token, load(path)[0].admin, root)


class Answer:
    def __init__(self, path: bytes, method: bytes = b"GET", **headers) -> None:
        self.path = path
        self.method = method
        self.requestHeaders = Headers({k.encode(): [v.encode()] for k, v in headers.items()})
        self.responseHeaders = Headers()
        self.code = None
        self.body = b""
        self.finished = False
        self.front = SimpleNamespace(dev=False)
        self.startedWriting = False
        self.disconnected = False
        self.request_id = b"rid"

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def write(self, data: bytes) -> None:
        self.body += data

    def finish_when_read(self) -> None:
        self.finished = True


class Pool:
    name = "app"
    serving = ()
    ready = True

    def describe(self) -> dict:
        return {"status": "healthy", "ports": [9001], "error": "make: /srv/app/build.sh",
                "revision": "r7", "deploying": False, "ready": True, "route": "/"}


class PublicPortTests(unittest.TestCase):
    def reserved(self, mode: str, config=None):
        config = config or default_server_config()
        supervisor = SimpleNamespace(state=SimpleNamespace(config=config, mode=mode),
                                     config=config, pools={"app": Pool()}, revision="r7",
                                     running=True, draining=False)
        metrics = SimpleNamespace(render=lambda pools: b"tqserver_up 1\n")
        return Reserved(supervisor, metrics, None, None)

    def answer(self, reserved, path: bytes, method: bytes = b"GET", **headers) -> Answer:
        r = Answer(path, method, **headers)
        handler = reserved.match(path)
        self.assertIsNotNone(handler)
        handler(r)
        return r

    def test_prod_health_shows_no_ports_errors_or_paths(self) -> None:
        r = self.answer(self.reserved("prod"), b"/health")
        self.assertEqual(r.code, 200)
        self.assertNotIn(b"9001", r.body)
        self.assertNotIn(b"/srv", r.body)
        self.assertIn(b'"r7"', r.body)                 # bin/deploy's revision
        r = self.answer(self.reserved("prod"), b"/health/app")
        self.assertNotIn(b"9001", r.body)
        r = self.answer(self.reserved("dev"), b"/health")
        self.assertIn(b"9001", r.body)                 # a developer's machine: everything

    def test_control_plane_is_an_unrouted_404(self) -> None:
        reserved = self.reserved("prod")
        for path, method in ((b"/_tqserver/api/status", b"GET"), (b"/metrics", b"GET"),
                             (b"/_tqserver/api/reload", b"POST"), (b"/_tqserver/", b"GET")):
            r = self.answer(reserved, path, method, authorization="Bearer anything")
            self.assertEqual(r.code, 404, path)
            self.assertIn(b"404 Not Found", r.body)   # as for a path no worker serves

    def test_admin_public_with_the_token_only(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(f"admin:\n  public: true\n  token: {TOKEN}\n")
        reserved = self.reserved("prod", load_server_config(path)[0])
        self.assertEqual(self.answer(reserved, b"/metrics").code, 404)
        self.assertEqual(self.answer(reserved, b"/metrics", authorization="Bearer x").code, 404)
        r = self.answer(reserved, b"/metrics", authorization=f"Bearer {TOKEN}")
        self.assertEqual((r.code, r.body), (200, b"tqserver_up 1\n"))

    def test_metrics_public_is_to_anyone(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("metrics:\n  public: true\n")
        reserved = self.reserved("prod", load_server_config(path)[0])
        self.assertEqual(self.answer(reserved, b"/metrics").code, 200)
        self.assertEqual(self.answer(reserved, b"/_tqserver/api/status").code, 404)
