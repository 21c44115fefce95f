"""Prekeys: what a device publishes so others can start sessions while it is offline.

A device publishes (X3DH section 3.2, PQXDH section 3.2):

* one signed X25519 prekey (SPK), rotated periodically;
* one-time X25519 prekeys (OPK), each handed out once by the relay;
* signed ML-KEM-768 prekeys: one last-resort key (PQSPK) and one-time ones
  (PQOPK); the relay hands out a one-time one while any remain.

Signatures are Ed25519 by the device identity over ``Encode(PK)``
(:func:`hushchat.protocol.keys.sign_prekey`). Wire layouts are in spec/06-wire-format.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from .consts import (
    ED25519_KEY_SIZE,
    ED25519_SIGNATURE_SIZE,
    MLKEM768_PUBLIC_KEY_SIZE,
    PROTOCOL_VERSION,
    X25519_KEY_SIZE,
)
from .devices import read_user_id
from .encoding import UINT32_MAX, Fields, pack
from .errors import DecodeError, UnknownVersion
from .keys import PublicIdentity, encode_mlkem768, encode_x25519, verify_prekey_signature
from .primitives import check_x25519_public


@dataclass(frozen=True, slots=True)
class SignedPreKeyPublic:
    key_id: int
    public: bytes
    signature: bytes

    def verify(self, identity: bytes) -> None:
        verify_prekey_signature(identity, encode_x25519(self.public), self.signature)

    def to_wire(self) -> list[object]:
        return [self.key_id, self.public, self.signature]

    @classmethod
    def read(cls, fields: Fields) -> SignedPreKeyPublic:
        nested = fields.nested(what="signed_prekey", count=3)
        key_id = nested.uint()
        public = check_x25519_public(nested.bin(X25519_KEY_SIZE))
        return cls(key_id, public, nested.bin(ED25519_SIGNATURE_SIZE))


@dataclass(frozen=True, slots=True)
class OneTimePreKeyPublic:
    key_id: int
    public: bytes

    def to_wire(self) -> list[object]:
        return [self.key_id, self.public]

    @classmethod
    def read_optional(cls, fields: Fields) -> OneTimePreKeyPublic | None:
        if fields.peek() is None:
            fields.raw()
            return None
        nested = fields.nested(what="one_time_prekey", count=2)
        key_id = nested.uint()
        return cls(key_id, check_x25519_public(nested.bin(X25519_KEY_SIZE)))


@dataclass(frozen=True, slots=True)
class KemPreKeyPublic:
    key_id: int
    public: bytes
    signature: bytes

    def verify(self, identity: bytes) -> None:
        verify_prekey_signature(identity, encode_mlkem768(self.public), self.signature)

    def to_wire(self) -> list[object]:
        return [self.key_id, self.public, self.signature]

    @classmethod
    def read_optional(cls, fields: Fields) -> KemPreKeyPublic | None:
        if fields.peek() is None:
            fields.raw()
            return None
        nested = fields.nested(what="kem_prekey", count=3)
        key_id = nested.uint()
        public = nested.bin(MLKEM768_PUBLIC_KEY_SIZE)
        return cls(key_id, public, nested.bin(ED25519_SIGNATURE_SIZE))


@dataclass(frozen=True, slots=True)
class PreKeyBundle:
    """One device's published keys, as the relay hands them out.

    Wire: ``[version, user_id, device_id, identity, [spk_id, spk, sig],
    [opk_id, opk] | nil, [kem_id, kem_pk, sig] | nil, kem_is_last_resort]``.
    A bundle without a KEM prekey allows only plain X3DH.
    """

    user_id: str
    device_id: int
    identity: PublicIdentity
    signed_prekey: SignedPreKeyPublic
    one_time_prekey: OneTimePreKeyPublic | None
    kem_prekey: KemPreKeyPublic | None
    kem_is_last_resort: bool

    def verify(self) -> None:
        """Check every prekey signature against the bundle's identity (BadSignature)."""
        self.signed_prekey.verify(self.identity.ed25519)
        if self.kem_prekey is not None:
            self.kem_prekey.verify(self.identity.ed25519)

    def encode(self) -> bytes:
        return pack(
            [
                PROTOCOL_VERSION,
                self.user_id,
                self.device_id,
                self.identity.ed25519,
                self.signed_prekey.to_wire(),
                None if self.one_time_prekey is None else self.one_time_prekey.to_wire(),
                None if self.kem_prekey is None else self.kem_prekey.to_wire(),
                self.kem_is_last_resort,
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> PreKeyBundle:
        """Decode and validate keys (not signatures: see :meth:`verify`)."""
        fields = Fields.decode(data, what="PreKeyBundle", count=8)
        if fields.uint() != PROTOCOL_VERSION:
            raise UnknownVersion("PreKeyBundle: unknown version")
        user_id = read_user_id(fields)
        device_id = fields.uint(UINT32_MAX)
        identity = PublicIdentity.from_bytes(fields.bin(ED25519_KEY_SIZE))
        signed_prekey = SignedPreKeyPublic.read(fields)
        one_time = OneTimePreKeyPublic.read_optional(fields)
        kem = KemPreKeyPublic.read_optional(fields)
        last_resort = fields.boolean()
        fields.end()
        if kem is None and last_resort:
            raise DecodeError("PreKeyBundle: no KEM prekey, so none is a last-resort one")
        return cls(user_id, device_id, identity, signed_prekey, one_time, kem, last_resort)


@dataclass(frozen=True, slots=True)
class PreKeyUpload:
    """What a device uploads to the relay: its public prekeys, signed where required."""

    signed_prekey: SignedPreKeyPublic
    last_resort_kem_prekey: KemPreKeyPublic
    one_time_prekeys: tuple[OneTimePreKeyPublic, ...]
    one_time_kem_prekeys: tuple[KemPreKeyPublic, ...]
