"""``imglock-qemu``: QEMU run through ``imglock run --exec``, for a manager's ``<emulator>``.

libvirt (and others) start the program a domain names as its emulator
with QEMU's arguments and track the pid it started.  This program is
``imglock run --exec -- QEMU ARGS``: QEMU replaces it, keeping its pid,
with its images claimed and a helper beside it.

Which QEMU: the program's own name when it is a QEMU's (a link named
``qemu-system-x86_64`` to this program, in a directory of its own), found
in ``PATH`` past this program itself; otherwise this machine's
``qemu-system-ARCH``.  A manager passes a scrubbed environment, so the name
is the one setting that reaches it.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from typing import Final, NoReturn

from imglock.cli import main as imglock_main

#: The program's name when it is not a QEMU's.
OWN_NAME: Final = "imglock-qemu"


def real_qemu(argv0: str, path: str | None) -> str | None:
    """The QEMU to run for a program started as *argv0*: found in *path*, never itself."""
    name = os.path.basename(argv0)
    if not name.startswith("qemu-"):
        name = f"qemu-system-{platform.machine()}"
    me = os.path.realpath(sys.argv[0]) if os.path.exists(sys.argv[0]) else None
    for directory in (path or os.defpath).split(os.pathsep):
        found = shutil.which(name, path=directory)
        if found is not None and os.path.realpath(found) != me:
            return found
    return None


def main() -> NoReturn:
    qemu = real_qemu(sys.argv[0], os.environ.get("PATH"))
    if qemu is None:
        name = os.path.basename(sys.argv[0])
        print(f"{OWN_NAME}: no QEMU to run for {name} in PATH", file=sys.stderr, flush=True)
        sys.exit(127)
    sys.exit(imglock_main(["run", "--exec", "--", qemu, *sys.argv[1:]]))


if __name__ == "__main__":
    main()
