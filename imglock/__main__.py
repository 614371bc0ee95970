"""The ``imglock`` program: the installed command and ``python -m imglock``."""

from __future__ import annotations

import gc
import sys
from typing import Any


def main() -> Any:
    """Load the command line with the cyclic collector paused, then run the command.

    Loading it makes tens of thousands of objects (modules, classes,
    functions) that live as long as the process.  Collecting while they are
    made walks them again and again, and the collection at exit walks them
    once more; together that was a fifth of what ``imglock status`` cost
    beyond ``import click``.  :func:`gc.freeze` sets them aside, so that the
    collector, on again for the command itself (a long ``imglock run``
    needs it), only looks at what the command makes.
    """
    gc.disable()
    try:
        from imglock.cli import main as run_command
    finally:
        gc.freeze()
        gc.enable()
    return run_command()


if __name__ == "__main__":
    sys.exit(main())
