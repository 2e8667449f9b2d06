"""The supervisor's own limits: at start the soft RLIMIT_NOFILE goes up to the hard limit.
Every client connection, kept upstream connection and worker pipe is a descriptor; at the
usual soft limit of 1024 a thousand idle keep-alive clients made the proxy refuse
everything else. Workers inherit the raised limit."""

from __future__ import annotations

import resource


def raise_open_files_limit() -> tuple[int, int, int]:
    """(soft before, soft now, hard) of RLIMIT_NOFILE, after raising soft to hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # not allowed here (a container's policy): keep what we have
    now, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, now, hard
