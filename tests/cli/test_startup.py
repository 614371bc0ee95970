"""Each command imports what it uses, and nothing else: start-up is mostly imports.

These tests read which modules a real ``python -m imglock ...`` imports
(``python -v``, which, unlike ``-X importtime``, also reports the modules
loaded through importlib, as the CLI loads its commands and the image
format drivers); they time nothing.  The timings themselves are ``python
-m benchmarks``' start-up rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SpawnRival
from qcow2_builder import write as write_qcow2

REPO = Path(__file__).resolve().parents[2]

#: Never needed by info, status or a run of a command that is not QEMU.
NEVER = {
    "asyncio",  # the QMP monitor's
    "qemu.qmp",
    "imglock.qemu.monitor",
    "imglock.run.handoff",
    "hypothesis",
    "pytest",
    "_hashlib",  # OpenSSL: only a lockspace name needs hashlib
    "socket",
    "secrets",
}
#: Only for following a claim's backing chain, or for a lock seen on the image.
CHAIN = {"imglock.chain"}
PROC = {"imglock.lock.procfs"}
#: The lock machinery, which reading a header does not need.
LOCKS = {
    "imglock.lock.protocol",
    "imglock.lock.fcntl_locks",
    "imglock.lock.identity",
    "imglock.lock.records",
}
#: Taking locks: the protocol's operations and the flock layer (reading
#: locks needs only the byte map, imglock.lock.byte_map).
CLAIMING = {"imglock.lock.protocol", "imglock.lock.flock"}
RUN = {"imglock.run.runner", "imglock.run.launch"}
#: The claim machinery, which looking at who holds an image does not need.
CLAIMS = {"imglock.api", "imglock.claims.facade"}
#: Costly to load or to use at every start-up: the json package, the qcow2
#: parser (for an image that is not qcow2), QEMU's command-line parser (for
#: a command that is not QEMU).
QCOW2 = {"imglock.formats.qcow2"}
QEMU_CMDLINE = {"imglock.qemu.cmdline"}


def python_v(
    *argv: str | os.PathLike[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -v ARGV``, its stderr (where -v reports) captured."""
    return subprocess.run(
        [sys.executable, "-v", *(os.fspath(arg) for arg in argv)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=env,
    )


def imported(*argv: str | os.PathLike[str], env: dict[str, str] | None = None) -> set[str]:
    """Every module that ``python ARGV`` imports."""
    proc = python_v(*argv, env=env)
    lines = proc.stderr.splitlines()
    # -v says "import 'NAME' # <loader>" for every module as it is loaded,
    # and much more on lines that start with "#".
    said = [line for line in lines if not line.startswith(("import '", "#"))]
    assert proc.returncode in (0, 1), "\n".join(said)[-2000:]
    return {line.split("'")[1] for line in lines if line.startswith("import '")}


def imglock(*args: str | os.PathLike[str]) -> set[str]:
    return imported("-m", "imglock", *args)


def test_the_detector_sees_imports() -> None:
    assert {"imglock", "imglock.cli", "click"} <= imglock("--version")


def test_import_imglock_imports_only_the_package() -> None:
    modules = imported("-c", "import imglock")
    assert {m for m in modules if m.startswith("imglock")} == {"imglock"}
    assert "click" not in modules and "dataclasses" not in modules


def test_help_imports_no_command() -> None:
    modules = imglock("--help")
    assert not {"imglock.cli.info", "imglock.cli.status", "imglock.cli.run"} & modules


def test_info_reads_a_header_without_the_lock_machinery(raw_image: Path) -> None:
    modules = imglock("info", raw_image)
    assert "imglock.formats.raw" in modules
    unwanted = NEVER | PROC | LOCKS | RUN | QCOW2 | QEMU_CMDLINE
    assert (unwanted | {"json", "imglock.lock.discovery"}) & modules == set()
    assert "json" in imglock("info", "--json", raw_image)


def test_info_of_a_qcow2_image_loads_its_parser_and_nothing_more(tmp_path: Path) -> None:
    modules = imglock("info", write_qcow2(tmp_path / "disk.qcow2"))
    assert modules >= QCOW2
    unwanted = NEVER | PROC | LOCKS | RUN | QEMU_CMDLINE
    assert (unwanted | {"json", "imglock.lock.discovery"}) & modules == set()


def test_a_qcow2_image_never_loads_the_fallback_driver(tmp_path: Path) -> None:
    image = write_qcow2(tmp_path / "disk.qcow2")
    for command in ("info", "status"):
        assert "imglock.formats.raw" not in imglock(command, image)


def test_a_named_format_loads_only_its_driver(tmp_path: Path) -> None:
    image = write_qcow2(tmp_path / "disk.qcow2")
    assert imglock("info", "--format", "qcow2", image) >= QCOW2
    assert not QCOW2 & imglock("info", "--format", "raw", image)  # named: never probed


def test_status_of_free_images_scans_no_proc_and_loads_no_json(raw_image: Path) -> None:
    modules = imglock("status", raw_image)
    assert {"imglock.lock.discovery", "imglock.lock.byte_map"} <= modules
    unwanted = NEVER | CHAIN | PROC | CLAIMING | RUN | CLAIMS | QCOW2 | QEMU_CMDLINE
    assert (unwanted | {"json"}) & modules == set()
    assert "json" in imglock("status", "--json", raw_image)


def test_status_of_a_held_image_reads_proc(raw_image: Path, rival: SpawnRival) -> None:
    rival(raw_image)
    modules = imglock("status", raw_image)
    assert modules >= PROC
    assert (NEVER | CHAIN | CLAIMING | RUN) & modules == set()


#: portalocker, and what it loads: only a claim that takes the flock layer needs it.
FLOCK = {"portalocker"}


def test_run_of_a_command_that_is_not_qemu_never_loads_the_monitor(raw_image: Path) -> None:
    modules = imglock("run", "--flock", "off", "--image", raw_image, "--", "true")
    assert modules >= RUN
    assert (NEVER | FLOCK) & modules == set()


def test_only_a_claim_that_takes_the_flock_layer_loads_portalocker(raw_image: Path) -> None:
    assert imglock("run", "--image", raw_image, "--", "true") >= FLOCK  # auto, on a local disk
    assert FLOCK & imglock("status", raw_image) == set()
    assert FLOCK & imglock("info", raw_image) == set()


def test_run_of_a_command_that_is_not_qemu_loads_no_qemu_parser_json_or_discovery(
    raw_image: Path,
) -> None:
    modules = imglock("run", "--flock", "off", "--image", raw_image, "--", "true")
    assert modules >= RUN | {"imglock.lock.records"}  # a holder record was written, without json
    # (dataclasses is loaded: the lock check is one, and a run lasts far
    # longer than the fraction of a millisecond it costs.)
    unwanted = QCOW2 | QEMU_CMDLINE | PROC
    assert (unwanted | {"json", "imglock.lock.discovery"}) & modules == set()


def test_run_of_an_image_someone_holds_names_the_holder(raw_image: Path, rival: SpawnRival) -> None:
    rival(raw_image)
    # -E 1: the conflict's exit status, one that imported() accepts.
    modules = imglock("run", "-E", "1", "--image", raw_image, "--", "true")
    assert modules >= {"imglock.lock.discovery"}  # loaded to say who holds it
    assert (NEVER | QEMU_CMDLINE) & modules == set()


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_imports_no_image_code(shell: str) -> None:
    modules = imported("-m", "imglock", env={**os.environ, "_IMGLOCK_COMPLETE": f"{shell}_source"})
    assert "click.shell_completion" in modules
    assert not {"imglock.formats", "imglock.api", "imglock.lock.discovery"} & modules


def test_the_program_sets_the_command_lines_objects_aside_from_the_collector() -> None:
    """Loaded once, they live as long as the process: the collector skips them."""
    probe = (
        "import gc, sys; import imglock.__main__ as m; sys.argv = ['imglock', '--version']\n"
        "try:\n    m.main()\nexcept SystemExit:\n    pass\n"
        "print(gc.get_freeze_count())"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert int(proc.stdout.split()[-1]) > 10_000, proc.stdout


def test_a_report_ends_once_written_without_tearing_the_interpreter_down(
    raw_image: Path,
) -> None:
    """``python -v`` reports the teardown ("# cleanup..."): a report has none, a run has one."""
    for command in ("status", "info"):
        assert "# cleanup" not in python_v("-m", "imglock", command, raw_image).stderr, command
    run = ("run", "--flock", "off", "--image", raw_image, "--", "true")
    assert "# cleanup" in python_v("-m", "imglock", *run).stderr


def end_now(code: str) -> subprocess.CompletedProcess[str]:
    """Run *code* with :func:`imglock.__main__.end_now` in scope, its output piped."""
    return subprocess.run(
        [sys.executable, "-c", f"import sys\nfrom imglock.__main__ import end_now\n{code}"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_ending_now_flushes_what_was_written_and_keeps_the_status() -> None:
    proc = end_now("sys.stdout.write('answer'); sys.stderr.write('note'); end_now(3)")
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "answer", "note")
    assert end_now("end_now(None)").returncode == 0


def test_a_status_that_is_a_message_is_left_to_python_to_print() -> None:
    proc = end_now("end_now('no such thing'); sys.exit('no such thing')")
    assert (proc.returncode, proc.stderr.strip()) == (1, "no such thing")


def test_output_that_cannot_be_flushed_is_left_to_python_to_report() -> None:
    proc = end_now(
        "sys.stdout.close(); end_now(0); print('ended the ordinary way', file=sys.stderr)"
    )
    assert proc.stderr.strip() == "ended the ordinary way"
