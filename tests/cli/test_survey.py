"""Looking at many images at once: the same answers, in the same order, as one at a time.

``imglock status DIR`` looks at several images at once (on a network
filesystem each is a handful of round trips, which overlap in threads);
what it reports, and what it says it skipped, must not depend on that.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Generator
from pathlib import Path

import pytest
from conftest import SpawnRival
from test_status_cli import qcow2, raw

from imglock.errors import FormatError, ImglockError
from imglock.formats import OpenImage
from imglock.report import inspect_image
from imglock.scan import find_images, overlapped, survey


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Images, files that are not, specials, duplicates and broken ones, in several directories."""
    root = tmp_path / "store"
    for i in range(40):
        qcow2(root / f"d{i % 3}" / f"vm{i:02d}.qcow2")
        raw(root / f"d{i % 3}" / f"disk{i:02d}.raw")
    raw(root / "d0" / "notes.txt", 100)
    (root / "d1" / "bad.qcow2").write_bytes(b"QFI\xfb" + b"\xff" * 100)  # malformed
    os.mkfifo(root / "d1" / "fifo.img")
    os.symlink("vm00.qcow2", root / "d0" / "link.qcow2")
    os.link(root / "d0" / "vm00.qcow2", root / "d2" / "hardlink.qcow2")
    os.symlink("../d0", root / "d2" / "loop")
    return root


def one_at_a_time(paths: list[str]) -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    skipped: list[tuple[str, str]] = []
    looked: list[tuple[str, object]] = []
    for found in find_images(paths, lambda path, why: skipped.append((path, why))):
        if found.image is None:
            looked.append((found.filename, str(found.error)))
            continue
        try:
            looked.append((found.filename, inspect_image(found.image).to_json()))
        finally:
            found.image.close()
    return looked, skipped


def many_at_once(
    paths: list[str], workers: int
) -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    skipped: list[tuple[str, str]] = []
    looked: list[tuple[str, object]] = []
    for filename, outcome in survey(
        paths,
        lambda image: inspect_image(image),
        lambda path, why: skipped.append((path, why)),
        workers=workers,
    ):
        shown = str(outcome) if isinstance(outcome, ImglockError) else outcome.to_json()
        looked.append((filename, shown))
    return looked, skipped


@pytest.mark.parametrize("workers", [1, 2, 8, 32])
def test_a_survey_reports_what_a_walk_one_file_at_a_time_reports_in_its_order(
    tree: Path, rival: SpawnRival, workers: int
) -> None:
    assert rival(tree / "d1" / "vm01.qcow2").ok  # one held image among them
    paths = [str(tree), str(tree / "d2" / "vm05.qcow2"), str(tree / "missing.raw")]
    expected = one_at_a_time(paths)
    assert many_at_once(paths, workers) == expected
    looked, skipped = expected
    assert len(looked) == 80 + 1 + 1  # the images, the malformed one, the missing one
    for twice in (tree / "d2" / "hardlink.qcow2", tree / "d2" / "vm05.qcow2"):
        assert (str(twice), "the same file as one listed already") in skipped


def test_jobs_overlap_up_to_the_number_of_workers_and_results_keep_their_order() -> None:
    workers = 4
    barrier = threading.Barrier(workers, timeout=30)
    running, most = 0, 0
    lock = threading.Lock()

    def job(n: int) -> Callable[[], int]:
        def run() -> int:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            if n < workers:
                barrier.wait()  # the first ones can only get past together
            with lock:
                running -= 1
            return n

        return run

    assert list(overlapped((job(n) for n in range(50)), workers)) == list(range(50))
    assert most == workers


def test_an_error_in_a_job_comes_out_at_its_place_in_the_order() -> None:
    def job(n: int) -> Callable[[], int]:
        def run() -> int:
            if n == 3:
                raise FormatError("image3", "broken")
            return n

        return run

    results = overlapped((job(n) for n in range(10)), 4)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(FormatError, match="image3: broken"):
        next(results)


def test_a_survey_stopped_early_leaves_no_thread_and_no_descriptor(tree: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before_threads, before_fds = threading.active_count(), open_fds()
    looks = survey([str(tree)], lambda image: image.filename, workers=8)
    assert next(looks)[0].endswith("disk00.raw")
    assert isinstance(looks, Generator)  # closed before its end, as a caller may
    looks.close()
    assert threading.active_count() == before_threads
    assert open_fds() == before_fds


def test_one_image_is_looked_at_without_threads(tree: Path) -> None:
    seen: list[str] = []

    def look(image: OpenImage) -> str:
        seen.append(threading.current_thread().name)
        return image.filename

    assert [f for f, _ in survey([str(tree / "d0" / "vm00.qcow2")], look)] == [
        str(tree / "d0" / "vm00.qcow2")
    ]
    assert seen == [threading.main_thread().name]
