"""``python -m tqserver.cli`` = the ``tqserver`` command."""

from __future__ import annotations

import sys

from tqserver.cli.main import main

sys.exit(main())
