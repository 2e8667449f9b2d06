"""Caddy (Debian's package) terminating TLS in front of a real twistd, as a TLS front is
usually run: HTTP/2 from the client to Caddy, HTTP/1.1 from Caddy to TQServer, and
`server.trusted_proxies` naming Caddy's address. A Flask app behind both builds https
URLs on the public host and sees the client's address, without ProxyFix; the control
plane stays unreachable through Caddy."""
from __future__ import annotations

import json
import os

from twisted.internet import utils

from .front_proxies import require_caddy, start_caddy
from .support import Client, free_port, short_dir, stop_twistd, wait_until
from .test_frameworks_integration import FrameworkBase
from .test_integration import d

FLASK_APP = """
from flask import Flask, jsonify, redirect, request, url_for

app = Flask(__name__)


@app.get("/")
def home():
    return jsonify(item=url_for("item", n=7, _external=True), scheme=request.scheme,
                   host=request.host, client=request.remote_addr,
                   forwarded_for=request.headers.get("X-Forwarded-For"))


@app.get("/items/<int:n>")
def item(n):
    return "item %d" % n


@app.get("/go")
def go():
    return redirect(url_for("item", n=3, _external=True))
"""

CADDYFILE = """{
	admin off
	auto_https disable_redirects
	skip_install_trust
	storage file_system %(home)s/data
}
https://localhost:%(port)d {
	tls internal
	reverse_proxy 127.0.0.1:%(upstream)d
}
"""


class CaddyInFrontTests(FrameworkBase):
    def setUp(self):
        require_caddy()

    def test_flask_behind_caddy_tls(self):
        return d(self._caddy())

    async def _caddy(self):
        project = self.make_project()
        project.add_server_settings('  trusted_proxies: ["127.0.0.1"]\n')
        project.write("workers/shop/config/worker.yaml", 'type: python\npython:\n  app: "app:app"\n')
        project.write("workers/shop/requirements.txt", "flask>=3.0,<4\n")
        project.write("workers/shop/app.py", FLASK_APP)
        proc = self.start(project, "--mode", "prod")
        await self.wait_healthy(Client(self), project, proc, ["shop"], timeout=400)

        home = short_dir(self)
        port = free_port()
        caddyfile = os.path.join(home, "Caddyfile")
        with open(caddyfile, "w") as f:
            f.write(CADDYFILE % {"home": home, "port": port, "upstream": project.port})
        caddy = start_caddy(self, caddyfile, home)
        root_ca = os.path.join(home, "data", "pki", "authorities", "local", "root.crt")
        front = f"https://localhost:{port}"

        async def curl(path, *args):
            out, err, code = await utils.getProcessOutputAndValue(
                "curl", ["-s", "--http2", "--cacert", root_ca, "-w", "\n%{http_code} %{http_version}",
                         *args, front + path])
            body, _, status = out.rpartition(b"\n")
            return status.decode(), body

        async def up():
            return os.path.exists(root_ca) and (await curl("/shop/items/1"))[0] == "200 2"
        await wait_until(up, 30, f"Caddy serving (it said: {caddy.output[-2000:]})", proc)

        status, body = await curl("/shop/")
        self.assertEqual(status, "200 2")                      # HTTP/2 to the client
        seen = json.loads(body)
        self.assertEqual(seen["item"], f"{front}/shop/items/7")  # https, the public host
        self.assertEqual((seen["scheme"], seen["host"]), ("https", f"localhost:{port}"))
        self.assertEqual(seen["client"], "127.0.0.1")
        status, _ = await curl("/shop/go", "-o", "/dev/null", "-D", "-")
        self.assertEqual(status, "302 2")
        _, head = await curl("/shop/go", "-I")
        self.assertIn(f"location: {front}/shop/items/3".encode(), head.lower())
        status, _ = await curl("/_tqserver/api/status")
        self.assertEqual(status, "404 2")                      # the control plane is not here
        self.assertEqual(await stop_twistd(proc), 0)
