"""The sealed rows of the relay's queue: what each one holds, bound to which identity.

Each row keeps in clear only what the database needs to find, order and
delete it (its epoch, a mailbox index, a sequence number or id); the rest is
sealed under its epoch's keys (:mod:`.atrest`), with the row's identity as
associated data, so that a sealed value moved to another row, another
mailbox or another epoch does not open (spec 07 section 7.13)::

    payloads   (id, epoch, sealed)
        AD        pack(["payload", epoch, id])
        plaintext pack([sender_user, sender_device, kind, server_ts, data])
    deliveries (seq, epoch, mailbox, payload_id, sealed)
        AD        pack(["delivery", epoch, seq, mailbox, payload_id])
        plaintext pack([user_id, device_id, guid, server_ts, expires_at])
    mailboxes  (mailbox, epoch, queued, noticed, sealed)
        AD        pack(["mailbox", epoch, mailbox])
        plaintext pack([user_id, device_id, notice | nil])
        notice    [count | nil, first_ts, last_ts, noted_at]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from hushchat.protocol.devices import read_user_id
from hushchat.protocol.encoding import UINT64_MAX, Fields, pack
from hushchat.protocol.errors import DecodeError

from ...wire.records import GUID_SIZE
from .atrest import EpochKeys
from .interface import ExpiryNotice


@dataclass(frozen=True, slots=True)
class PayloadContent:
    """What a payload row holds: the send's stamped sender, kind, time and ciphertext."""

    sender_user: str
    sender_device: int
    kind: int
    server_ts: int
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class DeliveryContent:
    """What a delivery row holds: its recipient, guid and times."""

    user_id: str
    device_id: int
    guid: bytes
    server_ts: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class MailboxContent:
    """What a mailbox row holds: whose it is, and an expiry notice not yet told."""

    user_id: str
    device_id: int
    notice: ExpiryNotice | None = None
    noted_at: int = 0


def payload_ad(epoch: int, payload_id: int) -> bytes:
    return pack(["payload", epoch, payload_id])


def delivery_ad(epoch: int, seq: int, mailbox: bytes, payload_id: int) -> bytes:
    return pack(["delivery", epoch, seq, mailbox, payload_id])


def mailbox_ad(epoch: int, mailbox: bytes) -> bytes:
    return pack(["mailbox", epoch, mailbox])


def seal_payload(
    keys: EpochKeys, payload_id: int, content: PayloadContent, nonce: bytes | None = None
) -> bytes:
    plaintext = pack(
        [
            content.sender_user,
            content.sender_device,
            content.kind,
            content.server_ts,
            content.data,
        ]
    )
    return keys.seal(payload_ad(keys.epoch, payload_id), plaintext, nonce)


def open_payload(keys: EpochKeys, payload_id: int, sealed: bytes) -> PayloadContent | None:
    fields = _opened(keys, payload_ad(keys.epoch, payload_id), sealed, 5)
    if fields is None:
        return None
    try:
        return PayloadContent(
            read_user_id(fields, stored=True),
            fields.uint(),
            fields.uint(),
            fields.uint(UINT64_MAX),
            fields.bin(),
        )
    except DecodeError:
        return None


def seal_delivery(
    keys: EpochKeys,
    seq: int,
    mailbox: bytes,
    payload_id: int,
    content: DeliveryContent,
    nonce: bytes | None = None,
) -> bytes:
    plaintext = pack(
        [
            content.user_id,
            content.device_id,
            content.guid,
            content.server_ts,
            content.expires_at,
        ]
    )
    return keys.seal(delivery_ad(keys.epoch, seq, mailbox, payload_id), plaintext, nonce)


def open_delivery(
    keys: EpochKeys, seq: int, mailbox: bytes, payload_id: int, sealed: bytes
) -> DeliveryContent | None:
    fields = _opened(keys, delivery_ad(keys.epoch, seq, mailbox, payload_id), sealed, 5)
    if fields is None:
        return None
    try:
        return DeliveryContent(
            read_user_id(fields, stored=True),
            fields.uint(),
            fields.bin(GUID_SIZE),
            fields.uint(UINT64_MAX),
            fields.uint(UINT64_MAX),
        )
    except DecodeError:
        return None


def seal_mailbox(
    keys: EpochKeys, mailbox: bytes, content: MailboxContent, nonce: bytes | None = None
) -> bytes:
    notice: list[Any] | None = None
    if content.notice is not None:
        n = content.notice
        notice = [n.count, n.first_ts, n.last_ts, content.noted_at]
    plaintext = pack([content.user_id, content.device_id, notice])
    return keys.seal(mailbox_ad(keys.epoch, mailbox), plaintext, nonce)


def open_mailbox(keys: EpochKeys, mailbox: bytes, sealed: bytes) -> MailboxContent | None:
    fields = _opened(keys, mailbox_ad(keys.epoch, mailbox), sealed, 3)
    if fields is None:
        return None
    try:
        user_id, device_id = read_user_id(fields, stored=True), fields.uint()
        if fields.peek() is None:
            return MailboxContent(user_id, device_id)
        notice = fields.nested(what="notice", count=4)
        told = ExpiryNotice(
            notice.optional_uint(), notice.uint(UINT64_MAX), notice.uint(UINT64_MAX)
        )
        return MailboxContent(user_id, device_id, told, notice.uint(UINT64_MAX))
    except DecodeError:
        return None


def _opened(keys: EpochKeys, associated: bytes, sealed: bytes, count: int) -> Fields | None:
    plaintext = keys.open(associated, sealed)
    if plaintext is None:
        return None
    try:
        # Authenticated as the relay's own seal: typed reads suffice, without the
        # canonical-encoding checks a peer's bytes get.
        value = msgpack.unpackb(plaintext, raw=False, strict_map_key=True)
        return Fields(value, what="sealed row", count=count)
    except (DecodeError, ValueError, msgpack.UnpackException):
        return None
