"""Every shell command DEPLOYMENT.md tells operators to run is run by a test or by CI: each
one is listed here with what runs it, and a command added to DEPLOYMENT.md without a line
here (or a line left for a command that is gone) fails."""
from __future__ import annotations

import importlib
import os
import re

from twisted.trial import unittest

from .support import REPO

# command as written in DEPLOYMENT.md (comment and line continuations removed) -> what runs
# it: a test ("tests.module.Class.test_method") or a CI step ("ci: FILE: what it does").
RUN_BY = {
    "git clone <your project> /srv/site && cd /srv/site":
        "ci: .ci/run: CI runs on a clean clone of the repository",
    "sudo bin/install-toolchains --only go,php":
        "ci: bin/test: bin/setup --toolchains runs bin/install-toolchains (every tool)",
    "bin/setup":
        "ci: bin/test: runs bin/setup before the tests",
    "cd /srv/site":
        "ci: bin/test: the tests run from the project root",
    ".venv/bin/twistd --pidfile run/tqserver.pid --logfile logs/twistd.log tqserver --mode prod":
        "tests.test_daemon_integration.FreshDaemonTests.test_daemon_on_a_fresh_project",
    "sudo cp etc/systemd/tqserver.service /etc/systemd/system/":
        "tests.test_systemd_unit.SystemdUnitTests.test_systemd_analyze_verify",
    "sudo systemctl daemon-reload && sudo systemctl enable --now tqserver":
        "tests.test_systemd_unit.SystemdUnitTests.test_systemd_analyze_verify",
    "rsync -a --delete --filter='P workers/*/bin/***' --exclude logs/ --exclude run/"
    " --exclude .venv/ --exclude node_modules/ ./ server:/srv/site/":
        "tests.test_missing_outputs_integration.MissingOutputTests"
        ".test_rsync_keeps_bin_and_hup_rebuilds_deleted_bin",
    "ssh server 'kill -HUP $(cat /srv/site/run/tqserver.pid)'":
        "tests.test_integration.HangupTests.test_sighup_swaps_in_new_code_without_failures",
    ".venv/bin/twistd -n --pidfile /srv/site/shared/run/tqserver.pid tqserver"
    " --root /srv/site/current --mode prod":
        "tests.test_deploy.DeployLocalTests.test_deploy_keeps_what_the_target_built_and_rolls_back",
    "bin/deploy web1":
        "tests.test_deploy.SshTargetTests.test_deploy_over_ssh",
    "bin/deploy --dry-run web1":
        "tests.test_deploy.DeployLocalTests.test_deploy_keeps_what_the_target_built_and_rolls_back",
    "bin/deploy --rollback web1":
        "tests.test_deploy.SshTargetTests.test_deploy_over_ssh",
    "bin/deploy --rolling cluster app":
        "tests.test_cluster_integration.RollingDeployTests.test_rolling_deploy_behind_haproxy_drops_nothing",
    "sudo cp etc/logrotate.d/tqserver /etc/logrotate.d/tqserver":
        "tests.test_logrotate_integration.LogrotateTests.test_forced_rotation_reopens_every_log",
}


def documented_commands(text: str) -> list[str]:
    """The commands of DEPLOYMENT.md's ```sh blocks, one per logical line."""
    commands = []
    for block in re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def resolve(dotted: str):
    """The test method named ``dotted``; raises if any part of it is gone."""
    module, cls, method = dotted.rsplit(".", 2)
    return getattr(getattr(importlib.import_module(module), cls), method)


class DeploymentCommandsTests(unittest.TestCase):
    def setUp(self) -> None:
        with open(os.path.join(REPO, "DEPLOYMENT.md")) as f:
            self.commands = documented_commands(f.read())

    def test_every_documented_command_is_run_by_something(self) -> None:
        missing = [c for c in self.commands if c not in RUN_BY]
        self.assertEqual(missing, [], "DEPLOYMENT.md commands no test or CI step runs")

    def test_nothing_listed_that_is_no_longer_documented(self) -> None:
        self.assertEqual(sorted(set(RUN_BY) - set(self.commands)), [])

    def test_what_runs_them_exists(self) -> None:
        for command, runner in RUN_BY.items():
            if runner.startswith("ci: "):
                path = runner[4:].split(":", 1)[0]
                self.assertTrue(os.path.exists(os.path.join(REPO, path)), (command, path))
            else:
                self.assertTrue(callable(resolve(runner)), (command, runner))

    def test_commands_are_read_as_written(self) -> None:
        text = "```sh\nrsync -a \\\n   --x ./ h:/  # why\n# only a comment\nbin/setup\n```\n"
        self.assertEqual(documented_commands(text), ["rsync -a --x ./ h:/", "bin/setup"])
