"""The hypervisor adapters, and which one runs a command.

Built-in adapters are recognized by a cheap test of the command and their
modules loaded only when one is picked: QEMU's reads its command line and
speaks QMP, which a run of any other command must not pay for at start-up.
Installed adapters are found through their packages' entry points, group
``imglock.hypervisors`` (each names an :class:`~imglock.run.adapters.base.Adapter`
instance or class): a new hypervisor is one module and its registration.
Anything else is the generic adapter's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Final

from imglock.qemu.names import is_qemu
from imglock.run.adapters.base import Adapter, Command
from imglock.run.adapters.generic import GENERIC
from imglock.run.options import RunOptions

#: The entry-point group of installed adapters.
ENTRY_POINT_GROUP: Final = "imglock.hypervisors"

#: Built-in adapters: (a cheap test of the command, the module whose ADAPTER runs it).
BUILT_IN: Final[tuple[tuple[Callable[[Command], bool], str], ...]] = (
    (lambda command: is_qemu(command.program), "imglock.run.adapters.qemu"),
)


def adapter_for(options: RunOptions, command: Command) -> Adapter:
    """The adapter that runs *command*: a built-in one, an installed one, or the generic one.

    Installed adapters are looked for only when no file is named on the
    wrapper: with named files the generic adapter runs any command, and
    reading every installed package's entry points would cost each such
    run's start-up more than the rest of it.
    """
    for recognizes, module in BUILT_IN:
        if recognizes(command):
            return _load(module)
    if not options.named:
        for adapter in installed():
            if adapter.recognizes(command):
                return adapter
    return GENERIC


def _load(module: str) -> Adapter:
    # The deliberate lazy import: an adapter's module (QEMU's loads its
    # command-line parser and QMP client) only for the command it runs.
    adapter = importlib.import_module(module).ADAPTER
    assert isinstance(adapter, Adapter)
    return adapter


def installed() -> list[Adapter]:
    """The adapters installed packages register (entry points, group ``imglock.hypervisors``)."""
    # Lazy, as the adapters themselves: importlib.metadata (and the email
    # package under it) is loaded only for a command no built-in adapter knows.
    from importlib.metadata import entry_points

    adapters = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found = entry.load()
        adapter = found() if isinstance(found, type) else found
        if isinstance(adapter, Adapter):
            adapters.append(adapter)
    return adapters
