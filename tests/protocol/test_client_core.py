"""ClientCore: several devices per user, groups with sender keys, state round trips, garbage.

Every scenario runs on the in-memory relay of tests/support/harness.py; the relay's
attacks (forgeries, swaps, replays) are in test_malicious_relay.py and the
random interleavings in test_client_core_stateful.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hushchat.protocol.client_core import (
    ENVELOPE_DIRECT,
    ENVELOPE_GROUP,
    Address,
    ClientCore,
    DeliveryConfirmed,
    DeviceAdded,
    DeviceRemoved,
    DirectSend,
    GroupUpdated,
    IdentityChanged,
    MessageReceived,
    MessageSentByOtherDevice,
    Outcome,
    RecordKey,
    RecordKind,
    RetryRequested,
    Undecryptable,
)
from hushchat.protocol.consts import (
    MAX_HELD_GROUP_CONTROLS,
    MAX_SENDER_KEY_FORWARD_JUMP,
    STATE_VERSION,
)
from hushchat.protocol.content import (
    DeliveryReceipt,
    GroupControl,
    GroupText,
    RetryRequest,
    SyncRequest,
    Text,
)
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.errors import (
    InvalidArgument,
    NoSenderKey,
    ProtocolError,
    StateError,
    UnknownStateVersion,
)
from hushchat.protocol.group import ControlMessage, MemberAdded, MemberRemoved, SetTitle
from hushchat.protocol.group_cipher import OutboundSenderKey, SenderKeyRecord
from hushchat.protocol.primitives import SeededRandom
from hushchat.protocol.sender_keys import next_chain_key
from tests.support.harness import (
    CONTROL,
    COPY,
    GROUP,
    GROUP_SYNC,
    RETRY,
    RETRY_ANSWER,
    SKDM,
    SYNC,
    TEXT,
    A,
    Delivery,
    Envelope,
    Network,
    full_state,
)


def make_group(net: Network, devices: dict[str, int], admin: str = "alice") -> bytes:
    """Users with these device counts, a group of all of them made by ``admin``, delivered."""
    for user_id, count in devices.items():
        net.add_user(user_id, count)
    group_id, _ = net.create_group(A(admin), "friends", [u for u in devices if u != admin])
    for delivery in net.deliver_all():
        assert delivery.events and isinstance(delivery.events[0], GroupUpdated)
    return group_id


def received(deliveries: Iterable[Delivery]) -> dict[Address, list[bytes]]:
    """The bodies each device's app received, in order."""
    out: dict[Address, list[bytes]] = {}
    for delivery in deliveries:
        for event in delivery.events:
            if isinstance(event, MessageReceived):
                out.setdefault(delivery.envelope.recipient, []).append(event.body)
    return out


def others(net: Network, *exclude: Address) -> list[Address]:
    return [a for a in sorted(net.devices) if a not in exclude]


def chains_of(envelopes: Iterable[Envelope]) -> set[int]:
    return {e.chain[0] for e in envelopes if e.label == GROUP and e.chain is not None}


# ------------------------------------------------------------------ several devices per user


def test_a_direct_message_reaches_every_device_and_the_senders_other_devices(
    net: Network,
) -> None:
    net.add_user("alice", 2)
    net.add_user("bob", 3)
    envelopes = net.send_direct(A("alice"), "bob", b"hi bob")
    assert sorted(e.recipient for e in envelopes if e.label == TEXT) == net.devices_of("bob")
    assert [e.recipient for e in envelopes if e.label == COPY] == [A("alice", 2)]
    deliveries = net.deliver_all()
    for delivery in deliveries:
        envelope = delivery.envelope
        if envelope.label == TEXT:
            assert delivery.events == (envelope.received(),)
        else:
            assert envelope.message_id is not None and envelope.sent_at is not None
            assert delivery.events == (
                MessageSentByOtherDevice(
                    A("alice"), "bob", envelope.message_id, envelope.sent_at, b"hi bob"
                ),
            )
    # Replies from a linked device reach every device of alice and bob's own others.
    net.send_direct(A("bob", 3), "alice", b"hello from my laptop")
    deliveries = net.deliver_all()
    assert received(deliveries) == {a: [b"hello from my laptop"] for a in net.devices_of("alice")}
    copies = {d.envelope.recipient for d in deliveries if d.envelope.label == COPY}
    assert copies == {A("bob", 1), A("bob", 2)}


def test_duplicated_direct_envelopes_reach_the_app_once(net: Network) -> None:
    net.add_user("alice", 2)
    net.add_user("bob", 2)
    for body in (b"one", b"two"):
        net.send_direct(A("alice"), "bob", body)
    for envelope in list(net.in_flight):
        net.in_flight.append(envelope)
    deliveries = net.deliver_all()
    assert received(deliveries) == {a: [b"one", b"two"] for a in net.devices_of("bob")}
    for delivery in deliveries[len(deliveries) // 2 :]:
        assert delivery.events == () and delivery.sent == ()


def test_a_new_or_removed_device_shows_to_contacts(net: Network) -> None:
    net.add_user("alice", 1)
    net.add_user("bob", 2)
    net.send_direct(A("alice"), "bob", b"hi")
    net.deliver_all()
    net.link_device("bob", 3)
    # (The primary that linked it knows; everyone else is told.)
    assert net.events[A("alice")][-1] == DeviceAdded(A("bob", 3))
    assert net.events[A("bob", 2)][-1] == DeviceAdded(A("bob", 3))
    # The new device needs a session before alice's next message.
    assert net.core(A("alice")).devices_without_session(["bob"], now=net.now) == [A("bob", 3)]
    net.send_direct(A("alice"), "bob", b"all of you")
    assert received(net.deliver_all()) == {a: [b"all of you"] for a in net.devices_of("bob")}

    net.unlink_device("bob", 2)
    for address in (A("alice"), A("bob", 3)):
        assert net.events[address][-1] == DeviceRemoved(A("bob", 2))
        assert net.core(address).devices_of("bob") == (A("bob"), A("bob", 3))
    envelopes = net.send_direct(A("alice"), "bob", b"not you")
    assert sorted(e.recipient for e in envelopes) == [A("bob"), A("bob", 3)]
    net.deliver_all()
    # The removed device can no longer talk to alice.
    text = Text(b"\x02" * 16, net.now, b"still here?").encode()
    delivery = net.receive(net.inject_content(A("bob", 2), A("alice"), text))
    assert delivery.events == (Undecryptable(A("bob", 2), "UNKNOWN_DEVICE"),)


def test_safety_numbers_agree_and_change_with_the_identity(net: Network) -> None:
    net.add_user("alice", 2)
    net.add_user("bob", 2)
    alice, bob = net.core(A("alice")), net.core(A("bob", 2))
    number = alice.safety_number("bob")
    assert number.digits == bob.safety_number("alice").digits
    assert net.core(A("alice", 2)).safety_number("bob") == number
    number.verify_scanned(bob.safety_number("alice").scannable())

    # Bob reinstalls: a new user identity with a new first device list.
    new_bob = Network(SeededRandom(b"another bob")).add_user("bob", 1)[0]
    own = new_bob.own_device_list
    assert own is not None
    outcomes = net.push_device_list(own.encode(), net.devices_of("alice"))
    for outcome in outcomes.values():
        assert outcome.events == (
            IdentityChanged("bob", bob.user_identity_public, new_bob.user_identity_public),
        )
    # Unconfirmed, nothing changes.
    assert alice.safety_number("bob") == number
    alice.confirm_identity("bob")
    net.persist(A("alice"))
    changed = alice.safety_number("bob")
    assert changed.digits != number.digits
    new_bob.process_device_list(net.device_lists["alice"])
    assert changed.digits == new_bob.safety_number("alice").digits


# ------------------------------------------------------------------ groups


def test_a_group_message_reaches_every_member_device_including_the_senders_own(
    net: Network,
) -> None:
    group_id = make_group(net, {"alice": 2, "bob": 3, "carol": 1})
    for address, core in net.devices.items():
        assert group_id in core.group_ids, address
    net.send_group(A("bob", 2), group_id, b"from bob's second device")
    deliveries = net.deliver_all()
    assert received(deliveries) == {
        a: [b"from bob's second device"] for a in others(net, A("bob", 2))
    }
    # Every device answers; every other device reads each answer once.
    for address in others(net):
        net.send_group(address, group_id, str(address).encode())
    got = received(net.deliver_all())
    for address in net.devices:
        assert sorted(got[address]) == sorted(str(a).encode() for a in others(net, address))


def test_duplicated_group_envelopes_reach_the_app_once(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 2, "carol": 1})
    net.send_group(A("alice"), group_id, b"once")
    for envelope in list(net.in_flight):
        net.in_flight.insert(0, envelope)  # the duplicate first, too
    deliveries = net.deliver_all()
    assert received(deliveries) == {a: [b"once"] for a in others(net, A("alice"))}
    # Delivered again after everything: nothing.
    for delivery in deliveries:
        again = net.receive(delivery.envelope)
        assert again.events == () and again.sent == ()


def test_removal_secrecy(net: Network) -> None:
    group_id = make_group(net, {"alice": 2, "bob": 2, "carol": 1, "dave": 2})
    before = {}
    for address in others(net):
        before[address] = chains_of(net.send_group(address, group_id, b"before"))
    net.deliver_all()
    dave = net.devices_of("dave")
    dave_records = {a: dict(net.stores[a]) for a in dave}

    net.remove_member(A("alice"), group_id, "dave")
    # Dave's devices ignore their removal: the control never reaches them.
    assert len(net.take(label=CONTROL, recipient=dave[0])) == 1
    assert len(net.take(label=CONTROL, recipient=dave[1])) == 1
    for delivery in net.deliver_all():
        assert delivery.events == (GroupUpdated(group_id, A("alice"), (MemberRemoved("dave"),)),)
    remaining = [a for a in others(net) if a.user_id != "dave"]
    payloads = []
    for address in remaining:
        envelopes = net.send_group(address, group_id, b"after")
        chain_id, iteration = envelopes[-1].chain or (0, 0)
        assert chain_id not in before[address] and iteration == 0, "no new sender key"
        keys_to = sorted(e.recipient for e in envelopes if e.label == SKDM)
        assert keys_to == [a for a in remaining if a != address], "new key to the wrong devices"
        assert all(e.recipient.user_id != "dave" for e in envelopes)
        payloads.append((address, envelopes[-1].payload))
    assert received(net.deliver_all()) == {a: [b"after"] * (len(remaining) - 1) for a in remaining}

    for device in dave:
        core = net.core(device)
        assert group_id in core.group_ids  # it never learned
        for sender, payload in payloads:
            outcome = core.receive(sender, ENVELOPE_GROUP, payload, now=net.tick())
            assert not any(isinstance(e, MessageReceived) for e in outcome.events)
            assert outcome.events[0] == Undecryptable(
                sender, "NO_SENDER_KEY", group_id, retry_requested=True
            )
            # Its retry requests go unanswered: it is no member any more.
            for send in outcome.sends:
                assert isinstance(send, DirectSend)
                for device_id, request in send.payloads:
                    requester = net.core(Address(send.recipient_user, device_id))
                    answer = requester.receive(device, ENVELOPE_DIRECT, request, now=net.now)
                    assert answer.events == () and answer.sends == ()
        # Even the sender key records it kept cannot read anything new.
        for key, data in dave_records[device].items():
            if key.kind is RecordKind.INBOUND:
                for _, payload in payloads:
                    record = SenderKeyRecord.from_bytes(data)
                    assert key.address is not None
                    with pytest.raises(NoSenderKey):
                        record.decrypt(payload, sender=key.address)


def test_a_removed_device_reads_nothing_sent_after(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 2, "carol": 1})
    before = {a: chains_of(net.send_group(a, group_id, b"before")) for a in others(net)}
    net.deliver_all()
    old_records = dict(net.stores[A("bob", 2)])
    net.unlink_device("bob", 2)
    for address in others(net, A("bob"), A("bob", 2)):
        assert DeviceRemoved(A("bob", 2)) in net.events[address]
    remaining = others(net, A("bob", 2))
    payloads = []
    for address in remaining:
        envelopes = net.send_group(address, group_id, b"after")
        assert all(e.recipient != A("bob", 2) for e in envelopes)
        assert not chains_of(envelopes) & before[address], "no new sender key"
        payloads.append((address, envelopes[-1].payload))
    assert received(net.deliver_all()) == {a: [b"after"] * (len(remaining) - 1) for a in remaining}
    removed = net.core(A("bob", 2))
    for sender, payload in payloads:
        outcome = removed.receive(sender, ENVELOPE_GROUP, payload, now=net.tick())
        assert not any(isinstance(e, MessageReceived) for e in outcome.events)
        for key, data in old_records.items():
            if key.kind is RecordKind.INBOUND:
                record = SenderKeyRecord.from_bytes(data)
                assert key.address is not None
                with pytest.raises(NoSenderKey):
                    record.decrypt(payload, sender=key.address)
    # And what it sends is refused by everyone.
    net.persist(A("bob", 2))
    net.send_group(A("bob", 2), group_id, b"can you hear me")
    for delivery in net.deliver_all():
        assert delivery.events == (Undecryptable(A("bob", 2), "UNKNOWN_DEVICE"),)


def test_join_secrecy(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 2, "carol": 1})
    net.add_user("erin", 2)
    earlier = []
    for address in others(net):
        if address.user_id != "erin":
            for body in (b"old 1", b"old 2"):
                earlier.append((address, net.send_group(address, group_id, body)[-1]))
    net.deliver_all()
    net.add_member(A("alice"), group_id, "erin")
    for delivery in net.deliver_all():
        if delivery.envelope.recipient.user_id == "erin":
            [joined] = delivery.events
            assert isinstance(joined, GroupUpdated) and joined.joined
    # Members send again: erin gets each current sender key, at its current iteration.
    for address, _ in earlier[::2]:
        envelopes = net.send_group(address, group_id, b"new")
        for envelope in envelopes:
            if envelope.label == SKDM and envelope.recipient.user_id == "erin":
                assert envelope.chain is not None and envelope.chain[1] == 2
    assert received(net.deliver_all())[A("erin", 2)] == [b"new"] * 4
    for device in net.devices_of("erin"):
        core = net.core(device)
        for sender, envelope in earlier:
            outcome = core.receive(sender, ENVELOPE_GROUP, envelope.payload, now=net.tick())
            assert not any(isinstance(e, MessageReceived) for e in outcome.events)
            net.persist(device)


def test_a_retry_request_brings_the_sender_key_and_later_messages_decrypt(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 1, "carol": 2})
    net.send_direct(A("bob"), "carol", b"a session first")
    net.deliver_all()
    envelopes = net.send_group(A("bob"), group_id, b"lost on carol.2")
    assert len(net.take(label=SKDM, recipient=A("carol", 2))) == 1
    deliveries = net.deliver_all()
    by_label = {(d.envelope.label, d.envelope.recipient): d for d in deliveries}
    failed = by_label[(GROUP, A("carol", 2))]
    assert failed.events == (Undecryptable(A("bob"), "NO_SENDER_KEY", group_id, True),)
    answered = by_label[(RETRY, A("bob"))]
    assert answered.events == (RetryRequested(A("carol", 2), group_id),)
    assert [e.label for e in answered.sent] == [RETRY_ANSWER]
    assert by_label[(RETRY_ANSWER, A("carol", 2))].events == ()
    assert envelopes[-1].chain is not None
    net.send_group(A("bob"), group_id, b"readable")
    assert received(net.deliver_all()) == {a: [b"readable"] for a in others(net, A("bob"))}


def test_without_a_session_no_retry_is_requested(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 1, "carol": 1})
    # Bob's first message to carol (its key, starting their session) is lost.
    net.send_group(A("bob"), group_id, b"lost")
    net.take(label=SKDM, recipient=A("carol"))
    deliveries = net.deliver_all()
    [failed] = [d for d in deliveries if d.envelope.recipient == A("carol")]
    assert failed.events == (Undecryptable(A("bob"), "NO_SENDER_KEY", group_id, False),)
    assert failed.sent == ()


def test_a_forged_group_signature_is_refused_and_changes_nothing(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 1, "carol": 1})
    net.send_group(A("bob"), group_id, b"keys first")
    net.deliver_all()
    payload = net.send_group(A("bob"), group_id, b"genuine")[-1].payload
    carol = net.core(A("carol"))
    before = full_state(carol)
    forgeries = {
        payload[:-1] + bytes([payload[-1] ^ 1]): "BAD_SIGNATURE",  # the signature
        payload[:-65] + bytes([payload[-65] ^ 1]) + payload[-64:]: "BAD_SIGNATURE",  # the body
        payload[:-64] + bytes(64): "BAD_SIGNATURE",
        payload[:-1]: "MALFORMED",
    }
    for forged, reason in forgeries.items():
        outcome = carol.receive(A("bob"), ENVELOPE_GROUP, forged, now=net.tick())
        assert outcome == Outcome(events=(Undecryptable(A("bob"), reason),))
        assert carol.take_changes() == {} and full_state(carol) == before
    assert received(net.deliver_all()) == {A("alice"): [b"genuine"], A("carol"): [b"genuine"]}


def _sender_key_at(net: Network, sender: Address, group_id: bytes, ahead: int) -> bytes:
    """A validly signed message of ``sender``'s chain, ``ahead`` iterations past its next."""
    record = unpack(net.stores[sender][RecordKey.outbound(group_id)], what="test")
    key = unpack(record[1], what="test")
    chain_key = key[4]
    for _ in range(ahead):
        chain_key = next_chain_key(chain_key)
    key[3] += ahead
    key[4] = chain_key
    outbound = OutboundSenderKey.from_bytes(pack(key))
    state = net.core(sender).group(group_id)
    text = GroupText(b"\x01" * 16, 0, b"from the future", state.epoch, state.state_hash)
    return outbound.encrypt(text.encode(), sender=sender)


def test_a_forward_jump_beyond_the_limit_is_refused(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 1, "carol": 1})
    net.send_group(A("bob"), group_id, b"first")
    net.deliver_all()
    carol = net.core(A("carol"))
    before = full_state(carol)
    too_far = _sender_key_at(net, A("bob"), group_id, MAX_SENDER_KEY_FORWARD_JUMP + 1)
    outcome = carol.receive(A("bob"), ENVELOPE_GROUP, too_far, now=net.tick())
    assert outcome.events == (Undecryptable(A("bob"), "TOO_FAR_IN_FUTURE"),)
    assert full_state(carol) == before
    at_limit = _sender_key_at(net, A("bob"), group_id, MAX_SENDER_KEY_FORWARD_JUMP)
    outcome = carol.receive(A("bob"), ENVELOPE_GROUP, at_limit, now=net.tick())
    [event] = outcome.events
    assert isinstance(event, MessageReceived) and event.body == b"from the future"


# ------------------------------------------------------------------ linked devices


def test_a_linked_device_gets_its_users_groups_and_reads_what_follows(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 2, "carol": 1})
    for address in others(net):
        net.send_group(address, group_id, b"before the new device")
    net.deliver_all()
    net.link_device("bob", 3)
    envelopes = net.request_sync(A("bob", 3))
    assert sorted(e.recipient for e in envelopes) == [A("bob"), A("bob", 2)]
    deliveries = net.deliver_all()
    joined = [e for d in deliveries for e in d.events if isinstance(e, GroupUpdated)]
    assert len(joined) == 1 and joined[0].joined  # the second answer changes nothing
    assert net.core(A("bob", 3)).group(group_id) == net.core(A("alice")).group(group_id)
    for address in others(net):
        net.send_group(address, group_id, str(address).encode())
    got = received(net.deliver_all())
    assert sorted(got[A("bob", 3)]) == sorted(str(a).encode() for a in others(net, A("bob", 3)))
    assert all(str(A("bob", 3)).encode() in got[a] for a in others(net, A("bob", 3)))


def test_a_change_that_reaches_a_new_device_before_its_groups_applies_after(
    net: Network,
) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 1, "carol": 1})
    net.add_user("dave", 1)
    net.link_device("bob", 2)
    net.request_sync(A("bob", 2))
    [request] = net.take(recipient=A("bob"))
    answers = net.receive(request).sent  # bob's phone answers at once...
    for answer in answers:
        net.in_flight.remove(answer)
    net.add_member(A("alice"), group_id, "dave")
    net.deliver_all()  # ...but the next change reaches the new device first: held
    assert group_id not in net.core(A("bob", 2)).group_ids
    [sync] = [net.receive(a) for a in answers if a.label == GROUP_SYNC]
    joined, added = sync.events
    assert isinstance(joined, GroupUpdated) and joined.joined
    assert isinstance(added, GroupUpdated) and isinstance(added.changes[0], MemberAdded)
    assert net.core(A("bob", 2)).group(group_id) == net.core(A("alice")).group(group_id)


def test_a_late_group_sync_does_not_bring_back_a_group_the_device_left(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 2, "carol": 1})
    net.link_device("bob", 3)
    net.request_sync(A("bob", 3))
    # Both of bob's old devices answer before they learn that bob was removed.
    answers: list[Envelope] = []
    for address in (A("bob"), A("bob", 2)):
        [request] = net.take(label=SYNC, recipient=address)
        answers += net.receive(request).sent
    net.remove_member(A("alice"), group_id, "bob")
    for answer in answers:
        net.in_flight.remove(answer)
    net.deliver_all()  # bob.3 holds its removal
    results = [net.receive(answer) for answer in answers]
    assert group_id not in net.core(A("bob", 3)).group_ids
    [first, *_] = [d for d in results if d.envelope.label == GROUP_SYNC]
    _, removed = first.events
    assert isinstance(removed, GroupUpdated) and removed.changes == (MemberRemoved("bob"),)
    assert RecordKey.LEFT_GROUPS in net.stores[A("bob", 3)]
    net.reload(A("bob", 3))
    # Added again, the device joins from the welcome as usual.
    net.add_member(A("alice"), group_id, "bob")
    net.deliver_all()
    assert net.core(A("bob", 3)).group(group_id) == net.core(A("alice")).group(group_id)
    assert RecordKey.LEFT_GROUPS not in net.stores[A("bob", 3)]


# ------------------------------------------------------------------ changes reordered or lost


def test_reordered_changes_are_held_until_their_parent_arrives(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 2, "carol": 1, "dave": 1})
    net.add_user("erin", 1)
    net.remove_member(A("alice"), group_id, "dave")
    net.add_member(A("alice"), group_id, "erin")
    net.remove_member(A("alice"), group_id, "carol")
    net.in_flight.reverse()  # the newest change first, for everyone
    net.deliver_all()
    final = net.core(A("alice")).group(group_id)
    assert final.user_ids == ("alice", "bob", "erin")
    for address, core in net.devices.items():
        if address.user_id in final.user_ids:
            assert core.group(group_id) == final, address
        else:
            assert group_id not in core.group_ids, address
    # Bob's devices saw the three changes in order, each once.
    changes = [e.changes for e in net.events[A("bob", 2)] if isinstance(e, GroupUpdated)]
    assert changes[-3:] == [
        (MemberRemoved("dave"),),
        (MemberAdded("erin", net.core(A("erin")).user_identity_public, False),),
        (MemberRemoved("carol"),),
    ]
    net.send_group(A("erin"), group_id, b"hi all")
    assert received(net.deliver_all()) == {
        a: [b"hi all"] for a in others(net, A("erin")) if a.user_id in final.user_ids
    }


def test_a_lost_change_leaves_a_member_behind_until_it_arrives(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 1, "carol": 1, "dave": 1})
    net.remove_member(A("alice"), group_id, "dave")
    [lost] = net.take(label=CONTROL, recipient=A("carol"))
    net.deliver_all()
    net.add_user("erin", 1)
    net.add_member(A("alice"), group_id, "erin")
    net.deliver_all()
    carol = net.core(A("carol"))
    # Carol is behind: she holds the later change but cannot apply it.
    assert carol.group(group_id).epoch == 0
    assert RecordKey.HELD_CONTROLS in net.stores[A("carol")]
    assert carol.group(group_id).user_ids == ("alice", "bob", "carol", "dave")
    # Messages still flow; she still counts dave in.
    net.send_group(A("carol"), group_id, b"behind")
    assert any(e.recipient.user_id == "dave" for e in net.in_flight)
    net.deliver_all()
    # The lost change arrives late: both apply, in order.
    delivery = net.receive(lost)
    assert [e.changes for e in delivery.events if isinstance(e, GroupUpdated)] == [
        (MemberRemoved("dave"),),
        (MemberAdded("erin", net.core(A("erin")).user_identity_public, False),),
    ]
    assert carol.group(group_id) == net.core(A("alice")).group(group_id)
    assert RecordKey.HELD_CONTROLS not in net.stores[A("carol")]
    # After catching up she rotated: her next key goes to the current members only.
    envelopes = net.send_group(A("carol"), group_id, b"caught up")
    assert sorted(e.recipient.user_id for e in envelopes if e.label == SKDM) == [
        "alice",
        "bob",
        "erin",
    ]


def test_a_change_before_the_welcome_applies_after_joining(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 1})
    net.add_user("erin", 2)
    net.add_user("frank", 1)
    net.add_member(A("alice"), group_id, "erin")
    welcomes = net.take(label=CONTROL, recipient=A("erin")) + net.take(
        label=CONTROL, recipient=A("erin", 2)
    )
    net.add_member(A("alice"), group_id, "frank")
    # Frank's addition reaches erin's devices first: held, nothing to show yet.
    for delivery in net.deliver_all():
        if delivery.envelope.recipient.user_id == "erin":
            assert delivery.events == ()
            assert group_id not in net.core(delivery.envelope.recipient).group_ids
    for welcome in welcomes:
        joined, added = net.receive(welcome).events
        assert isinstance(joined, GroupUpdated) and joined.joined
        assert isinstance(added, GroupUpdated) and added.changes[0] == MemberAdded(
            "frank", net.core(A("frank")).user_identity_public, False
        )
    final = net.core(A("alice")).group(group_id)
    for device in net.devices_of("erin"):
        assert net.core(device).group(group_id) == final

    # Removed and added again, erin sees the welcome back before her removal.
    net.remove_member(A("alice"), group_id, "erin")
    net.add_member(A("alice"), group_id, "erin")
    net.in_flight.reverse()
    net.deliver_all()
    final = net.core(A("alice")).group(group_id)
    for address, core in net.devices.items():
        assert core.group(group_id) == final, address
    # The second welcome's group is erin's again: she reads and is read.
    net.send_group(A("erin", 2), group_id, b"back")
    net.send_group(A("frank"), group_id, b"welcome back")
    got = received(net.deliver_all())
    assert got[A("erin")] == [b"back", b"welcome back"]
    assert got[A("alice")] == [b"back", b"welcome back"]


def test_held_changes_are_bounded_and_survive_a_reload(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 1})
    alice = net.core(A("alice"))
    state = alice.group(group_id)
    for epoch in range(MAX_HELD_GROUP_CONTROLS + 2):
        message = ControlMessage.sign(
            alice.account.identity,
            group_id=group_id,
            parent_epoch=state.epoch + 1 + epoch,
            parent_hash=bytes(32),
            author_user_id="alice",
            author_device_id=1,
            action=SetTitle(f"title {epoch}"),
        )
        content = GroupControl(message.encode(), None).encode()
        delivery = net.receive(net.inject_content(A("alice"), A("bob"), content))
        assert delivery.events == ()
    held = unpack(net.stores[A("bob")][RecordKey.HELD_CONTROLS], what="test")
    assert held[0] == STATE_VERSION and len(held[1]) == MAX_HELD_GROUP_CONTROLS
    net.reload(A("bob"))
    assert full_state(net.core(A("bob"))) == net.stores[A("bob")]


# ------------------------------------------------------------------ state round trips


def test_every_party_carries_on_after_a_reload(net: Network) -> None:
    group_id = make_group(net, {"alice": 2, "bob": 1, "carol": 2})
    for address in others(net):
        net.send_group(address, group_id, b"before")
        net.send_direct(address, "bob" if address.user_id != "bob" else "alice", b"1:1")
    net.deliver_all()
    # Half-way through a conversation: some envelopes still in flight.
    for address in others(net):
        net.send_group(address, group_id, b"in flight")
    for address in net.devices:
        loaded = net.reload(address)
        assert full_state(loaded) == net.stores[address]
    got = received(net.deliver_all())
    assert all(got[a] == [b"in flight"] * 4 for a in net.devices)
    net.remove_member(A("alice", 2), group_id, "bob")
    net.deliver_all()
    for address in net.devices:
        net.reload(address)
    for address in others(net):
        if address.user_id != "bob":
            net.send_group(address, group_id, b"after")
            net.send_direct(address, "bob", b"still friends")
    got = received(net.deliver_all())
    assert got[A("bob")] == [b"still friends"] * 4
    assert all(got[a].count(b"after") == 3 for a in others(net) if a.user_id != "bob")


def test_a_peer_that_starts_over_gets_our_key_again_even_after_a_reload(net: Network) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 1, "carol": 1})
    net.send_group(A("alice"), group_id, b"key shared")
    net.deliver_all()
    # Bob lost his session with alice and starts a new one from her bundle.
    net.ensure_sessions(A("bob"), [A("alice")])
    net.send_direct(A("bob"), "alice", b"new session")
    net.deliver_all()
    net.reload(A("alice"))
    envelopes = net.send_group(A("alice"), group_id, b"again")
    assert [e.recipient for e in envelopes if e.label == SKDM] == [A("bob")]


def test_a_malformed_group_plaintext_still_spends_its_key_in_the_stored_record(
    net: Network,
) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 1})
    net.send_group(A("alice"), group_id, b"hello")
    net.deliver_all()
    record = unpack(net.stores[A("alice")][RecordKey.outbound(group_id)], what="test")
    outbound = OutboundSenderKey.from_bytes(record[1])
    payload = outbound.encrypt(b"not a GroupText", sender=A("alice"))
    outcome = net.core(A("bob")).receive(A("alice"), ENVELOPE_GROUP, payload, now=net.tick())
    assert outcome.events == (Undecryptable(A("alice"), "MALFORMED"),)
    net.persist(A("bob"))  # checks the store equals the state
    again = net.core(A("bob")).receive(A("alice"), ENVELOPE_GROUP, payload, now=net.tick())
    assert again.events == ()


@pytest.mark.parametrize(
    ("kind", "record", "error"),
    [
        ("outbound", [STATE_VERSION, b"", [1]], StateError),
        ("outbound", [STATE_VERSION, b"", [["bob", "1"]]], StateError),
        ("outbound", [STATE_VERSION + 1, b"", []], UnknownStateVersion),
        ("held_controls", [STATE_VERSION, [["bob", 1, b""]]], StateError),
        ("held_controls", [STATE_VERSION, "x"], StateError),
        ("held_controls", [STATE_VERSION + 1, []], UnknownStateVersion),
        ("left_groups", [STATE_VERSION, [b"short"]], StateError),
        ("left_groups", [STATE_VERSION, [1]], StateError),
        ("left_groups", [STATE_VERSION + 1, []], UnknownStateVersion),
    ],
)
def test_corrupt_records_fail_to_load_with_state_errors(
    net: Network, kind: str, record: list[object], error: type[StateError]
) -> None:
    group_id = make_group(net, {"alice": 1, "bob": 1})
    net.send_group(A("alice"), group_id, b"x")
    store = dict(net.stores[A("alice")])
    if kind == "outbound":
        good = unpack(store[RecordKey.outbound(group_id)], what="test")
        if record[1] == b"":
            record[1] = good[1]
        store[RecordKey.outbound(group_id)] = pack(record)
    else:
        store[RecordKey(RecordKind(kind))] = pack(record)
    with pytest.raises(error):
        ClientCore.load(store.items())
    # Salvaged: everything else loads, and the record is named with its code.
    core, skipped = ClientCore.load_salvaging(store.items())
    [key] = skipped
    assert key.kind == RecordKind(kind) and skipped[key] == error.code
    loaded = full_state(core)
    assert {k: v for k, v in store.items() if k != key and k in loaded} == {
        k: v for k, v in loaded.items() if k != key
    }


def test_salvaging_loses_only_the_corrupt_records_and_the_device_talks_on(net: Network) -> None:
    net.add_user("alice")
    net.add_user("bob")
    net.send_direct(A("alice"), "bob", b"hello")
    net.deliver_all()
    store = dict(net.stores[A("alice")])
    store[RecordKey.session(A("bob"))] = b"\x92\x01"
    with pytest.raises(StateError):
        ClientCore.load(store.items())
    alice, skipped = ClientCore.load_salvaging(store.items())
    assert skipped == {RecordKey.session(A("bob")): "CORRUPT_STATE"}
    assert alice.devices_without_session(["bob"], now=net.now) == [A("bob")]
    for key in (RecordKey.META, RecordKey.ACCOUNT):
        broken = {**store, key: b"\xc1"}
        with pytest.raises(StateError):
            ClientCore.load_salvaging(broken.items())


# ------------------------------------------------------------------ garbage in


@pytest.fixture(scope="module")
def garbage_net() -> Network:
    net = Network(SeededRandom(b"garbage"), check_persistence=False)
    group_id = make_group(net, {"alice": 1, "bob": 2})
    net.send_group(A("bob"), group_id, b"x")
    net.send_direct(A("bob", 2), "alice", b"y")
    net.deliver_all()
    return net


SENDERS = [A("bob"), A("bob", 2), A("alice"), A("mallory")]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.binary(max_size=400),
    kind=st.sampled_from([ENVELOPE_DIRECT, ENVELOPE_GROUP, 0, 7]),
    sender=st.sampled_from(SENDERS),
)
def test_garbage_never_raises_and_changes_nothing(
    garbage_net: Network, payload: bytes, kind: int, sender: Address
) -> None:
    alice = garbage_net.core(A("alice"))
    before = full_state(alice)
    outcome = alice.receive(sender, kind, payload, now=garbage_net.now)
    assert all(isinstance(e, Undecryptable) for e in outcome.events)
    assert outcome.sends == ()
    assert alice.take_changes() == {} and full_state(alice) == before


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_envelopes_never_raise_nor_reach_the_app(
    garbage_net: Network, data: st.DataObject
) -> None:
    net = garbage_net
    alice = net.core(A("alice"))
    candidates = [d.envelope for d in net.delivered if d.envelope.recipient == A("alice")]
    envelope = data.draw(st.sampled_from(candidates))
    payload = bytearray(envelope.payload)
    mutation = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if mutation == "flip":
        index = data.draw(st.integers(0, len(payload) - 1))
        payload[index] ^= data.draw(st.integers(1, 255))
    elif mutation == "truncate":
        del payload[data.draw(st.integers(0, len(payload) - 1)) :]
    elif mutation == "extend":
        payload += data.draw(st.binary(min_size=1, max_size=8))
    else:
        at = data.draw(st.integers(0, len(payload)))
        payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    before = full_state(alice)
    sender = data.draw(st.sampled_from([envelope.sender, *SENDERS]))
    outcome = alice.receive(sender, envelope.kind, bytes(payload), now=net.now)
    assert not any(isinstance(e, MessageReceived | GroupUpdated) for e in outcome.events)
    changes = alice.take_changes()
    if outcome.sends:
        # An unknown sender chain: a retry request, and only that session moved on.
        [event] = outcome.events
        assert isinstance(event, Undecryptable) and event.retry_requested
        assert set(changes) == {RecordKey.session(sender)}
        net.stores[A("alice")].update(changes)  # type: ignore[arg-type]
    else:
        assert changes == {} and full_state(alice) == before


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(index=st.integers(min_value=0), xor=st.integers(min_value=1, max_value=255))
def test_mutated_device_lists_are_refused_with_typed_errors(
    garbage_net: Network, index: int, xor: int
) -> None:
    alice = garbage_net.core(A("alice"))
    before = full_state(alice)
    data = bytearray(garbage_net.device_lists["bob"])
    data[index % len(data)] ^= xor
    with pytest.raises(ProtocolError):
        alice.process_device_list(bytes(data))  # the user identity signs every byte
    assert alice.take_changes() == {} and full_state(alice) == before


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(index=st.integers(min_value=0), xor=st.integers(min_value=1, max_value=255))
def test_mutated_bundles_raise_typed_errors_only(
    garbage_net: Network, index: int, xor: int
) -> None:
    # (A one-time prekey is not signed: a bundle with another one may start a session.)
    data = bytearray(garbage_net.bundle(A("bob", 2)))
    data[index % len(data)] ^= xor
    with contextlib.suppress(ProtocolError):
        garbage_net.core(A("alice")).process_bundle(bytes(data), now=garbage_net.now)


# ------------------------------------------------------------------ delivery receipts


# ------------------------------------------------------------------ a sender's first list


def a_stranger_to_bob(net: Network) -> tuple[ClientCore, bytes]:
    """carol, outside the network (bob holds no list of hers), and her first message to bob."""
    net.add_user("bob")
    carol = ClientCore.create_primary("carol", 1, now=net.now, rng=SeededRandom(b"carol"))
    carol.process_device_list(net.device_lists["bob"])
    carol.process_bundle(net.bundle(A("bob")), now=net.now)
    _, [send] = carol.send_direct("bob", b"hello bob", now=net.now)
    [(_, payload)] = send.payloads
    return carol, payload


def carols_list(carol: ClientCore) -> bytes:
    signed = carol.own_device_list
    assert signed is not None
    return signed.encode()


def test_a_first_list_fetched_for_an_envelope_that_opens_is_kept(net: Network) -> None:
    carol, payload = a_stranger_to_bob(net)
    bob = net.core(A("bob"))
    outcome = bob.receive(
        A("carol"), ENVELOPE_DIRECT, payload, now=net.now, sender_list=carols_list(carol)
    )
    assert [type(e) for e in outcome.events] == [MessageReceived]
    assert bob.device_list("carol") is not None
    assert RecordKey.devices("carol") in bob.take_changes()


@pytest.mark.parametrize(
    "envelope",
    ["garbage", "a group message", "carol's message from another device", "bob's own"],
)
def test_a_first_list_fetched_for_an_envelope_that_does_not_open_leaves_no_trace(
    net: Network, envelope: str
) -> None:
    """The relay stamps an envelope with a sender bob never met (spec 11 section 11.2):
    bob reads it with that user's list, it does not open, and his state is as before."""
    carol, real = a_stranger_to_bob(net)
    bob = net.core(A("bob"))
    sender, kind, payload = A("carol"), ENVELOPE_DIRECT, real
    if envelope == "garbage":
        payload = b"\x01" * 80
    elif envelope == "a group message":
        kind = ENVELOPE_GROUP
    elif envelope == "carol's message from another device":
        sender = A("carol", 2)
    else:
        # A list whose device key is bob's own: refused beside his (DUPLICATE_DEVICE_KEY).
        carol.process_device_list(net.device_lists["bob"])
    before = full_state(bob)
    assert bob.take_changes() == {}
    listed = carols_list(carol)
    if envelope == "bob's own":
        listed = net.device_lists["bob"]
    outcome = bob.receive(sender, kind, payload, now=net.now, sender_list=listed)
    assert outcome.sends == ()
    assert outcome.events and all(isinstance(e, Undecryptable) for e in outcome.events)
    assert bob.device_list("carol") is None
    assert bob.take_changes() == {} and full_state(bob) == before
    # The message itself still opens, with carol's list, when it comes as hers.
    outcome = bob.receive(
        A("carol"), ENVELOPE_DIRECT, real, now=net.now, sender_list=carols_list(carol)
    )
    assert [type(e) for e in outcome.events] == [MessageReceived]


def test_a_first_list_is_kept_when_the_envelope_changed_a_record_though_refused(
    net: Network,
) -> None:
    """carol's initial message carries a sync request, which only bob's own devices may
    send: refused (UNAUTHORIZED_CHANGE), but the session it opened is bob's now, and
    so is the list that names its device."""
    carol, _ = a_stranger_to_bob(net)
    bob = net.core(A("bob"))
    [send] = carol._sessions.encrypt_for([A("bob")], SyncRequest().encode(), net.now)
    [(_, payload)] = send.payloads
    outcome = bob.receive(
        A("carol"), ENVELOPE_DIRECT, payload, now=net.now, sender_list=carols_list(carol)
    )
    assert outcome.events == (Undecryptable(A("carol"), "UNAUTHORIZED_CHANGE"),)
    changes = bob.take_changes()
    assert RecordKey.session(A("carol")) in changes and RecordKey.devices("carol") in changes
    assert bob.device_list("carol") is not None


def test_a_stranger_whose_initial_message_shows_nothing_is_still_kept(net: Network) -> None:
    """What section 11.2 does not stop (spec 09 section 9.6): a user that can send a real
    initial message (one the relay registered, with its keys) starts a session, and bob
    keeps it and the list, though the content, a retry request for a group bob does not
    hold, reports nothing at all."""
    carol, _ = a_stranger_to_bob(net)
    bob = net.core(A("bob"))
    assert bob.take_changes() == {}
    request = RetryRequest(bytes(range(16)), 1).encode()
    [send] = carol._sessions.encrypt_for([A("bob")], request, net.now)
    [(_, payload)] = send.payloads
    outcome = bob.receive(
        A("carol"), ENVELOPE_DIRECT, payload, now=net.now, sender_list=carols_list(carol)
    )
    assert outcome == Outcome()
    changes = bob.take_changes()
    assert {RecordKey.devices("carol"), RecordKey.session(A("carol"))} <= set(changes)


def test_a_list_that_is_not_the_senders_counts_as_none(net: Network) -> None:
    _, payload = a_stranger_to_bob(net)
    net.add_user("dave")
    bob = net.core(A("bob"))
    assert bob.take_changes() == {}
    before = full_state(bob)
    for listed in (net.device_lists["dave"], b"\x00" * 40):
        outcome = bob.receive(A("carol"), ENVELOPE_DIRECT, payload, now=net.now, sender_list=listed)
        assert outcome == Outcome(events=(Undecryptable(A("carol"), "UNKNOWN_DEVICE"),))
        assert bob.take_changes() == {} and full_state(bob) == before
    with pytest.raises(InvalidArgument):
        bob.receive(A("carol"), ENVELOPE_DIRECT, payload, now=net.now, sender_list="a list")  # type: ignore[arg-type]


def test_a_newer_list_of_a_user_held_is_taken_whether_or_not_the_envelope_opens(
    net: Network,
) -> None:
    """Lists of users already held are bounded by those users: an update is taken as
    process_device_list takes it."""
    net.add_user("alice")
    net.add_user("bob")
    bob = net.core(A("bob"))
    alice = net.primaries["alice"]
    newer = alice.link_device(
        ClientCore.create_linked(
            "alice", 2, alice.user_identity_public, now=net.now, rng=SeededRandom(b"alice.2")
        ).device_entry
    )
    outcome = bob.receive(
        A("alice", 2), ENVELOPE_DIRECT, b"\x01" * 80, now=net.now, sender_list=newer.encode()
    )
    assert DeviceAdded(A("alice", 2)) in outcome.events
    assert bob.knows_device(A("alice", 2))


def test_a_delivery_receipt_reaches_every_device_of_the_sender(net: Network) -> None:
    net.add_user("alice", 2)
    net.add_user("bob")
    sent = [e for e in net.send_direct(A("alice"), "bob", b"hi") if e.label == TEXT]
    net.deliver_all()
    (message_id,) = {e.message_id for e in sent}
    assert message_id is not None
    receipts = net.send_receipt(A("bob"), "alice", [message_id])
    assert sorted(e.recipient for e in receipts) == [A("alice", 1), A("alice", 2)]
    for delivery in net.deliver_all():
        assert delivery.events == (DeliveryConfirmed(A("bob"), (message_id,)),)


def test_delivery_receipts_between_own_devices_are_refused(net: Network) -> None:
    net.add_user("alice", 2)
    net.add_user("bob")
    with pytest.raises(InvalidArgument):
        net.devices[A("alice")].send_receipt("alice", [bytes(16)], now=net.now)
    # One made by another of our devices anyway: refused as UNAUTHORIZED_CHANGE.
    net.send_direct(A("alice", 2), "bob", b"a session with alice.1 on the way")
    net.deliver_all()
    alice2 = net.devices[A("alice", 2)]
    [send] = alice2._sessions.encrypt_for(
        [A("alice")], DeliveryReceipt((bytes(16),)).encode(), net.now
    )
    [(_, payload)] = send.payloads
    outcome = net.devices[A("alice")].receive(A("alice", 2), ENVELOPE_DIRECT, payload, now=net.now)
    assert outcome.events == (Undecryptable(A("alice", 2), "UNAUTHORIZED_CHANGE"),)


def test_the_limits_given_to_load_are_the_loaded_cores() -> None:
    """Settings, not state: a core loaded (or reloaded after a failed commit) keeps those given."""
    core = ClientCore.create_primary("alice", 1, now=1_700_000_000)
    records = [(k, v) for k, v in core.take_changes().items() if v is not None]
    loaded = ClientCore.load(
        records,
        sender_key_max_age=60,
        sender_key_max_messages=7,
        max_sender_key_records=5,
        max_groups=3,
    )
    assert (
        loaded.sender_key_max_age,
        loaded.sender_key_max_messages,
        loaded.max_sender_key_records,
        loaded.max_groups,
    ) == (60, 7, 5, 3)
    salvaged, skipped = ClientCore.load_salvaging(records, max_groups=4)
    assert salvaged.max_groups == 4 and skipped == {}
