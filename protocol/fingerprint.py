"""Safety numbers: Signal's numeric fingerprint construction.

Per party (libsignal ``fingerprint.rs``; NumericFingerprintGenerator)::

    H_0 = version (u16 big-endian, 0) || Encode(IK) || stable_id
    H_i = SHA-512(H_{i-1} || Encode(IK))     for i = 1 .. FINGERPRINT_ITERATIONS
    digits = for each of the first six 5-byte chunks c of H_n:
             (big-endian integer c) mod 100000, zero-padded to 5 digits

``Encode(IK)`` is the user identity's Ed25519 encoding (0x06 || key) and
``stable_id`` the user id in UTF-8. The 60-digit safety number is the two
30-digit strings concatenated, the smaller first, so both sides compute the
same number. The scannable form is msgpack
``[version, local fingerprint[0:32], remote fingerprint[0:32]]``.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from .consts import FINGERPRINT_ITERATIONS, FINGERPRINT_VERSION
from .encoding import Fields, pack
from .errors import FingerprintMismatch, InvalidArgument, UnknownVersion
from .keys import encode_ed25519
from .primitives import sha512


def fingerprint_hash(
    stable_id: str, identity: bytes, *, iterations: int = FINGERPRINT_ITERATIONS
) -> bytes:
    """The iterated SHA-512 of one party's identity (64 bytes)."""
    if iterations < 1:
        raise InvalidArgument("iterations must be positive")
    key = encode_ed25519(identity)
    digest = FINGERPRINT_VERSION.to_bytes(2, "big") + key + stable_id.encode()
    for _ in range(iterations):
        digest = sha512(digest + key)
    return digest


def displayable(digest: bytes) -> str:
    """30 digits from the first 30 bytes of a fingerprint hash."""
    return "".join(
        f"{int.from_bytes(digest[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5)
    )


@dataclass(frozen=True, slots=True)
class SafetyNumber:
    """What two users compare out of band: 60 digits, or a scannable code."""

    digits: str
    local_fingerprint: bytes
    remote_fingerprint: bytes

    @classmethod
    def compute(
        cls,
        local_id: str,
        local_identity: bytes,
        remote_id: str,
        remote_identity: bytes,
        *,
        iterations: int = FINGERPRINT_ITERATIONS,
    ) -> SafetyNumber:
        local = fingerprint_hash(local_id, local_identity, iterations=iterations)
        remote = fingerprint_hash(remote_id, remote_identity, iterations=iterations)
        a, b = displayable(local), displayable(remote)
        return cls(a + b if a <= b else b + a, local, remote)

    def grouped(self) -> str:
        """The digits in twelve groups of five, as apps show them."""
        return " ".join(self.digits[i : i + 5] for i in range(0, 60, 5))

    def scannable(self) -> bytes:
        return pack(
            [FINGERPRINT_VERSION, self.local_fingerprint[:32], self.remote_fingerprint[:32]]
        )

    def verify_scanned(self, scanned: bytes) -> None:
        """Compare the other side's scannable code with ours; FingerprintMismatch if they differ."""
        fields = Fields.decode(scanned, what="scannable fingerprint", count=3)
        if fields.uint() != FINGERPRINT_VERSION:
            raise UnknownVersion("scannable fingerprint: unknown version")
        their_local, their_remote = fields.bin(32), fields.bin(32)
        fields.end()
        # Their "local" is our "remote" and the other way round.
        same = hmac.compare_digest(their_local, self.remote_fingerprint[:32])
        same &= hmac.compare_digest(their_remote, self.local_fingerprint[:32])
        if not same:
            raise FingerprintMismatch("safety numbers differ: identity keys do not match")
