"""Split detection: what a receiver reports of the group states its senders claim, and when."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hushchat.protocol.address import Address
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.errors import StateError, UnknownStateVersion
from hushchat.protocol.group import StateRelation, state_relation
from hushchat.protocol.split_detection import PeerClaims, Relation, StateClaim

BOB, CAROL, DAVE = Address("bob", 1), Address("carol", 2), Address("dave", 1)
AHEAD, FORKED, UNKNOWN = StateRelation.AHEAD, StateRelation.FORKED, StateRelation.UNKNOWN


def state(label: str, epoch: int) -> StateClaim:
    return StateClaim(epoch, hashlib.sha256(f"{label} {epoch}".encode()).digest())


def chain(label: str, first: int, last: int) -> list[StateClaim]:
    return [state(label, epoch) for epoch in range(first, last + 1)]


def against(held: Sequence[StateClaim]) -> Relation:
    """A receiver holding ``held`` (epochs in order), as the group layer relates a claim."""
    return lambda claim: state_relation(held, claim.epoch, claim.state_hash)


# A receiver holding epochs 3..6 of one chain.
HELD = against(chain("main", 3, 6))


def kept(claims: PeerClaims) -> list[list[object]]:
    entries: list[list[object]] = unpack(claims.to_bytes(), what="test")[1]
    return entries


@pytest.mark.parametrize(
    ("claim", "relation"),
    [
        (state("main", 6), StateRelation.CURRENT),
        (state("main", 4), StateRelation.ANCESTOR),
        (state("main", 7), AHEAD),
        (state("other", 6), FORKED),
        (state("other", 4), FORKED),
        (state("main", 2), UNKNOWN),
    ],
)
def test_the_group_layer_relates_bare_states_as_it_relates_a_group(
    claim: StateClaim, relation: StateRelation
) -> None:
    assert HELD(claim) is relation


def test_the_same_state_or_one_behind_is_never_reported() -> None:
    claims = PeerClaims()
    for explained in (False, True):
        assert claims.observe(BOB, state("main", 6), HELD, ahead_explained=explained) is None
        assert claims.observe(CAROL, state("main", 3), HELD, ahead_explained=explained) is None
    assert not claims


def test_a_split_is_reported_once_per_sender_state_and_relation() -> None:
    claims = PeerClaims()
    other, another = state("other", 6), state("another", 6)
    assert claims.observe(BOB, other, HELD, ahead_explained=False) is FORKED
    assert claims.observe(BOB, other, HELD, ahead_explained=True) is None
    assert claims.observe(CAROL, other, HELD, ahead_explained=False) is FORKED
    assert claims.observe(BOB, another, HELD, ahead_explained=False) is FORKED
    assert claims.observe(BOB, another, HELD, ahead_explained=False) is None
    assert claims.observe(BOB, state("main", 2), HELD, ahead_explained=False) is UNKNOWN
    # Bob back on our state: forgotten, so a later split is news again.
    assert claims.observe(BOB, state("main", 6), HELD, ahead_explained=False) is None
    assert claims.observe(BOB, another, HELD, ahead_explained=False) is FORKED


def test_a_sender_ahead_is_reported_unless_a_held_change_explains_it() -> None:
    claims = PeerClaims()
    ahead = state("main", 8)
    # A change of ours waits for the one before it: the sender may simply be ahead.
    assert claims.observe(BOB, ahead, HELD, ahead_explained=True) is None
    assert claims.rejudge(HELD, ahead_explained=True) == []
    # That change was dropped, and nothing else came: a change was withheld from us.
    assert claims.rejudge(HELD, ahead_explained=False) == [(BOB, ahead, AHEAD)]
    assert claims.rejudge(HELD, ahead_explained=False) == []
    assert claims.observe(BOB, ahead, HELD, ahead_explained=False) is None
    # Nothing held at all: reported at once.
    assert claims.observe(CAROL, ahead, HELD, ahead_explained=False) is AHEAD


def test_claims_ahead_are_judged_again_as_our_state_moves() -> None:
    claims = PeerClaims()
    claims.observe(BOB, state("main", 7), HELD, ahead_explained=True)
    claims.observe(CAROL, state("other", 7), HELD, ahead_explained=True)
    claims.observe(DAVE, state("main", 9), HELD, ahead_explained=True)
    moved = against(chain("main", 4, 7))
    assert claims.rejudge(moved, ahead_explained=True) == [(CAROL, state("other", 7), FORKED)]
    assert claims.rejudge(moved, ahead_explained=True) == []
    # Bob's was ours (forgotten), carol's is reported, dave's still waits.
    assert kept(claims) == [
        ["carol", 2, 7, state("other", 7).state_hash, "forked"],
        ["dave", 1, 9, state("main", 9).state_hash, None],
    ]


def test_a_sender_reported_ahead_is_reported_again_when_it_proves_a_split() -> None:
    claims = PeerClaims()
    theirs = state("other", 7)
    assert claims.observe(BOB, theirs, HELD, ahead_explained=False) is AHEAD
    # We get epoch 7 ourselves, another one: not a withheld change but a split.
    assert claims.rejudge(against(chain("main", 4, 7)), ahead_explained=False) == [
        (BOB, theirs, FORKED)
    ]


def test_a_reported_claim_is_forgotten_once_we_hold_that_state() -> None:
    claims = PeerClaims()
    theirs = state("other", 6)
    assert claims.observe(BOB, theirs, HELD, ahead_explained=False) is FORKED
    assert claims.rejudge(against([*chain("main", 3, 5), theirs]), ahead_explained=False) == []
    assert not claims


def test_forget() -> None:
    claims = PeerClaims()
    claims.observe(BOB, state("other", 6), HELD, ahead_explained=False)
    claims.observe(CAROL, state("main", 8), HELD, ahead_explained=True)
    assert not claims.forget(lambda sender: sender.user_id == "nobody")
    assert claims.forget(lambda sender: sender == BOB)
    assert claims.forget(lambda sender: sender.user_id == "carol")
    assert not claims


def test_pickle_round_trip_and_bad_pickles() -> None:
    claims = PeerClaims()
    claims.observe(CAROL, state("other", 6), HELD, ahead_explained=False)
    claims.observe(BOB, state("main", 8), HELD, ahead_explained=True)
    data = claims.to_bytes()
    assert PeerClaims.from_bytes(data).to_bytes() == data
    assert PeerClaims.from_bytes(PeerClaims().to_bytes()).to_bytes() == PeerClaims().to_bytes()
    version, entries = unpack(data, what="test")
    with pytest.raises(UnknownStateVersion):
        PeerClaims.from_bytes(pack([version + 1, entries]))
    with pytest.raises(StateError):  # senders out of order
        PeerClaims.from_bytes(pack([version, entries[::-1]]))
    with pytest.raises(StateError):
        PeerClaims.from_bytes(pack([version, [[*entries[0][:3], bytes(31), None]]]))
    with pytest.raises(StateError):  # only a reportable relation is stored as reported
        PeerClaims.from_bytes(pack([version, [[*entries[0][:4], "current"]]]))
    assert "other" not in repr(claims)


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_garbage_pickles_raise_only_state_errors(data: bytes) -> None:
    with contextlib.suppress(StateError):
        PeerClaims.from_bytes(data)
