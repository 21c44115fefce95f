"""The cryptographic primitives hushchat uses, and nothing else.

Thin, typed wrappers over ``cryptography`` (and the stdlib's HMAC) that
turn library exceptions into :mod:`hushchat.protocol.errors` and add the checks the
protocol requires on top: canonical X25519 public keys, refusal of all-zero
DH outputs, the Ed25519-to-X25519 conversion with libsodium's checks.

Randomness comes only from a :class:`RandomSource`. Private keys are made
from its bytes (X25519 and Ed25519 from 32 bytes, ML-KEM-768 from its
64-byte seed), so any run can be replayed from recorded random bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .consts import (
    ED25519_KEY_SIZE,
    ED25519_SIGNATURE_SIZE,
    MLKEM768_CIPHERTEXT_SIZE,
    MLKEM768_PUBLIC_KEY_SIZE,
    MLKEM768_SEED_SIZE,
    X25519_KEY_SIZE,
)
from .errors import (
    BadMac,
    BadSignature,
    DecodeError,
    DecryptionFailed,
    InvalidArgument,
    InvalidKey,
    NonContributoryKey,
)

# ------------------------------------------------------------------ randomness


class RandomSource(Protocol):
    """Where every random byte and every KEM encapsulation comes from.

    The default is the operating system's CSPRNG and ``cryptography``'s
    encapsulation. Tests and the vector generator inject recorded values.
    """

    def random_bytes(self, n: int) -> bytes:
        """``n`` uniformly random bytes."""
        ...

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """ML-KEM-768 encapsulation to ``public_key``: (shared secret, ciphertext)."""
        ...


class SystemRandom:
    """The operating system's CSPRNG. The default everywhere."""

    def random_bytes(self, n: int) -> bytes:
        return secrets.token_bytes(n)

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        return mlkem768_public_key(public_key).encapsulate()

    def __repr__(self) -> str:
        return "SystemRandom()"


SYSTEM_RANDOM = SystemRandom()


class ScriptedRandom:
    """Replays recorded random bytes and encapsulations, in order.

    For test vectors and deterministic tests only: it raises
    InvalidState when the script runs out instead of inventing bytes.
    """

    def __init__(
        self, chunks: list[bytes], encapsulations: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self._chunks = list(chunks)
        self._encapsulations = list(encapsulations or [])
        self.used: list[bytes] = []

    def random_bytes(self, n: int) -> bytes:
        from .errors import InvalidState

        if not self._chunks:
            raise InvalidState("scripted randomness exhausted")
        chunk = self._chunks.pop(0)
        if len(chunk) != n:
            raise InvalidState(f"scripted randomness: wanted {n} bytes, script has {len(chunk)}")
        self.used.append(chunk)
        return chunk

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        from .errors import InvalidState

        if not self._encapsulations:
            raise InvalidState("scripted encapsulations exhausted")
        return self._encapsulations.pop(0)

    def __repr__(self) -> str:
        return f"ScriptedRandom({len(self._chunks)} chunks left)"


class SeededRandom:
    """A deterministic stream from a seed (HMAC-SHA-256 in counter mode).

    For tests and the vector generator only. Encapsulation uses the real,
    randomized ML-KEM (``cryptography`` cannot encapsulate from a seed);
    every encapsulation is recorded in ``encapsulations`` for the vectors.
    """

    def __init__(self, seed: bytes) -> None:
        self._key = hashlib.sha256(b"hushchat seeded random" + seed).digest()
        self._counter = 0
        self.encapsulations: list[tuple[bytes, bytes]] = []

    def random_bytes(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hmac.digest(self._key, self._counter.to_bytes(8, "big"), "sha256")
            self._counter += 1
        return out[:n]

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        result = mlkem768_public_key(public_key).encapsulate()
        self.encapsulations.append(result)
        return result

    def __repr__(self) -> str:
        return "SeededRandom(...)"


# ------------------------------------------------------------------ hashing and MACs


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def hkdf_sha256(ikm: bytes, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-SHA-256; ``salt=None`` means 32 zero bytes.

    InvalidArgument for more than 255 blocks (8160 bytes), which RFC 5869 forbids.
    """
    if length > 255 * 32:
        raise InvalidArgument("HKDF-SHA-256 derives at most 8160 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def sha512(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()


def verify_mac(expected: bytes, received: bytes) -> None:
    """Constant-time MAC comparison; BadMac on mismatch."""
    if not hmac.compare_digest(expected, received):
        raise BadMac("message authentication failed")


# ------------------------------------------------------------------ AES-256-CBC


def aes256_cbc_encrypt(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    """AES-256-CBC with PKCS#7 padding."""
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES256(key), modes.CBC(iv)).encryptor()
    return encryptor.update(padded) + encryptor.finalize()


def aes256_cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    """Inverse of :func:`aes256_cbc_encrypt`; DecryptionFailed on bad length or padding."""
    if not ciphertext or len(ciphertext) % 16:
        raise DecryptionFailed("ciphertext is not a positive multiple of the block size")
    decryptor = Cipher(algorithms.AES256(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise DecryptionFailed("bad padding") from exc


# ------------------------------------------------------------------ X25519

_P = 2**255 - 19


def check_x25519_public(public: bytes) -> bytes:
    """Refuse X25519 public keys of the wrong size or not canonically encoded.

    RFC 7748 lets receivers mask the top bit and reduce mod p; we refuse such
    encodings instead, so each key has one encoding (libsignal refuses
    high-bit base keys too). Small-order keys are caught at the DH.
    """
    if not isinstance(public, bytes) or len(public) != X25519_KEY_SIZE:
        raise InvalidKey("an X25519 public key is 32 bytes")
    if public[31] & 0x80 or int.from_bytes(public, "little") >= _P:
        raise InvalidKey("X25519 public key is not canonically encoded")
    return public


def x25519_generate(rng: RandomSource) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(rng.random_bytes(X25519_KEY_SIZE))


def x25519_private_from_bytes(data: bytes) -> X25519PrivateKey:
    if len(data) != X25519_KEY_SIZE:
        raise DecodeError("an X25519 private key is 32 bytes")
    return X25519PrivateKey.from_private_bytes(data)


def x25519_private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def x25519_public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


_ZERO32 = bytes(32)


def x25519(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519 with the protocol's checks: canonical key, non-zero output.

    ``cryptography`` already raises on an all-zero result (OpenSSL); the
    explicit comparison keeps the rule independent of the backend.
    """
    check_x25519_public(public)
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise NonContributoryKey("Diffie-Hellman output is all zero") from exc
    if hmac.compare_digest(shared, _ZERO32):
        raise NonContributoryKey("Diffie-Hellman output is all zero")
    return shared


# ------------------------------------------------------------------ Ed25519


def ed25519_generate(rng: RandomSource) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(rng.random_bytes(ED25519_KEY_SIZE))


def ed25519_private_from_bytes(seed: bytes) -> Ed25519PrivateKey:
    if len(seed) != ED25519_KEY_SIZE:
        raise DecodeError("an Ed25519 private key (seed) is 32 bytes")
    return Ed25519PrivateKey.from_private_bytes(seed)


def ed25519_private_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def ed25519_public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def ed25519_sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    return key.sign(message)


def ed25519_verify(public: bytes, signature: bytes, message: bytes) -> None:
    """Verify an Ed25519 signature (RFC 8032, S < L enforced); BadSignature if not."""
    if not isinstance(public, bytes) or len(public) != ED25519_KEY_SIZE:
        raise InvalidKey("an Ed25519 public key is 32 bytes")
    if not isinstance(signature, bytes) or len(signature) != ED25519_SIGNATURE_SIZE:
        raise BadSignature("an Ed25519 signature is 64 bytes")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except InvalidSignature as exc:
        raise BadSignature("signature does not verify") from exc
    except ValueError as exc:
        raise InvalidKey("Ed25519 public key does not decode") from exc


# ------------------------------------------------------------------ Ed25519 -> X25519
# libsodium's crypto_sign_ed25519_pk_to_curve25519 / _sk_to_curve25519, and the
# prime-order subgroup check both the conversion and base keys need.

_D = (-121665 * pow(121666, -1, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_L = 2**252 + 27742317777372353535851937790883648493

# X25519 clamps every scalar to a multiple of 8 in [2^254, 2^255); this one is
# also -1 mod L. For P in the prime-order subgroup and T of order dividing 8,
# [k](P + T) = -P, whose u is u(P): the output equals the input exactly when T
# is neutral (P neutral gives the all-zero output). On the twist, of order 4p'
# with p' prime, k is even and not +-1 mod p', so no twist point maps to
# itself. So one native X25519 does the subgroup check that would otherwise
# be a scalar multiplication by L in Python. Spec 02-pqxdh.md section 2.7.
SUBGROUP_CHECK_SCALAR = 8 * _L - 8 * pow(8, -1, _L)
_SUBGROUP_CHECK_KEY = X25519PrivateKey.from_private_bytes(
    SUBGROUP_CHECK_SCALAR.to_bytes(X25519_KEY_SIZE, "little")
)


def _subgroup_image(u: bytes) -> bytes | None:
    """u([k]Q) for the point Q with this canonical u, or None if [k]Q is neutral."""
    try:
        return _SUBGROUP_CHECK_KEY.exchange(X25519PublicKey.from_public_bytes(u))
    except ValueError:  # all-zero output: Q has small order
        return None


def _decode_edwards(public: bytes) -> tuple[int, int]:
    """Decode an Ed25519 public key (RFC 8032 5.1.3) to its affine (x, y)."""
    encoded = int.from_bytes(public, "little")
    sign = encoded >> 255
    y = encoded & ((1 << 255) - 1)
    if y >= _P:
        raise InvalidKey("Ed25519 public key is not canonically encoded")
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    vxx = v * x * x % _P
    if vxx == (-u) % _P:
        x = x * _SQRT_M1 % _P
    elif vxx != u:
        raise InvalidKey("Ed25519 public key is not a curve point")
    if x == 0 and sign:
        raise InvalidKey("Ed25519 public key is not canonically encoded")
    if x & 1 != sign:
        x = _P - x
    return x, y


def ed25519_public_to_x25519(public: bytes) -> bytes:
    """The X25519 form of an Ed25519 public key: u = (1 + y) / (1 - y).

    Refuses, as libsodium does, keys that do not decode, points of small
    order and points outside the prime-order subgroup.
    """
    if not isinstance(public, bytes) or len(public) != ED25519_KEY_SIZE:
        raise InvalidKey("an Ed25519 public key is 32 bytes")
    _, y = _decode_edwards(public)
    if y == 1:  # the neutral point, which has no u
        raise InvalidKey("Ed25519 public key has small order")
    u = ((1 + y) * pow(1 - y, -1, _P) % _P).to_bytes(X25519_KEY_SIZE, "little")
    image = _subgroup_image(u)
    if image is None:
        raise InvalidKey("Ed25519 public key has small order")
    if image != u:
        raise InvalidKey("Ed25519 public key is outside the prime-order subgroup")
    return u


def check_x25519_prime_order(public: bytes) -> bytes:
    """Refuse an X25519 public key unless it is canonical and in the prime-order subgroup.

    X25519 clamps every scalar to a multiple of 8, so adding a small-order
    point to a key changes its encoding but no DH output: a key that serves
    as an identifier (a handshake's base key, remembered against replays)
    would otherwise have eight accepted encodings. Also refuses small-order
    keys and points on the twist.
    """
    check_x25519_public(public)
    if _subgroup_image(public) != public:
        raise InvalidKey("X25519 public key is not in the prime-order subgroup")
    return public


def check_x25519_not_small_order(public: bytes) -> bytes:
    """Refuse an X25519 public key unless it is canonical and not of small order.

    A small-order key makes every X25519 with it all zero, which the other
    side must refuse (NonContributoryKey): a prekey of small order is
    useless, and whoever publishes it only wastes the handshakes that try
    it. The subgroup image is all zero exactly for these keys (spec
    02-pqxdh.md section 2.7); keys with a small-order component beside a
    prime-order one pass, as they give the same DH outputs as their
    prime-order part.
    """
    check_x25519_public(public)
    if _subgroup_image(public) is None:
        raise InvalidKey("X25519 public key of small order")
    return public


def ed25519_private_to_x25519(seed: bytes) -> bytes:
    """The X25519 private scalar of an Ed25519 seed: SHA-512(seed)[:32], clamped."""
    if len(seed) != ED25519_KEY_SIZE:
        raise InvalidArgument("an Ed25519 seed is 32 bytes")
    h = bytearray(hashlib.sha512(seed).digest()[:32])
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    return bytes(h)


# ------------------------------------------------------------------ ML-KEM-768


def mlkem768_generate(rng: RandomSource) -> MLKEM768PrivateKey:
    return MLKEM768PrivateKey.from_seed_bytes(rng.random_bytes(MLKEM768_SEED_SIZE))


def mlkem768_private_from_seed(seed: bytes) -> MLKEM768PrivateKey:
    if len(seed) != MLKEM768_SEED_SIZE:
        raise DecodeError("an ML-KEM-768 seed is 64 bytes")
    return MLKEM768PrivateKey.from_seed_bytes(seed)


def mlkem768_seed(key: MLKEM768PrivateKey) -> bytes:
    return key.private_bytes_raw()


def mlkem768_public_bytes(key: MLKEM768PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def mlkem768_public_key(public: bytes) -> MLKEM768PublicKey:
    if not isinstance(public, bytes) or len(public) != MLKEM768_PUBLIC_KEY_SIZE:
        raise InvalidKey("an ML-KEM-768 public key is 1184 bytes")
    try:
        return MLKEM768PublicKey.from_public_bytes(public)
    except ValueError as exc:
        raise InvalidKey("ML-KEM-768 public key does not decode") from exc


def mlkem768_decapsulate(key: MLKEM768PrivateKey, ciphertext: bytes) -> bytes:
    """Decapsulate; a wrong ciphertext yields an unrelated secret (implicit rejection)."""
    if len(ciphertext) != MLKEM768_CIPHERTEXT_SIZE:
        raise DecodeError("an ML-KEM-768 ciphertext is 1088 bytes")
    try:
        return key.decapsulate(ciphertext)
    except ValueError as exc:
        raise DecodeError("ML-KEM-768 ciphertext does not decode") from exc
