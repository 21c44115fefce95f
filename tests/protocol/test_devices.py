"""Signed device lists: encoding, verification, and update rules."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hushchat.protocol import consts
from hushchat.protocol.devices import (
    DeviceChanges,
    DeviceEntry,
    DeviceList,
    SignedDeviceList,
    check_device_keys,
    check_update,
    device_changes,
    device_proof_message,
)
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.errors import (
    BadDeviceProof,
    BadSignature,
    DecodeError,
    DuplicateDeviceKey,
    InvalidArgument,
    InvalidKey,
    NonCanonicalEncoding,
    ProtocolError,
    StaleChange,
    UnauthorizedChange,
    UnknownVersion,
    UntrustedIdentity,
)
from hushchat.protocol.keys import IdentityKeyPair
from tests.support.reference import SMALL_ORDER_KEY
from tests.support.users import keypair

CTX = consts.DEVICE_LIST_SIGNATURE_CONTEXT


ALICE = keypair("user:alice")
MALLORY = keypair("user:mallory")
DEVICE_KEYS = [keypair(f"alice/{i}") for i in range(consts.MAX_DEVICES_PER_USER + 1)]


def entry(
    device_id: int,
    key_index: int | None = None,
    *,
    user_id: str = "alice",
    user: IdentityKeyPair = ALICE,
) -> DeviceEntry:
    """Device ``device_id`` (key ``key_index``, default the same), proved for ``user_id``."""
    key = DEVICE_KEYS[device_id if key_index is None else key_index]
    return DeviceEntry.prove(key, user_id, device_id, user.public.ed25519)


def alice_list(*device_ids: int, counter: int = 0) -> DeviceList:
    return DeviceList(
        "alice", ALICE.public.ed25519, counter, tuple(entry(i) for i in sorted(device_ids))
    )


def raw(
    device_id: int, key: IdentityKeyPair | None = None, *, user: IdentityKeyPair = ALICE
) -> list[Any]:
    """A device entry as the body holds it: id, key (default DEVICE_KEYS[id]), proof for alice."""
    key = key or DEVICE_KEYS[device_id]
    return list(DeviceEntry.prove(key, "alice", device_id, user.public.ed25519).to_wire())


def signed_raw(body_fields: list[Any], signer: IdentityKeyPair = ALICE) -> bytes:
    """A validly signed list whose body is ``body_fields`` packed as given."""
    body = pack(body_fields)
    return pack([body, signer.sign(CTX + body)])


def raw_body(devices: list[list[Any]], **over: Any) -> list[Any]:
    fields = {
        "version": consts.PROTOCOL_VERSION,
        "user_id": "alice",
        "identity": ALICE.public.ed25519,
        "counter": 7,
    }
    fields.update(over)
    return [fields["version"], fields["user_id"], fields["identity"], fields["counter"], devices]


# ------------------------------------------------------------------ round trips


def test_round_trip_is_exact() -> None:
    signed = alice_list(1, 2, 5, counter=3).sign(ALICE)
    wire = signed.encode()
    decoded = SignedDeviceList.decode(wire)
    assert decoded == signed
    assert decoded.device_list == alice_list(1, 2, 5, counter=3)
    assert decoded.encode() == wire


def test_wire_layout() -> None:
    signed = alice_list(3, 4, counter=9).sign(ALICE)
    body, signature = unpack(signed.encode(), what="test")
    assert body == signed.body
    assert unpack(body, what="test") == [
        consts.PROTOCOL_VERSION,
        "alice",
        ALICE.public.ed25519,
        9,
        [raw(3), raw(4)],
    ]
    ALICE.public.verify(signature, CTX + body)


def test_initial_sorts_devices_and_starts_at_zero() -> None:
    dl = DeviceList.initial("alice", ALICE.public.ed25519, [entry(4), entry(1)])
    assert dl.counter == 0
    assert dl.device_ids == (1, 4)


def test_extreme_values_round_trip() -> None:
    uid = "ü" * (consts.MAX_USER_ID_SIZE // 2)
    dl = DeviceList(
        uid,
        ALICE.public.ed25519,
        2**64 - 1,
        (
            *(entry(i, user_id=uid) for i in range(consts.MAX_DEVICES_PER_USER - 1)),
            DeviceEntry.prove(DEVICE_KEYS[-1], uid, 2**32 - 1, ALICE.public.ed25519),
        ),
    )
    signed = dl.sign(ALICE)
    assert SignedDeviceList.decode(signed.encode()) == signed


# ------------------------------------------------------------------ signatures


def test_flipped_signature_bit_is_refused() -> None:
    signed = alice_list(1).sign(ALICE)
    forged = bytearray(signed.signature)
    forged[5] ^= 1
    with pytest.raises(BadSignature):
        SignedDeviceList.decode(pack([signed.body, bytes(forged)]))


def test_body_changed_after_signing_is_refused() -> None:
    signed = alice_list(1).sign(ALICE)
    other = alice_list(1, 2).encode_body()
    with pytest.raises(BadSignature):
        SignedDeviceList.decode(pack([other, signed.signature]))


def test_signature_by_another_key_is_refused() -> None:
    with pytest.raises(BadSignature):
        SignedDeviceList.decode(signed_raw(raw_body([raw(1)]), MALLORY))


def test_signature_without_context_is_refused() -> None:
    body = alice_list(1).encode_body()
    with pytest.raises(BadSignature):
        SignedDeviceList.decode(pack([body, ALICE.sign(body)]))


def test_sign_with_wrong_user_key_is_local_error() -> None:
    with pytest.raises(InvalidArgument):
        alice_list(1).sign(MALLORY)


def test_list_under_substituted_user_identity_is_untrusted() -> None:
    held = alice_list(1, counter=1)
    # Mallory signs a list naming herself as Alice's user identity: it
    # verifies on its own, so only the update check against the held list stops it.
    forged = SignedDeviceList.decode(
        signed_raw(
            raw_body(
                [raw(1, user=MALLORY), raw(2, MALLORY, user=MALLORY)],
                identity=MALLORY.public.ed25519,
                counter=2,
            ),
            MALLORY,
        )
    )
    with pytest.raises(UntrustedIdentity):
        check_update(held, forged.device_list)


# ------------------------------------------------------------------ proofs of possession
# Mallory's attack: list another user's device key as her own, so that a
# relay stamping alice's messages as mallory's makes them read as hers.

BOB = keypair("user:bob")


def bob_entry(device_id: int, key: IdentityKeyPair) -> list[Any]:
    return list(DeviceEntry.prove(key, "bob", device_id, BOB.public.ed25519).to_wire())


def test_a_device_without_its_own_proof_is_refused() -> None:
    """Mallory names alice's device key; she can sign anything but alice's device's proof."""
    alice_device = DEVICE_KEYS[1]
    mallory_made = [
        # Signed by mallory's key in place of the device's.
        [
            5,
            alice_device.public.ed25519,
            MALLORY.sign(device_proof_message("bob", 5, BOB.public.ed25519)),
        ],
        # Alice's device's real proof, copied from alice's list: it names alice.
        [5, alice_device.public.ed25519, entry(5, 1).proof],
        # A proof the device made for bob's device 4, moved to device 5.
        [
            5,
            alice_device.public.ed25519,
            DeviceEntry.prove(alice_device, "bob", 4, BOB.public.ed25519).proof,
        ],
        # A proof for "bob" under another user identity.
        [
            5,
            alice_device.public.ed25519,
            DeviceEntry.prove(alice_device, "bob", 5, ALICE.public.ed25519).proof,
        ],
        # No signature at all.
        [5, alice_device.public.ed25519, bytes(64)],
    ]
    for forged in mallory_made:
        body = raw_body(
            [bob_entry(1, DEVICE_KEYS[2]), forged], user_id="bob", identity=BOB.public.ed25519
        )
        with pytest.raises(BadDeviceProof):
            SignedDeviceList.decode(signed_raw(body, BOB))


def test_a_device_entry_without_a_proof_field_is_malformed() -> None:
    body = raw_body([[1, DEVICE_KEYS[1].public.ed25519]])
    with pytest.raises(DecodeError):
        SignedDeviceList.decode(signed_raw(body))


def test_the_list_signature_is_checked_before_the_proofs() -> None:
    body = raw_body([[1, DEVICE_KEYS[1].public.ed25519, bytes(64)]])
    with pytest.raises(BadSignature) as refused:
        SignedDeviceList.decode(signed_raw(body, MALLORY))
    assert type(refused.value) is BadSignature


def test_one_device_key_under_two_ids_is_refused() -> None:
    twice = [raw(1), raw(2, DEVICE_KEYS[1])]
    with pytest.raises(DuplicateDeviceKey):
        SignedDeviceList.decode(signed_raw(raw_body(twice)))
    with pytest.raises(InvalidArgument):
        DeviceList("alice", ALICE.public.ed25519, 0, (entry(1), entry(2, 1)))


def test_signing_a_list_with_a_device_that_is_not_ours_is_a_local_error() -> None:
    stolen = DeviceEntry.prove(DEVICE_KEYS[2], "alice", 2, ALICE.public.ed25519)
    mine = DeviceList(
        "bob", BOB.public.ed25519, 0, (DeviceEntry(2, stolen.identity, stolen.proof),)
    )
    with pytest.raises(InvalidArgument):
        mine.sign(BOB)


def test_a_device_key_listed_under_another_known_user_is_refused() -> None:
    alice = alice_list(1, 2)
    # Bob's list names alice's device 2 with a proof it made for bob (a device
    # that agreed to two users, or one that was moved without being reset).
    bob = DeviceList(
        "bob",
        BOB.public.ed25519,
        0,
        (DeviceEntry.prove(DEVICE_KEYS[2], "bob", 7, BOB.public.ed25519),),
    )
    with pytest.raises(DuplicateDeviceKey):
        check_device_keys(bob, [alice])
    with pytest.raises(DuplicateDeviceKey):
        check_device_keys(alice, [bob])
    # One's own earlier list, and other users' distinct keys, are no conflict.
    check_device_keys(
        alice,
        [
            alice_list(2, 3),
            DeviceList(
                "bob",
                BOB.public.ed25519,
                0,
                (DeviceEntry.prove(DEVICE_KEYS[5], "bob", 1, BOB.public.ed25519),),
            ),
        ],
    )


# ------------------------------------------------------------------ malformed bodies


def test_reordered_device_ids_are_refused() -> None:
    devices = [raw(2), raw(1)]
    with pytest.raises(DecodeError):
        SignedDeviceList.decode(signed_raw(raw_body(devices)))


def test_duplicate_device_ids_are_refused() -> None:
    devices = [raw(1), raw(1, DEVICE_KEYS[2])]
    with pytest.raises(DecodeError):
        SignedDeviceList.decode(signed_raw(raw_body(devices)))


@pytest.mark.parametrize("count", [0, consts.MAX_DEVICES_PER_USER + 1])
def test_device_count_outside_limits_is_refused(count: int) -> None:
    devices = [raw(i) for i in range(count)]
    with pytest.raises(DecodeError):
        SignedDeviceList.decode(signed_raw(raw_body(devices)))


def test_invalid_device_identity_is_refused() -> None:
    with pytest.raises(InvalidKey):
        SignedDeviceList.decode(signed_raw(raw_body([[1, SMALL_ORDER_KEY, bytes(64)]])))


def test_invalid_user_identity_is_refused() -> None:
    body = raw_body([raw(1)], identity=SMALL_ORDER_KEY)
    with pytest.raises(InvalidKey):
        SignedDeviceList.decode(signed_raw(body))


def test_unknown_version_is_refused() -> None:
    body = raw_body([raw(1)], version=consts.PROTOCOL_VERSION + 1)
    with pytest.raises(UnknownVersion):
        SignedDeviceList.decode(signed_raw(body))


@pytest.mark.parametrize("user_id", ["", "x" * (consts.MAX_USER_ID_SIZE + 1)])
def test_user_id_outside_limits_is_refused(user_id: str) -> None:
    body = raw_body([raw(1)], user_id=user_id)
    with pytest.raises(DecodeError):
        SignedDeviceList.decode(signed_raw(body))


def test_extra_fields_are_refused() -> None:
    body = [*raw_body([raw(1)]), 0]
    with pytest.raises(DecodeError):
        SignedDeviceList.decode(signed_raw(body))
    signed = alice_list(1).sign(ALICE)
    with pytest.raises(DecodeError):
        SignedDeviceList.decode(pack([signed.body, signed.signature, b""]))


def test_non_canonical_encoding_is_refused() -> None:
    wire = alice_list(1).sign(ALICE).encode()
    # 0x92 (fixarray of 2) re-encoded as array16: same value, other bytes.
    assert wire[0] == 0x92
    with pytest.raises(NonCanonicalEncoding):
        SignedDeviceList.decode(b"\xdc\x00\x02" + wire[1:])


# ------------------------------------------------------------------ local construction


def test_constructor_refuses_unsorted_or_duplicate_devices() -> None:
    with pytest.raises(InvalidArgument):
        DeviceList("alice", ALICE.public.ed25519, 0, (entry(2), entry(1)))
    with pytest.raises(InvalidArgument):
        DeviceList("alice", ALICE.public.ed25519, 0, (entry(1), entry(1)))
    with pytest.raises(InvalidArgument):
        DeviceList("alice", ALICE.public.ed25519, 0, ())


@pytest.mark.parametrize(
    ("device_id", "identity"),
    [(-1, None), (2**32, None), (True, None), (1, SMALL_ORDER_KEY), (1, b"short")],
)
def test_device_entry_validates(device_id: Any, identity: bytes | None) -> None:
    with pytest.raises(InvalidArgument):
        DeviceEntry(device_id, identity or DEVICE_KEYS[1].public.ed25519, bytes(64))
    with pytest.raises(InvalidArgument):
        DeviceEntry(1, DEVICE_KEYS[1].public.ed25519, bytes(63))


@pytest.mark.parametrize("user_id", ["", "x" * 65, "\ud800", b"alice"])
def test_device_list_validates_user_id(user_id: Any) -> None:
    with pytest.raises(InvalidArgument):
        DeviceList(user_id, ALICE.public.ed25519, 0, (entry(1),))


def test_signed_list_constructor_checks_body() -> None:
    signed = alice_list(1).sign(ALICE)
    with pytest.raises(InvalidArgument):
        SignedDeviceList(alice_list(2).encode_body(), signed.signature, signed.device_list)


# ------------------------------------------------------------------ changes


def test_add_and_remove_increment_counter() -> None:
    dl = alice_list(1, counter=4)
    added = dl.with_device(entry(3))
    assert (added.counter, added.device_ids) == (5, (1, 3))
    removed = added.without_device(1)
    assert (removed.counter, removed.device_ids) == (6, (3,))
    check_update(dl, added)
    check_update(added, removed)


def test_invalid_changes_are_local_errors() -> None:
    dl = alice_list(1, 2)
    with pytest.raises(InvalidArgument):
        dl.with_device(entry(2))
    with pytest.raises(InvalidArgument):
        dl.without_device(3)
    with pytest.raises(InvalidArgument):
        alice_list(1).without_device(1)
    full = alice_list(*range(consts.MAX_DEVICES_PER_USER))
    with pytest.raises(InvalidArgument):
        full.with_device(entry(consts.MAX_DEVICES_PER_USER))


def test_counter_rollback_and_replay_are_stale() -> None:
    old = alice_list(1, 2, counter=5)
    with pytest.raises(StaleChange):
        check_update(old, alice_list(1, counter=4))
    with pytest.raises(StaleChange):
        check_update(old, old)
    check_update(None, old)


def test_list_for_another_user_is_refused() -> None:
    other = DeviceList("bob", ALICE.public.ed25519, 9, (entry(1),))
    with pytest.raises(UnauthorizedChange):
        check_update(alice_list(1, counter=1), other)


def test_device_changes() -> None:
    old = alice_list(1, 2, 3)
    new = DeviceList("alice", ALICE.public.ed25519, 1, (entry(1), entry(3, 7), entry(4)))
    changes = device_changes(old, new)
    assert changes == DeviceChanges(added=(entry(3, 7), entry(4)), removed=(entry(2), entry(3)))
    assert device_changes(None, old) == DeviceChanges(added=old.devices, removed=())
    assert not device_changes(old, old)


# ------------------------------------------------------------------ hostile input


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_raises_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        SignedDeviceList.decode(data)


_VALID = alice_list(1, 2, counter=3).sign(ALICE).encode()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(1, 255))
def test_any_corruption_of_a_valid_list_is_refused(position: int, flip: int) -> None:
    data = bytearray(_VALID)
    data[position] ^= flip
    with pytest.raises(ProtocolError):
        SignedDeviceList.decode(bytes(data))


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.binary(max_size=40)
        | st.text(max_size=70),
        lambda inner: st.lists(inner, max_size=6),
        max_leaves=20,
    )
)
def test_structured_garbage_raises_only_protocol_errors(value: Any) -> None:
    for data in (pack(value), pack([pack(value), b"\x00" * 64])):
        with contextlib.suppress(ProtocolError):
            SignedDeviceList.decode(data)
