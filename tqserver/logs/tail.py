"""The last lines of a worker's output, kept in memory: the status page and ``tqserver
logs`` show them whether or not the worker logs to a file (or its file can be written),
and ``tqserver logs -f`` follows them as they come."""

from __future__ import annotations

from collections import deque
from typing import Callable

TAIL_LINES = 200

Follower = Callable[[list[str]], None]


class LogTail:
    """A ring of the last ``size`` lines, and the followers told of each new batch."""

    def __init__(self, size: int = TAIL_LINES) -> None:
        self.lines: deque[str] = deque(maxlen=size)
        self.followers: list[Follower] = []

    def feed(self, data: bytes) -> None:
        lines = data.decode("utf-8", "replace").splitlines()
        if not lines:
            return
        self.lines.extend(lines)
        for follower in list(self.followers):
            follower(lines)

    def last(self, n: int) -> list[str]:
        if n <= 0:
            return []
        lines = list(self.lines)
        return lines[-n:]

    def follow(self, follower: Follower) -> Callable[[], None]:
        """Call ``follower`` with each new batch of lines; returns the way to stop."""
        self.followers.append(follower)

        def stop() -> None:
            if follower in self.followers:
                self.followers.remove(follower)

        return stop
