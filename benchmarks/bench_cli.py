"""The commands as an operator runs them, each beside its peer or floor.

* ``imglock info --json`` beside ``qemu-img info -U --output=json``;
* ``imglock status DIR`` over a datastore of 1,000 images (some held)
  beside one ``lslocks -J``, which lists every lock of the host;
* ``imglock run --image IMG -- true`` beside ``flock IMG true`` and ``true``;
* the start-up of every command beside ``python -c pass``, and ``import
  click`` beside it too: the floor of any click command.

Commands run in turns (not each one N times in a row), so that a change in
the machine's load falls on all of them alike, and with their bytecode
cached as in an installed package.  Run: ``python -m benchmarks.bench_cli``
(part of ``python -m benchmarks``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.timing import Figure, Row, Unavailable, bytecode_env, command_medians, print_table
from imglock.api import Claim, ClaimSpec

PY = sys.executable
IMGLOCK = [PY, "-m", "imglock"]
#: Images in the datastore (half qcow2, half raw), and how many of them are held.
IMAGES = 1000
HELD = 5
STARTUP_TARGET = "≤ 1.5x"


@dataclass(frozen=True)
class Datastore:
    root: Path
    qcow2: Path  # a free qcow2 image
    raw: Path  # a free raw image


def make_images(root: Path, count: int = IMAGES) -> list[Path]:
    """*count* images in root/images, half qcow2 and half sparse 1 GiB raw, a raw last."""
    template = root / "template.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", template, "1G"], check=True)
    images = root / "images"
    images.mkdir()
    paths = []
    for i in range(count // 2):
        qcow2 = images / f"vm{i:04d}.qcow2"
        shutil.copyfile(template, qcow2)
        raw = images / f"disk{i:04d}.raw"
        with raw.open("wb") as f:
            f.truncate(1 << 30)  # sparse
        paths += [qcow2, raw]
    return paths


@contextmanager
def datastore(root: Path, count: int = IMAGES, held: int = HELD) -> Iterator[Datastore]:
    """*count* images under *root*, *held* of them claimed by this process meanwhile."""
    paths = make_images(root, count)
    claims = [Claim([ClaimSpec(str(path))]).acquire() for path in paths[:held]]
    try:
        yield Datastore(paths[-1].parent, qcow2=paths[-2], raw=paths[-1])
    finally:
        for claim in claims:
            claim.release()


def _peer_missing(*tools: str) -> str | None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def figures(quick: bool = False) -> list[Row]:
    runs, dir_runs = (8, 3) if quick else (30, 11)
    if (why := _peer_missing("qemu-img")) is not None:
        return [Unavailable("imglock commands (they need a qcow2 image)", why)]
    with tempfile.TemporaryDirectory() as tmp, datastore(Path(tmp)) as ds:
        env = bytecode_env(str(Path(tmp) / "pycache"))
        img, raw = str(ds.qcow2), str(ds.raw)
        commands = {
            "pass": [PY, "-c", "pass"],
            "click": [PY, "-c", "import click"],
            "version": [*IMGLOCK, "--version"],
            "info": [*IMGLOCK, "info", img],
            "info-json": [*IMGLOCK, "info", "--json", img],
            "qemu-img": ["qemu-img", "info", "-U", "--output=json", img],
            "status": [*IMGLOCK, "status", img],
            "run": [*IMGLOCK, "run", "--image", raw, "--", "true"],
            "flock": ["flock", raw, "true"],
            "true": ["true"],
        }
        t = command_medians(commands, runs, env)
        rows: list[Row] = [
            Figure("imglock info --json (qcow2)", t["info-json"], "qemu-img info -U", t["qemu-img"])
        ]
        rows += _status_rows(str(ds.root), dir_runs, env)
        rows += [
            Figure("imglock run -- true", t["run"], "flock FILE true", t["flock"]),
            Figure("imglock run -- true", t["run"], "true", t["true"]),
        ]
        floor = t["pass"]
        for key, what in (
            ("click", "start-up: python -c 'import click'"),
            ("version", "start-up: imglock --version"),
            ("info", "start-up: imglock info IMG"),
            ("status", "start-up: imglock status IMG"),
            ("run", "start-up: imglock run --image IMG -- true"),
        ):
            target = "" if key == "click" else STARTUP_TARGET
            rows.append(Figure(what, t[key], "python -c pass", floor, target))
        return rows


def _status_rows(root: str, runs: int, env: dict[str, str]) -> list[Row]:
    what = f"imglock status DIR, {IMAGES} images, {HELD} held"
    if (why := _peer_missing("lslocks")) is not None:
        return [Unavailable(what, why)]
    t = command_medians(
        {"status": [*IMGLOCK, "status", root], "lslocks": ["lslocks", "-J"]}, runs, env
    )
    return [Figure(what, t["status"], "lslocks -J (all locks)", t["lslocks"], "< 1 s")]


def main() -> None:
    print_table(figures(quick="--quick" in sys.argv[1:]))


if __name__ == "__main__":
    main()
