"""Holder records on disk: JSON written without the json package, read back as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imglock.lock.identity import Owner
from imglock.lock.records import RECORD_DIR, Record, _json_text, read_all, record_name, write

#: Strings a record may carry: names that are not UTF-8 (surrogate escapes),
#: quotes, backslashes, control characters, non-ASCII text.
AWKWARD = [
    "plain",
    "",
    "disk\udcff\udc80.raw",
    'say "hi"\\',
    "tab\tnew\nline\x00nul\x1b[31m",
    "caf\u00e9 \u2603 \U0001f600",
]


def _record(text: str) -> Record:
    return Record(
        image=f"/images/{text}",
        owner=Owner(0x3FFFFFFFF, 4194303).id,
        mode="exclusive",
        host=text,
        pid=4194303,
        user=text,
        command=f"qemu-system-x86_64 -name {text}",
        since="2026-11-26T10:00:00Z",
    )


@pytest.mark.parametrize("text", AWKWARD)
def test_a_record_is_written_exactly_as_json_dumps_writes_it(text: str) -> None:
    record = _record(text)
    assert _json_text(record) == json.dumps(record.to_json(), sort_keys=True)


@pytest.mark.parametrize("text", AWKWARD)
def test_a_written_record_reads_back_as_it_was(tmp_path: Path, text: str) -> None:
    record = _record(text)
    (tmp_path / "disk.raw").write_bytes(bytes(512))  # a record is judged by its image's mode
    assert write(str(tmp_path), "disk.raw", record) is None
    owner = Owner.from_id(record.owner)
    assert (tmp_path / RECORD_DIR / record_name("disk.raw", owner)).is_file()
    assert read_all(str(tmp_path), "disk.raw") == [record]
