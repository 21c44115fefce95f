"""Sender Keys: libsignal's tests/groups.rs ported, plus wire, pickle and KAT checks."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import random
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from hushchat.protocol import consts
from hushchat.protocol import primitives as p
from hushchat.protocol.address import Address
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.errors import (
    BadSignature,
    DecodeError,
    DecryptionFailed,
    DuplicateMessage,
    InvalidArgument,
    InvalidKey,
    InvalidState,
    NoSenderKey,
    NotAMember,
    ProtocolError,
    SenderMismatch,
    StateError,
    TooFarInFuture,
    TooManySenderKeys,
    UnknownGroup,
    UnknownStateVersion,
    UnknownVersion,
)
from hushchat.protocol.group_cipher import OutboundSenderKey, SenderKeyRecord, SenderKeyStore
from hushchat.protocol.primitives import ScriptedRandom, SeededRandom
from hushchat.protocol.sender_keys import (
    SenderKeyDistributionMessage,
    SenderKeyMessage,
    signed_bytes,
)
from tests.support.clock import NOW
from tests.support.reference import SMALL_ORDER_KEY

# The device every test sender sends as (a chain is bound to its sender's address).
ALICE = Address("alice", 1)
MALLORY = Address("mallory", 1)
GROUP = bytes(range(16))
OTHER_GROUP = bytes(range(1, 17))
V = consts.SENDER_KEY_VERSION


def new_sender(name: bytes = b"alice", group: bytes = GROUP) -> OutboundSenderKey:
    return OutboundSenderKey.create(group, NOW, SeededRandom(name))


def receiver_of(sender: OutboundSenderKey) -> SenderKeyRecord:
    record = SenderKeyRecord(sender.group_id)
    record.process_distribution(sender.distribution_message(sender=ALICE), sender=ALICE)
    return record


def refused(
    record: SenderKeyRecord,
    error: type[ProtocolError],
    action: Callable[[SenderKeyRecord], object],
) -> None:
    """``action`` raises ``error`` and leaves the record byte-for-byte unchanged."""
    before = record.to_bytes()
    with pytest.raises(error):
        action(record)
    assert record.to_bytes() == before


def refuse_decrypt(
    record: SenderKeyRecord,
    message: bytes,
    error: type[ProtocolError],
    *,
    sender: Address = ALICE,
    **limits: int,
) -> None:
    refused(record, error, lambda r: r.decrypt(message, sender=sender, **limits))


def hmac256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def advanced(sender: OutboundSenderKey, steps: int) -> OutboundSenderKey:
    """The same chain ``steps`` iterations later, as if that many messages were lost."""
    version, group_id, chain_id, iteration, chain_key, seed, created_at = unpack(
        sender.to_bytes(), what="test"
    )
    for _ in range(steps):
        chain_key = hmac256(chain_key, b"\x02")
    return OutboundSenderKey.from_bytes(
        pack([version, group_id, chain_id, iteration + steps, chain_key, seed, created_at])
    )


def chain_key_of(sender: OutboundSenderKey) -> bytes:
    return SenderKeyDistributionMessage.decode(sender.distribution_message(sender=ALICE)).chain_key


def signing_seed_of(sender: OutboundSenderKey) -> bytes:
    seed: bytes = unpack(sender.to_bytes(), what="test")[5]
    return seed


def signed(sender: OutboundSenderKey, body: bytes, address: Address = ALICE) -> bytes:
    """``body`` signed as ``address`` with ``sender``'s real signing key (a forgery tool)."""
    key = p.ed25519_private_from_bytes(signing_seed_of(sender))
    return body + p.ed25519_sign(key, signed_bytes(address, body))


# ------------------------------------------------------------------ tests/groups.rs


def test_basic_ratchet() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    messages = [alice.encrypt(f"smert za smert {i}".encode(), sender=ALICE) for i in range(3)]
    assert bob.decrypt(messages[0], sender=ALICE) == b"smert za smert 0"
    refuse_decrypt(bob, messages[0], DuplicateMessage)
    assert bob.decrypt(messages[2], sender=ALICE) == b"smert za smert 2"
    assert bob.decrypt(messages[1], sender=ALICE) == b"smert za smert 1"
    for message in messages:
        refuse_decrypt(bob, message, DuplicateMessage)


def test_out_of_order() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    plaintexts = [f"message {i}".encode() for i in range(100)]
    messages = list(
        zip(plaintexts, [alice.encrypt(pt, sender=ALICE) for pt in plaintexts], strict=True)
    )
    random.Random(7).shuffle(messages)
    for plaintext, message in messages:
        assert bob.decrypt(message, sender=ALICE) == plaintext
    assert bob.chains[0].skipped_keys == 0


def test_too_far_in_the_future_with_a_small_limit() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    late = advanced(alice, 11).encrypt(b"too far", sender=ALICE)
    refuse_decrypt(bob, late, TooFarInFuture, max_forward_jump=10)
    in_reach = advanced(alice, 10).encrypt(b"just in reach", sender=ALICE)
    assert bob.decrypt(in_reach, max_forward_jump=10, sender=ALICE) == b"just in reach"


def test_too_far_in_the_future_with_the_default_limit() -> None:
    jump = consts.MAX_SENDER_KEY_FORWARD_JUMP
    alice = new_sender()
    bob = receiver_of(alice)
    refuse_decrypt(bob, advanced(alice, jump + 1).encrypt(b"too far", sender=ALICE), TooFarInFuture)
    assert (
        bob.decrypt(advanced(alice, jump).encrypt(b"at the limit", sender=ALICE), sender=ALICE)
        == b"at the limit"
    )
    assert bob.chains[0].iteration == jump + 1
    assert bob.chains[0].skipped_keys == consts.MAX_SENDER_MESSAGE_KEYS


@pytest.mark.parametrize("limit", [20, consts.MAX_SENDER_MESSAGE_KEYS])
def test_message_key_limit(limit: int) -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    messages = [alice.encrypt(b"%d" % i, sender=ALICE) for i in range(limit + 10)]
    middle = limit // 2
    assert bob.decrypt(messages[middle], max_message_keys=limit, sender=ALICE) == b"%d" % middle
    assert bob.decrypt(messages[-1], max_message_keys=limit, sender=ALICE) == b"%d" % (limit + 9)
    assert bob.chains[0].skipped_keys == limit
    # Keys 0..7 were evicted (limit + 8 skipped keys were derived in all).
    refuse_decrypt(bob, messages[0], DuplicateMessage, max_message_keys=limit)
    refuse_decrypt(bob, messages[7], DuplicateMessage, max_message_keys=limit)
    assert bob.decrypt(messages[8], max_message_keys=limit, sender=ALICE) == b"8"
    assert bob.decrypt(messages[-2], max_message_keys=limit, sender=ALICE) == b"%d" % (limit + 8)


def test_late_join_gets_no_history() -> None:
    alice = new_sender()
    early = [alice.encrypt(b"before you joined %d" % i, sender=ALICE) for i in range(3)]
    bob = receiver_of(alice)
    for message in early:
        refuse_decrypt(bob, message, DuplicateMessage)
    assert bob.decrypt(alice.encrypt(b"welcome", sender=ALICE), sender=ALICE) == b"welcome"


def test_no_sender_key() -> None:
    alice, carol = new_sender(b"alice"), new_sender(b"carol")
    message = alice.encrypt(b"hello", sender=ALICE)
    refuse_decrypt(SenderKeyRecord(GROUP), message, NoSenderKey)
    refuse_decrypt(receiver_of(carol), message, NoSenderKey)
    # The same chain delivered to the record of another group.
    bob_other = SenderKeyRecord(OTHER_GROUP)
    bob_other.process_distribution(
        SenderKeyDistributionMessage(
            OTHER_GROUP,
            ALICE,
            alice.chain_id,
            alice.iteration,
            chain_key_of(alice),
            alice.signing_key,
        ),
        sender=ALICE,
    )
    refuse_decrypt(bob_other, alice.encrypt(b"hi", sender=ALICE), NoSenderKey)


# ------------------------------------------------------------------ authentication


def forger(chain_id: int, iteration: int, chain_key: bytes) -> OutboundSenderKey:
    """A sender on someone else's chain id, with its own signing key."""
    return OutboundSenderKey(
        group_id=GROUP,
        chain_id=chain_id,
        iteration=iteration,
        chain_key=chain_key,
        signing_key=p.ed25519_generate(SeededRandom(b"mallory")),
        created_at=NOW,
    )


def test_forged_signature_refused_before_the_chain_moves() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    chain_key = chain_key_of(alice)  # every member learns it from the SKDM
    message = alice.encrypt(b"genuine", sender=ALICE)
    flipped = message[:-1] + bytes([message[-1] ^ 1])
    refuse_decrypt(bob, flipped, BadSignature)
    # A member can make valid ciphertexts on Alice's chain, but cannot sign them.
    refuse_decrypt(
        bob, forger(alice.chain_id, 0, chain_key).encrypt(b"forged", sender=ALICE), BadSignature
    )
    # Far-future forgeries cost one verification: no chain walk, no stored keys,
    # and the signature is checked before the jump limit.
    far = forger(alice.chain_id, 20_000, bytes(32)).encrypt(b"forged", sender=ALICE)
    refuse_decrypt(bob, far, BadSignature)
    beyond = forger(alice.chain_id, 30_000, bytes(32)).encrypt(b"forged", sender=ALICE)
    refuse_decrypt(bob, beyond, BadSignature)
    assert bob.decrypt(message, sender=ALICE) == b"genuine"
    assert bob.chains[0].iteration == 1
    assert bob.chains[0].skipped_keys == 0


def test_tampered_ciphertext_refused() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    message = alice.encrypt(b"attack at dawn", sender=ALICE)
    parsed = SenderKeyMessage.decode(message)
    body = bytearray(parsed.body)
    body[-1] ^= 0x80  # last ciphertext byte
    refuse_decrypt(bob, bytes(body) + parsed.signature, BadSignature)
    assert bob.decrypt(message, sender=ALICE) == b"attack at dawn"


def test_bad_padding_under_a_valid_signature() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    bad = signed(alice, SenderKeyMessage.encode_body(GROUP, alice.chain_id, 0, bytes(32)))
    refuse_decrypt(bob, bad, DecryptionFailed)
    # A bad message further ahead does not store the skipped keys either.
    late = signed(alice, SenderKeyMessage.encode_body(GROUP, alice.chain_id, 5, bytes(32)))
    refuse_decrypt(bob, late, DecryptionFailed)
    assert bob.decrypt(alice.encrypt(b"fine", sender=ALICE), sender=ALICE) == b"fine"
    assert bob.chains[0].skipped_keys == 0


def test_every_truncation_refused() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    message = alice.encrypt(b"x" * 40, sender=ALICE)
    for length in range(len(message)):
        refuse_decrypt(bob, message[:length], ProtocolError)
    refuse_decrypt(bob, message + b"\x00", ProtocolError)
    assert bob.decrypt(message, sender=ALICE) == b"x" * 40


def test_wrong_versions() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    skdm = unpack(alice.distribution_message(sender=ALICE), what="test")
    body = unpack(SenderKeyMessage.decode(alice.encrypt(b"x", sender=ALICE)).body, what="test")
    # Versions 1 and 2 (not bound to a sender) and a future version alike.
    for version in (1, 2, V + 1):
        message = signed(alice, pack([version, *body[1:]]))
        refuse_decrypt(bob, message, UnknownVersion)
        with pytest.raises(UnknownVersion):
            SenderKeyDistributionMessage.decode(pack([version, *skdm[1:]]))
    # The earlier six-field SKDM (no sender) is UNKNOWN_VERSION, not MALFORMED.
    with pytest.raises(UnknownVersion):
        SenderKeyDistributionMessage.decode(pack([V - 1, *skdm[1:2], *skdm[4:]]))
    # A future version with another field count is still UNKNOWN_VERSION.
    with pytest.raises(UnknownVersion):
        SenderKeyDistributionMessage.decode(pack([V + 1]))
    refuse_decrypt(bob, signed(alice, pack([V + 1])), UnknownVersion)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ([V, GROUP[:15], 1, 0, bytes(16)], DecodeError),  # short group id
        ([V, GROUP, -1, 0, bytes(16)], DecodeError),  # negative chain id
        ([V, GROUP, 2**32, 0, bytes(16)], DecodeError),  # chain id beyond u32
        ([V, GROUP, 1, 2**32 - 1, bytes(16)], DecodeError),  # iteration past the last
        ([V, GROUP, 1, 0, bytes(15)], DecodeError),  # not whole blocks
        ([V, GROUP, 1, 0, b""], DecodeError),  # empty ciphertext
        ([V, GROUP, 1, 0, bytes(16), 0], DecodeError),  # extra field
        ([V, GROUP, 1, 0], DecodeError),  # missing field
        ([V, GROUP, 1, 0, "text"], DecodeError),  # str, not bin
    ],
)
def test_malformed_message_bodies(fields: list[object], error: type[ProtocolError]) -> None:
    with pytest.raises(error) as refused:
        SenderKeyMessage.decode(pack(fields) + bytes(64))
    assert not isinstance(refused.value, UnknownVersion)


def test_non_canonical_body_refused() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    message = alice.encrypt(b"x", sender=ALICE)
    parsed = SenderKeyMessage.decode(message)
    # The version as a uint8 (cc 03) rather than a positive fixint: same value.
    stretched = parsed.body[:1] + b"\xcc" + parsed.body[1:]
    refuse_decrypt(bob, signed(alice, stretched), DecodeError)


def test_bad_signing_keys_in_skdm() -> None:
    alice = new_sender()
    fields = unpack(alice.distribution_message(sender=ALICE), what="test")
    with pytest.raises(InvalidKey):
        SenderKeyDistributionMessage.decode(pack([*fields[:7], SMALL_ORDER_KEY]))
    not_a_point = (2).to_bytes(32, "little")  # y = 2 has no x on the curve
    with pytest.raises(InvalidKey):
        SenderKeyDistributionMessage.decode(pack([*fields[:7], not_a_point]))


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (2, ""),  # empty sender user id
        (2, "x" * 65),  # longer than MAX_USER_ID_SIZE
        (2, b"alice"),  # bin, not str
        (3, -1),  # negative device id
        (3, 2**32),  # device id beyond u32
    ],
)
def test_malformed_skdm_senders(index: int, value: object) -> None:
    fields = unpack(new_sender().distribution_message(sender=ALICE), what="test")
    fields[index] = value
    with pytest.raises(DecodeError) as refused:
        SenderKeyDistributionMessage.decode(pack(fields))
    assert not isinstance(refused.value, UnknownVersion)


DECODERS: list[Callable[[bytes], object]] = [
    SenderKeyMessage.decode,
    SenderKeyDistributionMessage.decode,
    OutboundSenderKey.from_bytes,
    SenderKeyRecord.from_bytes,
]


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for decode in DECODERS:
        with contextlib.suppress(ProtocolError):
            decode(data)


# Well-formed msgpack of the right shapes reaches the field checks, not just unpack.
MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.sampled_from([GROUP, bytes(16), bytes(32), SMALL_ORDER_KEY])
    | st.text(max_size=4),
    lambda children: st.lists(children, max_size=8),
    max_leaves=20,
)
STRUCTURED = st.builds(
    lambda version, rest: pack([version, *rest]),
    st.sampled_from([0, 1, 1, 1, 2]),
    st.lists(MSGPACK_VALUES, max_size=7),
)


def only_protocol_errors(data: bytes, tail: bytes) -> None:
    for decode in DECODERS:
        for candidate in (data, data + tail):
            with contextlib.suppress(ProtocolError):
                decode(candidate)


@settings(max_examples=100)
@given(STRUCTURED, st.binary(min_size=64, max_size=64))
def test_structured_inputs_raise_only_protocol_errors(data: bytes, tail: bytes) -> None:
    only_protocol_errors(data, tail)


@pytest.mark.fuzz
@settings(max_examples=20_000, deadline=None)
@given(STRUCTURED, st.binary(min_size=64, max_size=64))
def test_structured_inputs_fuzz(data: bytes, tail: bytes) -> None:
    only_protocol_errors(data, tail)


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_garbage_leaves_record_unchanged(data: bytes) -> None:
    record = RECEIVER_WITH_HISTORY()
    refused(record, ProtocolError, lambda r: r.decrypt(data, sender=ALICE))
    refused(record, ProtocolError, lambda r: r.process_distribution(data, sender=ALICE))


@settings(max_examples=100)
@given(st.data())
def test_mutated_messages_refused(data: st.DataObject) -> None:
    message = MUTATION_TARGET
    position = data.draw(st.integers(0, len(message) - 1))
    flip = data.draw(st.integers(1, 255))
    mutated = message[:position] + bytes([message[position] ^ flip]) + message[position + 1 :]
    refused(RECEIVER_WITH_HISTORY(), ProtocolError, lambda r: r.decrypt(mutated, sender=ALICE))


def _receiver_with_history() -> Callable[[], SenderKeyRecord]:
    alice = new_sender()
    bob = receiver_of(alice)
    for message in [alice.encrypt(b"%d" % i, sender=ALICE) for i in range(5)][::2]:
        bob.decrypt(message, sender=ALICE)  # leaves skipped keys 1 and 3
    pickle = bob.to_bytes()
    return lambda: SenderKeyRecord.from_bytes(pickle)


RECEIVER_WITH_HISTORY = _receiver_with_history()
MUTATION_TARGET = advanced(new_sender(), 5).encrypt(b"mutate me", sender=ALICE)


# ------------------------------------------------------------------ round trips and pickles


def test_wire_round_trips() -> None:
    alice = new_sender()
    skdm_bytes = alice.distribution_message(sender=ALICE)
    skdm = SenderKeyDistributionMessage.decode(skdm_bytes)
    assert skdm == alice.distribution(sender=ALICE)
    assert skdm.encode() == skdm_bytes
    assert (skdm.group_id, skdm.chain_id, skdm.iteration) == (GROUP, alice.chain_id, 0)
    assert skdm.signing_key == alice.signing_key
    message = alice.encrypt(b"round trip", sender=ALICE)
    parsed = SenderKeyMessage.decode(message)
    assert parsed.encode() == message
    assert (parsed.group_id, parsed.chain_id, parsed.iteration) == (GROUP, alice.chain_id, 0)
    assert parsed.body == SenderKeyMessage.encode_body(GROUP, alice.chain_id, 0, parsed.ciphertext)


@settings(max_examples=50)
@given(
    st.binary(min_size=16, max_size=16),
    st.integers(0, 2**32 - 1),
    st.integers(0, consts.MAX_SENDER_KEY_ITERATION),
    st.integers(1, 64).map(lambda blocks: bytes(16 * blocks)),
)
def test_message_layout_round_trips(
    group_id: bytes, chain_id: int, iteration: int, ciphertext: bytes
) -> None:
    body = SenderKeyMessage.encode_body(group_id, chain_id, iteration, ciphertext)
    parsed = SenderKeyMessage.decode(body + bytes(64))
    assert (parsed.group_id, parsed.chain_id, parsed.iteration) == (group_id, chain_id, iteration)
    assert parsed.ciphertext == ciphertext
    assert parsed.encode() == body + bytes(64)


def test_outbound_pickle_round_trip() -> None:
    alice = new_sender()
    alice.encrypt(b"one", sender=ALICE)
    copy = OutboundSenderKey.from_bytes(alice.to_bytes())
    assert copy.to_bytes() == alice.to_bytes()
    # Deterministic encryption (derived IV, Ed25519): both produce the same bytes.
    assert copy.encrypt(b"two", sender=ALICE) == alice.encrypt(b"two", sender=ALICE)
    assert copy.distribution_message(sender=ALICE) == alice.distribution_message(sender=ALICE)


def test_record_pickle_round_trip() -> None:
    record = RECEIVER_WITH_HISTORY()
    for name in (b"r1", b"r2"):
        rotated = new_sender(name)
        record.process_distribution(rotated.distribution_message(sender=ALICE), sender=ALICE)
        record.decrypt(advanced(rotated, 3).encrypt(b"x", sender=ALICE), sender=ALICE)
    data = record.to_bytes()
    copy = SenderKeyRecord.from_bytes(data)
    assert copy.to_bytes() == data
    assert copy.chains == record.chains
    assert [c.skipped_keys for c in copy.chains] == [3, 3, 2]
    assert SenderKeyRecord.from_bytes(SenderKeyRecord(GROUP).to_bytes()).chains == ()


def test_bad_pickles() -> None:
    outbound = unpack(new_sender().to_bytes(), what="test")
    record = unpack(RECEIVER_WITH_HISTORY().to_bytes(), what="test")
    with pytest.raises(UnknownStateVersion):
        OutboundSenderKey.from_bytes(pack([consts.STATE_VERSION + 1, *outbound[1:]]))
    with pytest.raises(UnknownStateVersion):
        SenderKeyRecord.from_bytes(pack([consts.STATE_VERSION + 1, *record[1:]]))
    with pytest.raises(StateError):
        OutboundSenderKey.from_bytes(pack(outbound[:-1]))
    with pytest.raises(StateError):
        SenderKeyRecord.from_bytes(pack(record) + b"\x00")
    chain = record[2][0]
    with pytest.raises(StateError, match="twice"):
        SenderKeyRecord.from_bytes(pack([*record[:2], [chain, chain]]))
    # Skipped keys out of order, or not below the chain's iteration.
    reordered = [*chain[:4], chain[4][::-1]]
    with pytest.raises(StateError):
        SenderKeyRecord.from_bytes(pack([*record[:2], [reordered]]))
    ahead = [*chain[:4], [[chain[2], bytes(32)]]]
    with pytest.raises(StateError):
        SenderKeyRecord.from_bytes(pack([*record[:2], [ahead]]))


# ------------------------------------------------------------------ distribution messages


def test_identical_redelivery_is_harmless() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    skdm = alice.distribution_message(sender=ALICE)
    before = bob.to_bytes()
    bob.process_distribution(skdm, sender=ALICE)
    bob.process_distribution(SenderKeyDistributionMessage.decode(skdm), sender=ALICE)
    assert bob.to_bytes() == before


def test_older_skdm_does_not_roll_the_chain_back() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    old_skdm = alice.distribution_message(sender=ALICE)
    first = alice.encrypt(b"0", sender=ALICE)
    alice.encrypt(b"1", sender=ALICE)  # lost: its key stays stored
    bob.decrypt(alice.encrypt(b"2", sender=ALICE), sender=ALICE)
    bob.decrypt(first, sender=ALICE)
    before = bob.to_bytes()
    bob.process_distribution(old_skdm, sender=ALICE)
    assert bob.to_bytes() == before
    refuse_decrypt(bob, first, DuplicateMessage)


def test_newer_skdm_of_the_same_chain_keeps_skipped_keys() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    missed = alice.encrypt(b"missed", sender=ALICE)
    bob.decrypt(alice.encrypt(b"seen", sender=ALICE), sender=ALICE)
    before = bob.to_bytes()
    # A re-share later in the chain (after a 1:1 reset, say) derives from ours.
    bob.process_distribution(advanced(alice, 50).distribution_message(sender=ALICE), sender=ALICE)
    assert bob.to_bytes() == before
    assert bob.decrypt(missed, sender=ALICE) == b"missed"


def test_same_chain_id_with_other_keys_replaces_the_state() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    bob.decrypt(alice.encrypt(b"old chain", sender=ALICE), sender=ALICE)
    # Same chain id and signing key, but a chain key that does not derive from ours.
    other_chain = OutboundSenderKey(
        group_id=GROUP,
        chain_id=alice.chain_id,
        iteration=5,
        chain_key=bytes(32),
        signing_key=p.ed25519_private_from_bytes(signing_seed_of(alice)),
        created_at=NOW,
    )
    bob.process_distribution(other_chain.distribution_message(sender=ALICE), sender=ALICE)
    assert [(c.chain_id, c.iteration) for c in bob.chains] == [(alice.chain_id, 5)]
    assert (
        bob.decrypt(other_chain.encrypt(b"new chain", sender=ALICE), sender=ALICE) == b"new chain"
    )
    # Same chain id, another signing key: replaced too, even at an older iteration.
    rekeyed = forger(alice.chain_id, 0, bytes(32))
    bob.process_distribution(rekeyed.distribution_message(sender=ALICE), sender=ALICE)
    assert [(c.chain_id, c.signing_key) for c in bob.chains] == [
        (alice.chain_id, rekeyed.signing_key)
    ]
    assert bob.decrypt(rekeyed.encrypt(b"rekeyed", sender=ALICE), sender=ALICE) == b"rekeyed"


def test_newer_skdm_beyond_the_jump_limit_replaces_the_state() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    missed = alice.encrypt(b"missed", sender=ALICE)
    # Bob's chain is at 0; this SKDM is at 11, one step beyond what he may derive.
    bob.process_distribution(
        advanced(alice, 10).distribution_message(sender=ALICE), max_forward_jump=10, sender=ALICE
    )
    assert bob.chains[0].iteration == 11
    refuse_decrypt(bob, missed, DuplicateMessage)


def test_skdm_for_another_group_is_misuse() -> None:
    record = SenderKeyRecord(OTHER_GROUP)
    refused(
        record,
        InvalidArgument,
        lambda r: r.process_distribution(
            new_sender().distribution_message(sender=ALICE), sender=ALICE
        ),
    )
    refused(record, InvalidArgument, lambda r: r.process_distribution("skdm", sender=ALICE))  # type: ignore[arg-type]


def test_record_keeps_five_states_across_rotations() -> None:
    bob = SenderKeyRecord(GROUP)
    senders = [new_sender(b"alice %d" % n) for n in range(consts.MAX_SENDER_KEY_STATES + 1)]
    in_flight = []
    for sender in senders[: consts.MAX_SENDER_KEY_STATES]:
        bob.process_distribution(sender.distribution_message(sender=ALICE), sender=ALICE)
        in_flight.append(sender.encrypt(b"sent with %d" % sender.chain_id, sender=ALICE))
    assert [c.chain_id for c in bob.chains] == [s.chain_id for s in reversed(senders[:5])]
    # Messages sent before each rotation still decrypt.
    for sender, message in zip(senders, in_flight, strict=False):
        assert bob.decrypt(message, sender=ALICE) == b"sent with %d" % sender.chain_id
    # A sixth key pushes out the oldest.
    bob.process_distribution(senders[5].distribution_message(sender=ALICE), sender=ALICE)
    assert len(bob.chains) == consts.MAX_SENDER_KEY_STATES
    refuse_decrypt(bob, senders[0].encrypt(b"gone", sender=ALICE), NoSenderKey)
    assert bob.decrypt(senders[1].encrypt(b"kept", sender=ALICE), sender=ALICE) == b"kept"


def test_max_states_parameter() -> None:
    bob = SenderKeyRecord(GROUP)
    for n in range(3):
        bob.process_distribution(
            new_sender(b"%d" % n).distribution_message(sender=ALICE), max_states=2, sender=ALICE
        )
    assert len(bob.chains) == 2
    with pytest.raises(InvalidArgument):
        bob.process_distribution(
            new_sender().distribution_message(sender=ALICE), max_states=0, sender=ALICE
        )


# ------------------------------------------------------------------ bound to the sender


def test_a_forwarded_distribution_is_refused() -> None:
    alice = new_sender()
    # Mallory received alice's SKDM and hands it to bob over its own session.
    forwarded = alice.distribution_message(sender=ALICE)
    bobs_record_of_mallory = SenderKeyRecord(GROUP)
    refused(
        bobs_record_of_mallory,
        SenderMismatch,
        lambda r: r.process_distribution(forwarded, sender=MALLORY),
    )
    assert bobs_record_of_mallory.chains == ()


def test_a_chain_renamed_by_its_forwarder_reads_nothing_of_its_creator() -> None:
    alice = new_sender()
    renamed = SenderKeyDistributionMessage.decode(alice.distribution_message(sender=ALICE))
    renamed = SenderKeyDistributionMessage(
        GROUP, MALLORY, renamed.chain_id, 0, renamed.chain_key, renamed.signing_key
    )
    bobs_record_of_mallory = SenderKeyRecord(GROUP)
    bobs_record_of_mallory.process_distribution(renamed, sender=MALLORY)
    bobs_record_of_alice = receiver_of(alice)
    message = alice.encrypt(b"meet at noon", sender=ALICE)
    # Alice's message, sent again by mallory or restamped by the relay: not mallory's.
    refuse_decrypt(bobs_record_of_mallory, message, BadSignature, sender=MALLORY)
    assert bobs_record_of_alice.decrypt(message, sender=ALICE) == b"meet at noon"


def test_the_signature_covers_the_senders_user_and_device() -> None:
    alice = new_sender()
    message = alice.encrypt(b"hi", sender=ALICE)
    parsed = SenderKeyMessage.decode(message)
    p.ed25519_verify(alice.signing_key, parsed.signature, pack(["alice", 1]) + parsed.body)
    for impostor in (Address("alice", 2), Address("alicf", 1), MALLORY):
        bob = SenderKeyRecord(GROUP)
        distribution = SenderKeyDistributionMessage.decode(alice.distribution_message(sender=ALICE))
        bob.process_distribution(
            SenderKeyDistributionMessage(
                GROUP,
                impostor,
                distribution.chain_id,
                distribution.iteration,
                distribution.chain_key,
                distribution.signing_key,
            ),
            sender=impostor,
        )
        refuse_decrypt(bob, message, BadSignature, sender=impostor)


def test_a_sender_must_be_a_valid_address() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    message = alice.encrypt(b"x", sender=ALICE)
    bad_senders: list[object] = [
        Address("", 1),
        Address("x" * 65, 1),
        Address("\ud800", 1),
        Address("alice", -1),
        Address("alice", 2**32),
        Address("alice", True),
        ("alice", 1),
    ]
    for bad in bad_senders:
        with pytest.raises(InvalidArgument):
            alice.encrypt(b"x", sender=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            alice.distribution_message(sender=bad)  # type: ignore[arg-type]
        refused(bob, InvalidArgument, lambda r, s=bad: r.decrypt(message, sender=s))  # type: ignore[misc]
    assert alice.iteration == 1


# ------------------------------------------------------------------ a device's store

BOB = Address("bob", 1)
MEMBERS = {ALICE, BOB, MALLORY, Address("alice", 2)}


def store_state(store: SenderKeyStore) -> dict[tuple[bytes, Address], bytes]:
    return {key: record.to_bytes() for key, record in store.items()}


def refused_by_store(
    store: SenderKeyStore,
    error: type[ProtocolError],
    skdm: bytes,
    sender: Address,
    devices: set[Address] | None,
) -> None:
    before = store_state(store)
    with pytest.raises(error):
        store.process_distribution(skdm, sender=sender, group_devices=devices)
    assert store_state(store) == before


def test_the_store_takes_a_members_own_sender_key() -> None:
    store = SenderKeyStore()
    alice = new_sender()
    skdm = store.process_distribution(
        alice.distribution_message(sender=ALICE), sender=ALICE, group_devices=MEMBERS
    )
    assert (skdm.group_id, skdm.sender, skdm.chain_id) == (GROUP, ALICE, alice.chain_id)
    assert list(store) == [(GROUP, ALICE)]
    record = store[(GROUP, ALICE)]
    assert record.decrypt(alice.encrypt(b"hi", sender=ALICE), sender=ALICE) == b"hi"


def test_the_store_refuses_sender_keys_it_should_not_keep() -> None:
    store = SenderKeyStore()
    store.process_distribution(
        new_sender(b"bob").distribution_message(sender=BOB), sender=BOB, group_devices=MEMBERS
    )
    stranger = Address("stranger", 1)
    alice_skdm = new_sender().distribution_message(sender=ALICE)
    # A group the device does not hold, even from a known member.
    refused_by_store(store, UnknownGroup, alice_skdm, ALICE, None)
    # A device that is not a current member's (its own SKDM).
    own = new_sender(b"stranger").distribution_message(sender=stranger)
    refused_by_store(store, NotAMember, own, stranger, MEMBERS)
    # A member forwarding another member's chain.
    refused_by_store(store, SenderMismatch, alice_skdm, MALLORY, MEMBERS)
    # Bytes that do not decode.
    refused_by_store(store, DecodeError, b"\x00", ALICE, MEMBERS)
    assert list(store) == [(GROUP, BOB)]


def test_the_store_keeps_at_most_max_records_and_evicts_none() -> None:
    store = SenderKeyStore(max_records=2)
    senders = {address: new_sender(address.user_id.encode()) for address in sorted(MEMBERS)}
    first, second, third, _ = sorted(MEMBERS)
    for address in (first, second):
        skdm = senders[address].distribution_message(sender=address)
        store.process_distribution(skdm, sender=address, group_devices=MEMBERS)
    over = senders[third].distribution_message(sender=third)
    refused_by_store(store, TooManySenderKeys, over, third, MEMBERS)
    # A new group is a new record too.
    other = new_sender(b"other group", OTHER_GROUP).distribution_message(sender=first)
    refused_by_store(store, TooManySenderKeys, other, first, MEMBERS)
    # A held record still takes its sender's next chain.
    rotated = new_sender(b"rotated").distribution_message(sender=first)
    store.process_distribution(rotated, sender=first, group_devices=MEMBERS)
    assert len(store[(GROUP, first)].chains) == 2
    assert set(store) == {(GROUP, first), (GROUP, second)}
    # Room once a record is dropped.
    assert store.discard(lambda group_id, sender: sender == second) == [(GROUP, second)]
    store.process_distribution(over, sender=third, group_devices=MEMBERS)
    assert set(store) == {(GROUP, first), (GROUP, third)}


def test_the_store_restores_records_and_checks_its_arguments() -> None:
    store = SenderKeyStore(max_records=0)
    record = receiver_of(new_sender())
    store.restore(GROUP, ALICE, record)
    assert store[(GROUP, ALICE)] is record and len(store) == 1
    with pytest.raises(InvalidArgument):
        store.restore(OTHER_GROUP, ALICE, record)
    with pytest.raises(InvalidArgument):
        SenderKeyStore(max_records=-1)
    with pytest.raises(InvalidArgument):
        store.process_distribution("skdm", sender=ALICE, group_devices=MEMBERS)  # type: ignore[arg-type]
    assert "max_records=0" in repr(store)


# ------------------------------------------------------------------ sender


def test_create_draws_chain_id_chain_key_signing_key_in_order() -> None:
    chain_key, seed = bytes(range(32)), bytes(range(32, 64))
    rng = ScriptedRandom([b"\xff\xff\xff\xff", chain_key, seed])
    alice = OutboundSenderKey.create(GROUP, NOW, rng)
    assert alice.chain_id == 2**31 - 1  # 31 bits, as libsignal
    assert chain_key_of(alice) == chain_key
    assert alice.signing_key == p.ed25519_public_bytes(p.ed25519_private_from_bytes(seed))
    assert (alice.iteration, alice.messages_sent, alice.created_at) == (0, 0, NOW)


def test_needs_rotation() -> None:
    alice = new_sender()
    assert not alice.needs_rotation(NOW)
    assert not alice.needs_rotation(NOW - 10)  # a clock that went back
    assert not alice.needs_rotation(NOW + consts.SENDER_KEY_MAX_AGE - 1)
    assert alice.needs_rotation(NOW + consts.SENDER_KEY_MAX_AGE)
    assert alice.needs_rotation(NOW + 60, max_age=60)
    for _ in range(3):
        alice.encrypt(b"", sender=ALICE)
    assert alice.messages_sent == 3
    assert alice.needs_rotation(NOW, max_messages=3)
    assert not alice.needs_rotation(NOW, max_messages=4)
    assert advanced(alice, consts.SENDER_KEY_MAX_MESSAGES - 3).needs_rotation(NOW)


def test_spent_chain_refuses_to_encrypt() -> None:
    last = consts.MAX_SENDER_KEY_ITERATION
    alice = forger(7, last, bytes(32))
    bob = SenderKeyRecord(GROUP)
    bob.process_distribution(alice.distribution_message(sender=ALICE), sender=ALICE)
    assert bob.decrypt(alice.encrypt(b"last", sender=ALICE), sender=ALICE) == b"last"
    assert bob.chains[0].iteration == 2**32 - 1
    assert SenderKeyRecord.from_bytes(bob.to_bytes()).to_bytes() == bob.to_bytes()
    assert alice.needs_rotation(NOW, max_messages=2**32 - 1)  # the largest allowed
    with pytest.raises(InvalidState):
        alice.encrypt(b"one too many", sender=ALICE)
    assert OutboundSenderKey.from_bytes(alice.to_bytes()).iteration == 2**32 - 1


def test_argument_checks() -> None:
    alice = new_sender()
    with pytest.raises(InvalidArgument):
        alice.encrypt(bytes(consts.MAX_PLAINTEXT_SIZE + 1), sender=ALICE)
    with pytest.raises(InvalidArgument):
        alice.encrypt("text", sender=ALICE)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        OutboundSenderKey.create(GROUP[:15], NOW)
    with pytest.raises(InvalidArgument):
        OutboundSenderKey.create(GROUP, -1)
    with pytest.raises(InvalidArgument):
        alice.needs_rotation(True)
    with pytest.raises(InvalidArgument):
        alice.needs_rotation(NOW, max_age=-1)
    with pytest.raises(InvalidArgument):
        alice.needs_rotation(NOW, max_messages="many")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        SenderKeyRecord(b"short")
    bob = receiver_of(alice)
    with pytest.raises(InvalidArgument):
        bob.decrypt(alice.encrypt(b"x", sender=ALICE), max_message_keys=-1, sender=ALICE)
    with pytest.raises(InvalidArgument):
        bob.decrypt(alice.encrypt(b"x", sender=ALICE), max_forward_jump=1.5, sender=ALICE)  # type: ignore[arg-type]


def test_largest_plaintext() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    big = bytes(range(256)) * (consts.MAX_PLAINTEXT_SIZE // 256)
    assert bob.decrypt(alice.encrypt(big, sender=ALICE), sender=ALICE) == big


def test_reprs_hold_no_secrets() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    message = alice.encrypt(b"secret plaintext", sender=ALICE)
    secrets = [chain_key_of(alice).hex(), signing_seed_of(alice).hex()]
    parsed = SenderKeyMessage.decode(message)
    texts = [
        repr(alice),
        repr(bob),
        repr(alice.distribution(sender=ALICE)),
        repr(parsed),
        repr(bob.chains),
    ]
    for text in texts:
        for secret in secrets:
            assert secret not in text
        assert parsed.ciphertext.hex() not in text


# ------------------------------------------------------------------ overhead


def test_overhead_for_a_100_byte_plaintext() -> None:
    """libsignal's SenderKeyMessage is 205 bytes for this at iterations 0..127."""
    alice = new_sender()
    assert alice.chain_id >= 2**28  # a 5-byte uint, as most 31-bit ids
    sizes = {
        iteration: len(advanced(alice, iteration).encrypt(bytes(100), sender=ALICE))
        for iteration in (0, 127, 128, 255, 256, 65535)
    }
    assert sizes == {0: 204, 127: 204, 128: 205, 255: 205, 256: 206, 65535: 206}


# ------------------------------------------------------------------ known answers


def independent_chain(chain_key: bytes, iteration: int) -> tuple[bytes, bytes, bytes]:
    """(IV, AES key, next chain key) at ``iteration``, computed without protocol/."""
    for _ in range(iteration):
        chain_key = hmac256(chain_key, b"\x02")
    seed = hmac256(chain_key, b"\x01")
    material = HKDF(
        algorithm=hashes.SHA256(), length=48, salt=bytes(32), info=b"hushchat_sender_key"
    ).derive(seed)
    return material[:16], material[16:], hmac256(chain_key, b"\x02")


@pytest.mark.parametrize("iteration", [0, 1, 15])
def test_chain_derivation_known_answers(iteration: int) -> None:
    chain_key = bytes(range(32))
    alice = OutboundSenderKey(
        group_id=GROUP,
        chain_id=1,
        iteration=0,
        chain_key=chain_key,
        signing_key=p.ed25519_private_from_bytes(bytes(32)),
        created_at=NOW,
    )
    bob = SenderKeyRecord(GROUP)
    bob.process_distribution(alice.distribution_message(sender=ALICE), sender=ALICE)
    iv, key, next_key = independent_chain(chain_key, iteration)
    plaintext = b"known answer %d" % iteration
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    expected = encryptor.update(padded) + encryptor.finalize()
    sender = advanced(alice, iteration)
    message = sender.encrypt(plaintext, sender=ALICE)
    assert SenderKeyMessage.decode(message).ciphertext == expected
    assert chain_key_of(sender) == next_key
    assert bob.decrypt(message, sender=ALICE) == plaintext


# ------------------------------------------------------------------ delivery property


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 29), max_size=60))
def test_any_delivery_order_decrypts_each_message_once(order: list[int]) -> None:
    """Against a model: the chain position and the ten newest stored skipped keys."""
    limit = 10
    alice = new_sender()
    bob = receiver_of(alice)
    messages = [alice.encrypt(b"%d" % i, sender=ALICE) for i in range(30)]
    position = 0  # the model's next iteration
    stored: list[int] = []  # and the iterations whose keys it keeps, oldest first
    for index in order:
        if index < position and index not in stored:
            refuse_decrypt(bob, messages[index], DuplicateMessage, max_message_keys=limit)
            continue
        assert bob.decrypt(messages[index], max_message_keys=limit, sender=ALICE) == b"%d" % index
        if index < position:
            stored.remove(index)
        else:
            stored = [*stored, *range(position, index)][-limit:]
            position = index + 1
        assert (bob.chains[0].iteration, bob.chains[0].skipped_keys) == (position, len(stored))
