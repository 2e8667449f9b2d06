"""The command line: options, mode, config and listen problems as one clear line."""
from __future__ import annotations

import os
import socket

from twisted.trial import unittest

from tqserver.tap import Options, _listen_problem, _public_url, tcp_address

from .support import listening_port, short_dir


class TcpAddressTests(unittest.TestCase):
    def test_forms(self) -> None:
        self.assertEqual(tcp_address("tcp:8080:interface=127.0.0.1"), ("127.0.0.1", 8080))
        self.assertEqual(tcp_address("tcp:port=9:interface=0.0.0.0"), ("0.0.0.0", 9))
        self.assertEqual(tcp_address("tcp6:8080:interface=\\:\\:1"), ("::1", 8080))
        self.assertEqual(tcp_address("tcp:nope"), ("", None))
        self.assertIsNone(tcp_address("unix:/tmp/s"))

    def test_public_url(self) -> None:
        self.assertEqual(_public_url(["unix:/x", "tcp:8080"]), "http://127.0.0.1:8080")
        self.assertEqual(_public_url(["unix:/x"]), "")

    def test_taken_port(self) -> None:
        port = listening_port(self)
        problem = _listen_problem(f"tcp:{port}:interface=127.0.0.1")
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", problem)
        self.assertIn("--listen tcp:x", _listen_problem("tcp:x"))


class OptionsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.root = short_dir(self)
        os.makedirs(os.path.join(self.root, "etc"))
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "TQSERVER_MODE"})

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(["--root", self.root, "--listen", "tcp:0:interface=127.0.0.1"]
                             + list(args))
        return options

    def test_defaults(self) -> None:
        options = self.parse()
        self.assertEqual(options["mode"], "dev")
        self.assertEqual(options["config"], os.path.join(self.root, "etc", "server.yaml"))
        self.assertEqual(options["server_config"].server.port, 8080)  # built-in defaults

    def test_mode_names_and_environment(self) -> None:
        self.assertEqual(self.parse("--mode", "production")["mode"], "prod")
        os.environ["TQSERVER_MODE"] = "prod"
        self.assertEqual(self.parse()["mode"], "prod")

    def test_bad_mode(self) -> None:
        from twisted.python.usage import UsageError
        self.assertRaises(UsageError, self.parse, "--mode", "staging")

    def test_bad_config_is_one_line(self) -> None:
        with open(os.path.join(self.root, "etc", "server.yaml"), "w") as f:
            f.write("workers:\n  kill_timeout_ms: -1\n")
        with self.assertRaises(SystemExit) as ctx:
            self.parse()
        message = str(ctx.exception.code)
        self.assertTrue(message.startswith("tqserver: "))
        self.assertIn("server.yaml:2:20: workers.kill_timeout_ms", message)
        self.assertEqual(message.count("\n"), 0)

    def test_explicit_missing_config(self) -> None:
        with self.assertRaises(SystemExit) as ctx:
            self.parse("--config", "etc/other.yaml")
        self.assertIn("other.yaml", str(ctx.exception.code))

    def test_reload_only_in_dev(self) -> None:
        with self.assertRaises(SystemExit) as ctx:
            self.parse("--mode", "prod", "--reload")
        self.assertIn("dev mode only", str(ctx.exception.code))

    def test_proxy_processes_share_tcp_sockets_only(self) -> None:
        with open(os.path.join(self.root, "etc", "server.yaml"), "w") as f:
            f.write("server:\n  proxy_processes: 2\n")
        self.assertEqual(self.parse()["proxy_processes"], 2)
        with self.assertRaises(SystemExit) as ctx:
            self.parse("--listen", "unix:" + os.path.join(self.root, "s.sock"))
        self.assertIn("proxy_processes > 1 shares TCP listening sockets only",
                      str(ctx.exception.code))

    def test_listen_address(self) -> None:

        from tqserver.tap import listen_address
        self.assertEqual(listen_address("tcp:8080"), ("0.0.0.0", 8080, socket.AF_INET))
        self.assertEqual(listen_address("tcp6:8080"), ("::", 8080, socket.AF_INET6))
        self.assertEqual(listen_address("tcp:port=81:interface=127.0.0.1"),
                         ("127.0.0.1", 81, socket.AF_INET))

    def test_admin_listen_overrides_the_config(self) -> None:
        with open(os.path.join(self.root, "etc", "server.yaml"), "w") as f:
            f.write('admin:\n  listen: "tcp:1:interface=127.0.0.1"\n')
        options = self.parse("--admin-listen", "tcp:0:interface=127.0.0.1")
        self.assertEqual(options["server_config"].admin.listen, "tcp:0:interface=127.0.0.1")
        self.assertEqual(self.parse("--admin-listen", "")["server_config"].admin.listen, "")

    def test_admin_listen_off_loopback_needs_a_token(self) -> None:
        with self.assertRaises(SystemExit) as ctx:
            self.parse("--admin-listen", "tcp:0")
        self.assertIn("--admin-listen: 'tcp:0' listens on all interfaces: set admin.token",
                      str(ctx.exception.code))
        with open(os.path.join(self.root, "etc", "server.yaml"), "w") as f:
            f.write('admin:\n  token: "s3cret"\n')
        self.assertEqual(self.parse("--admin-listen", "tcp:0")["server_config"].admin.listen,
                         "tcp:0")

    def test_a_socket_path_too_long_for_the_kernel_is_named(self) -> None:
        deep = "d" * 120
        with self.assertRaises(SystemExit) as ctx:
            self.parse("--admin-listen", f"unix:run/{deep}/admin.sock")
        message = str(ctx.exception.code)
        self.assertIn(f"--admin-listen: the socket path {self.root}/run/{deep}/admin.sock is",
                      message)
        self.assertIn("more than a Unix socket allows (107)", message)
        self.assertEqual(self.parse("--admin-listen", "unix:run/admin.sock")["server_config"]
                         .admin.listen, "unix:run/admin.sock")

    def test_admin_listen_on_a_taken_port_is_named(self) -> None:
        port = listening_port(self)
        with self.assertRaises(SystemExit) as ctx:
            self.parse("--admin-listen", f"tcp:{port}:interface=127.0.0.1")
        self.assertIn(f"--admin-listen: cannot listen on 127.0.0.1:{port}",
                      str(ctx.exception.code))
