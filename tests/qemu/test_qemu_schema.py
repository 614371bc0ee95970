"""The block driver table of imglock.qemu.drivers, checked against the installed QEMU.

The table is shipped as data (no QEMU is asked at run time); here the
installed qemu-system-x86_64 is started and its ``query-qmp-schema``
answer read: every block driver it has must be in the table, with the
same child members, and the command-line reader must find a file behind
every one of those members.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from qemu_vm import NONE_MACHINE

from imglock.formats import DATA_FORMATS
from imglock.qemu import drivers
from imglock.qemu.cmdline import find_images
from imglock.qemu.schema import SchemaError, driver_children

QMP_SESSION = [{"execute": "qmp_capabilities"}, {"execute": "query-qmp-schema"},
               {"execute": "quit"}]  # fmt: skip


@pytest.fixture(scope="module")
def schema(qemu_system_path: str) -> list[dict[str, Any]]:
    """The installed QEMU's answer to query-qmp-schema."""
    session = "".join(json.dumps(command) + "\n" for command in QMP_SESSION)
    proc = subprocess.run(
        [qemu_system_path, *NONE_MACHINE, "-qmp", "stdio"],
        input=session, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    for line in proc.stdout.splitlines():
        message = json.loads(line)
        if isinstance(message.get("return"), list):
            answer: list[dict[str, Any]] = message["return"]
            return answer
    raise AssertionError(f"no schema in QEMU's answer: {proc.stdout[:500]}")


@pytest.fixture(scope="module")
def installed(schema: list[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    table = driver_children(schema)
    assert "qcow2" in table and "file" in table, table  # the schema was understood
    return table


def test_every_driver_of_the_installed_qemu_is_in_the_table(
    installed: dict[str, tuple[str, ...]],
) -> None:
    assert sorted(d for d in installed if not drivers.known(d)) == []


def test_the_child_members_are_those_of_the_installed_qemu(
    installed: dict[str, tuple[str, ...]],
) -> None:
    shipped = {d: drivers.CHILD_MEMBERS.get(d, ()) for d in installed}
    assert shipped == installed


def test_drivers_without_children_are_files_endpoints_or_remote(
    installed: dict[str, tuple[str, ...]],
) -> None:
    for driver, members in installed.items():
        protocol = (
            driver in drivers.LOCAL_FILE_MEMBERS
            or driver in drivers.ENDPOINT_DRIVERS
            or driver in drivers.NONLOCAL_DRIVERS
        )
        assert protocol == (not members), driver


def test_formats_claimed_as_data_have_no_backing_or_data_file_in_qemu(
    installed: dict[str, tuple[str, ...]],
) -> None:
    for name in DATA_FORMATS:
        assert name in installed, name
        assert installed[name] == ("file",), name


def _file(name: str) -> dict[str, str]:
    return {"driver": "file", "filename": f"/vm/{name}"}


@pytest.mark.parametrize("driver", sorted(drivers.CHILD_MEMBERS))
def test_the_reader_finds_a_file_behind_every_child_member(driver: str) -> None:
    node: dict[str, object] = {"driver": driver}
    for member in drivers.CHILD_MEMBERS[driver]:
        child = _file(f"{driver}-{member}")
        node[member] = [child] if member == "children" else child
    found = {image.filename for image in find_images(["qemu-system-x86_64", "-blockdev",
                                                       json.dumps(node)])}  # fmt: skip
    members = drivers.CHILD_MEMBERS[driver]
    assert found == {f"/vm/{driver}-{member}" for member in members}


def test_a_schema_without_blockdev_add_is_refused() -> None:
    with pytest.raises(SchemaError):
        driver_children([{"name": "query-status", "meta-type": "command"}])
