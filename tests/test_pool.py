"""WorkerPool state machine on a fake reactor: start, swap, drain, failed starts, crashes
with backoff, health replacement, stop."""
from __future__ import annotations

import os
import signal

import attrs
from twisted.trial import unittest

from tqserver.config.discovery import WorkerSpec
from tqserver.config.server import default_server_config
from tqserver.config.worker import default_worker_config
from tqserver.runtimes.command import CommandRuntime
from tqserver.supervise import instance as process
from tqserver.supervise.health import HealthChecker
from tqserver.supervise.pool import PoolContext, WorkerPool
from tqserver.supervise.ports import PortPool

from .fakes import FakeProcessReactor, GroupSignals, ScriptedProbe


class PoolTestBase(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.signals = GroupSignals(self.reactor)
        self.patch(process, "signal_group", self.signals)
        self.probe = ScriptedProbe()
        self.settings = default_server_config().workers
        self.ports = PortPool(9000, 9010, is_free=lambda p: True)
        directory = self.mktemp()
        config = attrs.evolve(default_worker_config(), type="command",
                              command=("sh", "worker.sh", "--port", "{port}"))
        self.spec = WorkerSpec(name="api", directory=directory, route="/api", type="command",
                               config=config, config_file=None)
        self.changes = []
        ctx = PoolContext(reactor=self.reactor, root=directory, mode="dev", ports=self.ports,
                          settings=lambda: self.settings, probe=self.probe,
                          changed=lambda pool, what: self.changes.append(what))
        self.pool = WorkerPool(self.spec, CommandRuntime(), ctx)

    def start_healthy(self):
        self.pool.startService()
        self.reactor.advance(0.1)   # startup_delay_ms
        self.assertEqual(len(self.pool.serving), 1)
        return self.pool.serving[0]


class StartTests(PoolTestBase):
    def test_first_instance_serves_after_first_healthy_probe(self) -> None:
        self.probe.default = False
        self.pool.startService()
        self.assertEqual(len(self.reactor.spawned), 1)
        spawned = self.reactor.spawned[0]
        self.assertEqual(spawned.argv[-3:], ["worker.sh", "--port", "9000"])
        self.assertEqual(spawned.env["WORKER_PORT"], "9000")
        self.assertEqual(spawned.env["WORKER_ROUTE"], "/api")
        self.assertEqual(spawned.env["WORKER_MODE"], "development")
        self.reactor.advance(0.1)
        self.assertEqual(self.pool.serving, ())
        self.assertEqual(self.pool.status, "starting")
        self.probe.default = True
        self.reactor.advance(0.025)
        self.assertEqual(len(self.pool.serving), 1)
        self.assertEqual(self.pool.status, "healthy")
        self.assertEqual(self.pool.serving[0].state, "ready")

    def test_never_healthy_is_stopped_and_retried_with_backoff(self) -> None:
        self.probe.default = False
        self.pool.startService()
        first = self.reactor.spawned[0]
        self.reactor.advance(0.1)
        for _ in range(400):
            self.reactor.advance(0.025)
        self.assertTrue(first.ended)
        self.assertIn((first.pid, signal.SIGTERM), self.signals.sent)
        self.assertIn("not healthy within 10000 ms", self.pool.error)
        self.assertEqual(self.pool.status, "starting")  # a retry is scheduled
        self.reactor.advance(0.1)  # restart_backoff_min_ms
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertNotIn(9000, self.ports.in_use)

    def test_exit_during_startup_is_reported(self) -> None:
        self.probe.default = False
        self.pool.startService()
        self.reactor.spawned[0].exit(3)
        self.reactor.advance(0.1)
        self.assertIn("exited with status 3 before becoming healthy", self.pool.error)

    def test_a_worker_dying_before_its_first_probe_is_a_crash_loop(self) -> None:
        """Not "starting" for ever: each exit counts as a restart, five are a crash loop."""
        self.probe.default = False
        self.pool.startService()
        for n in range(5):
            self.reactor.spawned[-1].exit(1)
            self.reactor.advance(0.15)                          # the next readiness poll
            self.assertEqual(self.pool.restarts.get("start"), n + 1)
            if n < 4:
                self.assertEqual(self.pool.status, "starting")
                while len(self.reactor.spawned) == n + 1:      # the backoff, then a retry
                    self.reactor.advance(0.05)
        self.assertTrue(self.pool.crash_loop)
        self.assertEqual(self.pool.status, "failed")            # (retried after a backoff)
        self.assertEqual(self.pool.describe()["restarts"], {"start": 5})
        while len(self.reactor.spawned) == 5:                   # its next try starts...
            self.reactor.advance(0.05)
        self.assertTrue(self.pool.deploying)
        self.assertEqual(self.pool.status, "failed")            # ...still failed

    def test_wait_serving_holds_until_ready(self) -> None:
        self.pool.startService()
        got = []
        self.pool.wait_serving(5).addCallback(got.append)
        self.assertEqual(got, [])
        self.reactor.advance(0.1)
        self.assertEqual(got, [self.pool.serving[0]])

    def test_wait_serving_times_out(self) -> None:
        self.probe.default = False
        self.pool.startService()
        got = []
        self.pool.wait_serving(1).addCallback(got.append)
        self.reactor.advance(1.0)
        self.assertEqual(got, [None])


class SwapTests(PoolTestBase):
    def test_swap_drains_old_after_new_is_healthy(self) -> None:
        old = self.start_healthy()
        old.request_started()           # a request in flight on the old instance
        self.probe.answers[9001] = False
        self.pool.deploy("source changed")
        self.reactor.advance(0.1)
        self.assertEqual(self.pool.serving, (old,))   # new one not healthy yet: no switch
        self.probe.answers[9001] = True
        self.reactor.advance(0.025)
        new = self.pool.serving[0]
        self.assertIsNot(new, old)
        self.assertEqual(new.port, 9001)
        self.assertEqual(old.state, "draining")
        self.reactor.advance(0.1)     # restart_delay_ms: still in flight, no signal yet
        self.assertNotIn((old.pid, signal.SIGTERM), self.signals.sent)
        old.request_finished()        # drained
        self.reactor.advance(0)
        self.assertIn((old.pid, signal.SIGTERM), self.signals.sent)
        self.assertEqual(old.state, "exited")
        self.assertNotIn(9000, self.ports.in_use)

    def test_grace_period_bounds_the_drain(self) -> None:
        old = self.start_healthy()
        old.request_started()
        self.pool.deploy("change")
        self.reactor.advance(0.1)
        self.reactor.advance(0.1)     # restart delay
        self.reactor.advance(0.5)     # shutdown_grace_period_ms
        self.assertIn((old.pid, signal.SIGTERM), self.signals.sent)

    def test_sigkill_after_kill_timeout(self) -> None:
        old = self.start_healthy()
        self.signals.ignore_term.add(old.pid)
        self.pool.deploy("change")
        self.reactor.advance(0.1)
        self.reactor.advance(0.1)
        self.assertIn((old.pid, signal.SIGTERM), self.signals.sent)
        self.assertNotEqual(old.state, "exited")
        self.reactor.advance(5.0)     # kill_timeout_ms
        self.assertIn((old.pid, signal.SIGKILL), self.signals.sent)
        self.assertEqual(old.state, "exited")

    def test_failed_new_instance_keeps_old_serving(self) -> None:
        old = self.start_healthy()
        self.probe.answers[9001] = False
        self.pool.deploy("change")
        for _ in range(500):
            self.reactor.advance(0.025)
        self.assertEqual(self.pool.serving, (old,))
        self.assertEqual(old.state, "ready")
        self.assertIn("not healthy", self.pool.error)
        self.assertEqual(self.pool.status, "healthy")

    def test_deploys_coalesce(self) -> None:
        self.start_healthy()
        results = [self.pool.deploy("a")]
        os.makedirs(self.spec.directory, exist_ok=True)
        with open(os.path.join(self.spec.directory, "worker.sh"), "w") as f:
            f.write("edited while a deploys")
        results += [self.pool.deploy("b"), self.pool.deploy("c")]
        # one running, the other two merged into one queued deploy
        self.reactor.advance(0.1)
        self.reactor.advance(0.1)
        fired = [d.called for d in results]
        self.assertEqual(fired, [True, True, True])
        self.assertEqual(len(self.reactor.spawned), 3)   # initial + running + one queued


class CrashTests(PoolTestBase):
    def test_crash_restarts_with_doubling_backoff(self) -> None:
        inst = self.start_healthy()
        self.reactor.by_pid(inst.pid).exit(2)
        self.assertEqual(self.pool.serving, ())
        self.assertEqual(self.pool.restarts["crash"], 1)
        self.assertIn("exited with status 2", self.pool.error)
        self.reactor.advance(0.099)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(0.001)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.1)
        second = self.pool.serving[0]
        self.reactor.by_pid(second.pid).exit(2)
        self.reactor.advance(0.199)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.001)
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_stable_run_resets_backoff(self) -> None:
        inst = self.start_healthy()
        self.reactor.by_pid(inst.pid).exit(2)
        self.reactor.advance(0.1)
        self.reactor.advance(0.1)
        second = self.pool.serving[0]
        self.reactor.advance(60)
        self.reactor.by_pid(second.pid).exit(2)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_crash_loop_is_reported(self) -> None:
        self.start_healthy()
        for _ in range(5):
            inst = self.pool.serving[0]
            self.reactor.by_pid(inst.pid).exit(1)
            for _ in range(40):
                self.reactor.advance(0.05)
                if self.pool.serving:
                    break
        self.assertTrue(self.pool.crash_loop)
        self.assertTrue(self.pool.describe()["crash_loop"])
        self.assertEqual(self.pool.status, "degraded")


class HealthReplacementTests(PoolTestBase):
    def start_checked(self):
        """A healthy instance under a HealthChecker probing every second."""
        self.settings = attrs.evolve(self.settings, health_check_interval_ms=1000)
        inst = self.start_healthy()
        checker = HealthChecker(self.reactor, lambda: [self.pool], self.probe,
                                lambda: self.settings)
        checker.startService()
        self.addCleanup(checker.stopService)
        return inst

    def test_consecutive_failures_replace_instance(self) -> None:
        inst = self.start_checked()
        self.probe.answers[inst.port] = False
        self.reactor.advance(1)
        self.reactor.advance(1)
        self.assertEqual(inst.health_failures, 2)
        self.assertEqual(self.pool.status, "degraded")
        self.assertEqual(self.pool.serving, (inst,))
        self.reactor.advance(1)       # third failure: replaced
        self.reactor.advance(0.1)
        self.assertEqual(len(self.pool.serving), 1)
        self.assertIsNot(self.pool.serving[0], inst)
        self.assertEqual(self.pool.restarts["health"], 1)

    def test_success_resets_failures(self) -> None:
        inst = self.start_checked()
        self.probe.answers[inst.port] = False
        self.reactor.advance(1)
        self.probe.answers[inst.port] = True
        self.reactor.advance(1)
        self.assertEqual(inst.health_failures, 0)


class StopTests(PoolTestBase):
    def test_stop_terminates_every_instance(self) -> None:
        inst = self.start_healthy()
        d = self.pool.stopService()
        self.assertIn((inst.pid, signal.SIGTERM), self.signals.sent)
        self.assertTrue(d.called)
        self.assertEqual(self.pool.status, "stopped")
        self.assertEqual(self.ports.in_use, frozenset())


class ProblemTests(PoolTestBase):
    def test_port_exhaustion_fails_only_this_worker(self) -> None:
        self.ports.reconfigure(9000, 9000)
        self.ports._in_use.add(9000)            # held by another worker
        self.pool.startService()
        self.assertEqual(self.pool.serving, ())
        self.assertIn("no free port", self.pool.error)
        self.assertEqual(self.pool.status, "starting")   # retried later, not spun on
        self.assertEqual(self.reactor.spawned, [])

    def test_a_swap_refused_for_lack_of_ports_is_logged(self) -> None:
        from twisted.logger import capturedLogs, formatEvent

        old = self.start_healthy()
        self.ports.reconfigure(9000, 9000)      # the running instance holds the only port
        with capturedLogs() as events:
            self.pool.deploy("SIGHUP: sources changed")
        [error] = [e for e in events if e["log_level"].name == "error"]
        text = formatEvent(error)
        self.assertIn("api: cannot start an instance for SIGHUP: sources changed", text)
        self.assertIn("no free port in workers.port_range 9000-9000", text)
        self.assertIn("the running instances keep serving", text)
        self.assertEqual(self.pool.serving, (old,))

    def test_missing_go_toolchain_names_what_to_install(self) -> None:
        from tqserver.runtimes import go
        self.patch(go, "find_tool", lambda *names: None)
        spec = attrs.evolve(self.spec, type="go")
        pool = WorkerPool(spec, go.GoRuntime(), self.pool.ctx)
        pool.startService()
        self.assertEqual(pool.status, "failed")
        self.assertIn("install Go", pool.error)
        self.assertIn("install Go", pool.build_error)
        self.assertEqual(self.reactor.spawned, [])

    def test_working_directory(self) -> None:
        self.start_healthy()
        self.assertEqual(self.reactor.spawned[0].path, self.spec.directory)
        project = attrs.evolve(self.spec, config=attrs.evolve(self.spec.config,
                                                              working_directory="project"))
        pool = WorkerPool(project, CommandRuntime(), self.pool.ctx)
        pool.startService()
        self.assertEqual(self.reactor.spawned[-1].path, self.pool.ctx.root)

    def test_env_from_config_wins(self) -> None:
        spec = attrs.evolve(self.spec, config=attrs.evolve(self.spec.config,
                                                           env={"GREETING": "hi", "PORT": "1"}))
        pool = WorkerPool(spec, CommandRuntime(), self.pool.ctx)
        pool.startService()
        env = self.reactor.spawned[-1].env
        self.assertEqual(env["GREETING"], "hi")
        self.assertEqual(env["WORKER_PORT"], "9000")
        self.assertEqual(env["WORKER_NAME"], "api")
        self.assertEqual(env["TQSERVER_ROOT"], self.pool.ctx.root)


class RecycleTests(PoolTestBase):
    def test_max_requests_recycles_by_swap(self) -> None:
        self.pool.spec = attrs.evolve(self.spec, config=attrs.evolve(self.spec.config,
                                                                     max_requests=10))
        inst = self.start_healthy()
        self.assertTrue(10 <= inst.recycle_after <= 11)      # jitter: up to +10%
        for _ in range(inst.recycle_after):
            inst.request_started()
            inst.request_finished()
        self.reactor.advance(0.1)
        self.assertIsNot(self.pool.serving[0], inst)
        self.assertEqual(self.pool.restarts["max_requests"], 1)

    def test_memory_limit_recycles(self) -> None:
        from tqserver.supervise import pool as pool_module
        self.pool.spec = attrs.evolve(self.spec, config=attrs.evolve(
            self.spec.config, memory_limit=100 * 2**20))
        inst = self.start_healthy()
        self.patch(pool_module, "tree_rss", lambda pid: 50 * 2**20)
        self.pool.check_memory(inst)
        self.assertIs(self.pool.serving[0], inst)
        self.patch(pool_module, "tree_rss", lambda pid: 150 * 2**20)
        self.pool.check_memory(inst)
        self.reactor.advance(0.1)
        self.assertIsNot(self.pool.serving[0], inst)
        self.assertEqual(self.pool.restarts["memory"], 1)

    def test_jitter(self) -> None:
        from tqserver.supervise.pool import jitter
        self.assertEqual(jitter(0), 0)
        values = {jitter(1000) for _ in range(200)}
        self.assertTrue(all(1000 <= v <= 1100 for v in values))
        self.assertGreater(len(values), 1)


class BuildTests(PoolTestBase):
    """A runtime with a build step, on the fake reactor: builds are child processes too."""

    def setUp(self) -> None:
        super().setUp()
        from tqserver.runtimes import BuildStep

        class Compiled(CommandRuntime):
            def build_steps(self, spec, mode="dev"):
                return [BuildStep(["compiler", "--out", "bin/app"], spec.directory)]
        self.pool.runtime = Compiled()

    def compiler(self, index: int = -1):
        builds = [t for t in self.reactor.spawned if "compiler" in t.argv]
        return builds[index]

    def test_build_then_start(self) -> None:
        self.pool.startService()
        self.assertEqual(len(self.reactor.spawned), 1)       # only the compiler so far
        self.compiler().exit(0)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.pool.serving), 1)
        self.assertTrue(self.pool.last_build.ok)

    def test_failed_build_keeps_old_code_and_shows_output(self) -> None:
        self.pool.startService()
        self.compiler().exit(0)
        self.reactor.advance(0.1)
        old = self.pool.serving[0]
        self.pool.deploy("source changed")
        self.compiler().proto.childDataReceived(2, b"main.go:3:1: syntax error\n")
        self.compiler().exit(1)
        self.assertEqual(self.pool.serving, (old,))
        self.assertIn("syntax error", self.pool.build_error)
        self.assertEqual(self.pool.status, "degraded")
        self.pool.forget_failed_deploy()                    # the old code is back on disk
        self.assertEqual((self.pool.error, self.pool.build_error), (None, None))
        self.assertEqual(self.pool.status, "healthy")
        self.pool.deploy("source changed")                  # fixed: next good build
        self.compiler().exit(0)
        self.reactor.advance(0.1)
        self.assertIsNone(self.pool.build_error)
        self.assertIsNot(self.pool.serving[0], old)

    def test_the_revision_is_the_one_on_disk_when_the_deploy_began_and_only_once_it_serves(self):
        on_disk = {"revision": "r1"}
        self.pool.ctx.revision = lambda: on_disk["revision"]
        self.pool.startService()
        self.compiler().exit(0)
        self.reactor.advance(0.1)
        self.assertEqual(self.pool.describe()["revision"], "r1")
        on_disk["revision"] = "r2"
        self.pool.deploy("SIGHUP")
        on_disk["revision"] = "r3"                 # a newer release while r2 builds
        self.assertEqual(self.pool.describe()["revision"], "r1")
        self.assertTrue(self.pool.describe()["deploying"])
        self.compiler().exit(1)                    # r2 does not build: r1 serves on
        self.assertEqual(self.pool.revision, "r1")
        self.assertFalse(self.pool.describe()["deploying"])
        self.pool.deploy("SIGHUP")
        self.compiler().exit(0)
        self.reactor.advance(0.1)
        self.assertEqual(self.pool.revision, "r3")

    def edit(self, text: str) -> None:
        """A source edit on disk (what makes a build request a newer one)."""
        os.makedirs(self.spec.directory, exist_ok=True)
        with open(os.path.join(self.spec.directory, "main.go"), "w") as f:
            f.write(text)

    def test_newer_change_supersedes_build_in_progress(self) -> None:
        self.pool.startService()
        self.compiler().exit(0)
        self.reactor.advance(0.1)
        self.edit("1")
        self.pool.deploy("edit 1")
        first = self.compiler()
        self.edit("22")
        self.pool.deploy("edit 2")                          # while the first compiles
        self.edit("333")
        self.pool.deploy("edit 3")
        self.assertTrue(first.ended)                        # killed (SIGKILL to its group)
        self.assertIn((first.pid, 9), self.signals.sent)
        builds = [t for t in self.reactor.spawned if "compiler" in t.argv]
        # initial, edit 1 (killed by edit 2), edit 2 (killed by edit 3), edit 3
        self.assertEqual(len(builds), 4)
        self.assertEqual([b.ended for b in builds[1:]], [True, True, False])
        self.compiler().exit(0)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.pool.serving), 1)
        self.assertFalse(self.pool.last_build.cancelled)


    def test_requests_for_the_files_in_flight_join_it(self) -> None:
        """100 HUPs while it builds: one build, one swap, and every request told its end."""
        self.pool.startService()
        self.compiler().exit(0)
        self.reactor.advance(0.1)
        old = self.pool.serving[0]
        self.edit("new")
        results = []
        first = self.pool.deploy("SIGHUP: sources changed")
        first.addCallback(results.append)
        for _ in range(100):
            self.pool.deploy("SIGHUP: sources changed").addCallback(results.append)
        self.assertEqual(len([t for t in self.reactor.spawned if "compiler" in t.argv]), 2)
        self.assertFalse(self.compiler().ended)
        self.compiler().exit(0)
        self.pool.deploy("SIGHUP: sources changed").addCallback(results.append)  # mid-swap
        self.reactor.advance(0.1)
        self.assertEqual(results, [True] * 102)
        self.assertEqual(len([t for t in self.reactor.spawned if "compiler" in t.argv]), 2)
        self.assertEqual(len(self.pool.serving), 1)
        self.assertIsNot(self.pool.serving[0], old)
        self.assertFalse(self.pool.deploying)

    def test_a_restart_in_flight_does_not_absorb_a_build(self) -> None:
        self.pool.startService()
        self.compiler().exit(0)
        self.reactor.advance(0.1)
        self.pool.deploy("artifact changed", build=False)   # a restart, no build
        self.edit("new")
        self.pool.deploy("sources changed")                 # queued behind it
        self.reactor.advance(0.1)
        self.assertEqual(len([t for t in self.reactor.spawned if "compiler" in t.argv]), 2)


class ScalingTests(PoolTestBase):
    def setUp(self) -> None:
        super().setUp()
        self.pool.spec = attrs.evolve(self.spec, config=attrs.evolve(
            self.spec.config, scaling=attrs.evolve(self.spec.config.scaling, min_workers=1,
                                                   max_workers=3, queue_threshold=2,
                                                   scale_down_delay=60)))
        self.settings = attrs.evolve(self.settings, health_check_interval_ms=1000)

    def test_scale_up_under_load_and_down_when_idle(self) -> None:
        first = self.start_healthy()
        for _ in range(2):
            first.request_started()
        self.assertEqual(len(self.reactor.spawned), 1)      # at the threshold: not yet
        first.request_started()                              # 3 in flight > 2 per instance
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.pool.serving), 2)
        self.assertEqual(self.pool.pick().inflight, 0)       # least outstanding first
        first.request_started()                              # 4 over 2 instances: fine
        self.assertEqual(len(self.reactor.spawned), 2)
        for _ in range(4):
            first.request_finished()
        checker = HealthChecker(self.reactor, lambda: [self.pool], self.probe,
                                lambda: self.settings)
        checker.startService()
        self.addCleanup(checker.stopService)
        self.reactor.advance(30)
        self.assertEqual(len(self.pool.serving), 2)          # not idle long enough
        for _ in range(40):
            self.reactor.advance(1)
        self.assertEqual(len(self.pool.serving), 1)
        self.assertEqual(self.pool.status, "healthy")

    def test_never_beyond_max(self) -> None:
        first = self.start_healthy()
        for _ in range(50):
            first.request_started()
            self.reactor.advance(0.1)
            for inst in self.pool.serving:
                if inst is not first:
                    inst.request_started()
        self.assertEqual(len(self.pool.serving), 3)

    def test_swap_keeps_the_scale(self) -> None:
        first = self.start_healthy()
        for _ in range(3):
            first.request_started()
        self.reactor.advance(0.1)
        self.assertEqual(len(self.pool.serving), 2)
        self.pool.deploy("source changed")
        self.reactor.advance(0.1)
        self.assertEqual(len(self.pool.serving), 2)
        self.assertNotIn(first, self.pool.serving)
