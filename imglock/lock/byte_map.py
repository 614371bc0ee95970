"""The lock protocol's byte map: the claim modes, and which bytes stand for what.

What every reader of an image's locks needs, apart from how a claim is won
(:mod:`imglock.lock.protocol`, whose docstring is the specification):

* the **modes** and their table (:class:`Mode`, :data:`MODE_TABLE`):
  everything that makes a mode, from its byte slots to its ``run`` option;
* **QEMU's layer**: its permission bytes, and the ones each mode takes and
  tests (:func:`qemu_bytes`);
* the **imglock layer's map**: where holders, intents and the queue lie,
  and what one of their bytes, seen locked, says (:func:`read_holding`,
  :func:`read_waiting`, :func:`read_intent`).

``imglock status`` reads locks with this alone; the operations that take
them (and their flock layer) are loaded by claimers only.
"""

import enum
from typing import Final, NamedTuple

from imglock.lock.identity import HOST_TAG_BITS, OWNER_BITS, PID_BITS, PID_MASK, Owner

#: A byte range: (start, length).
Range = tuple[int, int]

# --- QEMU's layer (block/file-posix.c: RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE) ----------
QEMU_PERM_BASE: Final = 100
QEMU_SHARED_BASE: Final = 200
#: QEMU reserves 64 bits for each set; only the first five have ever been used.
QEMU_PERM_SLOTS: Final = 64

#: BlockPermission bits in QEMU's order, with the names its messages use.
QEMU_PERM_NAMES: Final = (
    "consistent read",
    "write",
    "write unchanged",
    "resize",
    "change children",  # QEMU <= 6.1 only
)
PERM_CONSISTENT_READ: Final = 0
PERM_WRITE: Final = 1
PERM_RESIZE: Final = 3

#: What a running QEMU writer holds on its top image, and what it refuses to share.
QEMU_WRITER_PERMS: Final = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE)
QEMU_WRITER_UNSHARED: Final = (PERM_WRITE, PERM_RESIZE)
#: ... and on a backing file it only reads.
QEMU_READER_PERMS: Final = (PERM_CONSISTENT_READ,)
QEMU_READER_UNSHARED: Final = (PERM_WRITE, PERM_RESIZE)
#: What a QEMU 7.2 disk device with ``share-rw=on`` holds on a raw image
#: (measured: bytes 100 and 101 only): it reads and writes, and shares all.
#: (On a qcow2 the format layer refuses to share write and resize whatever
#: the device says, so QEMU holds a writer's bytes there.)
QEMU_SHARED_WRITER_PERMS: Final = (PERM_CONSISTENT_READ, PERM_WRITE)
QEMU_SHARED_WRITER_UNSHARED: Final = ()


class Mode(enum.StrEnum):
    """How an image is claimed.

    All that differs from one mode to another is data in :data:`MODE_TABLE`
    (its row's fields are the mode's attributes): adding a mode is adding a
    member here and its row there.
    """

    #: One writer, and no one else: the top image of a running VM.
    EXCLUSIVE = "exclusive"
    #: Any number of readers, and no writer: a backing file, a CD-ROM.
    SHARED = "shared"
    #: Writers that share the disk on purpose (QEMU's ``share-rw=on``,
    #: libvirt's <shareable/>, a cluster filesystem inside the guests):
    #: compatible with one another, never with an exclusive holder or with
    #: shared readers, who need an image that does not change under them.
    SHARED_WRITE = "shared-write"

    @property
    def admits(self) -> frozenset[str]:
        return MODE_TABLE[self].admits

    @property
    def alone(self) -> bool:
        """Whether a claim in this mode admits no one beside it (its flock is exclusive)."""
        return not MODE_TABLE[self].admits

    @property
    def slots(self) -> tuple[int, int]:
        return MODE_TABLE[self].slots

    @property
    def queue_code(self) -> int:
        return MODE_TABLE[self].queue_code

    @property
    def qemu_perms(self) -> tuple[int, ...]:
        return MODE_TABLE[self].qemu_perms

    @property
    def qemu_unshared(self) -> tuple[int, ...]:
        return MODE_TABLE[self].qemu_unshared

    @property
    def option(self) -> str:
        return MODE_TABLE[self].option

    @property
    def option_help(self) -> str:
        return MODE_TABLE[self].option_help


class ModeRow(NamedTuple):
    """One mode's row of the table: everything that makes it the mode it is."""

    #: The values of the modes a claim in this mode admits beside it.
    admits: frozenset[str]
    #: (holder slot, intent slot): where its regions lie, in SLOT_SIZE from
    #: the slots' base (see the map below; there is room for more slots).
    slots: tuple[int, int]
    #: Its 2-bit code in a queue byte (one code is still free).
    queue_code: int
    #: QEMU's permissions a claim in this mode takes, and refuses to share.
    qemu_perms: tuple[int, ...]
    qemu_unshared: tuple[int, ...]
    #: The ``imglock run`` option that claims a PATH in this mode, and its help.
    option: str
    option_help: str


#: Each mode's row, its fields in ModeRow's order: admits, slots, queue code,
#: QEMU perms and unshared perms, the run option and its help.
MODE_TABLE: Final = {
    Mode.EXCLUSIVE: ModeRow(
        frozenset(), (2, 3), 0, QEMU_WRITER_PERMS, QEMU_WRITER_UNSHARED,
        "--image", "Claim PATH exclusive (its backing files shared). Repeatable.",
    ),
    Mode.SHARED: ModeRow(
        frozenset({"shared"}), (4, 5), 1, QEMU_READER_PERMS, QEMU_READER_UNSHARED,
        "--shared", "Claim PATH shared (read-only use). Repeatable.",
    ),
    Mode.SHARED_WRITE: ModeRow(
        frozenset({"shared-write"}), (0, 1), 2,
        QEMU_SHARED_WRITER_PERMS, QEMU_SHARED_WRITER_UNSHARED, "--shared-write",
        "Claim PATH shared-write (writers sharing it on purpose, share-rw=on). Repeatable.",
    ),
}  # fmt: skip
assert set(MODE_TABLE) == set(Mode), "every mode has its row"


def conflicts(a: Mode, b: Mode) -> bool:
    """Whether claims in modes *a* and *b* exclude each other."""
    return b.value not in a.admits or a.value not in b.admits


def strongest(a: Mode, b: Mode) -> Mode:
    """The one mode that covers both *a* and *b* (one file asked for twice)."""
    return a if a is b else Mode.EXCLUSIVE


# --- The imglock layer's map ------------------------------------------------------------
#
#   2^62                 queue: one byte per waiter, in arrival order    (2^61 bytes)
#   2^62 + 2^61 + 0 S    holders, shared-write   (S = 2^57 bytes each)
#               + 1 S    intents, shared-write
#               + 2 S    holders, exclusive
#               + 3 S    intents, exclusive
#               + 4 S    holders, shared
#               + 5 S    intents, shared
#
# The order is chosen so that each mode's rivals lie in few ranges: an
# exclusive claimer's in one ([2^62, end): every waiter, holder and intent),
# a shared one's in one (the queue, then shared-write and exclusive holders
# and intents), a shared-write one's in two.

QUEUE_BASE: Final = 1 << 62
QUEUE_SIZE: Final = 1 << 61
SLOT_SIZE: Final = 1 << (OWNER_BITS + 1)
_SLOTS_BASE: Final = QUEUE_BASE + QUEUE_SIZE
#: Where each mode's holder and intent regions begin (Mode.slots).
HOLDER_BASE: Final = {m: _SLOTS_BASE + m.slots[0] * SLOT_SIZE for m in Mode}
INTENT_BASE: Final = {m: _SLOTS_BASE + m.slots[1] * SLOT_SIZE for m in Mode}
IMGLOCK_START: Final = QUEUE_BASE
IMGLOCK_END: Final = _SLOTS_BASE + (1 + max(max(m.slots) for m in Mode)) * SLOT_SIZE

#: A holder's lock is two bytes long when it also carries QEMU's bytes (so
#: that another host can tell them from a second, plain QEMU), else one.
HOLDER_PLAIN: Final = 1
HOLDER_WITH_QEMU: Final = 2

# A queue byte, from the top bit down: ticket (arrival second, 24 bits),
# mode (2 bits), host tag (its top 13 bits), pid (22 bits): 61 bits in all.
TICKET_BITS: Final = 24
TICKET_MAX: Final = (1 << TICKET_BITS) - 1
WAITER_HOST_BITS: Final = 13
_MODE_SHIFT: Final = PID_BITS + WAITER_HOST_BITS
_TICKET_SHIFT: Final = _MODE_SHIFT + 2
_CODE_MODE: Final = {mode.queue_code: mode for mode in Mode}
assert QUEUE_SIZE.bit_length() - 1 == _TICKET_SHIFT + TICKET_BITS


# --- Where each thing lies, and what a lock seen means ----------------------------------


def intent_byte(mode: Mode, owner: Owner) -> int:
    return INTENT_BASE[mode] + owner.id


def queue_byte(ticket: int, mode: Mode, owner: Owner) -> int:
    """A waiter's byte: arrival ticket, mode, the host tag's top bits, pid."""
    host = owner.host_tag >> (HOST_TAG_BITS - WAITER_HOST_BITS)
    return (
        QUEUE_BASE
        | ticket << _TICKET_SHIFT
        | mode.queue_code << _MODE_SHIFT
        | host << PID_BITS
        | owner.pid
    )


class Waiting(NamedTuple):
    """A queue byte, read back."""

    offset: int
    ticket: int
    mode: Mode
    #: The top WAITER_HOST_BITS of the waiter's host tag.
    host_bits: int
    pid: int

    def is_host(self, host_tag: int) -> bool:
        return self.host_bits == host_tag >> (HOST_TAG_BITS - WAITER_HOST_BITS)


class Holding(NamedTuple):
    """A holder range, read back."""

    mode: Mode
    owner: Owner
    #: The holder marks that QEMU's bytes on this image are its own.
    with_qemu: bool


def read_waiting(offset: int) -> Waiting | None:
    """The waiter whose queue byte is *offset*, or None if it is no queue byte."""
    rel = offset - QUEUE_BASE
    if not 0 <= rel < QUEUE_SIZE:
        return None
    mode = _CODE_MODE.get(rel >> _MODE_SHIFT & 3)
    if mode is None:
        return None
    host = rel >> PID_BITS & ((1 << WAITER_HOST_BITS) - 1)
    return Waiting(offset, rel >> _TICKET_SHIFT, mode, host, rel & PID_MASK)


def read_holding(start: int, length: int) -> Holding | None:
    """The holder whose range is [start, start+length), or None if it is none."""
    for mode, base in HOLDER_BASE.items():
        rel = start - base
        if 0 <= rel < SLOT_SIZE and rel % 2 == 0 and length in (1, 2):
            return Holding(mode, Owner.from_id(rel // 2), length == HOLDER_WITH_QEMU)
    return None


def read_intent(offset: int) -> tuple[Mode, Owner] | None:
    for mode, base in INTENT_BASE.items():
        if 0 <= offset - base < SLOT_SIZE // 2:
            return mode, Owner.from_id(offset - base)
    return None


def mode_at(offset: int) -> Mode | None:
    """The mode whose holder region holds *offset*, if any."""
    for mode, base in HOLDER_BASE.items():
        if base <= offset < base + SLOT_SIZE:
            return mode
    return None


def in_imglock_layer(start: int, end: int) -> bool:
    return start >= IMGLOCK_START and end <= IMGLOCK_END


def qemu_bytes(mode: Mode) -> tuple[list[int], list[int]]:
    """(bytes to take, bytes to test) for the QEMU layer of a claim in *mode*."""
    perms, unshared = mode.qemu_perms, mode.qemu_unshared
    take = [QEMU_PERM_BASE + p for p in perms] + [QEMU_SHARED_BASE + p for p in unshared]
    # A permission we use conflicts with anyone refusing to share it, and a
    # permission we refuse to share conflicts with anyone using it.
    test = [QEMU_SHARED_BASE + p for p in perms] + [QEMU_PERM_BASE + p for p in unshared]
    return take, test
