"""etc/systemd/tqserver.service, the unit DEPLOYMENT.md installs: what it must say, and
`systemd-analyze verify` on it (when systemd-analyze is installed; skipped otherwise)."""
from __future__ import annotations

import os
import shutil
import stat

from twisted.internet import utils
from twisted.trial import unittest

from tqserver.config.server import default_server_config

from .support import REPO

UNIT = os.path.join(REPO, "etc", "systemd", "tqserver.service")


def settings() -> dict[str, str]:
    out = {}
    for line in open(UNIT):
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out[key] = value
    return out


class SystemdUnitTests(unittest.TestCase):

    def test_what_it_says(self) -> None:
        unit = settings()
        self.assertEqual(unit["Type"], "simple")
        self.assertIn(" -n ", unit["ExecStart"])              # foreground for Type=simple
        self.assertEqual(unit["ExecReload"], "/bin/kill -HUP $MAINPID")
        self.assertEqual(unit["KillMode"], "mixed")
        workers = default_server_config().workers
        drain = (workers.shutdown_grace_period_ms + workers.kill_timeout_ms) / 1000
        self.assertGreater(int(unit["TimeoutStopSec"]), drain)
        self.assertGreaterEqual(int(unit["LimitNOFILE"]), 65536)
        self.assertIn("cp etc/systemd/tqserver.service /etc/systemd/system/",
                      open(os.path.join(REPO, "DEPLOYMENT.md")).read())

    def test_systemd_analyze_verify(self):
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise unittest.SkipTest("systemd-analyze is not installed (no systemd here)")
        root = os.path.abspath(self.mktemp())
        twistd = os.path.join(root, ".venv", "bin", "twistd")
        os.makedirs(os.path.dirname(twistd))
        with open(twistd, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(twistd, stat.S_IRWXU)
        unit = os.path.join(root, "tqserver.service")
        with open(unit, "w") as f:
            f.write(open(UNIT).read().replace("/srv/site", root))
        d = utils.getProcessOutputAndValue(analyze, ["verify", unit], env=dict(os.environ))

        def check(result):
            out, err, code = result
            # it exits 0 on keys it ignores: any message is a failure
            self.assertEqual((code, out + err), (0, b""))
        return d.addCallback(check)
