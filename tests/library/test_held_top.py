"""A claim of a held image whose chain cannot be followed here names the holder.

On shared storage an image's header may name a backing file by a path
that exists only on the host that uses it.  Claiming that image on another
host while it is held must say who holds it, as it would with the backing
file in place, not that the backing file is missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import QemuImg, SpawnRival

import imglock
from imglock.errors import ChainError, LockConflict


@pytest.fixture
def orphan(tmp_path: Path, qemu_img: QemuImg) -> Path:
    """A qcow2 image whose backing file is on another host's path."""
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "/srv/elsewhere/base.qcow2",
             "-F", "qcow2", top, "1M")  # fmt: skip
    return top


def test_a_held_image_with_a_backing_file_missing_here_names_its_holder(
    orphan: Path, rival: SpawnRival
) -> None:
    holder = rival(orphan, "--no-chain")
    assert holder.ok
    with pytest.raises(LockConflict) as caught:
        imglock.claim(orphan)
    assert [h.pid for h in caught.value.holders if h.layer == "imglock"] == [holder.proc.pid]
    assert f"pid {holder.proc.pid}" in str(caught.value)
    assert str(caught.value).startswith(f"{orphan}: cannot claim exclusive: held")
    # Nothing was kept by the attempt: the holder is still the only one.
    assert {h.pid for h in imglock.holders(orphan)} == {holder.proc.pid}
    holder.stop()


def test_a_free_image_with_a_backing_file_missing_here_says_so(orphan: Path) -> None:
    with pytest.raises(ChainError, match=r"cannot open backing file '/srv/elsewhere/base\.qcow2'"):
        imglock.claim(orphan)
    assert imglock.holders(orphan) == []


def test_a_shared_claim_beside_a_shared_holder_still_says_what_is_missing(
    orphan: Path, rival: SpawnRival
) -> None:
    holder = rival(orphan, "--no-chain", "--mode", "shared")
    assert holder.ok
    with pytest.raises(ChainError, match="cannot open backing file"):
        imglock.claim(orphan, mode="shared")
    holder.stop()
