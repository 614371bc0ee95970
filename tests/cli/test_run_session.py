"""The claim session of ``imglock run``: its states, and what each lets the others do."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import imglock_holders

from imglock.api import Claim, ClaimSpec
from imglock.lock.protocol import Layer, Mode
from imglock.run.reporter import Reporter
from imglock.run.session import ClaimSession, State


@pytest.fixture
def session(raw_image: Path) -> ClaimSession:
    notes: list[str] = []
    claim = Claim([ClaimSpec(str(raw_image), Mode.EXCLUSIVE)], layers=Layer.IMGLOCK)
    return ClaimSession(claim, Reporter(note=notes.append))


def state(session: ClaimSession) -> State:
    """The session's state now (read again after each step)."""
    return session.state


def test_a_migration_hands_the_claim_over_and_a_resumed_guest_takes_it_back(
    session: ClaimSession, raw_image: Path
) -> None:
    session.open()
    assert state(session) is State.PLANNED
    session.take()
    assert session.held and [h.mode for h in imglock_holders(raw_image)] == ["exclusive"]
    session.hand_over()
    assert state(session) is State.HANDED_OVER and imglock_holders(raw_image) == []
    with session.files() as files:
        assert files is None  # the migration owns the claim: the graph is not followed
    session.take_back()
    assert session.held and len(imglock_holders(raw_image)) == 1
    with session.files() as files:
        assert files is not None and len(files.members) == 1
    session.end()
    assert state(session) is State.ENDED and imglock_holders(raw_image) == []


def test_a_destination_is_prepared_then_claims_on_arrival(
    session: ClaimSession, raw_image: Path
) -> None:
    session.open()
    session.prepare_arrival()
    assert state(session) is State.PREPARED and imglock_holders(raw_image) == []
    session.take_on_arrival(wait=1.0, backoff_cap=0.001)
    assert session.held and len(imglock_holders(raw_image)) == 1
    session.write_deferred_records()
    session.end()
    assert imglock_holders(raw_image) == []
