"""What happens to a worker's pool, as the Supervisor tells it to whoever listens (the
metrics, the live-reload event hub, the proxy processes). The Supervisor knows none of
them: they are handed to it as listeners, ``listener(pool, event)``."""

from __future__ import annotations

import enum
from typing import Any, Callable


class PoolEvent(str, enum.Enum):
    """A change to one pool. A ``str`` too, so it reads and logs as its value."""

    ADDED = "added"  # a new worker's pool (the routes changed)
    REMOVED = "removed"  # a worker is gone (the routes changed)
    RECONFIGURED = "reconfigured"  # its worker.yaml changed (its route may have)
    SERVING = "serving"  # the instances in rotation changed
    SWAP = "swap"  # new instances took over (pool.last_swap_seconds)
    ERROR = "error"  # pool.error (and maybe pool.build_error) was set
    BUILD = "build"  # a build ended (pool.last_build)
    START_FAILED = "start-failed"  # new code exited before its first healthy probe
    CRASH = "crash"  # an instance exited without being asked
    RESTART = "restart"  # a serving instance is being replaced (health, recycling)
    DEPLOYED = "deployed"  # a deploy ended, whatever its outcome
    PROBE_OK = "probe-ok"  # a periodic health probe of an instance passed
    PROBE_FAILED = "probe-failed"  # ... or failed
    PUBLIC_CHANGED = "public-changed"  # dev: a file under the worker's public/ changed
    CONFIG_ERROR = "config-error"  # pool.config_error was set or cleared

    def __str__(self) -> str:
        return self.value


PoolListener = Callable[[Any, PoolEvent], None]
