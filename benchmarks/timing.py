"""Timing helpers shared by the benchmarks: medians, and one table to print them."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One measured figure beside the floor or peer it is compared with."""

    what: str
    median: float  # seconds
    peer_name: str
    peer: float  # seconds
    target: str = ""

    @property
    def ratio(self) -> float:
        return self.median / self.peer if self.peer else float("nan")


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


def median_per_call(fn: Callable[[], object], calls: int, rounds: int = 15) -> float:
    """Median over *rounds* of the mean time of *calls* back-to-back calls (for µs figures)."""

    def batch() -> None:
        for _ in range(calls):
            fn()

    return median_of(batch, rounds) / calls


def command_median(argv: Sequence[str], runs: int, **kwargs: object) -> float:
    """Median wall time of running *argv* to completion."""

    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": False}

    def once() -> None:
        subprocess.run(argv, **quiet, **kwargs)  # type: ignore[call-overload]

    return median_of(once, runs, warmup=2)


def _unit(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def print_table(figures: Sequence[Figure]) -> None:
    """One Markdown table: figure, median, peer/floor, ratio, target."""
    print("| measure | median | beside | its median | ratio | target |")
    print("|---|---:|---|---:|---:|---|")
    for f in figures:
        print(
            f"| {f.what} | {_unit(f.median)} | {f.peer_name} | {_unit(f.peer)} "
            f"| {f.ratio:.2f}x | {f.target} |"
        )
