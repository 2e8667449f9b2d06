"""On a Python worker's path in place of the directory TQServer is installed in:
``import tqserver.worker`` finds the real package, and nothing else installed next to
TQServer (Twisted, attrs, ...) shadows the worker's own dependencies."""

import os

__path__ = [  # its modules are the real tqserver/ package's
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
]
