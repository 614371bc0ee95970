"""Fair to writers: a waiting writer goes before every claimer that arrives after it.

Three reader processes claim one image shared over and over, holding it in
turns that overlap, so that it is never free of readers.  Writers arrive
and wait.  With protocol v1 a writer waited for a moment with no reader,
which a stream like this never gives.  Now each writer gets the image once
the readers (and writers) that were there when it took its place have
left; no reader that asked after that moment gets it before the writer has
been and gone; writers are served in the order they arrived (imglock(7),
FAIRNESS: no waiter is overtaken by a claimer that arrived after it took
its place).  Everything here is asserted on order, read from
CLOCK_MONOTONIC, which every process on the machine shares.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import CLAIMER, ENV, waiting_pids
from processes import wait_until

pytestmark = pytest.mark.slow

STREAM = str(Path(__file__).parents[1] / "support" / "reader_stream.py")
READERS = 3
HOLD = 0.15


class Writer:
    """A claimer.py that waits for the image exclusively; when it got it, and when it let go."""

    def __init__(self, image: Path, started: list[subprocess.Popen[str]]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, CLAIMER, "--wait", "120", str(image)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        started.append(self.proc)
        self.got: float | None = None
        self.got_it = threading.Event()
        self.arrived: float | None = None
        self.stopped: float | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line and json.loads(line)["ok"]:
            self.got = time.monotonic()
            self.got_it.set()

    def wait_queued(self, image: Path) -> None:
        """Until its place shows in the queue: from then on it has arrived."""
        wait_until(
            lambda: self.proc.pid in waiting_pids(image),
            what="the writer in the queue",
            timeout=30,
            interval=0.005,
        )
        self.arrived = time.monotonic()

    def stop(self) -> None:
        self.stopped = time.monotonic()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0


def _stream(
    image: Path, log: Path, started: list[subprocess.Popen[str]]
) -> list[subprocess.Popen[str]]:
    readers = []
    for _ in range(READERS):
        proc = subprocess.Popen(
            [sys.executable, STREAM, str(image), str(log), str(HOLD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        readers.append(proc)
        time.sleep(HOLD / READERS)  # staggered: their holds overlap
    return readers


def _claims(log: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _flows(log: Path, *, after: float, rounds: int = 2) -> None:
    """Until every reader has held the image and let go *rounds* times since *after*
    (monotonic): the stream flows, its holds overlapping."""

    def flowed() -> bool:
        held = Counter(c["pid"] for c in _claims(log) if c["held"] > after)
        return len(held) == READERS and min(held.values()) >= rounds

    wait_until(flowed, what=f"every reader of the stream to hold the image {rounds} times")


def _readers_queued(image: Path, readers: list[subprocess.Popen[str]]) -> None:
    """Until every reader of the stream waits in the queue, behind the writers there."""
    pids = {proc.pid for proc in readers}
    wait_until(
        lambda: pids.issubset(waiting_pids(image)),
        what="every reader of the stream in the queue",
        timeout=30,
        interval=0.005,
    )


def _end(readers: list[subprocess.Popen[str]]) -> None:
    for proc in readers:
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in readers:
        assert proc.wait(60) == 0


def test_a_writer_behind_a_stream_of_readers_goes_before_those_that_came_after_it(
    raw_image: Path, tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    log = tmp_path / "claims.log"
    readers = _stream(raw_image, log, started)
    _flows(log, after=time.monotonic())
    writer = Writer(raw_image, started)
    writer.wait_queued(raw_image)
    assert writer.got_it.wait(60), "the writer never got the image"
    writer.stop()
    assert writer.stopped is not None
    _flows(log, after=writer.stopped)
    _end(readers)

    claims = _claims(log)
    assert writer.arrived is not None and writer.got is not None and writer.stopped is not None
    # The writer arrived while readers held the image.
    assert [c for c in claims if c["held"] < writer.arrived < c["left"]]
    # Readers that asked after the writer took its place held only after it left.
    later = [c for c in claims if c["asked"] > writer.arrived]
    assert later, "no reader came after the writer"
    assert all(c["held"] > writer.stopped for c in later)
    print(f"\n{len(claims)} reader claims; {len(later)} asked after the writer arrived, "
          f"all served after it")  # fmt: skip


def test_several_writers_are_served_in_the_order_they_arrived(
    raw_image: Path, tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    log = tmp_path / "claims.log"
    readers = _stream(raw_image, log, started)
    _flows(log, after=time.monotonic())
    writers = []
    for _ in range(3):
        writer = Writer(raw_image, started)
        writer.wait_queued(raw_image)
        writers.append(writer)
        _readers_queued(raw_image, readers)  # between this writer and the next
    order: list[Writer] = []
    for writer in writers:
        assert writer.got_it.wait(60), f"writer {writers.index(writer)} never got the image"
        assert not any(w.got_it.is_set() for w in writers if w not in (writer, *order)), (
            "a writer that arrived later went first"
        )
        order.append(writer)
        writer.stop()
    _end(readers)

    claims = _claims(log)
    for writer in writers:
        assert writer.arrived is not None and writer.stopped is not None
        later = [c for c in claims if c["asked"] > writer.arrived]
        assert all(c["held"] > writer.stopped for c in later)
    got = [w.got for w in writers]
    assert got == sorted(got)  # type: ignore[type-var]
