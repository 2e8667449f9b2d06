"""A worker named by its application object (``python.app: "package.module:app"``),
without a serve() script: import it, tell WSGI from ASGI, serve it.

The object may also be a factory call, ``"package.module:create_app()"``. The worker's
directory (and its ``src/``, if any) come first on ``sys.path``, so its own packages are
found whatever the working directory. An import error ends the process with the
traceback on stderr, which dev mode shows on the worker's routes.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def load(target: str):
    """The object ``target`` ("module:attr.path", "module:factory()") names."""
    module_name, _, attr = target.partition(":")
    if not module_name:
        raise SystemExit(f"tqserver.worker: python.app {target!r} names no module")
    call = attr.endswith("()")
    attr = (attr[:-2] if call else attr) or "app"
    import importlib

    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SystemExit(
                f"tqserver.worker: python.app {target!r}: {module_name} has no {attr!r}"
            ) from None
    return obj() if call else obj


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tqserver.worker package.module:app", file=sys.stderr)
        return 2
    directory = os.environ.get("WORKER_DIR") or os.getcwd()
    for path in (os.path.join(directory, "src"), directory):
        if os.path.isdir(path) and path not in sys.path:
            sys.path.insert(0, path)
    from tqserver.worker import _serve

    _serve(load(argv[0]), None, None, app_health=True)
    return 0
