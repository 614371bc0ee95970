"""The README's libvirt recipe, run verbatim as an operator runs it on Debian 12.

The shell blocks of README.md's "With libvirt" section are read from the
README itself and run as root, unchanged, on host C of
``tests/libvirt/up``: libvirt 9.0 as Debian ships it, domains run as
libvirt-qemu with DAC and no AppArmor.  ``pip install imglock`` finds this
checkout's wheel, and its dependencies', in a wheelhouse built once per
session (``PIP_NO_INDEX``, ``PIP_FIND_LINKS``): the command is the README's.
Then a domain whose ``<emulator>`` is the README's runs a TCG guest on
``/var/lib/libvirt/images``, and ``imglock status`` from the installed
venv says who holds its images.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from libvirt_hosts import (
    REQUIRE_LIBVIRT,
    ROOT,
    Disk,
    Domain,
    Libvirt,
    VirshError,
    holders,
    on_host,
    required_host,
)
from processes import wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.libvirt]

README = ROOT / "README.md"
SECTION = "## With libvirt"
#: Where Debian keeps a domain's images; as the host sees it, in its own copy.
IMAGES = Path("/var/lib/libvirt/images")
QEMU_USER = "libvirt-qemu"
#: The environment of a root login on a fresh Debian 12 (no pip
#: configuration: pip's way to the wheelhouse is added to it), not this one's.
FRESH_LOGIN = (
    "env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root", "LANG=C.UTF-8",
)  # fmt: skip
#: Left in a venv this module made, so that a run killed before its
#: clean-up does not make the next run refuse the venv as someone else's.
MADE_HERE = ".made-by-imglock-tests"
#: What ``pip wheel`` needs of the checkout to build imglock.
PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE", "imglock")


@dataclass(frozen=True)
class Recipe:
    """README.md's "With libvirt" section: its shell blocks and its emulator."""

    script: str
    emulator: Path

    @property
    def venv(self) -> Path:
        """The venv the recipe installs: the emulator's ``bin`` directory's parent."""
        return self.emulator.parent.parent


def read_recipe(readme: Path) -> Recipe:
    """The recipe of *readme*'s section: its shell blocks, one after another."""
    text = readme.read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)
    emulators = re.findall(r"<emulator>(\S+)</emulator>", section)
    assert blocks and len(emulators) == 1, f"README.md's {SECTION!r} has no recipe"
    return Recipe("".join(blocks), Path(emulators[0]))


def seen_here(host: Libvirt, path: Path) -> Path:
    """*path* under the host's /var/lib/libvirt, as seen from here: in its private copy."""
    return host.state_dir / "lib" / path.relative_to("/var/lib/libvirt")


def build_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of this checkout's imglock and of its dependencies."""
    source = tmp_path_factory.mktemp("imglock-source")
    for name in PACKAGE_FILES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path_factory.mktemp("wheelhouse")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         os.fspath(source), "-w", os.fspath(wheels)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    return wheels


@dataclass(frozen=True)
class Installed:
    """The recipe, run on a host: its venv's ``imglock`` and the emulator to name."""

    host: Libvirt
    recipe: Recipe

    def imglock(self) -> list[str]:
        """``imglock`` of the venv, run on the host as root logs in there (not this checkout's)."""
        program = os.fspath(self.recipe.venv / "bin" / "imglock")
        return [*on_host(self.host), *FRESH_LOGIN, program]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The README's recipe, run as root on host C; what it made is removed afterwards.

    Once per session (this module's only): a wheelhouse and the recipe.  A
    venv where the recipe installs that this module did not make is left
    alone, and the test cannot run.
    """
    host = required_host("c")
    wheelhouse = build_wheelhouse(tmp_path_factory)
    recipe = read_recipe(README)
    venv = recipe.venv
    if venv.exists() and not (venv / MADE_HERE).exists():
        reason = f"{venv} exists, made by someone else: the recipe would install over it"
        if REQUIRE_LIBVIRT:
            pytest.fail(reason)
        pytest.skip(reason)
    shutil.rmtree(venv, ignore_errors=True)
    records = seen_here(host, IMAGES / ".imglock")
    made_records = not records.exists()
    try:
        run = subprocess.run(
            [*on_host(host), *FRESH_LOGIN, "PIP_CONFIG_FILE=/dev/null", "PIP_NO_INDEX=1",
             f"PIP_FIND_LINKS={wheelhouse}", "bash", "-e", "-c", recipe.script],
            cwd="/", capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if venv.is_dir():
            (venv / MADE_HERE).touch()
        assert run.returncode == 0, f"the README's recipe failed:\n{run.stdout}\n{run.stderr}"
        yield Installed(host, recipe)
    finally:
        shutil.rmtree(venv, ignore_errors=True)
        if made_records:
            shutil.rmtree(records, ignore_errors=True)


@pytest.fixture
def images(installed: Installed) -> Iterator[tuple[Path, Path]]:
    """A qcow2 top on a qcow2 backing file, and a CD, in the host's images directory.

    Their names are the test's own; they sit in the directory itself, where
    the recipe made the QEMU user's record directory.
    """
    tag = f"recipe-{os.urandom(5).hex()}"
    top, base, cd = (IMAGES / f"{tag}-{name}" for name in ("top.qcow2", "base.qcow2", "cd.iso"))
    script = (
        f"qemu-img create -q -f qcow2 {base} 16M && "
        f"qemu-img create -q -f qcow2 -b {base} -F qcow2 {top} && "
        f"qemu-img create -q -f raw {cd} 1M"
    )
    try:
        subprocess.run([*on_host(installed.host), "sh", "-c", script], check=True, timeout=60)
        yield top, cd
    finally:
        for image in (top, base, cd):
            seen_here(installed.host, image).unlink(missing_ok=True)


@pytest.fixture
def domains() -> Iterator[list[Domain]]:
    """Domains a test defines; destroyed and undefined afterwards."""
    made: list[Domain] = []
    yield made
    for domain in made:
        domain.remove()


def imglock_holders(installed: Installed, path: Path) -> list[dict[str, object]]:
    """The holders of *path* that ``imglock status`` of the installed venv names."""
    return [h for h in holders(installed.imglock(), path) if h["layer"] == "imglock"]


def uid_of(pid: int) -> int:
    """The real uid of process *pid*."""
    status = Path(f"/proc/{pid}/status").read_text()
    [uid] = re.findall(r"^Uid:\s+(\d+)", status, flags=re.MULTILINE)
    return int(uid)


def test_the_readmes_recipe_runs_a_domain_as_libvirt_qemu_under_imglocks_claim(
    installed: Installed, images: tuple[Path, Path], domains: list[Domain], tmp_path: Path
) -> None:
    host, emulator = installed.host, installed.recipe.emulator
    top, cd = images
    disks = [Disk(top), Disk(cd, target="sda", format="raw", device="cdrom")]
    first = Domain(host, emulator, disks).define(tmp_path)
    domains.append(first)
    first.virsh("start")
    qemu = first.pid()
    assert qemu is not None and first.qemu_pids() == [qemu]
    assert uid_of(qemu) == pwd.getpwnam(QEMU_USER).pw_uid

    [holder] = imglock_holders(installed, top)
    assert (holder["mode"], holder["pid"], holder["host"]) == ("exclusive", qemu, host.hostname)
    assert holder["vm"] == first.name and f"guest={first.name}," in str(holder["command"])
    records = os.listdir(seen_here(host, IMAGES / ".imglock"))
    assert any(name.startswith(f"{top.name}.") for name in records), records

    second = Domain(host, emulator, disks).define(tmp_path)
    domains.append(second)
    with pytest.raises(VirshError) as refused:
        second.virsh("start")
    assert str(top) in str(refused.value) and f"pid {qemu} on {host.hostname}" in str(refused.value)
    assert second.state() == "shut off" and first.state() == "running"

    first.virsh("destroy")
    assert not first.qemu_pids()
    wait_until(lambda: not imglock_holders(installed, top), what="the claim to be free")
