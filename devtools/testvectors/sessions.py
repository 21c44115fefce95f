"""session.json: session records across handshakes, replies, resets and identity changes.

Each test names its parties (``parties``: user id, device id, user
identity, and the draws that make the device's keys, as spec/02-pqxdh.md
section 2.2 orders them), then runs steps against each party's session
record for one peer; every session binds both parties' user id, device id
and user identity (spec/02-pqxdh.md section 2.4):

* ``start``: ``party`` starts a session with ``peer`` from ``bundle``
  (drawing ``random`` and taking ``encapsulation`` for PQXDH); it becomes
  the party's current session with that peer.
* ``encrypt``: ``party`` encrypts ``plaintext`` for ``peer`` at time ``now``:
  ``message`` (a PreKeyMessage until the session is acknowledged), or ``error``.
* ``deliver``: ``party`` receives ``message`` from ``peer`` at ``now``,
  drawing ``random``, trusting a changed identity only if
  ``trust_new_identity``: ``plaintext`` and ``new_session``, or ``error``
  with nothing changed.
* ``rotate_signed_prekey`` and ``prune``: ``party``'s signed prekey
  maintenance at ``now`` (spec/02-pqxdh.md section 2.2).
* ``drop``: never delivered.

Every step but ``drop`` gives the acting party's prekeys as ``state``
(one-time X25519 prekeys left, signed prekey ids, remembered base keys);
after ``start``, ``encrypt`` and ``deliver`` also its record for the peer:
current and previous sessions (base key, role, whether acknowledged, peer
identity). No two draws of a transcript are equal: the generator refuses one
that repeats a draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from hushchat.protocol import primitives as p
from hushchat.protocol.account import Account
from hushchat.protocol.consts import MAX_UNACKNOWLEDGED_SESSION_AGE, SIGNED_PREKEY_GRACE_PERIOD
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.protocol.pqxdh import Party
from hushchat.protocol.prekeys import PreKeyBundle
from hushchat.protocol.session import Session, SessionRecord

from ._common import Checker, Json, Recorder, case, h, note, seeded, unhex, vector_file
from ._pinned import PINNED

NAME = "session"

NOTES = {
    "Handshake": note("BASIC", "A session from a bundle, repeated PreKeyMessages, a reply."),
    "RepeatedPreKeyMessage": note(
        "BASIC",
        "Several PreKeyMessages with one base key: the first creates the session, the others "
        "go to it.",
    ),
    "Replay": note("REPLAY", "A PreKeyMessage delivered twice: DUPLICATE_MESSAGE."),
    "SimultaneousInitiation": note(
        "BASIC", "Both sides start a session at once; they converge on one."
    ),
    "Reset": note(
        "BASIC",
        "The initiator starts a new session; a late message of the old one still decrypts and "
        "makes the old session current again.",
    ),
    "IdentityChange": note(
        "AUTH_BYPASS",
        "A PreKeyMessage from a new identity key: UNTRUSTED_IDENTITY until the app confirms.",
    ),
    "NoSession": note("BASIC", "A RatchetMessage for which no session exists."),
    "SignedPreKeyRotation": note(
        "BASIC",
        "A replaced signed prekey still answers handshakes until the current one is "
        "SIGNED_PREKEY_GRACE_PERIOD old, not a second longer; pruning it drops the remembered "
        "base keys of handshakes made with it.",
    ),
    "StaleUnacknowledged": note(
        "BASIC",
        "An unanswered initiator session older than MAX_UNACKNOWLEDGED_SESSION_AGE is not used "
        "for sending (a local INVALID_STATE).",
    ),
}


@dataclass
class _Party:
    user_id: str
    device_id: int
    user_identity: bytes
    random: list[bytes]
    # Which pinned KEM keys the party's seeds are ("alice" or "bob"), for encapsulating to it.
    kem_family: str = ""
    account: Account = field(init=False)
    # Session records by peer address ("user.device"): a new identity of a
    # peer device meets the record of its old one.
    records: dict[str, SessionRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.account = Account.create(
            now=0, one_time_prekeys=1, rng=p.ScriptedRandom(list(self.random))
        )

    @property
    def address(self) -> str:
        return f"{self.user_id}.{self.device_id}"

    @property
    def party(self) -> Party:
        return Party(self.user_id, self.device_id, self.user_identity)

    def record(self, peer: _Party) -> SessionRecord:
        return self.records.setdefault(peer.address, SessionRecord())

    def to_json(self) -> Json:
        return {
            "user_id": self.user_id,
            "device_id": self.device_id,
            "user_identity": h(self.user_identity),
            "random": [h(r) for r in self.random],
        }


def _make_party(label: str, user_id: str, kem: str | None) -> _Party:
    """A party whose KEM keys are the pinned ``kem`` ones (others encapsulate to them), or
    fresh ones (``None``: nobody encapsulates to this party, so nothing needs pinning)."""
    rng = seeded("session/" + label)
    identity, signed_prekey = rng.random_bytes(32), rng.random_bytes(32)
    if kem is None:
        last_resort, one_time_kem = rng.random_bytes(64), rng.random_bytes(64)
    else:
        last_resort = PINNED[kem + "_last_resort"].key_seed()
        one_time_kem = PINNED[kem + "_one_time"].key_seed()
    one_time = rng.random_bytes(32)
    random = [identity, signed_prekey, last_resort, one_time, one_time_kem]
    # One user identity per user: a reinstalled device of the same user keeps it.
    user_identity = IdentityKeyPair(seeded("session/user " + user_id).random_bytes(32))
    return _Party(user_id, 1, user_identity.public.ed25519, random, kem or "")


def _session_json(session: Session) -> Json:
    return {
        "base_key": h(session.base_key),
        "initiator": session.is_initiator,
        "acknowledged": session.acknowledged,
        "remote_identity": h(session.remote_identity.ed25519),
    }


def account_json(party: _Party) -> Json:
    """The party's prekeys as far as sessions see them."""
    account = party.account
    return {
        "one_time_prekeys": account.one_time_prekey_count,
        "signed_prekeys": list(account.signed_prekey_ids),
        "remembered_base_keys": [
            [key_id, h(base)] for key_id, base in account.remembered_base_keys
        ],
    }


def state_json(party: _Party, peer: _Party) -> Json:
    record = party.record(peer)
    return {
        "current": None if record.current is None else _session_json(record.current),
        "previous": [_session_json(s) for s in record.previous],
        **account_json(party),
    }


def _pickles(party: _Party, peer: _Party) -> tuple[bytes, bytes]:
    return party.record(peer).to_bytes(), party.account.to_bytes()


class _Transcript:
    def __init__(self, label: str, parties: dict[str, _Party]) -> None:
        self.label = label
        self.parties = parties
        self.messages: list[tuple[str, str, bytes]] = []  # (sender, recipient, bytes)
        self.steps: list[Json] = []
        # Operations draw from a source of their own, never the one that made the keys.
        self.rng = {
            name: Recorder(seeded(f"session/{label}/{name}/operations")) for name in parties
        }

    def start(
        self, party: str, peer: str, *, one_time: bool, kem: str | None, now: int = 0
    ) -> None:
        """``kem``: the peer's KEM prekey to encapsulate to, or None for X3DH."""
        me, them = self.parties[party], self.parties[peer]
        post_quantum = kem is not None
        bundle = them.account.bundle(
            them.user_id, them.device_id, one_time=one_time, post_quantum=post_quantum
        )
        encapsulations = [PINNED[f"{them.kem_family}_{kem}"].encapsulation()] if kem else []
        draws = [self.rng[party].random_bytes(32), self.rng[party].random_bytes(32)]
        self.rng[party].take()
        session = me.account.create_outbound_session(
            bundle,
            local=me.party,
            remote=them.party,
            now=now,
            post_quantum=post_quantum,
            rng=p.ScriptedRandom(list(draws), encapsulations),
        )
        me.record(them).install(session)
        self.steps.append(
            {
                "op": "start",
                "party": party,
                "peer": peer,
                "now": now,
                "bundle": h(bundle.encode()),
                "random": [h(d) for d in draws],
                "encapsulation": [h(x) for x in encapsulations[0]] if encapsulations else None,
                "state": state_json(me, them),
            }
        )

    def encrypt(self, party: str, peer: str, *, now: int = 0) -> int:
        msg_id = len(self.messages)
        plaintext = f"{party} to {peer}, message {msg_id}".encode()
        step: Json = {
            "op": "encrypt",
            "party": party,
            "peer": peer,
            "now": now,
            "msg_id": msg_id,
            "plaintext": h(plaintext),
        }
        try:
            message = self.parties[party].record(self.parties[peer]).encrypt(plaintext, now=now)
        except Exception as exc:  # the reference's verdict is what gets recorded
            step.update(result="invalid", error=getattr(exc, "code", type(exc).__name__))
            message = b""
        else:
            step.update(result="valid", message=h(message))
        step["state"] = state_json(self.parties[party], self.parties[peer])
        self.messages.append((party, peer, message))
        self.steps.append(step)
        return msg_id

    def deliver(
        self,
        msg_id: int,
        *,
        to: str | None = None,
        now: int = 0,
        trust: bool = False,
    ) -> None:
        sender, recipient, message = self.messages[msg_id]
        party = to or recipient
        rng = self.rng[party]
        step: Json = {
            "op": "deliver",
            "party": party,
            "peer": sender,
            "now": now,
            "msg_id": msg_id,
            "message": h(message),
            "trust_new_identity": trust,
        }
        try:
            me, them = self.parties[party], self.parties[sender]
            result = me.record(them).decrypt(
                message,
                me.account,
                local=me.party,
                remote=them.party,
                now=now,
                rng=rng,
                trust_new_identity=trust,
            )
        except Exception as exc:  # the reference's verdict is what gets recorded
            step.update(result="invalid", error=getattr(exc, "code", type(exc).__name__))
            step["random"] = rng.take()
            assert not step["random"], "a refused message drew randomness"
        else:
            step.update(
                result="valid",
                plaintext=h(result.plaintext),
                new_session=result.new_session,
                random=rng.take(),
            )
        step["state"] = state_json(self.parties[party], self.parties[sender])
        self.steps.append(step)

    def _check_distinct_draws(self) -> None:
        """Every draw of the transcript differs from every other one, so a party that used
        one key in two roles (its signed prekey as its first ratchet key) cannot pass."""
        draws = [r for party in self.parties.values() for r in party.random]
        for step in self.steps:
            draws += [unhex(r) for r in step.get("random", [])]
            if step.get("encapsulation") is not None:
                draws.append(b"".join(unhex(x) for x in step["encapsulation"]))
        seen: set[bytes] = set()
        for draw in draws:
            if draw in seen:
                raise AssertionError(f"session/{self.label}: a draw repeats ({h(draw)[:16]}...)")
            seen.add(draw)

    def drop(self, msg_id: int) -> None:
        self.steps.append({"op": "drop", "msg_id": msg_id})

    def rotate_signed_prekey(self, party: str, *, now: int) -> None:
        me = self.parties[party]
        draw = self.rng[party].random_bytes(32)
        self.rng[party].take()
        key_id = me.account.rotate_signed_prekey(now=now, rng=p.ScriptedRandom([draw]))
        self.steps.append(
            {
                "op": "rotate_signed_prekey",
                "party": party,
                "now": now,
                "random": [h(draw)],
                "key_id": key_id,
                "state": account_json(me),
            }
        )

    def prune(self, party: str, *, now: int) -> None:
        me = self.parties[party]
        me.account.prune(now=now)
        self.steps.append({"op": "prune", "party": party, "now": now, "state": account_json(me)})

    def case(self, comment: str, flags: tuple[str, ...]) -> Json:
        self._check_distinct_draws()
        errors = [s["error"] for s in self.steps if s.get("result") == "invalid"]
        return case(
            comment,
            result="invalid" if errors else "valid",
            error=errors[0] if errors else None,
            flags=flags,
            parties={name: party.to_json() for name, party in self.parties.items()},
            steps=self.steps,
        )


def _alice_bob(label: str) -> _Transcript:
    return _Transcript(
        label,
        {
            "alice": _make_party(label + "/alice", "alice", "alice"),
            "bob": _make_party(label + "/bob", "bob", "bob"),
        },
    )


def _tests() -> list[Json]:
    tests = []
    t = _alice_bob("handshake")
    t.start("alice", "bob", one_time=True, kem="one_time")
    a0 = t.encrypt("alice", "bob")
    a1 = t.encrypt("alice", "bob")
    t.deliver(a0)
    t.deliver(a1)
    b0 = t.encrypt("bob", "alice")
    t.deliver(b0)
    a2 = t.encrypt("alice", "bob")
    t.deliver(a2)
    tests.append(
        t.case(
            "two PreKeyMessages, a reply, then a RatchetMessage",
            ("Handshake", "RepeatedPreKeyMessage"),
        )
    )

    t = _alice_bob("replay")
    t.start("alice", "bob", one_time=False, kem="last_resort")
    a0 = t.encrypt("alice", "bob")
    t.deliver(a0)
    t.deliver(a0)
    a1 = t.encrypt("alice", "bob")
    t.deliver(a1)
    tests.append(t.case("a PreKeyMessage delivered twice", ("Replay",)))

    t = _alice_bob("simultaneous")
    t.start("alice", "bob", one_time=True, kem="one_time")
    t.start("bob", "alice", one_time=True, kem="one_time")
    a0 = t.encrypt("alice", "bob")
    b0 = t.encrypt("bob", "alice")
    t.deliver(a0)
    t.deliver(b0)
    a1 = t.encrypt("alice", "bob")
    t.deliver(a1)
    b1 = t.encrypt("bob", "alice")
    t.deliver(b1)
    a2 = t.encrypt("alice", "bob")
    t.deliver(a2)
    tests.append(
        t.case(
            "both start at once; after one message each way both use Bob's session",
            ("SimultaneousInitiation",),
        )
    )

    t = _alice_bob("reset")
    t.start("alice", "bob", one_time=True, kem="one_time")
    a0 = t.encrypt("alice", "bob")
    t.deliver(a0)
    b0 = t.encrypt("bob", "alice")
    t.deliver(b0)
    late = t.encrypt("alice", "bob")
    t.drop(late)
    t.start("alice", "bob", one_time=True, kem="last_resort")
    a1 = t.encrypt("alice", "bob")
    t.deliver(a1)
    t.deliver(late)
    b1 = t.encrypt("bob", "alice")
    t.deliver(b1)
    tests.append(
        t.case(
            "Alice starts a second session; her late message on the first one promotes it",
            ("Reset",),
        )
    )

    label = "identity-change"
    t = _Transcript(
        label,
        {
            "alice": _make_party(label + "/alice", "alice", "alice"),
            "bob": _make_party(label + "/bob", "bob", "bob"),
            "alice-new": _make_party(label + "/alice-new", "alice", None),
        },
    )
    t.start("alice", "bob", one_time=True, kem="one_time")
    a0 = t.encrypt("alice", "bob")
    t.deliver(a0)
    t.start("alice-new", "bob", one_time=True, kem="last_resort")
    n0 = t.encrypt("alice-new", "bob")
    t.deliver(n0)
    t.deliver(n0, trust=True)
    a1 = t.encrypt("alice", "bob")
    t.deliver(a1)
    tests.append(
        t.case(
            "a PreKeyMessage from Alice's new identity: refused, then accepted once trusted; "
            "now the old identity's messages are refused",
            ("IdentityChange",),
        )
    )

    label = "no-session"
    t = _Transcript(
        label,
        {
            "alice": _make_party(label + "/alice", "alice", "alice"),
            "bob": _make_party(label + "/bob", "bob", "bob"),
            "carol": _make_party(label + "/carol", "carol", None),
        },
    )
    t.start("alice", "bob", one_time=True, kem="one_time")
    t.deliver(t.encrypt("alice", "bob"))
    t.deliver(t.encrypt("bob", "alice"))
    stray = t.encrypt("alice", "bob")
    t.deliver(stray, to="carol")
    tests.append(t.case("a RatchetMessage reaches a device with no session", ("NoSession",)))

    label = "rotation"
    t = _Transcript(
        label,
        {
            "bob": _make_party(label + "/bob", "bob", "bob"),
            "carol": _make_party(label + "/carol", "carol", None),
            "dave": _make_party(label + "/dave", "dave", None),
            "erin": _make_party(label + "/erin", "erin", None),
            "frank": _make_party(label + "/frank", "frank", None),
        },
    )
    # Carol, Dave and Erin fetch bundles (signed prekey 1, no one-time prekey) before Bob
    # rotates; their first messages arrive before, at the end of and after the grace period.
    # X3DH (PQXDH not required): each handshake would otherwise take the same pinned encapsulation.
    for name in ("carol", "dave", "erin"):
        t.start(name, "bob", one_time=False, kem=None)
    c0, d0, e0 = (t.encrypt(name, "bob") for name in ("carol", "dave", "erin"))
    t.deliver(c0, now=10)
    rotated = 100
    t.rotate_signed_prekey("bob", now=rotated)
    t.start("frank", "bob", one_time=False, kem=None, now=rotated)
    t.deliver(t.encrypt("frank", "bob", now=rotated), now=rotated)
    t.prune("bob", now=rotated + SIGNED_PREKEY_GRACE_PERIOD)
    t.deliver(d0, now=rotated + SIGNED_PREKEY_GRACE_PERIOD)
    t.prune("bob", now=rotated + SIGNED_PREKEY_GRACE_PERIOD + 1)
    t.deliver(e0, now=rotated + SIGNED_PREKEY_GRACE_PERIOD + 1)
    tests.append(
        t.case(
            "a replaced signed prekey answers until the grace period ends; pruned, it takes "
            "the base keys remembered with it, and a late handshake with it is refused",
            ("SignedPreKeyRotation",),
        )
    )

    t = _alice_bob("stale")
    t.start("alice", "bob", one_time=True, kem="one_time")
    t.encrypt("alice", "bob", now=MAX_UNACKNOWLEDGED_SESSION_AGE)
    t.encrypt("alice", "bob", now=MAX_UNACKNOWLEDGED_SESSION_AGE + 1)
    tests.append(
        t.case(
            "an unanswered session is usable for 30 days, not a second longer",
            ("StaleUnacknowledged",),
        )
    )
    return tests


def generate() -> Json:
    return vector_file(
        NAME,
        description=(
            "Session records: PreKeyMessages until the first reply, replays, simultaneous "
            "initiation, resets with previous sessions, identity changes and stale sessions."
        ),
        spec=["05-session-management.md"],
        notes=NOTES,
        groups=[
            {
                "type": "SessionTranscript",
                "max_unacknowledged_session_age": MAX_UNACKNOWLEDGED_SESSION_AGE,
                "tests": _tests(),
            }
        ],
    )


# ------------------------------------------------------------------ verification


def verify_test(group: Json, test: Json) -> list[str]:
    c = Checker()
    parties = {
        name: _Party(
            d["user_id"],
            d["device_id"],
            unhex(d["user_identity"]),
            [unhex(r) for r in d["random"]],
        )
        for name, d in test["parties"].items()
    }
    for index, step in enumerate(test["steps"]):
        where = f"step {index} ({step['op']})"
        op = step["op"]
        if op == "drop":
            continue
        if op in ("rotate_signed_prekey", "prune"):
            _verify_maintenance(c, where, parties[step["party"]], step)
            continue
        party, peer = parties[step["party"]], parties[step["peer"]]
        record = party.record(peer)
        if op == "start":
            encapsulation = step["encapsulation"]
            encapsulations = []
            if encapsulation is not None:
                encapsulations.append((unhex(encapsulation[0]), unhex(encapsulation[1])))
            rng = p.ScriptedRandom([unhex(r) for r in step["random"]], encapsulations)
            bundle = PreKeyBundle.decode(unhex(step["bundle"]))
            session = party.account.create_outbound_session(
                bundle,
                local=party.party,
                remote=peer.party,
                now=step["now"],
                post_quantum=encapsulation is not None,
                rng=rng,
            )
            record.install(session)
        elif op == "encrypt":
            encrypt = partial(record.encrypt, unhex(step["plaintext"]), now=step["now"])
            sent = c.outcome(where, step, encrypt)
            if sent is not None:
                c.equal(f"{where} message", step["message"], h(sent))
        elif op == "deliver":
            rng = p.ScriptedRandom([unhex(r) for r in step["random"]])
            before = _pickles(party, peer)
            decrypt = partial(
                record.decrypt,
                unhex(step["message"]),
                party.account,
                local=party.party,
                remote=peer.party,
                now=step["now"],
                rng=rng,
                trust_new_identity=step["trust_new_identity"],
            )
            result = c.outcome(where, step, decrypt)
            if result is None:
                c.equal(f"{where} unchanged", before, _pickles(party, peer))
            else:
                c.equal(f"{where} plaintext", step["plaintext"], h(result.plaintext))
                c.equal(f"{where} new_session", step["new_session"], result.new_session)
            c.equal(f"{where} randomness drawn", step["random"], [h(u) for u in rng.used])
        else:
            c.fail(f"{where}: unknown op")
            continue
        c.equal(f"{where} state", step["state"], state_json(party, peer))
    return c.failures


def _verify_maintenance(c: Checker, where: str, party: _Party, step: Json) -> None:
    if step["op"] == "rotate_signed_prekey":
        rng = p.ScriptedRandom([unhex(r) for r in step["random"]])
        key_id = party.account.rotate_signed_prekey(now=step["now"], rng=rng)
        c.equal(f"{where} key_id", step["key_id"], key_id)
        c.equal(f"{where} randomness drawn", step["random"], [h(u) for u in rng.used])
    else:
        party.account.prune(now=step["now"])
    c.equal(f"{where} state", step["state"], account_json(party))
