"""gc.freeze() of what startup allocated, in the supervisor and in proxy processes."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Move what startup allocated (modules, config, the service tree) out of the cyclic
    GC's reach: CPython's full collections otherwise walk all of it again and again under
    load, pausing the proxy (docs/performance.md has the figures). PyPy has no gc.freeze
    and needs none."""
    freeze = getattr(gc, "freeze", None)
    if freeze is not None:
        gc.collect()
        freeze()
