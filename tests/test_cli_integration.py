"""The `tqserver` command against a real `twistd tqserver`: status (table and --json),
reload of one worker, logs and logs -f, top, and the answer when no server runs."""
from __future__ import annotations

import json
import os
import sys

from twisted.internet import defer, protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue

from .support import REPO, Client, free_port, wait_until
from .test_integration import PY_WORKER, IntegrationBase, d

# Says something on each start, and on request (for `logs -f`).
LOUD_WORKER = PY_WORKER.replace(
    "def app(environ, start_response):",
    "print('started', flush=True)\n\ndef app(environ, start_response):\n"
    "    print('served ' + environ['PATH_INFO'], flush=True)",
)


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO
    env.pop("TQSERVER_ROOT", None)
    env.pop("TQSERVER_TOKEN", None)
    return env


async def tqserver(root: str, *args: str):
    """(exit status, stdout, stderr) of `tqserver ARGS` run in ``root``."""
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "tqserver.cli", *args], env=cli_env(), path=root)
    return code, out.decode(), err.decode()


class Running(protocol.ProcessProtocol):
    """A `tqserver` command that keeps running (logs -f), its output kept."""

    def __init__(self) -> None:
        self.out = b""
        self.ended = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


class CommandLineTests(IntegrationBase):
    def test_no_server(self):
        return d(self._no_server())

    async def _no_server(self):
        project = self.make_project()
        code, out, err = await tqserver(project.root, "status")
        self.assertEqual(code, 3, err)
        self.assertEqual(out, "")
        self.assertIn(f"no server is answering at http://127.0.0.1:{project.admin_port}", err)
        self.assertNotIn("Traceback", err)
        code, _, err = await tqserver(project.root, "status", "--url", f"http://127.0.0.1:{free_port()}")
        self.assertEqual(code, 3, err)

    def test_status_reload_logs_top(self):
        return d(self._commands())

    async def _commands(self):
        project = self.make_project()
        for name in ("app", "api"):
            project.write(f"workers/{name}/src/main.py", LOUD_WORKER)
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app", "api"], timeout=60)
        for _ in range(5):
            await client.get(project.url + "/app/x")

        async def sampled():  # the windows take a sample each second
            _, status = await client.get_json(project.admin_url + "/_tqserver/api/status")
            return status["workers"]["app"]["requests"]["requests"] == 5
        await wait_until(sampled, 10, "the requests in the last minute's window", proc)

        code, out, err = await tqserver(project.root, "status")
        self.assertEqual(code, 0, err)
        header, *rows = out.splitlines()
        self.assertEqual(header.split()[:4], ["worker", "type", "status", "inst"])
        self.assertEqual(sorted(r.split()[:3] for r in rows),
                         [["api", "python", "healthy"], ["app", "python", "healthy"]])

        code, out, err = await tqserver(project.root, "status", "--json")
        self.assertEqual(code, 0, err)
        before = json.loads(out)["workers"]
        self.assertEqual(before["app"]["requests"]["requests"], 5)  # the last minute's
        old_pid = before["app"]["instances"][0]["pid"]

        code, out, err = await tqserver(project.root, "logs", "app")
        self.assertEqual(code, 0, err)
        self.assertIn("started", out)
        self.assertIn("served /x", out)

        follower = Running()
        argv = [sys.executable, "-m", "tqserver.cli", "logs", "app", "-f", "-n", "0"]
        reactor.spawnProcess(follower, sys.executable, argv, env=cli_env(), path=project.root)

        def stop_follower():
            if not follower.ended.called:
                follower.transport.signalProcess("KILL")
            return follower.ended
        self.addCleanup(stop_follower)

        # The follower is attached once it shows a line served after it started (its
        # interpreter can take seconds to start on a loaded machine).
        async def attached():
            await client.get(project.url + "/app/attached")
            return b"served /attached" in follower.out
        await wait_until(attached, 30, "logs -f to attach", proc)

        code, out, err = await tqserver(project.root, "reload", "app")
        self.assertEqual((code, out.strip()), (0, "reloading app"), err)

        async def replaced():
            _, status = await client.get_json(project.admin_url + "/_tqserver/api/status")
            serving = [i for i in status["workers"]["app"]["instances"] if i["serving"]]
            return serving and serving[0]["pid"] != old_pid
        await wait_until(replaced, 60, "a new app instance", proc)
        await client.get(project.url + "/app/after")

        async def followed():
            return b"served /after" in follower.out
        await wait_until(followed, 20, "logs -f to show the new line", proc)
        self.assertIn(b"started", follower.out)  # the new instance's start
        self.assertNotIn(b"served /x", follower.out)  # -n 0: only what came after

        code, out, err = await tqserver(project.root, "top", "--count", "2", "--json")
        self.assertEqual(code, 0, err)
        frames = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(len(frames), 2)
        self.assertEqual(sorted(frames[-1]["workers"]), ["api", "app"])
        serving = [i["pid"] for i in frames[-1]["workers"]["app"]["instances"] if i["serving"]]
        self.assertNotIn(old_pid, serving)
        self.assertTrue(serving)
        code, out, err = await tqserver(project.root, "top", "--count", "1")
        self.assertEqual(code, 0, err)
        self.assertIn("tqserver top", out)
        self.assertIn("app", out)

        code, _, err = await tqserver(project.root, "reload", "nope")
        self.assertEqual(code, 1)
        self.assertIn("no worker named 'nope'", err)
        code, _, err = await tqserver(project.root, "logs", "nope")
        self.assertEqual(code, 1)

        follower.transport.signalProcess("TERM")
        await follower.ended
