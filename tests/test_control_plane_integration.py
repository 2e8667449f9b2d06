"""The control plane on its own listener, with a real twistd behind a real HAProxy on
loopback (where every client of the public port is "loopback"): through HAProxy, the admin
API, reloads and /metrics are 404 and /health answers without detail; the admin listener
(a Unix socket by default) answers all of it, refuses a cross-site POST, and with
admin.public the public port serves the control plane to the token only."""
from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial import unittest

from .front_proxies import require_haproxy, start_haproxy
from .support import (
    Client,
    Project,
    free_port,
    kill_leftovers,
    short_dir,
    spawn_twistd,
    stop_twistd,
    wait_until,
)

HAPROXY_CFG = """global
    maxconn 200
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend web
    bind 127.0.0.1:{port}
    default_backend node
backend node
    server node1 127.0.0.1:{node_port}
"""

PY_WORKER = """
from tqserver.worker import serve

def app(environ, start_response):
    body = ("app %s" % environ["PATH_INFO"]).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

serve(app)
"""

TOKEN = "s3cret-admin-token"


class ControlPlaneBehindHAProxyTests(unittest.TestCase):
    timeout = 180

    def setUp(self) -> None:
        require_haproxy()

    async def serve(self, admin_yaml: str):
        """A prod twistd (one Python worker on /) behind HAProxy; (project, client of
        HAProxy's port, its URL, the twistd process)."""
        project = Project(os.path.abspath(self.mktemp()))
        self.addCleanup(kill_leftovers, project.root)
        with open(os.path.join(project.root, "etc", "server.yaml")) as f:
            text = f.read()
        project.write("etc/server.yaml", text.split("admin:\n")[0] + admin_yaml)
        project.write("workers/app/src/main.py", PY_WORKER)
        project.write("workers/app/config/worker.yaml", "path: /\n")
        proc = spawn_twistd(project, "--mode", "prod")
        self.addCleanup(lambda: None if proc.done else defer.ensureDeferred(stop_twistd(proc)))
        lb_port = free_port()
        config = os.path.join(project.root, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(HAPROXY_CFG.format(port=lb_port, node_port=project.port))
        lb = start_haproxy(self, config)
        client = Client(self)
        front = f"http://127.0.0.1:{lb_port}"

        async def serving():
            response, body = await client.get(front + "/x")
            return body == b"app /x"
        try:
            await wait_until(serving, 90, "the app served through HAProxy", proc)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{lb.output}") from None
        return project, client, front, proc

    def test_public_port_hides_the_control_plane_and_the_socket_serves_it(self):
        return defer.ensureDeferred(self._hidden())

    async def _hidden(self):
        sock = os.path.join(short_dir(self), "admin.sock")
        project, client, front, proc = await self.serve(f"admin:\n  listen: unix:{sock}\n")
        for method, path in [(b"GET", "/_tqserver/api/status"), (b"GET", "/_tqserver/"),
                             (b"POST", "/_tqserver/api/reload"),
                             (b"POST", "/_tqserver/api/reload/app"), (b"GET", "/metrics"),
                             (b"GET", "/_tqserver/api/logs/app")]:
            response, body = await client.request(method, front + path)
            self.assertEqual(response.code, 404, (method, path, body))
            self.assertNotIn(b"worker", body.lower().replace(b"no worker serves", b""))
        _, unrouted = await client.get(front + "/_tqserver/api/status")
        response, health = await client.get_json(front + "/health")
        self.assertEqual(response, 200)
        self.assertEqual(health["status"], "healthy")
        self.assertEqual(set(health["workers"]["app"]), {"status", "ready", "revision", "deploying"})
        for secret in ("ports", "route", "error", "pid", str(project.root)):
            self.assertNotIn(secret, str(health))

        self.assertEqual(os.stat(sock).st_mode & 0o777, 0o600)
        admin = Client(self, unix_socket=sock)
        code, status = await admin.get_json("http://localhost/_tqserver/api/status")
        self.assertEqual(code, 200)
        pid = [i["pid"] for i in status["workers"]["app"]["instances"]][0]
        response, metrics = await admin.get("http://localhost/metrics")
        self.assertEqual(response.code, 200)
        self.assertIn(b"tqserver_", metrics)
        code, health = await admin.get_json("http://localhost/health")
        self.assertEqual(code, 200)
        self.assertIn("ports", health["workers"]["app"])
        response, page = await admin.get("http://localhost/_tqserver/")
        self.assertEqual(response.code, 200)
        self.assertIn(b"<html", page.lower())

        # a page of another site in the operator's browser (reaching a tunnel to it)
        for headers in ({"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
                        {"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "same-site"}):
            response, body = await admin.request(b"POST", "http://localhost/_tqserver/api/reload",
                                                 headers=headers)
            self.assertEqual(response.code, 403, (headers, body))
        response, body = await admin.get("http://evil.example/_tqserver/api/status")
        self.assertEqual(response.code, 403, body)   # a DNS-rebound name
        # the status page's own Reload button: same origin
        response, body = await admin.request(
            b"POST", "http://localhost:8000/_tqserver/api/reload/app",
            headers={"Origin": "http://localhost:8000", "Sec-Fetch-Site": "same-origin"})
        self.assertEqual(response.code, 202, body)

        async def new_pid():
            _, s = await admin.get_json("http://localhost/_tqserver/api/status")
            pids = [i["pid"] for i in s["workers"]["app"]["instances"] if i["serving"]]
            return pids and pid not in pids
        await wait_until(new_pid, 60, "the reloaded worker serving", proc)
        response, body = await admin.request(b"POST", "http://localhost/_tqserver/api/reload")
        self.assertEqual(response.code, 202, body)   # the CLI: no Origin at all
        self.assertEqual(await stop_twistd(proc), 0)
        self.assertFalse(os.path.exists(sock))

    def test_admin_public_serves_the_token_only(self):
        return defer.ensureDeferred(self._token())

    async def _token(self):
        sock = os.path.join(short_dir(self), "admin.sock")
        token_file = os.path.join(short_dir(self), "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        project, client, front, proc = await self.serve(
            f"admin:\n  listen: unix:{sock}\n  public: true\n  token_file: {token_file}\n")
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for path in ("/_tqserver/api/status", "/metrics"):
                response, body = await client.get(front + path, headers=headers)
                self.assertEqual(response.code, 404, (path, headers, body))
        response, body = await client.get(front + "/_tqserver/api/status", headers=bearer)
        self.assertEqual(response.code, 200, body)
        self.assertIn(b'"app"', body)
        response, body = await client.get(front + "/metrics", headers=bearer)
        self.assertEqual(response.code, 200, body)
        response, body = await client.request(b"POST", front + "/_tqserver/api/reload",
                                              headers=bearer)
        self.assertEqual(response.code, 202, body)
        # on the socket, the token opens a cross-site request too
        admin = Client(self, unix_socket=sock)
        response, body = await admin.request(
            b"POST", "http://localhost/_tqserver/api/reload",
            headers=dict(bearer, Origin="http://evil.example"))
        self.assertEqual(response.code, 202, body)
