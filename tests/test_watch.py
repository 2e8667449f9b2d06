"""Dev-mode change detection: classification, debounce (Clock), and real inotify in a temp
tree with editor save patterns."""
from __future__ import annotations

import os
import signal

import attrs
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tqserver.config.server import default_server_config
from tqserver.supervise.watch import Change, Debouncer, DevWatcher, HangupReload, classify


class ClassifyTests(unittest.TestCase):
    def setUp(self) -> None:
        self.workers = "/p/workers"
        self.dirs = {"hello": "/p/workers/hello", "api": "/p/workers/api",
                     "api/v1/users": "/p/workers/api/v1/users"}
        self.ignore = default_server_config().file_watcher.ignore

    def kind(self, path: str):
        return classify(path, self.workers, "/p/etc/server.yaml", self.dirs, self.ignore)

    def test_kinds(self) -> None:
        self.assertEqual(self.kind("/p/workers/hello/src/main.go"), Change("source", "hello"))
        self.assertEqual(self.kind("/p/workers/hello/go.mod"), Change("source", "hello"))
        self.assertEqual(self.kind("/p/workers/hello/config/worker.yaml"), Change("config", "hello"))
        self.assertEqual(self.kind("/p/workers/hello/public/site.css"), Change("public", "hello"))
        self.assertEqual(self.kind("/p/workers/hello/views/page.html"), Change("views", "hello"))
        self.assertEqual(self.kind("/p/etc/server.yaml"), Change("server_config"))

    def test_nested_worker_wins(self) -> None:
        self.assertEqual(self.kind("/p/workers/api/v1/users/src/main.py"),
                         Change("source", "api/v1/users"))
        self.assertEqual(self.kind("/p/workers/api/src/main.py"), Change("source", "api"))

    def test_new_and_removed_directories(self) -> None:
        self.assertEqual(self.kind("/p/workers/blog"), Change("discover"))
        self.assertEqual(self.kind("/p/workers/blog/src/main.py"), Change("discover"))
        self.assertEqual(self.kind("/p/workers/hello"), Change("discover"))

    def test_noise_is_ignored(self) -> None:
        for path in ["/p/workers/hello/bin/hello", "/p/workers/hello/src/4913",
                     "/p/workers/hello/src/.main.go.swp", "/p/workers/hello/src/main.go~",
                     "/p/workers/hello/src/.#main.go", "/p/workers/api/node_modules/x/y.js",
                     "/p/workers/api/.venv/lib/python3.11/site-packages/flask/app.py",
                     "/p/workers/api/src/node_modules/x.js",
                     "/p/workers/hello/src/__pycache__/m.pyc", "/p/workers/.git/HEAD",
                     "/p/etc/other.yaml", "/p/workers/hello/config/notes.txt",
                     "/p/workers/hello/build/libs/app.jar", "/p/workers/hello/target/app.jar",
                     "/p/workers/hello/.gradle/cache"]:
            self.assertIsNone(self.kind(path), path)


class DebouncerTests(unittest.TestCase):
    def test_burst_becomes_one_batch(self) -> None:
        clock = task.Clock()
        batches = []
        d = Debouncer(clock, lambda: 0.05, batches.append)
        d.add(Change("source", "a"))
        clock.advance(0.04)
        d.add(Change("source", "a"))
        d.add(Change("public", "b"))
        clock.advance(0.04)
        self.assertEqual(batches, [])
        clock.advance(0.01)
        self.assertEqual(batches, [{Change("source", "a"), Change("public", "b")}])
        clock.advance(1)
        self.assertEqual(len(batches), 1)

    def test_a_stream_that_never_pauses_is_handed_over_after_the_longest_wait(self) -> None:
        clock = task.Clock()
        batches = []
        d = Debouncer(clock, lambda: 0.05, batches.append)
        for _ in range(99):                     # one change every 0.02 s for ~2 s
            d.add(Change("source", "a"))
            clock.advance(0.02)
        self.assertEqual(len(batches), 1)       # at MAX_WAIT_SECONDS, not after the stream
        d.add(Change("source", "a"))
        clock.advance(0.05)
        self.assertEqual(len(batches), 2)       # the rest, once it paused

    def test_cancel(self) -> None:
        clock = task.Clock()
        batches = []
        d = Debouncer(clock, lambda: 0.05, batches.append)
        d.add(Change("discover"))
        d.cancel()
        clock.advance(1)
        self.assertEqual(batches, [])


class HangupReloadTests(unittest.TestCase):
    """SIGHUP is debounced like file events: a burst is one reload."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.callFromThread = lambda f, *a: f(*a)  # (the signal handler's hop)
        self.reloads: list[str] = []
        self.hup = HangupReload(self.clock, self.reloads.append, delay=lambda: 0.05)
        self.hup.startService()
        self.addCleanup(self.hup.stopService)

    def signal(self) -> None:
        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)  # as the kernel would

    def test_one_signal_is_one_reload_after_the_delay(self) -> None:
        self.signal()
        self.clock.advance(0.04)
        self.assertEqual(self.reloads, [])
        self.clock.advance(0.02)
        self.assertEqual(self.reloads, ["SIGHUP"])

    def test_a_hundred_signals_in_half_a_second_are_one_reload(self) -> None:
        for _ in range(100):
            self.signal()
            self.clock.advance(0.005)
        self.assertEqual(self.reloads, [])
        self.clock.advance(0.05)
        self.assertEqual(self.reloads, ["SIGHUP x100"])
        self.signal()                                   # a later one is a reload of its own
        self.clock.advance(0.05)
        self.assertEqual(self.reloads, ["SIGHUP x100", "SIGHUP"])

    def test_stopping_puts_the_previous_handler_back_and_drops_a_pending_reload(self):
        self.signal()
        self.hup.stopService()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), self.hup._on_signal)
        self.clock.advance(1)
        self.assertEqual(self.reloads, [])
        self.hup.startService()                         # (for the cleanup's stop)


class FakePool:
    def __init__(self, directory: str) -> None:
        self.spec = attrs.make_class("Spec", ["directory"])(directory)


class FakeSupervisor:
    def __init__(self, root: str) -> None:
        self.workers_dir = os.path.join(root, "workers")
        self.config_path = os.path.join(root, "etc", "server.yaml")
        self.config = attrs.evolve(default_server_config(), file_watcher=attrs.evolve(
            default_server_config().file_watcher, debounce_ms=50))
        self.pools = {}
        self.reloads = []

    def reload(self, why):
        self.reloads.append(why)


class InotifyBase(unittest.TestCase):
    """Real inotify events; debounce on a Clock advanced by the test."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "workers", "hello", "src"))
        os.makedirs(os.path.join(self.root, "etc"))
        self.src = os.path.join(self.root, "workers", "hello", "src")
        self.write(os.path.join(self.src, "main.go"), "package main\n")
        self.sup = FakeSupervisor(self.root)
        self.sup.pools["hello"] = FakePool(os.path.join(self.root, "workers", "hello"))
        self.clock = task.Clock()
        self.batches = []
        self.watcher = DevWatcher(reactor, self.sup, self.batches.append)
        self.watcher.debouncer.clock = self.clock
        self.watcher.clock = self.clock
        self.watcher.startService()
        self.addCleanup(self.watcher.stopService)

    def write(self, path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text)

    async def settle(self) -> None:
        """Let inotify deliver what happened, then let the debounce expire."""
        for _ in range(10):
            await task.deferLater(reactor, 0.01, lambda: None)
        self.clock.advance(1.0)


class RealInotifyTests(InotifyBase):
    def test_plain_save(self):
        return defer.ensureDeferred(self._plain_save())

    async def _plain_save(self):
        self.write(os.path.join(self.src, "main.go"), "package main // v2\n")
        await self.settle()
        self.assertEqual(self.batches, [{Change("source", "hello")}])

    def test_vim_style_save_is_one_change(self):
        return defer.ensureDeferred(self._vim_save())

    async def _vim_save(self):
        main = os.path.join(self.src, "main.go")
        probe = os.path.join(self.src, "4913")            # vim's writability probe
        self.write(probe, "")
        os.unlink(probe)
        self.write(os.path.join(self.src, ".main.go.swp"), "swap")
        os.rename(main, main + "~")                       # backup
        self.write(main, "package main // v3\n")
        os.chmod(main, 0o644)
        os.unlink(main + "~")
        await self.settle()
        self.assertEqual(self.batches, [{Change("source", "hello")}])

    def test_temp_then_rename_is_one_change(self):
        return defer.ensureDeferred(self._atomic_save())

    async def _atomic_save(self):
        tmp = os.path.join(self.src, ".goutputstream-XYZ")
        self.write(tmp, "package main // v4\n")
        os.rename(tmp, os.path.join(self.src, "main.go"))
        await self.settle()
        self.assertEqual(self.batches, [{Change("source", "hello")}])

    def test_noise_only_triggers_nothing(self):
        return defer.ensureDeferred(self._noise_only())

    async def _noise_only(self):
        self.write(os.path.join(self.src, ".main.go.swp"), "swap")
        self.write(os.path.join(self.src, "4913"), "")
        os.makedirs(os.path.join(self.root, "workers", "hello", "bin"))
        self.write(os.path.join(self.root, "workers", "hello", "bin", "hello"), "ELF")
        await self.settle()
        self.assertEqual(self.batches, [])

    def test_new_directory_and_files_in_it(self):
        return defer.ensureDeferred(self._new_dir())

    async def _new_dir(self):
        new = os.path.join(self.root, "workers", "blog", "src")
        os.makedirs(new)
        self.write(os.path.join(new, "main.py"), "print()\n")
        await self.settle()
        self.assertEqual(self.batches, [{Change("discover")}])
        # files in directories created later are watched too
        self.sup.pools["blog"] = FakePool(os.path.join(self.root, "workers", "blog"))
        await self.settle()
        self.write(os.path.join(new, "main.py"), "print(2)\n")
        await self.settle()
        self.assertEqual(self.batches[-1], {Change("source", "blog")})

    def test_server_config(self):
        return defer.ensureDeferred(self._server_config())

    async def _server_config(self):
        self.write(self.sup.config_path, "server: {port: 8081}\n")
        await self.settle()
        self.assertEqual(self.batches, [{Change("server_config")}])


    def test_deleted_worker_directory_and_watching_goes_on(self):
        return defer.ensureDeferred(self._deleted())

    async def _deleted(self):
        import shutil
        shutil.rmtree(os.path.join(self.root, "workers", "hello"))
        await self.settle()
        self.assertIn(Change("discover"), self.batches[-1])
        del self.sup.pools["hello"]
        # the watcher still works after a watched directory went away
        os.makedirs(os.path.join(self.root, "workers", "other"))
        await self.settle()
        self.assertEqual(self.batches[-1], {Change("discover")})


class WatchedTreeTests(InotifyBase):
    """What is watched at all: never dependency trees, build output or ignored directories;
    a directory that vanishes before its watch is added is skipped; a failing watcher says
    so and starts over."""

    def worker_dir(self, *parts):
        return os.path.join(self.root, "workers", "hello", *parts)

    def make_noise_dirs(self):
        for parts in [("node_modules", "hono", "dist"), (".venv", "lib", "site-packages", "x"),
                      ("bin",), ("data", "db"), ("build", "libs"), ("target",),
                      ("generated-assets", "x"), ("src", "__pycache__")]:
            os.makedirs(self.worker_dir(*parts), exist_ok=True)

    def assert_nothing_watched_under_noise(self):
        watched = self.watcher.watched()
        for name in ("node_modules", ".venv", "bin", "data", "build", "target",
                     "generated-assets", "__pycache__"):
            inside = [p for p in watched if (os.sep + name) in p]
            self.assertEqual(inside, [], name)
        self.assertIn(self.src, watched)

    def test_dependency_and_output_dirs_are_never_descended(self):
        return defer.ensureDeferred(self._never_descended())

    async def _never_descended(self):
        # Present at start ...
        self.watcher.stopService()
        self.make_noise_dirs()
        self.sup.config = attrs.evolve(self.sup.config, file_watcher=attrs.evolve(
            self.sup.config.file_watcher,
            ignore=(*self.sup.config.file_watcher.ignore, "generated-*")))
        self.watcher.startService()
        self.assert_nothing_watched_under_noise()
        # ... and created while running (bun install, pip install into .venv, go build).
        import shutil
        for name in ("node_modules", ".venv", "bin", "data", "build", "target",
                     "generated-assets"):
            shutil.rmtree(self.worker_dir(name))
        await self.settle()
        self.batches.clear()
        self.make_noise_dirs()
        for parts in [("node_modules", "hono", "dist", "index.js"),
                      (".venv", "lib", "site-packages", "x", "__init__.py"),
                      (".venv", "pyvenv.cfg"), ("data", "db", "rows"), ("bin", "hello")]:
            self.write(self.worker_dir(*parts), "x")
        await self.settle()
        self.assert_nothing_watched_under_noise()
        self.assertEqual(self.batches, [])  # an install into .venv restarts nothing

    def test_directory_gone_before_its_watch_is_skipped(self):
        return defer.ensureDeferred(self._gone_first())

    async def _gone_first(self):
        # A temporary directory made and removed before inotify's event is read (what a
        # package manager does by the hundred): its watch cannot be added.
        for i in range(5):
            tmp = os.path.join(self.src, f"tmp{i}")
            os.makedirs(os.path.join(tmp, "inner"))
            os.rmdir(os.path.join(tmp, "inner"))
            os.rmdir(tmp)
        await self.settle()
        self.assertEqual(self.watcher.describe()["status"], "watching")
        self.batches.clear()
        # ... and edits are still seen afterwards.
        self.write(os.path.join(self.src, "main.go"), "package main // after\n")
        await self.settle()
        self.assertEqual(self.batches, [{Change("source", "hello")}])
        # New directories are still watched too.
        os.makedirs(os.path.join(self.src, "pkg"))
        await self.settle()
        self.write(os.path.join(self.src, "pkg", "util.go"), "package pkg\n")
        await self.settle()
        self.assertEqual(self.batches[-1], {Change("source", "hello")})

    def test_failure_is_reported_and_the_watcher_recovers(self):
        return defer.ensureDeferred(self._recovers())

    async def _recovers(self):
        from tqserver.supervise import watch
        real = watch.classify
        calls = []

        def broken(*args, **kw):
            calls.append(args)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return real(*args, **kw)

        self.patch(watch, "classify", broken)
        self.write(os.path.join(self.src, "main.go"), "package main // 1\n")
        await self.settle()  # advances the clock 1 s: past the first restart delay
        state = self.watcher.describe()
        self.assertEqual(state["failures"], 1)
        self.assertIn("boom", state["last_failure"])
        self.assertEqual(state["status"], "watching")
        self.assertEqual(self.sup.reloads, ["file watcher recovered"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.write(os.path.join(self.src, "main.go"), "package main // 2\n")
        await self.settle()
        self.assertEqual(self.batches[-1], {Change("source", "hello")})

    def test_overflow_is_reported_until_restarted(self):
        import struct

        from twisted.internet import inotify
        # What the kernel sends when its queue overflowed (wd -1): events were lost.
        self.watcher._notifier.events_received(struct.pack("=iLLL", -1, inotify.IN_Q_OVERFLOW, 0, 0))
        state = self.watcher.describe()
        self.assertEqual(state["status"], "failed")
        self.assertIn("overflowed", state["error"])
        self.clock.advance(0.5)
        self.assertEqual(self.watcher.describe()["status"], "watching")
        self.assertEqual(self.sup.reloads, ["file watcher recovered"])
