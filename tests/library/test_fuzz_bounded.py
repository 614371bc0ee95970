"""Bounded, seeded fuzzing of whole claims, from a corpus of real headers made by qemu-img.

tests/library/test_qcow2_fuzz.py throws random headers at the parser.  This throws
mutated *image files* at everything a user runs: ``inspect`` (status),
``open_chain`` (info --backing-chain) and ``claim`` + ``release`` (run),
and a sample of them at the real commands.  Each mutant must either work
or fail with a one-line ImglockError of status 65, and leave no lock and no
descriptor behind.

Every run of CI tries the same inputs: each mutant comes from a
``random.Random`` seeded with the corpus entry's name and the mutant's
number, so a failure names its seed and replays with :func:`mutant`.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from conftest import ENV
from hostile_cases import no_descriptor_leaked
from qcow2_builder import Qcow2Spec, build

import imglock
from imglock.chain import open_chain
from imglock.errors import EX_DATAERR, EX_OK, ImglockError

#: Mutants of each corpus entry per run: len(CORPUS) * MUTANTS inputs in all.
MUTANTS = 150
#: Mutants of each corpus entry that also go through the commands.
CLI_SAMPLE = 1
#: How much of each image is mutated and written: the header cluster's start.
WINDOW = 4096

#: The corpus: qemu-img create options (and follow-up commands) for each entry.
#: Names are relative (backing file, data file) and resolve inside the
#: corpus directory, which is also the working directory of every call.
#: (No LUKS image: qemu-img times its key derivation for half a second of CPU
#: and, on a busy machine, sometimes fails to measure it; test_qcow2_fuzz.py
#: covers the encryption fields with a hand-built header.)
CORPUS: dict[str, list[list[str]]] = {
    "plain": [["create", "-f", "qcow2", "{image}", "1M"]],
    "v2": [["create", "-f", "qcow2", "-o", "compat=0.10", "{image}", "1M"]],
    "tiny-clusters": [
        ["create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=1", "{image}", "1M"]
    ],
    "lazy-refcounts": [["create", "-f", "qcow2", "-o", "lazy_refcounts=on", "{image}", "1M"]],
    "backed": [["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "{image}"]],
    "backed-raw": [["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "{image}"]],
    "zstd-extended-l2": [
        ["create", "-f", "qcow2", "-o", "compression_type=zstd,extended_l2=on", "{image}", "1M"]
    ],
    "data-file": [
        ["create", "-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on", "{image}", "1M"]
    ],
    "bitmaps-snapshots": [
        ["create", "-f", "qcow2", "{image}", "1M"],
        ["bitmap", "--add", "{image}", "b0"],
        ["snapshot", "-c", "s1", "{image}"],
    ],
}

#: Whole fields of the fixed header (offset, width), for field mutations.
FIELDS = [
    (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8),
    (56, 4), (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1),
]  # fmt: skip
SPECIAL = (0, 1, 2, 3, 8, 9, 16, 21, 22, 63, 64, 72, 104, 112, 512, 4096, 65536)


def _value(rng: random.Random, width: int) -> int:
    top = (1 << (8 * width)) - 1
    choices = [0, 1, top, top - 1, 1 << (8 * width - 1), rng.getrandbits(8 * width)]
    return rng.choice([*choices, rng.choice(SPECIAL) & top])


def mutant(base: bytes, seed: str) -> bytes:
    """The mutant of *base* for *seed*: 1 to 4 field, word, byte or length changes."""
    rng = random.Random(seed)
    data = bytearray(base[:WINDOW])
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(("field", "word", "bytes", "truncate"))
        if kind == "field":
            offset, width = rng.choice(FIELDS)
        elif kind == "word":  # extension types and lengths, names, anything
            width = rng.choice((4, 8))
            offset = rng.randrange(0, len(data) - width + 1, 4) if len(data) >= width else 0
        if kind in ("field", "word") and offset + width <= len(data):
            data[offset : offset + width] = _value(rng, width).to_bytes(width, "big")
        elif kind == "bytes" and data:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == "truncate":
            del data[rng.randrange(len(data) + 1) :]
    return bytes(data)


@dataclass(frozen=True)
class Entry:
    name: str
    image: bytes


@pytest.fixture(scope="module")
def corpus(qemu_img_path: str, tmp_path_factory: pytest.TempPathFactory) -> list[Entry]:
    """The first WINDOW bytes of every corpus image, as qemu-img made them."""
    d = tmp_path_factory.mktemp("corpus")

    def qemu_img(*args: str) -> None:
        # Run in the corpus directory: relative data file names resolve there.
        subprocess.run([qemu_img_path, *args], cwd=d, check=True, capture_output=True, timeout=60)

    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "1M")
    qemu_img("create", "-q", "-f", "raw", "base.raw", "1M")
    entries = []
    for name, commands in CORPUS.items():
        image = f"{name}.qcow2"
        for command in commands:
            qemu_img(*(image if arg == "{image}" else arg for arg in command))
        entries.append(Entry(name, (d / image).read_bytes()[:WINDOW]))
    return entries


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where mutants live, with the files their names may reach; also the cwd."""
    for name in ("base.raw", "data.raw"):
        (tmp_path / name).write_bytes(bytes(WINDOW))
    (tmp_path / "base.qcow2").write_bytes(build(Qcow2Spec(cluster_bits=9)))
    monkeypatch.chdir(tmp_path)  # relative data file names resolve here, not in the tree
    return tmp_path


def outcome(call: Callable[[], object]) -> int:
    """Run *call*; EX_OK, or the status of the ImglockError it raised (checked for form)."""
    try:
        call()
    except ImglockError as exc:
        text = str(exc)
        assert "\n" not in text and ": " in text, text
        return exc.exit_status
    return EX_OK


def _claim_and_release(path: Path) -> None:
    imglock.claim(path).release()


def _chain(path: Path) -> None:
    open_chain(path).close()


def mutants(entry: Entry, directory: Path, count: int = MUTANTS) -> Iterator[tuple[str, Path]]:
    """(seed, file) of the first *count* mutants of *entry*, each written as it comes."""
    for number in range(count):
        seed = f"{entry.name}:{number}"
        path = directory / f"mutant-{entry.name}-{number}.qcow2"
        path.write_bytes(mutant(entry.image, seed))
        yield seed, path


@pytest.mark.qemu
def test_every_mutant_works_or_fails_in_one_line_and_leaves_nothing(
    corpus: list[Entry], workdir: Path
) -> None:
    statuses: dict[int, int] = {}
    for entry in corpus:
        assert outcome(partial(_claim_and_release, _write(workdir, entry))) == EX_OK
        with no_descriptor_leaked():
            for seed, path in mutants(entry, workdir):
                for call in (imglock.inspect, _chain, _claim_and_release):
                    status = outcome(partial(call, path))
                    assert status in (EX_OK, EX_DATAERR), f"seed {seed!r}: status {status}"
                    statuses[status] = statuses.get(status, 0) + 1
                assert imglock.holders(path) == [], f"seed {seed!r}: still locked"
                path.unlink()
    # The mutants reach both sides: images that work and images refused.
    assert statuses.get(EX_OK) and statuses.get(EX_DATAERR), statuses


def _write(directory: Path, entry: Entry) -> Path:
    path = directory / f"{entry.name}.qcow2"
    path.write_bytes(entry.image)
    return path


def imglock_cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "imglock", *(os.fspath(arg) for arg in args)],
        capture_output=True,
        timeout=10,
        env=ENV,  # this tree's imglock: the working directory is the mutants'
    )


def assert_answered(proc: subprocess.CompletedProcess[bytes], seed: str) -> None:
    errors = proc.stderr.decode("utf-8", "surrogateescape").splitlines()
    assert proc.returncode in (EX_OK, EX_DATAERR), (seed, proc.returncode, errors)
    assert len(errors) == (0 if proc.returncode == EX_OK else 1), (seed, errors)


@pytest.mark.qemu
def test_a_sample_of_mutants_through_the_commands(corpus: list[Entry], workdir: Path) -> None:
    sample = [m for entry in corpus for m in mutants(entry, workdir, CLI_SAMPLE)]
    for seed, path in sample:
        assert_answered(imglock_cli("info", "--backing-chain", path), seed)
        assert_answered(imglock_cli("run", "--image", path, "--", "true"), seed)
    # status takes them all at once: one line for each it cannot read.
    proc = imglock_cli("status", *(path for _, path in sample))
    refused = [seed for seed, path in sample if outcome(partial(imglock.inspect, path))]
    lines = proc.stderr.decode("utf-8", "surrogateescape").splitlines()
    assert len(lines) == len(refused), lines
    assert proc.returncode == (EX_DATAERR if refused else EX_OK)
    for _, path in sample:
        assert imglock.holders(path) == []


def test_mutants_are_the_same_on_every_run() -> None:
    base = bytes(range(256)) * 16
    assert mutant(base, "plain:7") == mutant(base, "plain:7")
    assert mutant(base, "plain:7") != mutant(base, "plain:8")
