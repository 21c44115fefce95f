"""The Double Ratchet: KDF chains against an independent computation, ordering, skipped
keys and their limits, duplicates, transactional failure, forward secrecy and healing."""

from __future__ import annotations

import hmac
from collections.abc import Callable

import msgpack
import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hushchat.protocol import primitives as p
from hushchat.protocol.consts import MAX_PLAINTEXT_SIZE, MAX_SKIP, PROTOCOL_VERSION
from hushchat.protocol.double_ratchet import (
    Header,
    RatchetState,
    kdf_ck,
    kdf_rk,
    message_keys,
    seal,
)
from hushchat.protocol.errors import (
    BadMac,
    DecodeError,
    DuplicateMessage,
    InvalidKey,
    InvalidState,
    NonContributoryKey,
    RemoteProtocolError,
    TooFarInFuture,
    UnknownVersion,
)
from hushchat.protocol.messages import RatchetMessage, decode_message
from hushchat.protocol.session import SessionRecord
from tests.support.clock import NOW
from tests.support.peers import Peer
from tests.support.reference import reference_hkdf

Peers = Callable[..., tuple[Peer, Peer]]


def reference_seal(mk: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """Double Ratchet section 5.2 ENCRYPT with hushchat's labels, from pyca's raw AES."""
    km = reference_hkdf(mk, bytes(32), b"hushchat_message_keys", 80)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(km[:32]), modes.CBC(km[64:80])).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    return ciphertext + hmac.digest(km[32:64], associated + ciphertext, "sha256")[:16]


def ratchet_of(peer: Peer) -> RatchetState:
    assert peer.record.current is not None
    return peer.record.current.ratchet


# ------------------------------------------------------------------ KDF chains, independently


def test_kdf_chains_match_independent_computation() -> None:
    root, dh_out, chain = bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32
    okm = reference_hkdf(dh_out, root, b"hushchat_ratchet_root", 64)
    assert kdf_rk(root, dh_out) == (okm[:32], okm[32:])
    assert kdf_ck(chain) == (
        hmac.digest(chain, b"\x01", "sha256"),
        hmac.digest(chain, b"\x02", "sha256"),
    )
    km = reference_hkdf(chain, bytes(32), b"hushchat_message_keys", 80)
    assert message_keys(chain) == (km[:32], km[32:64], km[64:80])
    assert seal(chain, b"plaintext", b"ad") == reference_seal(chain, b"plaintext", b"ad")
    # Pinned, so that a change of labels or layout on both sides is caught too.
    assert kdf_rk(root, dh_out)[1].hex() == (
        "230b9afad450d9c4d0db91e2c2eb3472f7e9e3411950554b5faeb77dd326c537"
    )
    assert seal(chain, b"plaintext", b"ad").hex() == (
        "631ae68c3a1030dcb71cdb39f44063af841a90f7e72bf845669e406118bc15ed"
    )


def test_first_messages_match_independent_computation() -> None:
    """Alice's first two messages, rebuilt from SK and her ratchet key alone."""
    shared, ad = bytes([7]) * 32, b"associated data"
    spk = X25519PrivateKey.from_private_bytes(bytes([9]) * 32)
    spk_public = spk.public_key().public_bytes_raw()
    ratchet_private = bytes([0x42]) * 32
    alice = RatchetState.initiator(shared, spk_public, p.ScriptedRandom([ratchet_private]))

    ratchet = X25519PrivateKey.from_private_bytes(ratchet_private)
    ratchet_public = ratchet.public_key().public_bytes_raw()
    dh_out = ratchet.exchange(X25519PublicKey.from_public_bytes(spk_public))
    chain = reference_hkdf(dh_out, shared, b"hushchat_ratchet_root", 64)[32:]
    for n, plaintext in enumerate([b"first", b"second"]):
        header, body = alice.encrypt(plaintext, ad)
        assert header == msgpack.packb([PROTOCOL_VERSION, ratchet_public, 0, n], use_bin_type=True)
        mk = hmac.digest(chain, b"\x01", "sha256")
        assert body == reference_seal(mk, plaintext, ad + header)
        chain = hmac.digest(chain, b"\x02", "sha256")

    bob = RatchetState.responder(shared, spk)
    header, body = RatchetState.initiator(
        shared, spk_public, p.ScriptedRandom([ratchet_private])
    ).encrypt(b"first", ad)
    assert bob.decrypt(header, body, ad, rng=p.SeededRandom(b"b")) == b"first"


def test_header_encoding() -> None:
    key = X25519PrivateKey.from_private_bytes(bytes(32)).public_key().public_bytes_raw()
    header = Header(key, 3, 2**32 - 1)
    assert Header.decode(header.encode()) == header
    with pytest.raises(DecodeError):
        Header.decode(msgpack.packb([PROTOCOL_VERSION, key, 3, 2**32], use_bin_type=True))
    with pytest.raises(UnknownVersion):
        Header.decode(msgpack.packb([PROTOCOL_VERSION + 1, key, 3, 4], use_bin_type=True))
    with pytest.raises(InvalidKey):
        Header.decode(
            msgpack.packb([PROTOCOL_VERSION, key[:31] + b"\x80", 3, 4], use_bin_type=True)
        )


# ------------------------------------------------------------------ ordering


def test_in_order_both_directions(peers: Peers) -> None:
    alice, bob = peers(established=True)
    for round_ in range(5):
        for i in range(round_ + 1):
            text = b"alice %d.%d" % (round_, i)
            assert bob.decrypt(alice.encrypt(text)).plaintext == text
        text = b"bob %d" % round_
        assert alice.decrypt(bob.encrypt(text)).plaintext == text
    for text in [b"", bytes(MAX_PLAINTEXT_SIZE)]:
        assert bob.decrypt(alice.encrypt(text)).plaintext == text


def test_a_loaded_record_loads_its_ratchet_key_only_when_it_needs_it(peers: Peers) -> None:
    """Loading keeps the ratchet private key as bytes: decrypting on a chain the record has
    and saving again never loads it; a DH step or a send does, with the same results."""
    alice, bob = peers(established=True)
    first, second = alice.encrypt(b"one"), alice.encrypt(b"two")
    assert bob.decrypt(first).plaintext == b"one"
    eager = SessionRecord.from_bytes(bob.record.to_bytes())
    ratchet_of_record = eager.current
    assert ratchet_of_record is not None
    assert ratchet_of_record.ratchet.self_private is not None  # loaded, as before
    bob.record = SessionRecord.from_bytes(bob.record.to_bytes())
    assert bob.decrypt(second).plaintext == b"two"
    assert ratchet_of(bob)._private is None and ratchet_of(bob)._public is None
    eager.decrypt(second, bob.account, now=NOW, rng=bob.rng, **bob.parties)
    assert bob.record.to_bytes() == eager.to_bytes()
    # A reply needs the public key; the next DH step needs the private key.
    assert alice.decrypt(bob.encrypt(b"three")).plaintext == b"three"
    assert ratchet_of(bob)._public is not None
    bob.record = SessionRecord.from_bytes(bob.record.to_bytes())
    assert bob.decrypt(alice.encrypt(b"four")).plaintext == b"four"
    assert ratchet_of(bob)._private is not None


def test_out_of_order_within_a_chain(peers: Peers) -> None:
    alice, bob = peers(established=True)
    sent = [alice.encrypt(b"%d" % i) for i in range(6)]
    for i in [3, 0, 5, 1, 4, 2]:
        assert bob.decrypt(sent[i]).plaintext == b"%d" % i
    assert ratchet_of(bob).skipped == {}


def test_out_of_order_across_ratchet_steps(peers: Peers) -> None:
    """A late message of each of four earlier receiving chains still decrypts."""
    alice, bob = peers(established=True)
    late = []
    for step in range(4):
        late.append(alice.encrypt(b"late %d" % step))
        assert bob.decrypt(alice.encrypt(b"on time %d" % step)).plaintext == b"on time %d" % step
        assert alice.decrypt(bob.encrypt(b"step")).plaintext == b"step"
    assert len({decode_message(m).header for m in late}) == 4  # type: ignore[union-attr]
    for step in reversed(range(4)):
        assert bob.decrypt(late[step]).plaintext == b"late %d" % step
    assert ratchet_of(bob).skipped == {}


def test_late_initial_messages_after_the_reply(peers: Peers) -> None:
    alice, bob = peers()
    first = [alice.encrypt(b"%d" % i) for i in range(3)]
    assert bob.decrypt(first[1]).new_session
    assert alice.decrypt(bob.encrypt(b"reply")).plaintext == b"reply"
    assert bob.decrypt(alice.encrypt(b"new chain")).plaintext == b"new chain"
    assert bob.decrypt(first[2]).plaintext == b"2"
    assert bob.decrypt(first[0]).plaintext == b"0"


# ------------------------------------------------------------------ skipped keys and duplicates


def test_skipped_key_is_used_once_then_deleted(peers: Peers) -> None:
    alice, bob = peers(established=True)
    sent = [alice.encrypt(b"%d" % i) for i in range(3)]
    bob.decrypt(sent[2])
    assert len(ratchet_of(bob).skipped) == 2
    assert bob.decrypt(sent[0]).plaintext == b"0"
    assert len(ratchet_of(bob).skipped) == 1
    bob.assert_refused(sent[0], DuplicateMessage)
    assert bob.decrypt(sent[1]).plaintext == b"1"
    assert ratchet_of(bob).skipped == {}


def test_duplicates_are_reported_as_such(peers: Peers) -> None:
    alice, bob = peers(established=True)
    old_chain = alice.encrypt(b"old chain")
    bob.decrypt(old_chain)
    bob.assert_refused(old_chain, DuplicateMessage)
    bob.decrypt(alice.encrypt(b"filler"))
    alice.decrypt(bob.encrypt(b"step"))
    current = alice.encrypt(b"current chain")
    bob.decrypt(current)
    bob.assert_refused(current, DuplicateMessage)
    # A finished chain whose key is gone: still a duplicate, not a new ratchet step.
    bob.assert_refused(old_chain, DuplicateMessage)
    # A tampered duplicate is a duplicate too (the counter is read before the MAC).
    message = decode_message(current)
    forged = RatchetMessage(message.header, bytes(len(message.body))).encode()  # type: ignore[union-attr]
    bob.assert_refused(forged, DuplicateMessage)


def test_too_far_in_future_within_a_chain(peers: Peers) -> None:
    alice, bob = peers(established=True)
    sent = [alice.encrypt(b"%d" % i) for i in range(7)]
    bob.assert_refused(sent[6], TooFarInFuture, max_skip=5)
    assert bob.decrypt(sent[5], max_skip=5).plaintext == b"5"
    for i in [6, 0, 4]:
        assert bob.decrypt(sent[i], max_skip=5).plaintext == b"%d" % i


def test_too_far_in_future_across_a_ratchet_step(peers: Peers) -> None:
    """The limit also applies to the keys left on the previous chain (up to PN)."""
    alice, bob = peers(established=True)
    bob.decrypt(alice.encrypt(b"start of a chain"))
    held = [alice.encrypt(b"held %d" % i) for i in range(7)]
    assert alice.decrypt(bob.encrypt(b"step")).plaintext == b"step"
    after = alice.encrypt(b"after the step")
    header = Header.decode(decode_message(after).header)  # type: ignore[union-attr]
    assert (header.previous_chain_length, header.message_number) == (8, 0)
    bob.assert_refused(after, TooFarInFuture, max_skip=6)
    assert bob.decrypt(after, max_skip=7).plaintext == b"after the step"
    for i, message in enumerate(held):
        assert bob.decrypt(message).plaintext == b"held %d" % i


def test_default_skip_limit(peers: Peers) -> None:
    alice, bob = peers(established=True)
    sent = [alice.encrypt(b"%d" % i) for i in range(MAX_SKIP + 2)]
    bob.assert_refused(sent[MAX_SKIP + 1], TooFarInFuture)
    assert bob.decrypt(sent[MAX_SKIP]).plaintext == b"%d" % MAX_SKIP
    assert len(ratchet_of(bob).skipped) == MAX_SKIP
    assert bob.decrypt(sent[MAX_SKIP + 1]).plaintext == b"%d" % (MAX_SKIP + 1)
    assert bob.decrypt(sent[0]).plaintext == b"0"


def test_stored_keys_cap_evicts_the_oldest(peers: Peers) -> None:
    alice, bob = peers(established=True)
    first_chain = [alice.encrypt(b"a%d" % i) for i in range(4)]
    bob.decrypt(first_chain[3], max_skipped_keys=4)  # stores a0 a1 a2
    alice.decrypt(bob.encrypt(b"step"))
    second_chain = [alice.encrypt(b"b%d" % i) for i in range(3)]
    bob.decrypt(second_chain[2], max_skipped_keys=4)  # stores b0 b1, evicting a0
    assert len(ratchet_of(bob).skipped) == 4
    bob.assert_refused(first_chain[0], DuplicateMessage)
    for message, text in [(first_chain[1], b"a1"), (second_chain[0], b"b0")]:
        assert bob.decrypt(message, max_skipped_keys=4).plaintext == text
    third = alice.encrypt(b"b3")
    fourth = [alice.encrypt(b"b%d" % i) for i in range(4, 8)]
    bob.decrypt(fourth[-1], max_skipped_keys=4)  # stores b3..b6: a2 and b1 go
    bob.assert_refused(first_chain[2], DuplicateMessage)
    bob.assert_refused(second_chain[1], DuplicateMessage)
    assert bob.decrypt(third).plaintext == b"b3"


# ------------------------------------------------------------------ refused input changes nothing


def test_tampered_messages_leave_the_record_unchanged(peers: Peers) -> None:
    alice, bob = peers(established=True)
    genuine = alice.encrypt(b"a message of a little more than one block")
    for bit in range(len(genuine) * 8):
        tampered = bytearray(genuine)
        tampered[bit // 8] ^= 1 << (bit % 8)
        bob.assert_refused(bytes(tampered), RemoteProtocolError)
    for length in range(len(genuine)):
        bob.assert_refused(genuine[:length], RemoteProtocolError)
    for extra in [b"\0", b"\xc0", genuine]:
        bob.assert_refused(genuine + extra, RemoteProtocolError)
    assert bob.decrypt(genuine).plaintext.startswith(b"a message")


def test_spliced_and_misdirected_messages_are_refused(peers: Peers) -> None:
    alice, bob = peers(established=True)
    one, two = alice.encrypt(b"one"), alice.encrypt(b"two")
    first, second = decode_message(one), decode_message(two)
    spliced = RatchetMessage(first.header, second.body).encode()  # type: ignore[union-attr]
    bob.assert_refused(spliced, BadMac)
    # Alice's message to Alice, and a message of another session (Carol's with Bob).
    alice.assert_refused(one, RemoteProtocolError)
    carol, _ = peers(established=True)
    bob.assert_refused(carol.encrypt(b"not for this record"), RemoteProtocolError)
    assert bob.decrypt(two).plaintext == b"two"
    assert bob.decrypt(one).plaintext == b"one"


def test_forged_ratchet_keys_are_refused(peers: Peers) -> None:
    alice, bob = peers()
    spk = bob.account.bundle("bob", 1).signed_prekey.public
    # Before any reply Alice's remote ratchet key is Bob's signed prekey, which
    # has no receiving chain (this raised AssertionError once).
    forged = RatchetMessage(Header(spk, 0, 0).encode(), bytes(32)).encode()
    alice.assert_refused(forged, InvalidKey)
    bob.decrypt(alice.encrypt(b"x"))
    alice.decrypt(bob.encrypt(b"y"))
    low_order = RatchetMessage(Header(bytes(32), 0, 0).encode(), bytes(32)).encode()
    bob.assert_refused(low_order, NonContributoryKey)
    alice.assert_refused(forged, RemoteProtocolError)


def test_responder_cannot_send_first(peers: Peers) -> None:
    _, bob = peers()
    with pytest.raises(InvalidState):
        bob.encrypt(b"too early")
    state = RatchetState.responder(bytes(32), X25519PrivateKey.from_private_bytes(bytes(32)))
    with pytest.raises(InvalidState):
        state.encrypt(b"too early", b"")


# ------------------------------------------------------------------ forward secrecy, healing


def test_captured_state_cannot_decrypt_what_was_already_decrypted(peers: Peers) -> None:
    alice, bob = peers(established=True)
    in_order = alice.encrypt(b"in order")
    late = alice.encrypt(b"late")
    last = alice.encrypt(b"last")
    for message in [in_order, last, late]:
        bob.decrypt(message)
    bob.decrypt(alice.encrypt(b"more"))
    alice.decrypt(bob.encrypt(b"step"))
    bob.decrypt(alice.encrypt(b"next chain"))
    captured = SessionRecord.from_bytes(bob.record.to_bytes())
    for message in [in_order, late, last]:
        with pytest.raises(DuplicateMessage):
            captured.decrypt(message, bob.account, now=0, rng=bob.rng, **bob.parties)


def test_post_compromise_healing(peers: Peers) -> None:
    alice, bob = peers(established=True)
    bob.decrypt(alice.encrypt(b"m1"))
    attacker = SessionRecord.from_bytes(bob.record.to_bytes())

    def attacker_decrypts(data: bytes) -> bytes:
        eve = p.SeededRandom(b"eve")
        return attacker.decrypt(data, bob.account, now=0, rng=eve, **bob.parties).plaintext

    def deliver(data: bytes, to: Peer) -> None:
        to.decrypt(data)

    # The captured receiving chain is exposed ...
    m2 = alice.encrypt(b"m2")
    assert attacker_decrypts(m2) == b"m2"
    deliver(m2, bob)
    # ... and so is Alice's next chain, agreed with Bob's captured ratchet key ...
    deliver(bob.encrypt(b"r1"), alice)
    m3 = alice.encrypt(b"m3")
    assert attacker_decrypts(m3) == b"m3"
    deliver(m3, bob)
    # ... but once Bob has stepped with a fresh key and Alice after him, it heals.
    deliver(bob.encrypt(b"r2"), alice)
    m4 = alice.encrypt(b"m4")
    with pytest.raises(BadMac):
        attacker_decrypts(m4)
    assert bob.decrypt(m4).plaintext == b"m4"
