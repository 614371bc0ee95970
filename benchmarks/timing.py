"""Timing helpers shared by the benchmarks: medians, and one table to print them."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One measured figure beside the floor or peer it is compared with."""

    what: str
    median: float  # seconds
    peer_name: str
    peer: float  # seconds
    target: str = ""
    #: For two commands timed in turns: the median of their per-turn ratios
    #: (see :func:`paired_ratio`), which the ratio column shows.
    paired: float | None = None
    #: What median and peer are: seconds, or a count of "instructions".
    unit: str = "s"

    @property
    def ratio(self) -> float:
        if self.paired is not None:
            return self.paired
        return self.median / self.peer if self.peer else float("nan")


@dataclass(frozen=True)
class Unavailable:
    """A figure that could not be measured here, and why."""

    what: str
    why: str


Row = Figure | Unavailable


def median_of(fn: Callable[[], object], runs: int, warmup: int = 3) -> float:
    """Median wall time of *fn* over *runs* calls, in seconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def calls_per_batch(fn: Callable[[], object], seconds: float) -> int:
    """How many back-to-back calls of *fn* take about *seconds* (at least one)."""
    fn()  # warm
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, round(seconds / max(once, 1e-7)))


def median_per_call(
    fn: Callable[[], object], calls: int | None = None, rounds: int = 15, batch: float = 0.05
) -> float:
    """Median over *rounds* of the mean time of back-to-back calls (for µs figures).

    *calls* per round, or (None) as many as take about *batch* seconds.
    """
    count = calls if calls is not None else calls_per_batch(fn, batch)

    def run_batch() -> None:
        for _ in range(count):
            fn()

    return median_of(run_batch, rounds) / count


def bytecode_env(cache_dir: str) -> dict[str, str]:
    """The environment for timing Python commands as installed: bytecode cached.

    A package installed by pip has its .pyc files; a development tree run
    with PYTHONDONTWRITEBYTECODE compiles every module on every start.  The
    cache goes to *cache_dir* so the tree is left as it is.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = cache_dir
    return env


def command_turns(
    commands: Mapping[str, Sequence[str]],
    runs: int,
    env: Mapping[str, str] | None = None,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Wall times of each command run to completion, in turns: the *i*-th
    time of every command comes from the same turn.

    Taking turns, rather than running each command *runs* times in a row,
    spreads any change in the machine's load over all of them alike.
    """
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": False}
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for turn in range(warmup + runs):
        for name, argv in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, env=env, **quiet)  # type: ignore[call-overload]
            if turn >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def command_medians(
    commands: Mapping[str, Sequence[str]],
    runs: int,
    env: Mapping[str, str] | None = None,
    warmup: int = 2,
) -> dict[str, float]:
    """Median wall time of each command run to completion, runs in turns (:func:`command_turns`)."""
    return medians(command_turns(commands, runs, env, warmup))


def medians(turns: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The median of each command's times."""
    return {name: statistics.median(times) for name, times in turns.items()}


def paired_ratio(times: Sequence[float], peer_times: Sequence[float]) -> float:
    """The median of *times*[i] / *peer_times*[i], two commands timed in the same turns.

    Each pair ran back to back, under the same load, so a burst of load
    (another tenant of the machine, a daemon waking up) moves both and
    leaves their ratio; the ratio of the two medians takes each median
    from different turns, and moves with the bursts.
    """
    return statistics.median(t / p for t, p in zip(times, peer_times, strict=True))


def command_median(argv: Sequence[str], runs: int, **kwargs: object) -> float:
    """Median wall time of running *argv* to completion."""

    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": False}

    def once() -> None:
        subprocess.run(argv, **quiet, **kwargs)  # type: ignore[call-overload]

    return median_of(once, runs, warmup=2)


def _unit(value: float, unit: str = "s") -> str:
    if unit == "instructions":
        return f"{value / 1e6:.1f} M instr."
    seconds = value
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def table_lines(rows: Sequence[Row]) -> list[str]:
    """One Markdown table: figure, median, peer/floor, its median, ratio, target."""
    lines = [
        "| measure | median | beside | its median | ratio | target |",
        "|---|---:|---|---:|---:|---|",
    ]
    for row in rows:
        if isinstance(row, Unavailable):
            lines.append(f"| {row.what} | n/a | {row.why} | | | |")
            continue
        lines.append(
            f"| {row.what} | {_unit(row.median, row.unit)} | {row.peer_name} "
            f"| {_unit(row.peer, row.unit)} "
            f"| {row.ratio:.2f}x | {row.target} |"
        )
    return lines


def print_table(rows: Sequence[Row], started: float | None = None) -> None:
    """Print *rows* as the table, and how long the run took since *started* (monotonic)."""
    print("\n".join(table_lines(rows)))
    if started is not None:
        print()
        print(f"Measured in {time.monotonic() - started:.0f} s.")
