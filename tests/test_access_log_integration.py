"""The access log of a real `twistd tqserver` behind a real HAProxy with `option forwardfor`
and `trusted_proxies: [127.0.0.1]`: each line names the client X-Forwarded-For gives
(not HAProxy's address), in the combined format, in its own file, and HAProxy's health
probes (GET /health every 100 ms) are left out."""
from __future__ import annotations

import os
import re

from .front_proxies import require_haproxy, start_haproxy
from .support import Client, free_port, sleep, wait_until
from .test_integration import IntegrationBase, d

HAPROXY_CFG = """defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend web
    bind 127.0.0.1:{port}
    default_backend node
backend node
    option forwardfor
    option httpchk GET /health
    default-server inter 100ms fall 2 rise 1
    server node1 127.0.0.1:{node_port} check
"""

APP = """
from tqserver.worker import serve

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]

serve(app)
"""

COMBINED = re.compile(
    r'^(?P<client>\S+) - - \[[^]]+\] "(?P<request>[^"]*)" (?P<status>\d{3}) \d+ '
    r'"(?P<referer>[^"]*)" "(?P<agent>[^"]*)" host="[^"]*" upstream_ms=\S+ ms=\S+ '
)


class AccessLogBehindHAProxyTests(IntegrationBase):
    def setUp(self):
        require_haproxy()

    def test_client_from_xff_combined_health_probes_excluded(self):
        return d(self._behind_haproxy())

    async def _behind_haproxy(self):
        project = self.make_project()
        project.write("workers/app/src/main.py", APP)
        project.write("workers/app/config/worker.yaml", "path: /app\n")
        project.add_server_settings('  access_log_file: "logs/access.log"\n'
                                    '  access_log_format: combined\n'
                                    '  access_log_exclude_health: true\n'
                                    '  trusted_proxies: ["127.0.0.1"]\n')
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=120)

        lb_port = free_port()
        cfg = project.write("haproxy.cfg", HAPROXY_CFG.format(port=lb_port,
                                                             node_port=project.port))
        start_haproxy(self, cfg)

        async def through_lb():
            response, _ = await client.get(f"http://127.0.0.1:{lb_port}/app/x")
            return response.code == 200
        await wait_until(through_lb, 30, "requests through HAProxy")
        await sleep(0.5)  # a few health probes more (inter 100ms)
        for i in range(3):
            response, body = await client.get(
                f"http://127.0.0.1:{lb_port}/app/page-{i}",
                headers={"User-Agent": 'tester "1"', "X-Forwarded-For": "198.51.100.9"})
            self.assertEqual((response.code, body), (200, b"ok"))
        access = os.path.join(project.root, "logs", "access.log")

        async def logged():
            return os.path.exists(access) and "/app/page-2" in open(access).read()
        await wait_until(logged, 10, "the access lines", proc)
        with open(access) as f:
            lines = f.read().splitlines()
        self.assertFalse([line for line in lines if "/health" in line], lines)
        pages = [COMBINED.match(line) for line in lines if "/app/page-" in line]
        self.assertEqual(len(pages), 3, lines)
        for match in pages:
            self.assertIsNotNone(match, lines)
            # HAProxy appended its client (this test: 127.0.0.1, trusted too) to the given
            # 198.51.100.9: the rightmost address that is not a trusted proxy is the client
            self.assertEqual(match.group("client"), "198.51.100.9")
            self.assertEqual(match.group("agent"), "tester \\x221\\x22")
            self.assertEqual(match.group("status"), "200")


class AccessLogOfProxyProcessesTests(IntegrationBase):
    """proxy_processes: 2 share the public port and the access file: both have it open
    (O_APPEND; a process opens it at its first line, so both wrote some), and many
    concurrent requests give as many whole lines, none torn."""

    def test_two_proxy_processes_append_whole_lines(self):
        return d(self._two())

    async def _two(self):
        from twisted.internet import defer

        from .test_proxy_processes_integration import proxy_processes

        project = self.make_project()
        project.add_server_settings('  proxy_processes: 2\n'
                                    '  access_log_file: "logs/access_{date}.log"\n')
        project.write("workers/app/src/main.py", APP)
        project.write("workers/app/config/worker.yaml", "path: /app\n")
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=120)

        async def two():
            return len(proxy_processes(project.root)) == 2
        await wait_until(two, 30, "two proxy processes", proc)

        async def one(i):
            response, body = await Client(self).get(project.url + f"/app/n-{i}")
            self.assertEqual(response.code, 200)

        for batch in range(10):
            await defer.gatherResults(
                [defer.ensureDeferred(one(batch * 20 + i)) for i in range(20)])
        logs = os.path.join(project.root, "logs")
        [name] = [n for n in os.listdir(logs) if n.startswith("access_")]
        access = os.path.join(logs, name)

        async def all_logged():
            with open(access) as f:
                return sum("/app/n-" in line for line in f) >= 200
        await wait_until(all_logged, 10, "200 access lines", proc)
        holders = [p for p in proxy_processes(project.root)
                   if any(f.path == access for f in p.open_files())]
        self.assertEqual(len(holders), 2)
        with open(access) as f:
            lines = [line for line in f.read().splitlines() if "/app/n-" in line]
        self.assertEqual(len(lines), 200)
        self.assertTrue(all(COMBINED.match(line) for line in lines), lines)
        self.assertEqual(sorted(int(re.search(r"/app/n-(\d+) ", line).group(1))
                                for line in lines), list(range(200)))
