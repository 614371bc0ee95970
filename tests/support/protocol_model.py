"""A model of imglock's lock protocol (v2), and an exhaustive checker for it.

The protocol is written here once, as a table: for each point a claimer
can be at, the step it takes next (named as imglock(7) names it, e.g.
``take-intent``), where it goes, and on what condition.  Two things use
the table:

* :func:`explore` runs every interleaving of the steps of 2-3 claimers
  (each step is one fcntl call, atomic as the kernel or lock manager makes
  it; a claimer may also crash anywhere, or give up its wait), and checks
  every state reached: mutual exclusion, no phantom holder, no deadlock,
  completion always reachable, and no overtaking of a waiter by a claimer
  that arrived after it took its place (so at most the n-1 others, once
  each, who arrived with it).
* :func:`accepts` tells whether a sequence of steps, as the real code made
  them (recorded at the fcntl seam), is a path through the same table:
  the model cannot drift from the implementation.

The shared state is the set of locks: ``("I", who, mode)`` an intent,
``("H", who, mode)`` a holder range, ``("Q", who, mode, ticket)`` a place
in the queue, ``("B", who, mode)`` QEMU's bytes as that mode takes them.
Tickets are the "one more than the latest in the queue" part of the rule
(the clock part only makes them larger, never reorders them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

from imglock.lock.protocol import Mode, conflicts

Lock = tuple[object, ...]

#: Where each step leads: point -> [(step, next point, condition)].
#: Conditions: "" always; "clear"/"blocked" the outcome of the step's test;
#: "yields" that the claimer backs off on that outcome (any claimer but an
#: arrival, which keeps its intent and tests again while only holders are
#: in the way); "settled" that it is no arrival; "queued"/"unqueued"
#: whether the claimer has a place; "wait"/"nowait" whether it may wait;
#: "qemu"/"plain" whether it takes QEMU's layer.
Table = dict[str, list[tuple[str, str, str]]]

PROTOCOL: Table = {
    # A migration destination takes its intent here when its incoming
    # migration begins, and tests only at the switch-over, however much later.
    "idle": [("take-intent", "fast-test", "")],
    "fast-test": [
        ("test-rivals", "qemu-test", "clear qemu"),
        ("test-rivals", "take-holder", "clear plain"),
        ("test-rivals", "lost", "blocked yields"),
    ],
    "lost": [
        ("drop-intent", "read-queue", "unqueued wait"),
        ("drop-intent", "failed", "unqueued nowait"),
        ("drop-intent", "queued", "queued"),
    ],
    "read-queue": [("read-queue", "take-place", "")],
    "take-place": [("take-place", "queued", "")],
    "queued": [("test-ahead", "queued-check", "clear"), ("test-ahead", "queued", "blocked")],
    # Look before leaping: the rivals tested without an intent, while waiting.
    "queued-check": [
        ("test-rivals", "queued-intent", "clear"),
        ("test-rivals", "queued", "blocked"),
    ],
    "queued-intent": [("take-intent", "queued-test", "")],
    "queued-test": [
        ("test-rivals", "qemu-test", "clear qemu"),
        ("test-rivals", "take-holder", "clear plain"),
        ("test-rivals", "lost", "blocked"),
    ],
    "qemu-test": [("test-qemu", "take-qemu", "clear"), ("test-qemu", "lost", "blocked")],
    "take-qemu": [("take-qemu", "qemu-retest", "")],
    "qemu-retest": [
        ("test-qemu", "take-holder", "clear"),
        ("test-qemu", "qemu-rollback", "blocked"),
    ],
    "qemu-rollback": [("drop-qemu", "lost", "")],
    "take-holder": [("take-holder", "won", "")],
    "won": [("drop-intent", "leave", "queued"), ("drop-intent", "held", "unqueued")],
    "leave": [("leave-queue", "held", "")],
    "held": [("drop-holder", "release-qemu", "qemu"), ("drop-holder", "done", "plain")],
    "release-qemu": [("drop-qemu", "done", "")],
    # A holder changing to a mode that is not weaker (protocol.change_mode):
    # an attempt in the new mode on its own descriptor, never waiting, and
    # only then is the old holder range dropped.
    "change": [("take-intent", "change-test", "")],
    "change-test": [
        ("test-rivals", "change-take", "clear"),
        ("test-rivals", "unchanged", "blocked"),
    ],
    "change-take": [("take-holder", "change-won", "")],
    "change-won": [("drop-intent", "change-drop-old", "")],
    "change-drop-old": [("drop-holder", "held", "")],
    "unchanged": [("drop-intent", "held-old", "")],
    "held-old": [("drop-holder", "done", "")],
    # ... and from exclusive to a weaker mode: no rival can exist to test.
    "downgrade": [("take-holder", "change-drop-old", "")],
}
#: Points where a waiter may stop waiting (its time is up): it leaves the queue.
GIVE_UP_FROM = frozenset({"queued"})
#: Points at which a claimer has won: the only ones where it may hold a holder range.
WON = frozenset({"won", "leave", "held", "release-qemu"})
#: Points of a holder changing mode: it holds the image throughout.
CHANGING = frozenset({"change", "change-test", "change-take", "change-won", "change-drop-old",
                      "unchanged", "held-old", "downgrade"})  # fmt: skip
FINAL = frozenset({"done", "failed", "crashed"})


@dataclass(frozen=True)
class Claimer:
    mode: Mode
    wait: bool = True
    qemu: bool = False
    #: How many claims it makes one after the other.
    cycles: int = 1
    #: A holder in this mode from the start, which changes to :attr:`mode`.
    changes_from: Mode | None = None
    #: A holder from the start, which lets go (a migration source at the
    #: switch-over) and, with cycles=2, claims again (the guest resumed there).
    holds_first: bool = False
    #: A migration destination: its first attempt keeps its intent and tests
    #: again while only holders are in the way (the source letting go).
    arrives: bool = False


@dataclass(frozen=True)
class Proc:
    point: str = "idle"
    cycles_done: int = 0
    ticket: int | None = None  # set while it has a place in the queue


@dataclass(frozen=True)
class State:
    procs: tuple[Proc, ...]
    locks: frozenset[Lock]
    #: (j, i): j arrived (took its first intent of a claim) while i had a place.
    later: frozenset[tuple[int, int]] = frozenset()
    #: (i, j): j won while i waited in the queue, conflicting with it.
    overtaken: frozenset[tuple[int, int]] = frozenset()


@dataclass
class Result:
    states: int = 0
    transitions: int = 0
    violations: list[str] = field(default_factory=list)
    max_overtaken: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations


def _has(locks: Iterable[Lock], kind: str, who: int) -> bool:
    return any(lock[0] == kind and lock[1] == who for lock in locks)


def _others(locks: Iterable[Lock], kind: str, me: int, mode: Mode) -> list[Lock]:
    """Others' locks of *kind* whose mode conflicts with *mode*."""
    return [
        lock
        for lock in locks
        if lock[0] == kind and lock[1] != me and conflicts(mode, lock[2])  # type: ignore[arg-type]
    ]


def _key(lock: Lock) -> tuple[int, int, int]:
    """A queue place's order: ticket, then mode, then who (the byte's offset order)."""
    _kind, who, mode, ticket = lock
    return ticket, list(Mode).index(mode), who  # type: ignore[arg-type, return-value]


# --- The steps' effects and tests -----------------------------------------------------


def _rivals(me: int, proc: Proc, mode: Mode, locks: frozenset[Lock]) -> list[Lock]:
    found = _others(locks, "H", me, mode) + _others(locks, "I", me, mode)
    if proc.ticket is None:  # first attempt: every conflicting waiter is in the way
        found += _others(locks, "Q", me, mode)
    return found


def _only_holders(step: str, me: int, proc: Proc, claimer: Claimer, locks: frozenset[Lock]) -> bool:
    """Whether the test *step* finds holders in the way, and nothing else."""
    found = _rivals(me, proc, claimer.mode, locks) if step == "test-rivals" else []
    return bool(found) and all(lock[0] == "H" for lock in found)


def _test(step: str, me: int, proc: Proc, claimer: Claimer, locks: frozenset[Lock]) -> bool:
    """Whether the test *step* finds nothing in the way."""
    mode = claimer.mode
    if step == "test-rivals":
        return not _rivals(me, proc, mode, locks)
    if step == "test-ahead":
        mine = ("Q", me, mode, proc.ticket)
        return not [q for q in _others(locks, "Q", me, mode) if _key(q) < _key(mine)]
    if step == "test-qemu":
        return not _others(locks, "B", me, mode)
    raise AssertionError(step)


def _effect(
    step: str, me: int, proc: Proc, claimer: Claimer, locks: frozenset[Lock]
) -> tuple[frozenset[Lock], Proc]:
    mode = claimer.mode
    add: dict[str, Lock] = {
        "take-intent": ("I", me, mode),
        "take-holder": ("H", me, mode),
        "take-qemu": ("B", me, mode),
    }
    drop = {"drop-intent": "I", "drop-holder": "H", "drop-qemu": "B", "leave-queue": "Q"}
    if step in add:
        return locks | {add[step]}, proc
    if step == "drop-holder" and proc.point == "change-drop-old":  # the old mode's range only
        return locks - {("H", me, claimer.changes_from)}, proc
    if step in drop:
        kept = frozenset(lock for lock in locks if not (lock[0] == drop[step] and lock[1] == me))
        return kept, replace(proc, ticket=None) if step == "leave-queue" else proc
    if step == "read-queue":
        tickets = [cast(int, lock[3]) for lock in locks if lock[0] == "Q" and lock[1] != me]
        return locks, replace(proc, ticket=max(tickets) + 1 if tickets else 0)
    if step == "take-place":
        return locks | {("Q", me, mode, proc.ticket)}, proc
    return locks, proc


def _holds(
    condition: str, proc: Proc, claimer: Claimer, clear: bool | None, only_holders: bool = False
) -> bool:
    for word in condition.split():
        ok = {
            "clear": clear is True,
            "blocked": clear is False,
            "yields": not (claimer.arrives and only_holders),
            "settled": not claimer.arrives,
            "queued": proc.ticket is not None,
            "unqueued": proc.ticket is None,
            "wait": claimer.wait,
            "nowait": not claimer.wait,
            "qemu": claimer.qemu,
            "plain": not claimer.qemu,
        }[word]
        if not ok:
            return False
    return True


TESTS = frozenset({"test-rivals", "test-ahead", "test-qemu"})


def successors(
    table: Table, claimers: Sequence[Claimer], state: State
) -> list[tuple[int, str, State]]:
    """Every step any claimer can take from *state*: (who, step, next state).

    A test that finds something in the way and leaves the claimer where it
    was (a waiter behind others) is no step: the claimer is blocked.
    """
    out = []
    for me, (proc, claimer) in enumerate(zip(state.procs, claimers, strict=True)):
        if proc.point in FINAL:
            continue
        for step, to, condition in table[proc.point]:
            clear = _test(step, me, proc, claimer, state.locks) if step in TESTS else None
            only_holders = _only_holders(step, me, proc, claimer, state.locks)
            if not _holds(condition, proc, claimer, clear, only_holders):
                continue
            if to == proc.point:
                continue  # blocked: polling changes nothing
            locks, new = _effect(step, me, proc, claimer, state.locks)
            out.append(
                (
                    me,
                    step,
                    _advance(state, me, replace(new, point=to), claimer, claimers, step, locks),
                )
            )
        if proc.point == "fast-test" and claimer.arrives:
            # An arrival whose time is up while the source still holds.
            locks, new = _effect("drop-intent", me, proc, claimer, state.locks)
            out.append(
                (
                    me,
                    "give-up",
                    _advance(state, me, replace(new, point="failed"), claimer, claimers, "", locks),
                )
            )
        if proc.point in GIVE_UP_FROM:
            locks, new = _effect("leave-queue", me, proc, claimer, state.locks)
            out.append(
                (
                    me,
                    "give-up",
                    _advance(
                        state,
                        me,
                        replace(new, point="failed"),
                        claimer,
                        claimers,
                        "leave-queue",
                        locks,
                    ),
                )
            )
        crashed = frozenset(lock for lock in state.locks if lock[1] != me)
        out.append(
            (me, "crash", _advance(state, me, Proc("crashed"), claimer, claimers, "crash", crashed))
        )
    return out


def _advance(
    state: State,
    me: int,
    proc: Proc,
    claimer: Claimer,
    claimers: Sequence[Claimer],
    step: str,
    locks: frozenset[Lock],
) -> State:
    later, overtaken = state.later, state.overtaken
    old = state.procs[me]
    if step == "take-intent" and old.point == "idle":  # it arrives
        later |= {(me, i) for i in range(len(claimers)) if _has(state.locks, "Q", i)}
    if step in ("leave-queue", "crash"):  # its place is gone: whoever came later is not later now
        later = frozenset(p for p in later if p[1] != me)
        overtaken = frozenset(p for p in overtaken if p[0] != me)
    if step == "take-holder":
        for i, other in enumerate(claimers):
            if i != me and _has(state.locks, "Q", i) and conflicts(claimer.mode, other.mode):
                overtaken |= {(i, me)}
    if proc.point == "done" and proc.cycles_done + 1 < claimer.cycles:
        proc = Proc("idle", proc.cycles_done + 1)
        later = frozenset(p for p in later if p[0] != me)
    procs = (*state.procs[:me], proc, *state.procs[me + 1 :])
    return State(procs, locks, later, overtaken)


# --- Properties -------------------------------------------------------------------------


def violations(
    claimers: Sequence[Claimer], state: State, step: str = "", who: int = -1
) -> list[str]:
    found = []
    holders = [lock for lock in state.locks if lock[0] == "H"]
    for a in holders:
        for b in holders:
            if cast(int, a[1]) < cast(int, b[1]) and conflicts(a[2], b[2]):  # type: ignore[arg-type]
                found.append(f"mutual exclusion: {a[1]} ({a[2]}) and {b[1]} ({b[2]}) both hold")
    for index, proc in enumerate(state.procs):
        if proc.point in CHANGING and not _has(state.locks, "H", index):
            found.append(f"let go while changing mode: claimer {index} at {proc.point!r}")
    for lock in holders:
        point = state.procs[cast(int, lock[1])].point
        if point not in WON | CHANGING:
            found.append(f"phantom holder: claimer {lock[1]} holds at {point!r}, not having won")
    if step == "take-holder":
        for j, i in state.later:
            if (
                j == who
                and _has(state.locks, "Q", i)
                and conflicts(claimers[i].mode, claimers[j].mode)
            ):
                found.append(f"bypass: {j} arrived after {i} took its place, and won first")
    return found


def _first_point(claimer: Claimer) -> str:
    if claimer.holds_first:
        return "held"
    if claimer.changes_from is None:
        return "idle"
    return "downgrade" if claimer.changes_from is Mode.EXCLUSIVE else "change"


def explore(table: Table, claimers: Sequence[Claimer], limit: int = 2_000_000) -> Result:
    """Every state reachable by any interleaving; the properties checked in each."""
    start = State(
        tuple(Proc(_first_point(c)) for c in claimers),
        frozenset(
            ("H", i, c.mode if c.holds_first else c.changes_from)
            for i, c in enumerate(claimers)
            if c.changes_from or c.holds_first
        ),
    )
    seen = {start}
    edges: dict[State, list[State]] = {}
    queue = deque([start])
    result = Result()
    while queue:
        state = queue.popleft()
        steps = successors(table, claimers, state)
        # Crashes and give-ups are not the protocol's progress, nor is a
        # waiter's look that finds the image still held (it polls again).
        progress = [
            s
            for who, step, s in steps
            if step not in ("crash", "give-up") and not _polled(state, s, who)
        ]
        edges[state] = progress
        unfinished = [p for p in state.procs if p.point not in FINAL]
        if unfinished and not progress:
            result.violations.append(f"deadlock: {state.procs}")
        for who, step, nxt in steps:
            result.transitions += 1
            for problem in violations(claimers, nxt, step, who):
                result.violations.append(f"{problem} (after {who}: {step})")
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
                if len(seen) > limit:
                    raise RuntimeError(f"more than {limit} states")
        per_waiter: dict[int, int] = {}
        for i, _j in state.overtaken:
            per_waiter[i] = per_waiter.get(i, 0) + 1
        result.max_overtaken = max([result.max_overtaken, *per_waiter.values()])
        if result.violations:
            break
    result.states = len(seen)
    if not result.violations:
        stuck = _cannot_finish(edges)
        if stuck:
            result.violations.append(
                f"{len(stuck)} states from which no schedule finishes, e.g. {stuck[0].procs}"
            )
    if result.max_overtaken > len(claimers) - 1:
        result.violations.append(f"a waiter was overtaken {result.max_overtaken} times")
    return result


def _polled(before: State, after: State, who: int) -> bool:
    """Whether *who* only looked, found the image held, and is back to waiting."""
    return before.procs[who].point == "queued-check" and after.procs[who].point == "queued"


def _cannot_finish(edges: dict[State, list[State]]) -> list[State]:
    """States from which protocol steps alone never reach one where everyone is finished."""
    back: dict[State, list[State]] = {s: [] for s in edges}
    for state, targets in edges.items():
        for target in targets:
            back.setdefault(target, []).append(state)
    good = [s for s in edges if all(p.point in FINAL for p in s.procs)]
    reached = set(good)
    queue = deque(good)
    while queue:
        for prev in back.get(queue.popleft(), []):
            if prev not in reached:
                reached.add(prev)
                queue.append(prev)
    return [s for s in edges if s not in reached]


# --- The implementation's steps, as a path through the table ----------------------------


def accepts(table: Table, claimer: Claimer, steps: Sequence[str]) -> bool:
    """Whether *steps* (one claimer's, in order) is a path through *table* from "idle".

    Test outcomes are free (any branch may be taken), but every other
    condition must hold: a waiter's path goes through the queue, a claim
    with QEMU's layer tests and takes QEMU's bytes, and so on.
    """
    current = {Proc(_first_point(claimer))}
    for step in steps:
        nxt = set()
        for proc in current:
            for label, to, condition in table.get(proc.point, []):
                if label != step:
                    continue
                outcomes = [(True, False), (False, True), (False, False)]
                for clear, only_holders in outcomes if label in TESTS else [(None, False)]:
                    if _holds(condition, proc, claimer, clear, only_holders):
                        ticket = (
                            0
                            if label == "read-queue"
                            else (None if label == "leave-queue" else proc.ticket)
                        )
                        nxt.add(Proc(to, proc.cycles_done, ticket))
        if not nxt:
            return False
        current = nxt
    return any(p.point in ("done", "failed", "idle") for p in current) or not steps


def mutate(
    table: Table,
    point: str,
    entries: list[tuple[str, str, str]],
    **more: list[tuple[str, str, str]],
) -> Table:
    """A copy of *table* with the entries of *point* (and others named) replaced."""
    out = dict(table)
    out[point] = entries
    out.update(more)
    return out


Check = Callable[[Table, Sequence[Claimer]], Result]
