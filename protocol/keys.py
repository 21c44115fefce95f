"""Identity keys, their encodings, and prekey signatures.

Encodings (spec/00-conventions.md): one type byte, then the raw key.
``0x05`` X25519 (32 bytes), ``0x06`` Ed25519 (32), ``0x0B`` ML-KEM-768
(1184). The type bytes differ, so the encodings' ranges are disjoint as
PQXDH revision 2 requires.

An identity is an Ed25519 key pair. It signs; for Diffie-Hellman it is
converted to X25519 (libsodium's map), once, and the result is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import primitives as p
from .consts import KEY_TYPE_ED25519, KEY_TYPE_MLKEM768, KEY_TYPE_X25519
from .errors import InvalidKey


def encode_x25519(public: bytes) -> bytes:
    return bytes([KEY_TYPE_X25519]) + public


def encode_ed25519(public: bytes) -> bytes:
    return bytes([KEY_TYPE_ED25519]) + public


def encode_mlkem768(public: bytes) -> bytes:
    return bytes([KEY_TYPE_MLKEM768]) + public


def sign_prekey(identity: IdentityKeyPair, encoded_prekey: bytes) -> bytes:
    """Sig(IK, Encode(PK)) as X3DH and PQXDH define it."""
    return identity.sign(encoded_prekey)


def verify_prekey_signature(
    identity_public: bytes, encoded_prekey: bytes, signature: bytes
) -> None:
    """Check a prekey signature made by :func:`sign_prekey`; BadSignature if not."""
    p.ed25519_verify(identity_public, signature, encoded_prekey)


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """Someone's Ed25519 identity public key, with its X25519 form computed once.

    Construct with :meth:`from_bytes`, which refuses keys that do not decode,
    have small order or lie outside the prime-order subgroup.
    """

    ed25519: bytes
    x25519: bytes = field(repr=False, compare=False)

    @classmethod
    def from_bytes(cls, ed25519_public: bytes) -> PublicIdentity:
        return cls(ed25519_public, identity_to_x25519(ed25519_public))

    def encode(self) -> bytes:
        return encode_ed25519(self.ed25519)

    def verify(self, signature: bytes, message: bytes) -> None:
        p.ed25519_verify(self.ed25519, signature, message)

    def __repr__(self) -> str:
        return f"PublicIdentity({self.ed25519.hex()})"


# Conversion is costly (a square root, an inverse and one X25519), and
# identities recur on every message, so keep a small map of recent results
# (pure: same input, same output).
_CONVERTED: dict[bytes, bytes] = {}
_CONVERTED_MAX = 4096


def identity_to_x25519(ed25519_public: bytes) -> bytes:
    """The X25519 form of an identity key (InvalidKey if it is not a valid one); cached."""
    if not isinstance(ed25519_public, bytes):
        raise InvalidKey("an Ed25519 public key is bytes")
    hit = _CONVERTED.get(ed25519_public)
    if hit is None:
        hit = p.ed25519_public_to_x25519(ed25519_public)
        if len(_CONVERTED) >= _CONVERTED_MAX:
            _CONVERTED.pop(next(iter(_CONVERTED)))
        _CONVERTED[ed25519_public] = hit
    return hit


class IdentityKeyPair:
    """An Ed25519 identity key pair (a device's, or a user's)."""

    __slots__ = ("_dh", "_seed", "_signing", "public")

    def __init__(self, seed: bytes) -> None:
        self._signing: Ed25519PrivateKey = p.ed25519_private_from_bytes(seed)
        self._seed = seed
        self._dh: X25519PrivateKey = p.x25519_private_from_bytes(p.ed25519_private_to_x25519(seed))
        public = p.ed25519_public_bytes(self._signing)
        self.public = PublicIdentity(public, p.x25519_public_bytes(self._dh))

    @classmethod
    def generate(cls, rng: p.RandomSource = p.SYSTEM_RANDOM) -> IdentityKeyPair:
        return cls(rng.random_bytes(32))

    @property
    def seed(self) -> bytes:
        """The 32-byte Ed25519 seed (secret; for serialization only)."""
        return self._seed

    def sign(self, message: bytes) -> bytes:
        return p.ed25519_sign(self._signing, message)

    def dh(self, public: bytes) -> bytes:
        """X25519 of the converted private key with ``public``."""
        return p.x25519(self._dh, public)

    def __repr__(self) -> str:
        return f"IdentityKeyPair(public={self.public.ed25519.hex()})"
