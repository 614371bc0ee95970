"""Race and soak figures: many claimers on one qcow2 chain, and the log's verdict.

The workers and the log check are the test's own (tests/support/soak_worker.py, as
run by tests/library/test_race_soak.py); this runs them longer or wider and prints
the figures as a table.  Run: ``python -m benchmarks.soak [--duration S]
[--processes N] [--threads N]``.  Exits 1 if the log shows any violation.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from soak_worker import SoakPlan, make_chain, soak


def qemu_img(*args: object) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True)


def main() -> int:
    default = SoakPlan()
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=default.duration)
    parser.add_argument("--processes", type=int, default=default.processes)
    parser.add_argument("--threads", type=int, default=default.threads)
    parser.add_argument("--hold-max", type=float, default=default.hold_max)
    parser.add_argument("--think-max", type=float, default=default.think_max)
    args = parser.parse_args()
    plan = SoakPlan(
        processes=args.processes,
        threads=args.threads,
        duration=args.duration,
        hold_max=args.hold_max,
        think_max=args.think_max,
    )
    with tempfile.TemporaryDirectory(prefix="imglock-soak-") as tmp:
        root = Path(tmp)
        fig = soak(make_chain(root, qemu_img), plan, root / "soak.log")
    print(fig.table())
    for problem in [*fig.violations, *fig.early_give_ups, *fig.errors][:20]:
        print(problem, file=sys.stderr)
    return 1 if fig.violations or fig.early_give_ups or fig.errors else 0


if __name__ == "__main__":
    sys.exit(main())
