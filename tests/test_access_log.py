"""The access log: common/combined/json lines, escaping (no header value can forge a line),
the real client from X-Forwarded-For behind trusted proxies (CIDR too), its own file
(reopened by SIGUSR1's LOG_FILES.reopen), health probes left out, and the proxy's own
rejections (400/408/413/431) logged like any other request."""

from __future__ import annotations

import json
import os

from twisted.trial import unittest

from tqserver.config.errors import ConfigError
from tqserver.config.server import load_server_config
from tqserver.logs.files import LOG_FILES
from tqserver.proxy.access_log import AccessLog, Trusted, escape, real_client

from .memproxy import MemoryProxy

REQUEST = (
    b"GET /app/page?q=1 HTTP/1.1\r\nHost: example.com\r\n"
    b"Referer: http://ref.example/\r\nUser-Agent: curl/8\r\n\r\n"
)


class Counter:
    def __init__(self) -> None:
        self.seen: list = []

    def observe_request(self, worker: str, code: int, seconds: float) -> None:
        self.seen.append((worker, code))


def write_config(directory: str, text: str):
    path = os.path.join(directory, "server.yaml")
    with open(path, "w") as f:
        f.write(text)
    return load_server_config(path)[0]


class EscapeTests(unittest.TestCase):
    def test_printable_ascii_as_is(self) -> None:
        self.assertEqual(escape(b"Mozilla/5.0 (X11; Linux) ~!"), "Mozilla/5.0 (X11; Linux) ~!")

    def test_quotes_backslash_control_and_high_bytes_as_hex(self) -> None:
        self.assertEqual(
            escape(b'a"b\\c\nd\re\x00f\x7f\xc3\xa9'),
            "a\\x22b\\x5Cc\\x0Ad\\x0De\\x00f\\x7F\\xC3\\xA9",
        )


class RealClientTests(unittest.TestCase):
    def test_untrusted_peer_its_xff_ignored(self) -> None:
        self.assertEqual(real_client("203.0.113.9", [b"1.2.3.4"], Trusted(["10.0.0.1"])),
                         "203.0.113.9")

    def test_no_trusted_proxies(self) -> None:
        self.assertEqual(real_client("10.0.0.1", [b"1.2.3.4"], Trusted([])), "10.0.0.1")

    def test_right_to_left_past_trusted_proxies(self) -> None:
        trusted = Trusted(["127.0.0.1", "10.0.0.0/8"])
        # the client forged "6.6.6.6"; 1.2.3.4 is what the first trusted proxy saw
        self.assertEqual(
            real_client("127.0.0.1", [b"6.6.6.6, 1.2.3.4", b"10.1.2.3"], trusted), "1.2.3.4"
        )

    def test_all_trusted_the_leftmost(self) -> None:
        self.assertEqual(
            real_client("127.0.0.1", [b"10.0.0.2, 10.0.0.3"], Trusted(["127.0.0.1", "10.0.0.0/8"])),
            "10.0.0.2",
        )

    def test_garbage_stops_the_walk(self) -> None:
        trusted = Trusted(["127.0.0.1", "10.0.0.0/8"])
        self.assertEqual(real_client("127.0.0.1", [b'x" forged, 10.0.0.7'], trusted), "10.0.0.7")
        self.assertEqual(real_client("127.0.0.1", [b"unknown"], trusted), "127.0.0.1")

    def test_ipv6_and_cidr(self) -> None:
        trusted = Trusted(["::1", "fd00::/8"])
        self.assertEqual(real_client("::1", [b"2001:db8::5, fd00::1"], trusted), "2001:db8::5")
        self.assertIn("::ffff:10.1.1.1", Trusted(["10.0.0.0/8"]))
        self.assertNotIn("not an address", Trusted(["10.0.0.0/8"]))


class AccessLogCase(unittest.TestCase):
    yaml = ""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.log_path = os.path.join(self.dir, "access.log")
        config = write_config(
            self.dir, f'server:\n  access_log_file: "{self.log_path}"\n' + self.yaml
        )
        self.proxy = MemoryProxy(config=config)
        self.addCleanup(self.proxy.close)
        self.counter = Counter()
        self.access = AccessLog(self.proxy.state, self.counter, self.proxy.clock, root=self.dir)
        self.addCleanup(self.access.close)
        self.proxy.site._log_access = self.access

    def lines(self) -> list[str]:
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path, encoding="utf-8") as f:
            return f.read().splitlines()


class CombinedTests(AccessLogCase):
    def test_default_is_combined_with_host_and_upstream_time(self) -> None:
        self.proxy.send([REQUEST])
        self.proxy.finish()
        [line] = self.lines()
        self.assertRegex(
            line,
            r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
            r'"GET /app/page\?q=1 HTTP/1\.1" 200 2 "http://ref\.example/" "curl/8" '
            r'host="example\.com" upstream_ms=\d+\.\d ms=\d+\.\d worker=app instance=app#1 '
            r"rid=\S+$",
        )
        self.assertEqual(self.counter.seen, [("app", 200)])

    def test_user_agent_cannot_forge_a_line(self) -> None:
        # control bytes other than a tab cannot be in a header value (400); quotes, tabs and
        # high bytes can
        self.proxy.send([
            b'GET /a HTTP/1.1\r\nHost: h"x\r\nUser-Agent: a" 200 1 "-" "b\t\xff\r\n\r\n'
        ])
        self.proxy.finish()
        [line] = self.lines()
        self.assertIn(r'"a\x22 200 1 \x22-\x22 \x22b\x09\xFF"', line)
        self.assertIn(r'host="h\x22x"', line)
        self.assertEqual(line.count('"'), 8)  # request, referer, agent, host: nothing more

    def test_rejections_are_logged(self) -> None:
        # 431 (a head too large), 400 (a bad request line), 413 (a body too large)
        self.proxy.send([b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n"])
        self.proxy.finish()
        for raw in (b"NOT A REQUEST LINE\r\n\r\n",
                    b"POST /app HTTP/1.1\r\nHost: h\r\nContent-Length: 999999999999\r\n\r\n"):
            proxy = MemoryProxy(config=self.proxy.config)
            self.addCleanup(proxy.close)
            proxy.site._log_access = self.access
            proxy.send([raw])
            proxy.finish()
        codes = [line.split('"')[2].split()[0] for line in self.lines()]
        self.assertEqual(codes, ["431", "400", "413"])
        self.assertTrue(all(" upstream_ms=- " in line for line in self.lines()))

    def test_read_timeout_408_is_logged(self) -> None:
        self.proxy.send([b"GET /app HTTP/1.1\r\nHost: h\r\n"])  # the head never ends
        self.proxy.finish()
        [line] = self.lines()
        self.assertIn('"GET /app HTTP/1.1" 408 ', line)

    def test_reopen_writes_to_a_new_file_of_the_name(self) -> None:
        self.proxy.send([REQUEST])
        self.proxy.settle()
        os.rename(self.log_path, self.log_path + ".1")  # logrotate moves it away
        LOG_FILES.reopen()  # SIGUSR1
        self.proxy.send([REQUEST])
        self.proxy.finish()
        self.assertEqual(len(self.lines()), 1)
        with open(self.log_path + ".1") as f:
            self.assertEqual(len(f.read().splitlines()), 1)


class CommonTests(AccessLogCase):
    yaml = "  access_log_format: common\n"

    def test_common_has_no_referer_nor_agent(self) -> None:
        self.proxy.send([REQUEST])
        self.proxy.finish()
        [line] = self.lines()
        self.assertRegex(line, r'^127\.0\.0\.1 - - \[[^]]+\] "GET /app/page\?q=1 HTTP/1\.1" 200 2 '
                               r'host="example\.com" upstream_ms=')


class JSONTests(AccessLogCase):
    yaml = "  access_log_format: json\n"

    def test_fields_and_escaping(self) -> None:
        self.proxy.send([
            b'GET /app?x=1 HTTP/1.1\r\nHost: h\r\nUser-Agent: a"}\t\xc3\xa9\xff\r\n\r\n'
        ])
        self.proxy.finish()
        [line] = self.lines()
        entry = json.loads(line)
        self.assertEqual(entry["uri"], "/app?x=1")
        self.assertEqual(entry["user_agent"], 'a"}\t\u00e9\\xff')
        self.assertIsNone(entry["referer"])
        self.assertEqual((entry["client"], entry["peer"], entry["status"], entry["bytes"]),
                         ("127.0.0.1", "127.0.0.1", 200, 2))
        self.assertEqual((entry["host"], entry["worker"], entry["instance"]), ("h", "app", "app#1"))
        self.assertIsInstance(entry["upstream_ms"], float)
        self.assertRegex(entry["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$")


class TrustedProxyTests(AccessLogCase):
    yaml = '  trusted_proxies: ["127.0.0.0/8"]\n  access_log_format: json\n'

    def test_client_from_xff_behind_a_trusted_network(self) -> None:
        self.proxy.send([b"GET /app HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 6.6.6.6, 198.51.100.7"
                         b"\r\n\r\n"])
        self.proxy.finish()
        [line] = self.lines()
        self.assertEqual(json.loads(line)["client"], "198.51.100.7")
        # and the worker is told the same chain (CIDR entries count there too)
        self.assertIn(b"X-Forwarded-For: 6.6.6.6, 198.51.100.7, 127.0.0.1",
                      self.proxy.upstreams.made[0].transport.value())


class ExcludeHealthTests(AccessLogCase):
    yaml = "  access_log_exclude_health: true\n"

    def test_health_probes_not_logged_but_counted(self) -> None:
        self.proxy.send([b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n",
                         b"GET /health?x HTTP/1.1\r\nHost: h\r\n\r\n", REQUEST])
        self.proxy.finish()
        [line] = self.lines()
        self.assertIn('"GET /app/page?q=1 HTTP/1.1" 200', line)
        self.assertEqual(len(self.counter.seen), 3)


class ServerLogTests(unittest.TestCase):
    def test_without_a_file_lines_go_to_the_server_log(self) -> None:
        from twisted.logger import globalLogPublisher

        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        proxy = MemoryProxy()
        self.addCleanup(proxy.close)
        proxy.site._log_access = AccessLog(proxy.state, Counter(), proxy.clock)
        proxy.send([REQUEST])
        proxy.finish()
        [event] = [e for e in events if e.get("log_namespace") == "tqserver.access"]
        self.assertIn('"GET /app/page?q=1 HTTP/1.1" 200 2 "http://ref.example/"', event["line"])


class ConfigTests(unittest.TestCase):
    def error(self, text: str) -> ConfigError:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with self.assertRaises(ConfigError) as caught:
            write_config(directory, text)
        return caught.exception

    def test_unknown_format_named_with_position(self) -> None:
        e = self.error("server:\n  access_log_format: combind\n")
        self.assertIn("server.yaml:2:22", str(e))
        self.assertIn("server.access_log_format", str(e))
        self.assertIn("did you mean 'combined'", str(e))

    def test_bad_trusted_proxy_named_with_position(self) -> None:
        e = self.error('server:\n  trusted_proxies:\n    - 10.0.0.1\n    - "10.0.0.0/33"\n')
        self.assertIn("server.yaml:4:7", str(e))
        self.assertIn("server.trusted_proxies[1]", str(e))

    def test_defaults(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        server = write_config(directory, "server: {}\n").server
        self.assertEqual(
            (server.access_log_format, server.access_log_file, server.access_log_exclude_health),
            ("combined", None, False),
        )
