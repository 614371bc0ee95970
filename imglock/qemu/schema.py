"""The block drivers of a QEMU, derived from its ``query-qmp-schema`` answer.

QEMU's introspection hides the names of its types (they are numbers), but
not their shape: the argument of ``blockdev-add`` is ``BlockdevOptions``,
a union on ``driver`` with one variant per driver, and a child reference
(``BlockdevRef``, ``BlockdevRefOrNull``) is an alternate one of whose
branches is ``BlockdevOptions`` itself.  That is enough to list, for each
driver, the members that hold child nodes: the table that
:mod:`imglock.qemu.drivers` ships, checked against this by the tests, and
printed by ``python -m imglock.qemu.schema < answer.json`` to update it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

#: The command whose argument type is BlockdevOptions.
BLOCKDEV_ADD: Final = "blockdev-add"


class SchemaError(ValueError):
    """The introspection answer does not have the shape QEMU gives it."""


def driver_children(schema: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, ...]]:
    """Every block driver of *schema*, with its members that hold child nodes.

    *schema* is the ``return`` value of ``query-qmp-schema``.  A driver
    without children (a protocol) maps to an empty tuple.
    """
    by_name = {entry.get("name"): entry for entry in schema}
    command = by_name.get(BLOCKDEV_ADD)
    if command is None:
        raise SchemaError(f"no {BLOCKDEV_ADD} command")
    options = by_name.get(command.get("arg-type"))
    if options is None or options.get("tag") != "driver":
        raise SchemaError(f"the argument of {BLOCKDEV_ADD} is not a union on 'driver'")
    options_type = options["name"]

    def holds_child(type_name: str) -> bool:
        entry = by_name.get(type_name, {})
        if entry.get("meta-type") == "array":
            return holds_child(entry["element-type"])
        if entry.get("meta-type") == "alternate":
            return any(branch.get("type") == options_type for branch in entry["members"])
        return False

    table: dict[str, tuple[str, ...]] = {}
    for variant in options.get("variants", ()):
        members = by_name.get(variant["type"], {}).get("members", ())
        table[variant["case"]] = tuple(m["name"] for m in members if holds_child(m["type"]))
    return table


def main() -> None:
    """Print the table of a ``query-qmp-schema`` answer read from stdin."""
    answer = json.load(sys.stdin)
    schema = answer["return"] if isinstance(answer, dict) else answer
    for driver, members in sorted(driver_children(schema).items()):
        print(f"{driver}: {', '.join(members) or '-'}")


if __name__ == "__main__":
    main()
