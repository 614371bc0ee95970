"""Start-up as a user gets it: imglock installed with pip into a fresh venv.

Every command pays its start-up, and for ``status``, ``info`` and
``--version`` it is most of the cost.  The floor is ``python -c 'import
click'`` in the same venv: any click command pays at least that.  The
package is installed as a user installs it (``pip install .``, not
editable, bytecode compiled by pip), so that the figures do not depend on
a development tree.  Commands run in turns, so that a change in the
machine's load falls on all of them alike, and each ratio is the median of
the per-turn ratios (:func:`benchmarks.timing.paired_ratio`).

Wall time on a shared machine still moves by several percent from run to
run, so the instructions each command executes in user space are counted
too, once, by valgrind's callgrind: a count that does not move, to tell a
change of a percent or two (it leaves out the kernel's part: mapping
files and extension modules, the process's exit).
Run: ``python -m benchmarks.bench_startup`` (part of ``python -m benchmarks``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks.timing import (
    Figure,
    Row,
    Unavailable,
    command_turns,
    medians,
    paired_ratio,
    print_table,
)

REPO = Path(__file__).resolve().parents[1]
TARGET = "≤ 1.25x"


def venv_with_imglock(root: Path) -> Path:
    """A fresh venv under *root* with imglock installed from this tree; its bin directory."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip: list[str | Path] = [
        venv / "bin" / "python",
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    subprocess.run([*pip, REPO], check=True, capture_output=True, cwd=root, timeout=600)
    return venv / "bin"


def instructions(argv: Sequence[str], env: Mapping[str, str]) -> int | None:
    """The instructions *argv* executes in user space (callgrind's count); None if not counted."""
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    return int(found.group(1)) if found else None


def instruction_rows(commands: Mapping[str, Sequence[str]], env: Mapping[str, str]) -> list[Row]:
    """Each imglock command's instructions beside ``import click``'s."""
    what = "instructions (callgrind)"
    if shutil.which("valgrind") is None:
        return [Unavailable(what, "not measured: no valgrind")]
    counts = {name: instructions(commands[name], env) for name in ("click", "info", "status")}
    click = counts["click"]
    rows: list[Row] = []
    for key, label in (("info", "imglock info IMG"), ("status", "imglock status IMG")):
        count = counts[key]
        if click is None or count is None:
            rows.append(Unavailable(f"{what}: {label}", "not measured: valgrind failed"))
            continue
        rows.append(Figure(f"{what}: {label}", count, "import click", click, unit="instructions"))
    return rows


def figures(quick: bool = False) -> list[Row]:
    runs = 10 if quick else 60
    what = "start-up in a fresh venv (pip install .)"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            bin_dir = venv_with_imglock(root)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            return [Unavailable(what, f"not measured: pip install failed: {exc}")]
        image = root / "vm.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "1G"], check=True)
        python, imglock = str(bin_dir / "python"), str(bin_dir / "imglock")
        commands = {
            "pass": [python, "-c", "pass"],
            "click": [python, "-c", "import click"],
            "version": [imglock, "--version"],
            "info": [imglock, "info", str(image)],
            "status": [imglock, "status", str(image)],
        }
        # Run from the venv's directory, so that no development tree is on the path.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        os.chdir(root)
        try:
            turns = command_turns(commands, runs, env)
            counted = instruction_rows(commands, env)
        finally:
            os.chdir(REPO)
    t = medians(turns)
    click = t["click"]
    rows: list[Row] = [
        Figure(
            "start-up (venv): python -c 'import click'",
            click,
            "python -c pass",
            t["pass"],
            paired=paired_ratio(turns["click"], turns["pass"]),
        )
    ]
    for key, label in (
        ("version", "imglock --version"),
        ("info", "imglock info IMG"),
        ("status", "imglock status IMG"),
    ):
        paired = paired_ratio(turns[key], turns["click"])
        rows.append(
            Figure(f"start-up (venv): {label}", t[key], "import click", click, TARGET, paired)
        )
    return rows + counted


def main() -> None:
    print_table(figures(quick="--quick" in sys.argv[1:]))


if __name__ == "__main__":
    main()
