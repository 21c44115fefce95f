"""Safety numbers: agreement, sensitivity, the scannable form, and a known answer
computed here without the library."""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from hushchat.protocol.errors import (
    DecodeError,
    FingerprintMismatch,
    InvalidArgument,
    UnknownVersion,
)
from hushchat.protocol.fingerprint import SafetyNumber, fingerprint_hash
from hushchat.protocol.keys import IdentityKeyPair

ALICE = IdentityKeyPair(bytes([1]) * 32).public.ed25519
BOB = IdentityKeyPair(bytes([2]) * 32).public.ed25519
MALLORY = IdentityKeyPair(bytes([3]) * 32).public.ed25519
# Signal's iteration count; the reference below must agree with it.
ITERATIONS = 5200


def reference_fingerprint(stable_id: str, key: bytes) -> bytes:
    """libsignal's NumericFingerprintGenerator with hushchat's key encoding (0x06 || Ed25519)."""
    encoded = b"\x06" + key
    digest = b"\x00\x00" + encoded + stable_id.encode()
    for _ in range(ITERATIONS):
        digest = hashlib.sha512(digest + encoded).digest()
    return digest


def reference_digits(digest: bytes) -> str:
    chunks = (int.from_bytes(digest[i : i + 5], "big") for i in range(0, 30, 5))
    return "".join(str(chunk % 100000).zfill(5) for chunk in chunks)


def test_known_answer() -> None:
    alice, bob = reference_fingerprint("alice", ALICE), reference_fingerprint("bob", BOB)
    expected = "".join(sorted([reference_digits(alice), reference_digits(bob)]))
    number = SafetyNumber.compute("alice", ALICE, "bob", BOB)
    assert number.digits == expected
    assert (number.local_fingerprint, number.remote_fingerprint) == (alice, bob)
    assert fingerprint_hash("alice", ALICE) == alice
    assert number.scannable() == msgpack.packb([0, alice[:32], bob[:32]], use_bin_type=True)
    # Pinned: catches a change made to both the library and the reference.
    assert expected == "472050659946031021483873417895917126411672281278319480113786"


def test_both_sides_compute_the_same_number() -> None:
    ours = SafetyNumber.compute("alice", ALICE, "bob", BOB)
    theirs = SafetyNumber.compute("bob", BOB, "alice", ALICE)
    assert ours.digits == theirs.digits
    assert len(ours.digits) == 60 and ours.digits.isdigit()
    groups = ours.grouped().split(" ")
    assert len(groups) == 12 and "".join(groups) == ours.digits


def test_different_inputs_give_different_numbers() -> None:
    base = SafetyNumber.compute("alice", ALICE, "bob", BOB, iterations=50).digits
    for other in [
        SafetyNumber.compute("alice", ALICE, "bob", MALLORY, iterations=50),
        SafetyNumber.compute("alice", MALLORY, "bob", BOB, iterations=50),
        SafetyNumber.compute("alice", ALICE, "bobby", BOB, iterations=50),
        SafetyNumber.compute("alice", ALICE, "bob", BOB, iterations=51),
    ]:
        assert other.digits != base
    with pytest.raises(InvalidArgument):
        fingerprint_hash("alice", ALICE, iterations=0)


def test_scanning() -> None:
    ours = SafetyNumber.compute("alice", ALICE, "bob", BOB, iterations=50)
    theirs = SafetyNumber.compute("bob", BOB, "alice", ALICE, iterations=50)
    ours.verify_scanned(theirs.scannable())
    theirs.verify_scanned(ours.scannable())
    mallory = SafetyNumber.compute("bob", MALLORY, "alice", ALICE, iterations=50)
    for wrong in [mallory.scannable(), ours.scannable()]:
        with pytest.raises(FingerprintMismatch):
            ours.verify_scanned(wrong)
    code = theirs.scannable()
    with pytest.raises(UnknownVersion):
        ours.verify_scanned(msgpack.packb([1, *msgpack.unpackb(code)[1:]], use_bin_type=True))
    for malformed in [code[:-1], code + b"\0", b"", msgpack.packb([0, b"", b""])]:
        with pytest.raises(DecodeError):
            ours.verify_scanned(malformed)
