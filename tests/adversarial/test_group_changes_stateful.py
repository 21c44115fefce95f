"""Concurrent group changes on ClientCore: several admins and members, an honest or hostile relay.

A hypothesis state machine over the in-memory relay of tests/support/harness.py
(its in-flight list is the relay's order): members and admins change the
group at once (add, remove, leave, promote, demote, retitle), send group
messages, and members or removed members sign changes on old states (as a
grinding attacker would: no change id helps). The relay delivers each
device's envelopes in its order and duplicates some; a hostile relay also
delivers out of order, withholds envelopes and restamps senders.

Checked after every step, hostile relay or not:

* no device switches branches: its state only ever moves to a descendant;
* no user becomes a member but by an admin's add (the author of the change
  an update reports was an admin of the state before it);
* no user outside the group as the sender held it reads a group message:
  a removed user reads nothing its former peers send once they applied
  the removal.

With a relay that keeps its order, at the end (everything delivered, the
changes that lost their epoch proposed again): members who received the
same changes hold the same state, so every member device holds one state
and no other device holds the group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hushchat.protocol.client_core import (
    Address,
    GroupChangeFailed,
    GroupUpdated,
    MessageReceived,
)
from hushchat.protocol.content import GroupControl
from hushchat.protocol.errors import InvalidArgument
from hushchat.protocol.group import (
    Action,
    AddMember,
    AdminChanged,
    ControlMessage,
    GroupState,
    Leave,
    MemberAdded,
    MemberRemoved,
    RemoveMember,
    SetAdmin,
    SetTitle,
    StateRelation,
)
from hushchat.protocol.primitives import SeededRandom
from tests.support.harness import Network

USERS = ("alice", "bob", "carol", "dave", "erin", "frank")
FIRST_MEMBERS = ("bob", "carol", "dave")


@dataclass
class View:
    """What a device's app was told of the group: members and admins, and how far it read."""

    members: dict[str, bool] = field(default_factory=dict)  # user id -> admin
    seen_events: int = 0
    state: GroupState | None = None


class GroupChanges(RuleBasedStateMachine):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.net: Network
        self.group_id = b""
        self.hostile = False
        self.views: dict[Address, View] = {}
        # Group message bodies -> users in the group as its sender held it.
        self.audience: dict[bytes, frozenset[str]] = {}
        # Every state any device held: what an attacker can sign on.
        self.old_states: list[GroupState] = []
        self.sent = 0

    # ------------------------------------------------------------ setup

    @initialize(
        seed=st.binary(min_size=4, max_size=4),
        admins=st.sampled_from([("alice",), ("alice", "bob"), ("alice", "bob", "carol")]),
        hostile=st.booleans(),
    )
    def setup(self, seed: bytes, admins: tuple[str, ...], hostile: bool) -> None:
        self.net = Network(SeededRandom(seed), check_persistence=False)
        for user_id in USERS:
            self.net.add_user(user_id, 2 if user_id == "bob" else 1)
        for address in self.net.devices:
            self.views[address] = View()
        self.group_id, _ = self.net.create_group(Address("alice", 1), "g", list(FIRST_MEMBERS))
        self.net.deliver_all()
        for admin in admins[1:]:
            self.net.change_group(Address("alice", 1), self.group_id, SetAdmin(admin, True))
            self.net.deliver_all()
        for address in sorted(self.net.devices):
            if self.group_id in self.net.core(address).group_ids:
                self._send(address)  # sessions and sender keys everywhere
        self.net.deliver_all()
        for address in self.holders():
            # Where the app's view starts (the creator has no event for its own create).
            view = self.views[address]
            view.members = {m.user_id: m.admin for m in self.state_of(address).members}
            view.seen_events = len(self.net.events[address])
        self.check()
        self.hostile = hostile
        event(f"admins: {len(admins)}, hostile relay: {hostile}")

    # ------------------------------------------------------------ members

    def holders(self) -> list[Address]:
        return [a for a in sorted(self.net.devices) if self.group_id in self.net.core(a).group_ids]

    def state_of(self, address: Address) -> GroupState:
        return self.net.core(address).group(self.group_id)

    def _ready(self) -> list[Address]:
        """Member devices without a change of theirs in flight."""
        return [a for a in self.holders() if not self.net.core(a).has_pending_change(self.group_id)]

    @rule(data=st.data())
    def change(self, data: st.DataObject) -> None:
        """A member device changes the group on its view."""
        ready = self._ready()
        if ready:
            self._change(data.draw(st.sampled_from(ready)), data)

    @rule(data=st.data())
    def race(self, data: st.DataObject) -> None:
        """Several member devices change the group before hearing of each other's change."""
        ready = self._ready()
        if len(ready) > 1:
            for author in data.draw(st.lists(st.sampled_from(ready), min_size=2, unique=True)):
                self._change(author, data)

    def _change(self, author: Address, data: st.DataObject) -> None:
        state = self.state_of(author)
        target = data.draw(st.sampled_from(state.user_ids))
        outsiders = [u for u in USERS if state.member(u) is None]
        actions: list[Action] = [
            RemoveMember(target),
            SetAdmin(target, data.draw(st.booleans())),
            SetTitle(data.draw(st.sampled_from("abc"))),
            Leave(),
        ]
        if outsiders:
            joiner = data.draw(st.sampled_from(outsiders))
            held = self.net.core(author).device_list(joiner)
            assert held is not None
            actions += [AddMember(joiner, held.user_identity)] * 2
        action = data.draw(st.sampled_from(actions))
        try:
            self.net.change_group(author, self.group_id, action, settle=False)
        except InvalidArgument:
            return  # not allowed on the author's view
        event(f"a change: {type(action).__name__}")

    @rule(data=st.data())
    def send(self, data: st.DataObject) -> None:
        holders = self.holders()
        if holders:
            self._send(data.draw(st.sampled_from(holders)))

    def _send(self, address: Address) -> None:
        state = self.state_of(address)
        if state.member(address.user_id) is None:
            return
        self.sent += 1
        body = b"message %d" % self.sent
        self.audience[body] = frozenset(state.user_ids)
        self.net.send_group(address, self.group_id, body)

    @rule(data=st.data())
    def sign_on_an_old_state(self, data: st.DataObject) -> None:
        """A member of a state every device has left behind (no admin, removed since, or
        an admin) signs a change on it and sends it to every device: stale everywhere."""
        holders = self.holders()
        oldest = min((self.state_of(a).epoch for a in holders), default=0)
        behind = [s for s in self.old_states if s.epoch < oldest]
        if not behind:
            return
        old = data.draw(st.sampled_from(behind))
        author = Address(data.draw(st.sampled_from(old.user_ids)), 1)
        rewinds: list[Action] = [Leave(), SetTitle("rewound")]
        action = data.draw(st.sampled_from(rewinds))
        message = ControlMessage.sign(
            self.net.core(author).account.identity,
            group_id=old.group_id,
            parent_epoch=old.epoch,
            parent_hash=old.state_hash,
            author_user_id=author.user_id,
            author_device_id=author.device_id,
            action=action,
        )
        content = GroupControl(message.encode(), None).encode()
        for address in holders:
            if address.user_id != author.user_id:
                delivery = self.net.receive(self.net.inject_content(author, address, content))
                assert not any(isinstance(e, GroupUpdated) for e in delivery.events), delivery

    # ------------------------------------------------------------ the relay

    def _busy(self) -> list[Address]:
        return sorted({e.recipient for e in self.net.in_flight})

    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        """A device takes its next envelope (a hostile relay: any of them)."""
        busy = self._busy()
        if not busy:
            return
        recipient = data.draw(st.sampled_from(busy))
        mine = [e for e in self.net.in_flight if e.recipient == recipient]
        envelope = data.draw(st.sampled_from(mine)) if self.hostile else mine[0]
        self.net.deliver(envelope)

    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        if self.net.in_flight:
            self.net.duplicate(data.draw(st.integers(0, len(self.net.in_flight) - 1)))

    @rule(data=st.data())
    def withhold(self, data: st.DataObject) -> None:
        if self.hostile and self.net.in_flight:
            self.net.drop(data.draw(st.integers(0, len(self.net.in_flight) - 1)))
            event("the relay withheld an envelope")

    @rule(data=st.data())
    def restamp(self, data: st.DataObject) -> None:
        """The relay delivers an envelope as if another device had sent it."""
        if not (self.hostile and self.net.in_flight):
            return
        envelope = data.draw(st.sampled_from(self.net.in_flight))
        others = [a for a in sorted(self.net.devices) if a not in (envelope.sender,)]
        self.net.in_flight.remove(envelope)
        self.net.receive(self.net.restamp(envelope, data.draw(st.sampled_from(others))))

    # ------------------------------------------------------------ invariants

    @invariant()
    def check(self) -> None:
        for address in sorted(self.net.devices):
            self._check_device(address)

    def _check_device(self, address: Address) -> None:
        view = self.views[address]
        events = self.net.events[address]
        for update in events[view.seen_events :]:
            if isinstance(update, MessageReceived) and update.group_id == self.group_id:
                readers = self.audience[update.body]
                assert address.user_id in readers, f"{address} read a message of a group without it"
            if not isinstance(update, GroupUpdated) or update.group_id != self.group_id:
                continue
            if update.joined:
                view.members = {}
            elif any(isinstance(c, MemberAdded) for c in update.changes):
                # Nobody (back) in but by an admin's add.
                assert view.members.get(update.author.user_id), (address, update)
            for change in update.changes:
                if isinstance(change, MemberAdded):
                    view.members[change.user_id] = change.admin
                elif isinstance(change, MemberRemoved):
                    view.members.pop(change.user_id, None)
                elif isinstance(change, AdminChanged):
                    view.members[change.user_id] = change.admin
        view.seen_events = len(events)
        core = self.net.core(address)
        if self.group_id not in core.group_ids:
            view.state = None
            return
        group = core._state.groups[self.group_id]
        assert set(view.members) == set(group.current.user_ids), address
        previous, view.state = view.state, group.current
        if group.current not in self.old_states:
            self.old_states.append(group.current)
        if previous is not None and previous.member(address.user_id) is not None:
            # The same branch: the state held before is this one or an ancestor of it.
            relation = group.relation(previous.epoch, previous.state_hash)
            assert relation in (
                StateRelation.CURRENT,
                StateRelation.ANCESTOR,
                StateRelation.UNKNOWN,
            ), (address, relation)

    def teardown(self) -> None:
        if not hasattr(self, "net"):
            return
        failed = sum(
            isinstance(e, GroupChangeFailed) for events in self.net.events.values() for e in events
        )
        event(f"changes that failed: {min(failed, 3)} (or more)")
        if self.hostile:
            views = {self.state_of(a).state_hash for a in self.holders()}
            event(f"a hostile relay left {min(len(views), 3)} (or more) views")
            return
        # The relay delivers the rest in its order; changes proposed again come along.
        while self.net.in_flight:
            recipient = self.net.in_flight[0].recipient
            self.net.deliver(next(e for e in self.net.in_flight if e.recipient == recipient))
        self.check()
        holders = self.holders()
        states = {self.state_of(a) for a in holders}
        assert len(states) <= 1, "members who received the same changes diverged"
        if states:
            (final,) = states
            event(f"final epoch >= {final.epoch // 4 * 4}")
            members = {a for a in self.net.devices if a.user_id in final.user_ids}
            assert set(holders) == members


GroupChanges.TestCase.settings = settings(max_examples=15, stateful_step_count=50, deadline=None)
TestGroupChanges = GroupChanges.TestCase


@pytest.mark.fuzz
class TestGroupChangesFuzz(GroupChanges.TestCase):  # type: ignore[misc, valid-type]
    """The same machine with a long budget: pytest -m fuzz."""

    settings = settings(max_examples=500, stateful_step_count=80, deadline=None)
