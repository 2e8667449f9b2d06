"""A deploy that deleted server-built output: DEPLOYMENT.md's rsync keeps bin/, and a HUP
rebuilds a Go worker whose bin/ is gone (real twistd, prod mode, real go and rsync)."""
from __future__ import annotations

import os
import shlex
import shutil

from twisted.internet import utils
from twisted.trial import unittest

from .support import REPO, Client, find_go, processes_of, wait_until
from .test_integration import IntegrationBase, d


def deployment_rsync(source: str, dest: str) -> list[str]:
    """DEPLOYMENT.md's rsync command, from ``source`` to ``dest``."""
    text = open(os.path.join(REPO, "DEPLOYMENT.md")).read().replace("\\\n", " ")
    [line] = [l for l in text.splitlines() if l.startswith("rsync -a --delete")]
    argv = shlex.split(line)
    assert argv[-2:] == ["./", "server:/srv/site/"], argv
    return argv[:-2] + [os.path.join(source, ""), os.path.join(dest, "")]


class MissingOutputTests(IntegrationBase):
    def test_rsync_keeps_bin_and_hup_rebuilds_deleted_bin(self):
        if find_go() is None:
            raise unittest.SkipTest("Go is not installed")
        if shutil.which("rsync") is None:
            raise unittest.SkipTest("rsync is not installed")
        return d(self._missing())

    async def _missing(self):
        project = self.make_project()
        project.copy_worker("hello")
        binary = os.path.join(project.root, "workers", "hello", "bin", "hello")
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["hello"])
        self.assertTrue(os.path.isfile(binary))

        # The deploy per DEPLOYMENT.md, from a checkout that has no bin/: bin/ stays.
        source = os.path.abspath(self.mktemp())
        shutil.copytree(project.root, source,
                        ignore=shutil.ignore_patterns("bin", "logs", "run"))
        argv = deployment_rsync(source, project.root)
        out, err, code = await utils.getProcessOutputAndValue(argv[0], argv[1:], env=os.environ)
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.isfile(binary), "rsync --delete removed bin/")
        # The same rsync without the protect rule does delete it (the rule is what keeps it).
        bare = [a for a in argv if not a.startswith("--filter=P")]
        out, err, code = await utils.getProcessOutputAndValue(bare[0], bare[1:], env=os.environ)
        self.assertEqual(code, 0, err)
        self.assertFalse(os.path.exists(binary))

        [old] = processes_of(project.root)
        proc.transport.signalProcess("HUP")

        async def rebuilt_and_serving():
            if not os.path.isfile(binary):
                return False
            response, body = await client.get(project.url + "/hello/")
            pids = [p.pid for p in processes_of(project.root)]
            return response.code == 200 and old.pid not in pids and len(pids) == 1
        await wait_until(rebuilt_and_serving, 120, "hello rebuilt and swapped", proc)
        self.assertNotIn("reload: nothing changed", proc.text)
        # The rebuilt binary is what runs: a crash restarts it (no exit-127 loop).
        [new] = processes_of(project.root)
        new.kill()

        async def restarted():
            pids = [p.pid for p in processes_of(project.root)]
            response, body = await client.get(project.url + "/hello/")
            return response.code == 200 and pids and new.pid not in pids
        await wait_until(restarted, 60, "hello restarted after a crash", proc)
