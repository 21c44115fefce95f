"""What the client library tells the app beside the core's events, and what its outbox holds.

Events about the connection (never stored: they describe the present):

* :class:`Connected`, :class:`Disconnected`: the relay connection came up or
  went down; the client reconnects by itself.
* :class:`UnknownToRelay`: the relay refused this device's login; it does
  not know the device (it lost its database, or the device was removed).
* :class:`Reregistered`: the relay had lost this device's user; the client
  registered it again with the signed device list it held, unchanged, and
  uploaded its prekeys again.
* :class:`MailExpired`: the relay deleted mail for this device before the
  device took it.

Events about the app's messages (``message_id`` is what ``send_direct`` or
``send_group`` returned):

* :class:`MessagePending`: not sent yet, and why; it goes by itself later.
* :class:`MessageSent`: the relay accepted it for every device it names.
* :class:`SendFailed`: it will never be sent; ``reason`` is an error code
  (``UNKNOWN_USER``, ``SEND_DROPPED``, ...). Stored like the core's events,
  so none is lost to a crash.
* :class:`MessageDelivered`: every device it went to (other users') said it
  received it (their delivery receipts). Stored.
* :class:`MessageNotDelivered`: the relay's retention (and a margin) passed
  and these devices never said so: the relay deleted it unread, or the
  device is gone. Stored.

About the store: :class:`StoredItemSetAside`, a stored row that could not be
read was moved out of the way (stored, so it is reported once).

The first two are notices: not stored, and dropped when the app lets its
event queue fill up. :meth:`Client.pending_messages` says at any time which
messages the outbox still holds; one that left it without a SendFailed was
sent.

:class:`QueuedMessage` is a message the app sent that is not encrypted yet
(the outbox keeps it until the client can encrypt it: it needed the relay
for a device list or a prekey bundle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TypeAlias

from hushchat.protocol import client_core as core


class Status(Enum):
    """Where the client stands with its relay."""

    CONNECTING = "connecting"  # no connection yet, or trying again after losing it
    READY = "ready"  # authenticated, prekeys stocked: sends go out at once
    UNKNOWN_TO_RELAY = "unknown_to_relay"  # the relay refused our login; retrying


@dataclass(frozen=True, slots=True)
class Connected:
    """The client is connected and authenticated (again)."""


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection dropped or could not be made; ``reason`` is an error code."""

    reason: str


@dataclass(frozen=True, slots=True)
class UnknownToRelay:
    """The relay refused this device's login (``reason``: its error code)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reregistered:
    """This device's user was registered again at a relay that had lost it."""


@dataclass(frozen=True, slots=True)
class MailExpired:
    """The relay deleted mail for this device before the device took it.

    ``count`` envelopes that the relay accepted from ``first_ts`` to
    ``last_ts`` (milliseconds since the Unix epoch) expired unread: their
    senders' messages will not arrive. ``count`` None: the relay lost the
    keys of its queue at ``last_ts``, and whatever waited for this device
    since ``first_ts`` is gone, how much is unknown. Senders are not told by
    the relay; an app may say so to its user, or ask its contacts to resend.
    """

    count: int | None
    first_ts: int
    last_ts: int


@dataclass(frozen=True, slots=True)
class MessagePending:
    """A message not sent yet: ``reason`` ``NOT_CONNECTED``, ``MAILBOX_FULL``, ..."""

    message_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class MessageSent:
    """The relay accepted the message for every device it names."""

    message_id: bytes


@dataclass(frozen=True, slots=True)
class MessageDelivered:
    """Every device the message went to (other users') confirmed it received it."""

    message_id: bytes


@dataclass(frozen=True, slots=True)
class MessageNotDelivered:
    """These devices never confirmed the message before its delivery deadline."""

    message_id: bytes
    devices: tuple[core.Address, ...]


@dataclass(frozen=True, slots=True)
class SendFailed:
    """The message will never be sent; ``reason`` is an error code."""

    message_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class StoredItemSetAside:
    """A stored row could not be read; it was set aside and the client carries on.

    ``table``: ``outbox`` (a message or send that will not go), ``inbox`` (an
    event the app will not get) or ``records`` (``kind`` says which state:
    ``session``, ``group``..., or "" if its key was unreadable too).
    ``reason``: CORRUPT_STATE, or UNKNOWN_STATE_VERSION for a row a newer
    client wrote. Its bytes stay in the store's ``set_aside`` table.
    """

    table: str
    kind: str
    reason: str


StoredEvent: TypeAlias = (
    core.Event | SendFailed | StoredItemSetAside | MessageDelivered | MessageNotDelivered
)
"""An event the store keeps until the app has taken it."""

ClientEvent: TypeAlias = (
    StoredEvent
    | Connected
    | Disconnected
    | UnknownToRelay
    | Reregistered
    | MailExpired
    | MessagePending
    | MessageSent
)
"""Everything :meth:`Client.events` yields."""


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message the app sent, to a user (``to_user``) or a group, not encrypted yet."""

    message_id: bytes
    sent_at: int
    body: bytes = field(repr=False)
    to_user: str | None = None
    group_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class QueuedReceipt:
    """A delivery receipt to send ``to_user`` for these messages of its that we received."""

    to_user: str
    message_ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Resend:
    """What full mailboxes refused: ``send`` naming only those devices, to go again to them.

    The relay stored the send for every other device it named (relay
    protocol 6); this is sent with ``resend`` true, so that no device gets
    it twice.
    """

    send: core.DirectSend | core.GroupSend

    @property
    def message_id(self) -> bytes | None:
        return self.send.message_id


OutboxItem: TypeAlias = (
    core.DirectSend | core.GroupSend | core.ChangeSend | QueuedMessage | QueuedReceipt | Resend
)
"""One outbox row: a send encrypted and ready, or a message still to encrypt."""
