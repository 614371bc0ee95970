"""Backing chains: compared with ``qemu-img info --backing-chain``, and every way they fail."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qcow2_builder import (
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    Qcow2Spec,
    QemuImg,
    assert_matches_qemu,
    build,
    open_fd_count,
)

from imglock.chain import MAX_CHAIN_DEPTH, Chain, open_chain
from imglock.errors import ChainError, FormatError, ImageError

# --- Against qemu-img -------------------------------------------------------


def qemu_chain(qemu_img: QemuImg, top: str | Path) -> list[dict[str, Any]]:
    proc = qemu_img("info", "-U", "--output=json", "--backing-chain", top)
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return result


def assert_chain_matches_qemu(qemu_img: QemuImg, top: str | Path) -> Chain:
    theirs = qemu_chain(qemu_img, top)
    chain = open_chain(top)
    ours = [image.driver.info(image) for image in chain.backing_chain]
    assert len(ours) == len(theirs)
    for depth, (mine, qemu) in enumerate(zip(ours, theirs, strict=True)):
        try:
            assert_matches_qemu(mine, qemu)
        except AssertionError as exc:
            chain.close()
            raise AssertionError(f"image {depth} of the chain: {exc}") from exc
    return chain


def backing_name(layout: str, level: int, directory: Path, base: Path) -> str:
    """How image *level* names *base*: relative across directories, or absolute."""
    if layout == "absolute" or (layout == "mixed" and level % 2):
        return str(base)
    return os.path.relpath(base, directory)


@pytest.mark.qemu
@pytest.mark.parametrize("layout", ["same-dir", "relative-dirs", "absolute", "mixed"])
@pytest.mark.parametrize("depth", [5, 8])
def test_deep_chains_match_qemu(
    qemu_img: QemuImg,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    layout: str,
    depth: int,
) -> None:
    monkeypatch.chdir(tmp_path)
    # Level 0 is a raw base; every level above is qcow2 in its own directory
    # (or all in one directory), and the top is named relatively from here.
    dirs = [Path("." if layout == "same-dir" else f"level{n}/sub") for n in range(depth)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    paths = [d / f"img{n}.{'raw' if n == 0 else 'qcow2'}" for n, d in enumerate(dirs)]
    qemu_img("create", "-q", "-f", "raw", paths[0], "4M")
    for n in range(1, depth):
        name = backing_name(layout, n, dirs[n], paths[n - 1].resolve())
        fmt = "raw" if n == 1 else "qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", name, "-F", fmt, paths[n])
    before = open_fd_count()
    with assert_chain_matches_qemu(qemu_img, str(paths[-1])) as chain:
        assert [link.role for link in chain] == ["top"] + ["backing"] * (depth - 1)
        assert [link.depth for link in chain] == list(range(depth))
        assert [img.format for img in chain.images] == ["qcow2"] * (depth - 1) + ["raw"]
        for image, path in zip(chain.images, reversed(paths), strict=True):
            assert os.path.samefile(image.filename, path)
    assert open_fd_count() == before


@pytest.mark.qemu
def test_backing_format_probed_when_not_recorded(qemu_img: QemuImg, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    top = tmp_path / "top.qcow2"
    top.write_bytes(build(Qcow2Spec(backing_name=b"base.qcow2")))
    with assert_chain_matches_qemu(qemu_img, top) as chain:
        assert [img.format for img in chain.images] == ["qcow2", "qcow2"]
        assert chain.links[1].image.header is not None


@pytest.mark.qemu
def test_recorded_raw_format_wins_over_the_contents(qemu_img: QemuImg, tmp_path: Path) -> None:
    """A qcow2 file recorded as a raw backing file is read as raw, as QEMU does."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "inner.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "inner.qcow2", "-F", "qcow2", tmp_path / "mid")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid", "-F", "raw", top, "1M")
    with assert_chain_matches_qemu(qemu_img, top) as chain:
        assert [img.format for img in chain.images] == ["qcow2", "raw"]


@pytest.mark.qemu
def test_data_files_in_a_chain(
    qemu_img: QemuImg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    base_opts = "data_file=base.data,data_file_raw=on"
    qemu_img("create", "-q", "-f", "qcow2", "-o", base_opts, "base.qcow2", "1M")
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=top.data",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    )
    with assert_chain_matches_qemu(qemu_img, "top.qcow2") as chain:
        roles = [(link.role, link.image.filename, link.depth) for link in chain]
        assert roles == [
            ("top", "top.qcow2", 0),
            ("data-file", "top.data", 0),
            ("backing", "base.qcow2", 1),
            ("data-file", "base.data", 1),
        ]
        assert chain.data_file_of(chain.top) is chain.links[1].image
        assert chain.links[1].parent is chain.top
        assert [img.format for img in chain.images] == ["qcow2", "raw", "qcow2", "raw"]


# --- Built by hand (no QEMU needed) -----------------------------------------


def qcow2(path: Path, backing: str | bytes = b"", fmt: bytes | None = None, **spec: Any) -> Path:
    """A small valid qcow2 image naming *backing* (recorded as *fmt*)."""
    name = backing.encode() if isinstance(backing, str) else backing
    extensions = [(EXT_BACKING_FORMAT, fmt)] if fmt else []
    path.write_bytes(build(Qcow2Spec(backing_name=name, extensions=extensions, **spec)))
    return path


def linear_chain(directory: Path, length: int) -> Path:
    """A chain of *length* images, each naming the one below; returns the top."""
    qcow2(directory / "img0")
    for n in range(1, length):
        qcow2(directory / f"img{n}", f"img{n - 1}", b"qcow2")
    return directory / f"img{length - 1}"


def test_chain_of_qcow2_images(tmp_path: Path) -> None:
    top = linear_chain(tmp_path, 6)
    with open_chain(top) as chain:
        assert len(chain) == 6
        assert chain.top.filename == str(top)
        assert [link.name for link in chain][1:] == [f"img{n}" for n in range(4, -1, -1)]
        assert [link.parent for link in chain][1:] == chain.images[:-1]


def test_max_depth_is_enforced(tmp_path: Path) -> None:
    top = linear_chain(tmp_path, 6)
    with open_chain(top, max_depth=6):
        pass
    before = open_fd_count()
    with pytest.raises(ChainError, match="backing chain is deeper than 5 images") as info:
        open_chain(top, max_depth=5)
    assert info.value.filename == str(top)
    assert open_fd_count() == before


def test_default_max_depth(tmp_path: Path) -> None:
    top = linear_chain(tmp_path, MAX_CHAIN_DEPTH + 1)
    with pytest.raises(ChainError, match=f"deeper than {MAX_CHAIN_DEPTH} images"):
        open_chain(top)
    with open_chain(tmp_path / f"img{MAX_CHAIN_DEPTH - 1}") as chain:
        assert len(chain) == MAX_CHAIN_DEPTH


def test_closing_the_chain_closes_every_descriptor(tmp_path: Path) -> None:
    top = linear_chain(tmp_path, 5)
    before = open_fd_count()
    chain = open_chain(top)
    assert open_fd_count() == before + 5
    chain.close()
    chain.close()  # idempotent
    assert open_fd_count() == before
    assert all(image.fd == -1 for image in chain.images)


def make_self_loop(d: Path) -> Path:
    return qcow2(d / "a.qcow2", "a.qcow2", b"qcow2")


def make_two_loop(d: Path) -> Path:
    qcow2(d / "b.qcow2", "a.qcow2", b"qcow2")
    return qcow2(d / "a.qcow2", "b.qcow2", b"qcow2")


def make_hard_link_loop(d: Path) -> Path:
    qcow2(d / "a.qcow2", "other-name.qcow2", b"qcow2")
    os.link(d / "a.qcow2", d / "other-name.qcow2")
    return d / "a.qcow2"


def make_symlink_loop(d: Path) -> Path:
    (d / "sub").mkdir()
    # Names resolve against the name the image was opened by (the link's
    # directory), not against where the link points.
    qcow2(d / "sub" / "a.qcow2", "link.qcow2", b"qcow2")
    (d / "link.qcow2").symlink_to(d / "sub" / "a.qcow2")
    return d / "link.qcow2"


def make_long_loop(d: Path) -> Path:
    qcow2(d / "i0", "i4", b"qcow2")
    for n in range(1, 5):
        qcow2(d / f"i{n}", f"i{n - 1}", b"qcow2")
    return d / "i4"


def make_data_file_is_top(d: Path) -> Path:
    top = d / "top.qcow2"
    extensions = [(EXT_DATA_FILE, str(top).encode())]
    top.write_bytes(build(Qcow2Spec(extensions=extensions, incompatible_features=4)))
    return top


LOOPS: dict[str, Callable[[Path], Path]] = {
    "self": make_self_loop,
    "two": make_two_loop,
    "hard-link": make_hard_link_loop,
    "symlink": make_symlink_loop,
    "five": make_long_loop,
    "data-file-is-top": make_data_file_is_top,
}


@pytest.mark.parametrize("make", LOOPS.values(), ids=LOOPS.keys())
def test_loops_are_detected(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    top = make(tmp_path)
    before = open_fd_count()
    with pytest.raises(ChainError, match=r"creates a loop: it is '.*' again"):
        open_chain(top)
    assert open_fd_count() == before


@pytest.mark.parametrize(
    "name",
    [
        "nbd://localhost:10809/export",
        "nbd:localhost:10809",
        'json:{"file": {"driver": "file", "filename": "/x"}}',
        "http://example.com/base.qcow2",
        "rbd:pool/image",
        "gluster://host/vol/img",
    ],
)
def test_non_local_backing_file(tmp_path: Path, name: str) -> None:
    top = qcow2(tmp_path / "top.qcow2", name, b"raw")
    before = open_fd_count()
    with pytest.raises(ChainError) as info:
        open_chain(top)
    assert str(info.value) == f"{top}: backing file '{name}' is not a local file"
    assert open_fd_count() == before


def test_local_protocol_prefix_is_a_file(tmp_path: Path) -> None:
    base = qcow2(tmp_path / "base.qcow2")
    top = qcow2(tmp_path / "top.qcow2", f"file:{base}", b"qcow2")
    with open_chain(top) as chain:
        assert chain.images[1].filename == str(base)


def make_missing(d: Path) -> Path:
    return qcow2(d / "top.qcow2", "../nowhere/base.qcow2", b"qcow2")


def make_fifo_backing(d: Path) -> Path:
    os.mkfifo(d / "fifo")
    return qcow2(d / "top.qcow2", "fifo", b"raw")


def make_directory_backing(d: Path) -> Path:
    (d / "dir").mkdir()
    return qcow2(d / "top.qcow2", "dir")


def make_missing_data_file(d: Path) -> Path:
    top = d / "top.qcow2"
    spec = Qcow2Spec(incompatible_features=4, extensions=[(EXT_DATA_FILE, b"/nonexistent.raw")])
    top.write_bytes(build(spec))
    return top


UNOPENABLE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (
        make_missing,
        "cannot open backing file '{d}/../nowhere/base.qcow2': No such file or directory",
    ),
    "fifo": (make_fifo_backing, "cannot open backing file '{d}/fifo': is a FIFO, not an image"),
    "directory": (
        make_directory_backing,
        "cannot open backing file '{d}/dir': is a directory, not an image",
    ),
    "data-file": (
        make_missing_data_file,
        "cannot open data file '/nonexistent.raw': No such file or directory",
    ),
}


@pytest.mark.parametrize(("make", "complaint"), UNOPENABLE.values(), ids=UNOPENABLE.keys())
def test_unopenable_children(tmp_path: Path, make: Callable[[Path], Path], complaint: str) -> None:
    top = make(tmp_path)
    before = open_fd_count()
    with pytest.raises(ChainError) as info:
        open_chain(top)
    assert str(info.value) == f"{top}: {complaint.format(d=tmp_path)}"
    assert open_fd_count() == before


def test_malformed_backing_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "base.qcow2").write_bytes(build(Qcow2Spec(cluster_bits=30)))
    top = qcow2(tmp_path / "top.qcow2", "base.qcow2", b"qcow2")
    before = open_fd_count()
    with pytest.raises(FormatError) as info:
        open_chain(top)
    assert type(info.value) is FormatError
    assert str(info.value).startswith(f"{tmp_path}/base.qcow2: Unsupported cluster size: 2^30")
    assert open_fd_count() == before


def test_unsupported_backing_format(tmp_path: Path) -> None:
    qcow2(tmp_path / "base.vmdk")
    top = qcow2(tmp_path / "top.qcow2", "base.vmdk", b"vmdk")
    with pytest.raises(ChainError, match="has format 'vmdk', which imglock cannot read"):
        open_chain(top)


def test_probed_foreign_backing_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "base.vmdk").write_bytes(b"KDMV" + bytes(1020))
    top = qcow2(tmp_path / "top.qcow2", "base.vmdk")
    with pytest.raises(FormatError, match="is a vmdk image"):
        open_chain(top)


def test_data_file_is_opened_raw_whatever_it_contains(tmp_path: Path) -> None:
    looks_like_qcow2 = qcow2(tmp_path / "data.raw", "would-be-backing", b"qcow2")
    top = tmp_path / "top.qcow2"
    spec = Qcow2Spec(incompatible_features=4, extensions=[(EXT_DATA_FILE, bytes(looks_like_qcow2))])
    top.write_bytes(build(spec))
    with open_chain(top) as chain:
        assert [(link.role, link.image.format) for link in chain] == [
            ("top", "qcow2"),
            ("data-file", "raw"),
        ]


def test_format_applies_to_the_top_only(tmp_path: Path) -> None:
    qcow2(tmp_path / "base.qcow2")
    top = qcow2(tmp_path / "top.qcow2", "base.qcow2")
    with open_chain(top, format="raw") as chain:
        assert [img.format for img in chain.images] == ["raw"]
    with open_chain(top, format="qcow2") as chain:
        assert [img.format for img in chain.images] == ["qcow2", "qcow2"]


def test_top_errors_pass_through(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="No such file or directory") as info:
        open_chain(tmp_path / "absent")
    assert type(info.value) is ImageError
