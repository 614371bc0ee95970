"""No phantom holders: a claimer that waits is shown waiting, never holding.

An image is held; 1 or 3 ``imglock run -w`` wrappers wait for it.  Other
processes then look, again and again, with ``imglock status --json``,
:func:`imglock.holders` and :func:`imglock.inspect`: from this host (with
/proc to name processes) and from "another host" (a process in its own
PID and mount namespaces with its own /proc, which names no one, as on a
second machine).  In every sample the one holder is the holder, and every
waiter is listed as waiting, never as holding.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, SpawnRival, waiting_pids
from processes import wait_until

import imglock

pytestmark = pytest.mark.slow

SAMPLER = str(Path(__file__).parents[1] / "support" / "holder_sampler.py")
#: A process that sees this machine as another host would: no /proc of ours.
ELSEWHERE = ["unshare", "--pid", "--mount-proc", "--fork", "--uts"]
REMOTE_SAMPLES = 10_000
LOCAL_SAMPLES = 400


def _sample(kind: str, count: int, image: Path, *, remote: bool) -> subprocess.Popen[str]:
    prefix = ELSEWHERE if remote else []
    return subprocess.Popen(
        [*prefix, sys.executable, SAMPLER, kind, str(count), str(image)],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )


@pytest.mark.parametrize("waiters", [1, 3])
def test_waiters_never_show_as_holders_in_ten_thousand_samples(
    raw_image: Path, rival: SpawnRival, started: list[subprocess.Popen[str]], waiters: int
) -> None:
    holder = rival(raw_image)
    assert holder.ok
    holder_pid = int(holder.reply["pid"])  # type: ignore[call-overload]
    wrappers = [
        subprocess.Popen(
            [sys.executable, "-m", "imglock", "run", "-w", "300", "--image", str(raw_image),
             "--", "true"],
            env=ENV,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(waiters)
    ]  # fmt: skip
    started.extend(wrappers)
    # A wrapper claims for the command it is about to start: that pid waits.
    wait_until(
        lambda: len(waiting_pids(raw_image)) >= waiters,
        what=f"{waiters} waiters in the queue",
        timeout=30,
    )
    queue = sorted(pid or -1 for pid in waiting_pids(raw_image))
    assert len(set(queue)) == waiters and holder_pid not in queue

    samplers = {
        ("holders", "remote"): _sample("holders", REMOTE_SAMPLES, raw_image, remote=True),
        ("status", "remote"): _sample("status", REMOTE_SAMPLES, raw_image, remote=True),
    }
    started.extend(samplers.values())
    local = {
        ("holders", "local"): _sample("holders", LOCAL_SAMPLES, raw_image, remote=False),
        ("status", "local"): _sample("status", LOCAL_SAMPLES, raw_image, remote=False),
    }
    started.extend(local.values())
    results = {}
    for name, proc in {**samplers, **local}.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, name
        results[name] = json.loads(out)

    total = 0
    for name, result in results.items():
        total += result["samples"]
        print(f"\n{waiters} waiting, {name}: {result['samples']} samples, seen {result['seen']}")
        for seen in result["seen"]:
            holders, waiting = json.loads(seen)
            assert holders == [holder_pid], f"{name}: a phantom holder in {seen}"
            if waiting is not None:
                assert sorted(waiting) == queue, f"{name}: waiters not all shown in {seen}"
    assert results["holders", "remote"]["samples"] >= REMOTE_SAMPLES
    assert results["status", "remote"]["samples"] >= REMOTE_SAMPLES
    assert total >= 2 * REMOTE_SAMPLES

    # Once the holder goes, each waiter gets the image in turn.
    holder.stop()
    for wrapper in wrappers:
        assert wrapper.wait(60) == 0, wrapper.stderr.read() if wrapper.stderr else ""
    assert imglock.inspect(raw_image).waiting == []
