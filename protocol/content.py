"""What travels inside the encryption: the plaintext formats.

Inside a one-to-one Double Ratchet message (canonical msgpack arrays)::

    Text          = [1, message_id: bin16, sent_at: u64, body: bin]
    SenderKey     = [2, distribution: bin]          (a SenderKeyDistributionMessage)
    GroupControl  = [3, control: bin, snapshot: bin | nil]
    RetryRequest  = [4, group_id: bin16, chain_id: u32 | nil]
    SentCopy      = [5, to_kind: u8 (1 user, 2 group), to: str | bin16,
                     message_id: bin16, sent_at: u64, body: bin]
    SyncRequest   = [6]
    GroupSync     = [7, states: [snapshot: bin, ...]]     (oldest first)
    DeliveryReceipt = [8, message_ids: [bin16, ...]]      (1 to MAX_RECEIPT_MESSAGE_IDS)

Inside a group (sender-key) message::

    GroupText     = [message_id: bin16, sent_at: u64, body: bin, epoch: u64, state_hash: bin32]

``epoch`` and ``state_hash`` are the sender's group state when it sent the
message, so a receiver holding another state notices
(:mod:`hushchat.protocol.split_detection`).

``SentCopy`` is what a device sends its user's other devices for every
message it sends, so each device holds the whole conversation. A newly
linked device sends ``SyncRequest`` to its user's other devices; each answers
with a ``GroupSync`` per group it holds (the recent states, as group
snapshots) and its sender key for that group. Both are accepted only from
devices of the same user. A device that received messages (``Text``,
``GroupText``) from another user tells that user's devices with a
``DeliveryReceipt`` naming them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .consts import (
    GROUP_ID_SIZE,
    MAX_GROUP_HISTORY,
    MAX_PLAINTEXT_SIZE,
    MAX_RECEIPT_MESSAGE_IDS,
)
from .devices import read_user_id
from .encoding import UINT64_MAX, Fields, pack, unpack
from .errors import DecodeError

MESSAGE_ID_SIZE = 16
# A group state hash: SHA-256 (spec/12-groups.md, section 12.1).
STATE_HASH_SIZE = 32

CONTENT_TEXT = 1
CONTENT_SENDER_KEY = 2
CONTENT_GROUP_CONTROL = 3
CONTENT_RETRY_REQUEST = 4
CONTENT_SENT_COPY = 5
CONTENT_SYNC_REQUEST = 6
CONTENT_GROUP_SYNC = 7
CONTENT_DELIVERY_RECEIPT = 8

SENT_TO_USER = 1
SENT_TO_GROUP = 2


@dataclass(frozen=True, slots=True)
class Text:
    message_id: bytes
    sent_at: int
    body: bytes = field(repr=False)

    def encode(self) -> bytes:
        return pack([CONTENT_TEXT, self.message_id, self.sent_at, self.body])


@dataclass(frozen=True, slots=True)
class SenderKey:
    distribution: bytes = field(repr=False)

    def encode(self) -> bytes:
        return pack([CONTENT_SENDER_KEY, self.distribution])


@dataclass(frozen=True, slots=True)
class GroupControl:
    control: bytes
    snapshot: bytes | None

    def encode(self) -> bytes:
        return pack([CONTENT_GROUP_CONTROL, self.control, self.snapshot])


@dataclass(frozen=True, slots=True)
class RetryRequest:
    group_id: bytes
    chain_id: int | None

    def encode(self) -> bytes:
        return pack([CONTENT_RETRY_REQUEST, self.group_id, self.chain_id])


@dataclass(frozen=True, slots=True)
class SentCopy:
    """A copy of a message this user sent from another of its devices."""

    to_user: str | None
    to_group: bytes | None
    message_id: bytes
    sent_at: int
    body: bytes = field(repr=False)

    def encode(self) -> bytes:
        kind, to = (
            (SENT_TO_USER, self.to_user)
            if self.to_user is not None
            else (SENT_TO_GROUP, self.to_group)
        )
        return pack([CONTENT_SENT_COPY, kind, to, self.message_id, self.sent_at, self.body])


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """From a newly linked device to its user's other devices: send me our groups."""

    def encode(self) -> bytes:
        return pack([CONTENT_SYNC_REQUEST])


@dataclass(frozen=True, slots=True)
class GroupSync:
    """One group's recent states (encoded snapshots, oldest first), for our own new device."""

    states: tuple[bytes, ...] = field(repr=False)

    def encode(self) -> bytes:
        return pack([CONTENT_GROUP_SYNC, list(self.states)])


@dataclass(frozen=True, slots=True)
class DeliveryReceipt:
    """A delivery receipt: the device that sends it received (and stored) these messages."""

    message_ids: tuple[bytes, ...]

    def encode(self) -> bytes:
        return pack([CONTENT_DELIVERY_RECEIPT, list(self.message_ids)])


Content = (
    Text
    | SenderKey
    | GroupControl
    | RetryRequest
    | SentCopy
    | SyncRequest
    | GroupSync
    | DeliveryReceipt
)


def decode_content(data: bytes) -> Content:
    """Decode a one-to-one plaintext; DecodeError for anything else."""
    value = unpack(data, what="content")
    if not isinstance(value, list) or not value:
        raise DecodeError("content: expected a non-empty array")
    kind = value[0]
    if kind == CONTENT_TEXT:
        f = Fields(value, what="Text", count=4)
        f.uint()
        return Text(f.bin(MESSAGE_ID_SIZE), f.uint(UINT64_MAX), f.bin(max_size=MAX_PLAINTEXT_SIZE))
    if kind == CONTENT_SENDER_KEY:
        f = Fields(value, what="SenderKey", count=2)
        f.uint()
        return SenderKey(f.bin(max_size=1024))
    if kind == CONTENT_GROUP_CONTROL:
        f = Fields(value, what="GroupControl", count=3)
        f.uint()
        return GroupControl(f.bin(), f.optional_bin())
    if kind == CONTENT_RETRY_REQUEST:
        f = Fields(value, what="RetryRequest", count=3)
        f.uint()
        return RetryRequest(f.bin(GROUP_ID_SIZE), f.optional_uint())
    if kind == CONTENT_SENT_COPY:
        f = Fields(value, what="SentCopy", count=6)
        f.uint()
        to_kind = f.uint()
        if to_kind == SENT_TO_USER:
            to_user, to_group = read_user_id(f), None
        elif to_kind == SENT_TO_GROUP:
            to_user, to_group = None, f.bin(GROUP_ID_SIZE)
        else:
            raise DecodeError("SentCopy: unknown destination kind")
        return SentCopy(
            to_user,
            to_group,
            f.bin(MESSAGE_ID_SIZE),
            f.uint(UINT64_MAX),
            f.bin(max_size=MAX_PLAINTEXT_SIZE),
        )
    if kind == CONTENT_SYNC_REQUEST:
        Fields(value, what="SyncRequest", count=1).uint()
        return SyncRequest()
    if kind == CONTENT_GROUP_SYNC:
        f = Fields(value, what="GroupSync", count=2)
        f.uint()
        states = f.array(max_len=MAX_GROUP_HISTORY + 1)
        if not states or not all(isinstance(state, bytes) for state in states):
            raise DecodeError("GroupSync: states must be 1 or more byte strings")
        return GroupSync(tuple(states))
    if kind == CONTENT_DELIVERY_RECEIPT:
        f = Fields(value, what="DeliveryReceipt", count=2)
        f.uint()
        ids = f.array(max_len=MAX_RECEIPT_MESSAGE_IDS)
        if not ids or not all(isinstance(i, bytes) and len(i) == MESSAGE_ID_SIZE for i in ids):
            raise DecodeError(
                f"DeliveryReceipt: 1 to {MAX_RECEIPT_MESSAGE_IDS} message ids "
                f"of {MESSAGE_ID_SIZE} bytes"
            )
        return DeliveryReceipt(tuple(ids))
    raise DecodeError("content: unknown content type")


@dataclass(frozen=True, slots=True)
class GroupText:
    """A group message's plaintext: the text and the sender's group state (epoch, hash)."""

    message_id: bytes
    sent_at: int
    body: bytes = field(repr=False)
    epoch: int
    state_hash: bytes

    def encode(self) -> bytes:
        return pack([self.message_id, self.sent_at, self.body, self.epoch, self.state_hash])

    @classmethod
    def decode(cls, data: bytes) -> GroupText:
        f = Fields.decode(data, what="GroupText", count=5)
        return cls(
            f.bin(MESSAGE_ID_SIZE),
            f.uint(UINT64_MAX),
            f.bin(max_size=MAX_PLAINTEXT_SIZE),
            f.uint(UINT64_MAX),
            f.bin(STATE_HASH_SIZE),
        )
