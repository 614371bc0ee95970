"""The ``imglock`` command: a thin shell over the library.

Subcommands live in their own modules and are imported only when run, so
``imglock info`` does not pay for what ``imglock run`` needs: the command
registry, :data:`COMMANDS`, is the one place the command line loads code
lazily.  Shell completion is click's: ``_IMGLOCK_COMPLETE=bash_source
imglock`` prints the bash script (``zsh_source``, ``fish_source`` for the
others).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any, NoReturn

import click
from click.exceptions import NoArgsIsHelpError

from imglock import __version__, faults
from imglock.cli.common import echo_error, show_warning, verbosity_options

#: subcommand name -> (module, attribute, one-line help).  A command's
#: module is imported when the command is run (or its help shown), never
#: before: each pulls in the library code it needs, and that is most of a
#: command's start-up.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": ("imglock.cli.info", "info", "Show an image's format, size and backing chain."),
    "status": ("imglock.cli.status", "status", "Show who holds images, and how."),
    "run": ("imglock.cli.run", "run", "Run a command with its images claimed."),
    "doctor": (
        "imglock.cli.doctor",
        "doctor",
        "Tell whether locks on a directory are shared between hosts.",
    ),
}


def load_command(name: str) -> click.Command | None:
    """The command *name*, its module imported now if it was not yet; None if there is none."""
    entry = COMMANDS.get(name)
    if entry is None:
        return None
    module = importlib.import_module(entry[0])  # the one lazy import: see COMMANDS
    command: click.Command = getattr(module, entry[1])
    return command


class LazyGroup(click.Group):
    """A group whose subcommands are imported when first used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return load_command(cmd_name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except NoArgsIsHelpError:
            raise  # no command at all: the help, as click gives it
        except click.UsageError as exc:  # an option of the group itself
            _one_line(ctx, exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            _one_line(ctx, exc)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help lists one line per command without importing every module.
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _one_line(ctx: click.Context, exc: click.UsageError) -> NoReturn:
    """One line naming the command and what is wrong, exit 2, as for any other
    bad input (click's default adds the usage and a hint)."""
    where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
    echo_error(f"{where}: {exc.format_message()}")
    ctx.exit(exc.exit_code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="imglock")
@verbosity_options
def cli() -> None:
    """Advisory locks for VM disk images on shared filesystems.

    -v and -q work the same before or after the command name: -q shows
    errors only, -v adds notes on what is done and why.

    \b
    Shell completion (add to the shell's start-up file):
      bash: eval "$(_IMGLOCK_COMPLETE=bash_source imglock)"
      zsh:  eval "$(_IMGLOCK_COMPLETE=zsh_source imglock)"
      fish: _IMGLOCK_COMPLETE=fish_source imglock | source
    """
    # A warning (such as the POSIX-lock fallback) is one line, silenced by -q.
    warnings.showwarning = show_warning


def main(argv: list[str] | None = None, obj: object | None = None) -> Any:
    """Run the imglock command line (the program itself starts in :mod:`imglock.__main__`).

    *obj* is the context object commands find: work started for them ahead
    of loading the command line (:data:`imglock.__main__.HEAD_STARTS`).
    """
    if "IMGLOCK_FAULTS" in os.environ:
        faults.install_from_environment()
    return cli.main(args=argv, prog_name="imglock", obj=obj)


if __name__ == "__main__":
    sys.exit(main())
