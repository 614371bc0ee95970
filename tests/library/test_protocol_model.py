"""The protocol, checked exhaustively, and the implementation held to the checked model.

:mod:`protocol_model` writes the protocol of imglock(7) as a table of
steps.  Here every interleaving of the steps of two and three claimers,
in every mix of modes, crashes and give-ups included, is explored and
every state checked; protocols with one thing changed are shown to be
caught; and real claims, recorded at the fcntl seam, are shown to be
paths through the same table.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from protocol_model import (
    PROTOCOL,
    Claimer,
    Table,
    accepts,
    explore,
    mutate,
)

from imglock.api import Claim, ClaimSpec
from imglock.errors import LockConflict
from imglock.lock import discovery, fcntl_locks, protocol
from imglock.lock.identity import Owner
from imglock.lock.protocol import Layer, Mode

MIXES_OF_TWO = list(itertools.combinations_with_replacement(Mode, 2))
MIXES_OF_THREE = list(itertools.combinations_with_replacement(Mode, 3))


def _names(modes: tuple[Mode, ...]) -> str:
    return "+".join(m.value for m in modes)


@pytest.mark.parametrize("qemu", [False, True], ids=["imglock-layer", "with-qemu-layer"])
@pytest.mark.parametrize("modes", MIXES_OF_TWO, ids=_names)
def test_two_claimers_claiming_twice_each_in_any_interleaving(
    modes: tuple[Mode, ...], qemu: bool
) -> None:
    claimers = [Claimer(m, qemu=qemu, cycles=2) for m in modes]
    result = explore(PROTOCOL, claimers)
    print(f"\n{_names(modes)}, qemu={qemu}: {result.states} states, {result.transitions} steps")
    assert result.violations == []
    assert result.states > 100


@pytest.mark.parametrize("modes", MIXES_OF_THREE, ids=_names)
def test_three_claimers_in_any_interleaving(modes: tuple[Mode, ...]) -> None:
    claimers = [Claimer(m) for m in modes]
    result = explore(PROTOCOL, claimers)
    print(f"\n{_names(modes)}: {result.states} states, {result.transitions} steps")
    assert result.violations == []
    assert result.states > 300
    # Concurrent arrivals may go first, each once; no later arrival ever does.
    assert result.max_overtaken <= len(claimers) - 1


CHANGES = [(a, b) for a in Mode for b in Mode if a is not b]


@pytest.mark.parametrize("others", MIXES_OF_TWO, ids=_names)
@pytest.mark.parametrize(("old", "new"), CHANGES, ids=lambda m: m.value)
def test_a_holder_changing_mode_beside_two_claimers_in_any_interleaving(
    old: Mode, new: Mode, others: tuple[Mode, ...]
) -> None:
    """Mutual exclusion holds throughout, and the changer never lets go of the image."""
    claimers = [Claimer(new, changes_from=old), *(Claimer(m) for m in others)]
    result = explore(PROTOCOL, claimers)
    assert result.violations == []
    assert result.states > 100


def test_a_claimer_that_does_not_wait_and_one_that_does() -> None:
    claimers = [Claimer(Mode.EXCLUSIVE, wait=False), Claimer(Mode.EXCLUSIVE), Claimer(Mode.SHARED)]
    result = explore(PROTOCOL, claimers)
    assert result.violations == [] and result.states > 1000


# --- A live migration: the destination announces early -------------------------------


@pytest.mark.parametrize("third", [None, *Mode], ids=lambda m: m.value if m else "alone")
@pytest.mark.parametrize("mode", [Mode.EXCLUSIVE, Mode.SHARED], ids=lambda m: m.value)
def test_a_migration_destination_beside_its_source_and_a_third_claimer(
    mode: Mode, third: Mode | None
) -> None:
    """The source lets go and may claim again; the destination holds its intent from the
    start of the migration and tests again while only the source is in the way; a third
    claimer arrives at any moment.  Mutual exclusion, no phantom, no deadlock, and no
    waiter overtaken by the destination's early intent."""
    claimers = [Claimer(mode, holds_first=True, cycles=2), Claimer(mode, arrives=True)]
    claimers += [Claimer(third)] if third is not None else []
    result = explore(PROTOCOL, claimers)
    print(f"\n{mode.value} + {third}: {result.states} states, {result.transitions} steps")
    assert result.violations == []
    assert result.max_overtaken <= len(claimers) - 1


# --- Mutations: a protocol with one thing changed is caught ---------------------------

#: Protocol v1: the holder byte taken first, then the test, then a rollback.
HOLDER_BEFORE_TEST = mutate(
    PROTOCOL,
    "idle",
    [("take-holder", "fast-test", "")],
    **{
        "fast-test": [("test-rivals", "held", "clear"), ("test-rivals", "v1-lost", "blocked")],
        "v1-lost": [("drop-holder", "failed", "")],
    },
)
#: No intent: test, then take the holder range.
NO_INTENT = mutate(
    PROTOCOL,
    "idle",
    [("test-rivals", "take-holder", "clear plain"), ("test-rivals", "failed", "blocked")],
)
#: The intent dropped before the holder range is taken.
INTENT_DROPPED_EARLY = mutate(
    PROTOCOL,
    "fast-test",
    [("test-rivals", "early", "clear plain"), ("test-rivals", "lost", "blocked")],
    early=[("drop-intent", "take-holder", "")],
    won=[("leave-queue", "held", "queued"), ("drop-holder", "done", "unqueued")],
)
#: A newcomer's first attempt looks at holders and intents only, not at the queue.
QUEUE_IGNORED = mutate(
    PROTOCOL,
    "queued-test",
    [("test-rivals", "take-holder", "clear plain"), ("test-rivals", "lost", "blocked")],
    **{
        "queued": [("test-ahead", "queued-intent", ""), ("test-ahead", "queued", "blocked")],
    },
)

#: A migration destination that keeps its intent whatever is in the way.
ARRIVAL_NEVER_YIELDS = mutate(
    PROTOCOL,
    "fast-test",
    [
        ("test-rivals", "qemu-test", "clear qemu"),
        ("test-rivals", "take-holder", "clear plain"),
        ("test-rivals", "lost", "blocked settled"),
    ],
)


#: A mode change that drops the old holder range before it has won the new one.
OLD_DROPPED_FIRST = mutate(
    PROTOCOL,
    "change",
    [("drop-holder", "change-late", "")],
    **{"change-late": [("take-intent", "change-test", "")]},
)


@pytest.mark.parametrize(
    ("mutant", "claimers", "caught"),
    [
        (
            OLD_DROPPED_FIRST,
            [Claimer(Mode.EXCLUSIVE, changes_from=Mode.SHARED), Claimer(Mode.SHARED)],
            "let go while changing mode",
        ),
        (HOLDER_BEFORE_TEST, [Claimer(Mode.EXCLUSIVE)] * 2, "phantom holder"),
        (NO_INTENT, [Claimer(Mode.EXCLUSIVE)] * 2, "mutual exclusion"),
        (INTENT_DROPPED_EARLY, [Claimer(Mode.EXCLUSIVE), Claimer(Mode.SHARED)], "mutual exclusion"),
        (QUEUE_IGNORED, [Claimer(Mode.EXCLUSIVE)] * 3, "bypass"),
        (
            ARRIVAL_NEVER_YIELDS,
            [
                Claimer(Mode.EXCLUSIVE, holds_first=True),
                Claimer(Mode.EXCLUSIVE, arrives=True),
                Claimer(Mode.EXCLUSIVE),
            ],
            "deadlock",
        ),
    ],
    ids=[
        "old-mode-dropped-first",
        "holder-before-test",
        "no-intent",
        "intent-dropped-early",
        "queue-ignored",
        "arrival-never-yields",
    ],
)
def test_a_mutated_protocol_is_caught(mutant: Table, claimers: list[Claimer], caught: str) -> None:
    result = explore(mutant, claimers)
    assert result.violations, "the mutation went unnoticed"
    print(f"\ncaught after {result.states} states: {result.violations[0]}")
    assert caught in result.violations[0]


# --- The implementation performs the modelled steps ------------------------------------


MULTI_CALL = frozenset(
    {"test-rivals", "test-ahead", "read-queue", "test-qemu", "take-qemu", "drop-qemu"}
)


class StepRecorder:
    """The fcntl calls made on one descriptor, named as the model names its steps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fd: int) -> None:
        self.fd = fd
        self.steps: list[str] = []
        self.intent = False
        self.place = False
        self.lock = threading.Lock()
        real = fcntl_locks._fcntl

        def record(fd: int, cmd: int, arg: bytes) -> bytes:
            reply: bytes = real(fd, cmd, arg)
            if fd == self.fd and not self.surveying:
                with self.lock:
                    self._name(cmd, *fcntl_locks.FLOCK.unpack(arg)[:4])
            return reply

        monkeypatch.setattr(fcntl_locks, "_fcntl", record)
        fcntl_locks._commands.probed = True  # no probe call in the middle of a record
        # Naming the holders after a conflict reads every lock: no protocol step.
        self.surveying = False
        real_survey = discovery.survey

        def survey(*args: Any, **kwargs: Any) -> discovery.Survey:
            self.surveying = True
            try:
                return real_survey(*args, **kwargs)
            finally:
                self.surveying = False

        monkeypatch.setattr(discovery, "survey", survey)

    def _name(self, cmd: int, ltype: int, _whence: int, start: int, length: int) -> None:
        end = start + length
        if cmd == fcntl_locks.F_OFD_GETLK:
            if start < protocol.QEMU_SHARED_BASE + protocol.QEMU_PERM_SLOTS and start >= 100:
                step = "test-qemu"
            elif start >= protocol.IMGLOCK_START and (
                self.intent or end > protocol.QUEUE_BASE + protocol.QUEUE_SIZE
            ):
                step = "test-rivals"
            elif start >= protocol.IMGLOCK_START:
                step = "test-ahead" if self.place else "read-queue"
            else:
                step = f"unknown test {start}+{length}"
        else:
            taking = ltype == fcntl_locks.F_RDLCK
            if protocol.read_holding(start, length) is not None:
                step = "take-holder" if taking else "drop-holder"
            elif protocol.read_intent(start) is not None:
                step = "take-intent" if taking else "drop-intent"
                self.intent = taking
            elif protocol.read_waiting(start) is not None:
                step = "take-place" if taking else "leave-queue"
                self.place = taking
            elif end <= protocol.QEMU_SHARED_BASE + protocol.QEMU_PERM_SLOTS:
                step = "take-qemu" if taking else "drop-qemu"
            else:
                step = f"unknown {start}+{length}"
        # A step of several calls (a test that steps over compatible waiters,
        # QEMU's bytes in runs) is one step; a poll that repeats is one too.
        if not self.steps or self.steps[-1] != step or step not in MULTI_CALL:
            self.steps.append(step)

    def protocol_steps(self) -> list[str]:
        return list(self.steps)


@pytest.fixture
def image(raw_image: Path) -> Iterator[Path]:
    yield raw_image


@contextlib.contextmanager
def beside(step: Callable[[], None]) -> Iterator[None]:
    """*step* in a thread of its own while the block runs; joined at its end."""
    helper = threading.Thread(target=step)
    helper.start()
    try:
        yield
    finally:
        helper.join()


def _claim(path: Path, mode: Mode, layers: Layer, wait: float = 0.0) -> Claim:
    return Claim([ClaimSpec(str(path), mode)], wait=wait, layers=layers, record=False)


LAYERS = [Layer.IMGLOCK, Layer.IMGLOCK | Layer.QEMU]


def _model(mode: Mode, layers: Layer, wait: bool = True) -> Claimer:
    return Claimer(mode, wait=wait, qemu=Layer.QEMU in layers)


@pytest.mark.parametrize("layers", LAYERS, ids=["imglock-layer", "with-qemu-layer"])
@pytest.mark.parametrize("mode", list(Mode))
def test_an_uncontended_claim_and_release_are_the_modelled_steps(
    image: Path, monkeypatch: pytest.MonkeyPatch, mode: Mode, layers: Layer
) -> None:
    claim = _claim(image, mode, layers).open()
    recorder = StepRecorder(monkeypatch, claim.fds[0])
    claim.acquire()
    claim.release(close=False)
    steps = recorder.protocol_steps()
    claim.close()
    qemu = ["test-qemu", "take-qemu", "test-qemu"] if Layer.QEMU in layers else []
    release = ["drop-holder", *(["drop-qemu"] if qemu else [])]
    assert steps == ["take-intent", "test-rivals", *qemu, "take-holder", "drop-intent", *release]
    assert accepts(PROTOCOL, _model(mode, layers), steps)


@pytest.mark.parametrize("layers", LAYERS, ids=["imglock-layer", "with-qemu-layer"])
def test_a_claim_that_may_not_wait_backs_off_as_modelled(
    image: Path, monkeypatch: pytest.MonkeyPatch, layers: Layer
) -> None:
    rival = _claim(image, Mode.SHARED, layers).acquire()
    claim = _claim(image, Mode.EXCLUSIVE, layers).open()
    recorder = StepRecorder(monkeypatch, claim.fds[0])
    with pytest.raises(LockConflict):
        claim.acquire()
    steps = recorder.protocol_steps()
    claim.close()
    rival.release()
    assert steps == ["take-intent", "test-rivals", "drop-intent"]
    assert accepts(PROTOCOL, _model(Mode.EXCLUSIVE, layers, wait=False), steps)


@pytest.mark.parametrize("layers", LAYERS, ids=["imglock-layer", "with-qemu-layer"])
def test_a_waiter_queues_defers_and_wins_as_modelled(
    image: Path, monkeypatch: pytest.MonkeyPatch, layers: Layer
) -> None:
    """Behind a holder and a waiter ahead of it: every step is a step of the model."""
    holder = _claim(image, Mode.EXCLUSIVE, layers).acquire()
    ahead_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    ahead = protocol.enqueue(ahead_fd, str(image), Mode.EXCLUSIVE, Owner.current(1))
    claim = _claim(image, Mode.EXCLUSIVE, layers, wait=30).open()
    recorder = StepRecorder(monkeypatch, claim.fds[0])

    def step_aside() -> None:
        # Once the claimer has queued, the holder goes, then the waiter ahead of it.
        while "take-place" not in recorder.steps:
            threading.Event().wait(0.001)
        holder.release()
        threading.Event().wait(0.05)  # it goes on deferring to the waiter ahead meanwhile
        protocol.leave(ahead_fd, str(image), ahead)

    try:
        with beside(step_aside):
            claim.acquire()
    finally:
        os.close(ahead_fd)
    claim.release(close=False)
    steps = recorder.protocol_steps()
    claim.close()
    assert steps[:5] == ["take-intent", "test-rivals", "drop-intent", "read-queue", "take-place"]
    assert steps[5] == "test-ahead"
    assert steps[-3:-1] == ["drop-intent", "leave-queue"] or steps[-4:-2] == [
        "drop-intent",
        "leave-queue",
    ]
    assert accepts(PROTOCOL, _model(Mode.EXCLUSIVE, layers), steps), steps


@pytest.mark.parametrize(("old", "new"), CHANGES, ids=lambda m: m.value)
def test_a_mode_change_makes_the_modelled_steps(
    image: Path, monkeypatch: pytest.MonkeyPatch, old: Mode, new: Mode
) -> None:
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        held = protocol.acquire(fd, str(image), old, Layer.IMGLOCK)
        recorder = StepRecorder(monkeypatch, fd)
        changed = protocol.change_mode(fd, str(image), held, new)
        protocol.release(fd, str(image), changed)
    finally:
        os.close(fd)
    steps = recorder.protocol_steps()
    assert accepts(PROTOCOL, Claimer(new, changes_from=old), steps), steps


def test_an_announced_arrival_is_the_test_and_the_holder_byte_at_the_switch_over(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration destination: its intent taken when the migration begins, two lock
    calls once the source lets go, the intent dropped once the guest runs; a path of
    the model's arrival, polling while the source still holds."""
    source = _claim(image, Mode.EXCLUSIVE, Layer.IMGLOCK).acquire()
    claim = _claim(image, Mode.EXCLUSIVE, Layer.IMGLOCK, wait=30).open()
    recorder = StepRecorder(monkeypatch, claim.fds[0])
    assert claim.announce()
    calls = _count_lock_calls(monkeypatch)

    def let_go() -> None:
        while "test-rivals" not in recorder.steps:  # it tests, and finds the source
            threading.Event().wait(0.001)
        source.release(close=False)
        calls.clear()  # from here on, the switch-over's share

    with beside(let_go):
        claim.arrive()
    at_switch_over = [fd for fd in calls if fd == claim.fds[0]]
    claim.withdraw()
    claim.release(close=False)
    steps = recorder.protocol_steps()
    claim.close()
    source.close()
    assert len(at_switch_over) <= 2
    assert steps == ["take-intent", "test-rivals", "take-holder", "drop-intent", "drop-holder"]
    assert accepts(PROTOCOL, Claimer(Mode.EXCLUSIVE, arrives=True), steps)


def test_an_arrival_meeting_a_waiter_withdraws_and_queues_behind_it(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No priority for an early intent: a waiter ahead is served first."""
    source = _claim(image, Mode.EXCLUSIVE, Layer.IMGLOCK).acquire()
    waiter_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    waiter = protocol.enqueue(waiter_fd, str(image), Mode.EXCLUSIVE, Owner.current(1))
    claim = _claim(image, Mode.EXCLUSIVE, Layer.IMGLOCK, wait=30).open()
    recorder = StepRecorder(monkeypatch, claim.fds[0])
    intent = protocol.intent_byte(Mode.EXCLUSIVE, Owner.current())
    intent_while_queued: list[object] = []

    def let_go() -> None:
        while "test-rivals" not in recorder.steps:
            threading.Event().wait(0.001)
        source.release(close=False)
        while "take-place" not in recorder.steps:  # it withdrew, and queued behind the waiter
            threading.Event().wait(0.001)
        intent_while_queued.append(fcntl_locks.conflicting(waiter_fd, intent, 1, str(image)))
        protocol.leave(waiter_fd, str(image), waiter)

    try:
        with beside(let_go):
            assert claim.announce()
            claim.arrive()
    finally:
        os.close(waiter_fd)
    claim.withdraw()
    claim.release(close=False)
    steps = recorder.protocol_steps()
    claim.close()
    source.close()
    assert intent_while_queued == [None]
    assert steps[:5] == ["take-intent", "test-rivals", "drop-intent", "read-queue", "take-place"]
    assert accepts(PROTOCOL, Claimer(Mode.EXCLUSIVE, arrives=True), steps), steps


def test_accepts_refuses_steps_out_of_the_modelled_order() -> None:
    """The conformance check can fail: the v1 order is no path through the table."""
    claimer = Claimer(Mode.EXCLUSIVE)
    assert not accepts(PROTOCOL, claimer, ["take-holder", "test-rivals", "drop-holder"])
    assert not accepts(PROTOCOL, claimer, ["take-intent", "drop-intent", "take-holder"])
    assert not accepts(
        PROTOCOL, Claimer(Mode.SHARED, qemu=True), ["take-intent", "test-rivals", "take-holder"]
    )


#: imglock(7), ROUND TRIPS: lock calls and tests of an uncontended claim, and of its release.
ROUND_TRIPS = {
    (Layer.IMGLOCK, Mode.EXCLUSIVE): (4, 1),
    (Layer.IMGLOCK, Mode.SHARED): (4, 1),
    (Layer.IMGLOCK, Mode.SHARED_WRITE): (5, 1),
    (Layer.IMGLOCK | Layer.QEMU, Mode.EXCLUSIVE): (10, 5),
    (Layer.IMGLOCK | Layer.QEMU, Mode.SHARED): (9, 4),
    (Layer.IMGLOCK | Layer.QEMU, Mode.SHARED_WRITE): (8, 2),
    (Layer.IMGLOCK | Layer.QEMU_TEST, Mode.EXCLUSIVE): (5, 1),
    (Layer.IMGLOCK | Layer.QEMU_TEST, Mode.SHARED): (5, 1),
    (Layer.IMGLOCK | Layer.QEMU_TEST, Mode.SHARED_WRITE): (6, 1),
}


def _count_lock_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the descriptor of each lock call made, in order."""
    calls: list[int] = []
    counted = fcntl_locks._fcntl

    def count(fd: int, cmd: int, arg: bytes) -> bytes:
        calls.append(fd)
        return counted(fd, cmd, arg)

    monkeypatch.setattr(fcntl_locks, "_fcntl", count)
    return calls


@pytest.mark.parametrize(("layers", "mode"), list(ROUND_TRIPS), ids=lambda v: str(v))
def test_an_uncontended_claim_makes_as_many_lock_calls_as_documented(
    image: Path, monkeypatch: pytest.MonkeyPatch, layers: Layer, mode: Mode
) -> None:
    claim = _claim(image, mode, layers).open()
    fcntl_locks.conflicting(claim.fds[0], 0, 1, str(image))  # the kernel probed, not counted
    calls = _count_lock_calls(monkeypatch)
    claim.acquire()
    taken = len(calls)
    claim.release(close=False)
    released = len(calls) - taken
    claim.close()
    assert (taken, released) == ROUND_TRIPS[layers, mode]


def test_a_prepared_claim_makes_only_its_lock_calls_when_taken(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a migration destination does before the switch-over, so that it is not downtime."""
    from imglock.lock import flock

    monkeypatch.setattr(fcntl_locks._commands, "probed", False)  # a fresh process
    layers = Layer.IMGLOCK | Layer.QEMU_TEST | Layer.FLOCK
    claim = _claim(image, Mode.EXCLUSIVE, layers).prepare()
    assert fcntl_locks._commands.probed

    def decided_already(st_dev: int) -> str | None:
        raise AssertionError("the flock layer is decided when the claim is prepared")

    monkeypatch.setattr(flock, "filesystem_type", decided_already)
    calls = _count_lock_calls(monkeypatch)
    claim.acquire()
    try:
        assert len(calls) == ROUND_TRIPS[Layer.IMGLOCK | Layer.QEMU_TEST, Mode.EXCLUSIVE][0]
    finally:
        claim.release()
