"""The ``imglock`` program: the installed command and ``python -m imglock``."""

from __future__ import annotations

import sys

from imglock.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
