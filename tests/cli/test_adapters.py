"""Hypervisor adapters: a new VMM is one module, found through an entry point.

tests/support/toy_vmm is a VMM imglock knows nothing of; tests/support/toy_adapter.py is
its adapter, installed here the way a package installs it: a
``toy_adapter-0.dist-info`` with an ``entry_points.txt`` in the
``imglock.hypervisors`` group, on the ``PYTHONPATH`` of ``imglock run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENV, ImglockCli, imglock_holders
from processes import wait_until

import imglock

SUPPORT = Path(__file__).parents[1] / "support"
TOY_VMM = str(SUPPORT / "toy_vmm")


@pytest.fixture
def toy_env(tmp_path: Path) -> dict[str, str]:
    """The environment of an ``imglock run`` that has the toy adapter installed."""
    site = tmp_path / "site"
    dist_info = site / "toy_adapter-0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-adapter\nVersion: 0\n")
    entry_points = "[imglock.hypervisors]\ntoy = toy_adapter:ADAPTER\n"
    (dist_info / "entry_points.txt").write_text(entry_points)
    path = os.pathsep.join([str(site), str(SUPPORT), ENV["PYTHONPATH"]])
    return {**ENV, "PYTHONPATH": path}


def test_the_toy_vmm_claims_its_disk_through_its_adapter(
    raw_image: Path, tmp_path: Path, imglock_cli: ImglockCli, toy_env: dict[str, str]
) -> None:
    report = json.loads(
        imglock_cli("run", "--dry-run", "--json", "--", TOY_VMM, "--disk", raw_image,
                    env=toy_env).stdout
    )  # fmt: skip
    assert report["adapter"] == "toy" and report["qemu"] is False
    [entry] = report["images"]
    assert (entry["filename"], entry["mode"], entry["source"]) == (
        str(raw_image),
        "exclusive",
        "--disk",
    )
    stop = tmp_path / "stop"
    first = subprocess.Popen(
        [sys.executable, "-m", "imglock", "run", "--", TOY_VMM, "--disk", str(raw_image),
         "--until", str(stop)],
        env=toy_env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        (holder,) = wait_until(lambda: imglock_holders(raw_image), what="the toy holds its disk")
        assert holder.mode == "exclusive" and "toy_vmm" in (holder.command or "")
        status = json.loads(imglock_cli("status", "--json", raw_image, env=toy_env).stdout)
        assert [h["mode"] for h in status[0]["holders"] if h["layer"] == "imglock"] == ["exclusive"]
        second = imglock_cli("run", "--", TOY_VMM, "--disk", raw_image, env=toy_env)
        assert second.returncode == 75
        assert f"pid {holder.pid}" in second.stderr and "toy_vmm" in second.stderr
        stop.touch()
        assert first.wait(30) == 0, first.stderr
    finally:
        first.kill()
        first.wait()
    assert raw_image.read_bytes().startswith(b"toy vmm was here")
    assert imglock.holders(raw_image) == []


def test_without_its_adapter_the_toy_vmm_is_a_command_like_any_other(
    raw_image: Path, imglock_cli: ImglockCli
) -> None:
    proc = imglock_cli("run", "--", TOY_VMM, "--disk", raw_image, env=ENV)
    assert proc.returncode == 2 and "not a QEMU command line" in proc.stderr
