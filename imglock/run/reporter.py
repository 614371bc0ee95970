"""How ``imglock run`` says what it does: errors, warnings and notes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

Say = Callable[[str], None]


def _error(message: str) -> None:
    print(f"imglock: {message}", file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"imglock: warning: {message}", file=sys.stderr, flush=True)


def _no_note(message: str) -> None:
    """Notes (what is claimed, why no record was written) are shown only when asked for."""


@dataclass(frozen=True)
class Reporter:
    """Where a run's messages go: errors (always shown), warnings (unless -q), notes (-v)."""

    error: Say = _error
    warn: Say = _warn
    note: Say = _no_note
