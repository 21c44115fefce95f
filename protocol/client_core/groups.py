"""Group messages: our sender key per group, and every member device's.

A group message is encrypted once with our sender key and addressed to every
listed device of every current member (spec/12-groups.md); a device that
lacks our current key gets it first, one-to-one. A message that cannot be
decrypted for want of the sender's key makes us ask its sender, who answers
with its current key.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ..content import GroupText, RetryRequest, SenderKey
from ..errors import InvalidArgument, NotAMember, RemoteProtocolError, UnknownGroup
from ..group import ControlMessage, GroupState, StateRelation
from ..group_cipher import OutboundSenderKey
from ..sender_keys import SenderKeyDistributionMessage, SenderKeyMessage
from ..split_detection import PeerClaims, StateClaim
from .direct import Sessions
from .directory import Directory
from .events import (
    Address,
    Event,
    GroupStateMismatch,
    MessageReceived,
    RetryRequested,
    Undecryptable,
)
from .records import RecordKey
from .sends import DirectSend, GroupSend, Outcome, Send
from .state import CoreState, Outbound


class _MemberDevices:
    """The listed devices of a group state's members (spec 12.7), tested one at a time.

    What a sender-key distribution's sender must be (spec 4.8); a container
    rather than a set, so that a distribution in a large group costs a lookup.
    """

    __slots__ = ("_directory", "_messages", "_state")

    def __init__(self, directory: Directory, messages: GroupMessages, state: GroupState) -> None:
        self._directory = directory
        self._messages = messages
        self._state = state

    def __contains__(self, address: object) -> bool:
        return (
            isinstance(address, Address)
            and self._directory.knows_device(address)
            and self._messages.listed_as_member(self._state, address.user_id)
        )


class GroupMessages:
    """Our sender keys (rotated by age, count and membership) and those we received."""

    def __init__(
        self,
        state: CoreState,
        directory: Directory,
        sessions: Sessions,
        *,
        max_age: int,
        max_messages: int,
    ) -> None:
        self._state = state
        self._directory = directory
        self._sessions = sessions
        self.max_age = max_age
        self.max_messages = max_messages

    # ------------------------------------------------------------ recipients

    def is_member(self, group_id: bytes, user_id: str) -> bool:
        group = self._state.groups.get(group_id)
        return group is not None and self.listed_as_member(group.current, user_id)

    def listed_as_member(self, state: GroupState, user_id: str) -> bool:
        """Whether ``user_id`` is a member and the device list we hold is signed by its identity.

        A user whose identity changed (and was confirmed for one-to-one use)
        is not the member the group recorded: an admin must add it again.
        """
        member = state.member(user_id)
        held = self._directory.device_list(user_id)
        return (
            member is not None and held is not None and held.user_identity == member.user_identity
        )

    def recipients(self, group_id: bytes, state: GroupState | None = None) -> list[Address]:
        """Every listed device of every member (``state``: default the current one), but ours."""
        state = state or self._state.groups[group_id].current
        own = self._state.address
        recipients: list[Address] = []
        for user_id in state.user_ids:
            devices = self._directory.devices_of(user_id)
            if not self.listed_as_member(state, user_id):
                continue
            if user_id == own.user_id:
                # Only our own user's devices include ours: others skip the comparisons.
                devices = tuple(a for a in devices if a.device_id != own.device_id)
            recipients.extend(devices)
        return recipients

    def _current_recipients(
        self, group_id: bytes, outbound: Outbound | None
    ) -> tuple[Address, ...]:
        """The current state's recipients, as our sender key last saw them if still valid."""
        if outbound is not None and outbound.recipients is not None:
            return outbound.recipients
        recipients = tuple(self.recipients(group_id))
        if outbound is not None:
            outbound.recipients = recipients
        return recipients

    def forget_recipients(self) -> None:
        """A group or a device list changed: recipients are computed again."""
        for outbound in self._state.outbound.values():
            outbound.recipients = None

    # ------------------------------------------------------------ our sender keys

    def retire_outbound(self, group_id: bytes) -> None:
        """Our next message in the group starts a new sender key."""
        if self._state.outbound.pop(group_id, None) is not None:
            self._state.mark(RecordKey.outbound(group_id))

    def retire_where_member(self, user_id: str) -> None:
        """A device of ``user_id`` left: it must not read what follows in its groups."""
        for group_id, group in self._state.groups.items():
            if group.current.member(user_id) is not None:
                self.retire_outbound(group_id)

    def _distribution(self, outbound: Outbound) -> bytes:
        """The content carrying our sender key of ``outbound``, naming this device."""
        return SenderKey(outbound.key.distribution_message(sender=self._state.address)).encode()

    def _distribute(
        self, group_id: bytes, outbound: Outbound, addresses: list[Address], now: int
    ) -> list[DirectSend]:
        """Our sender key to these devices, one-to-one; they hold it from now on."""
        distribution = self._distribution(outbound)
        sends = self._sessions.encrypt_for(addresses, distribution, now)
        outbound.shared_with.update(addresses)
        self._state.mark(RecordKey.outbound(group_id))
        return sends

    def share_key(self, group_id: bytes, address: Address, now: int) -> list[DirectSend]:
        """Our current sender key in the group (if any) for one more device."""
        outbound = self._state.outbound.get(group_id)
        return [] if outbound is None else self._distribute(group_id, outbound, [address], now)

    def group_send_needs(self, group_id: bytes, *, now: int) -> list[Address]:
        """Devices a group send would need a session with (fetch their bundles)."""
        if group_id not in self._state.groups:
            raise InvalidArgument("unknown group")
        recipients = self.recipients(group_id)
        outbound = self._state.outbound.get(group_id)
        shared = set() if outbound is None else outbound.shared_with
        return [a for a in recipients if a not in shared and not self._sessions.usable(a, now)]

    def send_group(
        self,
        group_id: bytes,
        body: bytes,
        *,
        now: int,
        message_id: bytes | None = None,
        sent_at: int | None = None,
    ) -> tuple[bytes, list[Send]]:
        """Encrypt once for the whole group: the distributions still needed, then the send."""
        state = self._state
        if not self.is_member(group_id, state.user_id):
            raise InvalidArgument("not a member of this group")
        outbound = state.outbound.get(group_id)
        recipients = self._current_recipients(group_id, outbound)
        if outbound is not None and outbound.key.needs_rotation(
            now, max_age=self.max_age, max_messages=self.max_messages
        ):
            outbound = None
        needing = list(recipients) if outbound is None else outbound.lacking(recipients)
        records = self._sessions.check_sessions(needing, now)
        if outbound is None:
            outbound = Outbound(OutboundSenderKey.create(group_id, now, state.rng), set())
            outbound.recipients = recipients
            state.outbound[group_id] = outbound
        sends: list[Send] = []
        if needing:
            distribution = self._distribution(outbound)
            sends.extend(self._sessions.encrypt_with(needing, records, distribution, now))
            outbound.shared_with.update(needing)
        message_id = message_id or state.new_message_id()
        sent_at = now if sent_at is None else sent_at
        # Our group state goes with the text, so that a member holding another notices.
        current = state.groups[group_id].current
        text = GroupText(message_id, sent_at, body, current.epoch, current.state_hash)
        payload = outbound.key.encrypt(text.encode(), sender=state.address)
        state.mark(RecordKey.outbound(group_id))
        sends.append(GroupSend(group_id, payload, recipients, message_id))
        return message_id, sends

    def resend_group(self, send: GroupSend, *, now: int) -> list[Send]:
        """Address a refused group send to the group's current devices."""
        outbound = self._state.outbound.get(send.group_id)
        recipients = self._current_recipients(send.group_id, outbound)
        sends: list[Send] = []
        if outbound is not None:
            needing = outbound.lacking(recipients)
            if needing:
                sends.extend(self._distribute(send.group_id, outbound, needing, now))
        sends.append(GroupSend(send.group_id, send.payload, recipients, send.message_id))
        return sends

    def receive_retry(self, sender: Address, content: RetryRequest, now: int) -> Outcome:
        """A member's device could not read our message: our current key, again."""
        outbound = self._state.outbound.get(content.group_id)
        if not self.is_member(content.group_id, sender.user_id) or outbound is None:
            return Outcome()
        outbound.unshare(sender)
        sends = self._distribute(content.group_id, outbound, [sender], now)
        return Outcome(events=(RetryRequested(sender, content.group_id),), sends=tuple(sends))

    # ------------------------------------------------------------ their sender keys

    def receive_sender_key(self, sender: Address, content: SenderKey) -> Outcome:
        """Keep a sender key only for our group, from its creator, a member's device (spec 4.8)."""
        state = self._state
        skdm = SenderKeyDistributionMessage.decode(content.distribution)
        group = state.groups.get(skdm.group_id)
        devices = None if group is None else _MemberDevices(self._directory, self, group.current)
        try:
            state.inbound.process_distribution(skdm, sender=sender, group_devices=devices)
        except RemoteProtocolError as exc:
            # Nothing stored. One sent before its sender's welcome reached us comes
            # again, as the answer to the retry request its next message causes.
            return Outcome(events=(Undecryptable(sender, exc.code, skdm.group_id),))
        state.mark(RecordKey.inbound(skdm.group_id, sender))
        return Outcome()

    def drop_sender_keys(self, group_id: bytes, user_ids: set[str] | None) -> None:
        """Forget the sender keys (and claimed states) of these users in the group (None:
        of every user)."""
        self._forget(lambda g, a: g == group_id and (user_ids is None or a.user_id in user_ids))

    def drop_sender_keys_of(self, devices: set[Address]) -> None:
        """Forget the sender keys (and claimed states) of these devices, in every group
        (they left their lists)."""
        self._forget(lambda _, sender: sender in devices)

    def _forget(self, which: Callable[[bytes, Address], bool]) -> None:
        """Drop the sender keys and claimed states of the (group, device) ``which`` selects."""
        state = self._state
        for group_id, address in state.inbound.discard(which):
            state.mark(RecordKey.inbound(group_id, address))
        for group_id, claims in list(state.claims.items()):
            if claims.forget(partial(which, group_id)):
                if not claims:
                    del state.claims[group_id]
                state.mark(RecordKey.claims(group_id))

    def receive(self, sender: Address, payload: bytes, now: int) -> Outcome:
        """A group message: the app's, or a retry request when we lack the sender's key."""
        state = self._state
        parsed = SenderKeyMessage.decode(payload)
        group_id = parsed.group_id
        if group_id not in state.groups:
            return Outcome(events=(Undecryptable(sender, UnknownGroup.code, group_id),))
        if not self.is_member(group_id, sender.user_id):
            return Outcome(events=(Undecryptable(sender, NotAMember.code, group_id),))
        record = state.inbound.get((group_id, sender))
        if record is None or all(c.chain_id != parsed.chain_id for c in record.chains):
            return self._request_retry(sender, group_id, parsed.chain_id, now)
        plaintext = record.decrypt(payload, sender=sender)
        # The chain moved on (its key is spent) even if the content turns out malformed.
        state.mark(RecordKey.inbound(group_id, sender))
        text = GroupText.decode(plaintext)
        received = MessageReceived(sender, text.message_id, text.sent_at, text.body, group_id)
        claim = StateClaim(text.epoch, text.state_hash)
        return Outcome(events=(received, *self.judge_claims(group_id, sender, claim)))

    # ------------------------------------------------------------ split detection

    def judge_claims(
        self, group_id: bytes, sender: Address | None = None, claim: StateClaim | None = None
    ) -> list[Event]:
        """Judge the claims kept for this group again, and ``sender``'s new ``claim`` (spec 4.9)."""
        state = self._state
        group = state.groups.get(group_id)
        if group is None:
            return []
        held = state.claims.get(group_id)
        claims = PeerClaims() if held is None else held
        before = None if held is None else held.to_bytes()

        def relation(claimed: StateClaim) -> StateRelation:
            return group.relation(claimed.epoch, claimed.state_hash)

        # A sender ahead of us is explained while we hold changes of the group
        # that wait for the one before them (the relay orders changes before
        # the messages that follow them, so otherwise one was withheld).
        explained = self._holds_changes_of(group_id)
        report = claims.rejudge(relation, ahead_explained=explained)
        if sender is not None and claim is not None:
            found = claims.observe(sender, claim, relation, ahead_explained=explained)
            if found is not None:
                report.append((sender, claim, found))
        after = claims.to_bytes() if claims else None
        if after != before:
            if claims:
                state.claims[group_id] = claims
            else:
                del state.claims[group_id]
            state.mark(RecordKey.claims(group_id))
        ours = group.current
        return [
            GroupStateMismatch(
                group_id, who, how.value, what.epoch, what.state_hash, ours.epoch, ours.state_hash
            )
            for who, what, how in report
        ]

    def _holds_changes_of(self, group_id: bytes) -> bool:
        """Whether changes of the group wait, held, for the change they build on."""
        return any(
            ControlMessage.decode(content.control).group_id == group_id
            for _, content in self._state.held
        )

    def _request_retry(self, sender: Address, group_id: bytes, chain_id: int, now: int) -> Outcome:
        if not self._sessions.usable(sender, now):
            return Outcome(events=(Undecryptable(sender, "NO_SENDER_KEY", group_id),))
        request = RetryRequest(group_id, chain_id).encode()
        sends = self._sessions.encrypt_for([sender], request, now)
        return Outcome(
            events=(Undecryptable(sender, "NO_SENDER_KEY", group_id, retry_requested=True),),
            sends=tuple(sends),
        )
