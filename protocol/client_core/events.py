"""What a :class:`~hushchat.protocol.client_core.ClientCore` tells the app: immutable events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

from ..address import Address as Address  # re-exported: the API names devices by it
from ..group import Action, GroupEvent


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A message for the app: one-to-one (``group_id`` None) or in a group."""

    sender: Address
    message_id: bytes
    sent_at: int
    body: bytes = field(repr=False)
    group_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class MessageSentByOtherDevice:
    """A one-to-one message this user sent from another of its devices."""

    device: Address
    to_user: str
    message_id: bytes
    sent_at: int
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class DeviceAdded:
    address: Address


@dataclass(frozen=True, slots=True)
class DeviceRemoved:
    address: Address


@dataclass(frozen=True, slots=True)
class IdentityChanged:
    """A user's identity key changed; nothing from the new one is used until confirmed."""

    user_id: str
    old_identity: bytes
    new_identity: bytes


@dataclass(frozen=True, slots=True)
class Undecryptable:
    """Something arrived that could not be read; ``reason`` is an error code."""

    sender: Address
    reason: str
    group_id: bytes | None = None
    retry_requested: bool = False


@dataclass(frozen=True, slots=True)
class GroupUpdated:
    """A verified membership change (``changes`` from the group layer), or our joining."""

    group_id: bytes
    author: Address
    changes: tuple[GroupEvent, ...]
    joined: bool = False


@dataclass(frozen=True, slots=True)
class GroupChangeFailed:
    """Our change ``action`` did not take effect and was not proposed again.

    ``reason``: STALE_CHANGE (another change came first for its epoch and the
    action is no longer allowed after it), NOT_A_MEMBER (we are no longer in
    the group), GROUP_REPLACED (an admin continued the group in a new one,
    :class:`GroupReplaced`), SEND_DROPPED (the relay kept refusing it), or
    the code that refused it when it came to apply.
    """

    group_id: bytes
    action: Action
    reason: str


@dataclass(frozen=True, slots=True)
class GroupReplaced:
    """An admin of the group (as we held it) continued it in a new group, a reinit: we
    joined ``new_group_id`` (a GroupUpdated came first) and left ``old_group_id``."""

    old_group_id: bytes
    new_group_id: bytes
    author: Address


@dataclass(frozen=True, slots=True)
class RetryRequested:
    """A device could not read our group message; it was sent our sender key again."""

    requester: Address
    group_id: bytes


@dataclass(frozen=True, slots=True)
class GroupStateMismatch:
    """A member's device holds another state of a group than we do (spec 4.9).

    Its group message said it holds ``their_epoch`` / ``their_state_hash``;
    we hold ``our_epoch`` / ``our_state_hash``. ``relation`` says how they
    differ: ``"forked"`` (we hold, or passed, that epoch with another hash:
    the group is split), ``"unknown"`` (older than every state we keep) or
    ``"ahead"`` (a later epoch, and no change we hold explains it: a change
    was withheld from us, or the sender is on another branch). Reported once
    per sender device, claimed state and relation. The message itself was
    delivered; an admin's reinit brings a split group back to one state.
    """

    group_id: bytes
    sender: Address
    relation: str
    their_epoch: int
    their_state_hash: bytes = field(repr=False)
    our_epoch: int
    our_state_hash: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class DeliveryConfirmed:
    """``device`` (another user's) received these messages of ours: its delivery receipt.

    Authenticated like any message from it (the relay cannot forge one); the
    client library matches them to what it sent (MessageDelivered).
    """

    device: Address
    message_ids: tuple[bytes, ...]


Event: TypeAlias = (
    MessageReceived
    | MessageSentByOtherDevice
    | DeviceAdded
    | DeviceRemoved
    | IdentityChanged
    | Undecryptable
    | GroupUpdated
    | GroupChangeFailed
    | GroupReplaced
    | RetryRequested
    | GroupStateMismatch
    | DeliveryConfirmed
)
