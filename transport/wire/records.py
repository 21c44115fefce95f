"""Values shared by the relay's frames, its storage and the client: envelopes and counts.

Prekeys are the protocol core's own public types
(:mod:`hushchat.protocol.prekeys`: SignedPreKeyPublic, OneTimePreKeyPublic,
KemPreKeyPublic), so what an Account publishes is uploaded as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from hushchat.protocol.devices import read_user_id
from hushchat.protocol.encoding import UINT64_MAX, Fields, pack

from .limits import MAX_FRAME_SIZE

# Envelope ids: 16 random bytes chosen by the relay (as a UUID), unique per
# delivery, named by the recipient's acknowledgement.
GUID_SIZE = 16
# A SEND_CHANGE's receipt: 16 bytes the sender chooses, returned to it alone.
RECEIPT_SIZE = 16


class EnvelopeKind(IntEnum):
    """What a payload is; the relay sets it from the kind of send and never reads the payload."""

    DIRECT = 1  # a one-to-one Double Ratchet message (SEND_DIRECT, SEND_CHANGE)
    GROUP = 2  # a group sender-key message (SEND_GROUP)
    RECEIPT = 3  # a SEND_CHANGE's receipt, in the sending device's own mailbox


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
        sender_user = read_user_id(fields)
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
