"""The ``imglock`` program: the installed command and ``python -m imglock``.

Start-up and exit are designed here, in one place, for the costs that
dominate a short command beyond loading click:

* **A kernel wait, started first.**  ``status`` looks every image up in
  /proc/locks, and the first read of it in a while waits for an RCU grace
  period in the kernel (10-15 ms: reading it takes the lock table's
  percpu rwsem for writing; see :mod:`imglock.lock.proclocks`).  So
  :func:`main` starts that read in a thread *before* the command line is
  loaded, and hands it to the command as click's context object: the wait
  overlaps the loading instead of adding to it.  :data:`HEAD_STARTS` lists
  the work a command will wait on; the command is read from the arguments
  as click reads it (the first that is not an option of the group).
* **The collector.**  Loading the command line and the command makes tens
  of thousands of objects that live as long as the process; the cyclic
  collector would walk them again and again while they are made, and once
  more at exit.  So it is off while :func:`main` loads them, and
  :func:`gc.freeze` sets them aside before it is on again: a long
  ``imglock run`` still collects what it makes itself.
* **The teardown.**  A command that only reads and reports
  (:data:`REPORTS`: ``status``, ``info``) has nothing to finalize once
  its answer is written: it holds no lock and registers no exit hook, and
  the kernel closes its descriptors.  So its process ends there
  (:func:`end_now`, once stdout and stderr are flushed), rather than
  freeing every module and object one by one while a script waits for its
  exit status.  ``run`` and ``doctor``, which release claims and remove
  files on the way out, end the ordinary way.

The rest is what a command imports, and that is decided by the import
graph, not here: a command's module is loaded only when it is named
(:data:`imglock.cli.COMMANDS`), an image format's driver only for a file
with its magic, and ``status`` reads locks through the protocol's byte map
(:mod:`imglock.lock.byte_map`) without the operations that take them.

All of it is measured by ``python -m benchmarks.bench_startup`` against
``import click``.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

from imglock.lock.proclocks import FlockTable

#: Options of the group that take no argument (``imglock -v status ...``).
GROUP_FLAGS: Final = frozenset({"-v", "--verbose", "-q", "--quiet"})

#: command -> the work it will wait on, started before the command line loads.
HEAD_STARTS: Final[dict[str, Callable[[], object]]] = {
    "status": lambda: FlockTable(background=True),
}


#: Commands that only read and report: their process ends when the answer is written.
REPORTS: Final = frozenset({"status", "info"})


def command_of(args: Sequence[str]) -> str | None:
    """The command *args* run, as click will read it, or None (``--help``, none given)."""
    for arg in args:
        if arg not in GROUP_FLAGS:
            return None if arg.startswith("-") else arg
    return None


def head_start(args: Sequence[str]) -> object | None:
    """Start what the command of *args* will wait on; None for a command that waits on nothing."""
    start = HEAD_STARTS.get(command_of(args) or "")
    return start() if start is not None else None


def end_now(status: object) -> None:
    """End the process with *status*, as :class:`SystemExit` would, without the teardown.

    Returns (and leaves the exit to SystemExit) for a status that is a
    message to print rather than a number, or when stdout or stderr cannot
    be flushed: Python's own exit then reports it as usual.
    """
    if status is not None and not isinstance(status, int):
        return
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        return
    os._exit(status or 0)


def main() -> Any:
    args = sys.argv[1:]
    command = command_of(args)
    gc.disable()
    try:
        started = head_start(args)
        # Loaded after the head start, deliberately: loading the command line
        # (click above all) and the command's module is most of a short
        # command's time, and the work started runs meanwhile.
        from imglock.cli import load_command
        from imglock.cli import main as command_line

        load_command(command or "")
    finally:
        gc.freeze()
        gc.enable()
    try:
        return command_line(obj=started)
    except SystemExit as exc:
        if command in REPORTS:
            end_now(exc.code)
        raise


if __name__ == "__main__":
    sys.exit(main())
