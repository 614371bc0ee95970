"""Seeing through the programs that run a command for it: ``env``, ``nice``, ``sudo``...

``imglock run -- taskset -c 0 qemu-system-x86_64 ...`` runs QEMU all the
same: taskset sets the CPU mask and execs it.  To read QEMU's command line
and to leave QEMU's lock bytes to QEMU, imglock must find where the
wrapper's own options end and its command starts.  Each wrapper parses its
options with ``getopt_long`` (util-linux, coreutils, sudo), stopping at the
first operand: :data:`WRAPPERS` says, per wrapper, which options take an
argument, how many operands come before the command (taskset's mask, chrt's
priority), and which options make it do something else than run a command
in the same directory (``env -C``, ``sudo -i``, ``taskset -p``).  For
those, and for an option a wrapper's table does not know, no guess is
made: :func:`command_start` says why it cannot see through.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final


@dataclass(frozen=True)
class Wrapper:
    """How one exec-wrapper reads its arguments (GNU ``getopt_long`` rules)."""

    #: Short options without an argument, and with one (``-n 5``, ``-n5``).
    flags: str = ""
    with_argument: str = ""
    #: Long options without an argument, with one (``--x=1``, ``--x 1``), and
    #: with an optional one (only ``--x=1``).
    long_flags: frozenset[str] = frozenset()
    long_with_argument: frozenset[str] = frozenset()
    long_optional: frozenset[str] = frozenset()
    #: Operands before the command (taskset's mask, chrt's priority).
    operands: int = 0
    #: What an operand looks like, where it may be left out (chrt's priority
    #: for the policies that have none): an element that does not match is
    #: the command.
    optional_operand: str | None = None
    #: ``NAME=VALUE`` elements before the command set its environment.
    assignments: bool = False
    #: ``-N`` (a number as an option) is an argument (``nice -5``).
    numeric_option: bool = False
    #: A lone ``-`` is an option (env's old spelling of ``-i``).
    lone_dash: bool = False
    #: Options (short as ``-x``, long as ``--name``) after which the wrapper
    #: does not simply run the command where it stands, and what it does.
    changes: Mapping[str, str] = field(default_factory=dict)


_CHDIR: Final = "runs it in another directory"
_SHELL: Final = "runs a shell, not the command"
_NO_COMMAND: Final = "acts on a running process or prints, and runs no command"

# fmt: off
#: The exec-wrappers imglock sees through, by program name.
WRAPPERS: Final[Mapping[str, Wrapper]] = {
    "env": Wrapper(
        flags="i0v",
        with_argument="uCS",
        long_flags=frozenset({"ignore-environment", "null", "debug", "list-signal-handling"}),
        long_with_argument=frozenset({"unset", "chdir", "split-string"}),
        long_optional=frozenset({"default-signal", "ignore-signal", "block-signal"}),
        assignments=True,
        lone_dash=True,
        changes={"-C": _CHDIR, "--chdir": _CHDIR, "-S": "splits a string into the command",
                 "--split-string": "splits a string into the command"},
    ),
    "nice": Wrapper(
        with_argument="n", long_with_argument=frozenset({"adjustment"}), numeric_option=True
    ),
    "ionice": Wrapper(
        flags="tpPu",
        with_argument="cn",
        long_flags=frozenset({"ignore", "pid", "pgid", "uid"}),
        long_with_argument=frozenset({"class", "classdata"}),
        changes={"-p": _NO_COMMAND, "-P": _NO_COMMAND, "-u": _NO_COMMAND, "--pid": _NO_COMMAND,
                 "--pgid": _NO_COMMAND, "--uid": _NO_COMMAND},
    ),
    "taskset": Wrapper(
        flags="acp",
        long_flags=frozenset({"all-tasks", "cpu-list", "pid"}),
        operands=1,
        changes={"-p": _NO_COMMAND, "--pid": _NO_COMMAND},
    ),
    "chrt": Wrapper(
        flags="abdfiormpRv",
        with_argument="TPD",
        long_flags=frozenset({"all-tasks", "batch", "deadline", "fifo", "idle", "other", "rr",
                              "max", "pid", "reset-on-fork", "verbose"}),
        long_with_argument=frozenset({"sched-runtime", "sched-period", "sched-deadline"}),
        operands=1,
        optional_operand=r"[0-9]+",
        changes={"-p": _NO_COMMAND, "--pid": _NO_COMMAND, "-m": _NO_COMMAND,
                 "--max": _NO_COMMAND},
    ),
    "numactl": Wrapper(
        flags="albHsuStdDV",
        with_argument="ipPmNCwfLoMI",
        long_flags=frozenset({"all", "localalloc", "balancing", "hardware", "show", "huge",
                              "strict", "touch", "dump", "dump-nodes", "version"}),
        long_with_argument=frozenset({"interleave", "preferred", "preferred-many", "membind",
                                      "cpunodebind", "physcpubind", "weighted-interleave",
                                      "file", "length", "offset", "shmmode", "shmid", "shm"}),
        changes={"-H": _NO_COMMAND, "--hardware": _NO_COMMAND, "-s": _NO_COMMAND,
                 "--show": _NO_COMMAND, "-S": _NO_COMMAND, "--shm": _NO_COMMAND,
                 "-f": _NO_COMMAND, "--file": _NO_COMMAND, "-d": _NO_COMMAND,
                 "--dump": _NO_COMMAND, "-D": _NO_COMMAND, "--dump-nodes": _NO_COMMAND},
    ),
    "setpriv": Wrapper(
        flags="d",
        long_flags=frozenset({"dump", "no-new-privs", "clear-groups", "keep-groups",
                              "init-groups", "reset-env"}),
        long_with_argument=frozenset({"ambient-caps", "inh-caps", "bounding-set", "ruid", "euid",
                                      "reuid", "rgid", "egid", "regid", "groups", "securebits",
                                      "pdeathsig", "selinux-label", "apparmor-profile",
                                      "landlock-access", "landlock-rule"}),
        changes={"-d": _NO_COMMAND, "--dump": _NO_COMMAND},
    ),
    "sudo": Wrapper(
        flags="AbEHKklnPSisveV",
        with_argument="CDghprRtTuU",
        long_flags=frozenset({"askpass", "background", "edit", "set-home", "login",
                              "remove-timestamp", "reset-timestamp", "list", "non-interactive",
                              "preserve-groups", "stdin", "shell", "validate", "version"}),
        long_with_argument=frozenset({"close-from", "chdir", "group", "host", "prompt",
                                      "chroot", "role", "type", "command-timeout", "other-user",
                                      "user"}),
        long_optional=frozenset({"preserve-env"}),
        assignments=True,
        changes={"-D": _CHDIR, "--chdir": _CHDIR, "-R": "runs it in another root directory",
                 "--chroot": "runs it in another root directory", "-i": _SHELL, "-s": _SHELL,
                 "--login": _SHELL, "--shell": _SHELL, "-b": "runs it in the background",
                 "--background": "runs it in the background", "-e": _NO_COMMAND,
                 "--edit": _NO_COMMAND, "-l": _NO_COMMAND, "--list": _NO_COMMAND,
                 "-v": _NO_COMMAND, "--validate": _NO_COMMAND, "-K": _NO_COMMAND,
                 "--remove-timestamp": _NO_COMMAND, "-V": _NO_COMMAND, "--version": _NO_COMMAND},
    ),
    "setsid": Wrapper(flags="cfw", long_flags=frozenset({"ctty", "fork", "wait"})),
    "nohup": Wrapper(),
    "stdbuf": Wrapper(with_argument="ioe",
                      long_with_argument=frozenset({"input", "output", "error"})),
    "timeout": Wrapper(
        flags="v",
        with_argument="ks",
        long_flags=frozenset({"foreground", "preserve-status", "verbose"}),
        long_with_argument=frozenset({"kill-after", "signal"}),
        operands=1,
    ),
}
# fmt: on

#: A ``NAME=VALUE`` environment assignment, as env and sudo take them.
_ASSIGNMENT: Final = re.compile(r"[^=]+=.*", re.DOTALL)


class PrefixError(ValueError):
    """A wrapper in front of the command whose arguments imglock cannot follow."""

    def __init__(self, wrapper: str, message: str) -> None:
        super().__init__(f"{wrapper}: {message}")
        self.wrapper = wrapper


def wrapper_of(argv: Sequence[str]) -> Wrapper | None:
    """The table entry of ``argv[0]``, if it is a wrapper imglock sees through."""
    return WRAPPERS.get(os.path.basename(argv[0])) if argv else None


def command_start(argv: Sequence[str]) -> int:
    """Where the command that the wrappers at the front of *argv* run starts.

    0 when ``argv[0]`` is no wrapper; past every wrapper otherwise
    (``sudo -u vm env A=1 nice -n 5 qemu-system-x86_64`` gives 8).
    Raises :class:`PrefixError` when a wrapper is given an option that
    this table does not know or that makes it do something else, or no
    command at all.
    """
    start = 0
    while (wrapper := wrapper_of(argv[start:])) is not None:
        start = _skip_wrapper(argv, start, wrapper)
    return start


def _skip_wrapper(argv: Sequence[str], start: int, wrapper: Wrapper) -> int:
    """The index of the command that the wrapper at ``argv[start]`` runs."""
    name = os.path.basename(argv[start])
    i = start + 1
    while i < len(argv):
        element = argv[i]
        if element == "--":
            i += 1
            break
        if element == "-" and wrapper.lone_dash:
            i += 1
            continue
        if not element.startswith("-") or element == "-":
            break
        if wrapper.numeric_option and re.fullmatch(r"-[0-9]+", element):
            i += 1
            continue
        i = _skip_option(argv, i, name, wrapper)
    if wrapper.assignments:
        while i < len(argv) and _ASSIGNMENT.fullmatch(argv[i]):
            i += 1
    for _ in range(wrapper.operands):
        optional = wrapper.optional_operand
        if i < len(argv) and optional is not None and not re.fullmatch(optional, argv[i]):
            break
        i += 1
    if i >= len(argv):
        raise PrefixError(name, "no command to run after its options")
    return i


def _skip_option(argv: Sequence[str], i: int, name: str, wrapper: Wrapper) -> int:
    """The index after the option (and its argument) at ``argv[i]``."""
    element = argv[i]
    if element.startswith("--"):
        given, has_value, _ = element[2:].partition("=")
        option = _long_option(name, wrapper, given)
        _refuse_change(name, wrapper, f"--{option}")
        if option in wrapper.long_with_argument and not has_value:
            if i + 1 >= len(argv):
                raise PrefixError(name, f"option --{option} needs an argument")
            return i + 2
        return i + 1
    # A cluster of short options: -ab, -n5, -c 3.
    for at in range(1, len(element)):
        letter = element[at]
        _refuse_change(name, wrapper, f"-{letter}")
        if letter in wrapper.with_argument:
            if at + 1 < len(element):
                return i + 1
            if i + 1 >= len(argv):
                raise PrefixError(name, f"option -{letter} needs an argument")
            return i + 2
        if letter not in wrapper.flags:
            raise PrefixError(name, f"option -{letter} is not one imglock knows")
    return i + 1


def _long_option(name: str, wrapper: Wrapper, given: str) -> str:
    """The long option *given* stands for (getopt_long takes unique prefixes)."""
    options = wrapper.long_flags | wrapper.long_with_argument | wrapper.long_optional
    if given in options:
        return given
    matches = sorted(option for option in options if option.startswith(given))
    if len(matches) != 1:
        raise PrefixError(name, f"option --{given} is not one imglock knows")
    return matches[0]


def _refuse_change(name: str, wrapper: Wrapper, option: str) -> None:
    what = wrapper.changes.get(option)
    if what is not None:
        raise PrefixError(name, f"with {option} it {what}")
