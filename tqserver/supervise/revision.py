"""The release a project root holds: the first line of ``<root>/REVISION``, written by
bin/deploy into each release it activates (or by any other deploy tool). Each worker
reports the revision of the code it serves, so a deploy can tell when every worker serves
the new release — and which one did not."""

from __future__ import annotations

import os
import re

FILE = "REVISION"
_SAFE = re.compile(r"[^A-Za-z0-9._:+@-]")


def read_revision(root: str) -> str:
    """The revision in ``root`` ("" when there is none), reduced to a safe short token."""
    try:
        with open(os.path.join(root, FILE), encoding="utf-8", errors="replace") as f:
            line = f.readline(200)
    except OSError:
        return ""
    return _SAFE.sub("", line.strip())[:100]
