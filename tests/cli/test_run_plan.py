"""A dry run says what a real run claims: every command line of the corpus, both ways.

``imglock run --dry-run --json`` renders the plan; a real run takes it.
Here the real run's command is a stand-in for QEMU (a script named
``qemu-system-x86_64``) that, while ``imglock run`` holds the claim, asks
the library who holds each file and writes that down; it is compared with
what the dry run reported: the same files, modes and lock layers (the
flock layer included).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import ENV, ImglockCli
from test_dry_run import CASES, build_case

#: The stand-in for QEMU: who holds each file of IMGLOCK_TEST_FILES, as the library sees it.
FAKE_QEMU = """\
import fcntl, json, os, sys
import imglock


def flocked(name):
    # The claim's own flock is its imglock holder's layer: holders() does not list it apart.
    fd = os.open(name, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


out = {"pid": os.getpid(), "holders": {}}
for name in json.loads(os.environ["IMGLOCK_TEST_FILES"]):
    out["holders"][name] = [[h.layer, h.mode, h.pid] for h in imglock.holders(name)]
    if flocked(name):
        out["holders"][name].append(["flock", None, None])
with open(os.environ["IMGLOCK_TEST_OUT"], "w") as f:
    json.dump(out, f)
"""

#: The dry run's layer names, as ``imglock.holders`` names who holds what.
SEEN_AS = {"imglock": "imglock", "qemu": "qemu", "qemu-test": None}


def fake_qemu(directory: Path) -> Path:
    script = directory / "bin" / "qemu-system-x86_64"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    script.chmod(0o755)
    return script


@pytest.fixture(params=CASES)
def corpus_argv(request: pytest.FixtureRequest, tmp_path: Path, qemu_img_path: str) -> list[str]:
    """A corpus case's command line, its images created, run by the stand-in for QEMU."""
    argv, _expected = build_case(request.param, tmp_path, qemu_img_path)
    return [str(fake_qemu(tmp_path)), *argv[1:]]


def test_a_run_claims_what_its_dry_run_reports(
    corpus_argv: list[str], tmp_path: Path, imglock_cli: ImglockCli
) -> None:
    argv = corpus_argv
    dry = imglock_cli("run", "--dry-run", "--json", "--", *argv, cwd=tmp_path, env=ENV)
    report = json.loads(dry.stdout)
    assert dry.returncode == report["status"], dry.stderr
    claimed = [e for e in report["images"] if e["claimed"] and e["problem"] is None]
    names = [os.path.join(tmp_path, e["filename"]) for e in claimed]
    out = tmp_path / "holders.json"
    env = {**ENV, "IMGLOCK_TEST_FILES": json.dumps(names), "IMGLOCK_TEST_OUT": str(out)}
    real = imglock_cli("run", "--", *argv, cwd=tmp_path, env=env)
    assert real.returncode == report["status"], real.stderr
    if report["status"]:
        assert not out.exists()  # a problem the dry run reports stops the real run
        return
    seen = json.loads(out.read_text())
    ours = {
        name: {(layer, mode) for layer, mode, pid in holders if pid in (seen["pid"], None)}
        for name, holders in seen["holders"].items()
    }
    for name, entry in zip(names, claimed, strict=True):
        layers = {layer for layer, _mode in ours[name]}
        wanted = {SEEN_AS[layer] for layer in report["layers"]} - {None}
        if report["flock"] != "off":
            wanted.add("flock")  # a local file: --flock auto takes it too
        assert layers == wanted, (name, ours[name])
        assert ("imglock", entry["mode"]) in ours[name], (name, ours[name])
    assert len(names) == len(set(names))  # one entry per file, as the claim has one member
