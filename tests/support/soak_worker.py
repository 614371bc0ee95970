"""Many claimers at once, and the log that proves they never overlapped.

Run as a program, this is one *worker*: a process whose threads each claim
and release an image in a loop, every thread with its own
:class:`~imglock.api.Claim` (so its own open file description, exactly
like another process), and log every attempt::

    python tests/support/soak_worker.py --log LOG --duration S [--wait W]... \\
        [--hold-max S] [--no-lock] [--then-hold MODE:PATH] MODE:PATH...

Thread *i* plays role ``MODE:PATH`` number *i*.  The worker prints a JSON
``ready`` line, waits for ``go`` on its standard input, soaks for S
seconds, optionally claims ``--then-hold`` and prints a JSON ``done`` line,
then holds that claim until its standard input closes.

Imported, this module is the parent's side: :class:`Fleet` starts workers
(optionally each on its own "host", see :func:`on_host`), and
:func:`analyse` reads the log back.

Why the log proves mutual exclusion
-----------------------------------
Every log entry is one ``write(2)`` to a file opened with ``O_APPEND``, so
the file's order is a total order of the writes, consistent with real time,
shared by every thread, process and namespace on the machine, with no clock
to compare.  A thread writes ``in`` only after its claim returned, and
``out`` before it starts releasing, so every ``in``..``out`` span lies
inside the time its locks were held.  If the file shows a second holder's
``in`` between a first holder's ``in`` and ``out`` in a way the modes
forbid, the two really held the image at once: a violation is never a
false alarm.  To give the check teeth each holder stays inside for a random
while, and the same workers run with ``--no-lock`` must be caught.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imglock import ImglockError, LockConflict, claim
from imglock.api import Claim, ClaimSpec
from imglock.lock.protocol import Mode

WORKER = str(Path(__file__).resolve())
REPO = str(Path(__file__).resolve().parents[2])

EXCLUSIVE = "exclusive"
SHARED = "shared"


@dataclass(frozen=True)
class Role:
    """What one thread claims, over and over."""

    mode: str
    path: str

    def __str__(self) -> str:
        return f"{self.mode}:{self.path}"

    @classmethod
    def parse(cls, text: str) -> Role:
        mode, _, path = text.partition(":")
        if mode not in (EXCLUSIVE, SHARED) or not path:
            raise ValueError(f"bad role {text!r} (MODE:PATH, MODE exclusive or shared)")
        return cls(mode, path)


# --------------------------------------------------------------------------
# The worker


class _Log:
    """One O_APPEND descriptor; each entry is a single write of one JSON line."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, **entry: Any) -> None:
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        if os.write(self.fd, line) != len(line):  # a regular file: never short, but say so
            raise OSError(f"short write to the soak log: {entry}")


@dataclass
class _Thread:
    role: Role
    who: str
    log: _Log
    deadline: float
    waits: Sequence[float]
    hold_max: float
    think_max: float
    lock: bool
    attempts: int = 0
    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        rng = random.Random()
        while time.monotonic() < self.deadline:
            try:
                self.once(rng)
            except Exception as exc:  # anything but a conflict is a finding
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self.log.write(ev="error", who=self.who, error=self.errors[-1])
            self.attempts += 1

    def once(self, rng: random.Random) -> None:
        wait = rng.choice(self.waits)
        attempt = Claim([ClaimSpec(self.role.path, Mode(self.role.mode))], wait=wait)
        began = time.monotonic()
        try:
            if self.lock:
                attempt.acquire()
        except LockConflict:
            elapsed = time.monotonic() - began
            self.log.write(ev="conflict", who=self.who, role=str(self.role), wait=wait, t=elapsed)
            return
        elapsed = time.monotonic() - began
        try:
            holds = attempt.images if self.lock else [(self.role.path, self.role.mode)]
            held = [[os.path.realpath(path), str(mode)] for path, mode in holds]
            self.log.write(
                ev="in", who=self.who, role=str(self.role), wait=wait, t=elapsed, holds=held
            )
            time.sleep(rng.uniform(0, self.hold_max))
            self.log.write(ev="out", who=self.who)
        finally:
            attempt.release()
        time.sleep(rng.uniform(0, self.think_max))


def worker_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("roles", nargs="+", type=Role.parse, metavar="MODE:PATH")
    parser.add_argument("--log", required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--wait", type=float, action="append", dest="waits")
    parser.add_argument("--hold-max", type=float, default=0.002, help="longest stay inside")
    parser.add_argument("--think-max", type=float, default=0.002, help="longest pause outside")
    parser.add_argument("--no-lock", action="store_true", help="skip the claims (self-check)")
    parser.add_argument("--then-hold", type=Role.parse)
    args = parser.parse_args(argv)
    host = socket.gethostname()
    log = _Log(args.log)
    print(json.dumps({"ready": True, "pid": os.getpid(), "host": host}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    deadline = time.monotonic() + args.duration
    threads = [
        _Thread(
            role,
            f"{host}/{os.getpid()}/{i}",
            log,
            deadline,
            args.waits or [0.0],
            args.hold_max,
            args.think_max,
            not args.no_lock,
        )
        for i, role in enumerate(args.roles)
    ]
    running = [threading.Thread(target=t.run, name=t.who) for t in threads]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    report: dict[str, Any] = {
        "done": True,
        "pid": os.getpid(),
        "host": host,
        "attempts": sum(t.attempts for t in threads),
        "errors": [e for t in threads for e in t.errors],
    }
    with contextlib.ExitStack() as stack:
        if args.then_hold:
            report["holding"] = _hold(stack, args.then_hold)
        print(json.dumps(report), flush=True)
        sys.stdin.read()  # hold until the parent closes our standard input
    return 0


def _hold(stack: contextlib.ExitStack, role: Role) -> bool | str:
    try:
        stack.enter_context(claim(role.path, role.mode, wait=10))
    except ImglockError as exc:
        return str(exc)
    return True


# --------------------------------------------------------------------------
# The parent's side: starting workers


def on_host(name: str) -> list[str]:
    """A command prefix that runs a command as if on host *name*.

    A new UTS namespace gives it its own host name, a new PID namespace its
    own pids: the command is pid 1 there, so pids collide on purpose.
    """
    return ["unshare", "--uts", "--pid", "--fork", "sh", "-c", 'hostname "$0" && exec "$@"', name]


def worker_command(
    roles: Sequence[Role],
    *,
    log: str | os.PathLike[str],
    duration: float,
    waits: Sequence[float] = (0.0,),
    hold_max: float = 0.002,
    think_max: float = 0.002,
    lock: bool = True,
    then_hold: Role | None = None,
    prefix: Sequence[str] = (),
) -> list[str]:
    argv = [*prefix, sys.executable, WORKER, "--log", os.fspath(log), "--duration", str(duration)]
    argv += [f"--wait={w}" for w in waits]
    argv += [f"--hold-max={hold_max}", f"--think-max={think_max}"]
    argv += [] if lock else ["--no-lock"]
    argv += [f"--then-hold={then_hold}"] if then_hold else []
    return [*argv, *map(str, roles)]


class Fleet:
    """Worker processes started together: ``with Fleet(cmds) as f: f.go(); f.finish()``."""

    def __init__(self, commands: Sequence[Sequence[str]], timeout: float = 60) -> None:
        self.commands = commands
        self.timeout = timeout
        self.procs: list[subprocess.Popen[str]] = []
        self.ready: list[dict[str, Any]] = []

    def __enter__(self) -> Fleet:
        env = {**os.environ, "PYTHONPATH": REPO}
        try:
            for argv in self.commands:
                self.procs.append(
                    subprocess.Popen(
                        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
                    )
                )
            self.ready = self._replies()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _replies(self) -> list[dict[str, Any]]:
        replies = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                status = proc.wait(self.timeout)
                raise AssertionError(f"worker {proc.args!r} died (status {status})")
            replies.append(json.loads(line))
        return replies

    def go(self) -> None:
        """Start every worker's soak at once."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()

    def finish(self) -> list[dict[str, Any]]:
        """Wait for every worker's ``done`` line (they keep any --then-hold claim)."""
        return self._replies()

    def release(self) -> None:
        """Let every worker release what it holds and exit; check they exited cleanly."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            assert proc.wait(self.timeout) == 0, f"worker {proc.args!r} failed"

    def __exit__(self, *exc_info: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


# --------------------------------------------------------------------------
# Reading the log back


@dataclass
class Figures:
    """What a soak run did, and every way it broke the rules (all must be empty or 0)."""

    duration: float
    processes: int
    threads: int
    attempts: int = 0
    claims: int = 0
    conflicts: int = 0
    #: Two holders inside at once where their modes forbid it.
    violations: list[str] = field(default_factory=list)
    #: Conflicts raised before their wait had run out.
    early_give_ups: list[str] = field(default_factory=list)
    #: Exceptions other than a conflict, and log entries out of order.
    errors: list[str] = field(default_factory=list)
    #: How far past its wait each attempt returned (success or conflict), seconds.
    overshoots: list[float] = field(default_factory=list)
    #: The longest an attempt took before it got its claim, seconds.
    max_wait_granted: float = 0.0
    #: The most holders seen inside one image at once (readers sharing it).
    peak_sharing: int = 0
    claims_by: Counter[str] = field(default_factory=Counter)
    conflicts_by: Counter[str] = field(default_factory=Counter)
    claims_by_host: Counter[str] = field(default_factory=Counter)

    @property
    def claims_per_second(self) -> float:
        return self.claims / self.duration if self.duration else 0.0

    @property
    def max_overshoot(self) -> float:
        return max(self.overshoots, default=0.0)

    @property
    def p99_overshoot(self) -> float:
        ranked = sorted(self.overshoots)
        return ranked[int(len(ranked) * 0.99)] if ranked else 0.0

    def rows(self) -> list[tuple[str, str]]:
        rows = [
            ("workers", f"{self.processes} processes x {self.threads} threads"),
            ("duration", f"{self.duration:.1f} s"),
            ("attempts (iterations)", str(self.attempts)),
            ("claims granted", str(self.claims)),
            ("claims/s", f"{self.claims_per_second:.0f}"),
            ("conflicts (wait ran out)", str(self.conflicts)),
            ("violations", str(len(self.violations))),
            ("gave up before the wait", str(len(self.early_give_ups))),
            ("errors", str(len(self.errors))),
            ("overshoot past wait, p99", f"{self.p99_overshoot * 1e3:.1f} ms"),
            ("overshoot past wait, max", f"{self.max_overshoot * 1e3:.1f} ms"),
            ("longest wait that got the claim", f"{self.max_wait_granted * 1e3:.1f} ms"),
            ("most holders sharing an image", str(self.peak_sharing)),
        ]
        for role in sorted(self.claims_by.keys() | self.conflicts_by.keys()):
            rows.append(
                (f"  {role}", f"{self.claims_by[role]} claims, {self.conflicts_by[role]} conflicts")
            )
        return rows

    def table(self) -> str:
        """The figures as a Markdown table."""
        lines = ["| figure | value |", "|---|---:|"]
        lines += [f"| {name} | {value} |" for name, value in self.rows()]
        return "\n".join(lines)


def _entries(log: Path) -> Iterator[dict[str, Any]]:
    with log.open("rb") as f:
        for line in f:
            yield json.loads(line)


def analyse(log: Path, *, duration: float, processes: int, threads: int) -> Figures:
    """Replay the log in file order, checking every entry against who is inside."""
    fig = Figures(duration, processes, threads)
    inside: dict[str, dict[str, str]] = defaultdict(dict)  # image -> {who: mode}
    holding: dict[str, list[tuple[str, str]]] = {}  # who -> [(image, mode)]
    for n, entry in enumerate(_entries(log), 1):
        who, ev = entry["who"], entry["ev"]
        if ev == "error":
            fig.errors.append(f"{who}: {entry['error']}")
            continue
        if ev == "out":
            for image, _mode in holding.pop(who, None) or _missing(fig, n, who):
                inside[image].pop(who, None)
            continue
        fig.attempts += 1
        waited, wait, role = entry["t"], entry["wait"], entry["role"]
        fig.overshoots.append(waited - wait)
        if ev == "conflict":
            fig.conflicts += 1
            fig.conflicts_by[_label(role)] += 1
            if waited < wait:
                fig.early_give_ups.append(f"line {n}: {who} gave up after {waited:.4f}s < {wait}s")
            continue
        fig.claims += 1
        fig.claims_by[_label(role)] += 1
        fig.claims_by_host[who.split("/", 1)[0]] += 1
        fig.max_wait_granted = max(fig.max_wait_granted, waited)
        if who in holding:
            fig.errors.append(f"line {n}: {who} entered twice")
        holding[who] = [(image, mode) for image, mode in entry["holds"]]
        for image, mode in holding[who]:
            others = inside[image]
            if (mode == EXCLUSIVE and others) or EXCLUSIVE in others.values():
                fig.violations.append(
                    f"line {n}: {who} {mode} on {image} while inside: {sorted(others.items())}"
                )
            others[who] = mode
            fig.peak_sharing = max(fig.peak_sharing, len(others))
    fig.errors += [f"{who} never logged out" for who in holding]
    return fig


def _missing(fig: Figures, n: int, who: str) -> list[tuple[str, str]]:
    fig.errors.append(f"line {n}: {who} logged out without having logged in")
    return []


def _label(role: str) -> str:
    mode, _, path = role.partition(":")
    return f"{mode} {os.path.basename(path)}"


# --------------------------------------------------------------------------
# The standard soak: a qcow2 chain, four roles, many workers


@dataclass(frozen=True)
class Chain:
    top: Path
    base: Path

    @property
    def roles(self) -> tuple[Role, ...]:
        """A VM writing the top (and reading the base), a backup reading the top,
        a VM on another top reading the base, a maintenance job writing the base."""
        return (
            Role(EXCLUSIVE, str(self.top)),
            Role(SHARED, str(self.base)),
            Role(EXCLUSIVE, str(self.top)),
            Role(EXCLUSIVE, str(self.base)),
        )


def make_chain(root: Path, qemu_img: Callable[..., object]) -> Chain:
    """base.qcow2 <- top.qcow2 in *root*, made by qemu-img (called with its arguments)."""
    chain = Chain(root / "top.qcow2", root / "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", chain.base, "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", chain.base.name, "-F", "qcow2", chain.top)
    return chain


@dataclass(frozen=True)
class SoakPlan:
    processes: int = 8
    threads: int = 4
    duration: float = 6.0
    waits: tuple[float, ...] = (0.0, 0.01, 0.05, 0.2)
    hold_max: float = 0.002
    think_max: float = 0.002
    lock: bool = True


def soak(chain: Chain, plan: SoakPlan, log: Path) -> Figures:
    """Run *plan* on *chain*: worker p's thread t plays role (p + t) mod 4."""
    roles = chain.roles
    commands = [
        worker_command(
            [roles[(p + t) % len(roles)] for t in range(plan.threads)],
            log=log,
            duration=plan.duration,
            waits=plan.waits,
            hold_max=plan.hold_max,
            think_max=plan.think_max,
            lock=plan.lock,
        )
        for p in range(plan.processes)
    ]
    with Fleet(commands) as fleet:
        fleet.go()
        done = fleet.finish()
        fleet.release()
    fig = analyse(log, duration=plan.duration, processes=plan.processes, threads=plan.threads)
    fig.errors += [e for reply in done for e in reply["errors"]]
    return fig


if __name__ == "__main__":
    sys.exit(worker_main())
