"""Sender keys bound to their sender, and bounded: a hostile member, contact or relay attacks.

Attacks an independent review found, played with the real ClientCore on
the in-memory relay of tests/support/harness.py:

* a member forwards another member's sender key as its own, and the relay
  restamps that member's group message with the forwarder's address;
* a contact who shares no group with a device makes it store sender-key
  records for made-up groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from hushchat.protocol.client_core import (
    ENVELOPE_DIRECT,
    Address,
    Event,
    MessageReceived,
    RecordKey,
    RecordKind,
    Undecryptable,
)
from hushchat.protocol.content import SenderKey
from hushchat.protocol.encoding import unpack
from hushchat.protocol.group_cipher import OutboundSenderKey
from hushchat.protocol.primitives import SeededRandom
from hushchat.protocol.sender_keys import SenderKeyDistributionMessage
from hushchat.protocol.session import SessionRecord
from tests.support.harness import GROUP, A, Network, full_state


def friends(net: Network) -> bytes:
    """Alice's group of alice, bob and mallory, every sender key delivered."""
    for user_id in ("alice", "bob", "mallory"):
        net.add_user(user_id)
    group_id, _ = net.create_group(A("alice"), "friends", ["bob", "mallory"])
    net.deliver_all()
    for user_id in ("alice", "bob", "mallory"):
        net.send_group(A(user_id), group_id, b"hello from " + user_id.encode())
    net.deliver_all()
    return group_id


def learned_distribution(
    net: Network, holder: Address, group_id: bytes, sender: Address, *, named: Address
) -> bytes:
    """The SKDM of ``sender``'s chain as ``holder`` stored it, naming ``named`` as its creator:
    what a member can hand on."""
    record = net.stores[holder][RecordKey.inbound(group_id, sender)]
    _, _, chains = unpack(record, what="test")
    chain_id, signing_key, iteration, chain_key, _ = chains[0]
    return SenderKeyDistributionMessage(
        group_id, named, chain_id, iteration, chain_key, signing_key
    ).encode()


def inbound(net: Network, address: Address) -> dict[RecordKey, bytes]:
    """The sender-key records ``address`` holds."""
    return {k: v for k, v in full_state(net.core(address)).items() if k.kind is RecordKind.INBOUND}


def bodies_by_sender(events: Sequence[object], body: bytes) -> list[Address]:
    return [e.sender for e in events if isinstance(e, MessageReceived) and e.body == body]


# ------------------------------------------------------------------ forwarded sender keys


@pytest.mark.parametrize(
    ("named", "refusals"),
    [
        # Handed on as it is: it names alice, and came from mallory.
        (A("alice"), ("SENDER_MISMATCH", "NO_SENDER_KEY")),
        # Renamed to mallory: stored, but alice signed her own address.
        (A("mallory"), (None, "BAD_SIGNATURE")),
    ],
)
def test_a_forwarded_sender_key_never_shows_a_message_under_the_forwarder(
    net: Network, named: Address, refusals: tuple[str | None, str]
) -> None:
    group_id = friends(net)
    bob = A("bob")
    # Mallory, a member, hands bob alice's chain as if it were its own.
    skdm = learned_distribution(net, A("mallory"), group_id, A("alice"), named=named)
    forwarding = net.receive(net.inject_content(A("mallory"), bob, SenderKey(skdm).encode()))
    # Alice writes; the relay delivers her message to bob, and again stamped as mallory's.
    envelopes = net.send_group(A("alice"), group_id, b"meet at noon")
    [to_bob] = [e for e in envelopes if e.label == GROUP and e.recipient == bob]
    net.in_flight.remove(to_bob)
    genuine = net.receive(to_bob)
    inbound_before = inbound(net, bob)
    restamped = net.receive(net.restamp(to_bob, A("mallory")))
    assert genuine.events == (to_bob.received(),)
    events = list(genuine.events + restamped.events)
    assert bodies_by_sender(events, b"meet at noon") == [A("alice")]
    forwarding_reason, restamped_reason = refusals
    if forwarding_reason is None:
        assert forwarding.events == ()
    else:
        assert forwarding.events == (Undecryptable(A("mallory"), forwarding_reason, group_id),)
    [refusal] = restamped.events
    assert isinstance(refusal, Undecryptable)
    assert (refusal.sender, refusal.reason) == (A("mallory"), restamped_reason)
    assert inbound(net, bob) == inbound_before


# ------------------------------------------------------------------ unbounded records


def test_a_contact_outside_every_group_cannot_make_a_device_store_sender_keys(
    net: Network,
) -> None:
    net.add_user("bob")
    net.add_user("mallory")
    net.send_direct(A("mallory"), "bob", b"hi")
    net.send_direct(A("bob"), "mallory", b"hi")
    net.deliver_all()
    bob = net.core(A("bob"))
    before = full_state(bob)
    # Mallory's session with bob, used directly: thousands of made-up groups' sender keys.
    key = RecordKey.session(A("bob"))
    session = SessionRecord.from_bytes(net.stores[A("mallory")][key])
    rng = SeededRandom(b"made-up groups")
    refusals: list[Event] = []
    for _ in range(3000):
        chain = OutboundSenderKey.create(rng.random_bytes(16), net.now, rng)
        skdm = chain.distribution_message(sender=A("mallory"))
        payload = session.encrypt(SenderKey(skdm).encode(), now=net.now)
        outcome = bob.receive(A("mallory"), ENVELOPE_DIRECT, payload, now=net.now)
        refusals.extend(outcome.events)
    after = full_state(bob)
    stored = {k for k in after if k.kind is RecordKind.INBOUND}
    assert stored == set(), f"{len(stored)} sender-key records stored for made-up groups"
    assert {k for k in after.keys() | before.keys() if after.get(k) != before.get(k)} == {
        RecordKey.session(A("mallory"))
    }
    assert len(refusals) == 3000
    assert {(e.sender, e.reason) for e in refusals if isinstance(e, Undecryptable)} == {
        (A("mallory"), "UNKNOWN_GROUP")
    }


def test_a_contact_who_knows_a_group_id_cannot_make_a_member_store_its_key(
    net: Network,
) -> None:
    group_id = friends(net)
    net.add_user("eve")
    net.send_direct(A("eve"), "bob", b"hi")
    net.deliver_all()
    bob = net.core(A("bob"))
    before = full_state(bob)
    key = OutboundSenderKey.create(group_id, net.now, SeededRandom(b"eve's key"))
    content = SenderKey(key.distribution_message(sender=A("eve"))).encode()
    delivery = net.receive(net.inject_content(A("eve"), A("bob"), content))
    assert delivery.events == (Undecryptable(A("eve"), "NOT_A_MEMBER", group_id),)
    after = full_state(bob)
    assert {k for k in after.keys() | before.keys() if after.get(k) != before.get(k)} == {
        RecordKey.session(A("eve"))
    }


def test_a_member_cycling_its_devices_leaves_no_sender_keys_behind(net: Network) -> None:
    group_id = friends(net)
    for device_id in range(2, 12):
        net.link_device("mallory", device_id)
        device = A("mallory", device_id)
        key = OutboundSenderKey.create(group_id, net.now, SeededRandom(b"%d" % device_id))
        content = SenderKey(key.distribution_message(sender=device)).encode()
        assert net.receive(net.inject_content(device, A("alice"), content)).events == ()
        assert RecordKey.inbound(group_id, device) in net.stores[A("alice")]
        net.unlink_device("mallory", device_id)
        assert RecordKey.inbound(group_id, device) not in net.stores[A("alice")]
    assert set(inbound(net, A("alice"))) == {
        RecordKey.inbound(group_id, A("bob")),
        RecordKey.inbound(group_id, A("mallory")),
    }


def test_a_device_keeps_at_most_its_limit_of_sender_keys_and_evicts_none(
    net: Network,
) -> None:
    group_id = friends(net)
    net.add_user("carol")
    net.add_member(A("alice"), group_id, "carol")
    net.deliver_all()
    bob = net.core(A("bob"))
    assert {k.address for k in inbound(net, A("bob"))} == {A("alice"), A("mallory")}
    bob._state.inbound.max_records = 2  # the ClientCore parameter max_sender_key_records
    envelopes = net.send_group(A("carol"), group_id, b"hello from carol")
    [skdm] = [e for e in envelopes if e.label == "skdm" and e.recipient == A("bob")]
    net.in_flight.remove(skdm)
    before = full_state(bob)
    delivery = net.receive(skdm)
    assert delivery.events == (Undecryptable(A("carol"), "TOO_MANY_SENDER_KEYS", group_id),)
    after = full_state(bob)
    # Only the session it came in (carol's first message: a handshake, so the account too).
    assert {k for k in after.keys() | before.keys() if after.get(k) != before.get(k)} == {
        RecordKey.session(A("carol")),
        RecordKey.ACCOUNT,
    }
    deliveries = net.deliver_all()
    # Nothing was pushed out: alice's and mallory's next messages still read.
    for user_id in ("alice", "mallory"):
        net.send_group(A(user_id), group_id, b"still here")
    deliveries += net.deliver_all()
    bodies = [
        (e.sender.user_id, e.body)
        for d in deliveries
        if d.envelope.recipient == A("bob")
        for e in d.events
        if isinstance(e, MessageReceived)
    ]
    assert bodies == [("alice", b"still here"), ("mallory", b"still here")]
