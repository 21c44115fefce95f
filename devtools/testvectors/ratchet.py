"""double_ratchet.json: scripted Alice/Bob transcripts over the Double Ratchet alone.

Each test starts both parties from a shared secret SK and associated data AD
(as PQXDH leaves them), Bob's signed prekey pair as his first ratchet key
pair and Alice's first ratchet private key, then runs ``steps``:

* ``encrypt``: ``party`` encrypts ``plaintext``; the message key, header and
  exact message bytes (a RatchetMessage) are given, and the party's state after.
* ``deliver`` / ``duplicate``: ``party`` receives ``message`` (a first
  delivery, possibly modified, or a repeat); ``random`` lists the bytes the
  receiver draws (a new ratchet private key on a DH step, nothing otherwise).
  Valid: ``plaintext`` and the state after. Invalid: ``error``, and the state
  is exactly as before (section "Transactional decryption" of the spec).
* ``drop``: the message is never delivered (no action).

The test group fixes ``max_skip`` and ``max_skipped_keys``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from hushchat.protocol import primitives as p
from hushchat.protocol.consts import (
    MAX_PREVIOUS_RATCHET_KEYS,
    MAX_SKIP,
    MAX_SKIPPED_KEYS,
    PROTOCOL_VERSION,
)
from hushchat.protocol.double_ratchet import Header, RatchetState, kdf_ck
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.protocol.messages import RatchetMessage, decode_message
from hushchat.protocol.pqxdh import Party, associated_data

from ._common import Checker, Json, Recorder, case, h, note, opt_h, seeded, unhex, vector_file

NAME = "double_ratchet"
LOW_ORDER_U = unhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
NON_CANONICAL_U = unhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")

NOTES = {
    "InOrder": note("BASIC", "Messages delivered in the order sent, with DH ratchet steps."),
    "OutOfOrder": note("BASIC", "Messages delivered out of order, using stored skipped keys."),
    "AcrossRatchetSteps": note(
        "BASIC", "Late messages from a chain that a DH ratchet step has finished (found via PN)."
    ),
    "Dropped": note("BASIC", "Some messages are never delivered."),
    "ModifiedTag": note("AUTH_BYPASS", "The tag of a real message is modified."),
    "ModifiedCiphertext": note("AUTH_BYPASS", "The ciphertext of a real message is modified."),
    "ModifiedHeader": note("AUTH_BYPASS", "The header of a real message is modified."),
    "Truncated": note("BASIC", "The message bytes end early."),
    "ShortBody": note("BASIC", "The body is shorter than one block plus the tag."),
    "UnknownVersion": note(
        "BASIC", f"The header names a protocol version other than {PROTOCOL_VERSION}."
    ),
    "UnknownType": note("BASIC", "The message type is neither 1 nor 2."),
    "Duplicate": note("REPLAY", "A message delivered twice: DUPLICATE_MESSAGE, state unchanged."),
    "FinishedChain": note(
        "REPLAY",
        "A repeat of a message on a chain that a DH ratchet step has finished; its ratchet key "
        "is among the remembered previous keys, so the error is DUPLICATE_MESSAGE.",
    ),
    "LowOrderRatchetKey": note(
        "CONFIDENTIALITY", "A header carries a ratchet key of low order: the DH output is zero."
    ),
    "NonCanonicalRatchetKey": note("CAN_OF_WORMS", "A header carries a ratchet key with u >= p."),
    "ForgedRatchetStep": note(
        "DOS",
        "A forged message with a fresh ratchet key fails its MAC; the receiver draws no "
        "randomness and keeps its state.",
    ),
    "SignedPreKeyAsRatchetKey": note(
        "EDGE_CASE",
        "Before any reply, the initiator receives a header naming the responder's signed prekey, "
        "for which it has no receiving chain: INVALID_KEY.",
    ),
    "SkipLimit": note(
        "DOS", "A counter more than max_skip ahead of the chain: TOO_FAR_IN_FUTURE; one less works."
    ),
    "SkipLimitPreviousChain": note(
        "DOS", "PN makes the receiver skip more than max_skip keys of the finished chain."
    ),
    "Evicted": note(
        "DOS",
        "More skipped keys than max_skipped_keys: the oldest are evicted and their messages "
        "become DUPLICATE_MESSAGE.",
    ),
}


def state_json(state: RatchetState) -> Json:
    """The Double Ratchet state variables (spec/03-double-ratchet.md, "State")."""
    return {
        "root_key": h(state.root_key),
        "ratchet_private": h(p.x25519_private_bytes(state.self_private)),
        "ratchet_public": h(state.self_public),
        "remote_ratchet_key": opt_h(state.remote_ratchet_key),
        "sending_chain_key": opt_h(state.send_chain),
        "receiving_chain_key": opt_h(state.receive_chain),
        "send_count": state.send_count,
        "receive_count": state.receive_count,
        "previous_send_count": state.previous_send_count,
        "skipped_keys": [[h(key), n, h(mk)] for (key, n), mk in state.skipped.items()],
        "previous_ratchet_keys": [h(key) for key in state.previous_ratchet_keys],
    }


def _pickle(state: RatchetState) -> bytes:
    return pack(state.to_wire())


def receive(
    state: RatchetState,
    message: bytes,
    associated: bytes,
    rng: p.RandomSource,
    max_skip: int,
    max_skipped_keys: int,
) -> bytes:
    """Decode a RatchetMessage and decrypt it (what a receiver does with the bytes)."""
    decoded = decode_message(message)
    if not isinstance(decoded, RatchetMessage):
        raise AssertionError("the transcripts carry RatchetMessages only")
    return state.decrypt(
        decoded.header,
        decoded.body,
        associated,
        rng=rng,
        max_skip=max_skip,
        max_skipped_keys=max_skipped_keys,
    )


class _Transcript:
    """Runs the reference implementation and records every step."""

    def __init__(self, label: str, max_skip: int, max_skipped_keys: int) -> None:
        rng = seeded("double_ratchet/" + label)
        alice_identity = IdentityKeyPair(rng.random_bytes(32)).public
        bob_identity = IdentityKeyPair(rng.random_bytes(32)).public
        self.shared_secret = rng.random_bytes(32)
        users = seeded(f"double_ratchet/{label}/users")
        alice = Party("alice", 1, IdentityKeyPair(users.random_bytes(32)).public.ed25519)
        bob = Party("bob", 1, IdentityKeyPair(users.random_bytes(32)).public.ed25519)
        self.associated = associated_data(alice_identity, bob_identity, alice, bob)
        self.bob_ratchet = rng.random_bytes(32)
        self.alice_ratchet = rng.random_bytes(32)
        self.bob_ratchet_public = p.x25519_public_bytes(
            p.x25519_private_from_bytes(self.bob_ratchet)
        )
        self.states = {
            "alice": RatchetState.initiator(
                self.shared_secret, self.bob_ratchet_public, p.ScriptedRandom([self.alice_ratchet])
            ),
            "bob": RatchetState.responder(
                self.shared_secret, p.x25519_private_from_bytes(self.bob_ratchet)
            ),
        }
        self.rngs = {
            name: Recorder(seeded(f"double_ratchet/{label}/{name}")) for name in self.states
        }
        self.max_skip = max_skip
        self.max_skipped_keys = max_skipped_keys
        self.messages: list[tuple[str, bytes]] = []
        self.steps: list[Json] = []

    def send(self, party: str, count: int = 1) -> list[int]:
        ids = []
        for _ in range(count):
            state = self.states[party]
            msg_id = len(self.messages)
            plaintext = f"{party} message {msg_id}".encode()
            assert state.send_chain is not None
            message_key, _ = kdf_ck(state.send_chain)
            header, body = state.encrypt(plaintext, self.associated)
            message = RatchetMessage(header, body).encode()
            self.messages.append((party, message))
            self.steps.append(
                {
                    "op": "encrypt",
                    "party": party,
                    "msg_id": msg_id,
                    "plaintext": h(plaintext),
                    "message_key": h(message_key),
                    "header": h(header),
                    "message": h(message),
                    "state": state_json(state),
                }
            )
            ids.append(msg_id)
        return ids

    def drop(self, msg_id: int) -> None:
        self.steps.append({"op": "drop", "msg_id": msg_id})

    def deliver(
        self,
        msg_id: int | None,
        *,
        to: str | None = None,
        message: bytes | None = None,
        modification: str | None = None,
        op: str = "deliver",
    ) -> None:
        if msg_id is not None:
            sender, original = self.messages[msg_id]
            to = to or ("bob" if sender == "alice" else "alice")
            message = original if message is None else message
        assert to is not None and message is not None
        state, rng = self.states[to], self.rngs[to]
        step: Json = {"op": op, "party": to, "msg_id": msg_id}
        if modification is not None:
            step["modification"] = modification
        step["message"] = h(message)
        try:
            plaintext = receive(
                state, message, self.associated, rng, self.max_skip, self.max_skipped_keys
            )
        except Exception as exc:  # the reference's verdict is what gets recorded
            step.update(result="invalid", error=getattr(exc, "code", type(exc).__name__))
            step["random"] = rng.take()
            assert not step["random"], "a refused message drew randomness"
        else:
            step.update(result="valid", plaintext=h(plaintext), random=rng.take())
        step["state"] = state_json(state)
        self.steps.append(step)

    def modified(self, msg_id: int, change: Callable[[list[Any]], None]) -> bytes:
        fields = unpack(self.messages[msg_id][1], what="test")
        change(fields)
        return pack(fields)

    def case(self, comment: str, flags: tuple[str, ...]) -> Json:
        errors = [s["error"] for s in self.steps if s.get("result") == "invalid"]
        return case(
            comment,
            result="invalid" if errors else "valid",
            error=errors[0] if errors else None,
            flags=flags,
            shared_secret=h(self.shared_secret),
            associated_data=h(self.associated),
            alice_ratchet_private=h(self.alice_ratchet),
            bob_ratchet_private=h(self.bob_ratchet),
            bob_ratchet_public=h(self.bob_ratchet_public),
            steps=self.steps,
        )


def _header_with(message: bytes, **changes: int | bytes) -> tuple[bytes, bytes]:
    """(new header, body) of a RatchetMessage with header fields replaced."""
    _, header, body = unpack(message, what="test")
    version, key, pn, n = unpack(header, what="test")
    values = {"version": version, "ratchet_key": key, "pn": pn, "n": n}
    values.update(changes)
    new = pack([values["version"], values["ratchet_key"], values["pn"], values["n"]])
    return new, body


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


def _valid_transcripts(limits: tuple[int, int]) -> list[Json]:
    tests = []
    t = _Transcript("ping-pong", *limits)
    for _ in range(3):
        (a,) = t.send("alice")
        t.deliver(a)
        (b,) = t.send("bob")
        t.deliver(b)
    for a in t.send("alice", 2):
        t.deliver(a)
    tests.append(
        t.case("ping-pong: three DH ratchet steps each way, then two in a row", ("InOrder",))
    )

    t = _Transcript("reorder", *limits)
    a0, a1, a2, a3 = t.send("alice", 4)
    for msg_id in (a2, a0, a3, a1):
        t.deliver(msg_id)
    (b0,) = t.send("bob")
    t.deliver(b0)
    tests.append(t.case("one chain delivered as 2, 0, 3, 1", ("OutOfOrder",)))

    t = _Transcript("across-steps", *limits)
    a0, a1, a2 = t.send("alice", 3)
    t.deliver(a0)
    (b0,) = t.send("bob")
    t.deliver(b0)
    (a3,) = t.send("alice")
    t.deliver(a3)
    t.deliver(a2)
    t.deliver(a1)
    (b1,) = t.send("bob")
    t.deliver(b1)
    tests.append(
        t.case(
            "a DH step overtakes two messages of the previous chain (PN = 3)",
            ("OutOfOrder", "AcrossRatchetSteps"),
        )
    )

    t = _Transcript("dropped", *limits)
    a0, a1, a2 = t.send("alice", 3)
    t.deliver(a0)
    t.drop(a1)
    t.deliver(a2)
    b0, b1 = t.send("bob", 2)
    t.drop(b0)
    t.deliver(b1)
    (a3,) = t.send("alice")
    t.deliver(a3)
    tests.append(t.case("messages 1 and 4 are never delivered", ("Dropped",)))
    return tests


def _negative_transcripts(limits: tuple[int, int]) -> list[Json]:
    tests = []

    def one(
        label: str, comment: str, flag: str, forge: Callable[[_Transcript, int], bytes]
    ) -> None:
        t = _Transcript(label, *limits)
        a0, a1 = t.send("alice", 2)
        t.deliver(a0, message=forge(t, a0), modification=comment)
        t.deliver(a0)
        t.deliver(a1)
        tests.append(t.case(comment + "; then the real message decrypts", (flag,)))

    def body_flip(index: int) -> Callable[[_Transcript, int], bytes]:
        def forge(t: _Transcript, msg_id: int) -> bytes:
            return t.modified(msg_id, lambda f: f.__setitem__(2, _flip(f[2], index % len(f[2]))))

        return forge

    def header_change(**changes: int | bytes) -> Callable[[_Transcript, int], bytes]:
        def forge(t: _Transcript, msg_id: int) -> bytes:
            header, body = _header_with(t.messages[msg_id][1], **changes)
            return RatchetMessage(header, body).encode()

        return forge

    one("tag", "last tag byte flipped", "ModifiedTag", body_flip(-1))
    one("ciphertext", "first ciphertext byte flipped", "ModifiedCiphertext", body_flip(0))
    one("header", "header counter N changed from 0 to 1", "ModifiedHeader", header_change(n=1))
    one("truncated", "last byte cut off", "Truncated", lambda t, m: t.messages[m][1][:-1])
    one(
        "short-body",
        "body cut to 31 bytes (re-encoded)",
        "ShortBody",
        lambda t, m: t.modified(m, lambda f: f.__setitem__(2, f[2][:31])),
    )
    one(
        "version",
        f"header version {PROTOCOL_VERSION + 1}",
        "UnknownVersion",
        header_change(version=PROTOCOL_VERSION + 1),
    )
    one(
        "type",
        "message type 3",
        "UnknownType",
        lambda t, m: t.modified(m, lambda f: f.__setitem__(0, 3)),
    )
    one(
        "low-order",
        "header ratchet key of low order",
        "LowOrderRatchetKey",
        header_change(ratchet_key=LOW_ORDER_U),
    )
    one(
        "non-canonical",
        "header ratchet key u = p",
        "NonCanonicalRatchetKey",
        header_change(ratchet_key=NON_CANONICAL_U),
    )
    fresh = p.x25519_public_bytes(p.x25519_generate(seeded("double_ratchet/forged-key")))
    one(
        "forged-step",
        "header ratchet key replaced by a fresh key",
        "ForgedRatchetStep",
        header_change(ratchet_key=fresh),
    )

    t = _Transcript("duplicate", *limits)
    a0, a1 = t.send("alice", 2)
    t.deliver(a0)
    t.deliver(a0, op="duplicate")
    t.deliver(a1)
    tests.append(t.case("message 0 delivered twice; then message 1", ("Duplicate",)))

    t = _Transcript("duplicate-skipped", *limits)
    a0, a1, a2 = t.send("alice", 3)
    t.deliver(a1)
    t.deliver(a0)
    t.deliver(a0, op="duplicate")
    t.deliver(a2)
    tests.append(
        t.case(
            "a message decrypted with a skipped key, delivered again", ("Duplicate", "OutOfOrder")
        )
    )

    t = _Transcript("finished-chain", *limits)
    a0, a1 = t.send("alice", 2)
    t.deliver(a0)
    (b0,) = t.send("bob")
    t.deliver(b0)
    (a2,) = t.send("alice")
    t.deliver(a2)
    t.deliver(a0, op="duplicate")
    t.deliver(a1)
    tests.append(
        t.case(
            "a repeat of message 0 after a DH step finished its chain; then late message 1",
            ("FinishedChain",),
        )
    )

    t = _Transcript("signed-prekey-header", *limits)
    (a0,) = t.send("alice")
    forged = RatchetMessage(Header(t.bob_ratchet_public, 0, 0).encode(), bytes(32)).encode()
    t.deliver(None, to="alice", message=forged, modification="header names Bob's signed prekey")
    t.deliver(a0)
    (b0,) = t.send("bob")
    t.deliver(b0)
    tests.append(
        t.case(
            "Alice receives a header naming Bob's signed prekey before any reply",
            ("SignedPreKeyAsRatchetKey",),
        )
    )
    return tests


def _skip_limit_transcripts(limits: tuple[int, int]) -> list[Json]:
    max_skip = limits[0]
    tests = []
    t = _Transcript("skip-limit", *limits)
    ids = t.send("alice", max_skip + 2)
    t.deliver(ids[-1])
    t.deliver(ids[-2])
    t.deliver(ids[0])
    tests.append(
        t.case(
            f"message {max_skip + 1} would skip {max_skip + 1} keys; message {max_skip} skips "
            f"{max_skip}",
            ("SkipLimit",),
        )
    )

    t = _Transcript("skip-limit-previous-chain", *limits)
    ids = t.send("alice", max_skip + 3)
    t.deliver(ids[0])
    (b0,) = t.send("bob")
    t.deliver(b0)
    (late,) = t.send("alice")
    t.deliver(late)
    t.deliver(ids[max_skip])
    t.deliver(late)
    tests.append(
        t.case(
            f"a DH step with PN = {max_skip + 3} after message 0: {max_skip + 2} old keys to skip; "
            f"after message {max_skip} arrives, the step works",
            ("SkipLimitPreviousChain",),
        )
    )
    return tests


def _eviction_transcripts(limits: tuple[int, int]) -> list[Json]:
    max_skipped_keys = limits[1]
    t = _Transcript("evicted", *limits)
    ids = t.send("alice", max_skipped_keys + 3)
    t.deliver(ids[-1])
    t.deliver(ids[0])
    t.deliver(ids[2])
    return [
        t.case(
            f"message {ids[-1]} stores {ids[-1]} skipped keys, {max_skipped_keys} kept: "
            "message 0 is gone, message 2 still decrypts",
            ("Evicted",),
        )
    ]


def _group(limits: tuple[int, int], tests: list[Json]) -> Json:
    return {
        "type": "DoubleRatchetTranscript",
        "max_skip": limits[0],
        "max_skipped_keys": limits[1],
        "max_previous_ratchet_keys": MAX_PREVIOUS_RATCHET_KEYS,
        "tests": tests,
    }


def generate() -> Json:
    default = (MAX_SKIP, MAX_SKIPPED_KEYS)
    small_skip = (5, MAX_SKIPPED_KEYS)
    small_store = (10, 3)
    groups = [
        _group(default, _valid_transcripts(default) + _negative_transcripts(default)),
        _group(small_skip, _skip_limit_transcripts(small_skip)),
        _group(small_store, _eviction_transcripts(small_store)),
    ]
    return vector_file(
        NAME,
        description=(
            "Double Ratchet transcripts between Alice (initiator) and Bob: exact messages, keys "
            "and states for in-order, out-of-order, dropped and refused messages."
        ),
        spec=["03-double-ratchet.md"],
        notes=NOTES,
        groups=groups,
    )


# ------------------------------------------------------------------ verification


def verify_test(group: Json, test: Json) -> list[str]:
    c = Checker()
    max_skip, max_skipped_keys = group["max_skip"], group["max_skipped_keys"]
    secret = unhex(test["shared_secret"])
    associated = unhex(test["associated_data"])
    bob_private = p.x25519_private_from_bytes(unhex(test["bob_ratchet_private"]))
    c.equal("bob_ratchet_public", test["bob_ratchet_public"], h(p.x25519_public_bytes(bob_private)))
    states = {
        "alice": RatchetState.initiator(
            secret,
            unhex(test["bob_ratchet_public"]),
            p.ScriptedRandom([unhex(test["alice_ratchet_private"])]),
        ),
        "bob": RatchetState.responder(secret, bob_private),
    }
    for index, step in enumerate(test["steps"]):
        where = f"step {index} ({step['op']})"
        if step["op"] == "drop":
            continue
        state = states[step["party"]]
        if step["op"] == "encrypt":
            assert state.send_chain is not None
            c.equal(f"{where} message_key", step["message_key"], h(kdf_ck(state.send_chain)[0]))
            header, body = state.encrypt(unhex(step["plaintext"]), associated)
            c.equal(f"{where} header", step["header"], h(header))
            c.equal(f"{where} message", step["message"], h(RatchetMessage(header, body).encode()))
        else:
            rng = p.ScriptedRandom([unhex(r) for r in step["random"]])
            before = _pickle(state)
            attempt = partial(
                receive, state, unhex(step["message"]), associated, rng, max_skip, max_skipped_keys
            )
            plaintext = c.outcome(where, step, attempt)
            if plaintext is None:
                c.equal(f"{where} state unchanged", h(before), h(_pickle(state)))
            else:
                c.equal(f"{where} plaintext", step["plaintext"], h(plaintext))
            c.equal(f"{where} randomness drawn", step["random"], [h(u) for u in rng.used])
        c.equal(f"{where} state", step["state"], state_json(state))
    return c.failures
