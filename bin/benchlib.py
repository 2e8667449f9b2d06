"""Helpers the bin/bench* scripts share: free ports, /proc (process trees, CPU time, memory),
starting and stopping processes, HTTP GETs on loopback, the interpreter's name, building the
Go hello worker. Imported as `benchlib` (the scripts' own directory is on sys.path)."""
from __future__ import annotations

import http.client
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

PY_WORKER = '''\
# bin/bench, bin/bench-scale: the smallest useful tqserver.worker WSGI app.
from tqserver.worker import serve

BODY = b"Hello, World!"
HEADERS = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):
    start_response("200 OK", HEADERS)
    return [BODY]


serve(app)
'''


def log(message: str) -> None:
    """Progress on stderr, prefixed with the running script's name."""
    print(f"{os.path.basename(sys.argv[0])}: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# /proc: process trees, CPU time, memory

def stat_fields(pid: int) -> Optional[List[str]]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'
    return data[data.rindex(")") + 2:].split()


def children_map() -> Dict[int, List[int]]:
    tree: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = stat_fields(int(name))
            if fields:
                tree.setdefault(int(fields[1]), []).append(int(name))
    return tree


def descendants(pid: int, tree: Optional[Dict[int, List[int]]] = None) -> List[int]:
    tree = children_map() if tree is None else tree
    out, todo = [], list(tree.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def cpu_ticks(pids: Sequence[int]) -> int:
    """utime + stime of the given live processes, in clock ticks."""
    total = 0
    for pid in pids:
        fields = stat_fields(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])
    return total


def system_busy_ticks() -> int:
    with open("/proc/stat") as f:
        parts = f.readline().split()
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in parts[1:9])
    return user + nice + system + irq + softirq + steal


class CpuWindow:
    """CPU used during one measurement: by the process(es) under test, and elsewhere
    (everything on the machine that is not this script or a process it started)."""

    def __init__(self, under_test: Callable[[], Sequence[int]]) -> None:
        self.under_test = under_test

    def _ours(self) -> int:
        me = os.getpid()
        mine = [me] + descendants(me)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)   # waited-for children (wrk)
        return cpu_ticks(mine) + int((kids.ru_utime + kids.ru_stime) * CLK_TCK)

    def __enter__(self) -> "CpuWindow":
        self.pids = list(self.under_test())
        self.t0 = time.monotonic()
        self.busy0, self.ours0, self.test0 = system_busy_ticks(), self._ours(), cpu_ticks(self.pids)
        return self

    def __exit__(self, *exc) -> None:
        wall = max(time.monotonic() - self.t0, 1e-6) * CLK_TCK
        busy, ours, test = system_busy_ticks(), self._ours(), cpu_ticks(self.pids)
        self.elsewhere = max(0.0, ((busy - self.busy0) - (ours - self.ours0)) / wall)
        self.process = (test - self.test0) / wall


def pids_with_env(name: str, value: str) -> List[int]:
    """Processes whose environment has name=value (a supervisor's instances carry
    TQSERVER_ROOT=<its root>, and keep it when the supervisor died and they were orphaned)."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if wanted in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def kill_groups(pids: Sequence[int]) -> None:
    """SIGKILL each process and the process group it leads."""
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process: shared pages divided among their users, so the
    PSS of many processes adds up to the memory they really take (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------
# processes

class Processes:
    """Everything this script starts; stop() ends all of it, in reverse order."""

    def __init__(self) -> None:
        self.items: List[Tuple[str, subprocess.Popen, int]] = []

    def start(self, name: str, argv: List[str], logfile: str, stop_signal: int = signal.SIGTERM,
              **kwargs) -> subprocess.Popen:
        out = open(logfile, "ab")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, **kwargs)
        finally:
            out.close()
        self.items.append((name, proc, stop_signal))
        return proc

    def stop(self, timeout: float = 20.0) -> None:
        for name, proc, sig in reversed(self.items):
            # the instances a twistd started run in process groups of their own: note them
            # now, so that they can be killed should the supervisor not stop them itself
            tree = descendants(proc.pid)
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log(f"{name} did not stop within {timeout:.0f} s: SIGKILL")
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
            for pid in tree:
                if stat_fields(pid) is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            try:  # whatever is left in its own session
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.items.clear()


def get(port: int, path: str, timeout: float = 5.0) -> Tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(name: str, proc: subprocess.Popen, port: int, checks: List[Tuple[str, bytes]],
               timeout: float, logfile: str) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if all(get(port, path) == (200, body) for path, body in checks):
                return
            last = "wrong answer"
        except (OSError, http.client.HTTPException) as e:
            last = repr(e)
        time.sleep(0.1)
    tail = ""
    try:
        with open(logfile, "rb") as f:
            tail = f.read()[-3000:].decode("utf-8", "replace")
    except OSError:
        pass
    state = f"exited {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout:.0f} s ({last})"
    raise RuntimeError(f"{name} {state}; its log ({logfile}) ends with:\n{tail}")


def interpreter_label(python: str) -> str:
    code = ("import platform, sys\n"
            "v = getattr(sys, 'pypy_version_info', None)\n"
            "print(('PyPy %d.%d.%d' % v[:3]) if v else 'CPython ' + platform.python_version())")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{python} does not run: {done.stderr.strip()}")
    return done.stdout.strip()


def build_go(tmp: str) -> str:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not os.path.exists(go):
        raise RuntimeError("go not found (bin/install-toolchains installs it)")
    src = os.path.join(tmp, "build", "hello")
    shutil.copytree(os.path.join(REPO, "workers", "hello"), src, ignore=shutil.ignore_patterns("bin"))
    binary = os.path.join(tmp, "hello")
    done = subprocess.run([go, "build", "-buildvcs=false", "-o", binary, "./src"], cwd=src,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"go build failed:\n{done.stdout}{done.stderr}")
    return binary


def find_py_spy(python: str) -> Optional[str]:
    for candidate in (os.path.join(os.path.dirname(python), "py-spy"), shutil.which("py-spy"),
                      os.path.join(REPO, ".venv", "bin", "py-spy")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tqserver"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" + uncommitted changes in tqserver/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


PY_SPY_RATE = 250


def py_spy_record(spy: str, pid: int, seconds: float, out: str, idle: bool) -> subprocess.Popen:
    """Start sampling ``pid`` for ``seconds`` into ``out`` (raw stacks, one per line); with
    ``idle``, samples of the process waiting count too (wall clock), else only CPU time."""
    argv = [spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", str(PY_SPY_RATE), "--format", "raw", "--function", "--nonblocking",
            "--output", out] + (["--idle"] if idle else [])
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def py_spy_hotspots(out: str, note: str, ours: Sequence[str]) -> List[str]:
    """Markdown lines: the functions with the most samples (self), and the inclusive share
    of the functions whose file matches one of ``ours`` (e.g. "(tqserver/")."""
    stacks: List[Tuple[List[str], int]] = []
    with open(out) as f:
        for line in f:
            frames, _, count = line.rstrip("\n").rpartition(" ")
            if frames and count.isdigit():
                stacks.append((frames.split(";"), int(count)))
    total = sum(n for _, n in stacks) or 1

    def short(frame: str) -> str:
        name, _, where = frame.partition(" (")
        where = where.rstrip(")")
        for marker in ("/site-packages/", REPO + "/", "/lib/python3", "/lib/pypy3"):
            if marker in where:
                where = where.split(marker, 1)[1]
                if marker.startswith("/lib/"):
                    where = where.split("/", 1)[1] if "/" in where else where
                break
        return f"{name} ({where})"

    # with --idle, the samples of the reactor waiting for events end in its poll method
    idle = sum(n for frames, n in stacks
               if re.match(r"\w*Reactor\.(doPoll|doSelect|doIteration|doKEvent) ", frames[-1]))
    self_time: Dict[str, int] = {}
    inclusive: Dict[str, int] = {}
    for frames, n in stacks:
        leaf = short(frames[-1])
        self_time[leaf] = self_time.get(leaf, 0) + n
        for frame in set(short(f) for f in frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    lines = [f"{total} samples at {PY_SPY_RATE} Hz; {note}; in the reactor's poll (idle): "
             f"{100 * idle / total:.0f}%", "",
             "| self % | function (file) |", "|---:|---|"]
    for frame, n in sorted(self_time.items(), key=lambda kv: -kv[1])[:20]:
        lines.append(f"| {100 * n / total:.1f} | `{frame}` |")
    lines += ["", "| inclusive % | function in " + ", ".join(m.strip("(") for m in ours)
              + " (file) |", "|---:|---|"]
    mine = [(f, n) for f, n in inclusive.items() if any(m in f for m in ours)]
    for frame, n in sorted(mine, key=lambda kv: -kv[1])[:25]:
        lines.append(f"| {100 * n / total:.1f} | `{frame}` |")
    return lines
