"""sender_keys.json: scripted transcripts of one group sender and one receiver.

Steps (spec/04-sender-keys.md):

* ``create``: the sender makes sender key ``key`` from ``random`` (4 bytes of
  chain id, 32 of chain key, 32 of Ed25519 seed, in that order).
* ``distribute``: the sender's SKDM for ``key`` at its current iteration.
* ``process``: the receiver processes ``skdm``; its state after is given.
* ``encrypt``: the sender encrypts ``plaintext`` with ``key``: the seed of
  the iteration and the exact SenderKeyMessage.
* ``deliver`` / ``duplicate``: the receiver decrypts ``message``: valid with
  ``plaintext`` and the state after, or ``error`` and the state unchanged.
* ``drop``: never delivered.

The receiver's state lists its chains newest first, each with its chain
id, signing key, next iteration, chain key and stored skipped seeds. The
sender's keys name and sign as ``sender``; the receiver's record is that of
``received_from``, the device whose session delivers the SKDMs and whose
address the relay stamps on the messages (the sender itself, except where a
test plays a forwarder or a restamping relay).

Group ``SenderKeyStore`` (spec/04-sender-keys.md, section 4.8): which SKDMs a
device takes at all. Per test, ``groups`` maps each held group to its
current members' listed devices; ``process`` steps give the delivering
device (``from``) and the SKDM, and the store's ``records`` after.

Group ``SplitDetection`` (section 4.9): a receiver judging the group states
its messages' senders claim. ``observe`` steps give the receiver's ``held``
states, whether held changes ``explained`` a sender ahead, the sender
(``from``) and its ``claim``: its ``relation`` and the relation to
``report`` (or null); ``rejudge`` steps give the new ``held`` states and
``explained``, and the claims to report; both give the ``kept`` claims
after.
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Any

from hushchat.protocol import primitives as p
from hushchat.protocol.address import Address
from hushchat.protocol.consts import (
    MAX_SENDER_KEY_FORWARD_JUMP,
    MAX_SENDER_KEY_STATES,
    MAX_SENDER_MESSAGE_KEYS,
)
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.group import StateRelation, state_relation
from hushchat.protocol.group_cipher import OutboundSenderKey, SenderKeyRecord, SenderKeyStore
from hushchat.protocol.sender_keys import (
    SenderKeyDistributionMessage,
    SenderKeyMessage,
    encrypt_with_seed,
    message_seed,
    next_chain_key,
    signed_bytes,
)
from hushchat.protocol.split_detection import PeerClaims, Relation, StateClaim

from ._common import Checker, Json, case, h, note, seeded, unhex, vector_file

NAME = "sender_keys"
SMALL_ORDER_EDWARDS = unhex("0100000000000000000000000000000000000000000000000000000000000000")

NOTES = {
    "InOrder": note("BASIC", "Messages delivered in order."),
    "OutOfOrder": note("BASIC", "Messages delivered out of order, using stored skipped seeds."),
    "LateJoin": note(
        "BASIC",
        "The receiver gets the SKDM after two messages were sent: those are DUPLICATE_MESSAGE "
        "(no history for joiners).",
    ),
    "Rotation": note("BASIC", "The sender rotates its key; a late message of the old chain works."),
    "MaxStates": note("BASIC", "More chains than max_states: the oldest is dropped."),
    "BadSignature": note("AUTH_BYPASS", "The signature does not verify."),
    "ModifiedCiphertext": note("AUTH_BYPASS", "The signed body is modified."),
    "UnknownChain": note("BASIC", "A chain id the receiver never got an SKDM for."),
    "OtherGroup": note("BASIC", "A message of another group, under a known chain id."),
    "Duplicate": note("REPLAY", "A message delivered twice."),
    "JumpLimit": note("DOS", "An iteration more than max_forward_jump ahead: TOO_FAR_IN_FUTURE."),
    "Evicted": note("DOS", "More skipped seeds than max_message_keys: the oldest are evicted."),
    "BadPadding": note(
        "EDGE_CASE",
        "A validly signed ciphertext (the sender's own key) that does not unpad: "
        "DECRYPTION_FAILED, state unchanged.",
    ),
    "InvalidSigningKey": note("AUTH_BYPASS", "An SKDM with a signing key of small order."),
    "ReplacedChain": note(
        "BASIC",
        "An SKDM with a known chain id and another signing key replaces that chain.",
    ),
    "RedeliveredSkdm": note("BASIC", "An SKDM for a chain already held at a later iteration."),
    "ForwardedDistribution": note(
        "AUTH_BYPASS",
        "A member hands on another member's SKDM as its own: it names its creator, not the "
        "device that delivered it (SENDER_MISMATCH).",
    ),
    "RestampedMessage": note(
        "AUTH_BYPASS",
        "A message of one sender delivered as another's (a relay restamping the envelope, or "
        "a member that took the chain as its own): the signature covers the sender's address "
        "(BAD_SIGNATURE).",
    ),
    "UnknownGroup": note(
        "DOS", "An SKDM for a group the device does not hold is not stored (UNKNOWN_GROUP)."
    ),
    "NotAMember": note(
        "DOS",
        "An SKDM from a device that is not a current member's listed device is not stored "
        "(NOT_A_MEMBER).",
    ),
    "OverLimit": note(
        "DOS",
        "An SKDM that needs a new record beyond max_records is refused and nothing is evicted "
        "(TOO_MANY_SENDER_KEYS); held records still take new chains.",
    ),
    "CheckOrder": note(
        "EDGE_CASE", "An SKDM with two defects: the first check of section 4.8 decides the error."
    ),
    "SameState": note("BASIC", "The sender holds a state the receiver holds: nothing to report."),
    "ForkedState": note(
        "AUTH_BYPASS",
        "The sender holds another state at an epoch the receiver holds (a relay withheld a "
        "change from some members, or an admin signed two on one state): reported, once per "
        "sender and state.",
    ),
    "OlderThanHeld": note(
        "EDGE_CASE", "The sender's epoch is older than every state the receiver keeps: reported."
    ),
    "SenderAhead": note(
        "EDGE_CASE",
        "The sender is past the receiver's epoch while the receiver holds changes it cannot "
        "apply yet (explained): not reported, judged again as the receiver moves.",
    ),
    "WithheldChange": note(
        "AUTH_BYPASS",
        "The sender is past the receiver's epoch and no held change explains it: a change was "
        "withheld from the receiver, reported as ahead (once per sender and state).",
    ),
}

ALICE = Address("alice", 1)
MALLORY = Address("mallory", 1)


def address_json(address: Address) -> list[Any]:
    return [address.user_id, address.device_id]


def address_of(value: list[Any]) -> Address:
    return Address(value[0], value[1])


def record_json(record: SenderKeyRecord) -> Json:
    """The receiver's chains, newest first (spec/04-sender-keys.md, "Receiver state")."""
    _, _, chains = unpack(record.to_bytes(), what="test")
    return {
        "chains": [
            {
                "chain_id": chain_id,
                "signing_key": h(signing_key),
                "iteration": iteration,
                "chain_key": h(chain_key),
                "skipped": [[n, h(seed)] for n, seed in skipped],
            }
            for chain_id, signing_key, iteration, chain_key, skipped in chains
        ]
    }


class _Transcript:
    def __init__(
        self,
        label: str,
        limits: tuple[int, int, int],
        *,
        sender: Address = ALICE,
        received_from: Address = ALICE,
    ) -> None:
        self.rng = seeded("sender_keys/" + label)
        self.group_id = self.rng.random_bytes(16)
        self.sender = sender
        self.received_from = received_from
        self.max_forward_jump, self.max_message_keys, self.max_states = limits
        self.keys: list[OutboundSenderKey] = []
        self.random: list[list[bytes]] = []
        self.record = SenderKeyRecord(self.group_id)
        self.messages: list[bytes] = []
        self.steps: list[Json] = []

    def create(self) -> int:
        drawn = [self.rng.random_bytes(4), self.rng.random_bytes(32), self.rng.random_bytes(32)]
        key = OutboundSenderKey.create(self.group_id, 0, p.ScriptedRandom(list(drawn)))
        self.keys.append(key)
        self.random.append(drawn)
        self.steps.append(
            {
                "op": "create",
                "key": len(self.keys) - 1,
                "random": [h(r) for r in drawn],
                "chain_id": key.chain_id,
                "chain_key": h(drawn[1]),
                "signing_key": h(key.signing_key),
            }
        )
        return len(self.keys) - 1

    def distribute(self, key: int) -> bytes:
        skdm = self.keys[key].distribution_message(sender=self.sender)
        self.steps.append(
            {
                "op": "distribute",
                "key": key,
                "iteration": self.keys[key].iteration,
                "skdm": h(skdm),
            }
        )
        return skdm

    def process(self, skdm: bytes, modification: str | None = None) -> None:
        step: Json = {"op": "process", "skdm": h(skdm)}
        if modification:
            step["modification"] = modification
        try:
            self.record.process_distribution(
                skdm,
                sender=self.received_from,
                max_states=self.max_states,
                max_forward_jump=self.max_forward_jump,
            )
        except Exception as exc:  # the reference's verdict is what gets recorded
            step.update(result="invalid", error=getattr(exc, "code", type(exc).__name__))
        else:
            step["result"] = "valid"
        step["state"] = record_json(self.record)
        self.steps.append(step)

    def encrypt(self, key: int, count: int = 1) -> list[int]:
        ids = []
        for _ in range(count):
            sender = self.keys[key]
            msg_id = len(self.messages)
            plaintext = f"group message {msg_id}".encode()
            seed = message_seed(self.chain_key(key))
            iteration = sender.iteration
            message = sender.encrypt(plaintext, sender=self.sender)
            self.messages.append(message)
            self.steps.append(
                {
                    "op": "encrypt",
                    "key": key,
                    "msg_id": msg_id,
                    "plaintext": h(plaintext),
                    "iteration": iteration,
                    "seed": h(seed),
                    "message": h(message),
                }
            )
            ids.append(msg_id)
        return ids

    def chain_key(self, key: int) -> bytes:
        """The sender's current chain key of ``key`` (recomputed from its first one)."""
        chain_key = self.random[key][1]
        for _ in range(self.keys[key].iteration):
            chain_key = next_chain_key(chain_key)
        return chain_key

    def deliver(
        self,
        msg_id: int | None,
        *,
        message: bytes | None = None,
        modification: str | None = None,
        op: str = "deliver",
    ) -> None:
        data = self.messages[msg_id] if message is None and msg_id is not None else message
        assert data is not None
        step: Json = {"op": op, "msg_id": msg_id}
        if modification:
            step["modification"] = modification
        step["message"] = h(data)
        try:
            plaintext = self.record.decrypt(
                data,
                sender=self.received_from,
                max_forward_jump=self.max_forward_jump,
                max_message_keys=self.max_message_keys,
            )
        except Exception as exc:  # the reference's verdict is what gets recorded
            step.update(result="invalid", error=getattr(exc, "code", type(exc).__name__))
        else:
            step.update(result="valid", plaintext=h(plaintext))
        step["state"] = record_json(self.record)
        self.steps.append(step)

    def drop(self, msg_id: int) -> None:
        self.steps.append({"op": "drop", "msg_id": msg_id})

    def signed(self, key: int, fields: list[Any]) -> bytes:
        """A message body signed with sender key ``key``'s signing key (a forgery tool)."""
        body = pack(fields)
        signing = p.ed25519_private_from_bytes(self.random[key][2])
        return body + p.ed25519_sign(signing, signed_bytes(self.sender, body))

    def case(self, comment: str, flags: tuple[str, ...]) -> Json:
        errors = [s["error"] for s in self.steps if s.get("result") == "invalid"]
        return case(
            comment,
            result="invalid" if errors else "valid",
            error=errors[0] if errors else None,
            flags=flags,
            group_id=h(self.group_id),
            sender=address_json(self.sender),
            received_from=address_json(self.received_from),
            steps=self.steps,
        )


def _body(message: bytes) -> list[Any]:
    fields: list[Any] = unpack(message[:-64], what="test")
    return fields


def _default_transcripts(limits: tuple[int, int, int]) -> list[Json]:
    tests = []
    t = _Transcript("in-order", limits)
    k = t.create()
    t.process(t.distribute(k))
    for m in t.encrypt(k, 3):
        t.deliver(m)
    tests.append(t.case("three messages in order", ("InOrder",)))

    t = _Transcript("reorder", limits)
    k = t.create()
    t.process(t.distribute(k))
    ids = t.encrypt(k, 5)
    for i in (3, 1, 4, 0, 2):
        t.deliver(ids[i])
    tests.append(t.case("five messages delivered as 3, 1, 4, 0, 2", ("OutOfOrder",)))

    t = _Transcript("late-join", limits)
    k = t.create()
    early = t.encrypt(k, 2)
    t.process(t.distribute(k))
    (m2,) = t.encrypt(k)
    t.deliver(m2)
    t.deliver(early[0])
    tests.append(t.case("SKDM at iteration 2; message 0 is not readable", ("LateJoin",)))

    t = _Transcript("rotation", limits)
    k0 = t.create()
    t.process(t.distribute(k0))
    a, b = t.encrypt(k0, 2)
    t.deliver(a)
    k1 = t.create()
    t.process(t.distribute(k1))
    (c,) = t.encrypt(k1)
    t.deliver(c)
    t.deliver(b)
    tests.append(t.case("rotation; the old chain's late message still decrypts", ("Rotation",)))

    t = _Transcript("bad-signature", limits)
    k = t.create()
    t.process(t.distribute(k))
    (m,) = t.encrypt(k)
    real = t.messages[m]
    t.deliver(
        m, message=real[:-1] + bytes([real[-1] ^ 1]), modification="last signature byte flipped"
    )
    t.deliver(m)
    tests.append(t.case("signature with one bit flipped; then the real message", ("BadSignature",)))

    t = _Transcript("modified", limits)
    k = t.create()
    t.process(t.distribute(k))
    (m,) = t.encrypt(k)
    fields = _body(t.messages[m])
    fields[4] = bytes([fields[4][0] ^ 1]) + fields[4][1:]
    forged = pack(fields) + t.messages[m][-64:]
    t.deliver(m, message=forged, modification="first ciphertext byte flipped, old signature")
    t.deliver(m)
    tests.append(t.case("modified ciphertext; then the real message", ("ModifiedCiphertext",)))

    t = _Transcript("unknown-chain", limits)
    k0 = t.create()
    k1 = t.create()
    t.process(t.distribute(k0))
    (stranger,) = t.encrypt(k1)
    (m,) = t.encrypt(k0)
    t.deliver(stranger)
    t.deliver(m)
    tests.append(t.case("a message from a chain never distributed", ("UnknownChain",)))

    t = _Transcript("other-group", limits)
    k = t.create()
    t.process(t.distribute(k))
    (m,) = t.encrypt(k)
    fields = _body(t.messages[m])
    fields[1] = bytes(16)
    t.deliver(None, message=t.signed(k, fields), modification="group id changed, re-signed")
    t.deliver(m)
    tests.append(t.case("a validly signed message naming another group", ("OtherGroup",)))

    t = _Transcript("duplicate", limits)
    k = t.create()
    t.process(t.distribute(k))
    m0, m1 = t.encrypt(k, 2)
    t.deliver(m1)
    t.deliver(m1, op="duplicate")
    t.deliver(m0)
    t.deliver(m0, op="duplicate")
    tests.append(t.case("messages 1 and 0 each delivered twice", ("Duplicate",)))

    t = _Transcript("bad-padding", limits)
    k = t.create()
    t.process(t.distribute(k))
    seed = message_seed(t.chain_key(k))
    unpaddable = encrypt_with_seed(seed, b"x" * 15)[:-16] + bytes(16)
    body = SenderKeyMessage.encode_body(t.group_id, t.keys[k].chain_id, 0, unpaddable)
    t.deliver(
        None,
        message=t.signed(k, unpack(body, what="test")),
        modification="iteration 0 with a ciphertext that does not unpad, signed by the sender",
    )
    (m,) = t.encrypt(k)
    t.deliver(m)
    tests.append(t.case("bad padding under a valid signature", ("BadPadding",)))

    t = _Transcript("small-order-signing-key", limits)
    k = t.create()
    skdm = t.distribute(k)
    fields = unpack(skdm, what="test")
    fields[5] = SMALL_ORDER_EDWARDS
    t.process(pack(fields), modification="signing key of small order")
    t.process(skdm)
    tests.append(t.case("SKDM with a small-order signing key", ("InvalidSigningKey",)))

    t = _Transcript("replaced-chain", limits)
    k = t.create()
    t.process(t.distribute(k))
    (m,) = t.encrypt(k)
    impostor = unpack(t.distribute(k), what="test")
    impostor[5] = p.ed25519_public_bytes(p.ed25519_generate(seeded("sender_keys/impostor")))
    t.process(pack(impostor), modification="same chain id, another signing key")
    t.deliver(m)
    tests.append(
        t.case(
            "an SKDM reusing a chain id with another signing key replaces the chain",
            ("ReplacedChain", "BadSignature"),
        )
    )

    t = _Transcript("redelivered-skdm", limits)
    k = t.create()
    first = t.distribute(k)
    t.process(first)
    for m in t.encrypt(k, 2):
        t.deliver(m)
    t.process(first)
    (m,) = t.encrypt(k)
    t.deliver(m)
    tests.append(t.case("the iteration-0 SKDM again after two messages", ("RedeliveredSkdm",)))

    t = _Transcript("forwarded-distribution", limits, received_from=MALLORY)
    k = t.create()
    t.process(t.distribute(k), modification="alice's SKDM, delivered by mallory")
    (m,) = t.encrypt(k)
    t.deliver(m, modification="alice's message, stamped as mallory's")
    tests.append(
        t.case(
            "mallory hands on alice's SKDM as its own: refused, so nothing reads as mallory's",
            ("ForwardedDistribution", "UnknownChain"),
        )
    )

    t = _Transcript("restamped-message", limits, received_from=MALLORY)
    k = t.create()
    renamed = unpack(t.distribute(k), what="test")
    renamed[2:4] = [MALLORY.user_id, MALLORY.device_id]
    t.process(pack(renamed), modification="alice's SKDM renamed to mallory.1 by mallory")
    (m,) = t.encrypt(k)
    t.deliver(m, modification="alice's message, stamped as mallory's")
    tests.append(
        t.case(
            "alice's chain taken as mallory's: alice's message does not verify as mallory's",
            ("RestampedMessage", "BadSignature"),
        )
    )
    return tests


def _limit_transcripts(limits: tuple[int, int, int]) -> list[Json]:
    max_jump, max_keys, max_states = limits
    tests = []
    t = _Transcript("jump", limits)
    k = t.create()
    t.process(t.distribute(k))
    ids = t.encrypt(k, max_jump + 2)
    t.deliver(ids[-1])
    t.deliver(ids[-2])
    tests.append(
        t.case(
            f"iteration {max_jump + 1} jumps too far; iteration {max_jump} does not",
            ("JumpLimit",),
        )
    )

    t = _Transcript("evicted", limits)
    k = t.create()
    t.process(t.distribute(k))
    ids = t.encrypt(k, max_keys + 3)
    t.deliver(ids[-1])
    t.deliver(ids[0])
    t.deliver(ids[2])
    tests.append(
        t.case(f"{max_keys + 2} seeds skipped, {max_keys} kept", ("Evicted", "OutOfOrder"))
    )

    t = _Transcript("max-states", limits)
    keys = [t.create() for _ in range(max_states + 1)]
    for k in keys:
        t.process(t.distribute(k))
    (first,) = t.encrypt(keys[0])
    (last,) = t.encrypt(keys[-1])
    t.deliver(first)
    t.deliver(last)
    tests.append(
        t.case(f"{max_states + 1} chains: the first one is dropped", ("MaxStates", "UnknownChain"))
    )
    return tests


def _group(limits: tuple[int, int, int], tests: list[Json]) -> Json:
    return {
        "type": "SenderKeyTranscript",
        "max_forward_jump": limits[0],
        "max_message_keys": limits[1],
        "max_states": limits[2],
        "tests": tests,
    }


# ------------------------------------------------------------------ a device's store


def store_json(store: SenderKeyStore) -> list[Any]:
    """The store's records, in (group id, user id, device id) order, with their chain ids."""
    return [
        [h(group_id), sender.user_id, sender.device_id, [c.chain_id for c in record.chains]]
        for (group_id, sender), record in sorted(store.items())
    ]


class _StoreTranscript:
    """One device's SenderKeyStore taking SKDMs delivered by several devices."""

    def __init__(self, label: str, max_records: int, groups: dict[bytes, list[Address]]) -> None:
        self.rng = seeded("sender_keys/store/" + label)
        self.store = SenderKeyStore(max_records=max_records)
        self.groups = groups
        self.steps: list[Json] = []

    def distribution(self, group_id: bytes, sender: Address) -> bytes:
        """A fresh chain's SKDM, created by ``sender`` (its randomness from the label)."""
        key = OutboundSenderKey.create(group_id, 0, self.rng)
        return key.distribution_message(sender=sender)

    def process(self, skdm: bytes, sender: Address, modification: str | None = None) -> None:
        step: Json = {"op": "process", "from": address_json(sender), "skdm": h(skdm)}
        if modification:
            step["modification"] = modification
        devices = self.groups.get(SenderKeyDistributionMessage.decode(skdm).group_id)
        try:
            self.store.process_distribution(skdm, sender=sender, group_devices=devices)
        except Exception as exc:  # the reference's verdict is what gets recorded
            step.update(result="invalid", error=getattr(exc, "code", type(exc).__name__))
        else:
            step["result"] = "valid"
        step["records"] = store_json(self.store)
        self.steps.append(step)

    def case(self, comment: str, flags: tuple[str, ...]) -> Json:
        errors = [s["error"] for s in self.steps if s.get("result") == "invalid"]
        return case(
            comment,
            result="invalid" if errors else "valid",
            error=errors[0] if errors else None,
            flags=flags,
            groups={h(g): [address_json(a) for a in sorted(d)] for g, d in self.groups.items()},
            steps=self.steps,
        )


def _store_transcripts(max_records: int) -> list[Json]:
    bob, stranger = Address("bob", 1), Address("stranger", 1)
    members = [ALICE, Address("alice", 2), bob, MALLORY]
    held, elsewhere = bytes(range(16)), bytes(range(16, 32))
    tests = []

    t = _StoreTranscript("unknown-group", max_records, {held: members})
    t.process(t.distribution(elsewhere, ALICE), ALICE, "a member's SKDM for a group not held")
    t.process(t.distribution(held, ALICE), ALICE)
    tests.append(t.case("an SKDM for a group the device does not hold", ("UnknownGroup",)))

    t = _StoreTranscript("not-a-member", max_records, {held: members})
    t.process(t.distribution(held, stranger), stranger, "a contact's own SKDM for the group")
    t.process(t.distribution(held, Address("alice", 3)), Address("alice", 3), "unlisted device")
    t.process(t.distribution(held, bob), bob)
    tests.append(t.case("SKDMs from devices that are not a member's", ("NotAMember",)))

    t = _StoreTranscript("forwarded", max_records, {held: members})
    alices = t.distribution(held, ALICE)
    t.process(alices, MALLORY, "alice's SKDM, delivered by mallory")
    t.process(alices, ALICE)
    tests.append(t.case("a member hands on another member's SKDM", ("ForwardedDistribution",)))

    t = _StoreTranscript("over-limit", max_records, {held: members, elsewhere: [ALICE, bob]})
    t.process(t.distribution(held, ALICE), ALICE)
    t.process(t.distribution(held, bob), bob)
    t.process(t.distribution(held, MALLORY), MALLORY, "a third record")
    t.process(t.distribution(elsewhere, ALICE), ALICE, "a third record, in another group")
    t.process(t.distribution(held, ALICE), ALICE, "alice's next chain, in her held record")
    tests.append(t.case(f"{max_records} records held: a new one is refused", ("OverLimit",)))

    t = _StoreTranscript("check-order", max_records, {held: members})
    t.process(
        t.distribution(elsewhere, ALICE),
        stranger,
        "alice's SKDM for a group not held, delivered by a stranger",
    )
    t.process(t.distribution(held, ALICE), stranger, "alice's SKDM, delivered by a stranger")
    t.process(t.distribution(held, ALICE), MALLORY, "alice's SKDM, delivered by mallory")
    tests.append(
        t.case(
            "two defects at once: group, then member, then sender",
            ("CheckOrder", "UnknownGroup", "NotAMember", "ForwardedDistribution"),
        )
    )
    return tests


# ------------------------------------------------------------------ split detection


def _state(label: str, epoch: int) -> StateClaim:
    """A made-up group state: its hash is SHA-256 of ``label`` and the epoch, as text."""
    return StateClaim(epoch, hashlib.sha256(f"{label} {epoch}".encode()).digest())


def _chain(label: str, first: int, last: int) -> list[StateClaim]:
    return [_state(label, epoch) for epoch in range(first, last + 1)]


def _states_json(states: list[StateClaim]) -> list[Any]:
    return [[s.epoch, h(s.state_hash)] for s in states]


def _kept_json(claims: PeerClaims) -> list[Any]:
    _, entries = unpack(claims.to_bytes(), what="test")
    return [[u, d, e, h(state_hash), reported] for u, d, e, state_hash, reported in entries]


def _relation_to(held: list[StateClaim]) -> Relation:
    """How the group layer relates a claim to a receiver holding ``held``."""
    return lambda claim: state_relation(held, claim.epoch, claim.state_hash)


def _reported(relation: StateRelation | None) -> str | None:
    return None if relation is None else relation.value


class _SplitTranscript:
    def __init__(self) -> None:
        self.claims = PeerClaims()
        self.steps: list[Json] = []

    def observe(
        self, held: list[StateClaim], sender: Address, claim: StateClaim, *, explained: bool
    ) -> None:
        relation = _relation_to(held)
        report = self.claims.observe(sender, claim, relation, ahead_explained=explained)
        self.steps.append(
            {
                "op": "observe",
                "held": _states_json(held),
                "explained": explained,
                "from": address_json(sender),
                "claim": _states_json([claim])[0],
                "relation": relation(claim).value,
                "report": _reported(report),
                "kept": _kept_json(self.claims),
            }
        )

    def rejudge(self, held: list[StateClaim], *, explained: bool) -> None:
        report = self.claims.rejudge(_relation_to(held), ahead_explained=explained)
        self.steps.append(
            {
                "op": "rejudge",
                "held": _states_json(held),
                "explained": explained,
                "report": [
                    [*address_json(a), c.epoch, h(c.state_hash), r.value] for a, c, r in report
                ],
                "kept": _kept_json(self.claims),
            }
        )

    def case(self, comment: str, flags: tuple[str, ...]) -> Json:
        return case(comment, flags=flags, steps=self.steps)


def _split_transcripts() -> list[Json]:
    bob, carol, dave = Address("bob", 1), Address("carol", 2), Address("dave", 1)
    held = _chain("main", 3, 6)
    tests = []

    t = _SplitTranscript()
    t.observe(held, bob, _state("main", 6), explained=False)
    t.observe(held, carol, _state("main", 4), explained=False)
    tests.append(t.case("the same state, and one behind on the receiver's chain", ("SameState",)))

    t = _SplitTranscript()
    t.observe(held, bob, _state("other", 6), explained=False)
    t.observe(held, bob, _state("other", 6), explained=True)
    t.observe(held, carol, _state("other", 6), explained=False)
    t.observe(held, bob, _state("another", 6), explained=False)
    t.observe(held, bob, _state("main", 6), explained=False)
    t.observe(held, bob, _state("another", 6), explained=False)
    t.observe(held, carol, _state("other", 4), explained=False)
    tests.append(
        t.case(
            "another state at an epoch the receiver holds: once per sender and state",
            ("ForkedState",),
        )
    )

    t = _SplitTranscript()
    t.observe(held, bob, _state("main", 2), explained=False)
    tests.append(t.case("an epoch older than every state held", ("OlderThanHeld",)))

    t = _SplitTranscript()
    t.observe(held, bob, _state("main", 7), explained=False)
    t.observe(held, bob, _state("main", 7), explained=False)
    t.rejudge(_chain("main", 4, 7), explained=False)
    tests.append(
        t.case(
            "a sender ahead with no held change to explain it: withheld from the receiver",
            ("WithheldChange",),
        )
    )

    t = _SplitTranscript()
    t.observe(held, bob, _state("main", 7), explained=True)
    t.observe(held, carol, _state("other", 7), explained=True)
    t.observe(held, dave, _state("main", 9), explained=True)
    t.rejudge(held, explained=True)
    t.rejudge(_chain("main", 4, 7), explained=True)
    t.rejudge(_chain("main", 4, 7), explained=False)
    t.rejudge([*_chain("main", 4, 6), _state("other", 7), *_chain("x", 8, 9)], explained=False)
    tests.append(
        t.case(
            "senders ahead while held changes explain it, judged as the receiver moves",
            ("SenderAhead", "ForkedState", "WithheldChange"),
        )
    )

    t = _SplitTranscript()
    t.observe(held, bob, _state("other", 7), explained=False)
    t.rejudge(_chain("main", 4, 7), explained=False)
    tests.append(
        t.case(
            "a sender reported ahead proves to be on another branch: reported again",
            ("WithheldChange", "ForkedState"),
        )
    )

    t = _SplitTranscript()
    t.observe(held, bob, _state("other", 6), explained=False)
    t.rejudge([*_chain("main", 3, 5), _state("other", 6)], explained=False)
    tests.append(
        t.case("the receiver moves to the sender's state: forgotten", ("ForkedState", "SameState"))
    )
    return tests


def generate() -> Json:
    default = (MAX_SENDER_KEY_FORWARD_JUMP, MAX_SENDER_MESSAGE_KEYS, MAX_SENDER_KEY_STATES)
    small = (5, 3, 2)
    return vector_file(
        NAME,
        description=(
            "Sender Keys transcripts: key creation from recorded randomness, SKDMs, exact group "
            "messages, and the receiver's chains after each delivery, refused or not; which "
            "SKDMs a device's store takes at all; how a receiver judges the group state a "
            "message's sender claims."
        ),
        spec=["04-sender-keys.md"],
        notes=NOTES,
        groups=[
            _group(default, _default_transcripts(default)),
            _group(small, _limit_transcripts(small)),
            {"type": "SenderKeyStore", "max_records": 2, "tests": _store_transcripts(2)},
            {"type": "SplitDetection", "tests": _split_transcripts()},
        ],
    )


# ------------------------------------------------------------------ verification


def verify_test(group: Json, test: Json) -> list[str]:
    if group["type"] == "SenderKeyStore":
        return _verify_store(group, test)
    if group["type"] == "SplitDetection":
        return _verify_split(test)
    c = Checker()
    group_id = unhex(test["group_id"])
    sender = address_of(test["sender"])
    received_from = address_of(test["received_from"])
    record = SenderKeyRecord(group_id)
    keys: list[OutboundSenderKey] = []
    for index, step in enumerate(test["steps"]):
        where = f"step {index} ({step['op']})"
        op = step["op"]
        if op == "create":
            rng = p.ScriptedRandom([unhex(r) for r in step["random"]])
            key = OutboundSenderKey.create(group_id, 0, rng)
            keys.append(key)
            c.equal(f"{where} chain_id", step["chain_id"], key.chain_id)
            c.equal(f"{where} signing_key", step["signing_key"], h(key.signing_key))
        elif op == "distribute":
            key = keys[step["key"]]
            c.equal(f"{where} iteration", step["iteration"], key.iteration)
            c.equal(f"{where} skdm", step["skdm"], h(key.distribution_message(sender=sender)))
        elif op == "process":
            before = record.to_bytes()
            skdm = unhex(step["skdm"])
            process = partial(
                record.process_distribution,
                skdm,
                sender=received_from,
                max_states=group["max_states"],
                max_forward_jump=group["max_forward_jump"],
            )
            c.outcome(where, step, process)
            if step["result"] == "invalid":
                c.equal(f"{where} state unchanged", h(before), h(record.to_bytes()))
            c.equal(f"{where} state", step["state"], record_json(record))
        elif op == "encrypt":
            key = keys[step["key"]]
            c.equal(f"{where} iteration", step["iteration"], key.iteration)
            message = key.encrypt(unhex(step["plaintext"]), sender=sender)
            c.equal(f"{where} message", step["message"], h(message))
        elif op in ("deliver", "duplicate"):
            before = record.to_bytes()
            data = unhex(step["message"])
            decrypt = partial(
                record.decrypt,
                data,
                sender=received_from,
                max_forward_jump=group["max_forward_jump"],
                max_message_keys=group["max_message_keys"],
            )
            plaintext = c.outcome(where, step, decrypt)
            if plaintext is None:
                c.equal(f"{where} state unchanged", h(before), h(record.to_bytes()))
            else:
                c.equal(f"{where} plaintext", step["plaintext"], h(plaintext))
            c.equal(f"{where} state", step["state"], record_json(record))
        elif op != "drop":
            c.fail(f"{where}: unknown op")
    return c.failures


def _verify_store(group: Json, test: Json) -> list[str]:
    c = Checker()
    store = SenderKeyStore(max_records=group["max_records"])
    groups = {unhex(g): {address_of(a) for a in devices} for g, devices in test["groups"].items()}
    for index, step in enumerate(test["steps"]):
        where = f"step {index} ({step['op']})"
        if step["op"] != "process":
            c.fail(f"{where}: unknown op")
            continue
        before = store_json(store)
        skdm = unhex(step["skdm"])
        devices = groups.get(SenderKeyDistributionMessage.decode(skdm).group_id)
        process = partial(
            store.process_distribution,
            skdm,
            sender=address_of(step["from"]),
            group_devices=devices,
        )
        c.outcome(where, step, process)
        if step["result"] == "invalid":
            c.equal(f"{where} records unchanged", before, store_json(store))
        c.equal(f"{where} records", step["records"], store_json(store))
    return c.failures


def _verify_split(test: Json) -> list[str]:
    c = Checker()
    claims = PeerClaims()

    def states(items: list[Any]) -> list[StateClaim]:
        return [StateClaim(epoch, unhex(state_hash)) for epoch, state_hash in items]

    for index, step in enumerate(test["steps"]):
        where = f"step {index} ({step['op']})"
        relation = _relation_to(states(step["held"]))
        explained = step["explained"]
        if step["op"] == "observe":
            (claim,) = states([step["claim"]])
            sender = address_of(step["from"])
            c.equal(f"{where} relation", step["relation"], relation(claim).value)
            found = claims.observe(sender, claim, relation, ahead_explained=explained)
            c.equal(f"{where} report", step["report"], _reported(found))
        elif step["op"] == "rejudge":
            report = [
                [*address_json(a), x.epoch, h(x.state_hash), r.value]
                for a, x, r in claims.rejudge(relation, ahead_explained=explained)
            ]
            c.equal(f"{where} report", step["report"], report)
        else:
            c.fail(f"{where}: unknown op")
            continue
        c.equal(f"{where} kept", step["kept"], _kept_json(claims))
    return c.failures
