"""The primitive layer: known answers, key checks, the Ed25519 -> X25519 map, randomness."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from hushchat.protocol import primitives as p
from hushchat.protocol.errors import (
    BadMac,
    BadSignature,
    DecodeError,
    DecryptionFailed,
    InvalidArgument,
    InvalidKey,
    InvalidState,
    NonContributoryKey,
)
from hushchat.protocol.keys import IdentityKeyPair, PublicIdentity
from tests.support.reference import SMALL_ORDER_KEY, L, P

if TYPE_CHECKING:
    from tests.support.reference import Curve25519

# RFC 8032 section 7.1: (secret key, public key) of TEST 1, 2, 3, 1024 and SHA(abc).
RFC8032_KEYS = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
    ),
    (
        "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
        "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
    ),
    (
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
    ),
]
RFC8032_IDS = ["test1", "test2", "test3", "test1024", "sha_abc"]


def clamp(scalar: bytes) -> int:
    h = bytearray(scalar)
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    return int.from_bytes(h, "little")


# ------------------------------------------------------------------ Ed25519 -> X25519


@pytest.mark.parametrize(("seed", "public"), RFC8032_KEYS, ids=RFC8032_IDS)
def test_conversion_of_rfc8032_keys(seed: str, public: str, curve25519: Curve25519) -> None:
    seed_b, public_b = bytes.fromhex(seed), bytes.fromhex(public)
    # The test key really is RFC 8032's: pyca and an independent [a]B agree on it.
    assert Ed25519PrivateKey.from_private_bytes(seed_b).public_key().public_bytes_raw() == public_b
    a = clamp(hashlib.sha512(seed_b).digest()[:32])
    assert curve25519.encode(curve25519.mul(curve25519.base, a)) == public_b

    u = p.ed25519_public_to_x25519(public_b)
    # RFC 7748 section 4.1 map u = (1 + y) / (1 - y), computed here without the library.
    assert u == curve25519.to_u(curve25519.decode(public_b))  # type: ignore[arg-type]
    # The converted private key's X25519 public key is the converted public key.
    private = p.ed25519_private_to_x25519(seed_b)
    assert int.from_bytes(private, "little") == a
    assert X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw() == u
    identity = IdentityKeyPair(seed_b)
    assert identity.public.ed25519 == public_b
    assert identity.public.x25519 == u
    assert PublicIdentity.from_bytes(public_b).x25519 == u


def test_conversion_known_answers() -> None:
    # libsodium test/default/ed25519_convert.c and .exp.
    seed = bytes.fromhex("421151a459faeade3d247115f94aedae42318124095afabe4d1451a559faedee")
    public = bytes.fromhex("b5076a8474a832daee4dd5b4040983b6623b5f344aca57d4d6ee4baf3f259e6e")
    assert IdentityKeyPair(seed).public.ed25519 == public
    assert p.ed25519_public_to_x25519(public) == bytes.fromhex(
        "f1814f0e8ff1043d8a44d25babff3cedcae6c22c3edaa48f857ae70de2baae50"
    )
    assert p.ed25519_private_to_x25519(seed) == bytes.fromhex(
        "8052030376d47112be7f73ed7a019293dd12ad910b654455798b4667d73de166"
    )
    # RFC 8032 TEST 1 public key, u computed with the Edwards reference of tests/support.
    assert p.ed25519_public_to_x25519(bytes.fromhex(RFC8032_KEYS[0][1])) == bytes.fromhex(
        "d85e07ec22b0ad881537c2f44d662d1a143cf830c57aca4305d85c7a90f6b62e"
    )


def small_order_encodings(curve: Curve25519) -> list[bytes]:
    """Every encoding of an 8-torsion point: canonical ones, x = 0 with the sign
    bit set, and y + p where that still fits in 255 bits."""
    out = []
    for x, y in curve.torsion:
        out.append(curve.encode((x, y)))
        if x == 0:
            out.append((y | 1 << 255).to_bytes(32, "little"))
        if y + P < 2**255:
            for sign in (0, 1):
                out.append((y + P | sign << 255).to_bytes(32, "little"))
    return out


def test_small_order_ed25519_keys_are_refused(curve25519: Curve25519) -> None:
    encodings = small_order_encodings(curve25519)
    assert len(set(encodings)) == 14  # 8 canonical, 2 negative zeros, 4 with y >= p
    assert SMALL_ORDER_KEY in encodings  # the one other tests plant
    for encoded in encodings:
        with pytest.raises(InvalidKey):
            p.ed25519_public_to_x25519(encoded)
        with pytest.raises(InvalidKey):
            PublicIdentity.from_bytes(encoded)


@pytest.mark.parametrize("torsion", range(1, 8))
def test_torsioned_ed25519_key_is_refused(torsion: int, curve25519: Curve25519) -> None:
    public = curve25519.decode(bytes.fromhex(RFC8032_KEYS[1][1]))
    assert public is not None
    torsioned = curve25519.encode(curve25519.add(public, curve25519.torsion[torsion]))
    with pytest.raises(InvalidKey):
        p.ed25519_public_to_x25519(torsioned)
    with pytest.raises(InvalidKey):
        PublicIdentity.from_bytes(torsioned)


def test_undecodable_ed25519_keys_are_refused(curve25519: Curve25519) -> None:
    y = 2
    while curve25519.recover_x(y, 0) is not None:
        y += 1
    for bad in [y.to_bytes(32, "little"), (2**255 - 1).to_bytes(32, "little"), b"\x01" * 31]:
        with pytest.raises(InvalidKey):
            p.ed25519_public_to_x25519(bad)
    with pytest.raises(InvalidKey):
        PublicIdentity.from_bytes("not bytes")  # type: ignore[arg-type]


# ------------------------------------------------------------------ X25519 key checks


def test_x25519_refuses_non_canonical_encodings() -> None:
    honest = p.x25519_public_bytes(X25519PrivateKey.from_private_bytes(bytes(range(32))))
    high_bit = honest[:31] + bytes([honest[31] | 0x80])
    private = X25519PrivateKey.from_private_bytes(bytes(32))
    for bad in [
        high_bit,
        P.to_bytes(32, "little"),
        (P + 1).to_bytes(32, "little"),
        (2**255 - 1).to_bytes(32, "little"),
        honest[:31],
        honest + b"\0",
    ]:
        with pytest.raises(InvalidKey):
            p.check_x25519_public(bad)
        with pytest.raises(InvalidKey):
            p.x25519(private, bad)
    assert p.check_x25519_public(honest) == honest


def low_order_u(curve: Curve25519) -> list[bytes]:
    """Canonical u-coordinates of points of order 1 to 8 (and u = p - 1, on the twist)."""
    us = {curve.to_u(t) for t in curve.torsion if t != curve.IDENTITY}
    return [*sorted(us), (P - 1).to_bytes(32, "little")]


def test_x25519_refuses_low_order_keys(curve25519: Curve25519) -> None:
    keys = low_order_u(curve25519)
    assert len(keys) == 5  # 0, 1, the two of order 8, and p - 1
    private = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"k").digest())
    for u in keys:
        with pytest.raises(NonContributoryKey):
            p.x25519(private, u)
        with pytest.raises(InvalidKey):
            p.check_x25519_prime_order(u)
        with pytest.raises(InvalidKey):
            p.check_x25519_not_small_order(u)


@pytest.mark.parametrize("torsion", range(8))
def test_small_order_check_passes_keys_with_a_prime_order_part(
    torsion: int, curve25519: Curve25519
) -> None:
    """Only keys whose every DH output is zero are refused: a torsioned key gives the
    same outputs as its prime-order part, so it is as good (or bad) a prekey."""
    private = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"small").digest())
    key = curve25519.add_torsion_to_u(p.x25519_public_bytes(private), torsion)
    assert p.check_x25519_not_small_order(key) == key
    with pytest.raises(InvalidKey):
        p.check_x25519_not_small_order(key[:31] + bytes([key[31] | 0x80]))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=0, max_value=P - 1))
def test_small_order_check_matches_reference(n: int, curve25519: Curve25519) -> None:
    u = n.to_bytes(32, "little")
    point = None if n == P - 1 else curve25519.from_u(u)
    # Small order: the five of low_order_u (p - 1 is the twist's point of order 4).
    small = n == P - 1 or (point is not None and curve25519.mul(point, 8) == curve25519.IDENTITY)
    if small:
        with pytest.raises(InvalidKey):
            p.check_x25519_not_small_order(u)
    else:
        assert p.check_x25519_not_small_order(u) == u


def test_x25519_agrees() -> None:
    a = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"a").digest())
    b = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"b").digest())
    ab = p.x25519(a, p.x25519_public_bytes(b))
    assert ab == p.x25519(b, p.x25519_public_bytes(a))
    # RFC 7748 section 6.1.
    alice = X25519PrivateKey.from_private_bytes(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob_public = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert p.x25519(alice, bob_public) == bytes.fromhex(
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    )


@pytest.mark.parametrize("torsion", range(1, 8))
def test_prime_order_check_refuses_torsioned_keys(torsion: int, curve25519: Curve25519) -> None:
    private = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"t").digest())
    honest = p.x25519_public_bytes(private)
    assert p.check_x25519_prime_order(honest) == honest
    torsioned = curve25519.add_torsion_to_u(honest, torsion)
    # The reason for the check: a torsioned key gives the very same DH output.
    peer = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"peer").digest())
    assert p.x25519(peer, torsioned) == p.x25519(peer, honest)
    with pytest.raises(InvalidKey):
        p.check_x25519_prime_order(torsioned)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=0, max_value=P - 1))
def test_prime_order_check_matches_reference(n: int, curve25519: Curve25519) -> None:
    curve = curve25519
    u = n.to_bytes(32, "little")
    point = None if n == P - 1 else curve.from_u(u)
    expected = point is not None and curve.mul(point, L) == curve.IDENTITY
    if expected:
        assert p.check_x25519_prime_order(u) == u
    else:
        with pytest.raises(InvalidKey):
            p.check_x25519_prime_order(u)


def test_subgroup_check_scalar_has_the_properties_its_proof_needs(curve25519: Curve25519) -> None:
    k = p.SUBGROUP_CHECK_SCALAR
    clamped = bytearray(k.to_bytes(32, "little"))
    clamped[0] &= 248
    clamped[31] = clamped[31] & 127 | 64
    assert int.from_bytes(clamped, "little") == k  # X25519 uses it as it is
    assert k % 8 == 0 and k % L == L - 1
    twist_order = 2 * P + 2 - 8 * L
    twist_prime = twist_order // 4
    assert twist_order % 4 == 0 and pow(3, twist_prime - 1, twist_prime) == 1
    assert k % twist_prime not in (1, twist_prime - 1)


@settings(max_examples=40, deadline=None)
@given(
    scalar=st.integers(min_value=1, max_value=2**252),
    torsion=st.integers(min_value=0, max_value=7),
)
def test_subgroup_checks_match_reference_on_torsioned_points(
    scalar: int, torsion: int, curve25519: Curve25519
) -> None:
    curve = curve25519
    point = curve.add(curve.mul(curve.base, scalar), curve.torsion[torsion])
    ed25519, u = curve.encode(point), curve.to_u(point)
    if torsion == 0:
        assert p.check_x25519_prime_order(u) == u
        assert p.ed25519_public_to_x25519(ed25519) == u
        return
    with pytest.raises(InvalidKey):
        p.check_x25519_prime_order(u)
    with pytest.raises(InvalidKey):
        p.ed25519_public_to_x25519(ed25519)


@settings(max_examples=20, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_prime_order_check_accepts_every_honest_key(scalar: bytes) -> None:
    public = p.x25519_public_bytes(X25519PrivateKey.from_private_bytes(scalar))
    assert p.check_x25519_prime_order(public) == public


# ------------------------------------------------------------------ hashing, MACs, AES


def test_hkdf_rfc5869_case1() -> None:
    okm = p.hkdf_sha256(
        bytes.fromhex("0b" * 22),
        salt=bytes.fromhex("000102030405060708090a0b0c"),
        info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        length=42,
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )
    assert p.hkdf_sha256(b"k", salt=None, info=b"i", length=32) == p.hkdf_sha256(
        b"k", salt=bytes(32), info=b"i", length=32
    )
    with pytest.raises(InvalidArgument):
        p.hkdf_sha256(b"k", salt=None, info=b"", length=255 * 32 + 1)


def test_hmac_rfc4231_case2() -> None:
    assert p.hmac_sha256(b"Jefe", b"what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def test_verify_mac() -> None:
    tag = p.hmac_sha256(b"key", b"data")[:16]
    p.verify_mac(tag, bytes(tag))
    for i in range(len(tag) * 8):
        flipped = bytearray(tag)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(BadMac):
            p.verify_mac(tag, bytes(flipped))
    for other in [tag[:-1], tag + b"\0", b""]:
        with pytest.raises(BadMac):
            p.verify_mac(tag, other)


def test_aes256_cbc_known_answer() -> None:
    # NIST SP 800-38A F.2.5 (CBC-AES256), first block; PKCS#7 adds a full padding block.
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    iv = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
    plaintext = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")
    ciphertext = p.aes256_cbc_encrypt(key, iv, plaintext)
    assert len(ciphertext) == 32
    assert ciphertext[:16].hex() == "f58c4c04d6e5f1ba779eabfb5f7bfbd6"
    assert p.aes256_cbc_decrypt(key, iv, ciphertext) == plaintext


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=100))
def test_aes256_cbc_round_trip(plaintext: bytes) -> None:
    key, iv = bytes(range(32)), bytes(range(16))
    ciphertext = p.aes256_cbc_encrypt(key, iv, plaintext)
    assert len(ciphertext) == (len(plaintext) // 16 + 1) * 16
    assert p.aes256_cbc_decrypt(key, iv, ciphertext) == plaintext


def test_aes256_cbc_refuses_bad_lengths_and_padding() -> None:
    key, iv = bytes(range(32)), bytes(range(16))
    for bad in [b"", b"\0" * 15, b"\0" * 17]:
        with pytest.raises(DecryptionFailed):
            p.aes256_cbc_decrypt(key, iv, bad)
    ciphertext = p.aes256_cbc_encrypt(key, iv, b"sixteen byte msg")
    # Flipping the last byte of the second-to-last block corrupts the padding byte.
    corrupted = bytearray(ciphertext)
    corrupted[15] ^= 0x01
    with pytest.raises(DecryptionFailed):
        p.aes256_cbc_decrypt(key, iv, bytes(corrupted))


# ------------------------------------------------------------------ Ed25519 signatures


def test_ed25519_rfc8032_test1_signature(curve25519: Curve25519) -> None:
    seed, public = (bytes.fromhex(h) for h in RFC8032_KEYS[0])
    signature = bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    assert p.ed25519_sign(p.ed25519_private_from_bytes(seed), b"") == signature
    p.ed25519_verify(public, signature, b"")
    with pytest.raises(BadSignature):
        p.ed25519_verify(public, signature, b"x")
    # Malleability: S + L verifies under a lax implementation; RFC 8032 refuses it.
    s = int.from_bytes(signature[32:], "little") + L
    with pytest.raises(BadSignature):
        p.ed25519_verify(public, signature[:32] + s.to_bytes(32, "little"), b"")
    with pytest.raises(BadSignature):
        p.ed25519_verify(public, signature[:63], b"")
    with pytest.raises(InvalidKey):
        p.ed25519_verify(public[:31], signature, b"")


# ------------------------------------------------------------------ ML-KEM-768


def test_mlkem768_round_trip_and_implicit_rejection() -> None:
    key = p.mlkem768_private_from_seed(bytes(range(64)))
    assert p.mlkem768_seed(key) == bytes(range(64))
    public = p.mlkem768_public_bytes(key)
    assert p.mlkem768_public_bytes(p.mlkem768_private_from_seed(bytes(range(64)))) == public
    secret, ciphertext = p.SYSTEM_RANDOM.encapsulate(public)
    assert p.mlkem768_decapsulate(key, ciphertext) == secret
    flipped = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    other = p.mlkem768_decapsulate(key, flipped)
    assert len(other) == 32 and other != secret
    for bad in [ciphertext[:-1], ciphertext + b"\0"]:
        with pytest.raises(DecodeError):
            p.mlkem768_decapsulate(key, bad)
    with pytest.raises(InvalidKey):
        p.mlkem768_public_key(public[:-1])
    with pytest.raises(DecodeError):
        p.mlkem768_private_from_seed(bytes(63))


# ------------------------------------------------------------------ randomness


def test_seeded_random_is_deterministic() -> None:
    a, b = p.SeededRandom(b"s"), p.SeededRandom(b"s")
    assert [a.random_bytes(n) for n in (1, 32, 100)] == [b.random_bytes(n) for n in (1, 32, 100)]
    assert p.SeededRandom(b"s").random_bytes(32) != p.SeededRandom(b"t").random_bytes(32)


def test_scripted_random_replays_and_refuses_to_invent() -> None:
    scripted = p.ScriptedRandom([b"\1" * 32], [(b"s" * 32, b"c" * 1088)])
    assert scripted.random_bytes(32) == b"\1" * 32
    assert scripted.encapsulate(b"") == (b"s" * 32, b"c" * 1088)
    with pytest.raises(InvalidState):
        scripted.random_bytes(32)
    with pytest.raises(InvalidState):
        scripted.encapsulate(b"")
    with pytest.raises(InvalidState):
        p.ScriptedRandom([b"\1" * 31]).random_bytes(32)
