"""x3dh.json and pqxdh.json: bundles, key agreement, and the initial message, byte by byte.

Each file has one test group whose parameters are Bob's keys (everything he
holds, private halves included). A test is one handshake from Alice:

* ``side: "both"`` (valid): Alice, given Bob's ``bundle`` and her keys,
  produces exactly ``initial_message``; Bob, given his keys, accepts it and
  decrypts ``plaintext``. Intermediate values (DH outputs, KDF input, SK, AD,
  the first ratchet keys) are listed for debugging.
* ``side: "initiator"`` (invalid): Alice must refuse ``bundle`` with ``error``.
* ``side: "responder"`` (invalid): Bob, after accepting ``previously_accepted``
  (if any), must refuse ``initial_message`` with ``error``, his keys unchanged.

Whose each device is (user id, device id, user identity: spec/02-pqxdh.md
section 2.4) goes into AD: Alice's in ``alice``, Bob's in the group's
``bob``. A responder test's ``sender`` is whose device Bob takes the message
to be from (the device list of the user the relay says sent it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hushchat.protocol import double_ratchet as dr
from hushchat.protocol import primitives as p
from hushchat.protocol.account import Account
from hushchat.protocol.consts import KDF_PREFIX, PQXDH_INFO, X3DH_INFO
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.keys import IdentityKeyPair, encode_x25519
from hushchat.protocol.messages import PreKeyMessage, decode_message
from hushchat.protocol.pqxdh import HandshakeHeader, Party, associated_data, respond
from hushchat.protocol.prekeys import (
    KemPreKeyPublic,
    OneTimePreKeyPublic,
    PreKeyBundle,
    SignedPreKeyPublic,
)

from ._common import Checker, Json, case, h, note, opt_h, seeded, torsioned_u, unhex, vector_file
from ._pinned import PINNED

BOB_USER_ID = "bob"
BOB_DEVICE_ID = 1
ALICE_USER_ID = "alice"
ALICE_DEVICE_ID = 1
# Prekey ids in the order Account.create assigns them.
SPK_ID, KEM_LAST_RESORT_ID, OPK_ID, KEM_ONE_TIME_ID = 1, 2, 3, 4
LOW_ORDER_U = unhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
NON_CANONICAL_U = unhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")
TWIST_U = (2).to_bytes(32, "little")
SMALL_ORDER_EDWARDS = unhex("0100000000000000000000000000000000000000000000000000000000000000")
UNKNOWN_ID = 77

NOTES = {
    "OneTimePreKey": note("BASIC", "The bundle carries a one-time prekey (DH4 is computed)."),
    "NoOneTimePreKey": note("BASIC", "The bundle has no one-time prekey (no DH4)."),
    "OneTimeKemPreKey": note("BASIC", "The KEM prekey is a one-time one."),
    "LastResortKemPreKey": note("BASIC", "The KEM prekey is the last-resort one."),
    "BadSignature": note("AUTH_BYPASS", "A prekey signature does not verify."),
    "SignatureInputEncoding": note(
        "AUTH_BYPASS",
        "The signature covers the raw key, not Encode(PK) with its type byte; it must not verify.",
    ),
    "ZeroDh": note(
        "CONFIDENTIALITY",
        "A key of low order makes a DH output all zero; the handshake must be refused.",
    ),
    "BaseKeyNotPrimeOrder": note(
        "AUTH_BYPASS",
        "The base key is not in the prime-order subgroup. A torsioned copy of a real base key "
        "gives the same SK under another encoding and would bypass replay detection "
        "(libsignal test_bob_rejects_torsioned_basekey).",
    ),
    "InvalidIdentity": note("CONFIDENTIALITY", "An identity key of small order."),
    "NonCanonicalKey": note("CAN_OF_WORMS", "A base key encoded with u >= p."),
    "UnknownPreKey": note("BASIC", "The message names a prekey id Bob does not hold."),
    "UsedOneTimePreKey": note("BASIC", "The one-time prekey was spent by an earlier handshake."),
    "Replay": note(
        "AUTH_BYPASS",
        "A handshake without a one-time prekey is replayed (X3DH section 4.2).",
    ),
    "KemImplicitRejection": note(
        "AUTH_BYPASS",
        "A modified KEM ciphertext decapsulates to an unrelated secret; the first message "
        "then fails its MAC.",
    ),
    "ModifiedMessage": note("AUTH_BYPASS", "The first message's body is modified."),
    "IdentityMisbinding": note(
        "AUTH_BYPASS",
        "The initial message names another initiator identity; SK and AD differ, so the MAC fails.",
    ),
    "UserMisbinding": note(
        "AUTH_BYPASS",
        "The keys are right but one side binds the other's device to another user, device id or "
        "user identity (a relay presenting alice.1 as mallory.5 under a device list naming "
        "alice's key for mallory): AD differs, so the MAC fails (an unknown-key share).",
    ),
    "Downgrade": note(
        "AUTH_BYPASS",
        "An attempt to turn PQXDH into X3DH: a bundle without a KEM prekey where PQXDH is "
        "required, or a message with its KEM fields stripped.",
    ),
}


@dataclass(frozen=True, slots=True)
class _Bob:
    identity_seed: bytes
    signed_prekey: bytes
    one_time_prekey: bytes
    kem_last_resort: bytes
    kem_one_time: bytes
    user_identity: bytes

    @property
    def party(self) -> Party:
        return Party(BOB_USER_ID, BOB_DEVICE_ID, self.user_identity)

    def random(self) -> list[bytes]:
        """Account.create's draws, in order (spec/02-pqxdh.md, "Key generation")."""
        return [
            self.identity_seed,
            self.signed_prekey,
            self.kem_last_resort,
            self.one_time_prekey,
            self.kem_one_time,
        ]

    def account(self) -> Account:
        return Account.create(now=0, one_time_prekeys=1, rng=p.ScriptedRandom(self.random()))

    def to_json(self) -> Json:
        account = self.account()
        upload = account.prekey_upload()
        identity = IdentityKeyPair(self.identity_seed)
        spk = upload.signed_prekey
        opk = upload.one_time_prekeys[0]
        lr = upload.last_resort_kem_prekey
        ot = upload.one_time_kem_prekeys[0]
        assert (spk.key_id, lr.key_id, opk.key_id, ot.key_id) == (
            SPK_ID,
            KEM_LAST_RESORT_ID,
            OPK_ID,
            KEM_ONE_TIME_ID,
        )
        return {
            "user_id": BOB_USER_ID,
            "device_id": BOB_DEVICE_ID,
            "user_identity": h(self.user_identity),
            "identity_seed": h(self.identity_seed),
            "identity_public": h(identity.public.ed25519),
            "signed_prekey": {
                "id": spk.key_id,
                "private": h(self.signed_prekey),
                "public": h(spk.public),
                "signature": h(spk.signature),
            },
            "one_time_prekey": {
                "id": opk.key_id,
                "private": h(self.one_time_prekey),
                "public": h(opk.public),
            },
            "kem_last_resort": {
                "id": lr.key_id,
                "seed": h(self.kem_last_resort),
                "public": h(lr.public),
                "signature": h(lr.signature),
            },
            "kem_one_time": {
                "id": ot.key_id,
                "seed": h(self.kem_one_time),
                "public": h(ot.public),
                "signature": h(ot.signature),
            },
        }

    @classmethod
    def from_json(cls, bob: Json) -> _Bob:
        return cls(
            unhex(bob["identity_seed"]),
            unhex(bob["signed_prekey"]["private"]),
            unhex(bob["one_time_prekey"]["private"]),
            unhex(bob["kem_last_resort"]["seed"]),
            unhex(bob["kem_one_time"]["seed"]),
            unhex(bob["user_identity"]),
        )


def _make_bob() -> _Bob:
    rng = seeded("handshake/bob")
    return _Bob(
        identity_seed=rng.random_bytes(32),
        signed_prekey=rng.random_bytes(32),
        one_time_prekey=rng.random_bytes(32),
        kem_last_resort=PINNED["bob_last_resort"].key_seed(),
        kem_one_time=PINNED["bob_one_time"].key_seed(),
        user_identity=_user_identity("bob"),
    )


def _user_identity(user_id: str) -> bytes:
    """The user identity (public key) of a user of these files."""
    return IdentityKeyPair(seeded("handshake/user " + user_id).random_bytes(32)).public.ed25519


def _party_json(party: Party) -> Json:
    return {
        "user_id": party.user_id,
        "device_id": party.device_id,
        "user_identity": h(party.user_identity),
    }


def _party_from_json(value: Json) -> Party:
    return Party(value["user_id"], value["device_id"], unhex(value["user_identity"]))


ALICE = Party(ALICE_USER_ID, ALICE_DEVICE_ID, _user_identity("alice"))
# Who a relay presents Alice's device as (a list naming her key for mallory), and
# other bindings that are not Alice's.
MISBOUND = [
    ("another user's device", Party("mallory", 5, _user_identity("mallory"))),
    ("another device id of the same user", Party(ALICE_USER_ID, 2, _user_identity("alice"))),
    ("the same device under another user identity", Party(ALICE_USER_ID, 1, _user_identity("x"))),
]


def _bundle(
    bob: _Bob, *, one_time: bool, kem: str | None, spk: SignedPreKeyPublic | None = None
) -> PreKeyBundle:
    upload = bob.account().prekey_upload()
    kem_key: KemPreKeyPublic | None = None
    if kem == "one_time":
        kem_key = upload.one_time_kem_prekeys[0]
    elif kem == "last_resort":
        kem_key = upload.last_resort_kem_prekey
    return PreKeyBundle(
        BOB_USER_ID,
        BOB_DEVICE_ID,
        IdentityKeyPair(bob.identity_seed).public,
        spk or upload.signed_prekey,
        upload.one_time_prekeys[0] if one_time else None,
        kem_key,
        kem == "last_resort",
    )


def _pinned_for(kem: str | None) -> tuple[bytes, bytes] | None:
    if kem is None:
        return None
    return PINNED["bob_" + kem].encapsulation()


@dataclass(frozen=True, slots=True)
class _Alice:
    identity_seed: bytes
    base_key: bytes
    ratchet_key: bytes
    party: Party = ALICE

    @classmethod
    def make(cls, label: str) -> _Alice:
        rng = seeded("handshake/alice/" + label)
        return cls(rng.random_bytes(32), rng.random_bytes(32), rng.random_bytes(32))

    @classmethod
    def from_json(cls, alice: Json) -> _Alice:
        return cls(
            unhex(alice["identity_seed"]),
            unhex(alice["base_key_private"]),
            unhex(alice["ratchet_private"]),
            _party_from_json(alice),
        )

    def to_json(self) -> Json:
        return {
            **_party_json(self.party),
            "identity_seed": h(self.identity_seed),
            "identity_public": h(IdentityKeyPair(self.identity_seed).public.ed25519),
            "base_key_private": h(self.base_key),
            "base_key_public": h(p.x25519_public_bytes(p.x25519_private_from_bytes(self.base_key))),
            "ratchet_private": h(self.ratchet_key),
            "ratchet_public": h(
                p.x25519_public_bytes(p.x25519_private_from_bytes(self.ratchet_key))
            ),
        }

    def send_first(
        self,
        bundle_bytes: bytes,
        plaintext: bytes,
        encapsulation: tuple[bytes, bytes] | None,
        post_quantum: bool,
        responder_identity: bytes,
    ) -> bytes:
        """Alice's whole side: decode the bundle, agree, encrypt the first message.

        ``responder_identity`` is the user identity of the bundle's user, from
        the device list naming its device.
        """
        bundle = PreKeyBundle.decode(bundle_bytes)
        rng = p.ScriptedRandom(
            [self.base_key, self.ratchet_key], [encapsulation] if encapsulation else []
        )
        alice = Account(IdentityKeyPair(self.identity_seed))
        remote = Party(bundle.user_id, bundle.device_id, responder_identity)
        session = alice.create_outbound_session(
            bundle, local=self.party, remote=remote, now=0, post_quantum=post_quantum, rng=rng
        )
        return session.encrypt(plaintext)


def _details(
    alice: _Alice,
    bundle: PreKeyBundle,
    encapsulation: tuple[bytes, bytes] | None,
    responder_identity: bytes,
) -> Json:
    """The intermediate values of a valid handshake, computed step by step."""
    identity = IdentityKeyPair(alice.identity_seed)
    base = p.x25519_private_from_bytes(alice.base_key)
    spk = bundle.signed_prekey.public
    dh = [identity.dh(spk), p.x25519(base, bundle.identity.x25519), p.x25519(base, spk)]
    if bundle.one_time_prekey is not None:
        dh.append(p.x25519(base, bundle.one_time_prekey.public))
    kdf_input = KDF_PREFIX + b"".join(dh)
    info = X3DH_INFO
    if encapsulation is not None:
        kdf_input += encapsulation[0]
        info = PQXDH_INFO
    secret = p.hkdf_sha256(kdf_input, salt=bytes(32), info=info, length=32)
    ratchet = p.x25519_private_from_bytes(alice.ratchet_key)
    root_key, chain_key = dr.kdf_rk(secret, p.x25519(ratchet, spk))
    message_key, _ = dr.kdf_ck(chain_key)
    return {
        "dh": [h(d) for d in dh],
        "kdf_input": h(kdf_input),
        "shared_secret": h(secret),
        "associated_data": h(
            associated_data(
                identity.public,
                bundle.identity,
                alice.party,
                Party(bundle.user_id, bundle.device_id, responder_identity),
            )
        ),
        "first_root_key": h(root_key),
        "first_chain_key": h(chain_key),
        "first_message_key": h(message_key),
    }


def _valid(
    label: str, bob: _Bob, *, one_time: bool, kem: str | None, flags: tuple[str, ...]
) -> Json:
    alice = _Alice.make(label)
    bundle = _bundle(bob, one_time=one_time, kem=kem)
    encapsulation = _pinned_for(kem)
    plaintext = f"first message ({label})".encode()
    message = alice.send_first(
        bundle.encode(), plaintext, encapsulation, kem is not None, bob.user_identity
    )
    return case(
        label,
        flags=flags,
        side="both",
        alice=alice.to_json(),
        bundle=h(bundle.encode()),
        kem_ciphertext=opt_h(encapsulation and encapsulation[1]),
        kem_shared_secret=opt_h(encapsulation and encapsulation[0]),
        **_details(alice, bundle, encapsulation, bob.user_identity),
        plaintext=h(plaintext),
        initial_message=h(message),
        responder_random=[h(_responder_draw(label, 0))],
    )


def _responder_draw(label: str, index: int) -> bytes:
    """Bob's new ratchet key when he accepts message ``index`` of a test (03 section 3.6 step 9)."""
    return seeded(f"handshake/bob-ratchet/{label}/{index}").random_bytes(32)


def _initiator_invalid(
    label: str, bob: _Bob, bundle: PreKeyBundle, post_quantum: bool, flags: tuple[str, ...]
) -> Json:
    alice = _Alice.make(label)
    encapsulation = _pinned_for("one_time") if bundle.kem_prekey is not None else None
    try:
        alice.send_first(
            bundle.encode(), b"never sent", encapsulation, post_quantum, bob.user_identity
        )
    except Exception as exc:  # the generator records whatever the reference raises
        error = getattr(exc, "code", type(exc).__name__)
    else:
        raise AssertionError(f"{label}: Alice accepted the bundle")
    return case(
        label,
        result="invalid",
        error=error,
        flags=flags,
        side="initiator",
        alice=alice.to_json(),
        bundle=h(bundle.encode()),
        kem_ciphertext=opt_h(encapsulation and encapsulation[1]),
        kem_shared_secret=opt_h(encapsulation and encapsulation[0]),
    )


def _responder_invalid(
    label: str,
    bob: _Bob,
    message: bytes,
    flags: tuple[str, ...],
    previously: tuple[bytes, ...] = (),
    sender: Party = ALICE,
) -> Json:
    account = bob.account()
    draws = [_responder_draw(label, index) for index in range(len(previously))]
    for earlier, draw in zip(previously, draws, strict=True):
        decoded = decode_message(earlier)
        assert isinstance(decoded, PreKeyMessage)
        account.create_inbound_session(
            decoded, local=bob.party, remote=ALICE, now=0, rng=p.ScriptedRandom([draw])
        )
    nothing = p.ScriptedRandom([])
    try:
        decoded = decode_message(message)
        assert isinstance(decoded, PreKeyMessage)
        account.create_inbound_session(decoded, local=bob.party, remote=sender, now=0, rng=nothing)
    except Exception as exc:
        error = getattr(exc, "code", type(exc).__name__)
    else:
        raise AssertionError(f"{label}: Bob accepted the message")
    assert not nothing.used, f"{label}: a refused message drew randomness"
    return case(
        label,
        result="invalid",
        error=error,
        flags=flags,
        side="responder",
        previously_accepted=[h(m) for m in previously],
        sender=_party_json(sender),
        initial_message=h(message),
        responder_random=[h(d) for d in draws],
    )


def _rewrite(message: bytes, **changes: object) -> bytes:
    """Re-encode a PreKeyMessage with some fields replaced (by name)."""
    names = [
        "type",
        "identity",
        "base_key",
        "signed_prekey_id",
        "one_time_prekey_id",
        "kem_prekey_id",
        "kem_ciphertext",
        "header",
        "body",
    ]
    fields = unpack(message, what="test")
    for name, value in changes.items():
        fields[names.index(name)] = value
    return pack(fields)


def decode_base_key(message: bytes) -> bytes:
    base_key: bytes = unpack(message, what="test")[2]
    return base_key


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _common_invalid(bob: _Bob, *, pq: bool) -> list[Json]:
    """Initiator-side refusals shared by both files."""
    kem = "one_time" if pq else None
    good = _bundle(bob, one_time=True, kem=kem)
    bob_identity = IdentityKeyPair(bob.identity_seed)
    spk = good.signed_prekey
    tests = [
        _initiator_invalid(
            "signed prekey signature with one bit flipped",
            bob,
            _bundle(
                bob,
                one_time=True,
                kem=kem,
                spk=SignedPreKeyPublic(spk.key_id, spk.public, _flip_last(spk.signature)),
            ),
            pq,
            ("BadSignature",),
        ),
        _initiator_invalid(
            "signed prekey signed without its type byte",
            bob,
            _bundle(
                bob,
                one_time=True,
                kem=kem,
                spk=SignedPreKeyPublic(spk.key_id, spk.public, bob_identity.sign(spk.public)),
            ),
            pq,
            ("SignatureInputEncoding",),
        ),
        _initiator_invalid(
            "signed prekey of low order, validly signed: DH1 is zero",
            bob,
            _bundle(
                bob,
                one_time=True,
                kem=kem,
                spk=SignedPreKeyPublic(
                    spk.key_id, LOW_ORDER_U, bob_identity.sign(encode_x25519(LOW_ORDER_U))
                ),
            ),
            pq,
            ("ZeroDh",),
        ),
    ]
    low_opk = PreKeyBundle(
        good.user_id,
        good.device_id,
        good.identity,
        good.signed_prekey,
        OneTimePreKeyPublic(OPK_ID, LOW_ORDER_U),
        good.kem_prekey,
        good.kem_is_last_resort,
    )
    tests.append(
        _initiator_invalid(
            "one-time prekey of low order: DH4 is zero", bob, low_opk, pq, ("ZeroDh",)
        )
    )
    return tests


def _responder_cases(bob: _Bob, *, pq: bool) -> list[Json]:
    kem = "one_time" if pq else None
    alice = _Alice.make("responder base")
    bundle = _bundle(bob, one_time=True, kem=kem)
    message = alice.send_first(
        bundle.encode(), b"hello Bob", _pinned_for(kem), pq, bob.user_identity
    )
    no_opk_bundle = _bundle(bob, one_time=False, kem="last_resort" if pq else None)
    no_opk = alice.send_first(
        no_opk_bundle.encode(),
        b"hello Bob",
        _pinned_for("last_resort" if pq else None),
        pq,
        bob.user_identity,
    )
    # Alice meant mallory.5, whose list (served to her) names Bob's device key; the
    # relay hands her message to Bob.
    mallory = MISBOUND[0][1]
    meant_for_mallory = alice.send_first(
        dataclasses.replace(bundle, user_id=mallory.user_id, device_id=mallory.device_id).encode(),
        b"for mallory",
        _pinned_for(kem),
        pq,
        mallory.user_identity,
    )
    other = IdentityKeyPair(seeded("handshake/mallory").random_bytes(32)).public.ed25519
    fields = unpack(message, what="test")
    tests = [
        _responder_invalid(
            "unknown signed prekey id",
            bob,
            _rewrite(message, signed_prekey_id=UNKNOWN_ID),
            ("UnknownPreKey",),
        ),
        _responder_invalid(
            "unknown one-time prekey id",
            bob,
            _rewrite(message, one_time_prekey_id=UNKNOWN_ID),
            ("UnknownPreKey",),
        ),
        _responder_invalid(
            "one-time prekey already used by an earlier handshake",
            bob,
            message,
            ("UsedOneTimePreKey",),
            previously=(message,),
        ),
        _responder_invalid(
            "replay of a handshake without a one-time prekey",
            bob,
            no_opk,
            ("Replay",),
            previously=(no_opk,),
        ),
        _responder_invalid(
            "base key of low order",
            bob,
            _rewrite(message, base_key=LOW_ORDER_U),
            ("BaseKeyNotPrimeOrder",),
        ),
        _responder_invalid(
            "base key plus a point of order 8 (same DH outputs, another encoding)",
            bob,
            _rewrite(message, base_key=torsioned_u(decode_base_key(message))),
            ("BaseKeyNotPrimeOrder",),
        ),
        _responder_invalid(
            "base key on the twist (u = 2)",
            bob,
            _rewrite(message, base_key=TWIST_U),
            ("BaseKeyNotPrimeOrder",),
        ),
        _responder_invalid(
            "base key u = p",
            bob,
            _rewrite(message, base_key=NON_CANONICAL_U),
            ("NonCanonicalKey",),
        ),
        _responder_invalid(
            "initiator identity of small order",
            bob,
            _rewrite(message, identity=SMALL_ORDER_EDWARDS),
            ("InvalidIdentity",),
        ),
        _responder_invalid(
            "initiator identity replaced by another valid identity",
            bob,
            _rewrite(message, identity=other),
            ("IdentityMisbinding",),
        ),
        *(
            _responder_invalid(
                f"genuine message taken to be from {what}",
                bob,
                message,
                ("UserMisbinding",),
                sender=party,
            )
            for what, party in MISBOUND
        ),
        _responder_invalid(
            "Alice bound Bob's device key to another user's device (mallory.5)",
            bob,
            meant_for_mallory,
            ("UserMisbinding",),
        ),
        _responder_invalid(
            "one-time prekey id removed",
            bob,
            _rewrite(message, one_time_prekey_id=None),
            ("ModifiedMessage",),
        ),
        _responder_invalid(
            "first message body with one bit flipped",
            bob,
            _rewrite(message, body=_flip_last(fields[8])),
            ("ModifiedMessage",),
        ),
    ]
    if pq:
        tests += [
            _responder_invalid(
                "unknown KEM prekey id",
                bob,
                _rewrite(message, kem_prekey_id=UNKNOWN_ID),
                ("UnknownPreKey",),
            ),
            _responder_invalid(
                "KEM ciphertext with one bit flipped",
                bob,
                _rewrite(message, kem_ciphertext=_flip_last(fields[6])),
                ("KemImplicitRejection",),
            ),
            _responder_invalid(
                "KEM fields stripped (downgrade to X3DH)",
                bob,
                _rewrite(message, kem_prekey_id=None, kem_ciphertext=None),
                ("Downgrade",),
            ),
        ]
    return tests


def _group(bob: _Bob, *, pq: bool, tests: list[Json]) -> Json:
    group: Json = {
        "type": "Pqxdh" if pq else "X3dh",
        "curve": "X25519",
        "hash": "SHA-256",
        "info": h(PQXDH_INFO if pq else X3DH_INFO),
        "kdfPrefix": h(KDF_PREFIX),
        "bob": bob.to_json(),
        "tests": tests,
    }
    if pq:
        group["kem"] = "ML-KEM-768"
    return group


def generate_pqxdh() -> Json:
    bob = _make_bob()
    tests = [
        _valid(
            "one-time prekey and one-time KEM prekey",
            bob,
            one_time=True,
            kem="one_time",
            flags=("OneTimePreKey", "OneTimeKemPreKey"),
        ),
        _valid(
            "no one-time prekey, last-resort KEM prekey",
            bob,
            one_time=False,
            kem="last_resort",
            flags=("NoOneTimePreKey", "LastResortKemPreKey"),
        ),
        _valid(
            "one-time prekey, last-resort KEM prekey",
            bob,
            one_time=True,
            kem="last_resort",
            flags=("OneTimePreKey", "LastResortKemPreKey"),
        ),
    ]
    tests += _common_invalid(bob, pq=True)
    good = _bundle(bob, one_time=True, kem="one_time")
    kem = good.kem_prekey
    assert kem is not None
    bob_identity = IdentityKeyPair(bob.identity_seed)
    tests += [
        _initiator_invalid(
            "KEM prekey signature with one bit flipped",
            bob,
            _with_kem(good, KemPreKeyPublic(kem.key_id, kem.public, _flip_last(kem.signature))),
            True,
            ("BadSignature",),
        ),
        _initiator_invalid(
            "KEM prekey signed without its type byte",
            bob,
            _with_kem(good, KemPreKeyPublic(kem.key_id, kem.public, bob_identity.sign(kem.public))),
            True,
            ("SignatureInputEncoding",),
        ),
        _initiator_invalid(
            "bundle without a KEM prekey where PQXDH is required",
            bob,
            _bundle(bob, one_time=True, kem=None),
            True,
            ("Downgrade",),
        ),
    ]
    tests += _responder_cases(bob, pq=True)
    return vector_file(
        "pqxdh",
        description=(
            "PQXDH (X25519, SHA-256, ML-KEM-768): prekey bundle, key agreement, associated data "
            "and the initial PreKeyMessage, from every private key and recorded KEM encapsulation."
        ),
        spec=["02-pqxdh.md"],
        notes=NOTES,
        groups=[_group(bob, pq=True, tests=tests)],
    )


def generate_x3dh() -> Json:
    bob = _make_bob()
    tests = [
        _valid("with a one-time prekey", bob, one_time=True, kem=None, flags=("OneTimePreKey",)),
        _valid(
            "without a one-time prekey", bob, one_time=False, kem=None, flags=("NoOneTimePreKey",)
        ),
    ]
    tests += _common_invalid(bob, pq=False)
    tests += _responder_cases(bob, pq=False)
    return vector_file(
        "x3dh",
        description=(
            "X3DH (X25519, SHA-256) without a KEM: bundle, key agreement, associated data and the "
            "initial PreKeyMessage. Used only when both sides allow it (spec/02-pqxdh.md)."
        ),
        spec=["02-pqxdh.md"],
        notes=NOTES,
        groups=[_group(bob, pq=False, tests=tests)],
    )


def _with_kem(bundle: PreKeyBundle, kem: KemPreKeyPublic) -> PreKeyBundle:
    return PreKeyBundle(
        bundle.user_id,
        bundle.device_id,
        bundle.identity,
        bundle.signed_prekey,
        bundle.one_time_prekey,
        kem,
        bundle.kem_is_last_resort,
    )


# ------------------------------------------------------------------ verification


def verify_test(group: Json, test: Json) -> list[str]:
    c = Checker()
    pq = group["type"] == "Pqxdh"
    bob = _Bob.from_json(group["bob"])
    c.equal("bob", group["bob"], bob.to_json())
    encapsulation = None
    if test.get("kem_ciphertext") is not None:
        encapsulation = (unhex(test["kem_shared_secret"]), unhex(test["kem_ciphertext"]))
    if test["side"] in ("both", "initiator"):
        alice = _Alice.from_json(test["alice"])
        c.equal("alice", test["alice"], alice.to_json())
        plaintext = unhex(test.get("plaintext") or "")
        sent = c.outcome(
            "initiator",
            test,
            lambda: alice.send_first(
                unhex(test["bundle"]), plaintext, encapsulation, pq, bob.user_identity
            ),
        )
        if sent is not None:
            c.equal("initial_message", test["initial_message"], h(sent))
            bundle = PreKeyBundle.decode(unhex(test["bundle"]))
            details = _details(alice, bundle, encapsulation, bob.user_identity)
            for key, value in details.items():
                c.equal(key, test[key], value)
    if test["side"] in ("both", "responder"):
        _verify_responder(c, bob, test, encapsulation)
    return c.failures


def _verify_responder(
    c: Checker, bob: _Bob, test: Json, encapsulation: tuple[bytes, bytes] | None
) -> None:
    account = bob.account()
    rng = p.ScriptedRandom([unhex(r) for r in test["responder_random"]])
    # Whose device Bob takes the message to be from: Alice's unless the test says.
    sender = _party_from_json(test["sender"] if "sender" in test else test["alice"])
    for earlier in test.get("previously_accepted", []):
        decoded = decode_message(unhex(earlier))
        if isinstance(decoded, PreKeyMessage):
            account.create_inbound_session(decoded, local=bob.party, remote=sender, now=0, rng=rng)
    before = account.to_bytes()

    def receive() -> bytes:
        decoded = decode_message(unhex(test["initial_message"]))
        if not isinstance(decoded, PreKeyMessage):
            raise AssertionError("not a PreKeyMessage")
        received = account.create_inbound_session(
            decoded, local=bob.party, remote=sender, now=0, rng=rng
        )
        return received[1]

    plaintext = c.outcome("responder", test, receive)
    c.equal("Bob's draws", test["responder_random"], [h(u) for u in rng.used])
    if plaintext is None:
        c.equal("Bob's keys unchanged after the refusal", h(before), h(account.to_bytes()))
        return
    c.equal("plaintext", test["plaintext"], h(plaintext))
    decoded = decode_message(unhex(test["initial_message"]))
    assert isinstance(decoded, PreKeyMessage)
    if encapsulation is not None:
        kem_seed = (
            bob.kem_one_time
            if decoded.handshake.kem_prekey_id == KEM_ONE_TIME_ID
            else (bob.kem_last_resort)
        )
        secret = p.mlkem768_decapsulate(p.mlkem768_private_from_seed(kem_seed), encapsulation[1])
        c.equal("decapsulate(kem_ciphertext)", test["kem_shared_secret"], h(secret))
    shared = _respond(bob, decoded.handshake, sender)
    c.equal("responder shared_secret", test["shared_secret"], h(shared[0]))
    c.equal("responder associated_data", test["associated_data"], h(shared[1]))


def _respond(bob: _Bob, header: HandshakeHeader, sender: Party) -> tuple[bytes, bytes]:
    kem = None
    if header.kem_prekey_id is not None:
        seed = bob.kem_one_time if header.kem_prekey_id == KEM_ONE_TIME_ID else bob.kem_last_resort
        kem = p.mlkem768_private_from_seed(seed)
    shared = respond(
        IdentityKeyPair(bob.identity_seed),
        header,
        local=bob.party,
        remote=sender,
        signed_prekey=p.x25519_private_from_bytes(bob.signed_prekey),
        one_time_prekey=p.x25519_private_from_bytes(bob.one_time_prekey)
        if header.one_time_prekey_id is not None
        else None,
        kem_prekey=kem,
    )
    return shared.secret, shared.associated_data


# ------------------------------------------------------------------ samples for wire.json


def sample_bundles() -> list[tuple[str, bytes]]:
    """Encoded bundles: with every optional key, and with none."""
    bob = _make_bob()
    return [
        (
            "bundle with one-time prekey and one-time KEM prekey",
            _bundle(bob, one_time=True, kem="one_time").encode(),
        ),
        (
            "bundle with neither a one-time prekey nor a KEM prekey",
            _bundle(bob, one_time=False, kem=None).encode(),
        ),
    ]


def sample_initial_messages() -> list[tuple[str, bytes]]:
    """Encoded PreKeyMessages: PQXDH with a one-time prekey, X3DH without."""
    bob = _make_bob()
    alice = _Alice.make("wire sample")
    pq = _bundle(bob, one_time=True, kem="one_time").encode()
    classic = _bundle(bob, one_time=False, kem=None).encode()
    return [
        (
            "PQXDH PreKeyMessage",
            alice.send_first(pq, b"wire", _pinned_for("one_time"), True, bob.user_identity),
        ),
        (
            "X3DH PreKeyMessage without one-time prekey",
            alice.send_first(classic, b"wire", None, False, bob.user_identity),
        ),
    ]
