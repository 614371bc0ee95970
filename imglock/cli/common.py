"""What every subcommand shares: turning ImglockError into one stderr line."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import click

from imglock.errors import ImglockError


@contextlib.contextmanager
def reported_errors(prefix: str = "imglock") -> Iterator[None]:
    """Print an ImglockError as one line on stderr and exit with its status."""
    try:
        yield
    except ImglockError as exc:
        click.echo(f"{prefix}: {exc}", err=True)
        sys.exit(exc.exit_status)
