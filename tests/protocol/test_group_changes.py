"""Our own group changes on ClientCore: candidates, receipts, races, and what the app is told.

A change is signed and sent at once, in one relay send with a receipt for its
author (spec/12-groups.md, section 12.4, and spec/07 SEND_CHANGE); it takes
effect for its author when the receipt comes back, as for every member when
the change arrives. Two admins changing a group at once: the first change in
the relay's order wins everywhere, and the other is proposed again on the
new state, or dropped with GroupChangeFailed. Runs on the in-memory relay of
tests/support/harness.py, whose in-flight list is the relay's order.
"""

from __future__ import annotations

import pytest

from hushchat.protocol.client_core import (
    ENVELOPE_RECEIPT,
    Address,
    ChangePending,
    ChangeSend,
    GroupChangeFailed,
    GroupUpdated,
    MessageReceived,
    Undecryptable,
)
from hushchat.protocol.group import (
    AddMember,
    MemberAdded,
    MemberRemoved,
    RemoveMember,
    SetAdmin,
    SetTitle,
    TitleChanged,
)
from hushchat.protocol.primitives import SeededRandom
from tests.support.harness import CONTROL, RECEIPT, Envelope, Network


def A(user_id: str, device_id: int = 1) -> Address:
    return Address(user_id, device_id)


@pytest.fixture
def net(request: pytest.FixtureRequest) -> Network:
    return Network(SeededRandom(request.node.nodeid.encode()))


def two_admin_group(net: Network, *others: str) -> bytes:
    """alice's group of alice, bob (both admins) and ``others``, every session set up."""
    for user_id in ("alice", "bob", *others):
        net.add_user(user_id)
    group_id, _ = net.create_group(A("alice"), "friends", ["bob", *others])
    net.deliver_all()
    net.change_group(A("alice"), group_id, SetAdmin("bob", True))
    net.deliver_all()
    return group_id


def states(net: Network, group_id: bytes) -> set[tuple[int, bytes]]:
    """The (epoch, state hash) of every device that holds the group."""
    return {
        (core.group(group_id).epoch, core.group(group_id).state_hash)
        for core in net.devices.values()
        if group_id in core.group_ids
    }


def test_our_change_takes_effect_when_its_receipt_comes_back(net: Network) -> None:
    group_id = two_admin_group(net, "carol")
    alice = net.core(A("alice"))
    before = alice.group(group_id)
    envelopes = net.change_group(A("alice"), group_id, SetTitle("new"), settle=False)
    # One relay send: the change to every other device, the receipt to alice last.
    assert [e.label for e in envelopes] == [CONTROL, CONTROL, RECEIPT]
    assert envelopes[-1].recipient == A("alice") and envelopes[-1].kind == ENVELOPE_RECEIPT
    assert alice.group(group_id) == before and alice.has_pending_change(group_id)
    with pytest.raises(ChangePending):
        alice.set_title(group_id, "newer", now=net.tick())
    [receipt] = net.take(label=RECEIPT)
    delivery = net.receive(receipt)
    assert delivery.events == (GroupUpdated(group_id, A("alice"), (TitleChanged("new"),)),)
    assert alice.group(group_id).title == "new" and not alice.has_pending_change(group_id)
    # A receipt again (the relay repeats it) does nothing.
    assert net.receive(receipt).events == ()
    net.deliver_all()
    assert len(states(net, group_id)) == 1


def test_a_receipt_from_another_device_is_refused(net: Network) -> None:
    group_id = two_admin_group(net)
    net.change_group(A("alice"), group_id, SetTitle("new"), settle=False)
    [receipt] = net.take(label=RECEIPT)
    # The relay stamps bob as the receipt's sender, or hands bob alice's receipt.
    for forged in (net.restamp(receipt, A("bob")), _to(receipt, A("bob"), A("alice"))):
        delivery = net.receive(forged)
        assert delivery.events == (Undecryptable(forged.sender, "UNKNOWN_ENVELOPE_KIND"),)
    assert net.core(A("alice")).has_pending_change(group_id)


def _to(envelope: Envelope, recipient: Address, sender: Address) -> Envelope:
    return Envelope(envelope.ident, sender, recipient, envelope.kind, envelope.payload, "forged")


@pytest.mark.parametrize("first", ["alice", "bob"])
def test_of_two_concurrent_changes_the_first_in_the_relays_order_wins(
    net: Network, first: str
) -> None:
    # Both admins change the title on the same state; alice's send reaches the relay
    # first when first == "alice". Every device applies that one, and the other
    # author proposes its change again on the new state, where it then applies.
    group_id = two_admin_group(net, "carol")
    second = "bob" if first == "alice" else "alice"
    net.change_group(A(first), group_id, SetTitle(first), settle=False)
    net.change_group(A(second), group_id, SetTitle(second), settle=False)
    deliveries = net.deliver_all()
    titles = {a: net.core(a).group(group_id).title for a in sorted(net.devices)}
    assert set(titles.values()) == {second}, titles  # first, then second proposed again
    assert len(states(net, group_id)) == 1
    loser = [d for d in deliveries if d.envelope.recipient == A(second)]
    # The loser applied the winner's change and at once sent its own again.
    resent = [e for d in loser for e in d.sent if e.label == RECEIPT]
    assert len(resent) == 1
    epochs = {net.core(a).group(group_id).epoch for a in net.devices}
    assert epochs == {3}  # create 0, promotion 1, the two titles 2 and 3


def test_a_change_no_longer_allowed_after_the_winner_fails_with_an_event(net: Network) -> None:
    # Both admins remove carol at once: the second removal has nothing left to do.
    group_id = two_admin_group(net, "carol")
    net.remove_member(A("alice"), group_id, "carol", settle=False)
    net.remove_member(A("bob"), group_id, "carol", settle=False)
    deliveries = net.deliver_all()
    failed = [e for d in deliveries for e in d.events if isinstance(e, GroupChangeFailed)]
    assert failed == [GroupChangeFailed(group_id, RemoveMember("carol"), "STALE_CHANGE")]
    assert [d.envelope.recipient for d in deliveries if failed[0] in d.events] == [A("bob")]
    assert len(states(net, group_id)) == 1
    assert "carol" not in net.core(A("bob")).group(group_id).user_ids


def test_a_losing_add_sends_no_welcome_and_the_joiner_joins_the_winning_state(
    net: Network,
) -> None:
    group_id = two_admin_group(net, "carol")
    net.add_user("dave")
    net.change_group(A("bob"), group_id, SetTitle("bob's"), settle=False)
    net.add_member(A("alice"), group_id, "dave", settle=False)
    # No welcome left with the add: dave learns nothing before the add applied.
    assert not any(e.recipient.user_id == "dave" for e in net.in_flight)
    deliveries = net.deliver_all()
    welcomes = [e for d in deliveries for e in d.sent if e.recipient.user_id == "dave"]
    assert len(welcomes) == 1  # for the add proposed again on bob's title
    dave = net.core(A("dave"))
    assert dave.group(group_id).title == "bob's" and "dave" in dave.group(group_id).user_ids
    assert len(states(net, group_id)) == 1
    joined = [e for e in net.events[A("dave")] if isinstance(e, GroupUpdated)]
    assert [e.joined for e in joined] == [True]


def test_a_removed_author_is_told_its_change_failed(net: Network) -> None:
    group_id = two_admin_group(net, "carol")
    net.change_group(A("alice"), group_id, SetAdmin("carol", True), settle=False)
    net.remove_member(A("bob"), group_id, "alice", settle=False)
    # bob's removal reaches the relay second but alice first meets... reorder: the relay
    # puts bob's send first for everyone (it is the relay's order that counts).
    bob_envelopes = [e for e in net.in_flight if e.sender == A("bob")]
    net.in_flight = bob_envelopes + [e for e in net.in_flight if e not in bob_envelopes]
    deliveries = net.deliver_all()
    events = [e for d in deliveries if d.envelope.recipient == A("alice") for e in d.events]
    assert GroupChangeFailed(group_id, SetAdmin("carol", True), "NOT_A_MEMBER") in events
    assert group_id not in net.core(A("alice")).group_ids
    assert not net.core(A("alice")).has_pending_change(group_id)
    assert len(states(net, group_id)) == 1


def test_a_pending_change_survives_a_reload(net: Network) -> None:
    group_id = two_admin_group(net)
    net.change_group(A("alice"), group_id, SetTitle("after reload"), settle=False)
    reloaded = net.reload(A("alice"))
    assert reloaded.has_pending_change(group_id)
    net.deliver_all()
    assert reloaded.group(group_id).title == "after reload"


def test_a_change_the_relay_kept_refusing_is_dropped_with_an_event(net: Network) -> None:
    group_id = two_admin_group(net)
    alice = net.core(A("alice"))
    (change,) = alice.set_title(group_id, "never sent", now=net.tick())
    assert isinstance(change, ChangeSend)
    outcome = alice.abandon_change(change)
    assert outcome.events == (GroupChangeFailed(group_id, SetTitle("never sent"), "SEND_DROPPED"),)
    assert not alice.has_pending_change(group_id)
    assert alice.resend_change(change, now=net.tick()) is None  # no longer ours to send
    assert alice.abandon_change(change).events == ()
    net.persist(A("alice"))


def test_a_change_rebuilt_for_new_devices_keeps_its_receipt(net: Network) -> None:
    group_id = two_admin_group(net)
    alice = net.core(A("alice"))
    (change,) = alice.set_title(group_id, "t", now=net.tick())
    assert isinstance(change, ChangeSend)
    net.link_device("bob", 2)
    net.ensure_sessions(A("alice"), alice.devices_without_session(["bob"], now=net.now))
    rebuilt = alice.resend_change(change, now=net.tick())
    assert rebuilt is not None and rebuilt.receipt == change.receipt
    assert [(p.recipient_user, [d for d, _ in p.payloads]) for p in rebuilt.parts] == [
        ("bob", [1, 2])
    ]
    net.persist(A("alice"))


def test_joiners_read_what_follows_and_the_removed_nothing(net: Network) -> None:
    # The whole path on ClientCore: an add and a removal by two admins, each applied by
    # its author at its receipt, then a message: dave reads it, carol does not.
    group_id = two_admin_group(net, "carol")
    net.add_user("dave")
    net.add_member(A("alice"), group_id, "dave")
    net.remove_member(A("bob"), group_id, "carol")
    net.deliver_all()
    net.send_group(A("alice"), group_id, b"after")
    read = {
        d.envelope.recipient.user_id
        for d in net.deliver_all()
        for e in d.events
        if isinstance(e, MessageReceived) and e.body == b"after"
    }
    assert read == {"bob", "dave"}
    for address in (A("alice"), A("bob"), A("dave")):
        events = [e for e in net.events[address] if isinstance(e, GroupUpdated)]
        changes = [c for e in events for c in e.changes]
        assert MemberRemoved("carol") in changes
        assert any(isinstance(c, MemberAdded) and c.user_id == "dave" for c in changes)


def test_welcomes_go_out_once_the_add_applied(net: Network) -> None:
    group_id = two_admin_group(net)
    net.add_user("dave")
    envelopes = net.add_member(A("alice"), group_id, "dave", settle=False)
    assert {e.recipient.user_id for e in envelopes} == {"alice", "bob"}
    welcomes = net.settle(A("alice"))
    assert {e.recipient for e in welcomes} == {A("dave")}
    action = AddMember("dave", net.core(A("dave")).user_identity_public)
    assert net.core(A("alice")).group(group_id).member(action.user_id) is not None
