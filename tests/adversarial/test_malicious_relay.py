"""ClientCore against a relay (and peers) that lie: forgeries, swaps, replays, new identities.

The relay stamps senders, stores device lists and hands out bundles, so it
can forge or swap any of them; it holds no user or device identity key. A
peer holds its own keys and sessions only. Every refused input must leave
the receiver's state as it was, apart from the one-to-one session that
carried it (its ratchet moves on once a message decrypts).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from hushchat.protocol.account import Account
from hushchat.protocol.client_core import (
    ENVELOPE_DIRECT,
    ENVELOPE_GROUP,
    Address,
    ClientCore,
    GroupUpdated,
    IdentityChanged,
    MessageReceived,
    Outcome,
    RecordKey,
    RecordKind,
    Undecryptable,
)
from hushchat.protocol.consts import (
    MAX_HELD_GROUP_CONTROLS,
    MAX_PREVIOUS_SESSIONS,
    SENDER_KEY_MAX_AGE,
    SENDER_KEY_MAX_MESSAGES,
)
from hushchat.protocol.content import (
    GroupControl,
    GroupSync,
    GroupText,
    SenderKey,
    SentCopy,
    SyncRequest,
    Text,
)
from hushchat.protocol.devices import DeviceEntry, DeviceList, SignedDeviceList
from hushchat.protocol.encoding import unpack
from hushchat.protocol.errors import (
    BadSignature,
    InvalidArgument,
    RemoteProtocolError,
    UntrustedIdentity,
)
from hushchat.protocol.fingerprint import SafetyNumber
from hushchat.protocol.group import (
    GENESIS_PARENT_HASH,
    Action,
    AddMember,
    ControlMessage,
    CreateGroup,
    MemberRemoved,
    RemoveMember,
    SetTitle,
    Welcome,
)
from hushchat.protocol.group_cipher import OutboundSenderKey, SenderKeyRecord
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.protocol.messages import PreKeyMessage, decode_message
from hushchat.protocol.pqxdh import Party
from hushchat.protocol.prekeys import PreKeyBundle
from hushchat.protocol.primitives import SeededRandom
from tests.support.harness import (
    CONTROL,
    GROUP,
    RETRY,
    RETRY_ANSWER,
    SKDM,
    TEXT,
    A,
    Delivery,
    Envelope,
    Network,
    full_state,
)

MEMBERS = {"alice": 2, "bob": 1, "carol": 2, "dave": 1}


@pytest.fixture
def group(net: Network) -> bytes:
    """Alice's group of alice, bob, carol and dave; mallory is outside, with sessions to all."""
    for user_id, count in MEMBERS.items():
        net.add_user(user_id, count)
    net.add_user("mallory", 1)
    group_id, _ = net.create_group(A("alice"), "friends", list(MEMBERS)[1:])
    net.deliver_all()
    # Sessions between every two devices, both ways answered.
    for address in sorted(net.devices):
        if address.user_id != "mallory":
            net.send_group(address, group_id, b"hello")
        net.send_direct(address, "mallory" if address.user_id != "mallory" else "alice", b"hi")
    net.deliver_all()
    return group_id


def states(net: Network) -> dict[Address, dict[RecordKey, bytes]]:
    return {a: full_state(c) for a, c in net.devices.items()}


def changed(before: dict[RecordKey, bytes], after: dict[RecordKey, bytes]) -> set[RecordKey]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def inbound(state: dict[RecordKey, bytes]) -> dict[RecordKey, bytes]:
    return {k: v for k, v in state.items() if k.kind is RecordKind.INBOUND}


def signed(
    key: IdentityKeyPair,
    author: Address,
    group_id: bytes,
    parent: tuple[int, bytes],
    action: Action,
) -> bytes:
    return ControlMessage.sign(
        key,
        group_id=group_id,
        parent_epoch=parent[0],
        parent_hash=parent[1],
        author_user_id=author.user_id,
        author_device_id=author.device_id,
        action=action,
    ).encode()


def parent_of(net: Network, group_id: bytes) -> tuple[int, bytes]:
    state = net.core(A("alice")).group(group_id)
    return state.epoch, state.state_hash


def assert_refused_by_members(
    net: Network, sender: Address, content: bytes, reason: str, group_id: bytes
) -> None:
    """``sender`` sends ``content`` to every other member device: refused, nothing else moves."""
    for address in sorted(net.devices):
        if address == sender or address.user_id not in MEMBERS:
            continue
        before = full_state(net.core(address))
        group_before = net.core(address).group(group_id)
        delivery = net.receive(net.inject_content(sender, address, content))
        assert delivery.events == (Undecryptable(sender, reason),), (address, delivery.events)
        assert delivery.sent == ()
        after = full_state(net.core(address))
        assert changed(before, after) <= {RecordKey.session(sender)}
        assert net.core(address).group(group_id) == group_before


# ------------------------------------------------------------------ forged control messages


def test_random_bytes_in_place_of_a_change_are_refused(net: Network, group: bytes) -> None:
    before = states(net)
    for address in net.devices_of("bob") + net.devices_of("carol"):
        for payload in (b"", b"\x00" * 64, SeededRandom(b"junk").random_bytes(300)):
            for kind in (ENVELOPE_DIRECT, ENVELOPE_GROUP):
                delivery = net.receive(net.forge(A("alice"), address, kind, payload))
                [event] = delivery.events
                assert isinstance(event, Undecryptable) and delivery.sent == ()
    assert states(net) == before


def test_a_change_signed_by_a_member_who_is_no_admin_is_refused(net: Network, group: bytes) -> None:
    bob = net.core(A("bob"))
    mallory = net.core(A("mallory")).user_identity_public
    for action in (RemoveMember("carol"), AddMember("mallory", mallory), SetTitle("bob's")):
        control = signed(bob.account.identity, A("bob"), group, parent_of(net, group), action)
        content = GroupControl(control, None).encode()
        assert_refused_by_members(net, A("bob"), content, "UNAUTHORIZED_CHANGE", group)


def test_a_change_signed_with_a_key_its_author_device_does_not_have_is_refused(
    net: Network, group: bytes
) -> None:
    # Bob claims alice's change as its author's device would; relay-made keys alike.
    forger = IdentityKeyPair.generate(SeededRandom(b"forger"))
    for key, author in ((forger, A("bob")), (net.core(A("bob")).account.identity, A("bob"))):
        control = signed(key, author, group, parent_of(net, group), RemoveMember("carol"))
        # Bob's device key is bob's, but bob is no admin.
        reason = "BAD_SIGNATURE" if key is forger else "UNAUTHORIZED_CHANGE"
        assert_refused_by_members(
            net, A("bob"), GroupControl(control, None).encode(), reason, group
        )
    # A control naming a device the author's list does not hold (sent by a listed one).
    control = signed(forger, A("alice", 7), group, parent_of(net, group), RemoveMember("carol"))
    assert_refused_by_members(
        net, A("alice"), GroupControl(control, None).encode(), "UNAUTHORIZED_CHANGE", group
    )


def test_a_device_unlinked_from_the_admin_can_no_longer_change_the_group(
    net: Network, group: bytes
) -> None:
    net.unlink_device("alice", 2)
    old = net.core(A("alice", 2))
    # It still holds the group and its key; its changes come from an unknown device.
    parent = parent_of(net, group)
    control = signed(old.account.identity, A("alice", 2), group, parent, RemoveMember("bob"))
    content = GroupControl(control, None).encode()
    for address in net.devices_of("bob") + net.devices_of("carol"):
        before = full_state(net.core(address))
        delivery = net.receive(net.inject_content(A("alice", 2), address, content))
        assert delivery.events == (Undecryptable(A("alice", 2), "UNKNOWN_DEVICE"),)
        assert full_state(net.core(address)) == before


def test_a_ghost_member_added_by_a_non_member_is_refused(net: Network, group: bytes) -> None:
    mallory = net.core(A("mallory"))
    ghost = IdentityKeyPair.generate(SeededRandom(b"ghost")).public.ed25519
    control = signed(
        mallory.account.identity,
        A("mallory"),
        group,
        parent_of(net, group),
        AddMember("ghost", ghost),
    )
    assert_refused_by_members(
        net, A("mallory"), GroupControl(control, None).encode(), "UNAUTHORIZED_CHANGE", group
    )
    # Nor as a welcome: to a member (who applies only its change) or to an outsider.
    welcome = Welcome(ControlMessage.decode(control), (net.core(A("alice")).group(group),))
    content = GroupControl(control, welcome.encode()).encode()
    assert_refused_by_members(net, A("mallory"), content, "UNAUTHORIZED_CHANGE", group)
    # A removed member who kept the group's state cannot either.
    net.remove_member(A("alice"), group, "dave")
    net.take(label=CONTROL, recipient=A("dave"))
    net.deliver_all()
    dave = net.core(A("dave"))
    assert group in dave.group_ids  # it never learned
    stale = dave.group(group)
    parent = (stale.epoch, stale.state_hash)
    control = signed(dave.account.identity, A("dave"), group, parent, AddMember("ghost", ghost))
    content = GroupControl(control, None).encode()
    for address in net.devices_of("bob") + net.devices_of("carol"):
        before = net.core(address).group(group)
        delivery = net.receive(net.inject_content(A("dave"), address, content))
        # Built on the state before its removal: refused as no admin's, or by the fork rule.
        [event] = delivery.events
        assert isinstance(event, Undecryptable)
        assert event.reason in ("UNAUTHORIZED_CHANGE", "STALE_CHANGE")
        assert net.core(address).group(group) == before
    envelopes = net.send_group(A("carol", 2), group, b"who is here?")
    assert {e.recipient.user_id for e in envelopes} == {"alice", "bob", "carol"}


def test_a_stranger_cannot_push_a_members_held_change_out(net: Network, group: bytes) -> None:
    """The relay delivers alice's second change to bob before her first, so bob holds it;
    mallory, who shares no group with bob, then sends him MAX_HELD_GROUP_CONTROLS changes
    for made-up groups (held too: their welcomes could be on their way). Bob still holds
    alice's change, and applies it once the first arrives: he ends in alice's state.
    Before, the oldest held change went first, alice's: bob stayed one change behind."""
    net.change_group(A("alice"), group, SetTitle("one"))
    first = net.take(label=CONTROL, recipient=A("bob"))
    assert len(first) == 1
    net.deliver_all()
    net.change_group(A("alice"), group, SetTitle("two"))
    net.deliver_all()
    mallory = net.core(A("mallory"))
    made_up = SeededRandom(b"made-up groups")
    for _ in range(MAX_HELD_GROUP_CONTROLS):
        control = signed(
            mallory.account.identity,
            A("mallory"),
            made_up.random_bytes(16),
            (1, bytes(32)),
            SetTitle("mallory's"),
        )
        content = GroupControl(control, None).encode()
        assert net.receive(net.inject_content(A("mallory"), A("bob"), content)).events == ()
    net.receive(first[0])
    net.deliver_all()
    assert net.core(A("bob")).group(group) == net.core(A("alice")).group(group)
    assert net.core(A("bob")).group(group).title == "two"


def test_a_welcome_for_another_change_is_refused(net: Network, group: bytes) -> None:
    # Mallory makes her own group with erin, and files it under a group id erin is
    # about to join: erin would take mallory's members for alice's group.
    net.add_user("erin", 1)
    mallory, erin = net.core(A("mallory")), net.core(A("erin"))
    net.send_direct(A("mallory"), "erin", b"hi")
    net.deliver_all()
    hers = ControlMessage.sign(
        mallory.account.identity,
        group_id=b"m" * 16,
        parent_epoch=0,
        parent_hash=GENESIS_PARENT_HASH,
        author_user_id="mallory",
        author_device_id=1,
        action=CreateGroup("mallory's", (AddMember("erin", erin.user_identity_public),)),
    )
    genesis = (0, GENESIS_PARENT_HASH)
    claim = signed(mallory.account.identity, A("mallory"), group, genesis, CreateGroup("x", ()))
    content = GroupControl(claim, Welcome(hers, ()).encode()).encode()
    before = full_state(erin)
    delivery = net.receive(net.inject_content(A("mallory"), A("erin"), content))
    assert delivery.events == (Undecryptable(A("mallory"), "UNAUTHORIZED_CHANGE"),)
    assert group not in net.core(A("erin")).group_ids
    assert changed(before, full_state(net.core(A("erin")))) <= {RecordKey.session(A("mallory"))}
    # Alice's real welcome then works.
    net.add_member(A("alice"), group, "erin")
    net.deliver_all()
    assert net.core(A("erin")).group(group) == net.core(A("alice")).group(group)


def test_a_replayed_change_changes_nothing(net: Network, group: bytes) -> None:
    net.remove_member(A("alice"), group, "dave")
    deliveries = net.deliver_all()
    before = states(net)
    # The relay replays the envelopes: duplicates at the session layer.
    for delivery in deliveries:
        again = net.receive(delivery.envelope)
        assert again.outcome == Outcome()
    assert states(net) == before
    # Alice's device sends the old change again in a fresh message: already applied.
    create = net.core(A("bob")).group(group)
    for address in net.devices_of("bob") + net.devices_of("carol"):
        content = GroupControl(
            signed(
                net.core(A("alice")).account.identity,
                A("alice"),
                group,
                (create.epoch - 1, create.prev_hash),
                RemoveMember("dave"),
            ),
            None,
        ).encode()
        state_before = full_state(net.core(address))
        delivery = net.receive(net.inject_content(A("alice"), address, content))
        assert delivery.outcome == Outcome()
        assert changed(state_before, full_state(net.core(address))) <= {
            RecordKey.session(A("alice"))
        }
    # The removed member's devices never get the group back from a replay.
    dave = [d.envelope for d in deliveries if d.envelope.recipient == A("dave")]
    assert net.receive(dave[0]).outcome == Outcome()
    assert group not in net.core(A("dave")).group_ids


def test_a_change_not_sent_by_its_author_is_refused(net: Network, group: bytes) -> None:
    net.remove_member(A("alice"), group, "dave")
    [to_carol] = net.take(label=CONTROL, recipient=A("carol"))
    carol = net.core(A("carol"))
    before = full_state(carol)
    # The relay stamps bob as the sender of alice's change: it does not decrypt.
    delivery = net.receive(net.restamp(to_carol, A("bob")))
    [event] = delivery.events
    assert isinstance(event, Undecryptable) and event.sender == A("bob")
    assert full_state(carol) == before
    # Bob forwards alice's genuine, signed change himself: refused.
    [to_bob] = net.take(label=CONTROL, recipient=A("bob"))
    net.receive(to_bob)
    control = ControlMessage.sign(
        net.core(A("alice")).account.identity,
        group_id=group,
        parent_epoch=0,
        parent_hash=carol.group(group).state_hash,
        author_user_id="alice",
        author_device_id=1,
        action=RemoveMember("dave"),
    )
    forwarded = net.inject_content(
        A("bob"), A("carol"), GroupControl(control.encode(), None).encode()
    )
    delivery = net.receive(forwarded)
    assert delivery.events == (Undecryptable(A("bob"), "UNAUTHORIZED_CHANGE"),)
    assert carol.group(group).epoch == 0
    # The genuine envelope still applies.
    delivery = net.receive(to_carol)
    assert delivery.events == (GroupUpdated(group, A("alice"), (MemberRemoved("dave"),)),)


# ------------------------------------------------------------------ removed members


def test_a_removed_member_with_its_old_sender_keys_reads_nothing_sent_after(
    net: Network, group: bytes
) -> None:
    """Dave, removed, kept every record he held (a client that forgets nothing), and the
    relay hands him copies of the group's messages: bob rotated his sender key when dave
    left, so dave's copy of bob's chain opens none of them (spec 9.4, Removed members)."""
    kept = net.stores[A("dave")][RecordKey.inbound(group, A("bob"))]
    net.remove_member(A("alice"), group, "dave")
    net.deliver_all()
    envelopes = net.send_group(A("bob"), group, b"now that dave is gone")
    assert all(e.recipient.user_id != "dave" for e in envelopes)
    copy = next(e.payload for e in envelopes if e.label == GROUP)
    record = SenderKeyRecord.from_bytes(kept)
    with pytest.raises(RemoteProtocolError) as refused:
        record.decrypt(copy, sender=A("bob"))
    assert refused.value.code == "NO_SENDER_KEY"


def test_a_removed_member_cannot_go_on_writing_to_the_group(net: Network, group: bytes) -> None:
    """Dave, removed, signs new group messages on the chain the members hold from him,
    and the relay delivers them: nobody shows them (spec 9.4, Removed members)."""
    kept = unpack(net.stores[A("dave")][RecordKey.outbound(group)], what="test")
    state = net.core(A("alice")).group(group)
    net.remove_member(A("alice"), group, "dave")
    net.deliver_all()
    chain = OutboundSenderKey.from_bytes(kept[1])
    text = GroupText(b"\x09" * 16, net.now, b"dave still here", state.epoch, state.state_hash)
    payload = chain.encrypt(text.encode(), sender=A("dave"))
    for address in sorted(net.devices):
        if address.user_id in ("alice", "bob", "carol"):
            before = full_state(net.core(address))
            delivery = net.receive(net.forge(A("dave"), address, ENVELOPE_GROUP, payload))
            assert not any(isinstance(e, MessageReceived) for e in delivery.events)
            [refusal] = delivery.events
            assert isinstance(refusal, Undecryptable) and refusal.sender == A("dave")
            assert full_state(net.core(address)) == before


def test_an_unlinked_device_with_its_old_sender_keys_reads_nothing_sent_after(
    net: Network, group: bytes
) -> None:
    """Carol unlinks carol.2, which kept every record it held, and the relay hands it
    copies of the group's messages: bob rotated his sender key when the list that removes
    carol.2 reached him, so its copy of bob's chain opens none of them (spec 11.2: a
    removed device's sender keys are rotated before their next use)."""
    kept = net.stores[A("carol", 2)][RecordKey.inbound(group, A("bob"))]
    record = SenderKeyRecord.from_bytes(kept)
    before = net.send_group(A("bob"), group, b"carol.2 still reads this")
    copy = next(e.payload for e in before if e.label == GROUP and e.recipient == A("carol", 2))
    assert b"carol.2 still reads this" in record.decrypt(copy, sender=A("bob"))
    net.in_flight.clear()
    net.unlink_device("carol", 2)
    envelopes = net.send_group(A("bob"), group, b"now that carol.2 is gone")
    assert all(e.recipient != A("carol", 2) for e in envelopes)
    copy = next(e.payload for e in envelopes if e.label == GROUP)
    record = SenderKeyRecord.from_bytes(kept)
    with pytest.raises(RemoteProtocolError) as refused:
        record.decrypt(copy, sender=A("bob"))
    assert refused.value.code == "NO_SENDER_KEY"


@pytest.mark.parametrize("limit", ["age", "messages"])
def test_a_stolen_sender_chain_key_reads_no_message_past_the_rotation_limits(
    net: Network, group: bytes, limit: str
) -> None:
    """An attacker who copied bob's record of alice's chain (a seized phone, a backup), and
    gets every later group message from the relay, reads alice's messages only until she
    rotates: after SENDER_KEY_MAX_AGE or SENDER_KEY_MAX_MESSAGES (spec 9.3)."""
    stolen = SenderKeyRecord.from_bytes(net.stores[A("bob")][RecordKey.inbound(group, A("alice"))])
    if limit == "age":
        net.now += SENDER_KEY_MAX_AGE
    else:
        for n in range(SENDER_KEY_MAX_MESSAGES - 1):  # "hello" was the first
            net.send_group(A("alice"), group, b"%d" % n)
        net.in_flight.clear()
    envelopes = net.send_group(A("alice"), group, b"after the rotation")
    copy = next(e.payload for e in envelopes if e.label == GROUP)
    with pytest.raises(RemoteProtocolError) as refused:
        stolen.decrypt(copy, sender=A("alice"))
    assert refused.value.code == "NO_SENDER_KEY"


# ------------------------------------------------------------------ swapped senders


@pytest.mark.parametrize("first", [True, False], ids=["prekey message", "ratchet message"])
def test_a_swapped_sender_on_a_direct_message_is_detected(
    net: Network, group: bytes, first: bool
) -> None:
    net.add_user("erin", 2)
    if not first:
        net.send_direct(A("erin"), "bob", b"warm up")
        net.send_direct(A("bob"), "erin", b"warm up")
        net.deliver_all()
    [envelope] = [e for e in net.send_direct(A("erin"), "bob", b"secret") if e.label == TEXT]
    net.in_flight.remove(envelope)
    bob = net.core(A("bob"))
    before = full_state(bob)
    for impostor in (A("erin", 2), A("alice"), A("mallory"), A("nobody")):
        delivery = net.receive(net.restamp(envelope, impostor))
        [event] = delivery.events
        assert isinstance(event, Undecryptable) and event.sender == impostor
        assert full_state(bob) == before
    assert net.receive(envelope).events == (envelope.received(),)


def test_an_initial_message_the_relay_makes_up_under_another_user_is_refused(
    net: Network, group: bytes
) -> None:
    """A hostile relay writes to bob as erin, whom bob has never talked to.

    Everything the relay needs is public: bob's bundle, and erin's user id,
    device id and user identity (her device list) for the associated data.
    It signs the handshake with a device key of its own, which erin's list
    does not name, so bob refuses it (02-pqxdh.md section 2.8).
    """
    net.add_user("erin", 1)
    erin_identity = SignedDeviceList.decode(net.device_lists["erin"]).device_list.user_identity
    bob_identity = SignedDeviceList.decode(net.device_lists["bob"]).device_list.user_identity
    relay_device = Account.create(now=net.now, one_time_prekeys=0, rng=SeededRandom(b"relay"))
    session = relay_device.create_outbound_session(
        PreKeyBundle.decode(net.bundle(A("bob"))),
        local=Party("erin", 1, erin_identity),
        remote=Party("bob", 1, bob_identity),
        now=net.now,
        rng=SeededRandom(b"relay"),
    )
    text = Text(b"\x07" * 16, net.now, b"send the money to the relay").encode()
    forged = net.forge(A("erin"), A("bob"), ENVELOPE_DIRECT, session.encrypt(text))
    bob = net.core(A("bob"))
    before = full_state(bob)
    delivery = net.receive(forged)
    assert delivery.events == (Undecryptable(A("erin"), "UNTRUSTED_IDENTITY"),)
    assert delivery.sent == ()
    assert full_state(net.core(A("bob"))) == before


def test_a_relay_cannot_downgrade_a_new_session_to_x3dh(net: Network, group: bytes) -> None:
    """A hostile relay strips the ML-KEM prekey from a bundle, or the KEM fields from an
    initial message, to leave only the classical X3DH secret (spec 9.4, Downgrade)."""
    net.add_user("erin", 1)
    erin = net.core(A("erin"))
    bundle = PreKeyBundle.decode(net.bundle(A("bob")))
    assert bundle.kem_prekey is not None
    without_kem = replace(bundle, kem_prekey=None, kem_is_last_resort=False).encode()
    before = full_state(erin)
    with pytest.raises(InvalidArgument):
        erin.process_bundle(without_kem, now=net.tick())
    assert full_state(erin) == before
    # Erin's own initial message, its KEM ciphertext taken out on the way to bob.
    [envelope] = [e for e in net.send_direct(A("erin"), "bob", b"secret") if e.label == TEXT]
    net.in_flight.remove(envelope)
    initial = decode_message(envelope.payload)
    assert isinstance(initial, PreKeyMessage) and initial.handshake.is_post_quantum
    classical = replace(initial.handshake, kem_prekey_id=None, kem_ciphertext=None)
    stripped = replace(envelope, payload=PreKeyMessage(classical, initial.message).encode())
    bob = net.core(A("bob"))
    before = full_state(bob)
    assert net.receive(stripped).events == (Undecryptable(A("erin"), "BAD_MAC"),)
    assert full_state(net.core(A("bob"))) == before
    assert net.receive(envelope).events == (envelope.received(),)


def test_a_contact_cannot_pass_a_message_off_as_sent_by_the_users_own_device(
    net: Network, group: bytes
) -> None:
    """A hostile contact sends bob a copy of a message "bob sent from another device"."""
    copy = SentCopy("carol", None, b"\x08" * 16, net.now, b"I resign").encode()
    bob = net.core(A("bob"))
    before = full_state(bob)
    delivery = net.receive(net.inject_content(A("mallory"), A("bob"), copy))
    assert delivery.events == (Undecryptable(A("mallory"), "UNAUTHORIZED_CHANGE"),)
    assert delivery.sent == ()
    assert changed(before, full_state(net.core(A("bob")))) <= {RecordKey.session(A("mallory"))}


def test_a_swapped_sender_on_a_group_message_is_detected(net: Network, group: bytes) -> None:
    for address in net.devices_of("alice") + net.devices_of("bob"):
        net.send_group(address, group, b"keys")
    net.deliver_all()
    envelopes = net.send_group(A("bob"), group, b"from bob")
    [envelope] = [e for e in envelopes if e.label == GROUP and e.recipient == A("carol", 2)]
    net.in_flight.remove(envelope)
    carol = net.core(A("carol", 2))
    expected = {
        A("alice"): "NO_SENDER_KEY",  # a member with its own chains: not this one
        A("alice", 2): "NO_SENDER_KEY",
        A("carol"): "NO_SENDER_KEY",
        A("mallory"): "NOT_A_MEMBER",
        A("nobody"): "UNKNOWN_DEVICE",
    }
    for impostor, reason in expected.items():
        inbound_before = inbound(full_state(carol))
        delivery = net.receive(net.restamp(envelope, impostor))
        [event] = delivery.events
        assert isinstance(event, Undecryptable) and (event.sender, event.reason) == (
            impostor,
            reason,
        )
        assert inbound(full_state(carol)) == inbound_before
        # A retry request goes to the impostor, who answers with its own key.
        for sent in delivery.sent:
            assert sent.label == RETRY and sent.recipient == impostor
            answer = net.deliver(sent)
            for key in answer.sent:
                assert key.label == RETRY_ANSWER
                assert net.deliver(key).events == ()
    assert net.receive(envelope).events == (envelope.received(),)
    net.deliver_all()


# ------------------------------------------------------------------ replays


def test_replayed_envelopes_never_reach_the_app_twice(net: Network, group: bytes) -> None:
    net.send_direct(A("alice", 2), "carol", b"direct")
    net.send_group(A("carol"), group, b"group")
    envelopes = [d.envelope for d in net.deliver_all()]
    labels = {e.label for e in envelopes}
    assert {TEXT, SKDM, GROUP, "copy"} <= labels
    before = states(net)
    for envelope in envelopes:
        assert net.receive(envelope).outcome == Outcome(), envelope
    assert states(net) == before
    # Nor after a reload from the stored records.
    for address in net.devices:
        net.reload(address)
    for envelope in envelopes:
        assert net.receive(envelope).outcome == Outcome(), envelope
    assert states(net) == before


@pytest.mark.parametrize(
    ("one_time_prekeys", "one_time_kem", "reason"),
    [(8, True, "UNKNOWN_PREKEY"), (8, False, "UNKNOWN_PREKEY"), (0, True, "REPLAYED_HANDSHAKE")],
    ids=[
        "one-time prekey spent",
        "one-time prekey spent, last-resort KEM prekey",
        "base key remembered",
    ],
)
def test_an_initial_message_replayed_after_its_session_was_archived_is_refused(
    rng: SeededRandom, one_time_prekeys: int, one_time_kem: bool, reason: str
) -> None:
    """A hostile relay keeps erin's first initial message and replays it once bob's record
    no longer holds that session (erin started over more than MAX_PREVIOUS_SESSIONS times):
    only the account's memory, the spent one-time prekey or the remembered base key, is
    left to refuse it (02-pqxdh.md section 2.5). With bob's one-time ML-KEM prekeys all
    handed out, the bundle pairs a one-time X25519 prekey with the last-resort ML-KEM
    prekey, which is never spent: the X25519 prekey's deletion alone refuses the replay."""
    net = Network(rng, one_time_prekeys=one_time_prekeys)
    net.add_user("erin")
    net.add_user("bob")
    if not one_time_kem:
        net.prekeys[A("bob")].kem.clear()
    [first] = [e for e in net.send_direct(A("erin"), "bob", b"first") if e.label == TEXT]
    net.deliver_all()
    for n in range(MAX_PREVIOUS_SESSIONS + 1):
        net.ensure_sessions(A("erin"), [A("bob")])
        net.send_direct(A("erin"), "bob", b"again %d" % n)
        net.deliver_all()
    assert net.events[A("bob")].count(first.received()) == 1
    before = full_state(net.core(A("bob")))
    delivery = net.receive(first)
    assert delivery.events == (Undecryptable(A("erin"), reason),)
    assert full_state(net.core(A("bob"))) == before


def test_replayed_retry_requests_and_answers_do_nothing_new(net: Network, group: bytes) -> None:
    net.remove_member(A("alice"), group, "dave")
    net.deliver_all()
    net.send_group(A("bob"), group, b"lost")  # a new sender key after the removal
    net.take(label=SKDM, recipient=A("carol", 2))
    retry_envelopes: list[Envelope] = []
    for delivery in net.deliver_all():
        retry_envelopes += [e for e in delivery.sent if e.label in (RETRY, RETRY_ANSWER)]
    assert [e.label for e in retry_envelopes] == [RETRY, RETRY_ANSWER]
    before = states(net)
    for envelope in retry_envelopes:
        assert net.receive(envelope).outcome == Outcome()
    assert states(net) == before


# ------------------------------------------------------------------ identities and bundles


def test_a_device_list_with_another_identity_is_held_until_confirmed(
    net: Network, group: bytes
) -> None:
    # The relay signs a list for "bob" with its own identity, naming its own device.
    fake = ClientCore.create_primary("bob", 1, now=net.now, rng=SeededRandom(b"relay"))
    own = fake.own_device_list
    assert own is not None
    alice = net.core(A("alice"))
    old_identity = alice.device_list("bob")
    assert old_identity is not None
    number = alice.safety_number("bob")
    outcome = alice.process_device_list(own.encode())
    assert outcome.events == (
        IdentityChanged("bob", old_identity.user_identity, fake.user_identity_public),
    )
    net.persist(A("alice"))
    state = full_state(alice)
    # Nothing from the new identity is used: not its bundle, not its messages.
    with pytest.raises(UntrustedIdentity):
        alice.process_bundle(fake.account.bundle("bob", 1).encode(), now=net.now)
    fake.process_device_list(net.device_lists["alice"])
    # The app can show the pending change, and the number to compare before confirming.
    assert alice.pending_identity("bob") == outcome.events[0]
    assert alice.safety_number("bob", pending=True) == SafetyNumber.compute(
        "alice", alice.user_identity_public, "bob", fake.user_identity_public
    )
    assert alice.safety_number("bob", pending=True).digits == fake.safety_number("alice").digits
    for address in net.devices_of("alice"):
        fake.process_bundle(net.bundle(address), now=net.now)
    _, sends = fake.send_direct("alice", b"it's me, bob", now=net.now)
    for send in sends:
        for device_id, payload in send.payloads:
            if device_id == 1 and send.recipient_user == "alice":
                result = alice.receive(A("bob"), ENVELOPE_DIRECT, payload, now=net.now)
                assert result.events == (Undecryptable(A("bob"), "UNTRUSTED_IDENTITY"),)
    assert full_state(alice) == state
    assert alice.safety_number("bob") == number
    # The real bob still talks to alice, one to one and in the group.
    net.send_direct(A("bob"), "alice", b"still me")
    net.send_group(A("alice"), group, b"to the real bob")
    got = {d.envelope.recipient: d.events for d in net.deliver_all()}
    assert any(isinstance(e, MessageReceived) and e.body == b"still me" for e in got[A("alice")])
    assert any(isinstance(e, MessageReceived) for e in got[A("bob")])
    # Confirmed, the new identity replaces the old: sessions with the old bob are gone.
    alice.confirm_identity("bob")
    assert alice.pending_identity("bob") is None
    assert alice.devices_without_session(["bob"], now=net.now) == [A("bob")]
    assert alice.safety_number("bob") != number
    alice.process_bundle(fake.account.bundle("bob", 1).encode(), now=net.now)


def test_a_bundle_with_another_identity_than_the_device_list_is_refused(
    net: Network, group: bytes
) -> None:
    net.add_user("erin", 1)
    alice = net.core(A("alice"))
    before = full_state(alice)
    # Mallory's keys (validly signed by mallory) relabelled as erin's device.
    mallory = PreKeyBundle.decode(net.bundle(A("mallory")))
    relabelled = PreKeyBundle(
        "erin",
        1,
        mallory.identity,
        mallory.signed_prekey,
        mallory.one_time_prekey,
        mallory.kem_prekey,
        mallory.kem_is_last_resort,
    )
    with pytest.raises(UntrustedIdentity):
        alice.process_bundle(relabelled.encode(), now=net.now)
    assert full_state(alice) == before and alice.take_changes() == {}
    # Erin's real bundle works.
    alice.process_bundle(net.bundle(A("erin")), now=net.now)


def test_stale_and_forged_device_lists_change_nothing(net: Network, group: bytes) -> None:
    old_bob = net.device_lists["bob"]
    net.link_device("bob", 2)
    before = states(net)
    # The relay replays bob's old list (to resurrect a removed device, say): ignored.
    for address, outcome in net.push_device_list(old_bob, net.devices).items():
        assert outcome == Outcome(), address
    # A list for bob signed by the relay's key under bob's identity: bad signature.
    relay_key = IdentityKeyPair.generate(SeededRandom(b"relay key"))
    bob_list = net.core(A("bob")).device_list("bob")
    assert bob_list is not None
    forged = DeviceList(
        "bob",
        bob_list.user_identity,
        bob_list.counter + 1,
        (*bob_list.devices, DeviceEntry.prove(relay_key, "bob", 9, bob_list.user_identity)),
    )
    from hushchat.protocol.devices import SignedDeviceList

    body = forged.encode_body()
    fake = SignedDeviceList(body, relay_key.sign(body), forged).encode()
    for address in net.devices:
        with pytest.raises(BadSignature):
            net.core(address).process_device_list(fake)
    # A list for a user's own account under another identity: refused outright.
    stranger = ClientCore.create_primary("carol", 1, now=net.now, rng=SeededRandom(b"x"))
    own = stranger.own_device_list
    assert own is not None
    with pytest.raises(UntrustedIdentity):
        net.core(A("carol", 2)).process_device_list(own.encode())
    assert states(net) == before


def test_a_member_whose_identity_changed_is_out_of_the_group_until_added_again(
    net: Network, group: bytes
) -> None:
    new_bob = net.reinstall("bob")
    alice = net.core(A("alice"))
    assert isinstance(net.events[A("carol")][-1], IdentityChanged)
    # Alice accepts bob's new identity for one-to-one messages...
    alice.confirm_identity("bob")
    net.persist(A("alice"))
    net.send_direct(A("alice"), "bob", b"welcome back, bob")
    assert received_bodies(net.deliver_all(), A("bob")) == [b"welcome back, bob"]
    # ...but the group still records the old one: no key and no message for the new device.
    envelopes = net.send_group(A("alice"), group, b"not for the new bob")
    assert all(e.recipient.user_id != "bob" for e in envelopes)
    net.deliver_all()
    # Nor is the new device's sender key kept, nor its group message taken as bob's.
    key = OutboundSenderKey.create(group, net.now, SeededRandom(b"new bob key"))
    skdm = SenderKey(key.distribution_message(sender=A("bob"))).encode()
    delivery = net.receive(net.inject_content(A("bob"), A("alice"), skdm))
    assert delivery.events == (Undecryptable(A("bob"), "NOT_A_MEMBER", group),)
    assert RecordKey.inbound(group, A("bob")) not in full_state(alice)
    state = alice.group(group)
    text = GroupText(b"\x03" * 16, net.now, b"it's bob", state.epoch, state.state_hash).encode()
    payload = key.encrypt(text, sender=A("bob"))
    outcome = alice.receive(A("bob"), ENVELOPE_GROUP, payload, now=net.tick())
    assert outcome.events == (Undecryptable(A("bob"), "NOT_A_MEMBER", group),)
    # The admin adds the new identity (removing the old first): bob is back.
    net.remove_member(A("alice"), group, "bob")
    net.add_member(A("alice"), group, "bob")
    net.deliver_all()
    member = alice.group(group).member("bob")
    assert member is not None and member.user_identity == new_bob.user_identity_public
    assert net.core(A("bob")).group(group) == alice.group(group)
    envelopes = net.send_group(A("alice"), group, b"for the new bob")
    assert A("bob") in {e.recipient for e in envelopes}
    # Carol, who has not confirmed the new identity yet, leaves bob out until she does.
    carol_envelopes = net.send_group(A("carol"), group, b"carol's")
    assert all(e.recipient.user_id != "bob" for e in carol_envelopes)
    deliveries = net.deliver_all()
    assert received_bodies(deliveries, A("bob")) == [b"for the new bob"]
    net.core(A("carol")).confirm_identity("bob")
    net.persist(A("carol"))
    carol_envelopes = net.send_group(A("carol"), group, b"now you too")
    assert A("bob") in {e.recipient for e in carol_envelopes}
    assert received_bodies(net.deliver_all(), A("bob")) == [b"now you too"]


def received_bodies(deliveries: list[Delivery], address: Address) -> list[bytes]:
    return [
        e.body
        for d in deliveries
        if d.envelope.recipient == address
        for e in d.events
        if isinstance(e, MessageReceived)
    ]


def test_group_sync_is_taken_from_our_own_devices_only(net: Network, group: bytes) -> None:
    net.add_user("erin", 1)
    alice_state = net.core(A("alice")).group(group)
    snapshots = tuple(s.encode() for s in (alice_state,))
    erin = net.core(A("erin"))
    # Mallory (another user) offers erin a group, or asks for erin's groups.
    for content, reason in (
        (GroupSync(snapshots).encode(), "UNAUTHORIZED_CHANGE"),
        (SyncRequest().encode(), "UNAUTHORIZED_CHANGE"),
    ):
        before = full_state(erin)
        delivery = net.receive(net.inject_content(A("mallory"), A("erin"), content))
        assert delivery.events == (Undecryptable(A("mallory"), reason),) and delivery.sent == ()
        erin = net.core(A("erin"))
        assert changed(before, full_state(erin)) <= {
            RecordKey.session(A("mallory")),
            RecordKey.ACCOUNT,
        }
    # Even from its own device, a group without its user is not taken, nor a broken chain.
    net.link_device("erin", 2)
    net.persist(A("erin"))
    before = full_state(net.core(A("erin", 2)))
    delivery = net.receive(
        net.inject_content(A("erin"), A("erin", 2), GroupSync(snapshots).encode())
    )
    assert delivery.events == ()
    broken = GroupSync((snapshots[0], snapshots[0])).encode()
    delivery = net.receive(net.inject_content(A("erin"), A("erin", 2), broken))
    assert delivery.events == (Undecryptable(A("erin"), "MALFORMED"),)
    assert group not in net.core(A("erin", 2)).group_ids
    after = full_state(net.core(A("erin", 2)))
    assert changed(before, after) <= {RecordKey.session(A("erin")), RecordKey.ACCOUNT}
