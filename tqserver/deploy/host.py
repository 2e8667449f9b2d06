"""Running commands where a target's root is: on this machine for a local target, over ssh
for a remote one; and how rsync names that place. Every remote command is one POSIX sh
script with its arguments quoted, so nothing the user configures is split or expanded."""

from __future__ import annotations

import shlex
import subprocess

from tqserver.config.deployment import TargetConfig


class Host:
    def __init__(self, target: TargetConfig) -> None:
        self.target = target

    @property
    def remote(self) -> bool:
        return bool(self.target.host)

    @property
    def where(self) -> str:
        """user@host, or host, or "" for this machine."""
        t = self.target
        return f"{t.ssh.user}@{t.host}" if t.ssh.user else t.host

    def ssh_argv(self) -> list[str]:
        s = self.target.ssh
        argv = ["ssh", "-p", str(s.port), "-o", "BatchMode=yes"]
        if s.identity_file:
            argv += ["-i", s.identity_file]
        return argv + list(s.options)

    def path(self, relative: str = "") -> str:
        """An absolute path under the target's root (``relative`` may be absolute)."""
        if relative.startswith("/"):
            return relative
        root = self.target.root.rstrip("/") or "/"
        return f"{root}/{relative}" if relative else root

    def rsync_dest(self, path: str) -> str:
        return f"{self.where}:{path}" if self.remote else path

    def rsync_shell(self) -> list[str]:
        """rsync's -e for this host ([] when local)."""
        return ["-e", shlex.join(self.ssh_argv())] if self.remote else []

    def command(self, script: str, *args: str) -> list[str]:
        """The argv that runs ``sh -c script sh args...`` on the host."""
        if not self.remote:
            return ["sh", "-c", script, "sh", *args]
        remote = shlex.join(["sh", "-c", script, "sh", *args])
        return [*self.ssh_argv(), self.where, remote]

    def run(self, script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run a script on the host; its stdout and stderr, as text, and exit status."""
        return subprocess.run(
            self.command(script, *args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
