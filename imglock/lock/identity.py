"""Who a holder is, packed into a lock offset that any host can read back.

An owner id is ``host_tag << PID_BITS | pid``: the pid as the holder's own
PID namespace sees it, and a hash of its host name (the UTS name), so two
holders with the same pid on two hosts (or in two containers with their own
host names) lock different bytes.  The id is attribution only: a clash of
two ids still conflicts, because conflicts are decided by the lock test,
never by comparing ids.
"""

import functools
import os
from typing import Final, NamedTuple

try:  # hashlib.blake2b is _blake2's; importing hashlib would also load OpenSSL
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - a Python built without _blake2
    from hashlib import blake2b

#: Linux's PID_MAX_LIMIT on 64-bit is 2**22: every pid fits.
PID_BITS: Final = 22
HOST_TAG_BITS: Final = 34
OWNER_BITS: Final = PID_BITS + HOST_TAG_BITS
PID_MASK: Final = (1 << PID_BITS) - 1
HOST_TAG_MASK: Final = (1 << HOST_TAG_BITS) - 1


@functools.cache  # every claim asks for this host's tag: hash the name once
def host_tag(hostname: str) -> int:
    """The 34-bit tag of *hostname*: the first bits of its BLAKE2b digest."""
    digest = blake2b(hostname.encode("utf-8", "surrogateescape"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> (64 - HOST_TAG_BITS)


@functools.cache
def hostname() -> str:
    """This host's name as its UTS namespace gives it (what gethostname(2) returns)."""
    return os.uname().nodename


class Owner(NamedTuple):
    """A holder's identity as its lock offset carries it."""

    host_tag: int
    pid: int

    @property
    def id(self) -> int:
        return (self.host_tag << PID_BITS) | self.pid

    @classmethod
    def from_id(cls, owner_id: int) -> "Owner":
        return cls((owner_id >> PID_BITS) & HOST_TAG_MASK, owner_id & PID_MASK)

    @classmethod
    def current(cls, pid: int | None = None) -> "Owner":
        """This host, and *pid* (default: this process)."""
        return cls(host_tag(hostname()), os.getpid() if pid is None else pid)

    @property
    def is_this_host(self) -> bool:
        return self.host_tag == host_tag(hostname())

    @property
    def tag_text(self) -> str:
        """How a host with no record is shown: its tag, in hex."""
        return f"host#{self.host_tag:09x}"
