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
    ProtocolError,
    StateError,
    TooFarInFuture,
    UnknownStateVersion,
    UnknownVersion,
)
from hushchat.protocol.group_cipher import OutboundSenderKey, SenderKeyRecord
from hushchat.protocol.primitives import ScriptedRandom, SeededRandom
from hushchat.protocol.sender_keys import SenderKeyDistributionMessage, SenderKeyMessage
from tests.support.clock import NOW
from tests.support.reference import SMALL_ORDER_KEY

GROUP = bytes(range(16))
OTHER_GROUP = bytes(range(1, 17))


def new_sender(name: bytes = b"alice", group: bytes = GROUP) -> OutboundSenderKey:
    return OutboundSenderKey.create(group, NOW, SeededRandom(name))


def receiver_of(sender: OutboundSenderKey) -> SenderKeyRecord:
    record = SenderKeyRecord(sender.group_id)
    record.process_distribution(sender.distribution_message())
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
    record: SenderKeyRecord, message: bytes, error: type[ProtocolError], **limits: int
) -> None:
    refused(record, error, lambda r: r.decrypt(message, **limits))


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
    return SenderKeyDistributionMessage.decode(sender.distribution_message()).chain_key


def signing_seed_of(sender: OutboundSenderKey) -> bytes:
    seed: bytes = unpack(sender.to_bytes(), what="test")[5]
    return seed


def signed(sender: OutboundSenderKey, body: bytes) -> bytes:
    """``body`` signed with ``sender``'s real signing key (a white-box forgery tool)."""
    key = p.ed25519_private_from_bytes(signing_seed_of(sender))
    return body + p.ed25519_sign(key, body)


# ------------------------------------------------------------------ tests/groups.rs


def test_basic_ratchet() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    messages = [alice.encrypt(f"smert za smert {i}".encode()) for i in range(3)]
    assert bob.decrypt(messages[0]) == b"smert za smert 0"
    refuse_decrypt(bob, messages[0], DuplicateMessage)
    assert bob.decrypt(messages[2]) == b"smert za smert 2"
    assert bob.decrypt(messages[1]) == b"smert za smert 1"
    for message in messages:
        refuse_decrypt(bob, message, DuplicateMessage)


def test_out_of_order() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    plaintexts = [f"message {i}".encode() for i in range(100)]
    messages = list(zip(plaintexts, [alice.encrypt(pt) for pt in plaintexts], strict=True))
    random.Random(7).shuffle(messages)
    for plaintext, message in messages:
        assert bob.decrypt(message) == plaintext
    assert bob.chains[0].skipped_keys == 0


def test_too_far_in_the_future_with_a_small_limit() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    late = advanced(alice, 11).encrypt(b"too far")
    refuse_decrypt(bob, late, TooFarInFuture, max_forward_jump=10)
    in_reach = advanced(alice, 10).encrypt(b"just in reach")
    assert bob.decrypt(in_reach, max_forward_jump=10) == b"just in reach"


def test_too_far_in_the_future_with_the_default_limit() -> None:
    jump = consts.MAX_SENDER_KEY_FORWARD_JUMP
    alice = new_sender()
    bob = receiver_of(alice)
    refuse_decrypt(bob, advanced(alice, jump + 1).encrypt(b"too far"), TooFarInFuture)
    assert bob.decrypt(advanced(alice, jump).encrypt(b"at the limit")) == b"at the limit"
    assert bob.chains[0].iteration == jump + 1
    assert bob.chains[0].skipped_keys == consts.MAX_SENDER_MESSAGE_KEYS


@pytest.mark.parametrize("limit", [20, consts.MAX_SENDER_MESSAGE_KEYS])
def test_message_key_limit(limit: int) -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    messages = [alice.encrypt(b"%d" % i) for i in range(limit + 10)]
    middle = limit // 2
    assert bob.decrypt(messages[middle], max_message_keys=limit) == b"%d" % middle
    assert bob.decrypt(messages[-1], max_message_keys=limit) == b"%d" % (limit + 9)
    assert bob.chains[0].skipped_keys == limit
    # Keys 0..7 were evicted (limit + 8 skipped keys were derived in all).
    refuse_decrypt(bob, messages[0], DuplicateMessage, max_message_keys=limit)
    refuse_decrypt(bob, messages[7], DuplicateMessage, max_message_keys=limit)
    assert bob.decrypt(messages[8], max_message_keys=limit) == b"8"
    assert bob.decrypt(messages[-2], max_message_keys=limit) == b"%d" % (limit + 8)


def test_late_join_gets_no_history() -> None:
    alice = new_sender()
    early = [alice.encrypt(b"before you joined %d" % i) for i in range(3)]
    bob = receiver_of(alice)
    for message in early:
        refuse_decrypt(bob, message, DuplicateMessage)
    assert bob.decrypt(alice.encrypt(b"welcome")) == b"welcome"


def test_no_sender_key() -> None:
    alice, carol = new_sender(b"alice"), new_sender(b"carol")
    message = alice.encrypt(b"hello")
    refuse_decrypt(SenderKeyRecord(GROUP), message, NoSenderKey)
    refuse_decrypt(receiver_of(carol), message, NoSenderKey)
    # The same chain delivered to the record of another group.
    bob_other = SenderKeyRecord(OTHER_GROUP)
    bob_other.process_distribution(
        SenderKeyDistributionMessage(
            OTHER_GROUP, alice.chain_id, alice.iteration, chain_key_of(alice), alice.signing_key
        )
    )
    refuse_decrypt(bob_other, alice.encrypt(b"hi"), NoSenderKey)


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
    message = alice.encrypt(b"genuine")
    flipped = message[:-1] + bytes([message[-1] ^ 1])
    refuse_decrypt(bob, flipped, BadSignature)
    # A member can make valid ciphertexts on Alice's chain, but cannot sign them.
    refuse_decrypt(bob, forger(alice.chain_id, 0, chain_key).encrypt(b"forged"), BadSignature)
    # Far-future forgeries cost one verification: no chain walk, no stored keys,
    # and the signature is checked before the jump limit.
    far = forger(alice.chain_id, 20_000, bytes(32)).encrypt(b"forged")
    refuse_decrypt(bob, far, BadSignature)
    beyond = forger(alice.chain_id, 30_000, bytes(32)).encrypt(b"forged")
    refuse_decrypt(bob, beyond, BadSignature)
    assert bob.decrypt(message) == b"genuine"
    assert bob.chains[0].iteration == 1
    assert bob.chains[0].skipped_keys == 0


def test_tampered_ciphertext_refused() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    message = alice.encrypt(b"attack at dawn")
    parsed = SenderKeyMessage.decode(message)
    body = bytearray(parsed.body)
    body[-1] ^= 0x80  # last ciphertext byte
    refuse_decrypt(bob, bytes(body) + parsed.signature, BadSignature)
    assert bob.decrypt(message) == b"attack at dawn"


def test_bad_padding_under_a_valid_signature() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    bad = signed(alice, SenderKeyMessage.encode_body(GROUP, alice.chain_id, 0, bytes(32)))
    refuse_decrypt(bob, bad, DecryptionFailed)
    # A bad message further ahead does not store the skipped keys either.
    late = signed(alice, SenderKeyMessage.encode_body(GROUP, alice.chain_id, 5, bytes(32)))
    refuse_decrypt(bob, late, DecryptionFailed)
    assert bob.decrypt(alice.encrypt(b"fine")) == b"fine"
    assert bob.chains[0].skipped_keys == 0


def test_every_truncation_refused() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    message = alice.encrypt(b"x" * 40)
    for length in range(len(message)):
        refuse_decrypt(bob, message[:length], ProtocolError)
    refuse_decrypt(bob, message + b"\x00", ProtocolError)
    assert bob.decrypt(message) == b"x" * 40


def test_wrong_versions() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    future = signed(alice, pack([consts.PROTOCOL_VERSION + 1, GROUP, alice.chain_id, 0, bytes(16)]))
    refuse_decrypt(bob, future, UnknownVersion)
    skdm = unpack(alice.distribution_message(), what="test")
    with pytest.raises(UnknownVersion):
        SenderKeyDistributionMessage.decode(pack([consts.PROTOCOL_VERSION + 1, *skdm[1:]]))
    # A future version with another field count is still UNKNOWN_VERSION.
    with pytest.raises(UnknownVersion):
        SenderKeyDistributionMessage.decode(pack([consts.PROTOCOL_VERSION + 1]))
    refuse_decrypt(bob, signed(alice, pack([consts.PROTOCOL_VERSION + 1])), UnknownVersion)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ([1, GROUP[:15], 1, 0, bytes(16)], DecodeError),  # short group id
        ([1, GROUP, -1, 0, bytes(16)], DecodeError),  # negative chain id
        ([1, GROUP, 2**32, 0, bytes(16)], DecodeError),  # chain id beyond u32
        ([1, GROUP, 1, 2**32 - 1, bytes(16)], DecodeError),  # iteration past the last
        ([1, GROUP, 1, 0, bytes(15)], DecodeError),  # not whole blocks
        ([1, GROUP, 1, 0, b""], DecodeError),  # empty ciphertext
        ([1, GROUP, 1, 0, bytes(16), 0], DecodeError),  # extra field
        ([1, GROUP, 1, 0], DecodeError),  # missing field
        ([1, GROUP, 1, 0, "text"], DecodeError),  # str, not bin
    ],
)
def test_malformed_message_bodies(fields: list[object], error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        SenderKeyMessage.decode(pack(fields) + bytes(64))


def test_non_canonical_body_refused() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    message = alice.encrypt(b"x")
    parsed = SenderKeyMessage.decode(message)
    # Version 1 as a uint8 (cc 01) rather than a positive fixint: same value.
    stretched = parsed.body[:1] + b"\xcc" + parsed.body[1:]
    refuse_decrypt(bob, signed(alice, stretched), DecodeError)


def test_bad_signing_keys_in_skdm() -> None:
    alice = new_sender()
    fields = unpack(alice.distribution_message(), what="test")
    with pytest.raises(InvalidKey):
        SenderKeyDistributionMessage.decode(pack([*fields[:5], SMALL_ORDER_KEY]))
    not_a_point = (2).to_bytes(32, "little")  # y = 2 has no x on the curve
    with pytest.raises(InvalidKey):
        SenderKeyDistributionMessage.decode(pack([*fields[:5], not_a_point]))


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
    refused(record, ProtocolError, lambda r: r.decrypt(data))
    refused(record, ProtocolError, lambda r: r.process_distribution(data))


@settings(max_examples=100)
@given(st.data())
def test_mutated_messages_refused(data: st.DataObject) -> None:
    message = MUTATION_TARGET
    position = data.draw(st.integers(0, len(message) - 1))
    flip = data.draw(st.integers(1, 255))
    mutated = message[:position] + bytes([message[position] ^ flip]) + message[position + 1 :]
    refused(RECEIVER_WITH_HISTORY(), ProtocolError, lambda r: r.decrypt(mutated))


def _receiver_with_history() -> Callable[[], SenderKeyRecord]:
    alice = new_sender()
    bob = receiver_of(alice)
    for message in [alice.encrypt(b"%d" % i) for i in range(5)][::2]:
        bob.decrypt(message)  # leaves skipped keys 1 and 3
    pickle = bob.to_bytes()
    return lambda: SenderKeyRecord.from_bytes(pickle)


RECEIVER_WITH_HISTORY = _receiver_with_history()
MUTATION_TARGET = advanced(new_sender(), 5).encrypt(b"mutate me")


# ------------------------------------------------------------------ round trips and pickles


def test_wire_round_trips() -> None:
    alice = new_sender()
    skdm_bytes = alice.distribution_message()
    skdm = SenderKeyDistributionMessage.decode(skdm_bytes)
    assert skdm == alice.distribution()
    assert skdm.encode() == skdm_bytes
    assert (skdm.group_id, skdm.chain_id, skdm.iteration) == (GROUP, alice.chain_id, 0)
    assert skdm.signing_key == alice.signing_key
    message = alice.encrypt(b"round trip")
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
    alice.encrypt(b"one")
    copy = OutboundSenderKey.from_bytes(alice.to_bytes())
    assert copy.to_bytes() == alice.to_bytes()
    # Deterministic encryption (derived IV, Ed25519): both produce the same bytes.
    assert copy.encrypt(b"two") == alice.encrypt(b"two")
    assert copy.distribution_message() == alice.distribution_message()


def test_record_pickle_round_trip() -> None:
    record = RECEIVER_WITH_HISTORY()
    for name in (b"r1", b"r2"):
        rotated = new_sender(name)
        record.process_distribution(rotated.distribution_message())
        record.decrypt(advanced(rotated, 3).encrypt(b"x"))
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
    skdm = alice.distribution_message()
    before = bob.to_bytes()
    bob.process_distribution(skdm)
    bob.process_distribution(SenderKeyDistributionMessage.decode(skdm))
    assert bob.to_bytes() == before


def test_older_skdm_does_not_roll_the_chain_back() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    old_skdm = alice.distribution_message()
    first = alice.encrypt(b"0")
    alice.encrypt(b"1")  # lost: its key stays stored
    bob.decrypt(alice.encrypt(b"2"))
    bob.decrypt(first)
    before = bob.to_bytes()
    bob.process_distribution(old_skdm)
    assert bob.to_bytes() == before
    refuse_decrypt(bob, first, DuplicateMessage)


def test_newer_skdm_of_the_same_chain_keeps_skipped_keys() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    missed = alice.encrypt(b"missed")
    bob.decrypt(alice.encrypt(b"seen"))
    before = bob.to_bytes()
    # A re-share later in the chain (after a 1:1 reset, say) derives from ours.
    bob.process_distribution(advanced(alice, 50).distribution_message())
    assert bob.to_bytes() == before
    assert bob.decrypt(missed) == b"missed"


def test_same_chain_id_with_other_keys_replaces_the_state() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    bob.decrypt(alice.encrypt(b"old chain"))
    # Same chain id and signing key, but a chain key that does not derive from ours.
    other_chain = OutboundSenderKey(
        group_id=GROUP,
        chain_id=alice.chain_id,
        iteration=5,
        chain_key=bytes(32),
        signing_key=p.ed25519_private_from_bytes(signing_seed_of(alice)),
        created_at=NOW,
    )
    bob.process_distribution(other_chain.distribution_message())
    assert [(c.chain_id, c.iteration) for c in bob.chains] == [(alice.chain_id, 5)]
    assert bob.decrypt(other_chain.encrypt(b"new chain")) == b"new chain"
    # Same chain id, another signing key: replaced too, even at an older iteration.
    rekeyed = forger(alice.chain_id, 0, bytes(32))
    bob.process_distribution(rekeyed.distribution_message())
    assert [(c.chain_id, c.signing_key) for c in bob.chains] == [
        (alice.chain_id, rekeyed.signing_key)
    ]
    assert bob.decrypt(rekeyed.encrypt(b"rekeyed")) == b"rekeyed"


def test_newer_skdm_beyond_the_jump_limit_replaces_the_state() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    missed = alice.encrypt(b"missed")
    # Bob's chain is at 0; this SKDM is at 11, one step beyond what he may derive.
    bob.process_distribution(advanced(alice, 10).distribution_message(), max_forward_jump=10)
    assert bob.chains[0].iteration == 11
    refuse_decrypt(bob, missed, DuplicateMessage)


def test_skdm_for_another_group_is_misuse() -> None:
    record = SenderKeyRecord(OTHER_GROUP)
    refused(
        record,
        InvalidArgument,
        lambda r: r.process_distribution(new_sender().distribution_message()),
    )
    refused(record, InvalidArgument, lambda r: r.process_distribution("skdm"))  # type: ignore[arg-type]


def test_record_keeps_five_states_across_rotations() -> None:
    bob = SenderKeyRecord(GROUP)
    senders = [new_sender(b"alice %d" % n) for n in range(consts.MAX_SENDER_KEY_STATES + 1)]
    in_flight = []
    for sender in senders[: consts.MAX_SENDER_KEY_STATES]:
        bob.process_distribution(sender.distribution_message())
        in_flight.append(sender.encrypt(b"sent with %d" % sender.chain_id))
    assert [c.chain_id for c in bob.chains] == [s.chain_id for s in reversed(senders[:5])]
    # Messages sent before each rotation still decrypt.
    for sender, message in zip(senders, in_flight, strict=False):
        assert bob.decrypt(message) == b"sent with %d" % sender.chain_id
    # A sixth key pushes out the oldest.
    bob.process_distribution(senders[5].distribution_message())
    assert len(bob.chains) == consts.MAX_SENDER_KEY_STATES
    refuse_decrypt(bob, senders[0].encrypt(b"gone"), NoSenderKey)
    assert bob.decrypt(senders[1].encrypt(b"kept")) == b"kept"


def test_max_states_parameter() -> None:
    bob = SenderKeyRecord(GROUP)
    for n in range(3):
        bob.process_distribution(new_sender(b"%d" % n).distribution_message(), max_states=2)
    assert len(bob.chains) == 2
    with pytest.raises(InvalidArgument):
        bob.process_distribution(new_sender().distribution_message(), max_states=0)


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
        alice.encrypt(b"")
    assert alice.messages_sent == 3
    assert alice.needs_rotation(NOW, max_messages=3)
    assert not alice.needs_rotation(NOW, max_messages=4)
    assert advanced(alice, consts.SENDER_KEY_MAX_MESSAGES - 3).needs_rotation(NOW)


def test_spent_chain_refuses_to_encrypt() -> None:
    last = consts.MAX_SENDER_KEY_ITERATION
    alice = forger(7, last, bytes(32))
    bob = SenderKeyRecord(GROUP)
    bob.process_distribution(alice.distribution_message())
    assert bob.decrypt(alice.encrypt(b"last")) == b"last"
    assert bob.chains[0].iteration == 2**32 - 1
    assert SenderKeyRecord.from_bytes(bob.to_bytes()).to_bytes() == bob.to_bytes()
    assert alice.needs_rotation(NOW, max_messages=2**32 - 1)  # the largest allowed
    with pytest.raises(InvalidState):
        alice.encrypt(b"one too many")
    assert OutboundSenderKey.from_bytes(alice.to_bytes()).iteration == 2**32 - 1


def test_argument_checks() -> None:
    alice = new_sender()
    with pytest.raises(InvalidArgument):
        alice.encrypt(bytes(consts.MAX_PLAINTEXT_SIZE + 1))
    with pytest.raises(InvalidArgument):
        alice.encrypt("text")  # type: ignore[arg-type]
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
        bob.decrypt(alice.encrypt(b"x"), max_message_keys=-1)
    with pytest.raises(InvalidArgument):
        bob.decrypt(alice.encrypt(b"x"), max_forward_jump=1.5)  # type: ignore[arg-type]


def test_largest_plaintext() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    big = bytes(range(256)) * (consts.MAX_PLAINTEXT_SIZE // 256)
    assert bob.decrypt(alice.encrypt(big)) == big


def test_reprs_hold_no_secrets() -> None:
    alice = new_sender()
    bob = receiver_of(alice)
    message = alice.encrypt(b"secret plaintext")
    secrets = [chain_key_of(alice).hex(), signing_seed_of(alice).hex()]
    parsed = SenderKeyMessage.decode(message)
    texts = [
        repr(alice),
        repr(bob),
        repr(alice.distribution()),
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
        iteration: len(advanced(alice, iteration).encrypt(bytes(100)))
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
    bob.process_distribution(alice.distribution_message())
    iv, key, next_key = independent_chain(chain_key, iteration)
    plaintext = b"known answer %d" % iteration
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    expected = encryptor.update(padded) + encryptor.finalize()
    sender = advanced(alice, iteration)
    message = sender.encrypt(plaintext)
    assert SenderKeyMessage.decode(message).ciphertext == expected
    assert chain_key_of(sender) == next_key
    assert bob.decrypt(message) == plaintext


# ------------------------------------------------------------------ delivery property


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 29), max_size=60))
def test_any_delivery_order_decrypts_each_message_once(order: list[int]) -> None:
    """Against a model: the chain position and the ten newest stored skipped keys."""
    limit = 10
    alice = new_sender()
    bob = receiver_of(alice)
    messages = [alice.encrypt(b"%d" % i) for i in range(30)]
    position = 0  # the model's next iteration
    stored: list[int] = []  # and the iterations whose keys it keeps, oldest first
    for index in order:
        if index < position and index not in stored:
            refuse_decrypt(bob, messages[index], DuplicateMessage, max_message_keys=limit)
            continue
        assert bob.decrypt(messages[index], max_message_keys=limit) == b"%d" % index
        if index < position:
            stored.remove(index)
        else:
            stored = [*stored, *range(position, index)][-limit:]
            position = index + 1
        assert (bob.chains[0].iteration, bob.chains[0].skipped_keys) == (position, len(stored))
