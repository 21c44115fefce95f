"""The sans-I/O heart of a hushchat device: feed it inputs, get events and sends.

:class:`ClientCore` ties the pieces together the way a messenger needs them:
device lists (several devices per user), one-to-one sessions with every
device, sender keys for groups, group membership, and the content carried
inside the encryption. It does no I/O: the transport feeds it what the relay
delivers (envelopes, bundles, device lists) and carries out what it returns
(:class:`DirectSend`, :class:`GroupSend`, :class:`ChangeSend`). Time is
passed in.

Persistence: every method that changes state marks the records it touched;
:meth:`ClientCore.take_changes` hands them over serialized (``None`` means
delete), so the caller can write them in one transaction before it
acknowledges the envelope that caused them. :meth:`ClientCore.load` rebuilds
the core from those records.

Rules the core enforces (spec/11-devices.md, spec/12-groups.md):

* a peer device is used only if a device list signed by its user's identity
  names it (with the device's proof that it belongs to that user), and a
  handshake from it must carry the identity that list gives;
* a device key belongs to one user: a list naming a key that another held
  list names is refused, and every session binds both users (spec/02);
* a changed user identity is never accepted silently: it raises an
  :class:`IdentityChanged` event and is held until :meth:`confirm_identity`;
* group messages are accepted only from current members' listed devices,
  and sent only to them, where the list must be signed by the user identity
  the group state records for the member (a member whose identity changed
  is left out until an admin adds it again with the new one); sender keys
  are kept only from those devices, for groups we hold, named by their
  creator, and at most ``max_sender_key_records`` of them (spec 4.8);
* when a member or one of its devices leaves, every remaining member
  rotates its sender key before its next group message, and distributes the
  new key only to the remaining devices;
* a group message that cannot be decrypted surfaces as :class:`Undecryptable`
  and, when a session exists, a retry request goes back to its sender, who
  answers with its current sender key;
* a group change applies only on the current state; our own takes effect
  when the relay's receipt for it arrives, unless another came first
  (spec/12-groups.md, section 12.4);
* a device holds at most ``max_groups`` groups: a welcome beyond it is
  refused (``TOO_MANY_GROUPS``) and nothing held is evicted (spec 12.5).

Each concern is a collaborator over one shared :class:`CoreState`: the
:class:`Directory` (device lists), :class:`Sessions` (one-to-one),
:class:`GroupMessages` (sender keys) and :class:`Membership` (groups). This
class routes what arrives to them and applies what one concern's change
means for the others.
"""

from __future__ import annotations

from collections.abc import Iterable

from .. import primitives as p
from ..account import Account
from ..consts import (
    MAX_GROUPS,
    MAX_SENDER_KEY_RECORDS,
    SENDER_KEY_MAX_AGE,
    SENDER_KEY_MAX_MESSAGES,
)
from ..content import (
    DeliveryReceipt,
    GroupControl,
    GroupSync,
    RetryRequest,
    SenderKey,
    SentCopy,
    SyncRequest,
    Text,
    decode_content,
)
from ..devices import DeviceEntry, DeviceList, SignedDeviceList
from ..errors import (
    DuplicateMessage,
    InvalidArgument,
    InvalidState,
    ProtocolError,
    RemoteProtocolError,
    StateError,
    UnauthorizedChange,
)
from ..fingerprint import SafetyNumber
from ..group import GroupState
from ..group_cipher import SenderKeyStore
from ..keys import IdentityKeyPair
from ..pqxdh import Party
from . import persistence
from .arguments import (
    check_address,
    check_device_id,
    check_direct_body,
    check_group_body,
    check_group_id,
    check_identity,
    check_input,
    check_members,
    check_message,
    check_message_ids,
    check_now,
    check_title,
    check_user_id,
    check_user_ids,
)
from .direct import Sessions
from .directory import DeviceListChange, Directory
from .events import Address, DeliveryConfirmed, IdentityChanged, Undecryptable
from .groups import GroupMessages
from .membership import Membership
from .records import RecordKey
from .sends import (
    ENVELOPE_DIRECT,
    ENVELOPE_GROUP,
    ENVELOPE_RECEIPT,
    ChangeSend,
    DirectSend,
    GroupSend,
    Outcome,
    Send,
)
from .state import CoreState


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
        max_sender_key_records: int = MAX_SENDER_KEY_RECORDS,
        max_groups: int = MAX_GROUPS,
    ) -> None:
        if user_identity is not None and user_identity.public.ed25519 != user_identity_public:
            raise InvalidArgument("user identity key pair does not match its public key")
        self._state = CoreState(
            user_id,
            device_id,
            account,
            user_identity_public,
            user_identity,
            rng,
            inbound=SenderKeyStore(max_records=max_sender_key_records),
            max_groups=max_groups,
        )
        self._directory = Directory(self._state)
        self._sessions = Sessions(self._state, self._directory)
        self._messages = GroupMessages(
            self._state,
            self._directory,
            self._sessions,
            max_age=sender_key_max_age,
            max_messages=sender_key_max_messages,
        )
        self._membership = Membership(self._state, self._directory, self._sessions, self._messages)

    # ------------------------------------------------------------ creation

    @classmethod
    def create_primary(
        cls, user_id: str, device_id: int, *, now: int, rng: p.RandomSource = p.SYSTEM_RANDOM
    ) -> ClientCore:
        """A new user: a user identity, this first device, and its signed device list."""
        check_user_id(user_id)
        check_device_id(device_id)
        check_now(now)
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
        first = DeviceList.initial(user_id, user_identity.public.ed25519, [core.device_entry])
        core._devices_changed(core._directory.accept(first.sign(user_identity), None))
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
        """Another device of an existing user; the primary must :meth:`link_device` it
        with this device's :attr:`device_entry`."""
        check_user_id(user_id)
        check_device_id(device_id)
        check_identity(user_identity_public)
        check_now(now)
        return cls(
            user_id, device_id, Account.create(now=now, rng=rng), user_identity_public, rng=rng
        )

    @property
    def user_id(self) -> str:
        return self._state.user_id

    @property
    def device_id(self) -> int:
        return self._state.device_id

    @property
    def account(self) -> Account:
        return self._state.account

    @property
    def user_identity_public(self) -> bytes:
        return self._state.user_identity_public

    @property
    def sender_key_max_age(self) -> int:
        return self._messages.max_age

    @property
    def sender_key_max_messages(self) -> int:
        return self._messages.max_messages

    @property
    def max_sender_key_records(self) -> int:
        return self._state.inbound.max_records

    @property
    def max_groups(self) -> int:
        return self._state.max_groups

    @property
    def address(self) -> Address:
        return self._state.address

    @property
    def device_identity(self) -> bytes:
        return self._state.account.identity.public.ed25519

    @property
    def device_entry(self) -> DeviceEntry:
        """This device's entry in its user's list: its key and its proof that it is ours.

        A new device hands it to the primary (which passes it to
        :meth:`link_device`); the proof stays valid for every later list.
        """
        state = self._state
        return DeviceEntry.prove(
            state.account.identity, state.user_id, state.device_id, state.user_identity_public
        )

    @property
    def party(self) -> Party:
        """Whose this device is, as every session we start or accept binds it."""
        return self._state.party

    @property
    def holds_user_identity(self) -> bool:
        """Whether this device holds the user identity (and so can change the device list)."""
        return self._state.user_identity is not None

    @property
    def own_device_list(self) -> SignedDeviceList | None:
        return self._state.device_lists.get(self.user_id)

    def link_device(self, entry: DeviceEntry) -> SignedDeviceList:
        """(Primary only.) Sign a new device list that adds a device; upload it to the relay.

        ``entry`` is the new device's :attr:`device_entry`: InvalidArgument
        unless its proof says it belongs to our user.
        """
        if not isinstance(entry, DeviceEntry):
            raise InvalidArgument("a device's entry is a DeviceEntry (its device_entry)")
        signed = self._directory.sign_own_change(lambda dl: dl.with_device(entry))
        self.process_device_list(signed.encode())
        return signed

    def unlink_device(self, device_id: int) -> SignedDeviceList:
        """(Primary only.) Sign a new device list without ``device_id``."""
        check_device_id(device_id)
        if device_id == self.device_id:
            raise InvalidArgument("the primary device cannot unlink itself")
        signed = self._directory.sign_own_change(lambda dl: dl.without_device(device_id))
        self.process_device_list(signed.encode())
        return signed

    # ------------------------------------------------------------ device lists

    def device_list(self, user_id: str) -> DeviceList | None:
        check_user_id(user_id)
        return self._directory.device_list(user_id)

    def devices_of(self, user_id: str) -> tuple[Address, ...]:
        check_user_id(user_id)
        return self._directory.devices_of(user_id)

    def knows_device(self, address: Address) -> bool:
        check_address(address)
        return self._directory.knows_device(address)

    def process_device_list(self, data: bytes) -> Outcome:
        """Take a signed device list from the relay (verified here, never trusted)."""
        check_input(data, "a signed device list")
        return self._devices_changed(self._directory.process_device_list(data))

    def pending_identity(self, user_id: str) -> IdentityChanged | None:
        """The identity change waiting for :meth:`confirm_identity`, if any (survives reloads)."""
        check_user_id(user_id)
        return self._directory.pending_identity(user_id)

    def confirm_identity(self, user_id: str) -> Outcome:
        """The app's user confirmed a changed identity (ideally after comparing safety numbers)."""
        check_user_id(user_id)
        change = self._directory.confirm_identity(user_id)
        self._sessions.drop_sessions_of(user_id)  # every session was with the old identity
        return self._devices_changed(change)

    def _devices_changed(self, change: DeviceListChange) -> Outcome:
        """What a device list change means for sessions and sender keys."""
        if change.accepted:
            self._messages.forget_recipients()
            for address in change.removed:
                self._sessions.drop_session(address)
            if change.removed:
                # A device that leaves must not read what follows, and is no
                # member's device: its sender keys go.
                self._messages.retire_where_member(change.user_id)
                self._messages.drop_sender_keys_of(set(change.removed))
        return Outcome(events=change.events)

    def safety_number(self, user_id: str, *, pending: bool = False) -> SafetyNumber:
        """The safety number with ``user_id``'s trusted identity (``pending``: with the
        changed identity waiting for confirmation, to compare before confirming)."""
        check_user_id(user_id)
        return self._directory.safety_number(user_id, pending=pending)

    # ------------------------------------------------------------ sessions

    def devices_without_session(self, user_ids: Iterable[str], *, now: int) -> list[Address]:
        """Devices of these users (and our own other devices) we cannot encrypt to yet."""
        user_ids = check_user_ids(user_ids)
        check_now(now)
        return self._sessions.devices_without_session(user_ids, now=now)

    def process_bundle(self, data: bytes, *, now: int, post_quantum: bool = True) -> Address:
        """Start a session from a prekey bundle the relay handed out."""
        check_input(data, "a prekey bundle")
        check_now(now)
        return self._sessions.process_bundle(data, now=now, post_quantum=post_quantum)

    def send_direct(
        self,
        to_user: str,
        body: bytes,
        *,
        now: int,
        message_id: bytes | None = None,
        sent_at: int | None = None,
    ) -> tuple[bytes, list[DirectSend]]:
        """Encrypt a one-to-one message for every device of ``to_user``.

        Our own other devices get a :class:`SentCopy`. ``message_id`` and
        ``sent_at`` (default: a new id, ``now``) are those of a message the
        app sent earlier and the transport encrypts later, for instance after
        an outage; every send carries ``message_id``. Raises DeviceListNeeded or
        MissingSessions (nothing changed) when lists or bundles are needed;
        LimitExceeded for a body over MAX_PLAINTEXT_SIZE.
        """
        check_user_id(to_user)
        check_direct_body(body)
        check_now(now)
        check_message(message_id, sent_at)
        return self._sessions.send_direct(
            to_user, body, now=now, message_id=message_id, sent_at=sent_at
        )

    def send_receipt(
        self, to_user: str, message_ids: Iterable[bytes], *, now: int
    ) -> list[DirectSend]:
        """A delivery receipt for messages of ``to_user`` we received, to every device of it.

        1 to MAX_RECEIPT_MESSAGE_IDS message ids. DeviceListNeeded or
        MissingSessions (nothing changed) as for :meth:`send_direct`.
        """
        check_user_id(to_user)
        ids = check_message_ids(message_ids)
        check_now(now)
        if to_user == self.user_id:
            raise InvalidArgument("our own devices confirm nothing to each other")
        recipients = self._directory.devices_of(to_user)
        self._sessions.check_sessions(recipients, now)
        return self._sessions.encrypt_for(recipients, DeliveryReceipt(ids).encode(), now)

    def resend_direct(self, send: DirectSend, *, now: int) -> DirectSend:
        """Encrypt a refused send's content again for the recipient's current devices.

        For when the relay refused ``send`` because the device list changed:
        process the list it returned first, create the missing sessions, then
        call this. MissingSessions if a session is still missing.
        """
        if not isinstance(send, DirectSend):
            raise InvalidArgument("resend_direct takes a DirectSend")
        check_now(now)
        return self._sessions.resend_direct(send, now=now)

    # ------------------------------------------------------------ groups

    def group(self, group_id: bytes) -> GroupState:
        check_group_id(group_id)
        return self._membership.group(group_id)

    @property
    def group_ids(self) -> tuple[bytes, ...]:
        return self._membership.group_ids

    def membership_needs(self, user_ids: Iterable[str], *, now: int) -> list[Address]:
        """Devices a membership change involving these users needs sessions with."""
        user_ids = check_user_ids(user_ids)
        return self.devices_without_session(user_ids, now=now)

    def create_group(
        self, title: str, members: Iterable[str], *, now: int
    ) -> tuple[bytes, list[Send]]:
        """Create a group with us as admin; the welcome goes to every member device."""
        check_title(title)
        members = check_members(members)
        check_now(now)
        return self._membership.create_group(title, members, now=now)

    def reinit_group(self, group_id: bytes, *, now: int) -> tuple[bytes, list[Send]]:
        """(Admin.) Continue the group in a new one with the members we hold; its id.

        The way back to one state after members ended on different branches
        (a hostile relay's doing, spec/12-groups.md section 12.9): every member
        that holds us as an admin of the group joins the new one and leaves
        the old (:class:`GroupReplaced`). We leave the old one now.
        """
        check_group_id(group_id)
        check_now(now)
        return self._membership.reinit_group(group_id, now=now)

    def add_member(self, group_id: bytes, user_id: str, *, now: int) -> list[Send]:
        """(Admin.) Add a user: the change to current members, a welcome to the new one."""
        check_group_id(group_id)
        check_user_id(user_id)
        check_now(now)
        return self._membership.add_member(group_id, user_id, now=now)

    def remove_member(self, group_id: bytes, user_id: str, *, now: int) -> list[Send]:
        """(Admin.) Remove a member; every remaining member rotates its sender key."""
        check_group_id(group_id)
        check_user_id(user_id)
        check_now(now)
        return self._membership.remove_member(group_id, user_id, now=now)

    def leave_group(self, group_id: bytes, *, now: int) -> list[Send]:
        """Leave the group (any member; the last admin promotes another first)."""
        check_group_id(group_id)
        check_now(now)
        return self._membership.leave_group(group_id, now=now)

    def set_admin(self, group_id: bytes, user_id: str, admin: bool, *, now: int) -> list[Send]:
        """(Admin.) Promote (``admin=True``) or demote a member."""
        check_group_id(group_id)
        check_user_id(user_id)
        if not isinstance(admin, bool):
            raise InvalidArgument("admin is True or False")
        check_now(now)
        return self._membership.set_admin(group_id, user_id, admin, now=now)

    def set_title(self, group_id: bytes, title: str, *, now: int) -> list[Send]:
        """(Admin.) Rename the group."""
        check_group_id(group_id)
        check_title(title)
        check_now(now)
        return self._membership.set_title(group_id, title, now=now)

    def has_pending_change(self, group_id: bytes) -> bool:
        """Whether our last change of this group awaits its receipt (a next one waits).

        A change (add, remove, leave, admin, title) takes effect for us when
        the relay's receipt for it arrives, as for every member when the
        change does; until then another change of the group raises
        ChangePending. :class:`GroupUpdated` (from ourselves) tells it took
        effect, :class:`GroupChangeFailed` that it did not.
        """
        check_group_id(group_id)
        return self._membership.has_pending_change(group_id)

    def waiting_changes(self) -> tuple[bytes, ...]:
        """Groups whose change of ours lost its epoch and, to be proposed again, needs
        device lists or sessions of members who joined meanwhile: for each, get the
        lists and sessions of :meth:`change_needs`' users, then :meth:`retry_change`."""
        return self._membership.waiting_changes()

    def change_needs(self, group_id: bytes) -> tuple[str, ...]:
        """The users our waiting change of this group involves (members, an added user)."""
        check_group_id(group_id)
        return self._membership.change_needs(group_id)

    def retry_change(self, group_id: bytes, *, now: int) -> Outcome:
        """Propose our waiting change of this group again (its sends; or a
        GroupChangeFailed if no longer allowed). MissingSessions or
        DeviceListNeeded: it keeps waiting."""
        check_group_id(group_id)
        check_now(now)
        return self._membership.retry_change(group_id, now=now)

    def resend_change(self, send: ChangeSend, *, now: int) -> ChangeSend | None:
        """Encrypt a refused change again for its users' current devices (None: obsolete).

        As :meth:`resend_direct`, for a :class:`ChangeSend` refused for a
        stale device list. MissingSessions if a session is still missing.
        """
        if not isinstance(send, ChangeSend):
            raise InvalidArgument("resend_change takes a ChangeSend")
        check_now(now)
        return self._membership.resend_change(send, now=now)

    def abandon_change(self, send: ChangeSend) -> Outcome:
        """The relay kept refusing ``send``: drop our change (a GroupChangeFailed event)."""
        if not isinstance(send, ChangeSend):
            raise InvalidArgument("abandon_change takes a ChangeSend")
        return self._membership.abandon_change(send)

    def group_send_needs(self, group_id: bytes, *, now: int) -> list[Address]:
        """Devices a group send would need a session with (fetch their bundles)."""
        check_group_id(group_id)
        check_now(now)
        return self._messages.group_send_needs(group_id, now=now)

    def send_group(
        self,
        group_id: bytes,
        body: bytes,
        *,
        now: int,
        message_id: bytes | None = None,
        sent_at: int | None = None,
    ) -> tuple[bytes, list[Send]]:
        """Encrypt once for the whole group (``message_id``, ``sent_at``: as send_direct).

        Returns the sender-key distributions still needed (one-to-one, only
        to devices that lack our current key) followed by the one
        :class:`GroupSend`. Raises MissingSessions (nothing changed) when a
        device that needs our key has no session yet; LimitExceeded when the
        body with its message id and time exceeds MAX_PLAINTEXT_SIZE.
        """
        check_group_id(group_id)
        check_now(now)
        check_message(message_id, sent_at)
        check_group_body(body, now if sent_at is None else sent_at)
        return self._messages.send_group(
            group_id, body, now=now, message_id=message_id, sent_at=sent_at
        )

    def resend_group(self, send: GroupSend, *, now: int) -> list[Send]:
        """Address a refused group send to the group's current devices.

        Devices that lack our sender key get it first (one-to-one). If our
        key was retired meanwhile (a member or device left), the payload still
        goes out; a device that cannot read it asks for a retry.
        """
        if not isinstance(send, GroupSend):
            raise InvalidArgument("resend_group takes a GroupSend")
        check_now(now)
        return self._messages.resend_group(send, now=now)

    def request_sync(self, *, now: int) -> list[Send]:
        """(A newly linked device.) Ask our user's other devices for the groups they hold.

        Each answers with the group's recent states and its own sender key;
        other members send us theirs with their next message (they address
        every listed device of every member). Conversation history is not
        copied: a new device reads what is sent from now on.
        """
        check_now(now)
        return self._membership.request_sync(now=now)

    # ------------------------------------------------------------ receiving

    def receive(
        self,
        sender: Address,
        kind: int,
        payload: bytes,
        *,
        now: int,
        sender_list: bytes | None = None,
    ) -> Outcome:
        """Process one envelope the relay delivered (sender stamped by the relay).

        ``sender_list``: the sender's signed device list, fetched for this
        envelope because no list held names the sender. A first list of a user
        (none held) is kept only if the envelope opens: it yields more than
        :class:`Undecryptable` events, or sends, or changes a record. Otherwise
        all state is as it was, so that a relay stamping envelopes with senders
        we never met cannot make us keep their lists with envelopes that do
        not open (11-devices.md section 11.2; a sender that can make a real
        initial message is kept, as any first contact). A list of a user
        already held is taken as :meth:`process_device_list` takes it.

        Never raises for bad remote input: what cannot be read becomes an
        :class:`Undecryptable` event (duplicates are dropped silently, as a
        lost acknowledgement causes them); a ``sender_list`` that is not a
        valid list of the sender's user counts as none.
        """
        check_address(sender)
        check_input(payload, "an envelope payload")
        check_now(now)
        if isinstance(kind, bool) or not isinstance(kind, int):
            raise InvalidArgument("an envelope kind is an integer")
        if sender_list is None:
            return self._receive(sender, kind, payload, now)
        check_input(sender_list, "a signed device list")
        user_id = sender.user_id
        first = self._directory.device_list(user_id) is None
        changed_before = set(self._state.changed)
        try:
            listed = self._devices_changed(
                self._directory.process_device_list(sender_list, user_id=user_id)
            )
        except RemoteProtocolError:
            return self._receive(sender, kind, payload, now)
        received = self._receive(sender, kind, payload, now)
        opened = (
            received.sends
            or any(not isinstance(event, Undecryptable) for event in received.events)
            or self._state.changed - changed_before - {RecordKey.devices(user_id)}
        )
        if first and not opened:
            self._directory.withdraw_first(user_id)
            return received
        return Outcome(events=(*listed.events, *received.events), sends=received.sends)

    def _receive(self, sender: Address, kind: int, payload: bytes, now: int) -> Outcome:
        if not self.knows_device(sender):
            return Outcome(events=(Undecryptable(sender, "UNKNOWN_DEVICE"),))
        try:
            if kind == ENVELOPE_DIRECT:
                return self._receive_direct(sender, payload, now)
            if kind == ENVELOPE_GROUP:
                return self._messages.receive(sender, payload, now)
            if kind == ENVELOPE_RECEIPT:
                return self._membership.receive_receipt(sender, payload, now)
        except DuplicateMessage:
            return Outcome()
        except ProtocolError as exc:
            if isinstance(exc, InvalidState | InvalidArgument):
                raise
            return Outcome(events=(Undecryptable(sender, exc.code),))
        return Outcome(events=(Undecryptable(sender, "UNKNOWN_ENVELOPE_KIND"),))

    def _receive_direct(self, sender: Address, payload: bytes, now: int) -> Outcome:
        plaintext = self._sessions.decrypt(sender, payload, now)
        try:
            content = decode_content(plaintext)
        except ProtocolError as exc:
            return Outcome(events=(Undecryptable(sender, exc.code),))
        if isinstance(content, Text):
            return self._sessions.receive_text(sender, content)
        if isinstance(content, SentCopy):
            return self._sessions.receive_copy(sender, content)
        if isinstance(content, SenderKey):
            return self._messages.receive_sender_key(sender, content)
        if isinstance(content, RetryRequest):
            return self._messages.receive_retry(sender, content, now)
        if isinstance(content, GroupControl):
            return self._membership.receive_control(sender, content, now)
        if isinstance(content, DeliveryReceipt):
            if sender.user_id == self.user_id:
                # Our devices confirm nothing to each other (no receipts for SentCopy).
                return Outcome(events=(Undecryptable(sender, UnauthorizedChange.code),))
            return Outcome(events=(DeliveryConfirmed(sender, content.message_ids),))
        if sender.user_id != self.user_id:
            # Sync traffic is between one user's own devices only.
            return Outcome(events=(Undecryptable(sender, UnauthorizedChange.code),))
        if isinstance(content, SyncRequest):
            return self._membership.answer_sync(sender, now)
        if isinstance(content, GroupSync):
            return self._membership.receive_sync(sender, content)
        raise AssertionError("decode_content returned an unknown type")

    # ------------------------------------------------------------ persistence

    def take_changes(self) -> dict[RecordKey, bytes | None]:
        """Serialized records changed since the last call (None: delete the record)."""
        return persistence.take_changes(self._state)

    @classmethod
    def load(
        cls,
        records: Iterable[tuple[RecordKey, bytes]],
        *,
        rng: p.RandomSource = p.SYSTEM_RANDOM,
        sender_key_max_age: int = SENDER_KEY_MAX_AGE,
        sender_key_max_messages: int = SENDER_KEY_MAX_MESSAGES,
        max_sender_key_records: int = MAX_SENDER_KEY_RECORDS,
        max_groups: int = MAX_GROUPS,
    ) -> ClientCore:
        """Rebuild a core from the records :meth:`take_changes` produced (the sender-key
        limits and ``max_groups`` are settings, not state: give them again if they are
        not the defaults)."""
        core, _ = cls._load(
            records,
            rng,
            sender_key_max_age,
            sender_key_max_messages,
            max_sender_key_records,
            max_groups,
            skip_corrupt=False,
        )
        return core

    @classmethod
    def load_salvaging(
        cls,
        records: Iterable[tuple[RecordKey, bytes]],
        *,
        rng: p.RandomSource = p.SYSTEM_RANDOM,
        sender_key_max_age: int = SENDER_KEY_MAX_AGE,
        sender_key_max_messages: int = SENDER_KEY_MAX_MESSAGES,
        max_sender_key_records: int = MAX_SENDER_KEY_RECORDS,
        max_groups: int = MAX_GROUPS,
    ) -> tuple[ClientCore, dict[RecordKey, str]]:
        """As :meth:`load`, leaving out the records that do not load (with their error codes).

        What is left out is what a peer or the relay can give again: a
        session starts over, a device list is fetched again, a sender key
        comes with a retry, a group is lost to this device. Without its meta
        and account records a device is not itself: StateError.
        """
        return cls._load(
            records,
            rng,
            sender_key_max_age,
            sender_key_max_messages,
            max_sender_key_records,
            max_groups,
            skip_corrupt=True,
        )

    @classmethod
    def _load(
        cls,
        records: Iterable[tuple[RecordKey, bytes]],
        rng: p.RandomSource,
        sender_key_max_age: int,
        sender_key_max_messages: int,
        max_sender_key_records: int,
        max_groups: int,
        *,
        skip_corrupt: bool,
    ) -> tuple[ClientCore, dict[RecordKey, str]]:
        by_key = dict(records)
        user_id, device_id, user_public, seed, account = persistence.read_meta(by_key)
        try:
            core = cls(
                user_id,
                device_id,
                Account.from_bytes(account),
                user_public,
                user_identity=None if seed is None else IdentityKeyPair(seed),
                rng=rng,
                sender_key_max_age=sender_key_max_age,
                sender_key_max_messages=sender_key_max_messages,
                max_sender_key_records=max_sender_key_records,
                max_groups=max_groups,
            )
            skipped = persistence.load_records(core._state, by_key, skip_corrupt=skip_corrupt)
        except StateError:
            raise
        except ProtocolError as exc:
            raise StateError(f"client state: corrupt record ({exc.code})") from exc
        return core, skipped

    def __repr__(self) -> str:
        return (
            f"ClientCore({self.address}, sessions={len(self._state.sessions)}, "
            f"groups={len(self._state.groups)})"
        )
