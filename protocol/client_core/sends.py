"""What a :class:`~hushchat.protocol.client_core.ClientCore` asks the transport to send."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

from .events import Address, Event

# The kinds of envelope the relay carries (spec/07-relay-protocol.md).
ENVELOPE_DIRECT = 1
ENVELOPE_GROUP = 2
ENVELOPE_RECEIPT = 3  # the receipt of our own group change, from ourselves


@dataclass(frozen=True, slots=True)
class DirectSend:
    """One-to-one ciphertexts for (some of) one user's devices."""

    recipient_user: str
    payloads: tuple[tuple[int, bytes], ...] = field(repr=False)
    # The plaintext content, kept so a send refused for a stale device list
    # can be encrypted again for the current devices (ClientCore.resend_direct).
    content: bytes = field(repr=False, default=b"")
    # The app's message this send carries (a Text or its SentCopy), if any.
    message_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class GroupSend:
    """One group ciphertext and every device that must receive it."""

    group_id: bytes
    payload: bytes = field(repr=False)
    recipients: tuple[Address, ...]
    # The app's message it carries.
    message_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class ChangeSend:
    """Our group change for every device that holds the group, in one relay send.

    The relay queues every part (one :class:`DirectSend` per user) and
    ``receipt`` in our own mailbox together (spec/07-relay-protocol.md,
    SEND_CHANGE): where the receipt arrives among what we receive tells
    whether our change came first for its epoch (spec/12-groups.md, 12.4).
    """

    group_id: bytes
    receipt: bytes
    parts: tuple[DirectSend, ...]


Send: TypeAlias = DirectSend | GroupSend | ChangeSend


@dataclass(frozen=True, slots=True)
class Outcome:
    """What processing one input produced."""

    events: tuple[Event, ...] = ()
    sends: tuple[Send, ...] = ()
