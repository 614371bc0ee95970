"""What every command shares: -v/-q, one-line warnings, numbers of seconds,
shell completion, --version.

-v and -q are accepted by the group and by every command, mean the same in
either place, and add up: each -v raises the verbosity by one and each -q
lowers it.  Quiet shows errors only; normal adds warnings; verbose adds
notes on what is done and why.  Every option that takes seconds, in every
command, refuses nan, negative and huge values the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import ImglockCli

from imglock import __version__
from imglock.__main__ import command_of, head_start
from imglock.cli import COMMANDS, cli
from imglock.cli.common import Voice, verbosity_options
from imglock.cli.params import Seconds
from imglock.errors import EX_IOERR, EX_NOINPUT, EX_OK, EX_USAGE
from imglock.lock.proclocks import FlockTable

# --------------------------------------------------------------------------
# -v and -q on every command

#: Each command, its arguments for an image, and the note -v adds.
CASES = {
    "info": (["{image}"], "imglock: {image}: format raw (probed)"),
    "status": (["{image}"], "imglock: images read: 1, errors: 0, files skipped: 0"),
    "run": (
        ["--image", "{image}", "--", "true"],
        "imglock: claimed {image} exclusive (imglock layer, QEMU's lock bytes)",
    ),
}


def invocation(command: str, image: Path, flag: str | None, where: str) -> list[str]:
    args = [arg.format(image=image) for arg in CASES[command][0]]
    if flag is None:
        return [command, *args]
    return [flag, command, *args] if where == "before" else [command, flag, *args]


def options_of(command: click.Command | None) -> set[str]:
    assert command is not None
    return {opt for param in command.params for opt in param.opts}


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["status", "x"], "status"),
        (["-v", "-q", "status"], "status"),
        (["--verbose", "info", "status"], "info"),
        (["--help", "status"], None),
        (["-V"], None),
        ([], None),
    ],
)
def test_the_program_reads_the_command_as_click_does(args: list[str], command: str | None) -> None:
    assert command_of(args) == command


def test_status_gets_its_proc_locks_read_started_before_the_command_line_loads() -> None:
    assert isinstance(head_start(["-q", "status", "x"]), FlockTable)
    assert head_start(["info", "x"]) is None  # only status waits on /proc/locks
    ran: list[object] = []

    @click.command()
    def probe() -> None:
        ran.append(click.get_current_context().find_object(FlockTable))

    started = FlockTable(background=True)
    probe.main(args=[], obj=started, standalone_mode=False)
    assert ran == [started]  # a command finds the read started for it


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_group_and_every_command_take_verbose_and_quiet(name: str) -> None:
    for command in (cli, cli.get_command(click.Context(cli), name)):
        assert {"-v", "--verbose", "-q", "--quiet"} <= options_of(command)


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("command", sorted(CASES))
def test_verbose_adds_notes_and_changes_nothing_else(
    imglock_cli: ImglockCli, raw_image: Path, command: str, where: str
) -> None:
    plain = imglock_cli(*invocation(command, raw_image, None, where))
    verbose = imglock_cli(*invocation(command, raw_image, "-v", where))
    assert (plain.returncode, plain.stderr) == (EX_OK, "")
    assert (verbose.returncode, verbose.stdout) == (plain.returncode, plain.stdout)
    assert CASES[command][1].format(image=raw_image) in verbose.stderr.splitlines()


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("command", sorted(CASES))
def test_quiet_says_nothing_on_success(
    imglock_cli: ImglockCli, raw_image: Path, command: str, where: str
) -> None:
    proc = imglock_cli(*invocation(command, raw_image, "-q", where))
    assert (proc.returncode, proc.stderr) == (EX_OK, "")


@pytest.mark.parametrize("command", sorted(CASES))
def test_quiet_never_silences_an_error(
    imglock_cli: ImglockCli, tmp_path: Path, command: str
) -> None:
    missing = tmp_path / "missing.raw"
    proc = imglock_cli(*invocation(command, missing, "-q", "before"))
    assert proc.returncode == EX_NOINPUT
    assert proc.stderr == f"imglock: {missing}: No such file or directory\n"


@pytest.mark.parametrize(
    ("flags", "warning", "note"),
    [
        ([], True, False),
        (["-q"], False, False),
        (["-v"], True, True),
        (["-v", "-q"], True, False),  # they cancel out
        (["-vv", "-q"], True, True),
        (["-qq", "-v"], False, False),
    ],
)
def test_v_and_q_add_up_wherever_they_are_given(
    imglock_cli: ImglockCli, tmp_path: Path, flags: list[str], warning: bool, note: bool
) -> None:
    # An empty directory gives both a warning ("no images found") and a note.
    for split in range(len(flags) + 1):
        before, after = flags[:split], flags[split:]
        stderr = imglock_cli(*before, "status", *after, tmp_path).stderr
        assert ("warning: no images found" in stderr) == warning, (before, after)
        assert ("images read: 0" in stderr) == note, (before, after)


def test_run_with_v_says_why_no_holder_record_was_written(
    imglock_cli: ImglockCli, raw_image: Path
) -> None:
    (raw_image.parent / ".imglock").write_text("not a directory")
    proc = imglock_cli("run", "-v", "--image", raw_image, "--", "true")
    assert proc.returncode == EX_OK
    (note,) = [line for line in proc.stderr.splitlines() if "no holder record" in line]
    assert note.startswith(f"imglock: no holder record for {raw_image}: ")
    assert f"{raw_image.parent}/.imglock" in note  # the reason names the directory
    assert imglock_cli("run", "--image", raw_image, "--", "true").stderr == ""


# --------------------------------------------------------------------------
# Warnings: one line, silenced by -q


@click.command()
@verbosity_options
def noisy() -> None:
    """A command that warns, as the lock code does when it falls back to POSIX locks."""
    warnings.warn("OFD locks are not available", RuntimeWarning, stacklevel=1)
    Voice.current().note("a note")


@pytest.fixture
def with_noisy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(COMMANDS, "noisy", (__name__, "noisy", "Warn."))
    with warnings.catch_warnings():  # puts showwarning back afterwards
        warnings.simplefilter("always")
        yield


@pytest.mark.usefixtures("with_noisy")
@pytest.mark.parametrize(
    ("args", "stderr"),
    [
        (["noisy"], "imglock: warning: OFD locks are not available\n"),
        (["-q", "noisy"], ""),
        (["noisy", "-q"], ""),
        (["noisy", "-v"], "imglock: warning: OFD locks are not available\nimglock: a note\n"),
    ],
)
def test_a_warning_is_one_line_and_q_silences_it(args: list[str], stderr: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stderr == stderr


# --------------------------------------------------------------------------
# Numbers of seconds: one validator for every option


def seconds_options() -> list[tuple[str, click.Option]]:
    """(command, option) for every option of every command whose help speaks of seconds."""
    found = []
    for name in COMMANDS:
        command = cli.get_command(click.Context(cli), name)
        assert command is not None
        for param in command.params:
            if isinstance(param, click.Option) and "seconds" in (param.help or "").lower():
                found.append((name, param))
    return found


def test_every_seconds_option_of_every_command_goes_through_one_validator() -> None:
    options = {f"{name} {option.opts[0]}" for name, option in seconds_options()}
    assert {"run --graph-interval", "run -w", "doctor -w"} <= options
    for name, option in seconds_options():
        assert isinstance(option.type, Seconds), f"{name} {option.opts[0]}"


@pytest.mark.parametrize("value", ["nan", "-1", "1e20"])
@pytest.mark.parametrize(
    "args",
    [
        ["run", "--graph-interval", "{value}", "--image", "{image}", "--", "true"],
        ["doctor", "--probe", "-w", "{value}", "{directory}"],
    ],
    ids=["run --graph-interval", "doctor -w"],
)
def test_a_bad_number_of_seconds_is_refused_in_one_line_with_exit_2(
    tmp_path: Path, imglock_cli: ImglockCli, args: list[str], value: str
) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4096))
    words = [a.format(value=value, image=image, directory=tmp_path) for a in args]
    proc = imglock_cli(*words, timeout=20)
    assert proc.returncode == EX_USAGE
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"imglock {args[0]}: ") and repr(value) in line
    assert not (tmp_path / ".imglock-probe").exists()


@pytest.mark.parametrize(
    "args", [["--bogus\x1b[2J"], ["status", "--bogus\x9b"], ["no-such-command\n"]], ids=str
)
def test_a_usage_error_anywhere_is_one_escaped_line_and_exit_2(
    imglock_cli: ImglockCli, args: list[str]
) -> None:
    proc = imglock_cli(*args)
    assert proc.returncode == EX_USAGE
    (line,) = proc.stderr.splitlines()
    assert line.startswith("imglock") and "\x1b" not in line and "\x9b" not in line


# --------------------------------------------------------------------------
# Shell completion and --version


def complete(shell: str, words: str, cword: str) -> list[str]:
    env = {**os.environ, "_IMGLOCK_COMPLETE": f"{shell}_complete"}
    env |= {"COMP_WORDS": words, "COMP_CWORD": cword}
    proc = subprocess.run(
        [sys.executable, "-m", "imglock"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize(
    ("shell", "marker"),
    [
        ("bash", "complete -o nosort -F _imglock_completion imglock"),
        ("zsh", "#compdef imglock"),
        ("fish", "complete --no-files --command imglock"),
    ],
)
def test_completion_scripts_are_generated_for_each_shell(shell: str, marker: str) -> None:
    env = {**os.environ, "_IMGLOCK_COMPLETE": f"{shell}_source"}
    proc = subprocess.run(
        [sys.executable, "-m", "imglock"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert marker in proc.stdout


def test_completion_offers_commands_and_their_options() -> None:
    assert complete("bash", "imglock st", "1") == ["plain,status"]
    assert complete("bash", "imglock status --js", "2") == ["plain,--json"]
    assert {"plain,-v", "plain,--quiet"} <= set(complete("bash", "imglock run -", "2"))
    assert complete("zsh", "imglock r", "1")[:2] == ["plain", "run"]
    assert complete("fish", "imglock i", "i")[:2] == ["plain", "info"]


def test_version(imglock_cli: ImglockCli) -> None:
    for flag in ("-V", "--version"):
        proc = imglock_cli(flag)
        assert (proc.returncode, proc.stdout) == (EX_OK, f"imglock, version {__version__}\n")


# --------------------------------------------------------------------------
# An answer that cannot be written


def onto_a_full_disk(argv: list[str], *, stderr_too: bool) -> subprocess.CompletedProcess[str]:
    """``imglock ARGV`` with stdout on /dev/full (every write: ENOSPC), and stderr too if asked."""
    with open("/dev/full", "wb") as full:
        return subprocess.run(
            [sys.executable, "-m", "imglock", *argv],
            stdin=subprocess.DEVNULL,
            stdout=full,
            stderr=full if stderr_too else subprocess.PIPE,
            text=True,
            timeout=60,
        )


@pytest.mark.parametrize(
    "args",
    [
        ["status", "{image}"],
        ["status", "--json", "{image}"],
        ["info", "{image}"],
        ["info", "--json", "{image}"],
        ["run", "--dry-run", "--image", "{image}", "--", "true"],
        ["run", "--dry-run", "--json", "--image", "{image}", "--", "true"],
        ["doctor", "{directory}"],
        ["doctor", "--json", "{directory}"],
    ],
)
def test_an_answer_that_cannot_be_written_is_one_line_and_exit_74(
    raw_image: Path, args: list[str]
) -> None:
    """Output to a full disk (/dev/full): no traceback, nothing written twice at exit."""
    argv = [arg.format(image=raw_image, directory=raw_image.parent) for arg in args]
    proc = onto_a_full_disk(argv, stderr_too=False)
    assert (proc.returncode, proc.stderr) == (
        EX_IOERR,
        "imglock: cannot write the output: No space left on device\n",
    )


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["status", "{missing}"], EX_NOINPUT),
        (["info", "{missing}"], EX_NOINPUT),
        (["run", "--image", "{missing}", "--", "true"], EX_NOINPUT),
        (["status", "{image}"], EX_IOERR),  # stdout is full as well
    ],
)
def test_an_error_line_that_cannot_be_written_leaves_the_exit_status_to_say_it(
    raw_image: Path, args: list[str], status: int
) -> None:
    argv = [arg.format(image=raw_image, missing=raw_image.parent / "missing") for arg in args]
    assert onto_a_full_disk(argv, stderr_too=True).returncode == status
