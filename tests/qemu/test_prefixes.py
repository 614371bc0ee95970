"""QEMU behind a prefix: ``env``, ``nice``, ``taskset``, ``sudo``... are seen through.

The wrappers' option syntax is checked on its own first; then a real QEMU
is run by ``imglock run`` behind a chain of real wrappers: imglock reads
its command line, claims its disk and leaves QEMU its own lock bytes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, ImglockCli
from processes import wait_until
from qemu_vm import TINY_PC, connect_test_monitor
from wrapped_vm import TIMEOUT

import imglock
from imglock.qemu.names import qemu_start
from imglock.qemu.prefixes import PrefixError, command_start

Q = "qemu-system-x86_64"


@pytest.mark.parametrize(
    "prefix",
    [
        ["env", "VAR=x"],
        ["/usr/bin/env", "-i", "PATH=/usr/bin", "HOME=/"],
        ["env", "-u", "DISPLAY", "--", "A=1"],
        ["env", "-"],
        ["nice", "-n", "5"],
        ["nice", "-n5"],
        ["nice", "-5"],
        ["nice", "--adj=5"],
        ["taskset", "-c", "0"],
        ["taskset", "0x1"],
        ["taskset", "-ac", "0-3"],
        ["numactl", "--cpunodebind=0", "--"],
        ["numactl", "-N", "0", "--membind", "0"],
        ["chrt", "-f", "10"],
        ["chrt", "--rr", "--sched-runtime", "5", "1"],
        ["chrt", "-o"],
        ["ionice", "-c", "3"],
        ["ionice", "-c2", "-n", "7", "-t"],
        ["setpriv", "--reuid", "1000", "--regid=1000", "--clear-groups"],
        ["sudo", "-u", "x"],
        ["sudo", "-E", "-u", "x", "--", "LANG=C"],
        ["setsid", "-f"],
        ["nohup"],
        ["stdbuf", "-oL"],
        ["timeout", "-s", "KILL", "1h"],
        ["sudo", "-u", "vm", "env", "A=1", "nice", "-n", "5", "taskset", "-c", "1"],
    ],
)  # fmt: skip
def test_common_exec_wrappers_are_seen_through(prefix: list[str]) -> None:
    argv = [*prefix, Q, "-hda", "/vm/a.raw"]
    assert qemu_start(argv) == len(prefix)


def test_a_command_that_is_not_qemu_behind_a_wrapper_is_not_qemu() -> None:
    assert qemu_start(["nice", "-n", "5", "qemu-img", "check", "x"]) is None
    assert command_start(["nice", "-n", "5", "qemu-img", "check", "x"]) == 3
    assert qemu_start(["true"]) is None


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        (["env", "-C", "/srv"], "env: with -C it runs it in another directory"),
        (["env", "--chdir=/srv"], "env: with --chdir it runs it in another directory"),
        (["env", "-S", "x y"], "env: with -S it splits a string"),
        (["sudo", "-i"], "sudo: with -i it runs a shell"),
        (["sudo", "-D", "/srv"], "sudo: with -D it runs it in another directory"),
        (["taskset", "-p", "0x1"], "taskset: with -p it acts on a running process"),
        (["nice", "--frobnicate"], "nice: option --frobnicate is not one imglock knows"),
        (["nice", "-q"], "nice: option -q is not one imglock knows"),
        (["numactl", "--p", "0"], "numactl: option --p is not one imglock knows"),
    ],
)  # fmt: skip
def test_wrapper_options_that_change_the_command_are_refused(prefix: list[str], why: str) -> None:
    with pytest.raises(PrefixError, match=why):
        qemu_start([*prefix, Q, "-hda", "/vm/a.raw"])


def test_a_wrapper_without_a_command_is_refused() -> None:
    with pytest.raises(PrefixError, match="env: no command to run"):
        command_start(["env", "A=1"])


def test_dry_run_reads_qemu_behind_prefixes(imglock_cli: ImglockCli, raw_image: Path) -> None:
    proc = imglock_cli("run", "--dry-run", "--json", "--", "env", "A=1", "nice", "-n", "5",
                       "taskset", "-c", "0", Q, "-hda", raw_image)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert '"qemu": true' in proc.stdout and str(raw_image) in proc.stdout
    assert '"qemu-test"' in proc.stdout  # QEMU keeps its own bytes


@pytest.mark.parametrize(
    ("prefix", "first"),
    [(["my-launcher", "--cpus", "2"], "my-launcher: a prefix imglock does not see through"),
     (["env", "-C", "/tmp"], "env: with -C it runs it in another directory")],
)  # fmt: skip
def test_a_prefix_that_cannot_be_seen_through_says_how_to_proceed(
    imglock_cli: ImglockCli, raw_image: Path, prefix: list[str], first: str
) -> None:
    proc = imglock_cli("run", "--", *prefix, Q, "-hda", raw_image)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"imglock: {first}"), proc.stderr
    assert "--image" in proc.stderr and "--qemu-locks off" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


@pytest.mark.qemu
def test_qemu_behind_wrappers_runs_claimed_and_keeps_its_own_lock_bytes(
    qemu_system_path: str, raw_image: Path, tmp_path: Path
) -> None:
    qmp = f"/tmp/imglock-prefix-{tmp_path.name[-20:]}.qmp"
    argv = [sys.executable, "-m", "imglock", "run", "--",
            "env", "IMGLOCK_TEST=1", "nice", "-n", "5", "taskset", "-c", "0",
            qemu_system_path, *TINY_PC, "-S", "-drive", f"file={raw_image},format=raw,if=virtio",
            "-qmp", f"unix:{qmp},server=on,wait=off"]  # fmt: skip
    wrapper = subprocess.Popen(argv, env=ENV, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        monitor = connect_test_monitor(qmp, wrapper)
        try:
            assert monitor.query_status(timeout=10).status == "prelaunch"
            # QEMU opened its disk, so it took its own write byte (had imglock
            # held QEMU's bytes, QEMU would have failed to get that lock).
            (holder,) = wait_until(
                lambda: [h for h in imglock.holders(raw_image) if "write" in h.perms],
                what="QEMU's own write lock byte on its disk",
            )
            assert (holder.layer, holder.mode) == ("imglock", "exclusive")
        finally:
            monitor.call(monitor.monitor.execute("quit"), timeout=10)
            monitor.close()
        assert wrapper.wait(TIMEOUT) == 0
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()
        Path(qmp).unlink(missing_ok=True)
    assert wrapper.stderr is not None
    assert b"lock" not in wrapper.stderr.read()
