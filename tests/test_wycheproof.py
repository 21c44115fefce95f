"""Project Wycheproof suites run through hushchat's primitive layer.

The files are read from ``../shared/wycheproof`` beside the repository (or
the directory named by ``HUSHCHAT_WYCHEPROOF``); each suite is skipped, with
the reason, when its file is absent. Every case is its own test id.

Where hushchat is stricter than the primitive's RFC, the test says so:
X25519 public keys that are not canonically encoded (top bit set, or
u >= p) are refused although RFC 7748 lets a receiver mask and reduce them,
and all-zero shared secrets (low-order keys) are refused although
Wycheproof rates them "acceptable".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import primitives as p
from protocol.errors import (
    BadMac,
    BadSignature,
    DecodeError,
    DecryptionFailed,
    InvalidArgument,
    InvalidKey,
    NonContributoryKey,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
P = 2**255 - 19


def wycheproof_dir() -> Path:
    configured = os.environ.get("HUSHCHAT_WYCHEPROOF")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "wycheproof"


def cases(filename: str, *, group_filter: dict[str, Any] | None = None) -> list[Any]:
    """One pytest param per test case: (group, case), id ``tc<id>-<result>``."""
    path = wycheproof_dir() / filename
    if not path.is_file():
        reason = f"{path} not found (set HUSHCHAT_WYCHEPROOF to a Wycheproof testvectors dir)"
        return [pytest.param(None, None, id="absent", marks=pytest.mark.skip(reason=reason))]
    suite = json.loads(path.read_text())
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
