"""bin/build-dev and bin/build-prod on a throwaway project, with the real toolchains: what is
built, what is skipped as up to date, what a failure prints, and the exit status."""
from __future__ import annotations

import os
import re
import shutil

from twisted.internet import defer, utils
from twisted.trial import unittest

from .support import REPO, Project, find_go

BROKEN_GO = "package main\n\nfunc main() { undefined_call() }\n"


def clean_env() -> dict:
    """The environment for a bin/ script: no PYTHONPATH of ours (under trial -j it holds
    this interpreter's whole path), Go reachable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    go = find_go()
    if go:
        env["PATH"] = os.path.dirname(go) + os.pathsep + env.get("PATH", "")
    return env


async def run_script(name: str, *args: str, env=None):
    """(exit status, output) of bin/<name> ARGS."""
    out, err, code = await utils.getProcessOutputAndValue(
        os.path.join(REPO, "bin", name), args, env=env or clean_env(), path=REPO)
    return code, (out + err).decode("utf-8", "replace")


def lines_by_worker(output: str) -> dict:
    """{worker: (type, status)} from the per-worker lines."""
    found = {}
    for line in output.splitlines():
        m = re.match(r"^(\S+)\s+(go|php|bun|python|kotlin|command)\s+(built|up to date|failed)",
                     line)
        if m:
            found[m.group(1)] = (m.group(2), m.group(3))
    return found


class BuildScriptTests(unittest.TestCase):
    timeout = 300

    def setUp(self) -> None:
        if find_go() is None:
            raise unittest.SkipTest("Go is not installed")
        self.project = Project(os.path.abspath(self.mktemp()))
        self.root = self.project.root
        self.project.copy_worker("hello")
        self.project.copy_worker("blog")
        self.project.write("workers/broken/src/main.go", BROKEN_GO)

    def build(self, script: str, *args: str):
        return defer.ensureDeferred(run_script(script, "--root", self.root, *args))

    @defer.inlineCallbacks
    def test_dev_builds_what_is_out_of_date_and_fails_on_a_broken_worker(self):
        code, out = yield self.build("build-dev")
        self.assertEqual(code, 1, out)
        self.assertEqual(lines_by_worker(out), {
            "hello": ("go", "built"), "blog": ("php", "up to date"),
            "broken": ("go", "failed")}, out)
        self.assertIn("undefined: undefined_call", out)          # the compiler's output
        self.assertRegex(out, r"hello\s+go\s+built\s+\d+\.\d\ds\s+go build ")
        self.assertIn("build-dev: 3 worker(s): 1 built, 1 failed, 1 up to date", out)
        binary = os.path.join(self.root, "workers/hello/bin/hello")
        self.assertTrue(os.access(binary, os.X_OK))

        mtime = os.stat(binary).st_mtime_ns
        code, out = yield self.build("build-dev", "hello", "blog")   # only these
        self.assertEqual(code, 0, out)
        self.assertEqual(lines_by_worker(out), {
            "hello": ("go", "up to date"), "blog": ("php", "up to date")}, out)
        self.assertEqual(os.stat(binary).st_mtime_ns, mtime)          # not rebuilt

        source = os.path.join(self.root, "workers/hello/src/main.go")
        os.utime(source, ns=(mtime + 10**9, mtime + 10**9))
        code, out = yield self.build("build-dev", "hello")
        self.assertEqual((code, lines_by_worker(out)), (0, {"hello": ("go", "built")}), out)

        # The prod build is another build (other flags): not up to date after a dev one.
        self.project.write("workers/broken/src/main.go", "package main\n\nfunc main() {}\n")
        code, out = yield self.build("build-dev", "broken")
        self.assertEqual((code, lines_by_worker(out)), (0, {"broken": ("go", "built")}), out)
        code, out = yield self.build("build-prod", "broken")
        self.assertEqual(code, 0, out)
        self.assertRegex(out, r"broken\s+go\s+built .* go build -buildvcs=false -trimpath "
                              r"-ldflags=-s -w -o bin/broken")

    @defer.inlineCallbacks
    def test_prod_lints_php_and_installs_bun_for_production(self):
        if shutil.which("php") is None:
            raise unittest.SkipTest("no PHP CLI")
        shutil.rmtree(os.path.join(self.root, "workers/broken"))
        shutil.rmtree(os.path.join(self.root, "workers/hello"))
        self.project.copy_worker("api")
        code, out = yield self.build("build-prod")
        self.assertEqual(code, 0, out)
        self.assertEqual(lines_by_worker(out), {
            "blog": ("php", "built"), "api": ("bun", "built")}, out)
        self.assertIn("bun install --production", out)
        self.assertIn("php-lint", out)

        self.project.write("workers/blog/public/oops.php", "<?php echo 'x'\n$y = ;\n")
        code, out = yield self.build("build-prod")
        self.assertEqual(code, 1, out)
        self.assertEqual(lines_by_worker(out), {
            "blog": ("php", "failed"), "api": ("bun", "up to date")}, out)
        self.assertIn("oops.php", out)
        self.assertIn("syntax error", out)

        code, out = yield self.build("build-dev", "blog")     # dev does not lint
        self.assertEqual((code, lines_by_worker(out)), (0, {"blog": ("php", "up to date")}))

    @defer.inlineCallbacks
    def test_unknown_worker_and_bad_configuration(self):
        code, out = yield self.build("build-dev", "nope")
        self.assertEqual(code, 2, out)
        self.assertIn("no worker named 'nope' in dev mode (workers: blog, broken, hello)", out)

        self.project.write("workers/bad/config/worker.yaml", "path: [1\n")
        shutil.rmtree(os.path.join(self.root, "workers/broken"))
        code, out = yield self.build("build-dev", "blog")      # another worker's error
        self.assertEqual((code, lines_by_worker(out)), (0, {"blog": ("php", "up to date")}))
        self.assertNotIn("error", out)
        for args in [("bad",), ()]:                             # named, or all workers
            code, out = yield self.build("build-dev", *args)
            self.assertEqual(code, 1, out)
            self.assertRegex(out, r"error: .*workers/bad/config/worker.yaml:\d+:\d+")
