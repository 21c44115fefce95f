"""Groups on ClientCore under random interleavings: a relay that reorders, drops and duplicates.

One group of 3 to 10 members (one admin), users with 1 to 3 devices, a few
users outside it; hypothesis sends group and one-to-one messages, delivers
any envelope in flight next, duplicates and drops envelopes, adds and
removes members, links devices and reloads devices from their stored
records. Control messages are never dropped (control loss has its own tests
in test_client_core.py); everything else may be.

The model predicts exactly what every delivery must do, from the
recipient's own public state (its groups, their members) and the sender keys
it was actually given (every SKDM or retry answer it received, newest first,
at most MAX_SENDER_KEY_STATES per sender, forgotten when that sender or the
recipient leaves the group). Checked at every delivery and after every step:

* a one-to-one envelope always decrypts, once: a text reaches the app once,
  a copy of our own message shows as MessageSentByOtherDevice, a duplicate
  does nothing at all; a sender key is kept exactly when the receiver holds
  the group and its sender is a member (else UNKNOWN_GROUP or NOT_A_MEMBER);
* a group message decrypts exactly when the model says so, with the body
  and id the sender sent, and never twice; when it cannot, the reason and
  whether a retry was requested are the ones expected;
* a sender's group message goes to every device of the members it knows,
  its sender key only to some of them, and after a member leaves its next
  message uses a new chain, distributed to every remaining device;
* once no control message (nor the admin's receipt) is in flight, every
  device of every member holds the admin's state (epoch and state hash) and
  no other device holds the group; the admin's own change takes effect, with
  a GroupUpdated from itself, when it meets its receipt (spec 12.4);
* every core's store (its take_changes records) equals its whole state, and
  a core loaded from the store carries on exactly as the original;
* at the end, after everything is delivered, two rounds of messages from
  every member device: the second round reaches every member device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from hushchat.protocol.client_core import (
    ENVELOPE_GROUP,
    Address,
    ClientCore,
    GroupStateMismatch,
    GroupUpdated,
    MessageSentByOtherDevice,
    RetryRequested,
    Undecryptable,
)
from hushchat.protocol.consts import MAX_GROUP_HISTORY, MAX_SENDER_KEY_STATES
from hushchat.protocol.group import MemberRemoved
from hushchat.protocol.primitives import SeededRandom
from tests.support.harness import (
    CONTROL,
    COPY,
    GROUP,
    GROUP_SYNC,
    RECEIPT,
    RETRY,
    SENDER_KEY_LABELS,
    SKDM,
    SYNC,
    TEXT,
    Delivery,
    Envelope,
    Network,
)

MAX_DEVICES = 3
# Never dropped: membership changes, the receipt that makes the admin apply its
# own, and what a new device syncs its groups with.
MUST_ARRIVE = frozenset({CONTROL, RECEIPT, SYNC, GROUP_SYNC})


@dataclass
class KnownChain:
    """A sender chain as the model says a receiver holds it."""

    chain_id: int
    start: int
    used: set[int] = field(default_factory=set)


class GroupMachine(RuleBasedStateMachine):
    """See the module docstring."""

    min_members = 3
    max_members = 10

    def __init__(self) -> None:
        super().__init__()
        self.net: Network
        self.group_id = b""
        self.admin = Address("", 0)
        self.users: list[str] = []
        # receiver -> (group, sender) -> chains, newest first.
        self.chains: dict[Address, dict[Address, list[KnownChain]]] = {}
        # Messages each device's app has seen, by message id.
        self.seen: dict[Address, set[bytes]] = {}
        # Envelope idents each device has been handed.
        self.handed: dict[Address, set[int]] = {}
        # Chains each device has sent on, and who must start a new one.
        self.used_chains: dict[Address, set[int]] = {}
        self.must_rotate: set[Address] = set()
        # Devices with a current sender key (sent since they last saw a member leave).
        self.has_key: set[Address] = set()
        # Devices that saw their user leave the group (and not join again since).
        self.left: set[Address] = set()
        self.sent_count = 0
        self.steps = 0

    # ------------------------------------------------------------ setup

    @initialize(
        seed=st.binary(min_size=4, max_size=4),
        members=st.integers(min_value=3, max_value=10),
        outsiders=st.integers(min_value=1, max_value=2),
        devices=st.lists(st.integers(min_value=1, max_value=MAX_DEVICES), min_size=12, max_size=12),
    )
    def setup(self, seed: bytes, members: int, outsiders: int, devices: list[int]) -> None:
        members = max(self.min_members, min(members, self.max_members))
        self.net = Network(SeededRandom(seed), check_persistence=False)
        self.users = [f"user{i}" for i in range(members + outsiders)]
        for user_id, count in zip(self.users, devices, strict=False):
            self.net.add_user(user_id, count)
        for address in self.net.devices:
            self._track(address)
        self.admin = Address(self.users[0], 1)
        self.group_id, _ = self.net.create_group(self.admin, "group", self.users[1:members])
        self._settle()
        event(f"members: {members}, devices: {len(self.net.devices)}")

    def _track(self, address: Address) -> None:
        self.chains[address] = {}
        self.seen[address] = set()
        self.handed[address] = set()
        self.used_chains[address] = set()

    # ------------------------------------------------------------ views

    def core(self, address: Address) -> ClientCore:
        return self.net.core(address)

    def members(self) -> tuple[str, ...]:
        """The group's members: the admin makes every change, so its view is the truth."""
        return self.core(self.admin).group(self.group_id).user_ids

    def holders(self) -> list[Address]:
        """Devices that hold the group and are in it by their own view (they can send)."""
        return [
            a
            for a, c in sorted(self.net.devices.items())
            if self.group_id in c.group_ids and a.user_id in c.group(self.group_id).user_ids
        ]

    def _pick(self, items: list[Address], index: int) -> Address:
        return items[index % len(items)]

    # ------------------------------------------------------------ sending

    @precondition(lambda self: self.holders())
    @rule(index=st.integers(min_value=0, max_value=1000))
    def send_group(self, index: int) -> None:
        sender = self._pick(self.holders(), index)
        self._send_group(sender)

    def _send_group(self, sender: Address) -> list[Envelope]:
        core = self.core(sender)
        state = core.group(self.group_id)
        self.sent_count += 1
        envelopes = self.net.send_group(sender, self.group_id, b"group %d" % self.sent_count)
        expected = {a for u in state.user_ids for a in core.devices_of(u)} - {sender}
        group_to = [e.recipient for e in envelopes if e.label == GROUP]
        key_to = {e.recipient for e in envelopes if e.label != GROUP}
        assert sorted(group_to) == sorted(expected), "the group message misses or adds devices"
        assert key_to <= expected, "a sender key went to a device outside the group"
        assert envelopes[0].chain is not None
        chain_id, iteration = envelopes[0].chain
        if sender in self.must_rotate:
            # A member left since our last message: a new chain, for everyone left.
            assert chain_id not in self.used_chains[sender], "no rotation after a removal"
            assert iteration == 0
            self.must_rotate.discard(sender)
        if iteration == 0:
            assert key_to == expected, "a new sender key must reach every member device"
        self.used_chains[sender].add(chain_id)
        self.has_key.add(sender)
        return envelopes

    @rule(index=st.integers(min_value=0, max_value=1000), to=st.integers(0, 100))
    def send_direct(self, index: int, to: int) -> None:
        sender = self._pick(sorted(self.net.devices), index)
        others = [u for u in self.users if u != sender.user_id]
        to_user = others[to % len(others)]
        self.sent_count += 1
        envelopes = self.net.send_direct(sender, to_user, b"direct %d" % self.sent_count)
        texts = sorted(e.recipient for e in envelopes if e.label == TEXT)
        copies = sorted(e.recipient for e in envelopes if e.label == COPY)
        assert texts == self.net.devices_of(to_user)
        assert copies == [a for a in self.net.devices_of(sender.user_id) if a != sender]

    # ------------------------------------------------------------ membership

    def _outsiders(self) -> list[str]:
        return [u for u in self.users if u not in self.members()]

    @precondition(lambda self: len(self.members()) < self.max_members and self._outsiders())
    @rule(index=st.integers(min_value=0, max_value=1000))
    def add_member(self, index: int) -> None:
        outsiders = self._outsiders()
        self.net.add_member(
            self.admin, self.group_id, outsiders[index % len(outsiders)], settle=False
        )
        self._settle_admin()

    @precondition(lambda self: len(self.members()) > 2)
    @rule(index=st.integers(min_value=0, max_value=1000))
    def remove_member(self, index: int) -> None:
        others = [u for u in self.members() if u != self.admin.user_id]
        removed = others[index % len(others)]
        self.net.remove_member(self.admin, self.group_id, removed, settle=False)
        self._settle_admin()

    def _settle_admin(self) -> None:
        """The admin takes what is in flight to it, in order, up to its receipt: its change
        applies (it is the only author, so no other came first)."""
        while any(e.recipient == self.admin and e.label == RECEIPT for e in self.net.in_flight):
            index = next(i for i, e in enumerate(self.net.in_flight) if e.recipient == self.admin)
            delivery = self._deliver(index)
            if delivery.envelope.label == RECEIPT:
                [done] = delivery.events
                assert isinstance(done, GroupUpdated) and done.author == self.admin, done

    def _can_link(self, user_id: str) -> bool:
        # A new device gets the groups its user's other devices hold when they
        # answer its sync request, and every change made after it was linked.
        # A change made before, still on its way to them, would never reach it
        # (a limit of the sync), so users link only when none is in flight.
        return len(self.net.devices_of(user_id)) < MAX_DEVICES and not any(
            e.label in MUST_ARRIVE and e.recipient.user_id == user_id for e in self.net.in_flight
        )

    @precondition(lambda self: any(self._can_link(u) for u in self.users))
    @rule(index=st.integers(min_value=0, max_value=1000))
    def link_device(self, index: int) -> None:
        users = [u for u in self.users if self._can_link(u)]
        user_id = users[index % len(users)]
        core = self.net.link_device(user_id, len(self.net.devices_of(user_id)) + 1)
        self._track(core.address)
        self.net.request_sync(core.address)

    # ------------------------------------------------------------ the relay

    @precondition(lambda self: self.net.in_flight)
    @rule(index=st.integers(min_value=0, max_value=1000))
    def deliver(self, index: int) -> None:
        self._deliver(index % len(self.net.in_flight))

    @precondition(lambda self: self.net.in_flight)
    @rule(index=st.integers(min_value=0, max_value=1000))
    def duplicate(self, index: int) -> None:
        self.net.duplicate(index % len(self.net.in_flight))

    @precondition(lambda self: any(e.label not in MUST_ARRIVE for e in self.net.in_flight))
    @rule(index=st.integers(min_value=0, max_value=1000))
    def drop(self, index: int) -> None:
        droppable = [i for i, e in enumerate(self.net.in_flight) if e.label not in MUST_ARRIVE]
        self.net.drop(droppable[index % len(droppable)])

    @rule(index=st.integers(min_value=0, max_value=1000))
    def reload(self, index: int) -> None:
        self.net.reload(self._pick(sorted(self.net.devices), index))

    # ------------------------------------------------------------ the model

    def _deliver(self, index: int) -> Delivery:
        envelope = self.net.in_flight[index]
        receiver, sender = envelope.recipient, envelope.sender
        core = self.core(receiver)
        duplicate = envelope.ident in self.handed[receiver]
        self.handed[receiver].add(envelope.ident)
        held_group = self.group_id in core.group_ids
        epoch = core.group(self.group_id).epoch if held_group else None
        has_key = receiver in self.has_key
        has_left = receiver in self.left
        if envelope.kind == ENVELOPE_GROUP:
            expected = self._expect_group(envelope)
            had_session = sender not in core.devices_without_session(
                [sender.user_id], now=self.net.now
            )
        delivery = self.net.deliver(index)
        events = delivery.events
        if envelope.kind == ENVELOPE_GROUP:
            self._check_group(envelope, expected, had_session, delivery)
        elif duplicate:
            assert events == () and delivery.sent == (), f"a duplicate did something: {events}"
        else:
            self._check_direct(envelope, delivery, epoch, has_key, has_left)
        for update in events:
            if isinstance(update, GroupUpdated):
                self._apply_update(receiver, update)
        return delivery

    def _check_direct(
        self,
        envelope: Envelope,
        delivery: Delivery,
        epoch: int | None,
        has_key: bool,
        has_left: bool,
    ) -> None:
        """The receiver's state before: its group's epoch (if held), a sender key, had left."""
        receiver, events = envelope.recipient, delivery.events
        held_group = epoch is not None
        if envelope.label == CONTROL and events and isinstance(events[0], Undecryptable):
            # Only a change older than every state the receiver holds: it joined
            # (again) after it, from a welcome, and it was delayed that long.
            assert epoch is not None and envelope.parent_epoch is not None
            assert envelope.parent_epoch < epoch - MAX_GROUP_HISTORY, events
            assert events == (Undecryptable(envelope.sender, "STALE_CHANGE"),)
            event("an old change after a rejoin")
            return
        if envelope.label in SENDER_KEY_LABELS:
            # Kept only for a group held, from a member's device (spec 4.8).
            assert envelope.group_id is not None and envelope.chain is not None
            sender = envelope.sender
            if not held_group:
                refused: str | None = "UNKNOWN_GROUP"
            elif sender.user_id not in self.core(receiver).group(self.group_id).user_ids:
                refused = "NOT_A_MEMBER"
            else:
                refused = None
            if refused is None:
                assert events == ()
                self._learn(receiver, sender, *envelope.chain)
            else:
                assert events == (Undecryptable(sender, refused, envelope.group_id),), events
                event(f"sender key refused: {refused}")
            return
        assert not any(isinstance(e, Undecryptable) for e in events), events
        if envelope.label == TEXT:
            assert envelope.message_id not in self.seen[receiver]
            assert events == (envelope.received(),), events
            assert isinstance(envelope.message_id, bytes)
            self.seen[receiver].add(envelope.message_id)
        elif envelope.label == COPY:
            [copy] = events
            assert isinstance(copy, MessageSentByOtherDevice)
            assert (copy.device, copy.to_user, copy.message_id, copy.body) == (
                envelope.sender,
                envelope.to_user,
                envelope.message_id,
                envelope.body,
            )
        elif envelope.label == RETRY:
            # Answered with our current sender key, to members only.
            core = self.core(receiver)
            answer = (
                has_key
                and held_group
                and envelope.sender.user_id in core.group(self.group_id).user_ids
            )
            expected = (RetryRequested(envelope.sender, self.group_id),) if answer else ()
            assert events == expected, events
            assert len(delivery.sent) == len(expected)
        elif envelope.label == SYNC:
            # Our own new device: the group we hold, and our sender key if we have one.
            assert events == ()
            labels = [GROUP_SYNC, SKDM][: held_group + has_key] if held_group else []
            assert [e.label for e in delivery.sent] == labels
        elif envelope.label == GROUP_SYNC:
            # A group we hold or left is not taken from a sync.
            if held_group or has_left:
                assert events == ()
            else:
                assert isinstance(events[0], GroupUpdated) and events[0].joined, events
                assert all(isinstance(e, GroupUpdated) for e in events[1:]), events
        elif envelope.label == RECEIPT:
            # Ours: the admin's change applies (a repeat does nothing).
            assert all(isinstance(e, GroupUpdated) for e in events), events
        else:
            assert envelope.label == CONTROL
            updates = [e for e in events if isinstance(e, GroupUpdated)]
            assert events[: len(updates)] == tuple(updates), events
            self._check_mismatches(receiver, events[len(updates) :])

    def _check_mismatches(self, receiver: Address, events: tuple[object, ...]) -> None:
        """State mismatches: a sender's state other than the one the receiver now holds.

        This relay reorders envelopes (it is no honest relay), so a sender may
        be ahead of a receiver whose change it delayed, or, with a member's
        leave racing an admin's change, on another branch.
        """
        for mismatch in events:
            assert isinstance(mismatch, GroupStateMismatch), events
            ours = self.core(receiver).group(self.group_id)
            assert (mismatch.our_epoch, mismatch.our_state_hash) == (ours.epoch, ours.state_hash)
            theirs = (mismatch.their_epoch, mismatch.their_state_hash)
            assert theirs != (ours.epoch, ours.state_hash)
            assert mismatch.relation in ("ahead", "forked", "unknown")
            assert (mismatch.relation == "ahead") == (mismatch.their_epoch > ours.epoch)
            event(f"a state mismatch reported: {mismatch.relation}")

    def _learn(self, receiver: Address, sender: Address, chain_id: int, iteration: int) -> None:
        chains = self.chains[receiver].setdefault(sender, [])
        if any(c.chain_id == chain_id for c in chains):
            return  # the same chain again: the receiver keeps what it has
        chains.insert(0, KnownChain(chain_id, iteration))
        del chains[MAX_SENDER_KEY_STATES:]

    def _apply_update(self, receiver: Address, update: GroupUpdated) -> None:
        if update.joined:
            self.left.discard(receiver)
        for change in update.changes:
            if not isinstance(change, MemberRemoved):
                continue
            chains = self.chains[receiver]
            for sender in list(chains):
                if change.user_id in (receiver.user_id, sender.user_id):
                    del chains[sender]
            self.has_key.discard(receiver)
            if change.user_id != receiver.user_id:
                self.must_rotate.add(receiver)
            else:
                self.left.add(receiver)

    def _expect_group(self, envelope: Envelope) -> tuple[str, KnownChain | None]:
        """What delivering a group envelope must do: 'decrypt', 'silent' or a reason code."""
        core = self.core(envelope.recipient)
        if self.group_id not in core.group_ids:
            return "UNKNOWN_GROUP", None
        if envelope.sender.user_id not in core.group(self.group_id).user_ids:
            return "NOT_A_MEMBER", None
        assert envelope.chain is not None
        chain_id, iteration = envelope.chain
        for chain in self.chains[envelope.recipient].get(envelope.sender, []):
            if chain.chain_id == chain_id:
                if iteration < chain.start or iteration in chain.used:
                    return "silent", chain
                return "decrypt", chain
        return "NO_SENDER_KEY", None

    def _check_group(
        self,
        envelope: Envelope,
        expected: tuple[str, KnownChain | None],
        had_session: bool,
        delivery: Delivery,
    ) -> None:
        receiver, events = envelope.recipient, delivery.events
        what, chain = expected
        event(f"group delivery: {what}")
        if what == "decrypt":
            assert chain is not None and envelope.chain is not None
            assert envelope.message_id not in self.seen[receiver], "decrypted twice"
            assert events[:1] == (envelope.received(),), events
            self._check_mismatches(receiver, events[1:])
            chain.used.add(envelope.chain[1])
            assert isinstance(envelope.message_id, bytes)
            self.seen[receiver].add(envelope.message_id)
        elif what == "silent":
            assert events == () and delivery.sent == (), events
        else:
            retry = what == "NO_SENDER_KEY" and had_session
            assert events == (
                Undecryptable(envelope.sender, what, self.group_id, retry_requested=retry),
            ), (what, events)
            assert len(delivery.sent) == (1 if retry else 0)

    # ------------------------------------------------------------ invariants

    @invariant()
    def membership_converges(self) -> None:
        if any(e.label in MUST_ARRIVE for e in self.net.in_flight):
            return
        admin_state = self.core(self.admin).group(self.group_id)
        for address, core in self.net.devices.items():
            if address.user_id in admin_state.user_ids:
                assert self.group_id in core.group_ids, f"{address} lost the group"
                state = core.group(self.group_id)
                assert (state.epoch, state.state_hash) == (
                    admin_state.epoch,
                    admin_state.state_hash,
                ), f"{address} diverged"
            else:
                assert self.group_id not in core.group_ids, f"{address} holds the group"

    def _settle(self) -> None:
        while self.net.in_flight:
            self._deliver(0)

    @invariant()
    def stores_match(self) -> None:
        # One device per step, in turn (every one at the end): its store is its whole state.
        self.steps += 1
        devices = sorted(self.net.devices)
        self.net.check_store(devices[self.steps % len(devices)])

    def teardown(self) -> None:
        if not hasattr(self, "net"):
            return
        self._settle()
        self.membership_converges()
        # Everyone carries on from its stored records.
        for address in self.net.devices:
            self.net.reload(address)
        # Two rounds, one message per member user. A device that cannot read
        # the first one asks for a retry if it has a session with the sender;
        # then it reads the second.
        senders = {a.user_id: a for a in self.holders()}
        first = len(self.net.delivered)
        for address in senders.values():
            self._send_group(address)
        self._settle()
        unrecoverable = {
            (d.envelope.recipient, d.envelope.sender)
            for d in self.net.delivered[first:]
            if d.envelope.label == GROUP
            and d.events
            and isinstance(d.events[0], Undecryptable)
            and not d.events[0].retry_requested
        }
        second = len(self.net.delivered)
        for address in senders.values():
            self._send_group(address)
        self._settle()
        for delivery in self.net.delivered[second:]:
            envelope = delivery.envelope
            if envelope.label == GROUP:
                if (envelope.recipient, envelope.sender) in unrecoverable:
                    event("liveness: no session for a retry")
                    continue
                assert delivery.events == (envelope.received(),), delivery


GroupMachine.TestCase.settings = settings(max_examples=4, stateful_step_count=40, deadline=None)


class SmallGroupMachine(GroupMachine):
    """More examples on groups of 3 or 4."""

    max_members = 4


SmallGroupMachine.TestCase.settings = settings(
    max_examples=12, stateful_step_count=40, deadline=None
)
TestGroupMachine = GroupMachine.TestCase
TestSmallGroupMachine = SmallGroupMachine.TestCase


@pytest.mark.fuzz
class TestGroupMachineFuzz(GroupMachine.TestCase):  # type: ignore[misc, valid-type]
    """The same machine with a long budget: pytest -m fuzz."""

    settings = settings(max_examples=500, stateful_step_count=150, deadline=None)
