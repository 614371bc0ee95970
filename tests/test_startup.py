"""Each command imports what it uses, and nothing else: start-up is mostly imports.

These tests read which modules a real ``python -m imglock ...`` imports
(``python -X importtime``); they time nothing.  The timings themselves are
``python -m benchmarks``' start-up rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SpawnRival

REPO = Path(__file__).resolve().parents[1]

#: Never needed by info, status or a run of a command that is not QEMU.
NEVER = {
    "asyncio",  # the QMP monitor's
    "qemu.qmp",
    "imglock.qemu.monitor",
    "imglock.handoff",
    "hypothesis",
    "pytest",
    "_hashlib",  # OpenSSL: only a lockspace name needs hashlib
    "socket",
    "secrets",
}
#: Only for following a claim's backing chain, or for a lock seen on the image.
CHAIN = {"imglock.chain"}
PROC = {"imglock.procfs"}
#: The lock machinery, which reading a header does not need.
LOCKS = {"imglock.protocol", "imglock.fcntl_locks", "imglock.identity", "imglock.records"}
RUN = {"imglock.runner", "imglock.launch"}


def imported(*argv: str | os.PathLike[str], env: dict[str, str] | None = None) -> set[str]:
    """Every module that ``python -X importtime ARGV`` imports."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *map(os.fspath, argv)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


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
    assert (NEVER | CHAIN | PROC | LOCKS | RUN | {"json", "imglock.discovery"}) & modules == set()
    assert "json" in imglock("info", "--json", raw_image)


def test_status_of_free_images_scans_no_proc_and_loads_no_json(raw_image: Path) -> None:
    modules = imglock("status", raw_image)
    assert "imglock.discovery" in modules
    assert (NEVER | CHAIN | PROC | RUN | {"json"}) & modules == set()
    assert "json" in imglock("status", "--json", raw_image)


def test_status_of_a_held_image_reads_proc(raw_image: Path, rival: SpawnRival) -> None:
    rival(raw_image)
    modules = imglock("status", raw_image)
    assert modules >= PROC
    assert (NEVER | CHAIN | RUN) & modules == set()


def test_run_of_a_command_that_is_not_qemu_never_loads_the_monitor(raw_image: Path) -> None:
    modules = imglock("run", "--image", raw_image, "--", "true")
    assert modules >= RUN
    assert NEVER & modules == set()


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_imports_no_image_code(shell: str) -> None:
    modules = imported("-m", "imglock", env={**os.environ, "_IMGLOCK_COMPLETE": f"{shell}_source"})
    assert "click.shell_completion" in modules
    assert not {"imglock.formats", "imglock.api", "imglock.discovery"} & modules
