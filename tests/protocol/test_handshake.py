"""X3DH and PQXDH: agreement, the shared secret against an independent computation, and
every way an initial message or a bundle is refused (with state left untouched)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from hushchat.protocol import primitives as p
from hushchat.protocol.account import Account
from hushchat.protocol.consts import (
    MAX_REMEMBERED_BASE_KEYS,
    MAX_UNACKNOWLEDGED_SESSION_AGE,
    SIGNED_PREKEY_GRACE_PERIOD,
)
from hushchat.protocol.double_ratchet import Header
from hushchat.protocol.errors import (
    BadMac,
    BadSignature,
    DuplicateMessage,
    InvalidArgument,
    InvalidKey,
    InvalidState,
    NonContributoryKey,
    ReplayedHandshake,
    UnknownPreKey,
    UntrustedIdentity,
)
from hushchat.protocol.keys import IdentityKeyPair, encode_mlkem768, encode_x25519
from hushchat.protocol.messages import PreKeyMessage, RatchetMessage, decode_message
from hushchat.protocol.pqxdh import Party, initiate, respond
from hushchat.protocol.prekeys import (
    KemPreKeyPublic,
    OneTimePreKeyPublic,
    PreKeyBundle,
    SignedPreKeyPublic,
)
from hushchat.protocol.session import Session
from tests.support.clock import NOW
from tests.support.peers import Peer, party
from tests.support.reference import P, reference_hkdf

if TYPE_CHECKING:
    from tests.support.reference import Curve25519

Peers = Callable[..., tuple[Peer, Peer]]

# Canonical u-coordinates of small order (libsodium's blocklist): 0, 1, the two
# points of order 8, and p - 1. Every DH with them is all zero.
LOW_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]
VARIANTS = [(True, True), (True, False), (False, True), (False, False)]
ALICE_PARTY, BOB_PARTY = party("alice"), party("bob")
VARIANT_IDS = ["pqxdh-opk", "pqxdh", "x3dh-opk", "x3dh"]


def prekey_message(data: bytes) -> PreKeyMessage:
    message = decode_message(data)
    assert isinstance(message, PreKeyMessage)
    return message


def outbound(account: Account, bundle: PreKeyBundle, **kwargs: Any) -> Session:
    """Alice's session with the bundle's device (alice.1 to whoever the bundle names)."""
    kwargs.setdefault("now", NOW)
    remote = party(bundle.user_id, bundle.device_id)
    return account.create_outbound_session(bundle, local=party("alice"), remote=remote, **kwargs)


def with_handshake(data: bytes, **changes: object) -> bytes:
    """The same initial message with handshake fields replaced (ratchet part untouched)."""
    message = prekey_message(data)
    handshake = dataclasses.replace(message.handshake, **changes)  # type: ignore[arg-type]
    return PreKeyMessage(handshake, message.message).encode()


# ------------------------------------------------------------------ agreement


@pytest.mark.parametrize(("post_quantum", "one_time"), VARIANTS, ids=VARIANT_IDS)
def test_both_sides_agree(peers: Peers, post_quantum: bool, one_time: bool) -> None:
    alice, bob = peers(post_quantum=post_quantum, one_time=one_time)
    opks_before = bob.account.one_time_prekey_count
    first = alice.encrypt(b"hello bob")
    handshake = prekey_message(first).handshake
    assert handshake.is_post_quantum == post_quantum
    assert (handshake.kem_prekey_id is not None) == post_quantum
    assert (handshake.one_time_prekey_id is not None) == one_time

    result = bob.decrypt(first)
    assert (result.plaintext, result.new_session) == (b"hello bob", True)
    assert bob.account.one_time_prekey_count == opks_before - one_time
    reply = bob.encrypt(b"hello alice")
    assert isinstance(decode_message(reply), RatchetMessage)
    assert alice.decrypt(reply).plaintext == b"hello alice"

    a, b = alice.record.current, bob.record.current
    assert a is not None and b is not None
    assert a.base_key == b.base_key == handshake.base_key
    assert a.associated_data == b.associated_data
    assert a.remote_identity == bob.account.identity.public
    assert b.remote_identity == alice.account.identity.public
    for i in range(3):
        assert bob.decrypt(alice.encrypt(b"a%d" % i)).plaintext == b"a%d" % i
        assert alice.decrypt(bob.encrypt(b"b%d" % i)).plaintext == b"b%d" % i


def test_initiator_repeats_the_handshake_until_it_hears_back(peers: Peers) -> None:
    alice, bob = peers()
    in_flight = [alice.encrypt(b"m%d" % i) for i in range(3)]
    assert all(isinstance(decode_message(m), PreKeyMessage) for m in in_flight)
    assert len({prekey_message(m).handshake for m in in_flight}) == 1
    assert bob.decrypt(in_flight[0]).new_session
    assert alice.record.current is not None and not alice.record.current.acknowledged
    assert alice.decrypt(bob.encrypt(b"ack")).plaintext == b"ack"
    assert alice.record.current.acknowledged
    assert isinstance(decode_message(alice.encrypt(b"after")), RatchetMessage)
    # Initial messages still in flight go to the session their base key names.
    for i in (2, 1):
        result = bob.decrypt(in_flight[i])
        assert (result.plaintext, result.new_session) == (b"m%d" % i, False)
    assert len(bob.record.sessions()) == 1


def test_last_resort_kem_prekey_stays_usable(
    peers: Peers, make_account: Callable[..., Account]
) -> None:
    alice, bob = peers(post_quantum=True, one_time=False)
    first = alice.encrypt(b"one")
    assert bob.decrypt(first).plaintext == b"one"
    carol = Peer(make_account(), bob.rng, me="carol", peer="bob")
    bundle = bob.account.bundle("bob", 1, one_time=False)
    assert bundle.kem_is_last_resort
    assert bundle.kem_prekey is not None
    assert bundle.kem_prekey.key_id == prekey_message(first).handshake.kem_prekey_id
    carol.start(bundle)
    other_record = Peer(bob.account, bob.rng, me="bob", peer="carol")
    assert other_record.decrypt(carol.encrypt(b"two")).plaintext == b"two"


# ------------------------------------------------------------------ SK, independently


def converted_private(seed: bytes) -> X25519PrivateKey:
    """An Ed25519 seed's X25519 private key: SHA-512(seed)[:32] (pyca clamps it)."""
    return X25519PrivateKey.from_private_bytes(hashlib.sha512(seed).digest()[:32])


def dh(private: X25519PrivateKey, public_of: X25519PrivateKey | bytes) -> bytes:
    if isinstance(public_of, X25519PrivateKey):
        public_of = public_of.public_key().public_bytes_raw()
    return private.exchange(X25519PublicKey.from_public_bytes(public_of))


ALICE_SEED, BOB_SEED = bytes([0xA1]) * 32, bytes([0xB0]) * 32
SPK = X25519PrivateKey.from_private_bytes(bytes([0x51]) * 32)
OPK = X25519PrivateKey.from_private_bytes(bytes([0x0F]) * 32)
BASE = bytes([0xBA]) * 32
KEM = p.mlkem768_private_from_seed(bytes([0x4B]) * 64)
# Pinned outputs of the independent computation below, for fixed inputs and a
# scripted KEM secret (catches a change of constants on both sides at once).
PINNED_SK = {
    (True, True): "6997ba7492fe42475d567e39f514f522e7df46e76a998c68918a59bda9363f09",
    (True, False): "20eebc577af0b6f5437f269c8fc101c35e40e028c3a99f14d69187f076384940",
    (False, True): "b0bf3b8145cb02fc1a2e90252a03fa4449664aa78c45fbb8e64e9dc2d4db1270",
    (False, False): "c0d14b338ed81435bac9c2843dff9477b04d76424fdc072090d1c61dba2bd06d",
}


def fixed_bundle(bob: IdentityKeyPair, *, one_time: bool) -> PreKeyBundle:
    spk = SPK.public_key().public_bytes_raw()
    kem = p.mlkem768_public_bytes(KEM)
    return PreKeyBundle(
        "bob",
        1,
        bob.public,
        SignedPreKeyPublic(7, spk, bob.sign(encode_x25519(spk))),
        OneTimePreKeyPublic(8, OPK.public_key().public_bytes_raw()) if one_time else None,
        KemPreKeyPublic(9, kem, bob.sign(encode_mlkem768(kem))),
        False,
    )


def independent_sk(post_quantum: bool, one_time: bool, kem_secret: bytes) -> bytes:
    alice_dh, bob_dh = converted_private(ALICE_SEED), converted_private(BOB_SEED)
    base = X25519PrivateKey.from_private_bytes(BASE)
    km = dh(alice_dh, SPK) + dh(base, bob_dh) + dh(base, SPK)
    if one_time:
        km += dh(base, OPK)
    info = b"hushchat_X25519_SHA-256"
    if post_quantum:
        km += kem_secret
        info += b"_ML-KEM-768"
    return reference_hkdf(b"\xff" * 32 + km, bytes(32), info, 32)


@pytest.mark.parametrize(("post_quantum", "one_time"), VARIANTS, ids=VARIANT_IDS)
def test_shared_secret_matches_independent_computation(post_quantum: bool, one_time: bool) -> None:
    alice, bob = IdentityKeyPair(ALICE_SEED), IdentityKeyPair(BOB_SEED)
    bundle = fixed_bundle(bob, one_time=one_time)
    kem_secret, kem_ciphertext = p.SYSTEM_RANDOM.encapsulate(p.mlkem768_public_bytes(KEM))
    rng = p.ScriptedRandom([BASE], [(kem_secret, kem_ciphertext)])
    header, shared = initiate(
        alice, bundle, local=ALICE_PARTY, remote=BOB_PARTY, post_quantum=post_quantum, rng=rng
    )

    assert shared.secret == independent_sk(post_quantum, one_time, kem_secret)
    # Both identity keys, then whose each device is (msgpack's own packer, not ours).
    parties = msgpack.packb(
        ["alice", 1, ALICE_PARTY.user_identity, "bob", 1, BOB_PARTY.user_identity],
        use_bin_type=True,
    )
    identities = b"\x06" + alice.public.ed25519 + b"\x06" + bob.public.ed25519
    assert shared.associated_data == identities + parties
    assert (
        header.base_key == X25519PrivateKey.from_private_bytes(BASE).public_key().public_bytes_raw()
    )
    assert (header.signed_prekey_id, header.one_time_prekey_id) == (7, 8 if one_time else None)
    assert header.kem_prekey_id == (9 if post_quantum else None)
    assert header.kem_ciphertext == (kem_ciphertext if post_quantum else None)
    # Bob's side agrees (real decapsulation).
    bob_shared = respond(
        bob,
        header,
        local=BOB_PARTY,
        remote=ALICE_PARTY,
        signed_prekey=SPK,
        one_time_prekey=OPK if one_time else None,
        kem_prekey=KEM if post_quantum else None,
    )
    assert bob_shared == shared


@pytest.mark.parametrize(("post_quantum", "one_time"), VARIANTS, ids=VARIANT_IDS)
def test_shared_secret_pinned(post_quantum: bool, one_time: bool) -> None:
    alice, bob = IdentityKeyPair(ALICE_SEED), IdentityKeyPair(BOB_SEED)
    rng = p.ScriptedRandom([BASE], [(bytes([0x55]) * 32, bytes(1088))])
    bundle = fixed_bundle(bob, one_time=one_time)
    _, shared = initiate(
        alice, bundle, local=ALICE_PARTY, remote=BOB_PARTY, post_quantum=post_quantum, rng=rng
    )
    expected = independent_sk(post_quantum, one_time, bytes([0x55]) * 32)
    assert shared.secret == expected
    assert expected.hex() == PINNED_SK[(post_quantum, one_time)]


# ------------------------------------------------------------------ bundles Alice refuses


def resigned(
    bundle: PreKeyBundle,
    bob: IdentityKeyPair,
    *,
    spk: bytes | None = None,
    opk: bytes | None = None,
) -> PreKeyBundle:
    """The bundle with its signed or one-time prekey replaced, validly signed by Bob."""
    if spk is not None:
        signed = SignedPreKeyPublic(bundle.signed_prekey.key_id, spk, bob.sign(encode_x25519(spk)))
        bundle = dataclasses.replace(bundle, signed_prekey=signed)
    if opk is not None:
        bundle = dataclasses.replace(bundle, one_time_prekey=OneTimePreKeyPublic(8, opk))
    return bundle


def test_bad_prekey_signatures_are_refused(make_account: Callable[..., Account]) -> None:
    alice, bob, mallory = make_account(), make_account(), make_account()
    bundle = bob.bundle("bob", 1)
    assert bundle.kem_prekey is not None
    spk, kem = bundle.signed_prekey, bundle.kem_prekey
    flipped_spk = dataclasses.replace(
        spk, signature=bytes([spk.signature[0] ^ 1]) + spk.signature[1:]
    )
    flipped_kem = dataclasses.replace(
        kem, signature=kem.signature[:-1] + bytes([kem.signature[-1] ^ 0x80])
    )
    other_key = dataclasses.replace(spk, public=mallory.bundle("m", 1).signed_prekey.public)
    bad = [
        dataclasses.replace(bundle, signed_prekey=flipped_spk),
        dataclasses.replace(bundle, signed_prekey=other_key),
        dataclasses.replace(bundle, kem_prekey=flipped_kem),
        # Mallory's identity over Bob's prekeys: none of the signatures are his.
        dataclasses.replace(bundle, identity=mallory.identity.public),
    ]
    for candidate in bad:
        for post_quantum in (True, False):
            with pytest.raises(BadSignature):
                outbound(alice, candidate, now=NOW, post_quantum=post_quantum)
    with pytest.raises(InvalidArgument):
        outbound(alice, bob.bundle("bob", 1, post_quantum=False), now=NOW)


@pytest.mark.parametrize("low_order", LOW_ORDER)
def test_low_order_prekeys_in_a_bundle_are_refused(
    low_order: str, make_account: Callable[..., Account]
) -> None:
    alice, bob = make_account(), make_account()
    bundle = bob.bundle("bob", 1)
    for candidate in [
        resigned(bundle, bob.identity, spk=bytes.fromhex(low_order)),
        resigned(bundle, bob.identity, opk=bytes.fromhex(low_order)),
    ]:
        candidate.verify()  # properly signed: only the DH refuses it
        with pytest.raises(NonContributoryKey):
            outbound(alice, candidate, now=NOW)


def test_non_canonical_prekeys_in_a_bundle_are_refused(
    make_account: Callable[..., Account],
) -> None:
    alice, bob = make_account(), make_account()
    bundle = bob.bundle("bob", 1)
    spk = bundle.signed_prekey.public
    for bad in [
        spk[:31] + bytes([spk[31] | 0x80]),
        P.to_bytes(32, "little"),
        (2**255 - 1).to_bytes(32, "little"),
    ]:
        for candidate in [
            resigned(bundle, bob.identity, spk=bad),
            resigned(bundle, bob.identity, opk=bad),
        ]:
            with pytest.raises(InvalidKey):
                outbound(alice, candidate, now=NOW)
            with pytest.raises(InvalidKey):
                PreKeyBundle.decode(candidate.encode())


def test_undecodable_kem_prekey_is_refused(make_account: Callable[..., Account]) -> None:
    alice, bob = make_account(), make_account()
    bundle = bob.bundle("bob", 1)
    garbage = b"\xff" * 1184  # every coefficient >= q: not an ML-KEM-768 encapsulation key
    kem = KemPreKeyPublic(9, garbage, bob.identity.sign(encode_mlkem768(garbage)))
    candidate = dataclasses.replace(bundle, kem_prekey=kem)
    candidate.verify()
    with pytest.raises(InvalidKey):
        outbound(alice, candidate, now=NOW)


def test_bundle_round_trip(make_account: Callable[..., Account]) -> None:
    bob = make_account()
    for one_time in (True, False):
        for post_quantum in (True, False):
            bundle = bob.bundle("bob", 7, one_time=one_time, post_quantum=post_quantum)
            decoded = PreKeyBundle.decode(bundle.encode())
            assert decoded == bundle
            decoded.verify()
            assert decoded.encode() == bundle.encode()


# ------------------------------------------------------------------ initial messages Bob refuses


@pytest.mark.parametrize("low_order", LOW_ORDER)
def test_low_order_base_key_is_refused(peers: Peers, low_order: str) -> None:
    alice, bob = peers()
    first = alice.encrypt(b"x")
    bob.assert_refused(with_handshake(first, base_key=bytes.fromhex(low_order)), InvalidKey)
    assert bob.decrypt(first).plaintext == b"x"


@pytest.mark.parametrize("torsion", range(1, 8))
@pytest.mark.parametrize("one_time", [True, False], ids=["opk", "no-opk"])
def test_torsioned_base_key_is_refused(
    peers: Peers, curve25519: Curve25519, torsion: int, one_time: bool
) -> None:
    """A torsioned base key agrees on the same SK: without the subgroup check a replay
    with it evaded replay detection and installed a duplicate session."""
    alice, bob = peers(one_time=one_time)
    first = alice.encrypt(b"x")
    base_key = prekey_message(first).handshake.base_key
    torsioned = with_handshake(first, base_key=curve25519.add_torsion_to_u(base_key, torsion))
    bob.assert_refused(torsioned, InvalidKey)
    assert bob.decrypt(first).plaintext == b"x"
    # A replay with one-time prekey finds it spent; without, the base key is what stops it.
    error = UnknownPreKey if one_time else InvalidKey
    bob.assert_refused(torsioned, error)
    Peer(bob.account, bob.rng, me="bob", peer="alice").assert_refused(torsioned, error)


def test_non_canonical_base_key_is_refused(peers: Peers) -> None:
    alice, bob = peers()
    first = alice.encrypt(b"x")
    base_key = prekey_message(first).handshake.base_key
    for bad in [
        base_key[:31] + bytes([base_key[31] | 0x80]),
        P.to_bytes(32, "little"),
        (P + 5).to_bytes(32, "little"),
    ]:
        bob.assert_refused(with_handshake(first, base_key=bad), InvalidKey)


@pytest.mark.parametrize("low_order", LOW_ORDER)
def test_low_order_ratchet_key_in_an_initial_message_is_refused(
    peers: Peers, low_order: str
) -> None:
    alice, bob = peers()
    message = prekey_message(alice.encrypt(b"x"))
    forged = PreKeyMessage(
        message.handshake,
        RatchetMessage(Header(bytes.fromhex(low_order), 0, 0).encode(), message.message.body),
    ).encode()
    bob.assert_refused(forged, NonContributoryKey)


def test_unknown_prekey_ids_are_refused(peers: Peers) -> None:
    alice, bob = peers()
    first = alice.encrypt(b"x")
    handshake = prekey_message(first).handshake
    assert handshake.one_time_prekey_id is not None and handshake.kem_prekey_id is not None
    for changes in [
        {"signed_prekey_id": handshake.signed_prekey_id + 1000},
        {"one_time_prekey_id": handshake.one_time_prekey_id + 1000},
        {"kem_prekey_id": handshake.kem_prekey_id + 1000},
        # The signed prekey's id is not a one-time prekey's.
        {"one_time_prekey_id": handshake.signed_prekey_id},
    ]:
        bob.assert_refused(with_handshake(first, **changes), UnknownPreKey)
    assert bob.decrypt(first).plaintext == b"x"


def test_used_one_time_prekey_is_refused(peers: Peers) -> None:
    alice, bob = peers(one_time=True)
    bundle = bob.account.bundle("bob", 1)
    first = alice.encrypt(b"x")
    assert bob.decrypt(first).new_session
    # The same message to a record that lost the session, and a second
    # session from a bundle handed out twice: the one-time prekey is gone.
    Peer(bob.account, bob.rng, me="bob", peer="alice").assert_refused(first, UnknownPreKey)
    again = Peer(alice.account, alice.rng, me="alice", peer="bob")
    again.start(bundle)
    bob.assert_refused(again.encrypt(b"y"), UnknownPreKey)


def test_one_time_prekeys_beyond_the_limit_go_oldest_first(peers: Peers) -> None:
    """New batches past ``max_kept`` delete the oldest one-time prekeys of each kind, those
    the relay handed out first: an initial message built on one is refused as on a spent
    key, changing nothing, and a bundle of the keys kept still opens a session."""
    alice, bob = peers(one_time=True)
    first = alice.encrypt(b"x")
    bob.account.generate_one_time_prekeys(3, rng=bob.rng, max_kept=3)
    assert bob.account.one_time_prekey_count == 3
    assert len(bob.account.prekey_upload().one_time_kem_prekeys) == 3
    bob.assert_refused(first, UnknownPreKey)
    again = Peer(alice.account, alice.rng, me="alice", peer="bob")
    again.start(bob.account.bundle("bob", 1))
    assert bob.decrypt(again.encrypt(b"y")).plaintext == b"y"
    with pytest.raises(InvalidArgument):
        bob.account.generate_one_time_prekeys(1, rng=bob.rng, max_kept=0)


@pytest.mark.parametrize("post_quantum", [True, False], ids=["pqxdh", "x3dh"])
def test_replayed_handshake_without_one_time_prekey(peers: Peers, post_quantum: bool) -> None:
    alice, bob = peers(post_quantum=post_quantum, one_time=False)
    first = alice.encrypt(b"x")
    assert bob.decrypt(first).new_session
    # Into the record holding the session: a duplicate of a decrypted message.
    bob.assert_refused(first, DuplicateMessage)
    # Into any other record: the account remembers the base key.
    Peer(bob.account, bob.rng, me="bob", peer="alice").assert_refused(first, ReplayedHandshake)
    # Later initial messages of the same handshake still reach the session.
    assert bob.decrypt(alice.encrypt(b"y")).plaintext == b"y"


@pytest.mark.parametrize(("post_quantum", "one_time"), VARIANTS, ids=VARIANT_IDS)
def test_one_time_prekeys_are_spent_only_by_a_successful_decrypt(
    peers: Peers, post_quantum: bool, one_time: bool
) -> None:
    alice, bob = peers(post_quantum=post_quantum, one_time=one_time)
    first = alice.encrypt(b"genuine, and long enough for three AES blocks")
    message = prekey_message(first)
    body = bytearray(message.message.body)
    body[-1] ^= 1
    tampered = [
        PreKeyMessage(
            message.handshake, RatchetMessage(message.message.header, bytes(body))
        ).encode(),
        PreKeyMessage(
            message.handshake, RatchetMessage(message.message.header, bytes(body[:-16]))
        ).encode(),
    ]
    if post_quantum:
        assert message.handshake.kem_ciphertext is not None
        ciphertext = bytearray(message.handshake.kem_ciphertext)
        ciphertext[100] ^= 4  # implicit rejection: a different secret, then a bad MAC
        tampered.append(with_handshake(first, kem_ciphertext=bytes(ciphertext)))
    tampered.append(with_handshake(first, identity=IdentityKeyPair(bytes(32)).public))
    for data in tampered:
        bob.assert_refused(data, BadMac)
    opks = bob.account.one_time_prekey_count
    assert bob.decrypt(first).plaintext.startswith(b"genuine")
    assert bob.account.one_time_prekey_count == opks - one_time


def test_signed_prekey_rotation_and_pruning(peers: Peers) -> None:
    alice, bob = peers(one_time=False)
    first = alice.encrypt(b"x")
    bob.account.rotate_signed_prekey(now=NOW + 10, rng=bob.rng)
    # The old signed prekey answers until the grace period after rotation ends.
    bob.account.prune(now=NOW + 10 + SIGNED_PREKEY_GRACE_PERIOD)
    assert Peer(bob.account, bob.rng, me="bob", peer="alice").decrypt(first).plaintext == b"x"
    bob.account.prune(now=NOW + 11 + SIGNED_PREKEY_GRACE_PERIOD)
    Peer(bob.account, bob.rng, me="bob", peer="alice").assert_refused(first, UnknownPreKey)
    bob.assert_refused(alice.encrypt(b"y"), UnknownPreKey)


def test_a_changed_identity_needs_the_apps_consent(
    peers: Peers, make_account: Callable[..., Account]
) -> None:
    alice, bob = peers()
    assert bob.decrypt(alice.encrypt(b"x")).new_session
    # Alice's device reinstalled by mallory: a new identity key for alice.1.
    mallory = Peer(make_account(), alice.rng, me="alice", peer="bob")
    mallory.start(bob.account.bundle("bob", 1))
    impostor = mallory.encrypt(b"trust me")
    bob.assert_refused(impostor, UntrustedIdentity)
    result = bob.decrypt(impostor, trust_new_identity=True)
    assert (result.plaintext, result.new_session) == (b"trust me", True)
    assert bob.record.remote_identity == mallory.account.identity.public
    assert bob.record.previous == []


def test_unanswered_session_expires_for_sending(peers: Peers) -> None:
    alice, bob = peers()
    late = NOW + MAX_UNACKNOWLEDGED_SESSION_AGE
    first = alice.encrypt(b"x", now=late)
    with pytest.raises(InvalidState):
        alice.encrypt(b"y", now=late + 1)
    assert not alice.record.has_usable_session(late + 1)
    bob.decrypt(first)
    alice.decrypt(bob.encrypt(b"ack"))
    assert alice.record.has_usable_session(late + 10**6)
    assert bob.decrypt(alice.encrypt(b"z", now=late + 10**6)).plaintext == b"z"


# ------------------------------------------------------------------ whose the devices are


def test_a_session_binds_the_users_not_only_the_device_keys(peers: Peers) -> None:
    """A relay presents alice.1 as mallory.5 (under a list naming alice's key for mallory).

    Bob's keys are untouched and alice's message is genuine; only who Bob
    believes sent it differs. Nothing decrypts, and Bob's state is unchanged.
    """
    alice, bob = peers()
    first = alice.encrypt(b"from alice")
    mallory_user = party("mallory")
    for believed in (
        party("mallory", 5),
        party("alice", 2),
        Party("alice", 1, mallory_user.user_identity),
    ):
        as_someone_else = Peer(bob.account, bob.rng, me="bob", peer="alice")
        as_someone_else.remote = believed
        as_someone_else.assert_refused(first, BadMac)
    assert bob.decrypt(first).plaintext == b"from alice"


def test_a_session_is_bound_to_the_responder_the_initiator_meant(
    make_account: Callable[..., Account],
) -> None:
    """Bob writes to "mallory.5" whose list names alice's key; the relay hands it to alice.1."""
    alice_account, bob_account = make_account(), make_account()
    bob = Peer(bob_account, p.SeededRandom(b"bob"), me="bob", peer="mallory")
    bob.remote = party("mallory", 5)
    bob.start(alice_account.bundle("mallory", 5))
    alice = Peer(alice_account, p.SeededRandom(b"alice"), me="alice", peer="bob")
    alice.assert_refused(bob.encrypt(b"for mallory only"), BadMac)


def test_a_flood_of_initial_messages_is_remembered_in_bounded_memory(
    make_account: Callable[..., Account], rng: p.SeededRandom
) -> None:
    """A hostile peer (or the relay, replaying nothing) sends initial messages without a
    one-time prekey, each with a fresh base key, more than MAX_REMEMBERED_BASE_KEYS of
    them: bob remembers the newest MAX_REMEMBERED_BASE_KEYS, never more (spec 9.3)."""
    bob = make_account(one_time_prekeys=0)
    alice = make_account(one_time_prekeys=0)
    bundle = bob.bundle("bob", 1, one_time=False)
    base_keys = []
    for n in range(MAX_REMEMBERED_BASE_KEYS + 3):
        session = alice.create_outbound_session(
            bundle, local=ALICE_PARTY, remote=BOB_PARTY, now=NOW, post_quantum=False, rng=rng
        )
        message = decode_message(session.encrypt(b"%d" % n))
        assert isinstance(message, PreKeyMessage)
        bob.create_inbound_session(message, local=BOB_PARTY, remote=ALICE_PARTY, now=NOW, rng=rng)
        base_keys.append(message.handshake.base_key)
    remembered = [base_key for _, base_key in bob.remembered_base_keys]
    assert remembered == base_keys[-MAX_REMEMBERED_BASE_KEYS:]
