"""``python -m tqserver.worker package.module:app``: what ``python.app`` runs."""

from __future__ import annotations

import sys

from tqserver.worker.app import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
