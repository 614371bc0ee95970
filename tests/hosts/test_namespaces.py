"""Two hosts on one machine: claimers in their own UTS and PID namespaces.

Each "host" has its own host name and its own pids; its claimer is pid 1
there, so both claimers have the same pid on purpose.  Their owner ids
differ only by the host tag, which is what keeps them apart, and what a
third host reads back, with the records, to name them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from soak_worker import EXCLUSIVE, REPO, SHARED, Fleet, Role, analyse, on_host, worker_command

pytestmark = pytest.mark.slow

HOSTS = ("host-a", "host-b")
RACE_SECONDS = 3.0


def _status_from(host: str, image: Path) -> list[dict[str, object]]:
    """``imglock status --json IMAGE`` run on yet another host; its imglock holders."""
    proc = subprocess.run(
        [*on_host(host), sys.executable, "-m", "imglock", "status", "--json", str(image)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert proc.returncode in (0, 1), proc.stderr
    (report,) = json.loads(proc.stdout)
    return [h for h in report["holders"] if h["layer"] == "imglock"]


def test_two_hosts_with_the_same_pids_race_for_an_image_and_a_third_names_both(
    raw_image: Path, tmp_path: Path
) -> None:
    log = tmp_path / "race.log"
    race = Role(EXCLUSIVE, str(raw_image))
    commands = [
        worker_command(
            [race, race],
            log=log,
            duration=RACE_SECONDS,
            waits=(0.0, 0.005, 0.02),
            then_hold=Role(SHARED, str(raw_image)),
            prefix=on_host(host),
        )
        for host in HOSTS
    ]
    with Fleet(commands) as fleet:
        assert [(r["host"], r["pid"]) for r in fleet.ready] == [(h, 1) for h in HOSTS]
        fleet.go()
        done = fleet.finish()

        fig = analyse(log, duration=RACE_SECONDS, processes=len(HOSTS), threads=2)
        print(f"\nrace of two hosts for {raw_image.name}\n{fig.table()}")
        assert fig.violations == [] and fig.early_give_ups == [] and fig.errors == []
        assert [r["errors"] for r in done] == [[], []]
        assert fig.conflicts > 0
        assert set(fig.claims_by_host) == set(HOSTS)

        # Now both hold it shared: a third host names each by its host and pid.
        assert [r["holding"] for r in done] == [True, True]
        holders = _status_from("host-c", raw_image)
        assert sorted((h["host"], h["pid"], h["mode"]) for h in holders) == [
            (host, 1, "shared") for host in HOSTS
        ]
        for holder in holders:
            assert "soak_worker.py" in str(holder["command"])
            assert holder["since"] is not None

        fleet.release()
    assert _status_from("host-c", raw_image) == []
