"""Inbox and outbox rows: an explicit, versioned encoding of every event and send.

The client store keeps the events the app has not taken yet (``inbox``) and
the sends the relay has not accepted yet (``outbox``). Like every wire
structure, each row is a canonical msgpack array with a version and a fixed
layout per type, written and read with :mod:`hushchat.protocol.encoding`::

    [ROW_VERSION, tag, field, ...]

The tags and layouts are below and in spec/README.md ("Client storage");
an address is ``[user_id, device_id]``. Nothing stored depends on a class's
name or the order of its fields: changing a layout means a new ROW_VERSION,
and the store rewrites older rows when it opens (:mod:`.store`,
:func:`upgrade_send` and :func:`upgrade_event`), as it rewrote the rows of
the first client, which stored class names (:func:`decode_unversioned`).
Version 1 had no message id in an encrypted send, no queued messages and no
events of the client library's own; its other tags and layouts are those of
version 2.

Decoding raises only :class:`~hushchat.protocol.errors.StateError`
(:class:`~hushchat.protocol.errors.UnknownStateVersion` for a version this
code does not know).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from enum import IntEnum
from typing import Any, Final, TypeVar, assert_never

from hushchat.protocol import group
from hushchat.protocol.client_core import (
    Address,
    ChangeSend,
    DeliveryConfirmed,
    DeviceAdded,
    DeviceRemoved,
    DirectSend,
    Event,
    GroupChangeFailed,
    GroupReplaced,
    GroupSend,
    GroupStateMismatch,
    GroupUpdated,
    IdentityChanged,
    MessageReceived,
    MessageSentByOtherDevice,
    RetryRequested,
    Send,
    Undecryptable,
)
from hushchat.protocol.consts import (
    CHANGE_RECEIPT_SIZE,
    ED25519_KEY_SIZE,
    GROUP_ID_SIZE,
    MAX_DEVICES_PER_USER,
    MAX_GROUP_MEMBERS,
    MAX_GROUP_TITLE_SIZE,
    MAX_RECEIPT_MESSAGE_IDS,
    MAX_STATE_SIZE,
)
from hushchat.protocol.content import MESSAGE_ID_SIZE, STATE_HASH_SIZE
from hushchat.protocol.devices import read_user_id
from hushchat.protocol.encoding import UINT64_MAX, Fields, pack, unpack
from hushchat.protocol.errors import DecodeError, ProtocolError, StateError, UnknownStateVersion

from ..wire.limits import MAX_RECIPIENTS_PER_SEND
from .events import (
    MessageDelivered,
    MessageNotDelivered,
    OutboxItem,
    QueuedMessage,
    QueuedReceipt,
    Resend,
    SendFailed,
    StoredEvent,
    StoredItemSetAside,
)

# Version of the row layouts below. Rows without one (an array starting with
# a string) are the first client's, read only by decode_unversioned.
ROW_VERSION: Final = 2
# The versions upgrade_send and upgrade_event read.
OLDER_ROW_VERSIONS: Final = (1,)
# Longest error code (or table or record kind name) an event row carries.
MAX_REASON_SIZE: Final = 64

# Most changes one GroupUpdated reports: every member removed and every member
# added (a whole group replaced, each identity changed) and the title.
MAX_GROUP_CHANGES: Final = 2 * MAX_GROUP_MEMBERS + 1


class EventTag(IntEnum):
    MESSAGE_RECEIVED = 1
    MESSAGE_SENT_BY_OTHER_DEVICE = 2
    DEVICE_ADDED = 3
    DEVICE_REMOVED = 4
    IDENTITY_CHANGED = 5
    UNDECRYPTABLE = 6
    GROUP_UPDATED = 7
    RETRY_REQUESTED = 8
    GROUP_CHANGE_FAILED = 9
    GROUP_REPLACED = 10
    GROUP_STATE_MISMATCH = 11
    SEND_FAILED = 12  # from version 2 on
    STORED_ITEM_SET_ASIDE = 13  # from version 2 on
    DELIVERY_CONFIRMED = 14  # from version 2 on
    MESSAGE_DELIVERED = 15  # from version 2 on
    MESSAGE_NOT_DELIVERED = 16  # from version 2 on


class SendTag(IntEnum):
    DIRECT = 1
    GROUP = 2
    CHANGE = 3
    QUEUED_DIRECT = 4  # from version 2 on
    QUEUED_GROUP = 5  # from version 2 on
    QUEUED_RECEIPT = 6  # from version 2 on
    RESEND = 7  # from version 2 on: a DIRECT or GROUP row's tag and fields follow


# The last tag of each table that version 1 had.
_LAST_VERSION_1_EVENT = EventTag.GROUP_STATE_MISMATCH
_LAST_VERSION_1_SEND = SendTag.CHANGE


class GroupChangeTag(IntEnum):
    MEMBER_ADDED = 1
    MEMBER_REMOVED = 2
    ADMIN_CHANGED = 3
    TITLE_CHANGED = 4


# ------------------------------------------------------------------ encoding


def _address(address: Address) -> list[Any]:
    return [address.user_id, address.device_id]


def _group_change(change: group.GroupEvent) -> list[Any]:
    if isinstance(change, group.MemberAdded):
        return [GroupChangeTag.MEMBER_ADDED, change.user_id, change.user_identity, change.admin]
    if isinstance(change, group.MemberRemoved):
        return [GroupChangeTag.MEMBER_REMOVED, change.user_id]
    if isinstance(change, group.AdminChanged):
        return [GroupChangeTag.ADMIN_CHANGED, change.user_id, change.admin]
    if isinstance(change, group.TitleChanged):
        return [GroupChangeTag.TITLE_CHANGED, change.title]
    assert_never(change)


def _event_fields(event: StoredEvent) -> list[Any]:
    if isinstance(event, MessageReceived):
        return [
            EventTag.MESSAGE_RECEIVED,
            _address(event.sender),
            event.message_id,
            event.sent_at,
            event.body,
            event.group_id,
        ]
    if isinstance(event, MessageSentByOtherDevice):
        return [
            EventTag.MESSAGE_SENT_BY_OTHER_DEVICE,
            _address(event.device),
            event.to_user,
            event.message_id,
            event.sent_at,
            event.body,
        ]
    if isinstance(event, DeviceAdded):
        return [EventTag.DEVICE_ADDED, _address(event.address)]
    if isinstance(event, DeviceRemoved):
        return [EventTag.DEVICE_REMOVED, _address(event.address)]
    if isinstance(event, IdentityChanged):
        return [EventTag.IDENTITY_CHANGED, event.user_id, event.old_identity, event.new_identity]
    if isinstance(event, Undecryptable):
        return [
            EventTag.UNDECRYPTABLE,
            _address(event.sender),
            event.reason,
            event.group_id,
            event.retry_requested,
        ]
    if isinstance(event, GroupUpdated):
        return [
            EventTag.GROUP_UPDATED,
            event.group_id,
            _address(event.author),
            [_group_change(change) for change in event.changes],
            event.joined,
        ]
    if isinstance(event, RetryRequested):
        return [EventTag.RETRY_REQUESTED, _address(event.requester), event.group_id]
    if isinstance(event, GroupChangeFailed):
        action = group.encode_action(event.action)
        return [EventTag.GROUP_CHANGE_FAILED, event.group_id, action, event.reason]
    if isinstance(event, GroupReplaced):
        return [
            EventTag.GROUP_REPLACED,
            event.old_group_id,
            event.new_group_id,
            _address(event.author),
        ]
    if isinstance(event, GroupStateMismatch):
        return [
            EventTag.GROUP_STATE_MISMATCH,
            event.group_id,
            _address(event.sender),
            event.relation,
            event.their_epoch,
            event.their_state_hash,
            event.our_epoch,
            event.our_state_hash,
        ]
    if isinstance(event, SendFailed):
        return [EventTag.SEND_FAILED, event.message_id, event.reason]
    if isinstance(event, StoredItemSetAside):
        return [EventTag.STORED_ITEM_SET_ASIDE, event.table, event.kind, event.reason]
    if isinstance(event, DeliveryConfirmed):
        return [EventTag.DELIVERY_CONFIRMED, _address(event.device), list(event.message_ids)]
    if isinstance(event, MessageDelivered):
        return [EventTag.MESSAGE_DELIVERED, event.message_id]
    if isinstance(event, MessageNotDelivered):
        devices = [_address(a) for a in event.devices]
        return [EventTag.MESSAGE_NOT_DELIVERED, event.message_id, devices]
    assert_never(event)


def _direct_fields(send: DirectSend) -> list[Any]:
    payloads = [[device_id, payload] for device_id, payload in send.payloads]
    return [send.recipient_user, payloads, send.content]


def _send_fields(send: OutboxItem) -> list[Any]:
    if isinstance(send, DirectSend):
        return [SendTag.DIRECT, *_direct_fields(send), send.message_id]
    if isinstance(send, GroupSend):
        recipients = [_address(a) for a in send.recipients]
        return [SendTag.GROUP, send.group_id, send.payload, recipients, send.message_id]
    if isinstance(send, ChangeSend):
        # A change's parts carry no message of the app's: no message id.
        parts = [_direct_fields(part) for part in send.parts]
        return [SendTag.CHANGE, send.group_id, send.receipt, parts]
    if isinstance(send, QueuedReceipt):
        return [SendTag.QUEUED_RECEIPT, send.to_user, list(send.message_ids)]
    if isinstance(send, Resend):
        return [SendTag.RESEND, *_send_fields(send.send)]
    if isinstance(send, QueuedMessage):
        if send.group_id is None:
            return [SendTag.QUEUED_DIRECT, send.to_user, send.message_id, send.sent_at, send.body]
        return [SendTag.QUEUED_GROUP, send.group_id, send.message_id, send.sent_at, send.body]
    assert_never(send)


def encode_event(event: StoredEvent) -> bytes:
    """The inbox row of ``event``."""
    return pack([ROW_VERSION, *_event_fields(event)])


def encode_send(send: OutboxItem) -> bytes:
    """The outbox row of ``send`` (a send, or a message still to encrypt)."""
    return pack([ROW_VERSION, *_send_fields(send)])


# ------------------------------------------------------------------ decoding

_T = TypeVar("_T")
_Tag = TypeVar("_Tag", bound=IntEnum)


def _load_row(
    data: bytes,
    what: str,
    read: Callable[[Fields, int], _T],
    versions: tuple[int, ...] = (ROW_VERSION,),
) -> _T:
    """Read a row of ``what`` with ``read`` (the fields after the version, and the version).

    ``versions``: those accepted (others are UnknownStateVersion). StateError only.
    """
    try:
        fields = Fields.decode(data, what=what, max_size=MAX_STATE_SIZE)
        version = fields.uint(UINT64_MAX)
    except DecodeError as exc:
        raise StateError(f"{what}: corrupt row ({exc.message})") from exc
    if version not in versions:
        raise UnknownStateVersion(f"{what}: row version {version} is not {ROW_VERSION}")
    try:
        result = read(fields, version)
        fields.end()
    except ProtocolError as exc:
        raise StateError(f"{what}: corrupt row ({exc.message})") from exc
    return result


def _read_address(value: object, what: str) -> Address:
    f = Fields(value, what=what, count=2)
    return Address(read_user_id(f, stored=True), f.uint())


def _read_tag(f: Fields, tags: type[_Tag], what: str) -> _Tag:
    tag = f.uint()
    try:
        return tags(tag)
    except ValueError:
        raise DecodeError(f"{what}: unknown tag {tag}") from None


def _read_group_change(value: object) -> group.GroupEvent:
    f = Fields(value, what="group change")
    tag = _read_tag(f, GroupChangeTag, "group change")
    change: group.GroupEvent
    if tag == GroupChangeTag.MEMBER_ADDED:
        user_id = read_user_id(f, stored=True)
        change = group.MemberAdded(user_id, f.bin(ED25519_KEY_SIZE), f.boolean())
    elif tag == GroupChangeTag.MEMBER_REMOVED:
        change = group.MemberRemoved(read_user_id(f, stored=True))
    elif tag == GroupChangeTag.ADMIN_CHANGED:
        change = group.AdminChanged(read_user_id(f, stored=True), f.boolean())
    else:
        change = group.TitleChanged(f.text(MAX_GROUP_TITLE_SIZE))
    f.end()
    return change


def _read_event(f: Fields, version: int) -> StoredEvent:
    tag = _read_tag(f, EventTag, "stored event")
    if version < 2 and tag > _LAST_VERSION_1_EVENT:
        raise DecodeError(f"stored event: no tag {tag} in row version {version}")
    if tag == EventTag.MESSAGE_RECEIVED:
        return MessageReceived(
            _read_address(f.raw(), "sender"),
            f.bin(MESSAGE_ID_SIZE),
            f.uint(UINT64_MAX),
            f.bin(),
            f.optional_bin(GROUP_ID_SIZE),
        )
    if tag == EventTag.MESSAGE_SENT_BY_OTHER_DEVICE:
        return MessageSentByOtherDevice(
            _read_address(f.raw(), "device"),
            read_user_id(f, stored=True),
            f.bin(MESSAGE_ID_SIZE),
            f.uint(UINT64_MAX),
            f.bin(),
        )
    if tag == EventTag.DEVICE_ADDED:
        return DeviceAdded(_read_address(f.raw(), "address"))
    if tag == EventTag.DEVICE_REMOVED:
        return DeviceRemoved(_read_address(f.raw(), "address"))
    if tag == EventTag.IDENTITY_CHANGED:
        return IdentityChanged(
            read_user_id(f, stored=True), f.bin(ED25519_KEY_SIZE), f.bin(ED25519_KEY_SIZE)
        )
    if tag == EventTag.UNDECRYPTABLE:
        return Undecryptable(
            _read_address(f.raw(), "sender"), f.text(), f.optional_bin(GROUP_ID_SIZE), f.boolean()
        )
    if tag == EventTag.GROUP_UPDATED:
        group_id = f.bin(GROUP_ID_SIZE)
        author = _read_address(f.raw(), "author")
        changes = tuple(_read_group_change(c) for c in f.array(max_len=MAX_GROUP_CHANGES))
        return GroupUpdated(group_id, author, changes, f.boolean())
    if tag == EventTag.RETRY_REQUESTED:
        return RetryRequested(_read_address(f.raw(), "requester"), f.bin(GROUP_ID_SIZE))
    if tag == EventTag.GROUP_CHANGE_FAILED:
        group_id, action = f.bin(GROUP_ID_SIZE), group.decode_action(f.bin(), stored=True)
        return GroupChangeFailed(group_id, action, f.text())
    if tag == EventTag.GROUP_REPLACED:
        old, new = f.bin(GROUP_ID_SIZE), f.bin(GROUP_ID_SIZE)
        return GroupReplaced(old, new, _read_address(f.raw(), "author"))
    if tag == EventTag.GROUP_STATE_MISMATCH:
        return GroupStateMismatch(
            f.bin(GROUP_ID_SIZE),
            _read_address(f.raw(), "sender"),
            f.text(16),
            f.uint(UINT64_MAX),
            f.bin(STATE_HASH_SIZE),
            f.uint(UINT64_MAX),
            f.bin(STATE_HASH_SIZE),
        )
    if tag == EventTag.SEND_FAILED:
        return SendFailed(f.bin(MESSAGE_ID_SIZE), f.text(MAX_REASON_SIZE))
    if tag == EventTag.DELIVERY_CONFIRMED:
        return DeliveryConfirmed(_read_address(f.raw(), "device"), _read_message_ids(f))
    if tag == EventTag.MESSAGE_DELIVERED:
        return MessageDelivered(f.bin(MESSAGE_ID_SIZE))
    if tag == EventTag.MESSAGE_NOT_DELIVERED:
        message_id = f.bin(MESSAGE_ID_SIZE)
        devices = tuple(
            _read_address(a, "device") for a in f.array(max_len=MAX_RECIPIENTS_PER_SEND)
        )
        return MessageNotDelivered(message_id, devices)
    return StoredItemSetAside(
        f.text(MAX_REASON_SIZE), f.text(MAX_REASON_SIZE), f.text(MAX_REASON_SIZE)
    )


def _read_message_ids(f: Fields) -> tuple[bytes, ...]:
    """1 to MAX_RECEIPT_MESSAGE_IDS message ids (what one delivery receipt names)."""
    ids = f.array(max_len=MAX_RECEIPT_MESSAGE_IDS)
    if not ids or not all(isinstance(i, bytes) and len(i) == MESSAGE_ID_SIZE for i in ids):
        raise DecodeError("message ids: 1 or more of 16 bytes")
    return tuple(ids)


def _read_direct(f: Fields) -> DirectSend:
    recipient_user = read_user_id(f, stored=True)
    payloads = []
    for item in f.array(max_len=MAX_DEVICES_PER_USER):
        entry = Fields(item, what="payload", count=2)
        payloads.append((entry.uint(), entry.bin()))
    return DirectSend(recipient_user, tuple(payloads), f.bin())


def _read_send(f: Fields, version: int) -> OutboxItem:
    tag = _read_tag(f, SendTag, "stored send")
    if version < 2 and tag > _LAST_VERSION_1_SEND:
        raise DecodeError(f"stored send: no tag {tag} in row version {version}")
    if tag == SendTag.RESEND:
        resent = _read_send(f, version)
        if not isinstance(resent, DirectSend | GroupSend):
            raise DecodeError("stored send: only a direct or group send is sent again")
        return Resend(resent)
    if tag == SendTag.DIRECT:
        direct = _read_direct(f)
        message_id = f.optional_bin(MESSAGE_ID_SIZE) if version >= 2 else None
        return replace(direct, message_id=message_id)
    if tag == SendTag.CHANGE:
        group_id, receipt = f.bin(GROUP_ID_SIZE), f.bin(CHANGE_RECEIPT_SIZE)
        parts = []
        for item in f.array(max_len=MAX_GROUP_MEMBERS):
            part = Fields(item, what="change part", count=3)
            parts.append(_read_direct(part))
            part.end()
        return ChangeSend(group_id, receipt, tuple(parts))
    if tag == SendTag.GROUP:
        group_id, payload = f.bin(GROUP_ID_SIZE), f.bin()
        recipients = [
            _read_address(a, "recipient") for a in f.array(max_len=MAX_RECIPIENTS_PER_SEND)
        ]
        message_id = f.optional_bin(MESSAGE_ID_SIZE) if version >= 2 else None
        return GroupSend(group_id, payload, tuple(recipients), message_id)
    if tag == SendTag.QUEUED_RECEIPT:
        return QueuedReceipt(read_user_id(f, stored=True), _read_message_ids(f))
    if tag == SendTag.QUEUED_DIRECT:
        to_user = read_user_id(f, stored=True)
        return QueuedMessage(f.bin(MESSAGE_ID_SIZE), f.uint(UINT64_MAX), f.bin(), to_user=to_user)
    group_id = f.bin(GROUP_ID_SIZE)
    return QueuedMessage(f.bin(MESSAGE_ID_SIZE), f.uint(UINT64_MAX), f.bin(), group_id=group_id)


def decode_event(data: bytes) -> StoredEvent:
    """The event of an inbox row; StateError if the bytes are not one."""
    return _load_row(data, "stored event", _read_event)


def decode_send(data: bytes) -> OutboxItem:
    """The send (or queued message) of an outbox row; StateError if the bytes are not one."""
    return _load_row(data, "stored send", _read_send)


def upgrade_event(data: bytes) -> bytes:
    """An inbox row of an older ROW_VERSION, written in the current one (StateError if corrupt)."""
    event = _load_row(data, "stored event", _read_event, OLDER_ROW_VERSIONS)
    return encode_event(event)


def upgrade_send(data: bytes) -> bytes:
    """An outbox row of an older ROW_VERSION, written in the current one (StateError if corrupt)."""
    send = _load_row(data, "stored send", _read_send, OLDER_ROW_VERSIONS)
    return encode_send(send)


# ------------------------------------------------------------------ the first client's rows

# How the first client stored a row: ["d", class name, [field, ...]] for an
# event, a send, an address or a group change, ["t", [item, ...]] for a
# tuple, ["v", value] for anything else; fields in the order below (the
# classes' own order at the time, now written down).
_UNVERSIONED: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "Address": (Address, ("user_id", "device_id")),
    "MessageReceived": (
        MessageReceived,
        ("sender", "message_id", "sent_at", "body", "group_id"),
    ),
    "MessageSentByOtherDevice": (
        MessageSentByOtherDevice,
        ("device", "to_user", "message_id", "sent_at", "body"),
    ),
    "DeviceAdded": (DeviceAdded, ("address",)),
    "DeviceRemoved": (DeviceRemoved, ("address",)),
    "IdentityChanged": (IdentityChanged, ("user_id", "old_identity", "new_identity")),
    "Undecryptable": (Undecryptable, ("sender", "reason", "group_id", "retry_requested")),
    "GroupUpdated": (GroupUpdated, ("group_id", "author", "changes", "joined")),
    "RetryRequested": (RetryRequested, ("requester", "group_id")),
    "DirectSend": (DirectSend, ("recipient_user", "payloads", "content")),
    "GroupSend": (GroupSend, ("group_id", "payload", "recipients")),
    "MemberAdded": (group.MemberAdded, ("user_id", "user_identity", "admin")),
    "MemberRemoved": (group.MemberRemoved, ("user_id",)),
    "AdminChanged": (group.AdminChanged, ("user_id", "admin")),
    "TitleChanged": (group.TitleChanged, ("title",)),
}


def _from_unversioned(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise DecodeError("not an unversioned row")
    tag = value[0]
    if tag == "d" and len(value) == 3 and isinstance(value[2], list):
        entry = _UNVERSIONED.get(value[1]) if isinstance(value[1], str) else None
        if entry is None or len(value[2]) != len(entry[1]):
            raise DecodeError("unversioned row: unknown class or fields")
        make, names = entry
        return make(**{n: _from_unversioned(v) for n, v in zip(names, value[2], strict=True)})
    if tag == "t" and len(value) == 2 and isinstance(value[1], list):
        return tuple(_from_unversioned(item) for item in value[1])
    if tag == "v" and len(value) == 2:
        return value[1]
    raise DecodeError("not an unversioned row")


def decode_unversioned(data: bytes) -> Event | Send:
    """An event or a send as the first client stored it (for the store's migration).

    The values are checked only as far as the class layout; the caller
    encodes the result again and decodes that, which checks every field.
    """
    try:
        item = _from_unversioned(unpack(data, what="unversioned row", max_size=MAX_STATE_SIZE))
    except DecodeError as exc:
        raise StateError(f"unversioned row: corrupt ({exc.message})") from exc
    if not isinstance(
        item,
        MessageReceived
        | MessageSentByOtherDevice
        | DeviceAdded
        | DeviceRemoved
        | IdentityChanged
        | Undecryptable
        | GroupUpdated
        | RetryRequested
        | DirectSend
        | GroupSend,
    ):
        raise StateError("unversioned row: neither an event nor a send")
    return item
