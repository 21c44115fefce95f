"""Project Wycheproof suites run through hushchat's primitive layer.

The files are the repository's copy in ``tests/wycheproof/`` (source and
license in its README), or those in the folder named by
``HUSHCHAT_WYCHEPROOF``; a missing file is a failure, never a skip. Every case
is its own test id.

Where hushchat is stricter than the primitive's RFC, the test says so:
X25519 public keys that are not canonically encoded (top bit set, or
u >= p) are refused although RFC 7748 lets a receiver mask and reduce them,
and all-zero shared secrets (low-order keys) are refused although
Wycheproof rates them "acceptable".

The last tests carry the bad inputs into the protocol: every low-order or
zero-shared-secret X25519 key of the suite, placed in a bundle, a base key
and a ratchet key, and the malleated (S + L) form of a valid signature in
every signed structure, are refused without a change of state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from hushchat.protocol import primitives as p
from hushchat.protocol.account import Account
from hushchat.protocol.address import Address
from hushchat.protocol.devices import DeviceEntry, DeviceList, SignedDeviceList
from hushchat.protocol.double_ratchet import Header
from hushchat.protocol.encoding import pack
from hushchat.protocol.errors import (
    BadMac,
    BadSignature,
    DecodeError,
    DecryptionFailed,
    InvalidArgument,
    InvalidKey,
    NonContributoryKey,
)
from hushchat.protocol.group import ControlMessage, Group, create_group
from hushchat.protocol.group_cipher import OutboundSenderKey, SenderKeyRecord
from hushchat.protocol.keys import IdentityKeyPair, encode_x25519
from hushchat.protocol.messages import PreKeyMessage, RatchetMessage, decode_message
from hushchat.protocol.prekeys import OneTimePreKeyPublic, PreKeyBundle, SignedPreKeyPublic
from hushchat.protocol.primitives import SeededRandom
from hushchat.transport.wire.auth import sign_auth, verify_auth
from tests.support.clock import NOW
from tests.support.paths import WYCHEPROOF
from tests.support.peers import Peer, party
from tests.support.reference import L, P


def wycheproof_dir() -> Path:
    configured = os.environ.get("HUSHCHAT_WYCHEPROOF")
    return Path(configured) if configured else WYCHEPROOF


def cases(filename: str, *, group_filter: dict[str, Any] | None = None) -> list[Any]:
    """One pytest param per test case: (group, case), id ``tc<id>-<result>``."""
    suite = json.loads((wycheproof_dir() / filename).read_text())
    params = []
    for group in suite["testGroups"]:
        if group_filter and any(group.get(k) != v for k, v in group_filter.items()):
            continue
        for case in group["tests"]:
            params.append(pytest.param(group, case, id=f"tc{case['tcId']}-{case['result']}"))
    assert params, f"{filename}: no test case matched {group_filter}"
    return params


def h(value: str) -> bytes:
    return bytes.fromhex(value)


# ------------------------------------------------------------------ X25519


@pytest.mark.parametrize(("group", "case"), cases("x25519_test.json"))
def test_x25519(group: dict[str, Any], case: dict[str, Any]) -> None:
    private = X25519PrivateKey.from_private_bytes(h(case["private"]))
    public = h(case["public"])
    flags = set(case["flags"])
    u = int.from_bytes(public, "little")
    canonical = not public[31] & 0x80 and u < P
    if "NonCanonicalPublic" in flags:
        assert not canonical, "every NonCanonicalPublic key is non-canonical by our rule"
    if not canonical:
        # Stricter than RFC 7748: one encoding per key, so refuse rather than mask/reduce.
        with pytest.raises(InvalidKey) as refused:
            p.check_x25519_public(public)
        assert type(refused.value) is InvalidKey
        with pytest.raises(InvalidKey):
            p.x25519(private, public)
    elif flags & {"LowOrderPublic", "ZeroSharedSecret"}:
        assert case["shared"] == "00" * 32
        with pytest.raises(NonContributoryKey):
            p.x25519(private, public)
    else:
        assert case["result"] in ("valid", "acceptable")
        assert p.x25519(private, public) == h(case["shared"])
    if flags & {"Twist", "LowOrderPublic"} or not canonical:
        # Base keys must be curve points of prime order: all of these are refused.
        with pytest.raises(InvalidKey):
            p.check_x25519_prime_order(public)


# ------------------------------------------------------------------ Ed25519


@pytest.mark.parametrize(("group", "case"), cases("ed25519_test.json"))
def test_ed25519_verify(group: dict[str, Any], case: dict[str, Any]) -> None:
    public = h(group["publicKey"]["pk"])
    signature, message = h(case["sig"]), h(case["msg"])
    if case["result"] == "valid":
        p.ed25519_verify(public, signature, message)
    else:
        # Includes the SignatureMalleability cases (S >= L, RFC 8032 section 5.1.7).
        assert case["result"] == "invalid"
        with pytest.raises(BadSignature):
            p.ed25519_verify(public, signature, message)


# ------------------------------------------------------------------ HKDF, HMAC


@pytest.mark.parametrize(("group", "case"), cases("hkdf_sha256_test.json"))
def test_hkdf_sha256(group: dict[str, Any], case: dict[str, Any]) -> None:
    def derive() -> bytes:
        return p.hkdf_sha256(
            h(case["ikm"]), salt=h(case["salt"]), info=h(case["info"]), length=case["size"]
        )

    if case["result"] == "valid":
        assert derive() == h(case["okm"])
    else:
        assert "SizeTooLarge" in case["flags"]
        with pytest.raises(InvalidArgument):
            derive()


@pytest.mark.parametrize(("group", "case"), cases("hmac_sha256_test.json"))
def test_hmac_sha256(group: dict[str, Any], case: dict[str, Any]) -> None:
    # Groups with 128-bit tags are HMAC-SHA-256 truncated to 16 bytes: our MAC_SIZE.
    tag_bytes = group["tagSize"] // 8
    expected = p.hmac_sha256(h(case["key"]), h(case["msg"]))[:tag_bytes]
    if case["result"] == "valid":
        p.verify_mac(expected, h(case["tag"]))
    else:
        with pytest.raises(BadMac):
            p.verify_mac(expected, h(case["tag"]))


# ------------------------------------------------------------------ AES-256-CBC


@pytest.mark.parametrize(
    ("group", "case"), cases("aes_cbc_pkcs5_test.json", group_filter={"keySize": 256})
)
def test_aes256_cbc_pkcs5(group: dict[str, Any], case: dict[str, Any]) -> None:
    key, iv, ciphertext = h(case["key"]), h(case["iv"]), h(case["ct"])
    if case["result"] == "valid":
        assert p.aes256_cbc_encrypt(key, iv, h(case["msg"])) == ciphertext
        assert p.aes256_cbc_decrypt(key, iv, ciphertext) == h(case["msg"])
    else:
        with pytest.raises(DecryptionFailed):
            p.aes256_cbc_decrypt(key, iv, ciphertext)


# ------------------------------------------------------------------ ML-KEM-768


@pytest.mark.parametrize(("group", "case"), cases("mlkem_768_test.json"))
def test_mlkem768(group: dict[str, Any], case: dict[str, Any]) -> None:
    seed, ciphertext = h(case["seed"]), h(case["c"])
    if case["result"] == "valid":
        key = p.mlkem768_private_from_seed(seed)
        assert p.mlkem768_public_bytes(key) == h(case["ek"])
        # Includes modified and random ciphertexts: implicit rejection gives K.
        assert p.mlkem768_decapsulate(key, ciphertext) == h(case["K"])
    elif "ek" not in case:  # seed ("private key") too short or too long
        with pytest.raises(DecodeError):
            p.mlkem768_private_from_seed(seed)
    else:  # ciphertext of the wrong length
        key = p.mlkem768_private_from_seed(seed)
        assert p.mlkem768_public_bytes(key) == h(case["ek"])
        with pytest.raises(DecodeError):
            p.mlkem768_decapsulate(key, ciphertext)


# ------------------------------------------------------------------ through the protocol
# The primitive tests above show x25519() and ed25519_verify() refuse the bad
# inputs; these show every place the protocol feeds them a peer's key or
# signature does too, and that a refusal changes no state.


def low_order_publics() -> list[Any]:
    """Each distinct X25519 public key of a LowOrderPublic or ZeroSharedSecret case."""
    keys: dict[str, int] = {}
    for param in cases("x25519_test.json"):
        _, case = param.values
        if set(case["flags"]) & {"LowOrderPublic", "ZeroSharedSecret"}:
            keys.setdefault(case["public"], case["tcId"])
    return [pytest.param(h(public), id=f"tc{tc}") for public, tc in keys.items()]


def refused_unchanged(peer: Peer, data: bytes, error: type[Exception]) -> None:
    before = peer.state()
    with pytest.raises(error):
        peer.decrypt(data)
    assert peer.state() == before


@pytest.mark.parametrize("public", low_order_publics())
def test_low_order_x25519_keys_are_refused_by_the_handshake_and_the_ratchet(
    public: bytes, peers: Callable[..., tuple[Peer, Peer]]
) -> None:
    """Wherever a peer's X25519 key meets a DH: bundle prekeys, base key, ratchet keys."""
    u = int.from_bytes(public, "little")
    canonical = not public[31] & 0x80 and u < P
    # A canonical low-order key decodes and is refused by the DH (all-zero output)
    # or the base key's subgroup check; a non-canonical one is refused on sight.
    dh_error = NonContributoryKey if canonical else InvalidKey

    # 1. A bundle whose signed or one-time prekey is the key (validly signed).
    alice, bob = peers()
    bundle = bob.account.bundle("bob", 1)
    identity = bob.account.identity
    spk = SignedPreKeyPublic(
        bundle.signed_prekey.key_id, public, identity.sign(encode_x25519(public))
    )
    for candidate in (
        dataclasses.replace(bundle, signed_prekey=spk),
        dataclasses.replace(bundle, one_time_prekey=OneTimePreKeyPublic(77, public)),
    ):
        candidate.verify()  # the signatures are fine: only the key is bad
        before = alice.account.to_bytes()
        for post_quantum in (True, False):
            with pytest.raises(dh_error):
                alice.account.create_outbound_session(
                    candidate, now=NOW, post_quantum=post_quantum, rng=alice.rng, **alice.parties
                )
        assert alice.account.to_bytes() == before
        if not canonical:
            with pytest.raises(InvalidKey):
                PreKeyBundle.decode(candidate.encode())

    # 2. An initial message whose base key, or whose first ratchet key, is the key.
    alice.start(bundle)
    first = decode_message(alice.encrypt(b"x"))
    assert isinstance(first, PreKeyMessage)
    bad_base = PreKeyMessage(dataclasses.replace(first.handshake, base_key=public), first.message)
    refused_unchanged(bob, bad_base.encode(), InvalidKey)
    bad_ratchet = PreKeyMessage(
        first.handshake, RatchetMessage(Header(public, 0, 0).encode(), first.message.body)
    )
    refused_unchanged(bob, bad_ratchet.encode(), dh_error)
    assert bob.decrypt(first.encode()).plaintext == b"x"

    # 3. A DH ratchet step in an established session, both directions.
    assert alice.decrypt(bob.encrypt(b"y")).plaintext == b"y"
    step = RatchetMessage(Header(public, 0, 0).encode(), bytes(32)).encode()
    refused_unchanged(bob, step, dh_error)
    refused_unchanged(alice, step, dh_error)
    assert bob.decrypt(alice.encrypt(b"still fine")).plaintext == b"still fine"


def malleated(signature: bytes) -> bytes:
    """The same signature with S replaced by S + L: verifies under a lax (non-RFC) check."""
    s = int.from_bytes(signature[32:], "little") + L
    return signature[:32] + s.to_bytes(32, "little")


def test_malleated_signatures_are_refused_wherever_the_protocol_verifies_one(
    make_account: Callable[..., Account],
) -> None:
    """S + L on a valid signature (Wycheproof's SignatureMalleability) in every signed structure."""
    alice, bob = make_account(), make_account()

    # Signed prekey and KEM prekey of a bundle.
    bundle = bob.bundle("bob", 1)
    assert bundle.kem_prekey is not None
    spk, kem = bundle.signed_prekey, bundle.kem_prekey
    for candidate in (
        dataclasses.replace(
            bundle, signed_prekey=dataclasses.replace(spk, signature=malleated(spk.signature))
        ),
        dataclasses.replace(
            bundle, kem_prekey=dataclasses.replace(kem, signature=malleated(kem.signature))
        ),
    ):
        with pytest.raises(BadSignature):
            alice.create_outbound_session(
                candidate, local=party("alice"), remote=party("bob"), now=NOW
            )

    # A device list, signed by the user identity.
    user = IdentityKeyPair(bytes(range(32)))
    device = IdentityKeyPair(bytes(range(1, 33)))
    entries = [DeviceEntry.prove(device, "bob", 1, user.public.ed25519)]
    signed = DeviceList.initial("bob", user.public.ed25519, entries).sign(user)
    assert SignedDeviceList.decode(signed.encode()) == signed
    with pytest.raises(BadSignature):
        SignedDeviceList.decode(pack([signed.body, malleated(signed.signature)]))

    # A group control message, signed by the author device.
    create = create_group(
        title="t",
        members=[],
        author_user_id="bob",
        author_device_id=1,
        device_key=device,
        rng=SeededRandom(b"malleability"),
    )
    directory = {"bob": signed}
    Group.from_genesis(create, directory)
    forged = ControlMessage.decode(pack([create.body, malleated(create.signature)]))
    with pytest.raises(BadSignature):
        Group.from_genesis(forged, directory)

    # A sender-key message, signed by the chain's signing key; the record is unchanged.
    outbound = OutboundSenderKey.create(bytes(16), now=NOW, rng=SeededRandom(b"chain"))
    inbound = SenderKeyRecord(bytes(16))
    sender = Address("alice", 1)
    inbound.process_distribution(outbound.distribution_message(sender=sender), sender=sender)
    message = outbound.encrypt(b"group text", sender=sender)
    before = inbound.to_bytes()
    with pytest.raises(BadSignature):
        inbound.decrypt(message[:-64] + malleated(message[-64:]), sender=sender)
    assert inbound.to_bytes() == before
    assert inbound.decrypt(message, sender=sender) == b"group text"

    # The relay's check of a device's AUTH signature.
    auth = sign_auth(device, "relay", bytes(32), "bob", 1)
    verify_auth(device.public.ed25519, auth, "relay", bytes(32), "bob", 1)
    with pytest.raises(BadSignature):
        verify_auth(device.public.ed25519, malleated(auth), "relay", bytes(32), "bob", 1)
