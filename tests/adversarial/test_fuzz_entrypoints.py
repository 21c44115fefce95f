"""Every decrypt entry point and decoder a peer or a relay can reach, under hypothesis.

Each target takes one byte string (random, or a mutation of a valid
encoding: bit flips, truncations, extensions, insertions, deletions, magic
bytes) and checks what the code promises for any input:

* wire decoders and decrypts raise nothing but RemoteProtocolError (the
  client's view of a relay frame included: the ERROR frame's detail is
  rebuilt into its RelayError), state loaders nothing but StateError, and
  the relay's request decoder and ``ClientCore.receive`` raise nothing at all;
* a refused input leaves the state it was given byte for byte unchanged
  (session record and account, sender-key record, group, the whole client
  core; for content inside a working session, everything but that session;
  for a first list, the list not kept either);
* whatever decodes re-encodes to the same bytes (one encoding per value).

Targets beyond test_decoder_fuzz.py: SessionRecord.decrypt (ratchet
and initial messages), SenderKeyRecord.decrypt, ClientCore.receive (direct,
initial, group, and arbitrary content inside a real session, from another
user and from an own device; an initial message read with a first list
fetched for it, either of them the input), ControlMessage + Group.apply,
Welcome + Group.join, SignedDeviceList.decode, the group, sender-key and content
decoders, decode_relay_frame (+ relay_error_from_wire), decode_request,
FrameDecoder, the client store's inbox and outbox rows (and the first
client's unversioned rows its migration reads) and the pickles (sender-key
records, outbound sender keys, groups, peers' claimed group states, a whole
ClientCore).

The default run checks a few dozen inputs per target; ``pytest -m fuzz``
checks the budget of tests/support/fuzzing.py per target and counts them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hushchat.protocol import client_core as core
from hushchat.protocol.account import Account
from hushchat.protocol.client_core import (
    ENVELOPE_DIRECT,
    ENVELOPE_GROUP,
    Address,
    ClientCore,
    Outcome,
    RecordKey,
    RecordKind,
    Undecryptable,
)
from hushchat.protocol.content import (
    GroupControl,
    GroupSync,
    GroupText,
    RetryRequest,
    SenderKey,
    SentCopy,
    SyncRequest,
    Text,
    decode_content,
)
from hushchat.protocol.devices import SignedDeviceList
from hushchat.protocol.errors import ProtocolError, RemoteProtocolError, StateError
from hushchat.protocol.group import (
    AddMember,
    ControlMessage,
    Group,
    GroupState,
    MemberRemoved,
    RemoveMember,
    SetAdmin,
    SetTitle,
    StateRelation,
    Welcome,
    create_group,
)
from hushchat.protocol.group_cipher import OutboundSenderKey, SenderKeyRecord
from hushchat.protocol.pqxdh import Party
from hushchat.protocol.primitives import SeededRandom
from hushchat.protocol.sender_keys import SenderKeyDistributionMessage, SenderKeyMessage
from hushchat.protocol.session import SessionRecord
from hushchat.protocol.split_detection import PeerClaims, StateClaim
from hushchat.transport.client import rows
from hushchat.transport.wire.errors import FrameTooLarge, RelayError, relay_error_from_wire
from hushchat.transport.wire.frames import (
    BadRequest,
    ErrorFrame,
    Hello,
    decode_relay_frame,
    decode_request,
    encode_body,
)
from hushchat.transport.wire.framing import FrameDecoder, encode_frame
from hushchat.transport.wire.limits import RELAY_PROTOCOL_VERSION
from hushchat.transport.wire.records import Envelope
from tests.support.client_rows import ROWS as FIRST_CLIENT_ROWS
from tests.support.clock import NOW
from tests.support.fuzzing import CHECKED, FUZZ_EXAMPLES, budget, inputs
from tests.support.harness import A, Network, full_state
from tests.support.wire_samples import ERRORS, RELAY_FRAMES, REQUESTS

DEFAULT_EXAMPLES = 25
# When the inputs are made and received: after everything the world made (its
# network starts at NOW and ticks a second a call), as real traffic would be.
AFTER_WORLD = NOW + 100_000


ALICE, BOB, BOB2, ERIN = A("alice"), A("bob"), A("bob", 2), A("erin")


# ------------------------------------------------------------------ the world the inputs hit


@dataclass
class World:
    """Bob's device 1 at one moment, the inputs in flight to it, and their origins."""

    bob_records: dict[RecordKey, bytes]
    group_id: bytes
    directory: dict[str, SignedDeviceList]
    direct: list[bytes]  # from alice, undelivered, RatchetMessages
    initial: list[bytes]  # from erin, undelivered, PreKeyMessages
    group: list[bytes]  # from alice, undelivered, SenderKeyMessages
    contents: list[bytes]  # plaintexts of every content kind
    sessions_to_bob: dict[Address, bytes]  # alice's and bob.2's session records with bob
    controls: list[bytes]  # ControlMessages bob's group state would accept
    welcomes: list[bytes]  # for dave: a create and an add
    dave_identity: bytes
    parties: dict[Address, Party]  # whose each device is, as sessions bind it


@functools.cache
def world() -> World:
    net = Network(SeededRandom(b"fuzz entry points"), one_time_prekeys=4, check_persistence=False)
    for user_id, devices in (("alice", 1), ("bob", 2), ("carol", 1), ("dave", 1), ("erin", 1)):
        net.add_user(user_id, devices)
    group_id, _ = net.create_group(ALICE, "fuzz", ["bob", "carol"])
    net.deliver_all()
    net.send_group(ALICE, group_id, b"warm up")
    net.send_direct(BOB, "alice", b"hi alice")  # also a SentCopy: bob.2 -> bob.1 session
    net.send_direct(BOB2, "alice", b"from the desktop")
    net.send_direct(ALICE, "bob", b"hi bob")
    net.deliver_all()
    bob_records = dict(net.stores[BOB])

    net.send_direct(ALICE, "bob", b"d1")
    net.send_direct(ALICE, "bob", b"d2")
    net.send_direct(ERIN, "bob", b"hello from erin")
    net.send_group(ALICE, group_id, b"g1")
    net.send_group(ALICE, group_id, b"g2")
    to_bob = net.take(recipient=BOB)
    direct = [e.payload for e in to_bob if e.kind == ENVELOPE_DIRECT and e.sender == ALICE]
    initial = [e.payload for e in to_bob if e.sender == ERIN]
    group = [e.payload for e in to_bob if e.kind == ENVELOPE_GROUP]
    assert direct and initial and group

    directory = {
        user_id: SignedDeviceList.decode(data) for user_id, data in net.device_lists.items()
    }
    alice_key = net.core(ALICE).account.identity
    held = Group.from_bytes(bob_records[RecordKey.group(group_id)])
    dave_identity = net.primaries["dave"].user_identity_public
    add_dave = held.propose(
        AddMember("dave", dave_identity),
        author_user_id="alice",
        author_device_id=1,
        device_key=alice_key,
    )
    controls = [
        add_dave,
        *(
            held.propose(action, author_user_id="alice", author_device_id=1, device_key=alice_key)
            for action in (RemoveMember("carol"), SetTitle("renamed"), SetAdmin("bob", True))
        ),
    ]
    create = create_group(
        title="for dave",
        members=[AddMember("dave", dave_identity)],
        author_user_id="alice",
        author_device_id=1,
        device_key=alice_key,
        rng=SeededRandom(b"fuzz create"),
    )
    add_welcome = held.apply(add_dave, directory).group.welcome(add_dave)

    skdm = OutboundSenderKey.create(group_id, now=AFTER_WORLD, rng=SeededRandom(b"fuzz skdm"))
    snapshot = held.current.encode()
    contents = [
        Text(b"\x01" * 16, AFTER_WORLD, b"text body").encode(),
        SenderKey(skdm.distribution_message(sender=ALICE)).encode(),
        GroupControl(add_dave.encode(), None).encode(),
        GroupControl(add_welcome.message.encode(), add_welcome.encode()).encode(),
        RetryRequest(group_id, 7).encode(),
        SentCopy("carol", None, b"\x02" * 16, AFTER_WORLD, b"copy").encode(),
        SentCopy(None, group_id, b"\x03" * 16, AFTER_WORLD, b"copy").encode(),
        SyncRequest().encode(),
        GroupSync((snapshot,)).encode(),
    ]
    sessions_to_bob = {
        sender: net.stores[sender][RecordKey.session(A("bob"))] for sender in (ALICE, BOB2)
    }
    assert net.now < AFTER_WORLD
    return World(
        bob_records=bob_records,
        group_id=group_id,
        directory=directory,
        direct=direct,
        initial=initial,
        group=group,
        contents=contents,
        sessions_to_bob=sessions_to_bob,
        controls=[c.encode() for c in controls],
        welcomes=[Welcome(create, ()).encode(), add_welcome.encode()],
        dave_identity=dave_identity,
        parties={address: core.party for address, core in net.devices.items()},
    )


# ------------------------------------------------------------------ targets
# A check takes one input and returns whether it was accepted (False: refused
# in the way the target promises); anything else it raises is a failure.

Check = Callable[[bytes], bool]


def refused_unchanged(state: Callable[[], bytes], run: Callable[[], object]) -> bool:
    """Run; False if refused (RemoteProtocolError) with ``state()`` unchanged, else True."""
    before = state()
    try:
        run()
    except RemoteProtocolError:
        assert state() == before, "a refused input changed state"
        return False
    return True


def refused_outcome(outcome: Outcome) -> bool:
    """Reported as undecryptable, and nothing else (a duplicate or an SKDM gives no event)."""
    events = outcome.events
    return bool(events) and not outcome.sends and all(isinstance(e, Undecryptable) for e in events)


class SessionTarget:
    """Bob's record of alice (or an empty one, for erin) and his account; restored after a
    success."""

    def __init__(self, record_key: RecordKey | None) -> None:
        self.record_key = record_key
        self.peer = ALICE if record_key is not None else ERIN
        self.reset()

    def reset(self) -> None:
        records = world().bob_records
        self.record = (
            SessionRecord()
            if self.record_key is None
            else SessionRecord.from_bytes(records[self.record_key])
        )
        self.account = Account.from_bytes(records[RecordKey.ACCOUNT])

    def state(self) -> bytes:
        return self.record.to_bytes() + self.account.to_bytes()

    def check(self, data: bytes) -> bool:
        def run() -> object:
            parties = world().parties
            return self.record.decrypt(
                data,
                self.account,
                local=parties[BOB],
                remote=parties[self.peer],
                now=AFTER_WORLD,
                rng=SeededRandom(data),
            )

        accepted = refused_unchanged(self.state, run)
        if accepted:
            self.reset()
        return accepted


class SenderKeyTarget:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        w = world()
        self.record = SenderKeyRecord.from_bytes(
            w.bob_records[RecordKey.inbound(w.group_id, A("alice"))]
        )

    def check(self, data: bytes) -> bool:
        accepted = refused_unchanged(
            self.record.to_bytes, lambda: self.record.decrypt(data, sender=ALICE)
        )
        if accepted:
            self.reset()
        return accepted


class CoreTarget:
    """Bob's ClientCore receiving envelopes (never raises); reloaded after a change."""

    def __init__(self, sender: Address, kind: int) -> None:
        self.sender, self.kind = sender, kind
        self.reset()

    def reset(self) -> None:
        self.core = ClientCore.load(world().bob_records.items(), rng=SeededRandom(b"core"))

    def check(self, data: bytes) -> bool:
        outcome = self.core.receive(self.sender, self.kind, data, now=AFTER_WORLD)
        changes = self.core.take_changes()
        if refused_outcome(outcome):
            assert changes == {}, f"a refused envelope changed {sorted(changes)}"
            return False
        if changes:
            self.reset()
        return True


class FirstListTarget:
    """Bob, who holds no list of erin's, reading erin's initial message with the list the
    relay serves for it (``list_fuzzed``: the list is the input, else the message): the
    list is kept only if the envelope opens, else bob is byte for byte as he was (spec 11
    section 11.2)."""

    def __init__(self, *, list_fuzzed: bool) -> None:
        self.list_fuzzed = list_fuzzed
        self.reset()

    def reset(self) -> None:
        records = world().bob_records.items()
        never_met = [(key, data) for key, data in records if key != RecordKey.devices("erin")]
        self.core = ClientCore.load(never_met, rng=SeededRandom(b"first list"))
        assert self.core.device_list("erin") is None

    def check(self, data: bytes) -> bool:
        w = world()
        listed = data if self.list_fuzzed else w.directory["erin"].encode()
        payload = w.initial[0] if self.list_fuzzed else data
        before = full_state(self.core)
        outcome = self.core.receive(
            ERIN, ENVELOPE_DIRECT, payload, now=AFTER_WORLD, sender_list=listed
        )
        changes = self.core.take_changes()
        if self.core.device_list("erin") is None:
            assert refused_outcome(outcome), f"not opened, yet {outcome}"
            assert changes == {} and full_state(self.core) == before, "a refused list stayed"
            return False
        # Kept: the envelope opened, so its initial message started a session.
        assert RecordKey.session(ERIN) in changes, f"a list kept for {outcome}"
        self.reset()
        return True


class ContentTarget:
    """Any plaintext inside a working session: a peer (or an own device) that misbehaves.

    The sessions stay in step (every message is delivered), so nothing is
    reset: one core lives through every input in turn.
    """

    def __init__(self, sender: Address) -> None:
        w = world()
        self.sender = sender
        self.session = SessionRecord.from_bytes(w.sessions_to_bob[sender])
        self.core = ClientCore.load(w.bob_records.items(), rng=SeededRandom(b"content"))

    def check(self, data: bytes) -> bool:
        payload = self.session.encrypt(data, now=AFTER_WORLD)
        outcome = self.core.receive(self.sender, ENVELOPE_DIRECT, payload, now=AFTER_WORLD)
        changes = self.core.take_changes()
        if refused_outcome(outcome):
            carrier = RecordKey.session(self.sender)
            assert set(changes) <= {carrier}, f"refused content changed {sorted(changes)}"
            return False
        return True


def remote(decode: Callable[[bytes], object]) -> Check:
    """A decoder that refuses with RemoteProtocolError."""

    def check(data: bytes) -> bool:
        try:
            decode(data)
        except RemoteProtocolError:
            return False
        return True

    return check


def round_trip(decode: Callable[[bytes], Any], encode: Callable[[Any], bytes]) -> Check:
    """A wire decoder: RemoteProtocolError, or a value that re-encodes to the input."""

    def run(data: bytes) -> None:
        assert encode(decode(data)) == data, "decoded, but not the canonical encoding"

    return remote(run)


def state_loader(load: Callable[[bytes], Any], dump: Callable[[Any], bytes] | None = None) -> Check:
    """A pickle loader: StateError (UnknownStateVersion included), or a value that
    ``dump`` (if given) saves as the same bytes."""

    def check(data: bytes) -> bool:
        try:
            value = load(data)
        except StateError:
            return False
        assert dump is None or dump(value) == data, "loaded, but saved differently"
        return True

    return check


def apply_control(data: bytes) -> None:
    w = world()
    held = Group.from_bytes(w.bob_records[RecordKey.group(w.group_id)])
    before = held.to_bytes()
    message = ControlMessage.decode(data)
    assert message.encode() == data, "decoded, but not the canonical encoding"
    try:
        held.apply(message, w.directory)
    finally:
        assert held.to_bytes() == before


def join(data: bytes) -> None:
    w = world()
    welcome = Welcome.decode(data)
    assert welcome.encode() == data, "decoded, but not the canonical encoding"
    Group.join(welcome, w.directory, user_id="dave", user_identity=w.dave_identity)


def relay_frame(data: bytes) -> bool:
    """What a client does with a frame body from the relay.

    It closes the connection on a ProtocolError or a RelayError (an unknown frame type).
    """
    try:
        frame = decode_relay_frame(data)
        assert encode_body(frame) == data, "decoded, but not the canonical encoding"
        if isinstance(frame, ErrorFrame):
            relay_error_from_wire(frame.code, frame.message, frame.detail)
    except (ProtocolError, RelayError):
        return False
    return True


def relay_request(data: bytes) -> bool:
    """What the relay does with a frame body from a client: total, never raises."""
    request = decode_request(data)
    if isinstance(request, BadRequest):
        return False
    # A HELLO of another version is read only as far as its version (to refuse it).
    if not (isinstance(request, Hello) and request.version != RELAY_PROTOCOL_VERSION):
        assert encode_body(request) == data, "decoded, but not the canonical encoding"
    return True


def frame_stream(data: bytes) -> bool:
    """A byte stream, cut into chunks, through a FrameDecoder with a small frame limit."""
    decoder = FrameDecoder(max_frame_size=200)
    rebuilt = b""
    cut = 1 + (data[0] % 7 if data else 0)
    try:
        for start in range(0, len(data), cut):
            decoder.receive_data(data[start : start + cut])
            while (body := decoder.next_frame()) is not None:
                rebuilt += encode_frame(body)
    except FrameTooLarge:
        return False
    assert data.startswith(rebuilt), "frames are not the stream's prefix"
    assert decoder.in_frame == (len(rebuilt) < len(data))
    return True


def record_keys() -> list[RecordKey]:
    """Bob's record keys in a fixed order (the ClientCore.load target picks one by a byte)."""
    return sorted(world().bob_records, key=repr)


def load_core_with(data: bytes) -> None:
    """Bob's store with one record (picked by the first byte) replaced by the rest."""
    records = dict(world().bob_records)
    keys = record_keys()
    if data:
        records[keys[data[0] % len(keys)]] = data[1:]
    ClientCore.load(records.items(), rng=SeededRandom(b"load"))


def pickle_seeds(kind: RecordKind) -> list[bytes]:
    return [v for k, v in world().bob_records.items() if k.kind is kind]


def stored_items() -> list[core.Event | core.Send]:
    address = A("alice")
    return [
        core.MessageReceived(address, b"\x01" * 16, AFTER_WORLD, b"body", None),
        core.MessageReceived(address, b"\x01" * 16, AFTER_WORLD, b"body", bytes(16)),
        core.MessageSentByOtherDevice(address, "bob", b"\x02" * 16, AFTER_WORLD, b"copy"),
        core.DeviceAdded(address),
        core.DeviceRemoved(address),
        core.Undecryptable(address, "BAD_MAC", None),
        core.GroupUpdated(bytes(16), address, (MemberRemoved("bob"),), False),
        core.GroupStateMismatch(bytes(16), address, "forked", 4, b"\x03" * 32, 4, b"\x04" * 32),
        core.DirectSend("bob", ((1, b"payload"), (2, b"other")), b"content"),
        core.GroupSend(bytes(16), b"group payload", (address, A("bob", 2))),
    ]


def stored_events() -> list[bytes]:
    items = stored_items()
    return [rows.encode_event(e) for e in items if not isinstance(e, core.Send)]


def stored_sends() -> list[bytes]:
    items = stored_items()
    return [rows.encode_send(s) for s in items if isinstance(s, core.DirectSend | core.GroupSend)]


def unversioned_rows() -> list[bytes]:
    return [bytes.fromhex(old) for _, old, _ in FIRST_CLIENT_ROWS]


def body(frame: Any) -> bytes:
    """encode_body for the (untyped) frame lists of test_relay_framing."""
    return encode_body(frame)


def frame_streams() -> list[bytes]:
    bodies = [body(f) for f in RELAY_FRAMES]
    return [b"".join(encode_frame(b) for b in bodies[:4]), encode_frame(bodies[-1])]


def relay_frames() -> list[bytes]:
    errors = [encode_body(ErrorFrame.from_error(9, error)) for error in ERRORS]
    return [body(f) for f in RELAY_FRAMES] + errors


def sender_key_distributions() -> list[bytes]:
    contents = [decode_content(c) for c in world().contents]
    return [c.distribution for c in contents if isinstance(c, SenderKey)]


def group_states() -> list[bytes]:
    return [s.encode() for s in Group.from_bytes(pickle_seeds(RecordKind.GROUP)[0]).states]


def outbound_keys() -> list[bytes]:
    return [OutboundSenderKey.create(bytes(16), now=AFTER_WORLD, rng=SeededRandom(b"o")).to_bytes()]


def peer_claims() -> list[bytes]:
    group = Group.from_bytes(pickle_seeds(RecordKind.GROUP)[0])

    def relation(claim: StateClaim) -> StateRelation:
        return group.relation(claim.epoch, claim.state_hash)

    claims = PeerClaims()
    ahead = StateClaim(group.epoch + 1, bytes(32))
    claims.observe(A("alice"), ahead, relation, ahead_explained=True)  # kept to judge again
    forked = StateClaim(group.epoch, b"\x01" * 32)
    claims.observe(BOB2, forked, relation, ahead_explained=False)  # reported
    return [claims.to_bytes()]


def load_seeds() -> list[bytes]:
    records = world().bob_records
    return [bytes([i]) + records[k] for i, k in enumerate(record_keys())]


# name: (a factory of the check, a factory of the seeds)
TARGETS: dict[str, tuple[Callable[[], Check], Callable[[], list[bytes]]]] = {
    # Decrypt entry points: a refused input changes no state.
    "SessionRecord.decrypt/ratchet": (
        lambda: SessionTarget(RecordKey.session(A("alice"))).check,
        lambda: world().direct,
    ),
    "SessionRecord.decrypt/initial": (lambda: SessionTarget(None).check, lambda: world().initial),
    "SenderKeyRecord.decrypt": (lambda: SenderKeyTarget().check, lambda: world().group),
    "ClientCore.receive/direct": (
        lambda: CoreTarget(ALICE, ENVELOPE_DIRECT).check,
        lambda: world().direct,
    ),
    "ClientCore.receive/initial": (
        lambda: CoreTarget(ERIN, ENVELOPE_DIRECT).check,
        lambda: world().initial,
    ),
    "ClientCore.receive/initial+first-list": (
        lambda: FirstListTarget(list_fuzzed=False).check,
        lambda: world().initial,
    ),
    "ClientCore.receive/first-list": (
        lambda: FirstListTarget(list_fuzzed=True).check,
        lambda: [world().directory["erin"].encode()],
    ),
    "ClientCore.receive/group": (
        lambda: CoreTarget(ALICE, ENVELOPE_GROUP).check,
        lambda: world().group,
    ),
    "ClientCore.receive/content-from-peer": (
        lambda: ContentTarget(ALICE).check,
        lambda: world().contents,
    ),
    "ClientCore.receive/content-from-own-device": (
        lambda: ContentTarget(BOB2).check,
        lambda: world().contents,
    ),
    "ControlMessage+Group.apply": (lambda: remote(apply_control), lambda: world().controls),
    "Welcome+Group.join": (lambda: remote(join), lambda: world().welcomes),
    # Wire decoders: refused, or re-encoded to the same bytes.
    "SignedDeviceList.decode": (
        lambda: round_trip(SignedDeviceList.decode, lambda d: d.encode()),
        lambda: [d.encode() for d in world().directory.values()],
    ),
    "GroupState.decode": (
        lambda: round_trip(GroupState.decode, lambda s: s.encode()),
        group_states,
    ),
    "SenderKeyMessage.decode": (
        lambda: round_trip(SenderKeyMessage.decode, lambda m: m.encode()),
        lambda: world().group,
    ),
    "SenderKeyDistributionMessage.decode": (
        lambda: round_trip(SenderKeyDistributionMessage.decode, lambda m: m.encode()),
        sender_key_distributions,
    ),
    "decode_content": (
        lambda: round_trip(decode_content, lambda c: c.encode()),
        lambda: world().contents,
    ),
    "GroupText.decode": (
        lambda: round_trip(GroupText.decode, lambda t: t.encode()),
        lambda: [GroupText(b"\x04" * 16, AFTER_WORLD, b"group text", 3, bytes(32)).encode()],
    ),
    "Envelope.decode": (
        lambda: round_trip(Envelope.decode, lambda e: e.encode()),
        lambda: [Envelope(b"\x05" * 16, AFTER_WORLD, "alice", 1, 1, b"ciphertext").encode()],
    ),
    "decode_relay_frame": (lambda: relay_frame, relay_frames),
    "decode_request": (lambda: relay_request, lambda: [body(r) for r in REQUESTS]),
    "FrameDecoder": (lambda: frame_stream, frame_streams),
    # State formats: StateError only.
    "rows.decode_event": (
        lambda: state_loader(rows.decode_event, rows.encode_event),
        stored_events,
    ),
    "rows.decode_send": (lambda: state_loader(rows.decode_send, rows.encode_send), stored_sends),
    "rows.decode_unversioned": (lambda: state_loader(rows.decode_unversioned), unversioned_rows),
    "SenderKeyRecord.from_bytes": (
        lambda: state_loader(SenderKeyRecord.from_bytes, lambda r: r.to_bytes()),
        lambda: pickle_seeds(RecordKind.INBOUND),
    ),
    "OutboundSenderKey.from_bytes": (
        lambda: state_loader(OutboundSenderKey.from_bytes, lambda k: k.to_bytes()),
        outbound_keys,
    ),
    "Group.from_bytes": (
        lambda: state_loader(Group.from_bytes, lambda g: g.to_bytes()),
        lambda: pickle_seeds(RecordKind.GROUP),
    ),
    "PeerClaims.from_bytes": (
        lambda: state_loader(PeerClaims.from_bytes, lambda c: c.to_bytes()),
        peer_claims,
    ),
    "ClientCore.load": (lambda: state_loader(load_core_with), load_seeds),
}

# Targets where some seeds are refused by design (content a peer may not send).
SOME_SEEDS_REFUSED = {
    "ClientCore.receive/content-from-peer",
    "ClientCore.receive/content-from-own-device",
}


@functools.cache
def checker(name: str) -> Check:
    return TARGETS[name][0]()


@functools.cache
def seeds(name: str) -> tuple[bytes, ...]:
    return tuple(TARGETS[name][1]())


def run(name: str, data: bytes) -> bool:
    accepted = checker(name)(data)
    CHECKED[name] += 1
    return accepted


# ------------------------------------------------------------------ inputs


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", list(TARGETS))
def test_seeds_are_accepted(name: str) -> None:
    """The mutations start from inputs the target accepts (so they reach deep code)."""
    check = TARGETS[name][0]()  # a fresh one: the seeds are not replays
    accepted = [check(seed) for seed in seeds(name)]
    assert any(accepted) if name in SOME_SEEDS_REFUSED else all(accepted), accepted


@pytest.mark.parametrize("name", list(TARGETS))
@budget(DEFAULT_EXAMPLES)
@given(data=st.data())
def test_entry_point(name: str, data: st.DataObject) -> None:
    run(name, data.draw(inputs(seeds(name))))


@pytest.mark.fuzz
@pytest.mark.parametrize("name", list(TARGETS))
@budget(FUZZ_EXAMPLES)
@given(data=st.data())
def test_entry_point_fuzz(name: str, data: st.DataObject) -> None:
    run(name, data.draw(inputs(seeds(name))))


def test_every_wire_type_and_state_format_round_trips() -> None:
    """decode(encode(x)) == x for the values of the world, of every kind."""
    w = world()
    group = Group.from_bytes(w.bob_records[RecordKey.group(w.group_id)])
    wire: list[tuple[Any, Callable[[bytes], Any]]] = [
        *((d, SignedDeviceList.decode) for d in w.directory.values()),
        *((s, GroupState.decode) for s in group.states),
        *((ControlMessage.decode(c), ControlMessage.decode) for c in w.controls),
        *((Welcome.decode(c), Welcome.decode) for c in w.welcomes),
        *((SenderKeyMessage.decode(m), SenderKeyMessage.decode) for m in w.group),
        *((decode_content(c), decode_content) for c in w.contents),
        (GroupText(b"\x04" * 16, AFTER_WORLD, b"text", 3, bytes(32)), GroupText.decode),
        (Envelope(b"\x05" * 16, AFTER_WORLD, "alice", 1, 2, b"payload"), Envelope.decode),
    ]
    for skdm in sender_key_distributions():
        wire.append(
            (SenderKeyDistributionMessage.decode(skdm), SenderKeyDistributionMessage.decode)
        )
    for value, decode in wire:
        assert decode(value.encode()) == value, value
    for data in stored_events():
        assert rows.encode_event(rows.decode_event(data)) == data
    for data in stored_sends():
        assert rows.encode_send(rows.decode_send(data)) == data
    # State formats: loading and saving again gives the same bytes.
    loaders: dict[RecordKind, Callable[[bytes], bytes]] = {
        RecordKind.ACCOUNT: lambda b: Account.from_bytes(b).to_bytes(),
        RecordKind.SESSION: lambda b: SessionRecord.from_bytes(b).to_bytes(),
        RecordKind.INBOUND: lambda b: SenderKeyRecord.from_bytes(b).to_bytes(),
        RecordKind.GROUP: lambda b: Group.from_bytes(b).to_bytes(),
    }
    kinds = set()
    for key, data in w.bob_records.items():
        if key.kind in loaders:
            assert loaders[key.kind](data) == data, key
            kinds.add(key.kind)
    assert kinds == set(loaders)
    for data in outbound_keys():
        assert OutboundSenderKey.from_bytes(data).to_bytes() == data
    core_ = ClientCore.load(w.bob_records.items(), rng=SeededRandom(b"round trip"))
    assert full_state(core_) == w.bob_records
