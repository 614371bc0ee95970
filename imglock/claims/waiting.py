"""A claim that waits: its place in a queue, and the pauses between attempts."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Final

from imglock.claims.member import Member
from imglock.lock.identity import Owner
from imglock.lock.protocol import Place

#: Backoff between attempts while waiting: first delay and cap, in seconds.
#: Racing claimers can both lose, so the delay is jittered to break the tie.
BACKOFF_FIRST: Final = 0.001
BACKOFF_CAP: Final = 0.05


@dataclass(frozen=True)
class Queued:
    """Where a waiting claim stands in line: one member's queue."""

    member: Member
    place: Place

    def place_of(self, member: Member) -> Place | None:
        """The place *member* holds, if it is the one queued."""
        return self.place if self.member is member else None


def enqueue(member: Member, owner: Owner) -> Queued:
    """Queue *member* at the end of its file's queue."""
    return Queued(member, member.image.enqueue(member.mode, owner))


def leave(queued: Queued | None) -> None:
    """Give up the place *queued* holds, if any."""
    if queued is not None:
        queued.member.image.leave(queued.place)


@dataclass
class Backoff:
    """The pauses of a claim that waits: doubling from BACKOFF_FIRST up to *cap*, jittered."""

    cap: float = BACKOFF_CAP
    delay: float = BACKOFF_FIRST

    def __post_init__(self) -> None:
        self.delay = min(self.delay, self.cap)

    def pause(self, remaining: float) -> None:
        """Sleep before the next attempt, never past *remaining* seconds."""
        time.sleep(min(remaining, self.delay * random.uniform(0.5, 1.5)))
        self.delay = min(self.delay * 2, self.cap)
