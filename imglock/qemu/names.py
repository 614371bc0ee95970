"""Which programs are QEMU system emulators, judged by name alone.

Kept apart from :mod:`imglock.qemu.cmdline` so that ``imglock run`` can
tell a QEMU command from any other without loading the command-line
parser, which only a QEMU command needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

from imglock.qemu.prefixes import command_start

#: Program names (basename of ``argv[0]``) that are QEMU system emulators
#: besides ``qemu-system-<target>``: RHEL's ``/usr/libexec/qemu-kvm``,
#: Debian's ``/usr/bin/kvm`` and the pre-1.0 ``qemu``.
QEMU_PROGRAM_NAMES: Final = frozenset({"qemu", "qemu-kvm", "kvm"})
QEMU_SYSTEM_PREFIX: Final = "qemu-system-"


def is_qemu(argv: Sequence[str]) -> bool:
    """Whether ``argv`` runs a QEMU system emulator, judged by ``argv[0]``'s basename.

    ``qemu-system-x86_64``, ``qemu-system-aarch64``..., ``qemu-kvm``, ``kvm``
    and ``qemu`` match; ``qemu-img``, ``qemu-nbd`` and
    ``qemu-storage-daemon`` do not (their options mean other things), nor
    does a wrapper such as ``/usr/bin/env qemu-system-x86_64``: see
    :func:`qemu_start` for QEMU behind a prefix.
    """
    if not argv:
        return False
    name = os.path.basename(argv[0])
    if name in QEMU_PROGRAM_NAMES:
        return True
    return name.startswith(QEMU_SYSTEM_PREFIX) and len(name) > len(QEMU_SYSTEM_PREFIX)


def qemu_start(argv: Sequence[str]) -> int | None:
    """Where a QEMU system emulator's own arguments start in *argv*, or None.

    0 for QEMU itself; past the exec-wrappers in front of it (``env``,
    ``nice``, ``taskset``, ``sudo``...: see :mod:`imglock.qemu.prefixes`);
    None for any other command.  Raises
    :class:`~imglock.qemu.prefixes.PrefixError` for a wrapper whose
    arguments cannot be followed.
    """
    start = command_start(argv)
    return start if is_qemu(argv[start:]) else None


def names_qemu(argv: Sequence[str]) -> bool:
    """Whether some element of *argv* names a QEMU system emulator: QEMU
    behind a prefix that imglock does not see through, most likely."""
    return any(is_qemu([element]) for element in argv)
