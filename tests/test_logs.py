"""Log files that cannot be written (a full disk, a directory where the file should be):
lines are counted and dropped with one warning, writing resumes by itself, and whoever
writes never sees an exception. The full disk is /dev/full (every write: ENOSPC)."""
from __future__ import annotations

import io
import os

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
