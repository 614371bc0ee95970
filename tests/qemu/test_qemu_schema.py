"""The block driver table of imglock.qemu.drivers, checked against the installed QEMU.

The table is shipped as data (no QEMU is asked at run time); here the
installed qemu-system-x86_64 is started and its ``query-qmp-schema``
answer read: every block driver it has must be in the table, with the
same child members, and the command-line reader must find a file behind
every one of those members.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import pytest
from processes import wait_until
from qemu.qmp import QMPClient
from qemu_vm import NONE_MACHINE

from imglock.formats import DATA_FORMATS
from imglock.qemu import drivers
from imglock.qemu.cmdline import find_images
from imglock.qemu.schema import SchemaError, driver_children


@pytest.fixture(scope="module")
def schema(qemu_system_path: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The installed QEMU's answer to query-qmp-schema, asked over a QMP socket.

    Not over ``-qmp stdio``: QEMU writes its stdout without blocking, and a
    reader slow to drain the pipe (a busy machine) gets a truncated answer.
    """
    socket = tmp_path_factory.mktemp("schema") / "qmp.sock"
    qemu = subprocess.Popen(
        [qemu_system_path, *NONE_MACHINE, "-qmp", f"unix:{socket},server=on,wait=off"]
    )
    try:
        wait_until(socket.exists, what="QEMU's QMP socket", timeout=60)

        async def ask() -> list[dict[str, Any]]:
            client = QMPClient("imglock-test")
            await client.connect(str(socket))
            try:
                answer = await client.execute("query-qmp-schema")
            finally:
                await client.disconnect()
            assert isinstance(answer, list), answer
            return answer

        return asyncio.run(ask())
    finally:
        qemu.kill()
        qemu.wait()


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
