"""Group membership: signed changes, welcomes, changes that arrive early, and sync.

The group layer (:mod:`hushchat.protocol.group`) verifies and applies each
change; this module carries them between devices, holds a change that
arrived before the one it builds on, and keeps what follows from a change:
when a member leaves, our sender key is retired and theirs forgotten.
A newly linked device asks our other devices for the groups they hold.

Our own change is a *candidate* (spec/12-groups.md, section 12.4): signed
and sent to every device that holds the group in one relay send, with a
receipt the relay queues for us at the change's place in its order, and
applied only when that receipt comes back while the group is still at the
change's parent. If another change came first, ours is proposed again on the
new state (or dropped, with :class:`GroupChangeFailed`, if no longer
allowed); if that needs sessions with devices that joined meanwhile, it
waits for them (:meth:`Membership.waiting_changes`). One candidate per
group at a time (:class:`ChangePending`).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..consts import CHANGE_RECEIPT_SIZE, GROUP_ID_SIZE, MAX_HELD_GROUP_CONTROLS, MAX_LEFT_GROUPS
from ..content import GroupControl, GroupSync, SyncRequest
from ..errors import (
    DecodeError,
    InvalidArgument,
    InvalidState,
    RemoteProtocolError,
    StaleChange,
    TooManyGroups,
    UnauthorizedChange,
)
from ..group import (
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
    Replaces,
    SetAdmin,
    SetTitle,
    Welcome,
    decode_states,
    describe_change,
)
from .direct import MissingSessions, Sessions
from .directory import DeviceListNeeded, Directory
from .events import (
    Address,
    Event,
    GroupChangeFailed,
    GroupReplaced,
    GroupUpdated,
    Undecryptable,
)
from .groups import GroupMessages
from .records import RecordKey
from .sends import ChangeSend, Outcome, Send
from .state import CoreState, PendingChange


class ChangePending(InvalidState):
    """Our previous change of this group awaits its receipt: change again once it took effect."""

    code = "CHANGE_PENDING"

    def __init__(self, group_id: bytes) -> None:
        self.group_id = group_id
        super().__init__(f"a change of group {group_id.hex()} is in flight")


class Membership:
    """The groups we are in, the changes held for later, and the groups we left."""

    def __init__(
        self,
        state: CoreState,
        directory: Directory,
        sessions: Sessions,
        messages: GroupMessages,
    ) -> None:
        self._state = state
        self._directory = directory
        self._sessions = sessions
        self._messages = messages

    def group(self, group_id: bytes) -> GroupState:
        group = self._state.groups.get(group_id)
        if group is None:
            raise InvalidArgument("unknown group")
        return group.current

    @property
    def group_ids(self) -> tuple[bytes, ...]:
        return tuple(self._state.groups)

    # ------------------------------------------------------------ our changes

    def create_group(
        self, title: str, members: Iterable[str], *, now: int
    ) -> tuple[bytes, list[Send]]:
        """Create a group with us as admin; the welcome goes to every member device."""
        state = self._state
        adds = []
        for user_id in sorted(set(members) - {state.user_id}):
            held = self._directory.device_list(user_id)
            if held is None:
                raise DeviceListNeeded(user_id)
            adds.append(AddMember(user_id, held.user_identity))
        if len(state.groups) >= state.max_groups:
            raise InvalidState(f"already holding {len(state.groups)} groups, the limit")
        return self._create(title, adds, None, now)

    def reinit_group(self, group_id: bytes, *, now: int) -> tuple[bytes, list[Send]]:
        """(Admin.) Continue the group in a new one, with the members we hold: the way back
        to one state after a split (spec/12-groups.md, section 12.9). We leave the old one.

        Every member who holds us as an admin of the group moves to the new one
        (GroupReplaced); we are its only admin, and promote others again.
        """
        state = self._state
        group = state.groups.get(group_id)
        if group is None:
            raise InvalidArgument("unknown group")
        current = group.current
        me = current.member(state.user_id)
        if me is None or not me.admin:
            raise InvalidArgument("only an admin reinitializes a group")
        if group_id in state.pending:
            raise ChangePending(group_id)
        # The identities the group records: a changed one stays out until added again.
        adds = [AddMember(m.user_id, m.user_identity) for m in current.members if m is not me]
        replaces = Replaces(group_id, current.epoch, current.state_hash)
        new_group_id, sends = self._create(current.title, adds, replaces, now)
        self._leave_locally(group_id)
        return new_group_id, sends

    def _create(
        self, title: str, adds: list[AddMember], replaces: Replaces | None, now: int
    ) -> tuple[bytes, list[Send]]:
        state = self._state
        group_id = state.rng.random_bytes(GROUP_ID_SIZE)
        message = ControlMessage.sign(
            state.account.identity,
            group_id=group_id,
            parent_epoch=0,
            parent_hash=bytes(32),
            author_user_id=state.user_id,
            author_device_id=state.device_id,
            action=CreateGroup(title, tuple(adds), replaces),
        )
        update = Group.from_genesis(message, state.device_lists)
        recipients = self._messages.recipients(group_id, update.group.current)
        self._sessions.check_sessions(recipients, now)
        self._set_group(group_id, update.group)
        welcome = update.group.welcome(message).encode()
        content = GroupControl(message.encode(), welcome).encode()
        return group_id, list(self._sessions.encrypt_for(recipients, content, now))

    def add_member(self, group_id: bytes, user_id: str, *, now: int) -> list[Send]:
        """(Admin.) Add a user: the change to current members, a welcome to the new one."""
        held = self._directory.device_list(user_id)
        if held is None:
            raise DeviceListNeeded(user_id)
        return self._change_group(group_id, AddMember(user_id, held.user_identity), now)

    def remove_member(self, group_id: bytes, user_id: str, *, now: int) -> list[Send]:
        """(Admin.) Remove a member; every remaining member rotates its sender key."""
        return self._change_group(group_id, RemoveMember(user_id), now)

    def leave_group(self, group_id: bytes, *, now: int) -> list[Send]:
        return self._change_group(group_id, Leave(), now)

    def set_admin(self, group_id: bytes, user_id: str, admin: bool, *, now: int) -> list[Send]:
        """(Admin.) Promote or demote a member."""
        return self._change_group(group_id, SetAdmin(user_id, admin), now)

    def set_title(self, group_id: bytes, title: str, *, now: int) -> list[Send]:
        """(Admin.) Rename the group."""
        return self._change_group(group_id, SetTitle(title), now)

    def has_pending_change(self, group_id: bytes) -> bool:
        """Whether our change of this group awaits its receipt."""
        return group_id in self._state.pending

    def _change_group(self, group_id: bytes, action: Action, now: int) -> list[Send]:
        group = self._state.groups.get(group_id)
        if group is None:
            raise InvalidArgument("unknown group")
        if group_id in self._state.pending:
            raise ChangePending(group_id)
        return [self._propose(group, action, now)]

    def _propose(self, group: Group, action: Action, now: int) -> ChangeSend:
        """Sign ``action`` on the current state and send it; it applies at its receipt.

        InvalidArgument if the action is not allowed, MissingSessions if a
        device that must receive it, or its welcome, has no session (nothing
        changed either way).
        """
        state = self._state
        group_id = group.group_id
        message = group.propose(
            action,
            author_user_id=state.user_id,
            author_device_id=state.device_id,
            device_key=state.account.identity,
        )
        # Everyone who holds the group learns of the change, the removed included;
        # an added member's devices get the welcome once the change took effect.
        told = self._messages.recipients(group_id, group.current)
        joiners = self._joiners(group, message, told)
        self._sessions.check_sessions([*told, *joiners], now)
        receipt = state.rng.random_bytes(CHANGE_RECEIPT_SIZE)
        content = GroupControl(message.encode(), None).encode()
        parts = self._sessions.encrypt_for(told, content, now)
        state.pending[group_id] = PendingChange(receipt, message)
        state.mark(RecordKey.pending_change(group_id))
        return ChangeSend(group_id, receipt, tuple(parts))

    def _joiners(self, group: Group, message: ControlMessage, told: list[Address]) -> list[Address]:
        """The devices ``message`` (applied to the current state) adds to the group."""
        if not isinstance(message.action, AddMember):
            return []
        after = group.apply(message, self._state.device_lists).group.current
        return [a for a in self._messages.recipients(group.group_id, after) if a not in told]

    def resend_change(self, send: ChangeSend, *, now: int) -> ChangeSend | None:
        """Encrypt a refused change again for its users' current devices; None if it is
        no longer ours to send (proposed again, applied or dropped meanwhile).

        For when the relay refused ``send`` because a device list changed:
        process the lists it returned and create the missing sessions first.
        MissingSessions if a session is still missing.
        """
        pending = self._state.pending.get(send.group_id)
        if pending is None or pending.receipt != send.receipt:
            return None
        parts = [self._sessions.resend_direct(part, now=now) for part in send.parts]
        return ChangeSend(send.group_id, send.receipt, tuple(p for p in parts if p.payloads))

    def abandon_change(self, send: ChangeSend) -> Outcome:
        """The relay kept refusing ``send``: our change is dropped, and the app told."""
        pending = self._state.pending.get(send.group_id)
        if pending is None or pending.receipt != send.receipt:
            return Outcome()
        self._drop_pending(send.group_id)
        return Outcome(
            events=(GroupChangeFailed(send.group_id, pending.message.action, "SEND_DROPPED"),)
        )

    def _drop_pending(self, group_id: bytes) -> None:
        del self._state.pending[group_id]
        self._state.mark(RecordKey.pending_change(group_id))

    def receive_receipt(self, sender: Address, receipt: bytes, now: int) -> Outcome:
        """The relay reached our change in its order: apply it, unless another came first."""
        state = self._state
        if sender != state.address:
            return Outcome(events=(Undecryptable(sender, "UNKNOWN_ENVELOPE_KIND"),))
        group_id = next((g for g, p in state.pending.items() if p.receipt == receipt), None)
        if group_id is None:
            return Outcome()  # a change we proposed again or dropped since, or a repeat
        pending = state.pending[group_id]
        group = state.groups.get(group_id)
        message = pending.message
        if group is None or (message.parent_epoch, message.parent_hash) != (
            group.epoch,
            group.state_hash,
        ):
            return self._settle(group_id, now)  # another change came first
        self._drop_pending(group_id)
        try:
            update = group.apply(message, state.device_lists)
        except RemoteProtocolError as exc:
            # Still allowed when signed; a device list changed since (ours, the author's).
            return Outcome(events=(GroupChangeFailed(group_id, message.action, exc.code),))
        told = self._messages.recipients(group_id, group.current)
        self._set_group(group_id, update.group)
        self._after_change(group_id, update.events)
        sends: list[Send] = []
        if isinstance(message.action, AddMember) and group_id in state.groups:
            joiners = [
                a
                for a in self._messages.recipients(group_id, update.group.current)
                if a not in told and self._sessions.usable(a, now)
            ]
            welcome = update.group.welcome(message).encode()
            content = GroupControl(message.encode(), welcome).encode()
            sends += self._sessions.encrypt_for(joiners, content, now)
        done = GroupUpdated(group_id, state.address, update.events)
        return Outcome(events=(done, *self._apply_held(group_id)), sends=tuple(sends))

    def _settle(self, group_id: bytes, now: int) -> Outcome:
        """After another change applied: our candidate lost its epoch. Propose it again
        on the new state, or drop it (and say so) if that is no longer possible."""
        state = self._state
        pending = state.pending.get(group_id)
        group = state.groups.get(group_id)
        if pending is None:
            return Outcome()
        if group is not None and (pending.message.parent_epoch, pending.message.parent_hash) == (
            group.epoch,
            group.state_hash,
        ):
            return Outcome()
        self._drop_pending(group_id)
        action = pending.message.action
        if group is None:
            return Outcome(events=(GroupChangeFailed(group_id, action, "NOT_A_MEMBER"),))
        try:
            return Outcome(sends=(self._propose(group, action, now),))
        except InvalidArgument:
            return Outcome(events=(GroupChangeFailed(group_id, action, StaleChange.code),))
        except (MissingSessions, DeviceListNeeded):
            # Members joined meanwhile: it waits for their lists and sessions (waiting_changes).
            state.pending[group_id] = PendingChange(None, pending.message)
            state.mark(RecordKey.pending_change(group_id))
            return Outcome()

    def waiting_changes(self) -> tuple[bytes, ...]:
        """Groups whose change of ours waits for sessions before it is proposed again."""
        return tuple(g for g, p in self._state.pending.items() if p.receipt is None)

    def change_needs(self, group_id: bytes) -> tuple[str, ...]:
        """The users whose device lists and sessions our waiting change of this group needs:
        its members and, for an add, the added user."""
        pending = self._state.pending.get(group_id)
        group = self._state.groups.get(group_id)
        if pending is None or pending.receipt is not None or group is None:
            return ()
        action = pending.message.action
        added = (action.user_id,) if isinstance(action, AddMember) else ()
        return (*group.current.user_ids, *added)

    def retry_change(self, group_id: bytes, *, now: int) -> Outcome:
        """Propose our waiting change again, now that the lists and sessions it needs exist.

        MissingSessions or DeviceListNeeded (it keeps waiting) if one is still
        missing; a GroupChangeFailed event if the action is no longer allowed.
        """
        pending = self._state.pending.get(group_id)
        group = self._state.groups.get(group_id)
        if pending is None or pending.receipt is not None or group is None:
            raise InvalidArgument("no change of ours waits in this group")
        action = pending.message.action
        try:
            send = self._propose(group, action, now)
        except InvalidArgument:
            self._drop_pending(group_id)
            return Outcome(events=(GroupChangeFailed(group_id, action, StaleChange.code),))
        return Outcome(sends=(send,))

    def _set_group(self, group_id: bytes, group: Group) -> None:
        self._state.groups[group_id] = group
        self._messages.forget_recipients()
        self._state.mark(RecordKey.group(group_id))

    def _after_change(self, group_id: bytes, changes: tuple[GroupEvent, ...]) -> None:
        state = self._state
        removed = {c.user_id for c in changes if isinstance(c, MemberRemoved)}
        if not removed:
            return
        # Whoever left had our sender key: the next message starts a new one.
        self._messages.retire_outbound(group_id)
        if state.user_id in removed:
            self._leave_locally(group_id)
        else:
            self._messages.drop_sender_keys(group_id, removed)

    def _leave_locally(self, group_id: bytes) -> None:
        """Forget a group we are out of (removed, left, or moved to its reinit)."""
        state = self._state
        state.groups.pop(group_id, None)
        state.mark(RecordKey.group(group_id))
        state.left = [*(g for g in state.left if g != group_id), group_id][-MAX_LEFT_GROUPS:]
        state.mark(RecordKey.LEFT_GROUPS)
        self._messages.retire_outbound(group_id)
        self._messages.drop_sender_keys(group_id, None)

    # ------------------------------------------------------------ changes received

    def receive_control(self, sender: Address, content: GroupControl, now: int) -> Outcome:
        """A change (with a welcome if it adds us) from its author's device."""
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
        events = [first, *self._replaced_by(message), *self._apply_held(message.group_id)]
        settled = self._settle(message.group_id, now)
        # Our state moved: claims that were ahead of it may be judged now.
        judged = self._messages.judge_claims(message.group_id)
        return Outcome(events=(*events, *settled.events, *judged), sends=settled.sends)

    def _continued(self, message: ControlMessage) -> bytes | None:
        """The held group a reinit continues, if its author is an admin of that group as
        we hold it (else the reinit is just a new group)."""
        state = self._state
        action = message.action
        if not isinstance(action, CreateGroup) or action.replaces is None:
            return None
        old_id = action.replaces.group_id
        old = state.groups.get(old_id)
        author = None if old is None else old.current.member(message.author_user_id)
        listed = state.device_lists.get(message.author_user_id)
        if (
            author is None
            or not author.admin
            or listed is None
            or listed.device_list.user_identity != author.user_identity
        ):
            return None
        return old_id

    def _replaced_by(self, message: ControlMessage) -> list[Event]:
        """We joined a reinit: leave the group it continues (see :meth:`_continued`)."""
        state = self._state
        old_id = self._continued(message)
        if old_id is None:
            return []
        events: list[Event] = []
        pending = state.pending.get(old_id)
        if pending is not None:
            self._drop_pending(old_id)
            events.append(GroupChangeFailed(old_id, pending.message.action, "GROUP_REPLACED"))
        self._leave_locally(old_id)
        sender = Address(message.author_user_id, message.author_device_id)
        return [GroupReplaced(old_id, message.group_id, sender), *events]

    def _apply_control(
        self, sender: Address, message: ControlMessage, content: GroupControl
    ) -> GroupUpdated:
        """Apply (or join from) a control message; raises, changing nothing, if refused."""
        state = self._state
        group = state.groups.get(message.group_id)
        if group is None:
            if content.snapshot is None:
                raise StaleChange("a change for a group we do not hold")
            welcome = Welcome.decode(content.snapshot)
            if welcome.message.encode() != content.control:
                # The welcome must be for the change its sender authored, and for this group.
                raise UnauthorizedChange("the welcome is for another change")
            if len(state.groups) >= state.max_groups and self._continued(message) is None:
                # Nothing is evicted: a stranger's welcomes cannot push out a group we hold.
                raise TooManyGroups(f"already holding {len(state.groups)} groups")
            update = Group.join(
                welcome,
                state.device_lists,
                user_id=state.user_id,
                user_identity=state.user_identity_public,
            )
            joined = True
            if message.group_id in state.left:
                state.left.remove(message.group_id)  # added again
                state.mark(RecordKey.LEFT_GROUPS)
        else:
            update = group.apply(message, state.device_lists)
            joined = False
        self._set_group(message.group_id, update.group)
        self._after_change(message.group_id, update.events)
        return GroupUpdated(message.group_id, sender, update.events, joined)

    def _builds_ahead(self, message: ControlMessage) -> bool:
        """Whether a refused change may apply later: its group or parent epoch is not here yet."""
        group = self._state.groups.get(message.group_id)
        return group is None or message.parent_epoch > group.current.epoch

    def _hold_control(self, sender: Address, content: GroupControl) -> None:
        """Hold a change until what it builds on arrives. Beyond MAX_HELD_GROUP_CONTROLS
        the oldest goes, but first the oldest of those a current member of a group we
        hold did not send for that group (spec 12.4): anyone with a session can send
        changes for groups we do not hold, and must not push a member's out."""
        held = self._state.held
        if (sender, content) in held:
            return
        held.append((sender, content))
        while len(held) > MAX_HELD_GROUP_CONTROLS:
            victim = next((entry for entry in held if not self._from_a_member(entry)), held[0])
            held.remove(victim)
        self._state.mark(RecordKey.HELD_CONTROLS)

    def _from_a_member(self, entry: tuple[Address, GroupControl]) -> bool:
        """Whether a held change was sent, for a group we hold, by one of its current members."""
        sender, content = entry
        group = self._state.groups.get(ControlMessage.decode(content.control).group_id)
        return group is not None and group.current.member(sender.user_id) is not None

    def _apply_held(self, group_id: bytes) -> list[Event]:
        """Apply held changes of this group that now fit, until none does; drop refused ones."""
        held = self._state.held
        events: list[Event] = []
        progress = True
        while progress:
            progress = False
            for entry in list(held):
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
                held.remove(entry)
                self._state.mark(RecordKey.HELD_CONTROLS)
        return events

    # ------------------------------------------------------------ linked devices: sync

    def request_sync(self, *, now: int) -> list[Send]:
        """(A newly linked device.) Ask our user's other devices for the groups they hold."""
        request = SyncRequest().encode()
        return list(self._sessions.encrypt_for(self._directory.own_other_devices(), request, now))

    def answer_sync(self, sender: Address, now: int) -> Outcome:
        """Another of our devices asked: each group's recent states and our sender key."""
        sends: list[Send] = []
        for group_id, group in self._state.groups.items():
            states = tuple(state.encode() for state in group.states)
            sends.extend(self._sessions.encrypt_for([sender], GroupSync(states).encode(), now))
            sends.extend(self._messages.share_key(group_id, sender, now))
        return Outcome(sends=tuple(sends))

    def receive_sync(self, sender: Address, content: GroupSync) -> Outcome:
        """A group another of our devices holds, unless we hold it, left it or are not in it."""
        state = self._state
        try:
            group = Group(tuple(decode_states(content.states, "GroupSync")))
        except InvalidArgument:
            raise DecodeError("GroupSync: the states do not form a chain") from None
        if (
            group.group_id in state.groups
            or group.group_id in state.left
            or group.current.member(state.user_id) is None
        ):
            return Outcome()  # what we hold is ours; a group without us is not ours to hold
        self._set_group(group.group_id, group)
        changes = describe_change(None, group.current)
        joined = GroupUpdated(group.group_id, sender, changes, joined=True)
        # Changes made after we were linked may have come first: they apply now.
        return Outcome(events=(joined, *self._apply_held(group.group_id)))
