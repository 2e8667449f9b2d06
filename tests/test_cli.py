"""The `tqserver` command's parts that need no server: where it looks, what it prints."""
from __future__ import annotations

import io
import os
from contextlib import redirect_stderr

from twisted.trial import unittest

from tqserver.cli.locate import LocateError, target
from tqserver.cli.main import main
from tqserver.cli.render import duration, size, table

SNAPSHOT = {
    "time": 0, "mode": "prod", "root": "/srv/app", "config_errors": ["etc/x.yaml:1:2: bad"],
    "workers": {
        "app": {
            "type": "go", "status": "degraded", "crash_loop": True, "deploying": False,
            "error": "exited with status 1", "restarts": {"crash": 4, "health": 1},
            "last_build": {"ok": False, "cancelled": False, "duration_seconds": 1.25},
            "requests": {"rate": 12.5, "error_rate": 0.02, "p50_ms": 1.234, "p99_ms": 250.0},
            "instances": [
                {"pid": 10, "serving": True, "uptime_seconds": 3700, "cpu_percent": 1.5,
                 "rss_bytes": 3 << 20},
                {"pid": 11, "serving": True, "uptime_seconds": 65, "cpu_percent": None,
                 "rss_bytes": 1 << 20},
                {"pid": 12, "serving": False, "uptime_seconds": 1, "cpu_percent": 90.0,
                 "rss_bytes": 1 << 30},
            ],
        },
    },
}


class RenderTests(unittest.TestCase):
    def test_one_row_per_worker(self) -> None:
        header, row, *notes = table(SNAPSHOT).splitlines()
        self.assertEqual(header.split(), ["worker", "type", "status", "inst", "pid", "uptime",
                                          "req/s", "err%", "p50", "p99", "cpu", "mem",
                                          "restarts", "build"])
        self.assertEqual(row.split(), ["app", "go", "degraded", "(crash", "loop)", "2", "10,11",
                                       "1m05s", "12.5", "2.0", "1.2ms", "250ms", "1.5%", "4.0M",
                                       "5", "FAILED", "1.2s"])
        self.assertEqual(notes, ["configuration error: etc/x.yaml:1:2: bad",
                                 "app: exited with status 1"])

    def test_not_ready_is_said_and_ready_is_quiet(self) -> None:
        waiting = dict(SNAPSHOT, ready={"status": "starting", "waiting_for": ["api", "app"]})
        self.assertIn("not ready: starting (waiting for api, app)", table(waiting).splitlines())
        draining = dict(SNAPSHOT, ready={"status": "draining", "waiting_for": []})
        self.assertIn("not ready: draining", table(draining).splitlines())
        ready = dict(SNAPSHOT, ready={"status": "ready", "waiting_for": []})
        self.assertEqual(table(ready), table(SNAPSHOT))

    def test_units(self) -> None:
        self.assertEqual([duration(None), duration(5), duration(7300), duration(90000)],
                         ["-", "5s", "2h01m", "1d01h"])
        self.assertEqual([size(None), size(512), size(2048), size(5 << 30)],
                         ["-", "512B", "2.0K", "5.0G"])


class LocateTests(unittest.TestCase):
    def project(self, yaml: str) -> str:
        root = self.mktemp()
        os.makedirs(os.path.join(root, "etc"))
        with open(os.path.join(root, "etc", "server.yaml"), "w") as f:
            f.write(yaml)
        return root

    def test_from_server_yaml(self) -> None:
        # the admin listener, on loopback when it listens on every interface
        root = self.project('server:\n  port: 9100\n  host: "0.0.0.0"\nadmin:\n  path: /ops\n'
                            '  token: s3cret\n  listen: "tcp:9180:interface=0.0.0.0"\n')
        t = target(root, "etc/server.yaml", None, None)
        self.assertEqual((t.host, t.port, t.unix_socket, t.admin_path, t.token),
                         ("127.0.0.1", 9180, None, "/ops", "s3cret"))
        self.assertEqual(target(root, "etc/server.yaml", None, "other").token, "other")

    def test_token_file_and_no_admin_listener(self) -> None:
        root = self.project('server:\n  port: 9100\nadmin:\n  listen: ""\n  public: true\n'
                            '  token_file: etc/token\n')
        with open(os.path.join(root, "etc", "token"), "w") as f:
            f.write("from-file\n")
        t = target(root, "etc/server.yaml", None, None)   # the public port, with the token
        self.assertEqual((t.host, t.port, t.unix_socket, t.token),
                         ("127.0.0.1", 9100, None, "from-file"))

    def test_defaults_without_server_yaml(self) -> None:
        root = self.mktemp()
        t = target(root, "etc/server.yaml", None, None)   # the admin socket under the root
        self.assertEqual((t.host, t.port, t.unix_socket, t.admin_path, t.token),
                         (None, None, os.path.join(os.path.abspath(root), "run",
                                                   "tqserver-admin.sock"), "/_tqserver", ""))

    def test_url(self) -> None:
        root = self.mktemp()
        t = target(root, "etc/server.yaml", "unix:/run/tq.sock", None)
        self.assertEqual((t.unix_socket, t.host), ("/run/tq.sock", None))
        t = target(root, "etc/server.yaml", "http://[::1]:9000", None)
        self.assertEqual((t.host, t.port), ("::1", 9000))
        self.assertRaises(LocateError, target, root, "etc/server.yaml", "ftp://x", None)

    def test_invalid_server_yaml_is_named(self) -> None:
        root = self.project("server:\n  port: nope\n")
        err = io.StringIO()
        with redirect_stderr(err):
            code = main(["status", "--root", root])
        self.assertEqual(code, 2)
        self.assertIn("server.yaml:2:", err.getvalue())
        self.assertIn("server.port", err.getvalue())
