"""The sans-I/O heart of a hushchat device: feed it inputs, get events and sends.

:class:`ClientCore` ties the pieces together the way a messenger needs them:
device lists (several devices per user), one-to-one sessions with every
device, sender keys for groups, group membership, and the content carried
inside the encryption. It does no I/O: the transport feeds it what the relay
delivers (envelopes, bundles, device lists) and carries out what it returns
(:class:`DirectSend`, :class:`GroupSend`). Time is passed in.

Persistence: every method that changes state marks the records it touched;
:meth:`ClientCore.take_changes` hands them over serialized (``None`` means
delete), so the caller can write them in one transaction before it
acknowledges the envelope that caused them. :meth:`ClientCore.load` rebuilds
the core from those records.

Rules the core enforces (spec/11-devices.md, spec/12-groups.md):

* a peer device is used only if a device list signed by its user's identity
  names it, and a handshake from it must carry the identity that list gives;
* a changed user identity is never accepted silently: it raises an
  :class:`IdentityChanged` event and is held until :meth:`confirm_identity`;
* group messages are accepted only from current members' listed devices,
  and sent only to them, where the list must be signed by the user identity
  the group state records for the member (a member whose identity changed
  is left out until an admin adds it again with the new one);
* when a member or one of its devices leaves, every remaining member
  rotates its sender key before its next group message, and distributes the
  new key only to the remaining devices;
* a group message that cannot be decrypted surfaces as :class:`Undecryptable`
  and, when a session exists, a retry request goes back to its sender, who
  answers with its current sender key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

from . import primitives as p
from .account import Account
from .consts import (
    GROUP_ID_SIZE,
    MAX_HELD_GROUP_CONTROLS,
    MAX_LEFT_GROUPS,
    MAX_USER_ID_SIZE,
    SENDER_KEY_MAX_AGE,
    SENDER_KEY_MAX_MESSAGES,
    STATE_VERSION,
)
from .content import (
    MESSAGE_ID_SIZE,
    GroupControl,
    GroupSync,
    GroupText,
    RetryRequest,
    SenderKey,
    SentCopy,
    SyncRequest,
    Text,
    decode_content,
)
from .devices import DeviceEntry, DeviceList, SignedDeviceList, check_update, device_changes
from .encoding import Fields, pack
from .errors import (
    DecodeError,
    DuplicateMessage,
    InvalidArgument,
    InvalidState,
    ProtocolError,
    RemoteProtocolError,
    StaleChange,
    StateError,
    UnauthorizedChange,
    UntrustedIdentity,
)
from .fingerprint import SafetyNumber
from .group import (
    Action,
    AddMember,
    ControlMessage,
    CreateGroup,
    Group,
    GroupEvent,
    GroupState,
    Leave,
    MemberRemoved,
    RemoveMember,
    Welcome,
    decode_states,
    describe_change,
)
from .group_cipher import OutboundSenderKey, SenderKeyRecord
from .keys import IdentityKeyPair
from .messages import PreKeyMessage, decode_message
from .pickles import load_pickle
from .prekeys import PreKeyBundle
from .sender_keys import SenderKeyDistributionMessage, SenderKeyMessage
from .session import SessionRecord

ENVELOPE_DIRECT = 1
ENVELOPE_GROUP = 2


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """One device of one user."""

    user_id: str
    device_id: int

    def __str__(self) -> str:
        return f"{self.user_id}.{self.device_id}"


# ------------------------------------------------------------------ events


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
class RetryRequested:
    """A device could not read our group message; it was sent our sender key again."""

    requester: Address
    group_id: bytes


Event: TypeAlias = (
    MessageReceived
    | MessageSentByOtherDevice
    | DeviceAdded
    | DeviceRemoved
    | IdentityChanged
    | Undecryptable
    | GroupUpdated
    | RetryRequested
)


# ------------------------------------------------------------------ sends


@dataclass(frozen=True, slots=True)
class DirectSend:
    """One-to-one ciphertexts for (some of) one user's devices."""

    recipient_user: str
    payloads: tuple[tuple[int, bytes], ...] = field(repr=False)
    # The plaintext content, kept so a send refused for a stale device list
    # can be encrypted again for the current devices (ClientCore.resend_direct).
    content: bytes = field(repr=False, default=b"")


@dataclass(frozen=True, slots=True)
class GroupSend:
    """One group ciphertext and every device that must receive it."""

    group_id: bytes
    payload: bytes = field(repr=False)
    recipients: tuple[Address, ...]


Send: TypeAlias = DirectSend | GroupSend


@dataclass(frozen=True, slots=True)
class Outcome:
    """What processing one input produced."""

    events: tuple[Event, ...] = ()
    sends: tuple[Send, ...] = ()


RecordKey: TypeAlias = tuple[str | int | bytes, ...]


def _read_address(value: object, what: str) -> Address:
    f = Fields(value, what=what, count=2)
    return Address(f.text(MAX_USER_ID_SIZE), f.uint())


def _key_bytes(part: str | int | bytes) -> bytes:
    if not isinstance(part, bytes):
        raise StateError("record key: expected bytes")
    return part


def _key_str(part: str | int | bytes) -> str:
    if not isinstance(part, str):
        raise StateError("record key: expected a string")
    return part


def _key_int(part: str | int | bytes) -> int:
    if not isinstance(part, int):
        raise StateError("record key: expected an integer")
    return part


class _Outbound:
    """Our sender key in one group and the devices that already hold it.

    Devices leave ``shared_with`` only through :meth:`unshare`.
    """

    __slots__ = ("_covers", "key", "recipients", "shared_with")

    def __init__(self, key: OutboundSenderKey, shared_with: set[Address]) -> None:
        self.key = key
        self.shared_with = shared_with
        # The group's devices as of our last send, until a group or a device
        # list changes (ClientCore._forget_recipients), so that a steady-state
        # send costs the same whatever the group's size.
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


class MissingSessions(InvalidState):
    """Sending needs sessions with these devices first: fetch their bundles."""

    code = "MISSING_SESSIONS"

    def __init__(self, addresses: Iterable[Address]) -> None:
        self.addresses = tuple(sorted(addresses))
        super().__init__("no session with " + ", ".join(map(str, self.addresses)))


class DeviceListNeeded(InvalidState):
    """Sending needs this user's device list first: fetch it from the relay."""

    code = "DEVICE_LIST_NEEDED"

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        super().__init__(f"no device list for {user_id!r}")


class ClientCore:
    """One device of one user: its keys, sessions, sender keys and groups."""

    def __init__(
        self,
        user_id: str,
        device_id: int,
        account: Account,
        user_identity_public: bytes,
        *,
        user_identity: IdentityKeyPair | None = None,
        rng: p.RandomSource = p.SYSTEM_RANDOM,
        sender_key_max_age: int = SENDER_KEY_MAX_AGE,
        sender_key_max_messages: int = SENDER_KEY_MAX_MESSAGES,
    ) -> None:
        if user_identity is not None and user_identity.public.ed25519 != user_identity_public:
            raise InvalidArgument("user identity key pair does not match its public key")
        self.user_id = user_id
        self.device_id = device_id
        self.account = account
        self.user_identity_public = user_identity_public
        # Only the primary device holds the user identity's private key.
        self._user_identity = user_identity
        self._rng = rng
        self.sender_key_max_age = sender_key_max_age
        self.sender_key_max_messages = sender_key_max_messages
        self._device_lists: dict[str, SignedDeviceList] = {}
        self._pending_identity: dict[str, SignedDeviceList] = {}
        self._sessions: dict[Address, SessionRecord] = {}
        self._outbound: dict[bytes, _Outbound] = {}
        self._inbound: dict[tuple[bytes, Address], SenderKeyRecord] = {}
        self._groups: dict[bytes, Group] = {}
        # Control messages that arrived before their parent change, oldest first.
        self._held: list[tuple[Address, GroupControl]] = []
        # Groups we were removed from (or left), oldest first: a late GroupSync
        # from another of our devices must not bring one back.
        self._left: list[bytes] = []
        self._dirty: set[RecordKey] = {("meta",), ("account",)}

    # ------------------------------------------------------------ creation

    @classmethod
    def create_primary(
        cls, user_id: str, device_id: int, *, now: int, rng: p.RandomSource = p.SYSTEM_RANDOM
    ) -> ClientCore:
        """A new user: a user identity, this first device, and its signed device list."""
        user_identity = IdentityKeyPair.generate(rng)
        account = Account.create(now=now, rng=rng)
        core = cls(
            user_id,
            device_id,
            account,
            user_identity.public.ed25519,
            user_identity=user_identity,
            rng=rng,
        )
        first = DeviceList.initial(
            user_id,
            user_identity.public.ed25519,
            [DeviceEntry(device_id, account.identity.public.ed25519)],
        )
        core._set_device_list(first.sign(user_identity))
        return core

    @classmethod
    def create_linked(
        cls,
        user_id: str,
        device_id: int,
        user_identity_public: bytes,
        *,
        now: int,
        rng: p.RandomSource = p.SYSTEM_RANDOM,
    ) -> ClientCore:
        """Another device of an existing user; the primary must :meth:`link_device` it."""
        return cls(
            user_id, device_id, Account.create(now=now, rng=rng), user_identity_public, rng=rng
        )

    @property
    def address(self) -> Address:
        return Address(self.user_id, self.device_id)

    @property
    def device_identity(self) -> bytes:
        return self.account.identity.public.ed25519

    @property
    def holds_user_identity(self) -> bool:
        """Whether this device holds the user identity (and so can change the device list)."""
        return self._user_identity is not None

    @property
    def own_device_list(self) -> SignedDeviceList | None:
        return self._device_lists.get(self.user_id)

    def link_device(self, device_id: int, device_identity: bytes) -> SignedDeviceList:
        """(Primary only.) Sign a new device list that adds a device; upload it to the relay."""
        return self._change_own_devices(
            lambda dl: dl.with_device(DeviceEntry(device_id, device_identity))
        )

    def unlink_device(self, device_id: int) -> SignedDeviceList:
        """(Primary only.) Sign a new device list without ``device_id``."""
        if device_id == self.device_id:
            raise InvalidArgument("the primary device cannot unlink itself")
        return self._change_own_devices(lambda dl: dl.without_device(device_id))

    def _change_own_devices(self, change: object) -> SignedDeviceList:
        if self._user_identity is None:
            raise InvalidState("only the device holding the user identity can change devices")
        current = self.own_device_list
        if current is None:
            raise InvalidState("no device list yet")
        assert callable(change)
        signed: SignedDeviceList = change(current.device_list).sign(self._user_identity)
        self.process_device_list(signed.encode())
        return signed

    # ------------------------------------------------------------ device lists

    def device_list(self, user_id: str) -> DeviceList | None:
        held = self._device_lists.get(user_id)
        return None if held is None else held.device_list

    def devices_of(self, user_id: str) -> tuple[Address, ...]:
        held = self.device_list(user_id)
        if held is None:
            raise DeviceListNeeded(user_id)
        return tuple([Address(user_id, d.device_id) for d in held.devices])

    def knows_device(self, address: Address) -> bool:
        held = self.device_list(address.user_id)
        return held is not None and held.device(address.device_id) is not None

    def process_device_list(self, data: bytes) -> Outcome:
        """Take a signed device list from the relay (verified here, never trusted)."""
        signed = SignedDeviceList.decode(data)
        new = signed.device_list
        if new.user_id == self.user_id and new.user_identity != self.user_identity_public:
            raise UntrustedIdentity("a device list for our own user with another identity")
        old_signed = self._device_lists.get(new.user_id)
        old = None if old_signed is None else old_signed.device_list
        try:
            check_update(old, new)
        except StaleChange:
            return Outcome()  # the list we hold is as new or newer
        except UntrustedIdentity:
            assert old is not None
            self._pending_identity[new.user_id] = signed
            self._mark(("pending_identity", new.user_id))
            return Outcome(
                events=(IdentityChanged(new.user_id, old.user_identity, new.user_identity),)
            )
        return self._accept_device_list(signed, old)

    def pending_identity(self, user_id: str) -> IdentityChanged | None:
        """The identity change waiting for :meth:`confirm_identity`, if any (survives reloads)."""
        pending = self._pending_identity.get(user_id)
        held = self.device_list(user_id)
        if pending is None or held is None:
            return None
        return IdentityChanged(user_id, held.user_identity, pending.device_list.user_identity)

    def confirm_identity(self, user_id: str) -> Outcome:
        """The app's user confirmed a changed identity (ideally after comparing safety numbers)."""
        signed = self._pending_identity.pop(user_id, None)
        if signed is None:
            raise InvalidState(f"no identity change pending for {user_id!r}")
        self._mark(("pending_identity", user_id))
        for address in [a for a in self._sessions if a.user_id == user_id]:
            self._drop_session(address)
        return self._accept_device_list(signed, None, replaced=self._device_lists.get(user_id))

    def _accept_device_list(
        self,
        signed: SignedDeviceList,
        old: DeviceList | None,
        *,
        replaced: SignedDeviceList | None = None,
    ) -> Outcome:
        new = signed.device_list
        if replaced is not None:
            old = replaced.device_list
        changes = device_changes(old, new)
        self._set_device_list(signed)
        events: list[Event] = []
        for entry in changes.removed:
            address = Address(new.user_id, entry.device_id)
            self._drop_session(address)
            events.append(DeviceRemoved(address))
        for entry in changes.added:
            if old is not None:
                events.append(DeviceAdded(Address(new.user_id, entry.device_id)))
        if changes.removed:
            # A device that leaves must not read what follows.
            for group_id, group in self._groups.items():
                if group.current.member(new.user_id) is not None:
                    self._retire_outbound(group_id)
        return Outcome(events=tuple(events))

    def _set_device_list(self, signed: SignedDeviceList) -> None:
        self._device_lists[signed.device_list.user_id] = signed
        self._forget_recipients()
        self._mark(("devices", signed.device_list.user_id))

    # ------------------------------------------------------------ sessions

    def devices_without_session(self, user_ids: Iterable[str], *, now: int) -> list[Address]:
        """Devices of these users (and our own other devices) we cannot encrypt to yet."""
        missing = []
        for user_id in {*user_ids, self.user_id}:
            for address in self.devices_of(user_id):
                if address == self.address:
                    continue
                record = self._sessions.get(address)
                if record is None or not record.has_usable_session(now):
                    missing.append(address)
        return sorted(missing)

    def process_bundle(self, data: bytes, *, now: int, post_quantum: bool = True) -> Address:
        """Start a session from a prekey bundle the relay handed out."""
        bundle = PreKeyBundle.decode(data)
        address = Address(bundle.user_id, bundle.device_id)
        held = self.device_list(bundle.user_id)
        entry = None if held is None else held.device(bundle.device_id)
        if entry is None:
            raise DeviceListNeeded(bundle.user_id)
        if entry.identity != bundle.identity.ed25519:
            raise UntrustedIdentity("the bundle's identity is not the one the device list names")
        session = self.account.create_outbound_session(
            bundle, now=now, post_quantum=post_quantum, rng=self._rng
        )
        self._sessions.setdefault(address, SessionRecord()).install(session)
        self._mark(("session", address.user_id, address.device_id))
        return address

    def _drop_session(self, address: Address) -> None:
        if self._sessions.pop(address, None) is not None:
            self._mark(("session", address.user_id, address.device_id))
        # A device we re-establish a session with must be sent our sender keys again.
        self._unshare(address)

    def _unshare(self, address: Address) -> None:
        """Forget that ``address`` holds our sender keys (it gets them again before our next)."""
        for group_id, outbound in self._outbound.items():
            if outbound.unshare(address):
                self._mark(("outbound", group_id))

    def _encrypt_for(
        self, addresses: Iterable[Address], plaintext: bytes, now: int
    ) -> list[DirectSend]:
        """Encrypt one plaintext for each address, grouped by user."""
        targets = list(addresses)
        return self._encrypt_with(targets, self._check_sessions(targets, now), plaintext, now)

    def _encrypt_with(
        self, targets: list[Address], records: list[SessionRecord], plaintext: bytes, now: int
    ) -> list[DirectSend]:
        """:meth:`_encrypt_for` given what :meth:`_check_sessions` returned for ``targets``."""
        by_user: dict[str, list[tuple[int, bytes]]] = {}
        for address, record in zip(targets, records, strict=True):
            payload = record.encrypt(plaintext, now=now)
            self._mark(("session", address.user_id, address.device_id))
            by_user.setdefault(address.user_id, []).append((address.device_id, payload))
        return [DirectSend(user, tuple(payloads), plaintext) for user, payloads in by_user.items()]

    def resend_direct(self, send: DirectSend, *, now: int) -> DirectSend:
        """Encrypt a refused send's content again for the recipient's current devices.

        For when the relay refused ``send`` because the device list changed:
        process the list it returned first, create the missing sessions, then
        call this. MissingSessions if a session is still missing.
        """
        targets = [a for a in self.devices_of(send.recipient_user) if a != self.address]
        (resent,) = self._encrypt_for(targets, send.content, now)
        return resent

    def resend_group(self, send: GroupSend, *, now: int) -> list[Send]:
        """Address a refused group send to the group's current devices.

        Devices that lack our sender key get it first (one-to-one). If our
        key was retired meanwhile (a member or device left), the payload still
        goes out; a device that cannot read it asks for a retry.
        """
        outbound = self._outbound.get(send.group_id)
        recipients = self._current_recipients(send.group_id, outbound)
        sends: list[Send] = []
        if outbound is not None:
            needing = outbound.lacking(recipients)
            if needing:
                distribution = SenderKey(outbound.key.distribution_message()).encode()
                sends.extend(self._encrypt_for(needing, distribution, now))
                outbound.shared_with.update(needing)
                self._mark(("outbound", send.group_id))
        sends.append(GroupSend(send.group_id, send.payload, recipients))
        return sends

    def _own_other_devices(self) -> list[Address]:
        return [a for a in self.devices_of(self.user_id) if a != self.address]

    def safety_number(self, user_id: str, *, pending: bool = False) -> SafetyNumber:
        """The safety number with ``user_id``'s trusted identity (``pending``: with the
        changed identity waiting for confirmation, to compare before confirming)."""
        held = self.device_list(user_id)
        if held is None:
            raise DeviceListNeeded(user_id)
        identity = held.user_identity
        if pending:
            change = self._pending_identity.get(user_id)
            if change is None:
                raise InvalidState(f"no identity change pending for {user_id!r}")
            identity = change.device_list.user_identity
        return SafetyNumber.compute(self.user_id, self.user_identity_public, user_id, identity)

    # ------------------------------------------------------------ sending

    def _new_message_id(self) -> bytes:
        return self._rng.random_bytes(MESSAGE_ID_SIZE)

    def send_direct(self, to_user: str, body: bytes, *, now: int) -> tuple[bytes, list[DirectSend]]:
        """Encrypt a one-to-one message for every device of ``to_user``.

        Our own other devices get a :class:`SentCopy`. Raises DeviceListNeeded or
        MissingSessions (nothing changed) when lists or bundles are needed.
        """
        if to_user == self.user_id:
            raise InvalidArgument("send to yourself through your other devices' copies")
        recipients = self.devices_of(to_user)
        self._check_sessions([*recipients, *self._own_other_devices()], now)
        message_id = self._new_message_id()
        sends = self._encrypt_for(recipients, Text(message_id, now, body).encode(), now)
        copy = SentCopy(to_user, None, message_id, now, body).encode()
        sends += self._encrypt_for(self._own_other_devices(), copy, now)
        return message_id, sends

    def _check_sessions(self, addresses: Iterable[Address], now: int) -> list[SessionRecord]:
        """Each address's record, or MissingSessions naming those without a usable session."""
        targets = list(addresses)
        records = [self._sessions.get(a) for a in targets]
        usable = [r for r in records if r is not None and r.has_usable_session(now)]
        if len(usable) != len(records):
            missing = [
                a
                for a, r in zip(targets, records, strict=True)
                if r is None or not r.has_usable_session(now)
            ]
            raise MissingSessions(missing)
        return usable

    # ------------------------------------------------------------ receiving

    def receive(self, sender: Address, kind: int, payload: bytes, *, now: int) -> Outcome:
        """Process one envelope the relay delivered (sender stamped by the relay).

        Never raises for bad remote input: what cannot be read becomes an
        :class:`Undecryptable` event (duplicates are dropped silently, as a
        lost acknowledgement causes them).
        """
        if not self.knows_device(sender):
            return Outcome(events=(Undecryptable(sender, "UNKNOWN_DEVICE"),))
        try:
            if kind == ENVELOPE_DIRECT:
                return self._receive_direct(sender, payload, now)
            if kind == ENVELOPE_GROUP:
                return self._receive_group(sender, payload, now)
        except DuplicateMessage:
            return Outcome()
        except ProtocolError as exc:
            if isinstance(exc, InvalidState | InvalidArgument):
                raise
            return Outcome(events=(Undecryptable(sender, exc.code),))
        return Outcome(events=(Undecryptable(sender, "UNKNOWN_ENVELOPE_KIND"),))

    def _receive_direct(self, sender: Address, payload: bytes, now: int) -> Outcome:
        message = decode_message(payload)
        entry = self.device_list(sender.user_id)
        assert entry is not None
        listed = entry.device(sender.device_id)
        assert listed is not None
        if (
            isinstance(message, PreKeyMessage)
            and message.handshake.identity.ed25519 != listed.identity
        ):
            raise UntrustedIdentity("handshake identity is not the one the device list names")
        record = self._sessions.get(sender)
        candidate = SessionRecord() if record is None else record
        result = candidate.decrypt(payload, self.account, now=now, rng=self._rng)
        self._sessions[sender] = candidate
        self._mark(("session", sender.user_id, sender.device_id))
        if result.new_session:
            self._mark(("account",))
            # The peer started over: whatever we shared before is gone on its side.
            self._unshare(sender)
        try:
            content = decode_content(result.plaintext)
        except ProtocolError as exc:
            return Outcome(events=(Undecryptable(sender, exc.code),))
        return self._dispatch(sender, content, now)

    def _dispatch(self, sender: Address, content: object, now: int) -> Outcome:
        if isinstance(content, Text):
            return Outcome(
                events=(MessageReceived(sender, content.message_id, content.sent_at, content.body),)
            )
        if isinstance(content, SentCopy):
            if sender.user_id != self.user_id or content.to_user is None:
                return Outcome(events=(Undecryptable(sender, UnauthorizedChange.code),))
            return Outcome(
                events=(
                    MessageSentByOtherDevice(
                        sender, content.to_user, content.message_id, content.sent_at, content.body
                    ),
                )
            )
        if isinstance(content, SenderKey):
            return self._receive_sender_key(sender, content)
        if isinstance(content, RetryRequest):
            return self._receive_retry(sender, content, now)
        if isinstance(content, GroupControl):
            return self._receive_group_control(sender, content, now)
        if sender.user_id != self.user_id:
            # Sync traffic is between one user's own devices only.
            return Outcome(events=(Undecryptable(sender, UnauthorizedChange.code),))
        if isinstance(content, SyncRequest):
            return self._answer_sync(sender, now)
        if isinstance(content, GroupSync):
            return self._receive_group_sync(sender, content)
        raise AssertionError("decode_content returned an unknown type")

    def _receive_sender_key(self, sender: Address, content: SenderKey) -> Outcome:
        skdm = SenderKeyDistributionMessage.decode(content.distribution)
        key = (skdm.group_id, sender)
        record = self._inbound.get(key) or SenderKeyRecord(skdm.group_id)
        record.process_distribution(skdm)
        self._inbound[key] = record
        self._mark(("inbound", skdm.group_id, sender.user_id, sender.device_id))
        return Outcome()

    def _receive_group(self, sender: Address, payload: bytes, now: int) -> Outcome:
        parsed = SenderKeyMessage.decode(payload)
        group_id = parsed.group_id
        if group_id not in self._groups:
            return Outcome(events=(Undecryptable(sender, "UNKNOWN_GROUP", group_id),))
        if not self._is_member(group_id, sender.user_id):
            return Outcome(events=(Undecryptable(sender, "NOT_A_MEMBER", group_id),))
        record = self._inbound.get((group_id, sender))
        if record is None or all(c.chain_id != parsed.chain_id for c in record.chains):
            return self._request_retry(sender, group_id, parsed.chain_id, now)
        plaintext = record.decrypt(payload)
        # The chain moved on (its key is spent) even if the content turns out malformed.
        self._mark(("inbound", group_id, sender.user_id, sender.device_id))
        text = GroupText.decode(plaintext)
        return Outcome(
            events=(MessageReceived(sender, text.message_id, text.sent_at, text.body, group_id),)
        )

    def _request_retry(self, sender: Address, group_id: bytes, chain_id: int, now: int) -> Outcome:
        record = self._sessions.get(sender)
        if record is None or not record.has_usable_session(now):
            return Outcome(events=(Undecryptable(sender, "NO_SENDER_KEY", group_id),))
        sends = self._encrypt_for([sender], RetryRequest(group_id, chain_id).encode(), now)
        return Outcome(
            events=(Undecryptable(sender, "NO_SENDER_KEY", group_id, retry_requested=True),),
            sends=tuple(sends),
        )

    def _receive_retry(self, sender: Address, content: RetryRequest, now: int) -> Outcome:
        outbound = self._outbound.get(content.group_id)
        if not self._is_member(content.group_id, sender.user_id) or outbound is None:
            return Outcome()
        outbound.unshare(sender)
        distribution = SenderKey(outbound.key.distribution_message()).encode()
        sends = self._encrypt_for([sender], distribution, now)
        outbound.shared_with.add(sender)
        self._mark(("outbound", content.group_id))
        return Outcome(events=(RetryRequested(sender, content.group_id),), sends=tuple(sends))

    # ------------------------------------------------------------ linked devices: sync

    def request_sync(self, *, now: int) -> list[Send]:
        """(A newly linked device.) Ask our user's other devices for the groups they hold.

        Each answers with the group's recent states and its own sender key;
        other members send us theirs with their next message (they address
        every listed device of every member). Conversation history is not
        copied: a new device reads what is sent from now on.
        """
        return list(self._encrypt_for(self._own_other_devices(), SyncRequest().encode(), now))

    def _answer_sync(self, sender: Address, now: int) -> Outcome:
        sends: list[Send] = []
        for group_id, group in self._groups.items():
            states = tuple(state.encode() for state in group.states)
            sends.extend(self._encrypt_for([sender], GroupSync(states).encode(), now))
            outbound = self._outbound.get(group_id)
            if outbound is not None:
                distribution = SenderKey(outbound.key.distribution_message()).encode()
                sends.extend(self._encrypt_for([sender], distribution, now))
                outbound.shared_with.add(sender)
                self._mark(("outbound", group_id))
        return Outcome(sends=tuple(sends))

    def _receive_group_sync(self, sender: Address, content: GroupSync) -> Outcome:
        try:
            group = Group(tuple(decode_states(content.states, "GroupSync")))
        except InvalidArgument:
            raise DecodeError("GroupSync: the states do not form a chain") from None
        if (
            group.group_id in self._groups
            or group.group_id in self._left
            or group.current.member(self.user_id) is None
        ):
            return Outcome()  # what we hold is ours; a group without us is not ours to hold
        self._set_group(group.group_id, group)
        changes = describe_change(None, group.current)
        joined = GroupUpdated(group.group_id, sender, changes, joined=True)
        # Changes made after we were linked may have come first: they apply now.
        return Outcome(events=(joined, *self._apply_held(group.group_id)))

    # ------------------------------------------------------------ groups: sender keys

    def _retire_outbound(self, group_id: bytes) -> None:
        if self._outbound.pop(group_id, None) is not None:
            self._mark(("outbound", group_id))

    def _is_member(self, group_id: bytes, user_id: str) -> bool:
        group = self._groups.get(group_id)
        return group is not None and self._listed_as_member(group.current, user_id)

    def _listed_as_member(self, state: GroupState, user_id: str) -> bool:
        """Whether ``user_id`` is a member and the device list we hold is signed by its identity.

        A user whose identity changed (and was confirmed for one-to-one use)
        is not the member the group recorded: an admin must add it again.
        """
        member = state.member(user_id)
        held = self.device_list(user_id)
        return (
            member is not None and held is not None and held.user_identity == member.user_identity
        )

    def _group_recipients(self, group_id: bytes, state: GroupState | None = None) -> list[Address]:
        """Every listed device of every member (``state``: default the current one), but ours."""
        state = state or self._groups[group_id].current
        recipients: list[Address] = []
        for user_id in state.user_ids:
            devices = self.devices_of(user_id)
            if not self._listed_as_member(state, user_id):
                continue
            if user_id == self.user_id:
                # Only our own user's devices include ours: others skip the comparisons.
                devices = tuple(a for a in devices if a.device_id != self.device_id)
            recipients.extend(devices)
        return recipients

    def _current_recipients(
        self, group_id: bytes, outbound: _Outbound | None
    ) -> tuple[Address, ...]:
        """The current state's recipients, as our sender key last saw them if still valid."""
        if outbound is not None and outbound.recipients is not None:
            return outbound.recipients
        recipients = tuple(self._group_recipients(group_id))
        if outbound is not None:
            outbound.recipients = recipients
        return recipients

    def _forget_recipients(self) -> None:
        """A group or a device list changed: recipients are computed again."""
        for outbound in self._outbound.values():
            outbound.recipients = None

    def group_send_needs(self, group_id: bytes, *, now: int) -> list[Address]:
        """Devices a group send would need a session with (fetch their bundles)."""
        if group_id not in self._groups:
            raise InvalidArgument("unknown group")
        recipients = self._group_recipients(group_id)
        outbound = self._outbound.get(group_id)
        shared = set() if outbound is None else outbound.shared_with
        return [
            a
            for a in recipients
            if a not in shared
            and (a not in self._sessions or not self._sessions[a].has_usable_session(now))
        ]

    def send_group(self, group_id: bytes, body: bytes, *, now: int) -> tuple[bytes, list[Send]]:
        """Encrypt once for the whole group.

        Returns the sender-key distributions still needed (one-to-one, only
        to devices that lack our current key) followed by the one
        :class:`GroupSend`. Raises MissingSessions (nothing changed) when a
        device that needs our key has no session yet.
        """
        if not self._is_member(group_id, self.user_id):
            raise InvalidArgument("not a member of this group")
        outbound = self._outbound.get(group_id)
        recipients = self._current_recipients(group_id, outbound)
        if outbound is not None and outbound.key.needs_rotation(
            now, max_age=self.sender_key_max_age, max_messages=self.sender_key_max_messages
        ):
            outbound = None
        needing = list(recipients) if outbound is None else outbound.lacking(recipients)
        records = self._check_sessions(needing, now)
        if outbound is None:
            outbound = _Outbound(OutboundSenderKey.create(group_id, now, self._rng), set())
            outbound.recipients = recipients
            self._outbound[group_id] = outbound
        sends: list[Send] = []
        if needing:
            distribution = SenderKey(outbound.key.distribution_message()).encode()
            sends.extend(self._encrypt_with(needing, records, distribution, now))
            outbound.shared_with.update(needing)
        message_id = self._new_message_id()
        payload = outbound.key.encrypt(GroupText(message_id, now, body).encode())
        self._mark(("outbound", group_id))
        sends.append(GroupSend(group_id, payload, recipients))
        return message_id, sends

    # ------------------------------------------------------------ groups: membership

    def group(self, group_id: bytes) -> GroupState:
        group = self._groups.get(group_id)
        if group is None:
            raise InvalidArgument("unknown group")
        return group.current

    @property
    def group_ids(self) -> tuple[bytes, ...]:
        return tuple(self._groups)

    def membership_needs(self, user_ids: Iterable[str], *, now: int) -> list[Address]:
        """Devices a membership change involving these users needs sessions with."""
        return self.devices_without_session(user_ids, now=now)

    def create_group(
        self, title: str, members: Iterable[str], *, now: int
    ) -> tuple[bytes, list[Send]]:
        """Create a group with us as admin; the welcome goes to every member device."""
        others = sorted(set(members) - {self.user_id})
        adds = []
        for user_id in others:
            held = self.device_list(user_id)
            if held is None:
                raise DeviceListNeeded(user_id)
            adds.append(AddMember(user_id, held.user_identity))
        group_id = self._rng.random_bytes(GROUP_ID_SIZE)
        message = ControlMessage.sign(
            self.account.identity,
            group_id=group_id,
            parent_epoch=0,
            parent_hash=bytes(32),
            author_user_id=self.user_id,
            author_device_id=self.device_id,
            action=CreateGroup(title, tuple(adds)),
        )
        update = Group.from_genesis(message, self._device_lists)
        recipients = self._group_recipients(group_id, update.group.current)
        self._check_sessions(recipients, now)
        self._set_group(group_id, update.group)
        welcome = update.group.welcome(message).encode()
        content = GroupControl(message.encode(), welcome).encode()
        return group_id, list(self._encrypt_for(recipients, content, now))

    def add_member(self, group_id: bytes, user_id: str, *, now: int) -> list[Send]:
        """(Admin.) Add a user: the change to current members, a welcome to the new one."""
        held = self.device_list(user_id)
        if held is None:
            raise DeviceListNeeded(user_id)
        return self._change_group(group_id, AddMember(user_id, held.user_identity), now)

    def remove_member(self, group_id: bytes, user_id: str, *, now: int) -> list[Send]:
        """(Admin.) Remove a member; every remaining member rotates its sender key."""
        return self._change_group(group_id, RemoveMember(user_id), now)

    def leave_group(self, group_id: bytes, *, now: int) -> list[Send]:
        return self._change_group(group_id, Leave(), now)

    def _change_group(self, group_id: bytes, action: Action, now: int) -> list[Send]:
        group = self._groups.get(group_id)
        if group is None:
            raise InvalidArgument("unknown group")
        message = group.propose(
            action,
            author_user_id=self.user_id,
            author_device_id=self.device_id,
            device_key=self.account.identity,
        )
        update = group.apply(message, self._device_lists)
        before = set(self._group_recipients(group_id, group.current))
        after = self._group_recipients(group_id, update.group.current)
        joiners = [a for a in after if a not in before]
        # Everyone who was in the group learns of the change, the removed included.
        told = sorted(before | set(after) - set(joiners))
        self._check_sessions([*told, *joiners], now)
        self._set_group(group_id, update.group)
        self._after_group_change(group_id, update.events)
        sends = self._encrypt_for(told, GroupControl(message.encode(), None).encode(), now)
        if joiners:
            welcome = update.group.welcome(message).encode()
            sends += self._encrypt_for(
                joiners, GroupControl(message.encode(), welcome).encode(), now
            )
        return list(sends)

    def _set_group(self, group_id: bytes, group: Group) -> None:
        self._groups[group_id] = group
        self._forget_recipients()
        self._mark(("group", group_id))

    def _after_group_change(self, group_id: bytes, changes: tuple[GroupEvent, ...]) -> None:
        removed = {c.user_id for c in changes if isinstance(c, MemberRemoved)}
        if not removed:
            return
        # Whoever left had our sender key: the next message starts a new one.
        self._retire_outbound(group_id)
        if self.user_id in removed:
            self._groups.pop(group_id, None)
            self._mark(("group", group_id))
            self._left = [*(g for g in self._left if g != group_id), group_id][-MAX_LEFT_GROUPS:]
            self._mark(("left_groups",))
        for key in [
            k
            for k in self._inbound
            if k[0] == group_id and (k[1].user_id in removed or self.user_id in removed)
        ]:
            del self._inbound[key]
            self._mark(("inbound", group_id, key[1].user_id, key[1].device_id))

    def _receive_group_control(self, sender: Address, content: GroupControl, now: int) -> Outcome:
        message = ControlMessage.decode(content.control)
        if (message.author_user_id, message.author_device_id) != (
            sender.user_id,
            sender.device_id,
        ):
            # Control messages are forwarded by their author only; anything else is suspect.
            raise UnauthorizedChange("control message not sent by its author")
        try:
            first = self._apply_control(sender, message, content)
        except StaleChange:
            if not self._builds_ahead(message):
                raise
            # Reordered: its parent (or our welcome) is still on its way.
            self._hold_control(sender, content)
            return Outcome()
        return Outcome(events=(first, *self._apply_held(message.group_id)))

    def _apply_control(
        self, sender: Address, message: ControlMessage, content: GroupControl
    ) -> GroupUpdated:
        """Apply (or join from) a control message; raises, changing nothing, if refused."""
        group = self._groups.get(message.group_id)
        if group is None:
            if content.snapshot is None:
                raise StaleChange("a change for a group we do not hold")
            welcome = Welcome.decode(content.snapshot)
            if welcome.message.encode() != content.control:
                # The welcome must be for the change its sender authored, and for this group.
                raise UnauthorizedChange("the welcome is for another change")
            update = Group.join(
                welcome,
                self._device_lists,
                user_id=self.user_id,
                user_identity=self.user_identity_public,
            )
            joined = True
            if message.group_id in self._left:
                self._left.remove(message.group_id)  # added again
                self._mark(("left_groups",))
        else:
            update = group.apply(message, self._device_lists)
            joined = False
        self._set_group(message.group_id, update.group)
        self._after_group_change(message.group_id, update.events)
        return GroupUpdated(message.group_id, sender, update.events, joined)

    def _builds_ahead(self, message: ControlMessage) -> bool:
        """Whether a refused change may apply later: its group or parent epoch is not here yet."""
        group = self._groups.get(message.group_id)
        return group is None or message.parent_epoch > group.current.epoch

    def _hold_control(self, sender: Address, content: GroupControl) -> None:
        if (sender, content) not in self._held:
            self._held.append((sender, content))
            del self._held[:-MAX_HELD_GROUP_CONTROLS]
            self._mark(("held_controls",))

    def _apply_held(self, group_id: bytes) -> list[Event]:
        """Apply held changes of this group that now fit, until none does; drop refused ones."""
        events: list[Event] = []
        progress = True
        while progress:
            progress = False
            for entry in list(self._held):
                sender, content = entry
                message = ControlMessage.decode(content.control)
                if message.group_id != group_id:
                    continue
                try:
                    events.append(self._apply_control(sender, message, content))
                    progress = True
                except StaleChange:
                    if self._builds_ahead(message):
                        continue
                except RemoteProtocolError:
                    pass
                self._held.remove(entry)
                self._mark(("held_controls",))
        return events

    # ------------------------------------------------------------ persistence

    def _mark(self, key: RecordKey) -> None:
        self._dirty.add(key)

    def take_changes(self) -> dict[RecordKey, bytes | None]:
        """Serialized records changed since the last call (None: delete the record)."""
        out: dict[RecordKey, bytes | None] = {}
        for key in self._dirty:
            out[key] = self._serialize(key)
        self._dirty = set()
        return out

    def _serialize(self, key: RecordKey) -> bytes | None:
        kind = key[0]
        if kind == "meta":
            seed = None if self._user_identity is None else self._user_identity.seed
            return pack(
                [STATE_VERSION, self.user_id, self.device_id, self.user_identity_public, seed]
            )
        if kind == "account":
            return self.account.to_bytes()
        if kind == "devices":
            held = self._device_lists.get(_key_str(key[1]))
            return None if held is None else held.encode()
        if kind == "pending_identity":
            pending = self._pending_identity.get(_key_str(key[1]))
            return None if pending is None else pending.encode()
        if kind == "session":
            record = self._sessions.get(Address(_key_str(key[1]), _key_int(key[2])))
            return None if record is None else record.to_bytes()
        if kind == "outbound":
            outbound = self._outbound.get(_key_bytes(key[1]))
            if outbound is None:
                return None
            shared = [[a.user_id, a.device_id] for a in sorted(outbound.shared_with)]
            return pack([STATE_VERSION, outbound.key.to_bytes(), shared])
        if kind == "inbound":
            inbound = self._inbound.get(
                (_key_bytes(key[1]), Address(_key_str(key[2]), _key_int(key[3])))
            )
            return None if inbound is None else inbound.to_bytes()
        if kind == "group":
            group = self._groups.get(_key_bytes(key[1]))
            return None if group is None else group.to_bytes()
        if kind == "left_groups":
            return pack([STATE_VERSION, self._left]) if self._left else None
        if kind == "held_controls":
            if not self._held:
                return None
            entries = [[a.user_id, a.device_id, c.control, c.snapshot] for a, c in self._held]
            return pack([STATE_VERSION, entries])
        raise AssertionError(f"unknown record kind {kind!r}")

    @classmethod
    def load(
        cls, records: Iterable[tuple[RecordKey, bytes]], *, rng: p.RandomSource = p.SYSTEM_RANDOM
    ) -> ClientCore:
        """Rebuild a core from the records :meth:`take_changes` produced."""
        by_key = dict(records)
        meta = by_key.get(("meta",))
        account = by_key.get(("account",))
        if meta is None or account is None:
            raise StateError("client state: meta or account record missing")

        def read_meta(f: Fields) -> tuple[str, int, bytes, bytes | None]:
            return f.text(MAX_USER_ID_SIZE), f.uint(), f.bin(32), f.optional_bin(32)

        user_id, device_id, user_public, seed = load_pickle(meta, "client meta", read_meta)
        try:
            core = cls(
                user_id,
                device_id,
                Account.from_bytes(account),
                user_public,
                user_identity=None if seed is None else IdentityKeyPair(seed),
                rng=rng,
            )
            for key, data in by_key.items():
                core._load_record(key, data)
        except StateError:
            raise
        except ProtocolError as exc:
            raise StateError(f"client state: corrupt record ({exc.code})") from exc
        core._dirty = set()
        return core

    def _load_record(self, key: RecordKey, data: bytes) -> None:
        kind = key[0]
        if kind == "devices":
            signed = SignedDeviceList.decode(data)
            self._device_lists[signed.device_list.user_id] = signed
        elif kind == "pending_identity":
            signed = SignedDeviceList.decode(data)
            self._pending_identity[signed.device_list.user_id] = signed
        elif kind == "session":
            self._sessions[Address(_key_str(key[1]), _key_int(key[2]))] = SessionRecord.from_bytes(
                data
            )
        elif kind == "outbound":

            def read_outbound(f: Fields) -> _Outbound:
                sender_key = OutboundSenderKey.from_bytes(f.bin())
                shared = {_read_address(a, "outbound shared") for a in f.array(max_len=100_000)}
                return _Outbound(sender_key, shared)

            self._outbound[_key_bytes(key[1])] = load_pickle(data, "outbound", read_outbound)
        elif kind == "inbound":
            address = Address(_key_str(key[2]), _key_int(key[3]))
            self._inbound[(_key_bytes(key[1]), address)] = SenderKeyRecord.from_bytes(data)
        elif kind == "group":
            group = Group.from_bytes(data)
            self._groups[group.group_id] = group
        elif kind == "left_groups":

            def read_left(f: Fields) -> list[bytes]:
                left = f.array(max_len=MAX_LEFT_GROUPS)
                if not all(isinstance(g, bytes) and len(g) == GROUP_ID_SIZE for g in left):
                    raise DecodeError("left groups: not a group id")
                return left

            self._left.extend(load_pickle(data, "left groups", read_left))
        elif kind == "held_controls":

            def read_held(f: Fields) -> list[tuple[Address, GroupControl]]:
                held = []
                for item in f.array(max_len=MAX_HELD_GROUP_CONTROLS):
                    entry = Fields(item, what="held control", count=4)
                    sender = Address(entry.text(MAX_USER_ID_SIZE), entry.uint())
                    held.append((sender, GroupControl(entry.bin(), entry.optional_bin())))
                return held

            self._held.extend(load_pickle(data, "held controls", read_held))

    def __repr__(self) -> str:
        return (
            f"ClientCore({self.address}, sessions={len(self._sessions)}, "
            f"groups={len(self._groups)})"
        )
