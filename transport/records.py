"""Values shared by the relay's frames, its storage and the client: prekeys and envelopes.

Each is a frozen dataclass with its positional wire form (``to_wire`` and
``read`` over a :class:`protocol.encoding.Fields`). Sizes are checked on
read; signatures and key validity are checked by the relay on upload and by
the protocol core on use. Reprs show ids and sizes only, never key bytes or
payloads, so these values are safe to log.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from protocol.consts import (
    ED25519_SIGNATURE_SIZE,
    MAX_USER_ID_SIZE,
    MLKEM768_PUBLIC_KEY_SIZE,
    X25519_KEY_SIZE,
)
from protocol.devices import check_user_id
from protocol.encoding import UINT64_MAX, Fields, pack
from protocol.errors import DecodeError

from .limits import MAX_FRAME_SIZE

# Envelope ids: 16 random bytes chosen by the relay (as a UUID), unique per
# delivery, named by the recipient's acknowledgement.
GUID_SIZE = 16


class EnvelopeKind(IntEnum):
    """What a payload is; the relay sets it from the kind of send and never reads the payload."""

    DIRECT = 1  # a one-to-one Double Ratchet message (SEND_DIRECT)
    GROUP = 2  # a group sender-key message (SEND_GROUP)


@dataclass(frozen=True, slots=True)
class SignedPreKey:
    """A signed X25519 prekey: ``[id u32, public bin32, signature bin64]``."""

    key_id: int
    public: bytes
    signature: bytes

    def to_wire(self) -> list[Any]:
        return [self.key_id, self.public, self.signature]

    @classmethod
    def read(cls, fields: Fields) -> SignedPreKey:
        key_id = fields.uint()
        public = fields.bin(X25519_KEY_SIZE)
        signature = fields.bin(ED25519_SIGNATURE_SIZE)
        fields.end()
        return cls(key_id, public, signature)

    def __repr__(self) -> str:
        return f"SignedPreKey(id={self.key_id})"


@dataclass(frozen=True, slots=True)
class OneTimePreKey:
    """A one-time X25519 prekey: ``[id u32, public bin32]`` (unsigned, as in X3DH)."""

    key_id: int
    public: bytes

    def to_wire(self) -> list[Any]:
        return [self.key_id, self.public]

    @classmethod
    def read(cls, fields: Fields) -> OneTimePreKey:
        key_id = fields.uint()
        public = fields.bin(X25519_KEY_SIZE)
        fields.end()
        return cls(key_id, public)

    def __repr__(self) -> str:
        return f"OneTimePreKey(id={self.key_id})"


@dataclass(frozen=True, slots=True)
class KemPreKey:
    """A signed ML-KEM-768 prekey: ``[id u32, public bin1184, signature bin64]``."""

    key_id: int
    public: bytes
    signature: bytes

    def to_wire(self) -> list[Any]:
        return [self.key_id, self.public, self.signature]

    @classmethod
    def read(cls, fields: Fields) -> KemPreKey:
        key_id = fields.uint()
        public = fields.bin(MLKEM768_PUBLIC_KEY_SIZE)
        signature = fields.bin(ED25519_SIGNATURE_SIZE)
        fields.end()
        return cls(key_id, public, signature)

    def __repr__(self) -> str:
        return f"KemPreKey(id={self.key_id})"


@dataclass(frozen=True, slots=True)
class PreKeyCounts:
    """One-time prekeys a device has left at the relay, of each kind."""

    one_time: int
    one_time_kem: int


@dataclass(frozen=True, slots=True)
class Envelope:
    """One delivery to a device, as the relay pushes it.

    Wire: ``[guid bin16, server_ts u64 (ms), sender_user str, sender_device
    u32, kind u32, payload bin]``. The sender fields are stamped by the
    relay from the sending connection's authentication; the payload is
    opaque ciphertext. Acknowledge by ``guid`` once it is processed.
    """

    guid: bytes
    server_ts: int
    sender_user: str
    sender_device: int
    kind: int
    payload: bytes

    def to_wire(self) -> list[Any]:
        return [
            self.guid,
            self.server_ts,
            self.sender_user,
            self.sender_device,
            self.kind,
            self.payload,
        ]

    @classmethod
    def read(cls, fields: Fields) -> Envelope:
        guid = fields.bin(GUID_SIZE)
        server_ts = fields.uint(UINT64_MAX)
        sender_user = check_user_id(fields.text(MAX_USER_ID_SIZE), DecodeError)
        sender_device = fields.uint()
        kind = fields.uint()
        payload = fields.bin()
        fields.end()
        return cls(guid, server_ts, sender_user, sender_device, kind, payload)

    def encode(self) -> bytes:
        """The canonical msgpack of the wire array (for a client's own persistence)."""
        return pack(self.to_wire())

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        return cls.read(Fields.decode(data, what="envelope", count=6, max_size=MAX_FRAME_SIZE))

    def __repr__(self) -> str:
        return (
            f"Envelope(guid={self.guid.hex()}, server_ts={self.server_ts}, "
            f"sender={self.sender_user!r}/{self.sender_device}, kind={self.kind}, "
            f"payload=<{len(self.payload)} bytes>)"
        )
