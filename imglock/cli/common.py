"""What every subcommand shares: how much it says, and how it reports errors.

Every command, and the ``imglock`` group itself, takes ``-v/--verbose`` and
``-q/--quiet`` (:func:`verbosity_options`), so ``imglock -v status X`` and
``imglock status -v X`` mean the same.  Each ``-v`` raises the verbosity by
one and each ``-q`` lowers it by one, wherever they are given; the sum is
kept in the click context:

* quiet (``-q``): errors only;
* normal: errors and warnings;
* verbose (``-v``): notes too, on what is done and why.

Errors are one line on stderr, ``imglock: FILE: what is wrong``; warnings
read ``imglock: warning: ...``; notes ``imglock: ...``.

Options that take seconds or a signal are checked by the parameter types
of :mod:`imglock.cli.params`, so that every command rejects a bad value
the same way, before anything runs.
"""

import contextlib
import errno
import os
import sys
from collections.abc import Callable, Iterator
from typing import Final, NamedTuple, TextIO, TypeVar

import click

from imglock.errors import EX_IOERR, ImglockError
from imglock.text import visible

QUIET: Final = -1
NORMAL: Final = 0
VERBOSE: Final = 1

PREFIX: Final = "imglock"
#: Where the verbosity lives in ``click.Context.meta`` (shared by the group
#: and its subcommand's contexts).
_META_KEY: Final = "imglock.verbosity"

F = TypeVar("F", bound=Callable[..., object])


def _adjust(step: int) -> Callable[[click.Context, click.Parameter, int], None]:
    def callback(ctx: click.Context, _param: click.Parameter, count: int) -> None:
        ctx.meta[_META_KEY] = ctx.meta.get(_META_KEY, NORMAL) + step * count

    return callback


def verbosity_options(command: F) -> F:
    """Add ``-v/--verbose`` and ``-q/--quiet`` to a command or group."""
    quiet = click.option(
        "-q",
        "--quiet",
        count=True,
        expose_value=False,
        callback=_adjust(-1),
        help="Say less: errors only, no warnings or notes.",
    )
    verbose = click.option(
        "-v",
        "--verbose",
        count=True,
        expose_value=False,
        callback=_adjust(+1),
        help="Say more: notes on what is done and why.",
    )
    return verbose(quiet(command))


def current_level() -> int:
    """The verbosity asked for on the command line (NORMAL outside a command)."""
    ctx = click.get_current_context(silent=True)
    level = NORMAL if ctx is None else int(ctx.meta.get(_META_KEY, NORMAL))
    return max(QUIET, min(VERBOSE, level))


def echo_error(line: str) -> None:
    """Write one line to stderr, every control character and undecodable byte escaped.

    A stderr that cannot take it (a full disk) loses the line, and nothing
    more is tried there: the exit status still says what went wrong.
    """
    try:
        click.echo(visible(line), err=True)
    except OSError:
        _discard(sys.stderr)


def _discard(stream: TextIO | None) -> None:
    """Point *stream*'s descriptor at /dev/null, so that what it still holds
    is not written again, and fails again, at exit."""
    if stream is None:
        return
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # closed, or not a file
        return
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def write_output(text: str) -> None:
    """Write a command's answer, *text* and a newline, to stdout as UTF-8.

    A stdout that cannot take it (a full disk, an I/O error) ends the
    command with one line and EX_IOERR, and what is left of the answer is
    dropped rather than written again at exit.  A reader that has gone
    (EPIPE) is click's to handle: it ends the command quietly.
    """
    try:
        click.echo(text.encode("utf-8"))
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise
        echo_error(f"{PREFIX}: cannot write the output: {exc.strerror or exc}")
        _discard(sys.stdout)
        sys.exit(EX_IOERR)


class Voice(NamedTuple):
    """How a command speaks on stderr, at a fixed verbosity.

    Bound once the options are parsed, so that it can be handed to code
    that runs outside click (the runner's threads and signal loop): an
    immutable value.
    """

    level: int = NORMAL

    @classmethod
    def current(cls) -> "Voice":
        return cls(current_level())

    def error(self, message: str) -> None:
        """Always shown: something failed."""
        echo_error(f"{PREFIX}: {message}")

    def warn(self, message: str) -> None:
        """Shown unless -q: something the operator should know."""
        if self.level >= NORMAL:
            echo_error(f"{PREFIX}: warning: {message}")

    def note(self, message: str) -> None:
        """Shown with -v: what is being done, and why."""
        if self.level >= VERBOSE:
            echo_error(f"{PREFIX}: {message}")


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for the CLI: one ``imglock: warning:`` line, none with -q."""
    Voice.current().warn(str(message))


@contextlib.contextmanager
def reported_errors(prefix: str = PREFIX) -> Iterator[None]:
    """Print an ImglockError as one line on stderr and exit with its status."""
    try:
        yield
    except ImglockError as exc:
        echo_error(f"{prefix}: {exc}")
        sys.exit(exc.exit_status)
