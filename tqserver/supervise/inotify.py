"""TreeNotifier: Linux inotify for a tree of directories that come and go, for the dev
watcher (watch.DevWatcher).

Not Twisted's INotify: that one closes itself when any watched directory is deleted,
raises (and stops reading) when autoAdd finds a new directory already gone, and drops a
queue overflow; changing that meant reaching into its private state. This is the small
part the watcher needs, on public Twisted APIs (a FileDescriptor read by the reactor) and
the three libc calls, made with ctypes as Twisted's own inotify module does.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Callable

from twisted.internet import abstract, error, fdesc
from twisted.internet.inotify import (
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_Q_OVERFLOW,
    INotifyError,
)
from twisted.python import filepath
from twisted.python.failure import Failure

_EVENT = struct.Struct("=LLLL")  # wd, mask, cookie, length of the name that follows
_libc = None


def _load_libc():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc
        for name, args in (
            ("inotify_init1", [ctypes.c_int]),
            ("inotify_add_watch", [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]),
            ("inotify_rm_watch", [ctypes.c_int, ctypes.c_int]),
        ):
            function = getattr(libc, name)
            function.argtypes = args
            function.restype = ctypes.c_int
        _libc = libc
    return _libc


def _failed(what: str) -> INotifyError:
    return INotifyError(f"{what}: {os.strerror(ctypes.get_errno())}")


Callback = Callable[[object, filepath.FilePath, int], None]  # (None, path, mask)


class TreeNotifier(abstract.FileDescriptor):
    """One inotify descriptor and its watches, one per directory (``add``). A deleted or
    moved directory drops only its own watch; the owner adds new directories itself. The
    descriptor breaking calls ``lost(reason)`` (unless ``closing``), a kernel queue
    overflow (events were lost) calls ``overflow()``."""

    def __init__(self, reactor, lost: Callable[[Failure], None], overflow: Callable[[], None]):
        abstract.FileDescriptor.__init__(self, reactor)
        libc = _load_libc()
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _failed("inotify_init1")
        self._fd = fd
        self.connected = 1
        self.closing = False
        self._lost = lost
        self._overflow = overflow
        self._buffer = b""
        self._watches: dict[int, tuple[bytes, list[Callback]]] = {}  # wd -> (path, callbacks)
        self._paths: dict[bytes, int] = {}  # path -> wd

    def fileno(self) -> int:
        return self._fd

    def add(self, path: bytes, mask: int, callbacks: list[Callback]) -> None:
        """Watch one directory; INotifyError when it cannot be (gone, no permission, the
        limit of watches)."""
        wd = _load_libc().inotify_add_watch(self._fd, path, mask | IN_DELETE_SELF)
        if wd < 0:
            raise _failed(f"cannot watch {os.fsdecode(path)}")
        old = self._watches.get(wd)  # the same inode under another name (moved)
        if old is not None and self._paths.get(old[0]) == wd:
            del self._paths[old[0]]
        self._watches[wd] = (path, callbacks)
        self._paths[path] = wd

    def forget_under(self, path: bytes) -> None:
        """Drop the watches of a directory moved away and of everything under it."""
        prefix = path + b"/"
        for watched, wd in list(self._paths.items()):
            if watched == path or watched.startswith(prefix):
                del self._paths[watched]
                if self._watches.pop(wd, None) is not None:
                    _load_libc().inotify_rm_watch(self._fd, wd)

    def watched_paths(self) -> list[bytes]:
        return sorted(self._paths)

    def doRead(self):
        return fdesc.readFromFD(self._fd, self.events_received)

    def events_received(self, data: bytes) -> None:
        """Raw inotify events, as read from the descriptor (whole or in pieces)."""
        self._buffer += data
        while len(self._buffer) >= _EVENT.size:
            wd, mask, _cookie, size = _EVENT.unpack_from(self._buffer)
            end = _EVENT.size + size
            if len(self._buffer) < end:
                return
            name = self._buffer[_EVENT.size : end].rstrip(b"\0")
            self._buffer = self._buffer[end:]
            if mask & IN_Q_OVERFLOW:
                self._overflow()
                continue
            watch = self._watches.get(wd)
            if watch is None:
                continue
            directory, callbacks = watch
            if mask & (IN_DELETE_SELF | IN_IGNORED) and not name:
                del self._watches[wd]
                if self._paths.get(directory) == wd:
                    del self._paths[directory]
            path = filepath.FilePath(directory)
            if name:
                path = path.child(name)
            for callback in callbacks:
                callback(None, path, mask)

    def loseConnection(self, _reason=None) -> None:
        if self.connected and not self.disconnecting:
            self.stopReading()
            self.connectionLost(Failure(error.ConnectionDone()))

    def connectionLost(self, reason) -> None:
        abstract.FileDescriptor.connectionLost(self, reason)
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        if not self.closing:
            self._lost(reason)
