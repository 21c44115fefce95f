"""``hushchat bench``: what each protocol operation costs next to its primitive floor.

For every operation, in one process and one run: microseconds per operation
(the median of ``repeats`` timed batches, after one warm-up batch), its
*primitive floor* and their ratio. The floor is the ``cryptography``,
``hmac``/``hashlib``, ``os.urandom`` and msgpack calls the operation cannot
avoid, made directly (no protocol code) on the same plaintexts, associated
data, header values and key sizes, timed the same way in the same loop
(batches of the operation and of its floor alternate; garbage collection is
off inside a batch; the clock is the process's CPU time, so time the core
spends on other processes is charged to neither). The floor counts:

* HMAC-SHA-256 as ``hmac.digest``; HKDF as ``cryptography``'s ``HKDF.derive``;
  AES-256-CBC as the PKCS#7 padder and one ``Cipher`` encryptor (or
  decryptor and unpadder);
* an X25519 DH as loading the peer's public key and ``exchange``; a key
  pair as 32 bytes from ``os.urandom``, the key load and its public key;
  an Ed25519 verification as loading the public key and ``verify``;
* a canonical decode as ``unpackb`` plus the ``packb`` that proves the bytes
  canonical (the wire rule every receiver enforces); an encode as ``packb``.

Not in any floor: the protocol's own checks (key canonicity, the
prime-order check of a handshake's base key, one X25519 with a fixed scalar,
field validation) and its object handling; that is the overhead the ratio shows. Identity keys are
converted Ed25519 -> X25519 once per process and cached (hushchat.protocol.keys), as
in a running client; the bench's identities are warm.

``hushchat bench relay`` is :mod:`hushchat.devtools.bench_relay`.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import hmac
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hushchat.protocol.account import Account
from hushchat.protocol.client_core import (
    ENVELOPE_DIRECT,
    ENVELOPE_RECEIPT,
    Address,
    ChangeSend,
    ClientCore,
    GroupSend,
    RecordKey,
    Send,
)
from hushchat.protocol.consts import (
    GROUP_STATE_HASH_CONTEXT,
    KDF_PREFIX,
    MESSAGE_KEYS_INFO,
    PQXDH_INFO,
    RATCHET_ROOT_INFO,
    SENDER_KEY_INFO,
    SENDER_KEY_VERSION,
    X3DH_INFO,
)
from hushchat.protocol.content import Text
from hushchat.protocol.devices import DeviceEntry, DeviceList, SignedDeviceList
from hushchat.protocol.group import Group
from hushchat.protocol.group_cipher import OutboundSenderKey, SenderKeyRecord
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.protocol.pqxdh import Party
from hushchat.protocol.prekeys import PreKeyBundle
from hushchat.protocol.session import SessionRecord

from .arguments import at_least
from .bench_relay import add_relay_bench_command

# A fixed protocol time (seconds): the core never reads a clock.
NOW = 1_700_000_000
PLAINTEXT = bytes(range(100))  # 100 bytes, as in libsignal's figures below
GROUP_ID = bytes(range(16))
# The device the sender-key cases send as (its address is signed with every message).
BENCH_SENDER = Address("bench", 1)

# Targets, as ratios to the floor: for handshakes, and for everything else.
HANDSHAKE_TARGET = 1.3
MESSAGE_TARGET = 1.25
# libsignal's figures for the same 100-byte plaintext, for comparison.
LIBSIGNAL_ONE_TO_ONE_BYTES = 201
LIBSIGNAL_GROUP_BYTES = 205
SESSION_RECORD_TARGET_BYTES = 1536

DEFAULT_REPEATS = 9
DEFAULT_GROUP_SIZES = (10, 100, 1000)
DEFAULT_REMOVAL_GROUP_SIZE = 100


# ------------------------------------------------------------------ timing


@dataclass(frozen=True, slots=True)
class Timing:
    """One operation's median cost and its primitive floor, in microseconds."""

    us: float
    floor_us: float

    @property
    def ratio(self) -> float:
        return self.us / self.floor_us

    def as_json(self) -> dict[str, float]:
        return {
            "us": round(self.us, 2),
            "floor_us": round(self.floor_us, 2),
            "ratio": round(self.ratio, 3),
        }


@dataclass(frozen=True, slots=True)
class Case:
    """An operation and its floor; ``prepare`` (untimed) runs before each operation batch."""

    name: str
    op: Callable[[], object]
    floor: Callable[[], object]
    number: int = 1
    prepare: Callable[[], object] | None = None


def _batch_us(fn: Callable[[], object], number: int) -> float:
    """Mean CPU microseconds per call over ``number`` calls, garbage collection off.

    Process CPU time, not wall time: on a shared machine the time other
    processes hold the core is not charged to whichever side was running.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.process_time_ns()
        for _ in range(number):
            fn()
        elapsed = time.process_time_ns() - start
    finally:
        if enabled:
            gc.enable()
    return elapsed / number / 1000


def measure(case: Case, repeats: int) -> Timing:
    """Median over ``repeats`` batches of the operation and of its floor, after a warm-up."""
    ops: list[float] = []
    floors: list[float] = []
    for index in range(repeats + 1):  # batch 0 warms both up and is discarded
        if case.prepare is not None:
            case.prepare()
        # Alternate which goes first, so neither always runs on the other's warm caches.
        if index % 2:
            floor_us = _batch_us(case.floor, case.number)
            op_us = _batch_us(case.op, case.number)
        else:
            op_us = _batch_us(case.op, case.number)
            floor_us = _batch_us(case.floor, case.number)
        if index:
            ops.append(op_us)
            floors.append(floor_us)
    return Timing(statistics.median(ops), statistics.median(floors))


# ------------------------------------------------------------------ the floor's primitives


def f_hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def f_hkdf(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def f_aes_encrypt(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES256(key), modes.CBC(iv)).encryptor()
    return encryptor.update(padded) + encryptor.finalize()


def f_aes_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    decryptor = Cipher(algorithms.AES256(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(padded) + unpadder.finalize()


def f_keygen() -> tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.from_private_bytes(os.urandom(32))
    return private, private.public_key().public_bytes_raw()


def f_dh(private: X25519PrivateKey, public: bytes) -> bytes:
    return private.exchange(X25519PublicKey.from_public_bytes(public))


def f_sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    return key.sign(message)


def f_verify(public: bytes, signature: bytes, message: bytes) -> None:
    Ed25519PublicKey.from_public_bytes(public).verify(signature, message)


def f_pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def f_decode(data: bytes) -> Any:
    """unpackb, and the packb that proves ``data`` canonical."""
    value = msgpack.unpackb(data, raw=False)
    if msgpack.packb(value, use_bin_type=True) != data:
        raise AssertionError("floor input is not canonical")
    return value


# Composite floors of the Double Ratchet (section 5.2 of its specification).


def f_ratchet_seal(
    chain_key: bytes, ratchet_key: bytes, plaintext: bytes, ad: bytes
) -> tuple[bytes, bytes]:
    """KDF_CK, HKDF-80, AES-CBC, the tag and the header encoding: (header, body)."""
    message_key, _ = f_hmac(chain_key, b"\x01"), f_hmac(chain_key, b"\x02")
    km = f_hkdf(message_key, bytes(32), MESSAGE_KEYS_INFO, 80)
    header = f_pack([1, ratchet_key, 0, 7])
    ciphertext = f_aes_encrypt(km[:32], km[64:], plaintext)
    return header, ciphertext + f_hmac(km[32:64], ad + header + ciphertext)[:16]


def f_ratchet_send(chain_key: bytes, ratchet_key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """A sealed message in its RatchetMessage encoding."""
    return f_pack([1, *f_ratchet_seal(chain_key, ratchet_key, plaintext, ad)])


def f_ratchet_open(chain_key: bytes, header: bytes, body: bytes, ad: bytes) -> bytes:
    """Decode the header, KDF_CK, HKDF-80, check the tag, AES-CBC decrypt."""
    f_decode(header)
    message_key, _ = f_hmac(chain_key, b"\x01"), f_hmac(chain_key, b"\x02")
    km = f_hkdf(message_key, bytes(32), MESSAGE_KEYS_INFO, 80)
    ciphertext, tag = body[:-16], body[-16:]
    if not hmac.compare_digest(f_hmac(km[32:64], ad + header + ciphertext)[:16], tag):
        raise AssertionError("floor tag")
    return f_aes_decrypt(km[:32], km[64:], ciphertext)


def f_ratchet_receive(chain_key: bytes, message: bytes, ad: bytes) -> bytes:
    """Decode a RatchetMessage and open it."""
    _, header, body = f_decode(message)
    return f_ratchet_open(chain_key, header, body, ad)


def f_dh_step(root_key: bytes, own: X25519PrivateKey, remote: bytes) -> bytes:
    """A receiver's DH ratchet step: two KDF_RK (DH + HKDF-64) and a new key pair."""
    root_key = f_hkdf(f_dh(own, remote), root_key, RATCHET_ROOT_INFO, 64)[:32]
    fresh, _ = f_keygen()
    return f_hkdf(f_dh(fresh, remote), root_key, RATCHET_ROOT_INFO, 64)[:32]


def f_sender_key_encrypt(chain_key: bytes, signing: Ed25519PrivateKey, plaintext: bytes) -> bytes:
    seed = f_hmac(chain_key, b"\x01")
    material = f_hkdf(seed, None, SENDER_KEY_INFO, 48)
    ciphertext = f_aes_encrypt(material[16:], material[:16], plaintext)
    body = f_pack([SENDER_KEY_VERSION, GROUP_ID, 1 << 30, 5, ciphertext])
    signature = f_sign(signing, f_pack([BENCH_SENDER.user_id, BENCH_SENDER.device_id]) + body)
    f_hmac(chain_key, b"\x02")
    return body + signature


def f_sender_key_decrypt(chain_key: bytes, signing_public: bytes, message: bytes) -> bytes:
    body, signature = message[:-64], message[-64:]
    ciphertext = f_decode(body)[4]
    f_verify(
        signing_public, signature, f_pack([BENCH_SENDER.user_id, BENCH_SENDER.device_id]) + body
    )
    seed = f_hmac(chain_key, b"\x01")
    material = f_hkdf(seed, None, SENDER_KEY_INFO, 48)
    plaintext = f_aes_decrypt(material[16:], material[:16], ciphertext)
    f_hmac(chain_key, b"\x02")
    return plaintext


def f_group_send(chain_key: bytes, signing: Ed25519PrivateKey, body: bytes) -> bytes:
    """A message id, the GroupText encoding and one sender-key message."""
    content = f_pack([os.urandom(16), NOW, body, 1, bytes(32)])
    return f_sender_key_encrypt(chain_key, signing, content)


# ------------------------------------------------------------------ one-to-one


def _party(user_id: str) -> Party:
    """Device 1 of ``user_id``, under a fresh user identity."""
    return Party(user_id, 1, IdentityKeyPair.generate().public.ed25519)


_ALICE, _BOB = _party("alice"), _party("bob")


class _Pair:
    """Alice and Bob with a session both have used (steady state: no prekey messages)."""

    def __init__(self) -> None:
        self.alice = Account.create(now=NOW, one_time_prekeys=1)
        self.bob = Account.create(now=NOW, one_time_prekeys=1)
        self.a = SessionRecord()
        self.b = SessionRecord()
        bundle = self.bob.bundle("bob", 1)
        self.a.install(
            self.alice.create_outbound_session(bundle, local=_ALICE, remote=_BOB, now=NOW)
        )
        first = self.a.encrypt(b"hello", now=NOW)
        self.b.decrypt(first, self.bob, local=_BOB, remote=_ALICE, now=NOW)
        reply = self.b.encrypt(b"hello", now=NOW)
        self.a.decrypt(reply, self.alice, local=_ALICE, remote=_BOB, now=NOW)

    @property
    def associated_data(self) -> bytes:
        assert self.a.current is not None
        return self.a.current.associated_data

    def send(self, plaintext: bytes) -> None:
        """Alice to Bob: encrypt and decrypt one message."""
        data = self.a.encrypt(plaintext, now=NOW)
        if (
            self.b.decrypt(data, self.bob, local=_BOB, remote=_ALICE, now=NOW).plaintext
            != plaintext
        ):
            raise AssertionError("ratchet round trip")

    def reply(self, plaintext: bytes) -> None:
        data = self.b.encrypt(plaintext, now=NOW)
        if (
            self.a.decrypt(data, self.alice, local=_ALICE, remote=_BOB, now=NOW).plaintext
            != plaintext
        ):
            raise AssertionError("ratchet round trip")


def ratchet_cases(pair: _Pair) -> list[Case]:
    ad = pair.associated_data
    chain_key = os.urandom(32)
    ratchet_key = f_keygen()[1]
    root_key = os.urandom(32)
    own, _ = f_keygen()

    def stream_floor() -> None:
        f_ratchet_receive(chain_key, f_ratchet_send(chain_key, ratchet_key, PLAINTEXT, ad), ad)

    turn = [0]

    def ping_pong() -> None:
        if turn[0] % 2:
            pair.reply(PLAINTEXT)
        else:
            pair.send(PLAINTEXT)
        turn[0] += 1

    def ping_pong_floor() -> None:
        message = f_ratchet_send(chain_key, ratchet_key, PLAINTEXT, ad)
        f_dh_step(root_key, own, ratchet_key)
        f_ratchet_receive(chain_key, message, ad)

    return [
        Case("ratchet_stream", lambda: pair.send(PLAINTEXT), stream_floor, number=200),
        Case("ratchet_ping_pong", ping_pong, ping_pong_floor, number=50),
    ]


def _bundles(bob: Account, count: int, *, post_quantum: bool) -> Iterator[bytes]:
    """Encoded bundles, each with its own one-time prekeys, as a relay hands them out."""
    bob.generate_one_time_prekeys(count)
    upload = bob.prekey_upload()
    for opk, kem in zip(
        upload.one_time_prekeys[-count:], upload.one_time_kem_prekeys[-count:], strict=True
    ):
        bundle = PreKeyBundle(
            "bob",
            1,
            bob.identity.public,
            upload.signed_prekey,
            opk,
            kem if post_quantum else None,
            False,
        )
        yield bundle.encode()


def handshake_case(name: str, repeats: int, *, post_quantum: bool) -> Case:
    """Bundle bytes in, first plaintext out: check, initiator, responder, first message."""
    number = 3
    alice = Account.create(now=NOW, one_time_prekeys=0)
    bob = Account.create(now=NOW, one_time_prekeys=0)
    bundles = iter(list(_bundles(bob, (repeats + 1) * number, post_quantum=post_quantum)))

    def op() -> None:
        bundle = PreKeyBundle.decode(next(bundles))
        record = SessionRecord()
        session = alice.create_outbound_session(
            bundle, local=_ALICE, remote=_BOB, now=NOW, post_quantum=post_quantum
        )
        record.install(session)
        data = record.encrypt(PLAINTEXT, now=NOW)
        received = SessionRecord().decrypt(data, bob, local=_BOB, remote=_ALICE, now=NOW)
        if received.plaintext != PLAINTEXT:
            raise AssertionError("handshake round trip")

    sample = PreKeyBundle.decode(next(_bundles(bob, 1, post_quantum=post_quantum)))
    sample_bytes = sample.encode()
    spk = sample.signed_prekey
    identity = sample.identity
    ad = alice.identity.public.encode() + identity.encode()
    # The floor's own private keys in the roles of the real ones (same sizes and work).
    alice_dh, _ = f_keygen()
    spk_private, spk_public = f_keygen()
    bob_dh, bob_dh_public = f_keygen()
    opk_private, opk_public = f_keygen()
    kem_private = MLKEM768PrivateKey.generate()
    kem_public = kem_private.public_key().public_bytes_raw()
    alice_public = alice.identity.public.ed25519
    info = PQXDH_INFO if post_quantum else X3DH_INFO

    def floor() -> None:
        # Initiator: decode and verify the bundle, four DH (and KEM), SK, first chain.
        f_decode(sample_bytes)
        f_verify(identity.ed25519, spk.signature, b"\x05" + spk.public)
        ss = ct = b""
        if post_quantum:
            assert sample.kem_prekey is not None
            f_verify(
                identity.ed25519, sample.kem_prekey.signature, b"\x0b" + sample.kem_prekey.public
            )
            ss, ct = MLKEM768PublicKey.from_public_bytes(kem_public).encapsulate()
        base, base_public = f_keygen()
        dh = f_dh(alice_dh, spk_public) + f_dh(base, bob_dh_public)
        dh += f_dh(base, spk_public) + f_dh(base, opk_public)
        secret = f_hkdf(KDF_PREFIX + dh + ss, bytes(32), info, 32)
        ratchet, ratchet_public = f_keygen()
        chain = f_hkdf(f_dh(ratchet, spk_public), secret, RATCHET_ROOT_INFO, 64)[32:]
        header, body = f_ratchet_seal(chain, ratchet_public, PLAINTEXT, ad)
        kem_id = 3 if post_quantum else None
        message = f_pack([2, alice_public, base_public, 1, 2, kem_id, ct or None, header, body])
        # Responder: decode, four DH (and KEM), SK, DH step, decrypt.
        f_decode(message)
        dh = f_dh(spk_private, bob_dh_public) + f_dh(bob_dh, base_public)
        dh += f_dh(spk_private, base_public) + f_dh(opk_private, base_public)
        if post_quantum:
            ss = kem_private.decapsulate(ct)
        secret = f_hkdf(KDF_PREFIX + dh + ss, bytes(32), info, 32)
        f_dh_step(secret, spk_private, ratchet_public)
        f_ratchet_open(chain, header, body, ad)

    return Case(name, op, floor, number=number)


# ------------------------------------------------------------------ sender keys


def sender_key_cases(repeats: int) -> list[Case]:
    number = 200
    outbound = OutboundSenderKey.create(GROUP_ID, NOW)
    record = SenderKeyRecord(GROUP_ID)
    record.process_distribution(
        outbound.distribution_message(sender=BENCH_SENDER), sender=BENCH_SENDER
    )
    sender = OutboundSenderKey.create(GROUP_ID, NOW)
    record.process_distribution(
        sender.distribution_message(sender=BENCH_SENDER), sender=BENCH_SENDER
    )
    messages = iter(
        [sender.encrypt(PLAINTEXT, sender=BENCH_SENDER) for _ in range((repeats + 1) * number)]
    )

    def decrypt() -> None:
        if record.decrypt(next(messages), sender=BENCH_SENDER) != PLAINTEXT:
            raise AssertionError("sender key round trip")

    chain_key = os.urandom(32)
    signing = Ed25519PrivateKey.generate()
    signing_public = signing.public_key().public_bytes_raw()
    sample = f_sender_key_encrypt(chain_key, signing, PLAINTEXT)
    return [
        Case(
            "sender_key_encrypt",
            lambda: outbound.encrypt(PLAINTEXT, sender=BENCH_SENDER),
            lambda: f_sender_key_encrypt(chain_key, signing, PLAINTEXT),
            number=number,
        ),
        Case(
            "sender_key_decrypt",
            decrypt,
            lambda: f_sender_key_decrypt(chain_key, signing_public, sample),
            number=number,
        ),
    ]


# ------------------------------------------------------------------ groups


class _Member:
    """A group member's single device: enough of it to answer a one-to-one session."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.address = Address(user_id, 1)
        self.account = Account.create(now=NOW, one_time_prekeys=0)
        user_identity = IdentityKeyPair.generate()
        entry = DeviceEntry.prove(self.account.identity, user_id, 1, user_identity.public.ed25519)
        initial = DeviceList.initial(user_id, user_identity.public.ed25519, [entry])
        self.device_list: SignedDeviceList = initial.sign(user_identity)
        self.party = Party(user_id, 1, user_identity.public.ed25519)
        self.record = SessionRecord()

    def bundle(self) -> bytes:
        return self.account.bundle(self.user_id, 1, one_time=False).encode()

    def answer(self, payload: bytes, sender: Party) -> bytes:
        """Decrypt what ``sender`` sent us and reply with a text (acknowledging the session)."""
        self.record.decrypt(payload, self.account, local=self.party, remote=sender, now=NOW)
        return self.record.encrypt(Text(os.urandom(16), NOW, b"ok").encode(), now=NOW)


class _GroupBench:
    """Our device, its peers and the groups the group cases run in."""

    def __init__(self, sizes: Sequence[int], removal_size: int) -> None:
        self.me = ClientCore.create_primary("me", 1, now=NOW)
        largest = max([*sizes, removal_size + 1])
        # Member user ids sort after "me"'s neighbours; any order works.
        self.members = [_Member(f"member{index:04d}") for index in range(largest - 1)]
        for member in self.members:
            self.me.process_device_list(member.device_list.encode())
            self.me.process_bundle(member.bundle(), now=NOW)
        # The removal group's members answer, so their sessions are in steady state.
        for member in self.members[: removal_size - 1]:
            self._exchange(member)
        self.groups = {size: self._create(size) for size in sorted({*sizes, removal_size})}
        self.spare = self.members[removal_size - 1]
        self._exchange(self.spare)
        self.me.take_changes()

    def _exchange(self, member: _Member) -> None:
        _, sends = self.me.send_direct(member.user_id, b"hello", now=NOW)
        ((_, payload),) = sends[0].payloads
        self.me.receive(
            member.address, ENVELOPE_DIRECT, member.answer(payload, self.me.party), now=NOW
        )

    def _create(self, size: int) -> bytes:
        group_id, _ = self.me.create_group(
            "bench", [m.user_id for m in self.members[: size - 1]], now=NOW
        )
        self.me.send_group(group_id, PLAINTEXT, now=NOW)  # every member now holds our key
        return group_id

    def send(self, group_id: bytes) -> bytes:
        _, sends = self.me.send_group(group_id, PLAINTEXT, now=NOW)
        last = sends[-1]
        assert isinstance(last, GroupSend)
        return last.payload

    def stored_group(self, size: int) -> bytes:
        """The group's record as the client stores it (its pickle)."""
        group_id = self.groups[size]
        self.me.take_changes()
        self.cycle_member(group_id)
        self.send(group_id)
        record = self.me.take_changes()[RecordKey.group(group_id)]
        assert record is not None
        return record

    def cycle_member(self, group_id: bytes) -> None:
        """Add the spare member, let it get our key, remove it: our next send rotates."""
        self._took_effect(self.me.add_member(group_id, self.spare.user_id, now=NOW))
        self.send(group_id)
        self._took_effect(self.me.remove_member(group_id, self.spare.user_id, now=NOW))

    def _took_effect(self, sends: list[Send]) -> None:
        """The relay's receipt for our change comes back: the change applies."""
        (change,) = sends
        assert isinstance(change, ChangeSend)
        self.me.receive(self.me.address, ENVELOPE_RECEIPT, change.receipt, now=NOW)


def _group_send_case(bench: _GroupBench, size: int, floor: Callable[[], object]) -> Case:
    group_id = bench.groups[size]
    return Case(f"group_send_{size}", lambda: bench.send(group_id), floor, number=50)


def group_cases(bench: _GroupBench, sizes: Sequence[int], removal_size: int) -> list[Case]:
    chain_key = os.urandom(32)
    signing = Ed25519PrivateKey.generate()

    def send_floor() -> None:
        f_group_send(chain_key, signing, PLAINTEXT)

    cases = [_group_send_case(bench, size, send_floor) for size in sizes]
    group_id = bench.groups[removal_size]
    pair_ad = bytes(66)
    ratchet_key = f_keygen()[1]
    recipients = removal_size - 1

    def after_removal_floor() -> None:
        # A new chain (id, key, signing key), its SKDM in a SenderKey content,
        # one ratchet message per remaining device, then the group message.
        os.urandom(4)
        new_chain = os.urandom(32)
        key = Ed25519PrivateKey.from_private_bytes(os.urandom(32))
        public = key.public_key().public_bytes_raw()
        sender = [BENCH_SENDER.user_id, BENCH_SENDER.device_id]
        skdm = f_pack([SENDER_KEY_VERSION, GROUP_ID, *sender, 1 << 30, 0, new_chain, public])
        content = f_pack([2, skdm])
        for _ in range(recipients):
            f_ratchet_send(chain_key, ratchet_key, content, pair_ad)
        f_group_send(new_chain, key, PLAINTEXT)

    cases.append(
        Case(
            f"group_send_after_removal_{removal_size}",
            lambda: bench.send(group_id),
            after_removal_floor,
            prepare=lambda: bench.cycle_member(group_id),
        )
    )
    return cases


# ------------------------------------------------------------------ saving and loading


def storage_cases(record: SessionRecord, group_bytes: bytes) -> list[Case]:
    """A steady-state session record and a group's stored states, saved and loaded."""
    record_bytes = record.to_bytes()
    record_value = msgpack.unpackb(record_bytes, raw=False)

    # The ratchet private key is kept as bytes and loaded into OpenSSL only
    # for a DH step or a send (double_ratchet.RatchetState), so neither a load
    # nor a save needs a key operation: their floors are the decode and the pack.
    def record_load_floor() -> None:
        f_decode(record_bytes)

    def record_save_floor() -> None:
        f_pack(record_value)

    group = Group.from_bytes(group_bytes)
    states = f_decode(group_bytes)[1]

    def group_load_floor() -> None:
        # Each held state decoded and hashed (its state hash is not stored).
        for state in f_decode(group_bytes)[1]:
            f_decode(state)
            hashlib.sha256(GROUP_STATE_HASH_CONTEXT + state).digest()

    def group_save_floor() -> None:
        # The states' encodings exist from when each state was made (its hash needs them).
        f_pack([1, states])

    def load_record() -> None:
        SessionRecord.from_bytes(record_bytes)

    def load_group() -> None:
        Group.from_bytes(group_bytes)

    return [
        Case("session_record_save", record.to_bytes, record_save_floor, number=200),
        Case("session_record_load", load_record, record_load_floor, number=200),
        Case("group_state_save", group.to_bytes, group_save_floor, number=20),
        Case("group_state_load", load_group, group_load_floor, number=20),
    ]


# ------------------------------------------------------------------ the run


def run_protocol_bench(
    *,
    repeats: int = DEFAULT_REPEATS,
    group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES,
    removal_group_size: int = DEFAULT_REMOVAL_GROUP_SIZE,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every case: ``{operation: Timing, ..., "bytes": {name: size}}``."""
    if repeats < 1 or min(*group_sizes, removal_group_size) < 2:
        raise ValueError("repeats must be at least 1 and groups at least 2 members")
    say = progress or (lambda _: None)
    results: dict[str, Any] = {}

    def run(cases: list[Case]) -> None:
        for case in cases:
            say(case.name)
            results[case.name] = measure(case, repeats)

    run([handshake_case("pqxdh_complete", repeats, post_quantum=True)])
    run([handshake_case("x3dh_complete", repeats, post_quantum=False)])
    pair = _Pair()
    run(ratchet_cases(pair))
    run(sender_key_cases(repeats))
    say("group setup")
    groups = _GroupBench(group_sizes, removal_group_size)
    run(group_cases(groups, group_sizes, removal_group_size))
    group_bytes = groups.stored_group(removal_group_size)
    run(storage_cases(pair.a, group_bytes))
    results["bytes"] = sizes(pair, groups, group_bytes, removal_group_size)
    return results


def sizes(pair: _Pair, groups: _GroupBench, group_bytes: bytes, group_size: int) -> dict[str, int]:
    """Wire and storage sizes for a 100-byte plaintext, in steady state."""
    message = pair.a.encrypt(PLAINTEXT, now=NOW)
    pair.b.decrypt(message, pair.bob, local=_BOB, remote=_ALICE, now=NOW)
    group_message = OutboundSenderKey.create(GROUP_ID, NOW).encrypt(PLAINTEXT, sender=BENCH_SENDER)
    group_payload = groups.send(groups.groups[group_size])
    _, sends = groups.me.send_direct(groups.spare.user_id, PLAINTEXT, now=NOW)
    direct_payload = sends[0].payloads[0][1]
    return {
        "one_to_one_message": len(message),
        "one_to_one_added": len(message) - len(PLAINTEXT),
        "group_message": len(group_message),
        "group_added": len(group_message) - len(PLAINTEXT),
        "one_to_one_text_added": len(direct_payload) - len(PLAINTEXT),
        "group_text_added": len(group_payload) - len(PLAINTEXT),
        "session_record": len(pair.a.to_bytes()),
        f"group_state_{group_size}": len(group_bytes),
        f"group_state_{group_size}_held_states": len(Group.from_bytes(group_bytes).states),
    }


def as_json(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in results.items():
        out[name] = value.as_json() if isinstance(value, Timing) else value
    return out


def _target(name: str) -> float:
    return HANDSHAKE_TARGET if name.endswith("_complete") else MESSAGE_TARGET


def render(results: dict[str, Any]) -> str:
    """The human-readable report: a table of timings, then sizes against libsignal's."""
    lines = [f"{'operation':34} {'us':>10} {'floor us':>10} {'ratio':>7} {'target':>7}"]
    for name, value in results.items():
        if isinstance(value, Timing):
            target = _target(name)
            verdict = "ok" if value.ratio <= target else "MISSED"
            lines.append(
                f"{name:34} {value.us:10.1f} {value.floor_us:10.1f} {value.ratio:7.2f} "
                f"{target:7.2f} {verdict}"
            )
    sizes_ = results["bytes"]
    lines += [
        "",
        "bytes for a 100-byte plaintext (libsignal: one-to-one "
        f"{LIBSIGNAL_ONE_TO_ONE_BYTES}, group {LIBSIGNAL_GROUP_BYTES}):",
    ]
    lines += [f"  {name:32} {size:8d}" for name, size in sizes_.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------ command line


def add_bench_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``hushchat bench [--json]`` and ``hushchat bench relay [...]``."""
    parser = subparsers.add_parser(
        "bench",
        help="measure protocol operations against their primitive floor",
        description="Time every protocol operation next to the cryptography and msgpack "
        "calls it cannot avoid (its primitive floor); 'bench relay' loads a relay. "
        "Exit status: 0, or 2 for bad arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--repeats",
        type=at_least(1),
        default=DEFAULT_REPEATS,
        help="timed batches per operation, after a warm-up",
    )
    parser.add_argument(
        "--group-sizes",
        type=_sizes,
        default=",".join(map(str, DEFAULT_GROUP_SIZES)),
        help="comma-separated group sizes for the steady-state group send",
    )
    parser.add_argument(
        "--removal-group-size",
        type=at_least(2, "a group has at least 2 members"),
        default=DEFAULT_REMOVAL_GROUP_SIZE,
        help="group size for the first send after a removal",
    )
    parser.set_defaults(run=run_bench)
    targets = parser.add_subparsers(dest="bench_target", metavar="[relay]")
    add_relay_bench_command(targets)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError("a group has at least 2 members")
    return values


def run_bench(args: argparse.Namespace) -> int:
    def progress(name: str) -> None:
        print(f"  {name} ...", file=sys.stderr, flush=True)

    results = run_protocol_bench(
        repeats=args.repeats,
        group_sizes=args.group_sizes,
        removal_group_size=args.removal_group_size,
        progress=None if args.json else progress,
    )
    print(json.dumps(as_json(results), indent=2) if args.json else render(results))
    return 0
