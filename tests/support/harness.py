"""An in-memory relay that drives ClientCores: the network the core tests run on.

No tests here; the ClientCore, malicious-relay and fuzz tests import it (conftest.py
makes the ``net`` fixture of it).

:class:`Network` does what the transport will do, minus the I/O: it keeps
the signed device lists (pushing each new one to every device, as the relay
notifies), hands out prekey bundles (each one-time prekey once, then the
last-resort keys, as the relay does with a device's upload), turns every
:class:`DirectSend` and :class:`GroupSend` into one :class:`Envelope` per
recipient device, stamped with the sending device (a :class:`ChangeSend`
into its parts' envelopes and, right after them, its author's receipt, as
the relay queues them), and delivers them only when a test says so. So a
test decides the order: deliver any envelope in flight, duplicate it, drop
it, replay an old one, swap its sender, or inject forged bytes.

Each envelope carries a ``label`` (what produced it) and what the harness
knows about its content from the sender's side (message id and body, group,
sender chain), so tests can say what its delivery must do. After every call
into a core the harness persists the records of :meth:`ClientCore.take_changes`
into that device's ``store`` and (``check_persistence``) checks that the
store equals the core's whole state, so a change a core forgot to mark
fails at the step that made it. :meth:`Network.reload` replaces a core by
``ClientCore.load(store)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace

from hushchat.protocol.account import Account
from hushchat.protocol.client_core import (
    ENVELOPE_DIRECT,
    ENVELOPE_GROUP,
    ENVELOPE_RECEIPT,
    Address,
    ChangeSend,
    ClientCore,
    DirectSend,
    Event,
    GroupSend,
    MessageReceived,
    Outcome,
    RecordKey,
    RetryRequested,
    Send,
)
from hushchat.protocol.client_core.persistence import serialize
from hushchat.protocol.content import (
    DeliveryReceipt,
    GroupControl,
    GroupText,
    RetryRequest,
    SenderKey,
    SentCopy,
    SyncRequest,
    Text,
    decode_content,
)
from hushchat.protocol.devices import DeviceList, SignedDeviceList
from hushchat.protocol.group import (
    Action,
    AddMember,
    ControlMessage,
    GroupState,
    Leave,
    RemoveMember,
    SetAdmin,
    SetTitle,
)
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.protocol.prekeys import (
    KemPreKeyPublic,
    OneTimePreKeyPublic,
    PreKeyBundle,
    PreKeyUpload,
)
from hushchat.protocol.primitives import RandomSource
from hushchat.protocol.sender_keys import SenderKeyDistributionMessage, SenderKeyMessage
from hushchat.protocol.session import SessionRecord
from tests.support.clock import NOW

# What produced an envelope.
TEXT = "text"  # send_direct, to the recipient user
COPY = "copy"  # send_direct, the SentCopy to our other devices
SKDM = "skdm"  # send_group, our sender key to devices that lack it
GROUP = "group"  # send_group, the group message
CONTROL = "control"  # a membership change (and welcomes)
RECEIPT = "receipt"  # the relay's receipt of our own change, to ourselves
RETRY = "retry"  # a retry request for an unreadable group message
RETRY_ANSWER = "retry_answer"  # our sender key again, answering a retry request
SYNC = "sync"  # a new device asks its user's other devices for their groups
GROUP_SYNC = "group_sync"  # one group's states, for our own new device
DELIVERY_RECEIPT = "delivery_receipt"  # a DeliveryReceipt, to the sender of messages
FORGED = "forged"  # made up by a test

# Envelopes carrying a sender key, and the labels that are 1:1 content.
SENDER_KEY_LABELS = frozenset({SKDM, RETRY_ANSWER})


def A(user_id: str, device_id: int = 1) -> Address:
    """A device's address, in short: ``A("bob", 2)``, or ``A("bob")`` for device 1."""
    return Address(user_id, device_id)


@dataclass(frozen=True)
class Envelope:
    """One ciphertext on its way to one device, as the relay stamps it.

    ``ident`` is shared by an envelope and its duplicates. ``chain`` is the
    sender chain (chain id, iteration) of a group message, or of the sender
    key a SKDM / RETRY_ANSWER envelope carries; ``parent_epoch`` that of a
    CONTROL's change.
    """

    ident: int
    sender: Address
    recipient: Address
    kind: int
    payload: bytes = field(repr=False)
    label: str
    group_id: bytes | None = None
    message_id: bytes | None = None
    body: bytes | None = field(default=None, repr=False)
    to_user: str | None = None
    chain: tuple[int, int] | None = None
    sent_at: int | None = None
    parent_epoch: int | None = None

    @classmethod
    def known(
        cls,
        label: str,
        *,
        group_id: bytes | None = None,
        message_id: bytes | None = None,
        body: bytes | None = None,
        to_user: str | None = None,
        chain: tuple[int, int] | None = None,
        sent_at: int | None = None,
        parent_epoch: int | None = None,
    ) -> Envelope:
        """A template: what is known of an envelope's content, before it is addressed."""
        nowhere = Address("", 0)
        return cls(
            0,
            nowhere,
            nowhere,
            0,
            b"",
            label,
            group_id,
            message_id,
            body,
            to_user,
            chain,
            sent_at,
            parent_epoch,
        )

    def received(self) -> MessageReceived:
        """The event delivering this TEXT or GROUP envelope must give."""
        assert self.message_id is not None and self.body is not None and self.sent_at is not None
        return MessageReceived(self.sender, self.message_id, self.sent_at, self.body, self.group_id)


@dataclass(frozen=True)
class Delivery:
    """What delivering one envelope did."""

    envelope: Envelope
    outcome: Outcome
    sent: tuple[Envelope, ...]

    @property
    def events(self) -> tuple[Event, ...]:
        return self.outcome.events


class _PrekeyStore:
    """A relay's copy of one device's upload: one-time keys are handed out once."""

    def __init__(self, account: Account) -> None:
        self.identity = account.identity.public
        self.upload: PreKeyUpload = account.prekey_upload()
        self.one_time: list[OneTimePreKeyPublic] = list(self.upload.one_time_prekeys)
        self.kem: list[KemPreKeyPublic] = list(self.upload.one_time_kem_prekeys)

    def bundle(self, address: Address) -> PreKeyBundle:
        opk = self.one_time.pop(0) if self.one_time else None
        kem = self.kem.pop(0) if self.kem else None
        return PreKeyBundle(
            address.user_id,
            address.device_id,
            self.identity,
            self.upload.signed_prekey,
            opk,
            kem or self.upload.last_resort_kem_prekey,
            kem is None,
        )


def _describe(content: bytes, answering_retry: bool) -> Envelope:
    """The label and known fields of a one-to-one plaintext."""
    decoded = decode_content(content)
    if isinstance(decoded, Text):
        return Envelope.known(
            TEXT, message_id=decoded.message_id, body=decoded.body, sent_at=decoded.sent_at
        )
    if isinstance(decoded, SentCopy):
        return Envelope.known(
            COPY,
            message_id=decoded.message_id,
            body=decoded.body,
            sent_at=decoded.sent_at,
            to_user=decoded.to_user,
        )
    if isinstance(decoded, SenderKey):
        skdm = SenderKeyDistributionMessage.decode(decoded.distribution)
        return Envelope.known(
            RETRY_ANSWER if answering_retry else SKDM,
            group_id=skdm.group_id,
            chain=(skdm.chain_id, skdm.iteration),
        )
    if isinstance(decoded, GroupControl):
        control = ControlMessage.decode(decoded.control)
        return Envelope.known(CONTROL, group_id=control.group_id, parent_epoch=control.parent_epoch)
    if isinstance(decoded, RetryRequest):
        return Envelope.known(RETRY, group_id=decoded.group_id)
    if isinstance(decoded, SyncRequest):
        return Envelope.known(SYNC)
    if isinstance(decoded, DeliveryReceipt):
        return Envelope.known(DELIVERY_RECEIPT)
    return Envelope.known(GROUP_SYNC, group_id=GroupState.decode(decoded.states[-1]).group_id)


def full_state(core: ClientCore) -> dict[RecordKey, bytes]:
    """Every record of ``core``, serialized: what its store must hold.

    Test-only introspection of the core's private state, one map per record
    kind; the field check fails loudly if the state grows something this
    helper does not know about.
    """
    state = core._state
    known = {
        "user_id", "device_id", "account", "user_identity_public", "user_identity", "rng",
        "device_lists", "pending_identity", "sessions", "outbound", "inbound", "groups", "claims",
        "held", "left", "pending", "changed", "max_groups",
    }  # fmt: skip
    held_fields = {f.name for f in fields(state)}
    assert held_fields == known, f"new ClientCore state: {held_fields ^ known}"
    keys: list[RecordKey] = [RecordKey.META, RecordKey.ACCOUNT]
    keys += [RecordKey.devices(user_id) for user_id in state.device_lists]
    keys += [RecordKey.pending_identity(user_id) for user_id in state.pending_identity]
    keys += [RecordKey.session(a) for a in state.sessions]
    keys += [RecordKey.outbound(group_id) for group_id in state.outbound]
    keys += [RecordKey.inbound(g, a) for g, a in state.inbound]
    keys += [RecordKey.group(group_id) for group_id in state.groups]
    keys += [RecordKey.claims(group_id) for group_id in state.claims]
    keys += [RecordKey.HELD_CONTROLS] if state.held else []
    keys += [RecordKey.LEFT_GROUPS] if state.left else []
    keys += [RecordKey.pending_change(group_id) for group_id in state.pending]
    records = {}
    for key in keys:
        data = serialize(state, key)
        assert data is not None
        records[key] = data
    return records


class Network:
    """Devices, a relay's directory and prekeys, and the envelopes in flight."""

    def __init__(
        self,
        rng: RandomSource,
        *,
        one_time_prekeys: int | None = 4,
        check_persistence: bool = True,
    ) -> None:
        """``one_time_prekeys`` per device (None: ClientCore.create_primary/create_linked's)."""
        self.rng = rng
        self.one_time_prekeys = one_time_prekeys
        self.check_persistence = check_persistence
        self.now = NOW  # each call into a core happens one second later
        self.devices: dict[Address, ClientCore] = {}
        self.stores: dict[Address, dict[RecordKey, bytes]] = {}
        self.device_lists: dict[str, bytes] = {}
        self.primaries: dict[str, ClientCore] = {}
        self.prekeys: dict[Address, _PrekeyStore] = {}
        self.in_flight: list[Envelope] = []
        self.delivered: list[Delivery] = []
        self.events: dict[Address, list[Event]] = {}
        self._next_ident = 0

    # ------------------------------------------------------------ time, persistence

    def tick(self) -> int:
        self.now += 1
        return self.now

    def persist(self, address: Address) -> None:
        """Write the core's changed records into its store (None deletes)."""
        core = self.devices[address]
        store = self.stores.setdefault(address, {})
        for key, data in core.take_changes().items():
            if data is None:
                store.pop(key, None)
            else:
                store[key] = data
        if self.check_persistence:
            self.check_store(address)

    def check_store(self, address: Address) -> None:
        """The store equals the core's whole state: every change was marked."""
        store = self.stores[address]
        assert store == full_state(self.devices[address]), f"{address}: a change was not marked"

    def reload(self, address: Address) -> ClientCore:
        """Replace a core by one loaded from its store; both must hold the same state."""
        store = self.stores[address]
        self.check_store(address)
        core = ClientCore.load(store.items(), rng=self.rng)
        assert full_state(core) == store
        self._replace(core)
        return core

    def _replace(self, core: ClientCore) -> None:
        self.devices[core.address] = core
        if core.device_id == self.primaries[core.user_id].device_id:
            self.primaries[core.user_id] = core

    # ------------------------------------------------------------ users and devices

    def _new_account(self) -> Account:
        assert self.one_time_prekeys is not None
        return Account.create(now=self.now, one_time_prekeys=self.one_time_prekeys, rng=self.rng)

    def add_user(self, user_id: str, devices: int = 1) -> list[ClientCore]:
        """A user with a primary device (id 1) and ``devices - 1`` linked ones."""
        cores = [self._new_primary(user_id)]
        for device_id in range(2, devices + 1):
            cores.append(self.link_device(user_id, device_id))
        return cores

    def reinstall(self, user_id: str) -> ClientCore:
        """The user starts over: a new user identity on a new device 1, the old devices gone.

        Everyone who knew the user gets an IdentityChanged event; envelopes
        in flight to the old devices are lost.
        """
        for address in self.devices_of(user_id):
            del self.devices[address], self.stores[address], self.prekeys[address]
        self.in_flight = [e for e in self.in_flight if e.recipient.user_id != user_id]
        del self.device_lists[user_id]
        return self._new_primary(user_id)

    def _new_primary(self, user_id: str) -> ClientCore:
        if self.one_time_prekeys is None:
            primary = ClientCore.create_primary(user_id, 1, now=self.now, rng=self.rng)
        else:
            identity = IdentityKeyPair.generate(self.rng)
            primary = ClientCore(
                user_id,
                1,
                self._new_account(),
                identity.public.ed25519,
                user_identity=identity,
                rng=self.rng,
            )
            first = DeviceList.initial(user_id, identity.public.ed25519, [primary.device_entry])
            primary.process_device_list(first.sign(identity).encode())
        self.primaries[user_id] = primary
        self._join(primary)
        own = primary.own_device_list
        assert own is not None
        self.publish(own)
        return primary

    def link_device(self, user_id: str, device_id: int) -> ClientCore:
        """A new device of ``user_id``, linked by its primary and announced to everyone."""
        primary = self.primaries[user_id]
        if self.one_time_prekeys is None:
            core = ClientCore.create_linked(
                user_id, device_id, primary.user_identity_public, now=self.now, rng=self.rng
            )
        else:
            core = ClientCore(
                user_id, device_id, self._new_account(), primary.user_identity_public, rng=self.rng
            )
        self._join(core)
        self.publish(primary.link_device(core.device_entry))
        return core

    def unlink_device(self, user_id: str, device_id: int) -> None:
        """The primary removes a device; the new list goes to everyone, the removed one too."""
        self.publish(self.primaries[user_id].unlink_device(device_id))

    def _join(self, core: ClientCore) -> None:
        self.devices[core.address] = core
        self.prekeys[core.address] = _PrekeyStore(core.account)
        self.events[core.address] = []
        for data in self.device_lists.values():
            self._record(core.address, core.process_device_list(data))
        self.persist(core.address)

    def publish(self, signed: SignedDeviceList | bytes) -> dict[Address, Outcome]:
        """The relay stores a device list and pushes it to every device."""
        data = signed if isinstance(signed, bytes) else signed.encode()
        user_id = SignedDeviceList.decode(data).device_list.user_id
        self.device_lists[user_id] = data
        return self.push_device_list(data, self.devices)

    def push_device_list(self, data: bytes, to: Iterable[Address]) -> dict[Address, Outcome]:
        """Hand a (possibly forged) device list to some devices."""
        outcomes = {}
        for address in list(to):
            outcome = self.devices[address].process_device_list(data)
            self._record(address, outcome)
            self.persist(address)
            outcomes[address] = outcome
        return outcomes

    def bundle(self, address: Address) -> bytes:
        """The relay hands out a bundle of ``address`` (a one-time prekey at most once)."""
        return self.prekeys[address].bundle(address).encode()

    def ensure_sessions(self, address: Address, needed: Iterable[Address]) -> None:
        core = self.devices[address]
        for target in needed:
            core.process_bundle(self.bundle(target), now=self.now)
        self.persist(address)

    def core(self, address: Address) -> ClientCore:
        return self.devices[address]

    def devices_of(self, user_id: str) -> list[Address]:
        return sorted(a for a in self.devices if a.user_id == user_id)

    # ------------------------------------------------------------ sending

    def send_direct(self, address: Address, to_user: str, body: bytes) -> list[Envelope]:
        """``address`` sends a 1:1 message (fetching bundles first); its envelopes."""
        core = self.devices[address]
        now = self.tick()
        self.ensure_sessions(address, core.devices_without_session([to_user], now=now))
        _, sends = core.send_direct(to_user, body, now=now)
        self.persist(address)
        return self._enqueue_all(address, sends)

    def send_receipt(
        self, address: Address, to_user: str, message_ids: Sequence[bytes]
    ) -> list[Envelope]:
        """``address`` confirms it received these messages of ``to_user``; its envelopes."""
        core = self.devices[address]
        now = self.tick()
        self.ensure_sessions(address, core.devices_without_session([to_user], now=now))
        sends = core.send_receipt(to_user, message_ids, now=now)
        self.persist(address)
        return self._enqueue_all(address, sends)

    def send_group(self, address: Address, group_id: bytes, body: bytes) -> list[Envelope]:
        """``address`` sends a group message (fetching bundles first); its envelopes."""
        core = self.devices[address]
        now = self.tick()
        self.ensure_sessions(address, core.group_send_needs(group_id, now=now))
        message_id, sends = core.send_group(group_id, body, now=now)
        self.persist(address)
        assert isinstance(sends[-1], GroupSend)
        state = core.group(group_id)
        text = GroupText(message_id, now, body, state.epoch, state.state_hash)
        return self._enqueue_all(address, sends, group_text=text)

    def create_group(
        self, address: Address, title: str, members: Sequence[str]
    ) -> tuple[bytes, list[Envelope]]:
        core = self.devices[address]
        now = self.tick()
        self.ensure_sessions(address, core.membership_needs(members, now=now))
        group_id, sends = core.create_group(title, members, now=now)
        self.persist(address)
        return group_id, self._enqueue_all(address, sends)

    def add_member(
        self, address: Address, group_id: bytes, user_id: str, *, settle: bool = True
    ) -> list[Envelope]:
        held = self.devices[address].device_list(user_id)
        assert held is not None
        action = AddMember(user_id, held.user_identity)
        return self.change_group(address, group_id, action, settle=settle)

    def remove_member(
        self, address: Address, group_id: bytes, user_id: str, *, settle: bool = True
    ) -> list[Envelope]:
        return self.change_group(address, group_id, RemoveMember(user_id), settle=settle)

    def change_group(
        self, address: Address, group_id: bytes, action: Action, *, settle: bool = True
    ) -> list[Envelope]:
        """``address`` changes the group (fetching bundles first); the envelopes it made.

        The change is a candidate until its author meets the relay's receipt
        (spec 12.4): with ``settle``, the author's device takes what is in
        flight to it, in order, up to that receipt, so the change took effect
        (unless another came first), and the envelopes include the welcomes
        it then sent.
        """
        core = self.devices[address]
        now = self.tick()
        users = list(core.group(group_id).user_ids)
        if isinstance(action, AddMember):
            users.append(action.user_id)
        self.ensure_sessions(address, core.membership_needs(users, now=now))
        if isinstance(action, AddMember):
            sends = core.add_member(group_id, action.user_id, now=now)
        elif isinstance(action, RemoveMember):
            sends = core.remove_member(group_id, action.user_id, now=now)
        elif isinstance(action, Leave):
            sends = core.leave_group(group_id, now=now)
        elif isinstance(action, SetAdmin):
            sends = core.set_admin(group_id, action.user_id, action.admin, now=now)
        else:
            assert isinstance(action, SetTitle)
            sends = core.set_title(group_id, action.title, now=now)
        self.persist(address)
        envelopes = self._enqueue_all(address, sends)
        if settle:
            envelopes += self.settle(address)
        return envelopes

    def retry_waiting_changes(self, address: Address) -> list[Envelope]:
        """As the client library does after each envelope: a change of ours that lost its
        epoch and waits for the lists and sessions of new members gets them and is
        proposed again."""
        core = self.devices[address]
        sent = []
        for group_id in core.waiting_changes():
            now = self.tick()
            users = core.change_needs(group_id)
            for user_id in users:
                if core.device_list(user_id) is None and user_id in self.device_lists:
                    core.process_device_list(self.device_lists[user_id])
            self.ensure_sessions(address, core.membership_needs(users, now=now))
            outcome = core.retry_change(group_id, now=now)
            self.persist(address)
            self._record(address, outcome)
            sent += self._enqueue_all(address, outcome.sends)
        return sent

    def settle(self, address: Address) -> list[Envelope]:
        """``address`` takes what is in flight to it, in order, up to its last receipt.

        Returns the envelopes it sent meanwhile (welcomes, a change proposed
        again).
        """
        sent: list[Envelope] = []
        while any(e.recipient == address and e.label == RECEIPT for e in self.in_flight):
            envelope = next(e for e in self.in_flight if e.recipient == address)
            sent += self.deliver(envelope).sent
        return sent

    def request_sync(self, address: Address) -> list[Envelope]:
        """A new device asks its user's other devices for their groups."""
        core = self.devices[address]
        now = self.tick()
        self.ensure_sessions(address, core.devices_without_session([], now=now))
        sends = core.request_sync(now=now)
        self.persist(address)
        return self._enqueue_all(address, sends)

    def _enqueue_all(
        self,
        sender: Address,
        sends: Iterable[Send],
        *,
        group_text: GroupText | None = None,
        answering_retry: bool = False,
    ) -> list[Envelope]:
        """Put the envelopes of ``sends`` in flight (see :meth:`_addressed`)."""
        out = self._addressed(sender, sends, group_text=group_text, answering_retry=answering_retry)
        self.in_flight += out
        return out

    def _addressed(
        self,
        sender: Address,
        sends: Iterable[Send],
        *,
        group_text: GroupText | None = None,
        answering_retry: bool = False,
    ) -> list[Envelope]:
        """The envelopes of ``sends``, labelled by what they carry.

        The label and known fields of a one-to-one envelope come from the
        plaintext the DirectSend keeps; those of a group message from its
        header and ``group_text`` (what the sender encrypted).
        """
        out = []
        for send in sends:
            if isinstance(send, ChangeSend):
                # One relay send: the parts and, last, our receipt, together in the order.
                out += self._addressed(sender, send.parts)
                receipt = Envelope.known(RECEIPT, group_id=send.group_id)
                out.append(
                    replace(
                        receipt,
                        ident=self._new_ident(),
                        sender=sender,
                        recipient=sender,
                        kind=ENVELOPE_RECEIPT,
                        payload=send.receipt,
                    )
                )
                continue
            if isinstance(send, DirectSend):
                known = _describe(send.content, answering_retry)
                targets = [(Address(send.recipient_user, d), p) for d, p in send.payloads]
                kind = ENVELOPE_DIRECT
            else:
                assert group_text is not None
                header = SenderKeyMessage.decode(send.payload)
                known = Envelope.known(
                    GROUP,
                    group_id=header.group_id,
                    chain=(header.chain_id, header.iteration),
                    message_id=group_text.message_id,
                    body=group_text.body,
                    sent_at=group_text.sent_at,
                )
                targets = [(r, send.payload) for r in send.recipients]
                kind = ENVELOPE_GROUP
            for recipient, payload in targets:
                out.append(
                    replace(
                        known,
                        ident=self._new_ident(),
                        sender=sender,
                        recipient=recipient,
                        kind=kind,
                        payload=payload,
                    )
                )
        return out

    def _new_ident(self) -> int:
        self._next_ident += 1
        return self._next_ident

    # ------------------------------------------------------------ the relay's powers

    def deliver(self, envelope: Envelope | int = 0) -> Delivery:
        """Deliver an envelope in flight (by index, or the envelope itself) and take it out."""
        if isinstance(envelope, int):
            envelope = self.in_flight.pop(envelope)
        else:
            self.in_flight.remove(envelope)
        return self.receive(envelope)

    def receive(self, envelope: Envelope) -> Delivery:
        """Hand ``envelope`` to its recipient whether or not it is in flight (a replay)."""
        address = envelope.recipient
        core = self.devices[address]
        outcome = core.receive(envelope.sender, envelope.kind, envelope.payload, now=self.tick())
        self.persist(address)
        self._record(address, outcome)
        answering = any(isinstance(e, RetryRequested) for e in outcome.events)
        sent = self._enqueue_all(address, outcome.sends, answering_retry=answering)
        sent += self.retry_waiting_changes(address)
        delivery = Delivery(envelope, outcome, tuple(sent))
        self.delivered.append(delivery)
        return delivery

    def deliver_all(self, limit: int = 100_000) -> list[Delivery]:
        """Deliver in order until nothing is in flight (answers included)."""
        out = []
        while self.in_flight:
            out.append(self.deliver(0))
            assert len(out) < limit, "delivery does not terminate"
        return out

    def take(self, **match: object) -> list[Envelope]:
        """Take envelopes out of flight (undelivered) whose fields equal ``match``."""
        taken = [e for e in self.in_flight if all(getattr(e, k) == v for k, v in match.items())]
        self.in_flight = [e for e in self.in_flight if e not in taken]
        return taken

    def duplicate(self, index: int) -> Envelope:
        self.in_flight.append(self.in_flight[index])
        return self.in_flight[index]

    def drop(self, index: int) -> Envelope:
        return self.in_flight.pop(index)

    def forge(self, sender: Address, recipient: Address, kind: int, payload: bytes) -> Envelope:
        """An envelope the relay makes up (not put in flight)."""
        return Envelope(self._new_ident(), sender, recipient, kind, payload, FORGED)

    def restamp(self, envelope: Envelope, sender: Address) -> Envelope:
        """The same ciphertext with another sender stamped on it."""
        return replace(envelope, sender=sender)

    def inject_content(self, sender: Address, recipient: Address, content: bytes) -> Envelope:
        """A device that misbehaves: ``content`` encrypted in its real session with ``recipient``.

        Uses only the sender's stored records (the session is advanced there
        and the sender reloaded), so the envelope is indistinguishable from
        one its ClientCore would send.
        """
        store = self.stores[sender]
        key: RecordKey = RecordKey.session(recipient)
        if key not in store:
            self.ensure_sessions(sender, [recipient])
        record = SessionRecord.from_bytes(store[key])
        payload = record.encrypt(content, now=self.tick())
        store[key] = record.to_bytes()
        self._replace(ClientCore.load(store.items(), rng=self.rng))
        return Envelope(self._new_ident(), sender, recipient, ENVELOPE_DIRECT, payload, FORGED)

    # ------------------------------------------------------------ bookkeeping

    def _record(self, address: Address, outcome: Outcome) -> None:
        self.events[address].extend(outcome.events)
