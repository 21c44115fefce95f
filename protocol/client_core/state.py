"""The state one device keeps, shared by the ClientCore's collaborators.

:class:`CoreState` holds everything that is persisted, one map per record
kind, and the keys of the records changed since the caller last took them.
The collaborators (directory, direct sessions, group messages, membership)
each change their part of it and mark what they changed;
:mod:`.persistence` serializes and loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import primitives as p
from ..account import Account
from ..consts import MAX_GROUPS
from ..content import MESSAGE_ID_SIZE, GroupControl
from ..devices import SignedDeviceList
from ..group import ControlMessage, Group
from ..group_cipher import OutboundSenderKey, SenderKeyStore
from ..keys import IdentityKeyPair
from ..pqxdh import Party
from ..session import SessionRecord
from ..split_detection import PeerClaims
from .events import Address
from .records import RecordKey


class Outbound:
    """Our sender key in one group and the devices that already hold it.

    Devices leave ``shared_with`` only through :meth:`unshare`.
    """

    __slots__ = ("_covers", "key", "recipients", "shared_with")

    def __init__(self, key: OutboundSenderKey, shared_with: set[Address]) -> None:
        self.key = key
        self.shared_with = shared_with
        # The group's devices as of our last send, until a group or a device
        # list changes (GroupMessages.forget_recipients), so that a
        # steady-state send costs the same whatever the group's size.
        self.recipients: tuple[Address, ...] | None = None
        # A recipient tuple found wholly in shared_with. Until unshare(), which
        # forgets it, shared_with only grows.
        self._covers: tuple[Address, ...] | None = None

    def lacking(self, recipients: tuple[Address, ...]) -> list[Address]:
        """The recipients that do not hold this key yet."""
        if recipients is self._covers:
            return []
        missing = [a for a in recipients if a not in self.shared_with]
        if not missing:
            self._covers = recipients
        return missing

    def unshare(self, address: Address) -> bool:
        """Forget that ``address`` holds this key; whether it did."""
        self._covers = None
        if address not in self.shared_with:
            return False
        self.shared_with.discard(address)
        return True


@dataclass(frozen=True, slots=True)
class PendingChange:
    """Our change in flight: signed, not applied, until its receipt comes back.

    ``receipt`` None: the change lost its epoch, and proposing its action again
    needs sessions with devices that joined meanwhile; it waits for them
    (ClientCore.waiting_changes).
    """

    receipt: bytes | None
    message: ControlMessage


@dataclass(eq=False, slots=True)
class CoreState:
    """One device's keys, peers, sessions, sender keys and groups, and what changed."""

    user_id: str
    device_id: int
    account: Account
    user_identity_public: bytes
    # Only the primary device holds the user identity's private key.
    user_identity: IdentityKeyPair | None
    rng: p.RandomSource
    device_lists: dict[str, SignedDeviceList] = field(default_factory=dict)
    pending_identity: dict[str, SignedDeviceList] = field(default_factory=dict)
    sessions: dict[Address, SessionRecord] = field(default_factory=dict)
    outbound: dict[bytes, Outbound] = field(default_factory=dict)
    # Peers' sender keys: only for our groups, from their members' devices, bounded.
    inbound: SenderKeyStore = field(default_factory=SenderKeyStore)
    groups: dict[bytes, Group] = field(default_factory=dict)
    # Groups held at most (ClientCore parameter): a welcome beyond it is refused.
    max_groups: int = MAX_GROUPS
    # Per group, its member devices' claimed states still to judge or already reported.
    claims: dict[bytes, PeerClaims] = field(default_factory=dict)
    # Control messages that arrived before their parent change, oldest first.
    held: list[tuple[Address, GroupControl]] = field(default_factory=list)
    # Groups we were removed from (or left), oldest first: a late GroupSync
    # from another of our devices must not bring one back.
    left: list[bytes] = field(default_factory=list)
    # Our group change in flight, per group: at most one each (spec 12.4).
    pending: dict[bytes, PendingChange] = field(default_factory=dict)
    # Records changed since the last take_changes (a new device: all of them).
    changed: set[RecordKey] = field(default_factory=lambda: {RecordKey.META, RecordKey.ACCOUNT})

    @property
    def address(self) -> Address:
        return Address(self.user_id, self.device_id)

    @property
    def party(self) -> Party:
        """Whose this device is, as every session we start or accept binds it."""
        return Party(self.user_id, self.device_id, self.user_identity_public)

    def new_message_id(self) -> bytes:
        return self.rng.random_bytes(MESSAGE_ID_SIZE)

    def mark(self, key: RecordKey) -> None:
        """Record ``key`` as changed: take_changes hands it over serialized (or deleted)."""
        self.changed.add(key)
