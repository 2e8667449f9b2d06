"""bin/deploy's decisions without processes: when /health says a release serves or has
failed, which release --rollback goes back to and which ones are pruned, the rsync filters,
and the health wait driven by a fake clock."""
from __future__ import annotations

from twisted.trial import unittest

from tqserver.config.deployment import TargetConfig
from tqserver.deploy import health
from tqserver.deploy.releases import State, to_prune
from tqserver.deploy.sync import filters


def worker(revision, deploying=False, error=None, status="healthy"):
    return {"revision": revision, "deploying": deploying, "error": error, "status": status}


class VerdictTests(unittest.TestCase):

    def test_serving_only_when_the_root_and_every_worker_have_the_release(self):
        new = {"revision": "R2", "workers": {"a": worker("R2"), "b": worker("R2")}}
        self.assertEqual(health.verdict(new, "R2", []), (True, None))
        old_root = dict(new, revision="R1")
        self.assertEqual(health.verdict(old_root, "R2", []), (False, None))
        busy = {"revision": "R2", "workers": {"a": worker("R1", deploying=True)}}
        self.assertEqual(health.verdict(busy, "R2", []), (False, None))

    def test_a_worker_that_gave_up_is_a_failure_at_once(self):
        failed = {"revision": "R2", "workers": {"a": worker("R1", error="build failed"),
                                                 "b": worker("R2")}}
        self.assertEqual(health.verdict(failed, "R2", []), (False, "a: build failed"))
        self.assertEqual(health.verdict(failed, "R2", ["b"]), (True, None))   # only b asked

    def test_a_named_worker_not_started_yet_is_waited_for(self):
        self.assertEqual(health.verdict({"revision": "R2", "workers": {}}, "R2", ["new"]),
                         (False, None))

    def test_wait_times_out_on_the_clock(self):
        now = [0.0]
        health_answers = iter([{"revision": "R1", "workers": {}}] * 100)
        self.patch(health, "fetch_health", lambda url: next(health_answers))

        def sleep(seconds):
            now[0] += seconds
        with self.assertRaises(health.NotServing) as caught:
            health.wait_until_serving("http://x/health", "R2", [], 1.0,
                                      clock=lambda: now[0], sleep=sleep)
        self.assertIn("not serving after 1s", str(caught.exception))


class ReleaseStateTests(unittest.TestCase):

    def test_previous_and_pruning_spare_current_and_previous(self):
        state = State("r3", ["r1", "r2", "r3", "r4"], ["f1.failed", "f2.failed"])
        self.assertEqual(state.previous, "r2")
        self.assertEqual(to_prune(state, 2), ["r1", "r4", "f1.failed"])
        self.assertEqual(to_prune(state, 5), ["f1.failed"])
        self.assertIsNone(State("r1", ["r1"]).previous)


class FilterTests(unittest.TestCase):

    def test_build_output_is_excluded_or_protected_and_workers_selected(self):
        on_target = filters(TargetConfig(root="/srv", health_url="http://x"), "workers", [])
        self.assertIn("--exclude=/workers/*/bin/", on_target)
        self.assertIn("--exclude=node_modules/", on_target)
        self.assertIn("--exclude=.venv/", on_target)
        self.assertEqual(on_target[:2], ["--exclude=/logs", "--exclude=/run"])
        shipped = filters(TargetConfig(root="/srv", health_url="http://x", build="local"),
                          "workers", ["hello"])
        self.assertIn("--filter=P /workers/*/bin/***", shipped)
        self.assertEqual(shipped[-4:], ["--include=/workers/", "--include=/workers/hello/***",
                                        "--exclude=/workers/*", "--exclude=/*"])
