"""Prod reload decisions: what changed on disk since a worker was deployed."""
from __future__ import annotations

import os

from twisted.trial import unittest

from tqserver.config.discovery import WorkerSpec
from tqserver.config.worker import default_worker_config
from tqserver.runtimes.go import GoRuntime
from tqserver.supervise.fingerprint import Fingerprint, tree_signature


class FingerprintTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        for sub in ("src", "bin", "views", "config", "node_modules"):
            os.makedirs(os.path.join(self.dir, sub))
        self.files = {
            "src": self.touch("src/main.go", 1000),
            "bin": self.touch("bin/hello", 1000),
            "views": self.touch("views/page.html", 1000),
            "config": self.touch("config/worker.yaml", 1000),
        }
        for sub in ("src", "bin", "views", "config", "node_modules", ""):
            os.utime(os.path.join(self.dir, sub), (1000, 1000))
        self.spec = WorkerSpec("hello", self.dir, "/hello", "go", default_worker_config(),
                               self.files["config"])
        self.runtime = GoRuntime()
        self.deployed = Fingerprint.take(self.spec, self.runtime)

    def touch(self, rel: str, mtime: float) -> str:
        path = os.path.join(self.dir, rel)
        with open(path, "a"):
            pass
        os.utime(path, (mtime, mtime))
        return path

    def changed(self):
        return self.deployed.difference(Fingerprint.take(self.spec, self.runtime))

    def test_nothing_changed(self) -> None:
        self.assertIsNone(self.changed())

    def test_source_edit_means_rebuild(self) -> None:
        self.touch("src/main.go", 2000)
        self.assertEqual(self.changed(), "sources")

    def test_deleted_source_means_rebuild(self) -> None:
        self.touch("src/util.go", 1000)
        os.utime(os.path.join(self.dir, "src"), (1000, 1000))
        self.deployed = Fingerprint.take(self.spec, self.runtime)
        os.unlink(os.path.join(self.dir, "src", "util.go"))
        self.assertEqual(self.changed(), "sources")

    def test_deployed_binary_means_restart_without_build(self) -> None:
        self.touch("bin/hello", 3000)
        self.touch("src/main.go", 3000)     # rsync brought sources too: the binary wins
        self.assertEqual(self.changed(), "artifact")

    def test_deleted_binary_means_rebuild(self) -> None:
        # rsync --delete without the bin/ protect rule: sources unchanged, binary gone
        os.unlink(self.files["bin"])
        self.assertEqual(self.changed(), "sources")

    def test_missing_outputs_of_each_runtime(self) -> None:
        from tqserver.runtimes.bun import BunRuntime
        from tqserver.runtimes.python import PythonRuntime

        self.assertEqual(GoRuntime().outputs(self.spec), [self.files["bin"]])
        self.assertEqual(BunRuntime().outputs(self.spec), [])  # no package.json
        self.assertEqual(PythonRuntime().outputs(self.spec), [])  # no requirements
        self.touch("package.json", 1000)
        self.touch("requirements.txt", 1000)
        bun = Fingerprint.take(self.spec, BunRuntime())
        self.assertEqual(bun.missing, (os.path.join(self.dir, "node_modules",
                                                    ".tqserver-installed"),))
        self.assertEqual(self.deployed.difference(bun), "sources")
        py = Fingerprint.take(self.spec, PythonRuntime())
        self.assertEqual(py.missing, (os.path.join(self.dir, ".venv", "bin", "python"),))

    def test_views_and_config(self) -> None:
        self.touch("views/page.html", 2000)
        self.assertEqual(self.changed(), "views")
        self.deployed = Fingerprint.take(self.spec, self.runtime)
        self.touch("config/worker.yaml", 2000)
        self.assertEqual(self.changed(), "config")

    def test_dependencies_dir_is_not_source(self) -> None:
        self.touch("node_modules/x.js", 5000)
        self.assertIsNone(self.changed())

    def test_signature_of_missing_paths(self) -> None:
        self.assertEqual(tree_signature([os.path.join(self.dir, "nope")]), "")

    def test_rsync_with_an_older_mtime_is_a_change(self) -> None:
        self.touch("src/util.go", 5000)
        self.deployed = Fingerprint.take(self.spec, self.runtime)
        self.touch("src/main.go", 900)      # a deployed copy, older than its neighbour
        self.assertEqual(self.changed(), "sources")

    def test_same_time_new_content_size_is_a_change(self) -> None:
        path = os.path.join(self.dir, "src", "main.go")
        with open(path, "w") as f:
            f.write("package main // longer now")
        os.utime(path, (1000, 1000))
        self.assertEqual(self.changed(), "sources")


class StubPool:
    def __init__(self, changed, serving=True, deploying=False):
        self._changed = changed
        self.deploys = []
        self.serving = (object(),) if serving else ()
        self.deploying = deploying
        self.revision = "r1"
        self.forgotten = False

    def forget_failed_deploy(self):
        self.forgotten = True

    def changed_on_disk(self):
        return self._changed

    def deploy(self, reason, build=True):
        self.deploys.append((reason, build))


class ReloadDecisionTests(unittest.TestCase):
    """Supervisor.reload with pools whose disk state is given."""

    def reload(self, pools, everything=False, revision="r1"):
        from tqserver.supervise.supervisor import Supervisor
        sup = Supervisor.__new__(Supervisor)
        sup.root = self.mktemp()
        os.makedirs(sup.root)
        with open(os.path.join(sup.root, "REVISION"), "w") as f:
            f.write(revision + "\n")
        sup.pools = pools
        sup.reload_config = lambda: None
        sup.sync_workers = lambda: {}
        return sup.reload("SIGHUP", everything=everything)

    def test_only_changed_workers_are_redone(self) -> None:
        pools = {"a": StubPool(None), "b": StubPool("sources"), "c": StubPool("artifact"),
                 "d": StubPool("views")}
        actions = self.reload(pools)
        self.assertEqual(actions, {"b": "rebuilt", "c": "restarted", "d": "restarted"})
        self.assertEqual(pools["a"].deploys, [])
        self.assertEqual(pools["b"].deploys, [("SIGHUP: sources changed", True)])
        self.assertEqual(pools["c"].deploys, [("SIGHUP: artifact changed", False)])

    def test_unchanged_serving_workers_take_the_new_revision_at_once(self) -> None:
        pools = {"same": StubPool(None), "changed": StubPool("sources"),
                 "failed": StubPool(None, serving=False), "busy": StubPool(None, deploying=True)}
        self.reload(pools, revision="r2")
        self.assertEqual({n: p.revision for n, p in pools.items()},
                         {"same": "r2", "changed": "r1", "failed": "r1", "busy": "r1"})
        self.assertEqual([n for n, p in pools.items() if p.forgotten], ["same"])

    def test_everything(self) -> None:
        pools = {"a": StubPool(None)}
        self.assertEqual(self.reload(pools, everything=True), {"a": "rebuilt"})
        self.assertEqual(pools["a"].deploys, [("SIGHUP", True)])


class RevisionFileTests(unittest.TestCase):
    def test_first_line_as_a_safe_token_or_empty(self) -> None:
        from tqserver.supervise.revision import read_revision
        root = self.mktemp()
        os.makedirs(root)
        self.assertEqual(read_revision(root), "")
        with open(os.path.join(root, "REVISION"), "w") as f:
            f.write("20250102T030405Z-abc1234 <script>\nsecond line\n")
        self.assertEqual(read_revision(root), "20250102T030405Z-abc1234script")
