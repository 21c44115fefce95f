"""Session records and accounts as pickles, and the record's choice among sessions."""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import pytest

from hushchat.protocol import primitives as p
from hushchat.protocol.account import Account
from hushchat.protocol.consts import STATE_VERSION
from hushchat.protocol.errors import (
    InvalidState,
    NoSession,
    RemoteProtocolError,
    StateError,
    UnknownStateVersion,
)
from hushchat.protocol.session import SessionRecord
from tests.support.clock import NOW
from tests.support.peers import Peer, party
from tests.support.reference import SMALL_ORDER_KEY

Peers = Callable[..., tuple[Peer, Peer]]


def records_in_every_shape(peers: Peers) -> list[SessionRecord]:
    alice, bob = peers(post_quantum=True)
    pending = SessionRecord.from_bytes(alice.record.to_bytes())  # initiator, unanswered
    alice_x3dh, _ = peers(post_quantum=False, one_time=False)
    bob.decrypt(alice.encrypt(b"first"))
    sent = [alice.encrypt(b"%d" % i) for i in range(4)]
    bob.decrypt(sent[3])  # responder with skipped keys
    with_skipped = SessionRecord.from_bytes(bob.record.to_bytes())
    alice.decrypt(bob.encrypt(b"reply"))
    # A second session from a fresh bundle: the first becomes previous.
    alice.start(bob.account.bundle("bob", 1))
    bob.decrypt(alice.encrypt(b"second session"))
    return [SessionRecord(), pending, alice_x3dh.record, with_skipped, alice.record, bob.record]


def test_session_record_round_trips_exactly(peers: Peers) -> None:
    for record in records_in_every_shape(peers):
        data = record.to_bytes()
        loaded = SessionRecord.from_bytes(data)
        assert loaded.to_bytes() == data
        assert len(loaded.previous) == len(record.previous)


def test_a_loaded_record_carries_on_exactly_like_the_original(peers: Peers) -> None:
    alice, bob = peers(established=True)
    held = [alice.encrypt(b"held %d" % i) for i in range(3)]
    bob.decrypt(held[2])
    loaded = SessionRecord.from_bytes(bob.record.to_bytes())
    for message in [held[0], alice.encrypt(b"new")]:
        parties = bob.parties
        original = bob.record.decrypt(
            message, bob.account, now=NOW, rng=p.SeededRandom(b"r"), **parties
        )
        copy = loaded.decrypt(message, bob.account, now=NOW, rng=p.SeededRandom(b"r"), **parties)
        assert original == copy
        assert loaded.to_bytes() == bob.record.to_bytes()


def test_account_round_trips_and_works_after_loading(make_account: Callable[..., Account]) -> None:
    alice, bob = make_account(), make_account()
    bob.rotate_signed_prekey(now=NOW + 1)
    data = bob.to_bytes()
    loaded = Account.from_bytes(data)
    assert loaded.to_bytes() == data
    assert loaded.identity.public == bob.identity.public
    assert loaded.bundle("bob", 1) == bob.bundle("bob", 1)
    alice_record = SessionRecord(
        alice.create_outbound_session(
            loaded.bundle("bob", 1), local=party("alice"), remote=party("bob"), now=NOW
        )
    )
    result = SessionRecord().decrypt(
        alice_record.encrypt(b"x", now=NOW),
        loaded,
        local=party("bob"),
        remote=party("alice"),
        now=NOW,
    )
    assert result.plaintext == b"x"
    assert Account.from_bytes(loaded.to_bytes()).one_time_prekey_count == 1


def corruptions(data: bytes) -> list[bytes]:
    value = msgpack.unpackb(data)
    other_version = msgpack.packb([STATE_VERSION + 1, *value[1:]], use_bin_type=True)
    wrong_type = msgpack.packb([STATE_VERSION, "x", *value[2:]], use_bin_type=True)
    short = msgpack.packb(value[:-1], use_bin_type=True)
    longer = msgpack.packb([*value, None], use_bin_type=True)
    return [
        b"",
        b"\x90",
        b"\xc1",
        data[:-1],
        data + b"\0",
        wrong_type,
        short,
        longer,
        other_version,
    ]


def test_corrupt_or_foreign_pickles_raise_state_errors(
    peers: Peers, make_account: Callable[..., Account]
) -> None:
    _, bob = peers(established=True)
    for loader, data in [
        (SessionRecord.from_bytes, bob.record.to_bytes()),
        (Account.from_bytes, bob.account.to_bytes()),
    ]:
        *corrupt, other_version = corruptions(data)
        for bad in corrupt:
            with pytest.raises(StateError):
                loader(bad)  # type: ignore[operator]
        with pytest.raises(UnknownStateVersion):
            loader(other_version)  # type: ignore[operator]
    # An account pickle whose current signed prekey is missing.
    value = msgpack.unpackb(bob.account.to_bytes())
    value[4] = []
    with pytest.raises(StateError):
        Account.from_bytes(msgpack.packb(value, use_bin_type=True))
    # A record whose session names a small-order identity key.
    value = msgpack.unpackb(bob.record.to_bytes())
    value[1][1] = SMALL_ORDER_KEY
    with pytest.raises(StateError):
        SessionRecord.from_bytes(msgpack.packb(value, use_bin_type=True))


def test_misuse_and_missing_sessions(peers: Peers) -> None:
    alice, bob = peers(established=True)
    empty = Peer(bob.account, bob.rng, me="bob", peer="alice")
    with pytest.raises(InvalidState):
        empty.encrypt(b"no session")
    before = empty.state()
    with pytest.raises(NoSession):
        empty.decrypt(alice.encrypt(b"ratchet message, no session"))
    assert empty.state() == before


def test_previous_sessions_still_decrypt_and_are_promoted(peers: Peers) -> None:
    alice, bob = peers(established=True)
    old_session = alice.record.current
    in_flight_old = alice.encrypt(b"old session")
    # Alice resets (say, after losing state) and starts afresh from a new bundle.
    alice.start(bob.account.bundle("bob", 1))
    assert bob.decrypt(alice.encrypt(b"new session")).new_session
    assert len(bob.record.previous) == 1
    new_base = bob.record.current.base_key  # type: ignore[union-attr]
    # A late message of the old session decrypts and makes it current again.
    assert bob.decrypt(in_flight_old).plaintext == b"old session"
    assert bob.record.current.base_key == old_session.base_key  # type: ignore[union-attr]
    assert bob.record.previous[0].base_key == new_base
    # Alice, still on the new session, pulls Bob back to it.
    assert bob.decrypt(alice.encrypt(b"again")).plaintext == b"again"
    assert bob.record.current.base_key == new_base  # type: ignore[union-attr]
    assert alice.decrypt(bob.encrypt(b"ok")).plaintext == b"ok"


def test_previous_sessions_are_bounded(peers: Peers) -> None:
    alice, bob = peers(established=True)
    bob.record.max_previous = 2
    first_session = alice.encrypt(b"first session")
    for i in range(3):
        alice.start(bob.account.bundle("bob", 1))
        assert bob.decrypt(alice.encrypt(b"session %d" % i)).new_session
    assert len(bob.record.previous) == 2
    before = bob.state()
    with pytest.raises(RemoteProtocolError):
        bob.decrypt(first_session)
    assert bob.state() == before
    loaded = SessionRecord.from_bytes(bob.record.to_bytes(), max_previous=2)
    assert loaded.to_bytes() == bob.record.to_bytes()
