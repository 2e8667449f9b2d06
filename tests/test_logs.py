"""Log files that cannot be written (a full disk, a directory where the file should be):
lines are counted and dropped with one warning, writing resumes by itself, and whoever
writes never sees an exception. The full disk is /dev/full (every write: ENOSPC)."""
from __future__ import annotations

import io
import os
import time

from twisted.logger import LogLevel
from twisted.trial import unittest

from tqserver.logs import files
from tqserver.logs.files import DROPPED_LINES, FailSafeLog
from tqserver.logs.observer import ServerLogObserver


class FailSafeLogTests(unittest.TestCase):

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "app.log")
        self.now = [100.0]
        self.warnings: list = []
        self.log = FailSafeLog(self.path, "test:" + self.id(), self.warnings.append,
                               clock=lambda: self.now[0])
        self.addCleanup(self.log.close)
        self.label = "test:" + self.id()

    def content(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def test_disk_full_then_space_again(self) -> None:
        self.log.write(b"one\n")
        os.unlink(self.path)
        os.symlink("/dev/full", self.path)    # the disk fills up
        self.log.close()                      # (the next write reopens it)
        for _ in range(3):
            self.log.write(b"a\nb\n")         # never raises
        self.assertEqual(DROPPED_LINES[self.label], 6)
        self.assertEqual(len(self.warnings), 1)
        self.assertIn("No space left on device", self.warnings[0])
        self.assertIn("No space left", self.log.error)
        os.unlink(self.path)                  # space is free again
        self.log.write(b"still dropped\n")   # within RETRY_SECONDS of the last try
        self.assertEqual(DROPPED_LINES[self.label], 7)
        self.now[0] += files.RETRY_SECONDS
        self.log.write(b"two\n")
        self.assertEqual(self.content(), b"two\n")
        self.assertIsNone(self.log.error)
        self.assertEqual(len(self.warnings), 2)
        self.assertIn("7 lines were dropped", self.warnings[1])

    def test_a_directory_where_the_file_should_be(self) -> None:
        os.makedirs(self.path)
        self.log.write(b"x\n")
        self.assertEqual(DROPPED_LINES[self.label], 1)
        self.assertIn("Is a directory", self.log.error)
        os.rmdir(self.path)
        self.now[0] += 5
        self.log.write(b"y\n")
        self.assertEqual(self.content(), b"y\n")

    def test_partial_writes_are_completed(self) -> None:
        class Dribble(io.RawIOBase):
            def __init__(self) -> None:
                self.got = b""

            def writable(self) -> bool:
                return True

            def write(self, b) -> int:
                self.got += bytes(b[:3])
                return min(3, len(b))
        sink = Dribble()
        self.log.file._file = sink
        self.log.file._rollover_at = float("inf")
        self.log.file._path = self.path
        self.log.write(b"0123456789\n")
        self.assertEqual(sink.got, b"0123456789\n")


class ServerLogTests(unittest.TestCase):
    """The server log: it was dropped in silence when its file could not be written."""

    def test_unwritable_server_log_is_said_and_counted(self) -> None:
        root = os.path.abspath(self.mktemp())
        path = os.path.join(root, "server.log")
        os.makedirs(path)   # a directory in its place
        console = io.StringIO()
        observer = ServerLogObserver(False, path, console=console)
        self.addCleanup(observer.close)
        before = DROPPED_LINES["server"]
        for i in range(3):
            observer({"log_format": "line {i}", "i": i, "log_level": LogLevel.info,
                      "log_namespace": "t", "log_time": 0.0})
        self.assertEqual(DROPPED_LINES["server"] - before, 3)
        said = console.getvalue()
        self.assertEqual(said.count("tqserver: server log: cannot write"), 1)
        self.assertEqual(said.count("line "), 3)   # the console still gets every line
        self.assertIn("Is a directory", observer.file_error)


class ModeAndRetentionTests(unittest.TestCase):
    """Every log file gets server.log_file_mode whatever the umask (twistd's daemon mode
    sets 077: worker logs were 0600), and {date} files past log_retention_days go."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.files = files.LogFiles()

    def test_mode_whatever_the_umask(self) -> None:
        old = os.umask(0o077)
        self.addCleanup(os.umask, old)
        log = files.DatedLogFile(os.path.join(self.dir, "w_{date}.log"), files=self.files)
        self.addCleanup(log.close)
        log.write(b"x\n")
        self.assertEqual(os.stat(log.path).st_mode & 0o777, 0o640)
        self.files.configure(0o644, 0)
        other = files.DatedLogFile(os.path.join(self.dir, "other.log"), files=self.files)
        self.addCleanup(other.close)
        other.write(b"x\n")
        self.assertEqual(os.stat(other.path).st_mode & 0o777, 0o644)

    def test_reopen_writes_to_a_file_of_the_name(self) -> None:
        path = os.path.join(self.dir, "app.log")
        log = files.DatedLogFile(path, files=self.files)
        self.addCleanup(log.close)
        log.write(b"one\n")
        os.rename(path, path + ".1")            # logrotate
        log.write(b"two\n")                     # before the signal: the moved file
        self.assertEqual(self.files.reopen(), 1)
        log.write(b"three\n")
        self.assertEqual(open(path + ".1", "rb").read(), b"one\ntwo\n")
        self.assertEqual(open(path, "rb").read(), b"three\n")

    def test_retention_days(self) -> None:
        template = os.path.join(self.dir, "tq_{date}.log")
        for name in ["tq_2026-11-20.log", "tq_2026-11-26.log", "tq_2026-11-27.log",
                     "tq_2026-12-01.log", "tq_2026-11-01.log.gz", "other_2026-01-01.log"]:
            open(os.path.join(self.dir, name), "w").close()
        now = time.mktime((2026, 12, 2, 10, 0, 0, 0, 0, -1))
        self.files.configure(0o640, 6)          # today and the five days before
        log = files.DatedLogFile(template, clock=lambda: now, files=self.files)
        self.addCleanup(log.close)
        log.write(b"x\n")
        self.assertEqual(sorted(os.listdir(self.dir)),
                         ["other_2026-01-01.log", "tq_2026-11-01.log.gz", "tq_2026-11-27.log",
                          "tq_2026-12-01.log", "tq_2026-12-02.log"])

    def test_config_keys(self) -> None:
        from tqserver.config.errors import ConfigError
        from tqserver.config.server import load_server_config
        path = os.path.join(self.dir, "server.yaml")
        with open(path, "w") as f:
            f.write('server:\n  log_file_mode: "0644"\n  log_retention_days: 7\n')
        config, _ = load_server_config(path)
        self.assertEqual((config.server.log_file_mode, config.server.log_retention_days),
                         (0o644, 7))
        with open(path, "w") as f:
            f.write("server:\n  log_file_mode: 0644\n")
        with self.assertRaises(ConfigError) as e:
            load_server_config(path)
        self.assertIn('server.yaml:2:18: server.log_file_mode: expected an octal mode such as "0640"',
                      str(e.exception))
