"""Parameter types of ``run`` and ``doctor``: seconds (``inf`` for ever) and signals.

Apart from :mod:`imglock.cli.common`, which every command loads: ``status``
and ``info`` take neither.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from typing import Final, TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])


#: The longest finite number of seconds an option takes (about 31 years):
#: beyond it the system's timers overflow; ``inf`` says "forever".
MAX_SECONDS: Final = 1e9


class Seconds(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2
    """A number of seconds: a decimal number, ``inf`` where it means *forever*.

    Rejects ``nan``, negative numbers and finite values past
    :data:`MAX_SECONDS`, while the options are parsed: before anything runs.
    """

    name = "seconds"

    def __init__(self, forever: bool = True) -> None:
        #: Whether ``inf`` is accepted.
        self.forever = forever

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, bool):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if isinstance(value, (int, float)):
            number = float(value)
        else:
            try:
                number = float(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if number < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        if math.isinf(number):
            if not self.forever:
                self.fail(f"{value!r}: give a number of seconds", param, ctx)
            return math.inf
        if number > MAX_SECONDS:
            hint = " (inf for forever)" if self.forever else ""
            self.fail(f"{value!r} is more than {MAX_SECONDS:.0f} seconds{hint}", param, ctx)
        return number


def seconds_option(*param_decls: str, default: float, help: str) -> Callable[[F], F]:
    """An option that takes a number of seconds (:class:`Seconds`), its default shown in --help."""
    return click.option(*param_decls, type=Seconds(), default=default, show_default=True, help=help)


class SignalNumber(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2
    """A signal as kill(1) takes it: a name (TERM, SIGTERM, term) or a number (15)."""

    name = "signal"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            text = str(value)
        else:
            text = str(value).strip()
        if text.isdigit():
            number = int(text)
            if number in signal.valid_signals() and number != 0:
                return number
            self.fail(f"{value!r} is not a signal number", param, ctx)
        name = text.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            self.fail(f"unknown signal {value!r}", param, ctx)
