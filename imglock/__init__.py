"""imglock: advisory locks for VM disk images on shared filesystems.

    >>> import imglock
    >>> with imglock.claim("vm.qcow2"):            # doctest: +SKIP
    ...     run_the_vm()
    >>> imglock.holders("vm.qcow2")                 # doctest: +SKIP
    [Holder(layer='imglock', mode='exclusive', host='node1', pid=4242, ...)]

The names below are imported on first use, so that ``import imglock`` (and
every command of the CLI) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "claim": "imglock.api",
    "Claim": "imglock.api",
    "inspect": "imglock.report",
    "holders": "imglock.lock.discovery",
    "Holder": "imglock.lock.holder",
    "Mode": "imglock.lock.protocol",
    "ImglockError": "imglock.errors",
    "UsageError": "imglock.errors",
    "ImageError": "imglock.errors",
    "FormatError": "imglock.errors",
    "ChainError": "imglock.errors",
    "LockError": "imglock.errors",
    "LockConflict": "imglock.errors",
    "LockLost": "imglock.errors",
}

__all__ = [
    "ChainError",
    "Claim",
    "FormatError",
    "Holder",
    "ImageError",
    "ImglockError",
    "LockConflict",
    "LockError",
    "LockLost",
    "Mode",
    "UsageError",
    "__version__",
    "claim",
    "holders",
    "inspect",
]

if TYPE_CHECKING:
    from imglock.api import Claim, claim
    from imglock.errors import (
        ChainError,
        FormatError,
        ImageError,
        ImglockError,
        LockConflict,
        LockError,
        LockLost,
        UsageError,
    )
    from imglock.lock.discovery import holders
    from imglock.lock.holder import Holder
    from imglock.lock.protocol import Mode
    from imglock.report import inspect


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'imglock' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
