"""key_conversion.json: identity keys from seeds, Ed25519 -> X25519, X25519 with its checks."""

from __future__ import annotations

from hushchat.protocol import primitives as p
from hushchat.protocol.consts import KEY_TYPE_ED25519, KEY_TYPE_X25519
from hushchat.protocol.errors import InvalidKey
from hushchat.protocol.keys import IdentityKeyPair

from ._common import (
    Checker,
    Json,
    case,
    h,
    note,
    opt_h,
    seeded,
    torsioned_edwards,
    torsioned_u,
    unhex,
    vector_file,
)

NAME = "key_conversion"

# RFC 8032 section 7.1, TEST 1 and RFC 7748 section 6.1: outside known answers.
RFC8032_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
RFC7748_ALICE_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
RFC7748_BOB_PUBLIC = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"

# The eight points of small order on edwards25519, canonically encoded.
SMALL_ORDER_EDWARDS = {
    "0100000000000000000000000000000000000000000000000000000000000000": "identity (order 1)",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f": "order 2 (y = -1)",
    "0000000000000000000000000000000000000000000000000000000000000000": "order 4 (y = 0)",
    "0000000000000000000000000000000000000000000000000000000000000080": "order 4 (y = 0, x odd)",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a": "order 8",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa": "order 8 (x odd)",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05": "order 8",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85": "order 8 (x odd)",
}
NON_CANONICAL_EDWARDS = {
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f": "y = p",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f": "y = p + 1 (the identity)",
    "0100000000000000000000000000000000000000000000000000000000000080": "x = 0 with sign bit 1",
}
NOT_ON_CURVE = "0200000000000000000000000000000000000000000000000000000000000000"

# Curve25519 u-coordinates whose X25519 output is all zero for every scalar.
LOW_ORDER_U = {
    "0000000000000000000000000000000000000000000000000000000000000000": "u = 0",
    "0100000000000000000000000000000000000000000000000000000000000000": "u = 1",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f": "u = p - 1",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800": "order 8",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157": "order 8",
}
NON_CANONICAL_U = {
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f": "u = p",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f": "u = p + 1",
    "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff": "u = 2^256 - 1",
}

TWIST_U = (2).to_bytes(32, "little")

NOTES = {
    "Rfc8032": note("BASIC", "RFC 8032 section 7.1 TEST 1 key, for an outside known answer."),
    "Rfc7748": note("BASIC", "RFC 7748 section 6.1 Diffie-Hellman, an outside known answer."),
    "SignBit": note("EDGE_CASE", "An Edwards key whose x is odd (sign bit set)."),
    "SmallOrder": note(
        "CONFIDENTIALITY",
        "A small-order Edwards point: its X25519 form gives a DH output an attacker knows.",
    ),
    "NonCanonical": note(
        "CAN_OF_WORMS",
        "A second encoding of a point; accepting it gives keys two identities.",
    ),
    "NotOnCurve": note("BASIC", "The encoding decodes to no curve point."),
    "Torsion": note(
        "CONFIDENTIALITY",
        "A valid key plus a point of order 8: outside the prime-order subgroup "
        "(libsignal test_bob_rejects_torsioned_basekey).",
    ),
    "WrongLength": note("BASIC", "A key of 31 bytes."),
    "LowOrderPublic": note(
        "CONFIDENTIALITY",
        "An X25519 key of low order: the DH output is all zero and MUST be refused.",
    ),
    "NonCanonicalPublic": note(
        "CAN_OF_WORMS",
        "u >= p, or the top bit set: hushchat refuses these encodings instead of reducing them.",
    ),
    "Twist": note("CONFIDENTIALITY", "A u-coordinate on the quadratic twist, not the curve."),
    "Clamping": note("EDGE_CASE", "The private key has the bits X25519 clamping changes."),
}


def _derivation(seed: bytes, comment: str, flags: tuple[str, ...] = ()) -> Json:
    pair = IdentityKeyPair(seed)
    scalar = p.ed25519_private_to_x25519(seed)
    return case(
        comment,
        flags=flags,
        seed=h(seed),
        ed25519_public=h(pair.public.ed25519),
        encoded_identity=h(pair.public.encode()),
        x25519_private=h(scalar),
        x25519_public=h(pair.public.x25519),
    )


def _conversion(public: bytes, comment: str, flags: tuple[str, ...]) -> Json:
    try:
        converted: bytes | None = p.ed25519_public_to_x25519(public)
        result, error = "valid", None
    except InvalidKey as exc:
        converted, result, error = None, "invalid", exc.code
    return case(
        comment,
        result=result,
        error=error,
        flags=flags,
        ed25519_public=h(public),
        x25519_public=opt_h(converted),
    )


def _dh(private: bytes, public: bytes, comment: str, flags: tuple[str, ...] = ()) -> Json:
    key = p.x25519_private_from_bytes(private)
    try:
        shared: bytes | None = p.x25519(key, public)
        result, error = "valid", None
    except InvalidKey as exc:
        shared, result, error = None, "invalid", exc.code
    return case(
        comment,
        result=result,
        error=error,
        flags=flags,
        private=h(private),
        public=h(public),
        shared=opt_h(shared),
    )


def _prime_order(public: bytes, comment: str, flags: tuple[str, ...]) -> Json:
    try:
        p.check_x25519_prime_order(public)
        result, error = "valid", None
    except InvalidKey as exc:
        result, error = "invalid", exc.code
    return case(comment, result=result, error=error, flags=flags, public=h(public))


def generate() -> Json:
    rng = seeded("key_conversion")
    derivations = [_derivation(unhex(RFC8032_SEED), "RFC 8032 TEST 1 seed", ("Rfc8032",))]
    derivations += [_derivation(rng.random_bytes(32), f"random seed {i}") for i in range(3)]

    conversions = []
    odd = None
    while odd is None or len(conversions) < 3:
        public = IdentityKeyPair(rng.random_bytes(32)).public.ed25519
        if public[31] & 0x80:
            if odd is None:
                odd = public
                conversions.append(_conversion(public, "valid key, x odd", ("SignBit",)))
        elif len(conversions) < 3:
            conversions.append(_conversion(public, "valid key", ()))
    for encoding, what in SMALL_ORDER_EDWARDS.items():
        conversions.append(_conversion(unhex(encoding), what, ("SmallOrder",)))
    for encoding, what in NON_CANONICAL_EDWARDS.items():
        conversions.append(_conversion(unhex(encoding), what, ("NonCanonical",)))
    conversions.append(
        _conversion(unhex(NOT_ON_CURVE), "y = 2 is on no curve point", ("NotOnCurve",))
    )
    valid = IdentityKeyPair(rng.random_bytes(32)).public.ed25519
    conversions.append(
        _conversion(torsioned_edwards(valid), "valid key + order-8 point", ("Torsion",))
    )
    conversions.append(_conversion(valid[:31], "31 bytes", ("WrongLength",)))

    dh = [
        _dh(unhex(RFC7748_ALICE_PRIVATE), unhex(RFC7748_BOB_PUBLIC), "RFC 7748 6.1", ("Rfc7748",)),
        _dh(rng.random_bytes(32), p.x25519_public_bytes(p.x25519_generate(rng)), "random keys"),
        _dh(
            b"\xff" * 32,
            p.x25519_public_bytes(p.x25519_generate(rng)),
            "private all ones",
            ("Clamping",),
        ),
    ]
    private = rng.random_bytes(32)
    for encoding, what in LOW_ORDER_U.items():
        dh.append(_dh(private, unhex(encoding), what, ("LowOrderPublic",)))
    for encoding, what in NON_CANONICAL_U.items():
        dh.append(_dh(private, unhex(encoding), what, ("NonCanonicalPublic",)))
    valid_u = p.x25519_public_bytes(p.x25519_generate(rng))
    high = valid_u[:31] + bytes([valid_u[31] | 0x80])
    dh.append(_dh(private, high, "valid u with the top bit set", ("NonCanonicalPublic",)))
    dh.append(_dh(private, valid_u[:31], "31 bytes", ("WrongLength",)))

    base_keys = [
        _prime_order(p.x25519_public_bytes(p.x25519_generate(rng)), "valid key", ())
        for _ in range(2)
    ]
    torsion_base = p.x25519_public_bytes(p.x25519_generate(rng))
    base_keys.append(
        _prime_order(torsioned_u(torsion_base), "valid key + order-8 point", ("Torsion",))
    )
    for encoding, what in LOW_ORDER_U.items():
        base_keys.append(_prime_order(unhex(encoding), what, ("LowOrderPublic",)))
    base_keys.append(_prime_order(TWIST_U, "u = 2 is on the twist", ("Twist",)))
    base_keys.append(
        _prime_order(unhex(next(iter(NON_CANONICAL_U))), "u = p", ("NonCanonicalPublic",))
    )

    groups: list[Json] = [
        {
            "type": "IdentityKeyDerivation",
            "identityKeyType": KEY_TYPE_ED25519,
            "tests": derivations,
        },
        {"type": "Ed25519ToX25519", "tests": conversions},
        {"type": "X25519", "publicKeyType": KEY_TYPE_X25519, "tests": dh},
        {"type": "X25519PrimeOrder", "tests": base_keys},
    ]
    return vector_file(
        NAME,
        description=(
            "Identity key pairs from 32-byte seeds, the Ed25519 -> X25519 map with libsodium's "
            "checks, and X25519 with hushchat's refusal of non-canonical keys and all-zero output."
        ),
        spec=["00-conventions.md", "02-pqxdh.md"],
        notes=NOTES,
        groups=groups,
    )


def verify_test(group: Json, test: Json) -> list[str]:
    c = Checker()
    kind = group["type"]
    if kind == "IdentityKeyDerivation":
        c.equal(
            "derivation", test, {**_derivation(unhex(test["seed"]), test["comment"]), **_meta(test)}
        )
    elif kind == "Ed25519ToX25519":
        public = unhex(test["ed25519_public"])
        converted = c.outcome("convert", test, lambda: p.ed25519_public_to_x25519(public))
        if converted is not None:
            c.equal("x25519_public", test["x25519_public"], h(converted))
    elif kind == "X25519":
        key = p.x25519_private_from_bytes(unhex(test["private"]))
        shared = c.outcome("x25519", test, lambda: p.x25519(key, unhex(test["public"])))
        if shared is not None:
            c.equal("shared", test["shared"], h(shared))
    elif kind == "X25519PrimeOrder":
        public = unhex(test["public"])
        c.outcome("check", test, lambda: p.check_x25519_prime_order(public))
    else:
        c.fail(f"unknown test group type {kind}")
    return c.failures


def _meta(test: Json) -> Json:
    return {"tcId": test["tcId"], "flags": test["flags"]}
