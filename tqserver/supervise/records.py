"""Records of running instances under run/, so that after a supervisor crash (kill -9)
the next start finds and stops the process groups it left behind."""

from __future__ import annotations

import os
import signal

from twisted.logger import Logger

log = Logger()


class InstanceRecords:
    def __init__(self, run_dir: str, root: str) -> None:
        self.dir = os.path.join(run_dir, "instances")
        self.root = root

    def record(self, inst) -> None:
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, str(inst.pid)), "w") as f:
            f.write(inst.id + "\n")

    def forget(self, inst) -> None:
        try:
            os.unlink(os.path.join(self.dir, str(inst.pid)))
        except (FileNotFoundError, TypeError):
            pass

    def reap(self) -> int:
        """Stop the process groups of instances a previous supervisor of this root left
        running; a PID is only trusted when its environment names this root and instance."""
        import psutil

        if not os.path.isdir(self.dir):
            return 0
        stopped = 0
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            try:
                pid = int(name)
                with open(path) as f:
                    instance_id = f.read().strip()
                env = psutil.Process(pid).environ()
                if (
                    env.get("TQSERVER_ROOT") == self.root
                    and env.get("WORKER_INSTANCE") == instance_id
                ):
                    os.killpg(pid, signal.SIGKILL)
                    stopped += 1
                    log.warn(
                        "stopped leftover instance {id} (pid {pid}) from an earlier run",
                        id=instance_id,
                        pid=pid,
                    )
            except (ValueError, OSError, psutil.Error):
                pass
            try:
                os.unlink(path)
            except OSError:
                pass
        return stopped
