"""The Double Ratchet (signal.org specification, section 5.2 algorithms).

    KDF_RK(rk, dh_out) = HKDF-SHA-256(salt=rk, ikm=dh_out, info=RATCHET_ROOT_INFO, 64)
                         -> root key [0:32] || chain key [32:64]
    KDF_CK(ck)         = HMAC-SHA-256(ck, 0x01) message key, HMAC-SHA-256(ck, 0x02) next chain key
    ENCRYPT(mk, pt, A) = HKDF-SHA-256(salt=32 zero bytes, ikm=mk, info=MESSAGE_KEYS_INFO, 80)
                         -> enc key [0:32] || auth key [32:64] || IV [64:80];
                         ct = AES-256-CBC-PKCS7(enc key, IV, pt);
                         tag = HMAC-SHA-256(auth key, A || ct)[0:16]; output ct || tag
    A                  = AD || header     (AD: the handshake's, fixed length)
    header             = msgpack [version, ratchet public key (32), PN, N]

Decryption is candidate-then-commit: everything is computed into locals and
written to the state only after the tag verified and the plaintext
decrypted, so a failure of any kind leaves the state as it was (section 3.5).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import primitives as p
from .consts import (
    CHAIN_MESSAGE_KEY_SEED,
    CHAIN_NEXT_KEY_SEED,
    MAC_SIZE,
    MAX_PREVIOUS_RATCHET_KEYS,
    MAX_SKIP,
    MAX_SKIPPED_KEYS,
    MESSAGE_KEY_MATERIAL_SIZE,
    MESSAGE_KEYS_INFO,
    PROTOCOL_VERSION,
    RATCHET_ROOT_INFO,
    X25519_KEY_SIZE,
)
from .encoding import Fields, pack
from .errors import (
    DecodeError,
    DuplicateMessage,
    InvalidKey,
    InvalidState,
    TooFarInFuture,
    UnknownVersion,
)

_ZERO_SALT = bytes(32)


@dataclass(frozen=True, slots=True)
class Header:
    """A message header: the sender's ratchet key, PN and N (authenticated, not encrypted)."""

    ratchet_key: bytes
    previous_chain_length: int
    message_number: int

    def encode(self) -> bytes:
        return encode_header(self.ratchet_key, self.previous_chain_length, self.message_number)

    @classmethod
    def decode(cls, data: bytes) -> Header:
        fields = Fields.decode(data, what="Header", count=4)
        if fields.uint() != PROTOCOL_VERSION:
            raise UnknownVersion("Header: unknown version")
        ratchet_key = p.check_x25519_public(fields.bin(X25519_KEY_SIZE))
        return cls(ratchet_key, fields.uint(), fields.uint())


def encode_header(ratchet_key: bytes, previous_chain_length: int, message_number: int) -> bytes:
    """A :class:`Header`'s encoding without the object (every message sent needs one)."""
    return pack([PROTOCOL_VERSION, ratchet_key, previous_chain_length, message_number])


def kdf_rk(root_key: bytes, dh_output: bytes) -> tuple[bytes, bytes]:
    out = p.hkdf_sha256(dh_output, salt=root_key, info=RATCHET_ROOT_INFO, length=64)
    return out[:32], out[32:]


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """(message key, next chain key)."""
    return (
        p.hmac_sha256(chain_key, CHAIN_MESSAGE_KEY_SEED),
        p.hmac_sha256(chain_key, CHAIN_NEXT_KEY_SEED),
    )


def message_keys(message_key: bytes) -> tuple[bytes, bytes, bytes]:
    """(encryption key, authentication key, IV) from a message key."""
    km = p.hkdf_sha256(
        message_key, salt=_ZERO_SALT, info=MESSAGE_KEYS_INFO, length=MESSAGE_KEY_MATERIAL_SIZE
    )
    return km[:32], km[32:64], km[64:80]


def seal(message_key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ENCRYPT of section 5.2: ciphertext || truncated tag."""
    enc_key, auth_key, iv = message_keys(message_key)
    ciphertext = p.aes256_cbc_encrypt(enc_key, iv, plaintext)
    return ciphertext + p.hmac_sha256(auth_key, associated + ciphertext)[:MAC_SIZE]


def open_sealed(message_key: bytes, body: bytes, associated: bytes) -> bytes:
    """DECRYPT: verify the tag (constant time) before touching the ciphertext."""
    if len(body) < 16 + MAC_SIZE:
        raise DecodeError("message body is too short")
    ciphertext, tag = body[:-MAC_SIZE], body[-MAC_SIZE:]
    enc_key, auth_key, iv = message_keys(message_key)
    p.verify_mac(p.hmac_sha256(auth_key, associated + ciphertext)[:MAC_SIZE], tag)
    return p.aes256_cbc_decrypt(enc_key, iv, ciphertext)


def _skip(
    chain_key: bytes, start: int, until: int, ratchet_key: bytes, max_skip: int
) -> tuple[bytes, list[tuple[tuple[bytes, int], bytes]]]:
    """Message keys start..until-1 of a chain, for later out-of-order messages."""
    if until - start > max_skip:
        raise TooFarInFuture(f"message skips {until - start} keys, limit is {max_skip}")
    skipped = []
    for n in range(start, until):
        message_key, chain_key = kdf_ck(chain_key)
        skipped.append(((ratchet_key, n), message_key))
    return chain_key, skipped


class RatchetState:
    """One Double Ratchet session's state (section 3.2's variables).

    Mutated only by :meth:`encrypt` and a successful :meth:`decrypt`.
    """

    __slots__ = (
        "_private",
        "_private_bytes",
        "_public",
        "previous_ratchet_keys",
        "previous_send_count",
        "receive_chain",
        "receive_count",
        "remote_ratchet_key",
        "root_key",
        "send_chain",
        "send_count",
        "skipped",
    )

    def __init__(
        self,
        *,
        root_key: bytes,
        self_private: X25519PrivateKey | bytes,
        remote_ratchet_key: bytes | None,
        send_chain: bytes | None,
        receive_chain: bytes | None,
        send_count: int = 0,
        receive_count: int = 0,
        previous_send_count: int = 0,
        skipped: dict[tuple[bytes, int], bytes] | None = None,
        previous_ratchet_keys: list[bytes] | None = None,
    ) -> None:
        self.root_key = root_key
        self._set_ratchet_key(self_private)
        self.remote_ratchet_key = remote_ratchet_key
        self.send_chain = send_chain
        self.receive_chain = receive_chain
        self.send_count = send_count
        self.receive_count = receive_count
        self.previous_send_count = previous_send_count
        self.skipped: dict[tuple[bytes, int], bytes] = skipped if skipped is not None else {}
        self.previous_ratchet_keys: list[bytes] = previous_ratchet_keys or []

    # Our ratchet key pair, held as the private key object, its 32 bytes, or
    # both: each form (and the public key) is made when first needed. A record
    # loaded to decrypt on a chain it has, and saved again, never pays for
    # loading the key into OpenSSL or deriving the public key.

    def _set_ratchet_key(self, key: X25519PrivateKey | bytes) -> None:
        self._public: bytes | None = None
        if isinstance(key, bytes):
            self._private_bytes: bytes | None = key
            self._private: X25519PrivateKey | None = None
        else:
            self._private_bytes, self._private = None, key

    @property
    def self_private(self) -> X25519PrivateKey:
        if self._private is None:
            assert self._private_bytes is not None
            self._private = p.x25519_private_from_bytes(self._private_bytes)
        return self._private

    @property
    def self_public(self) -> bytes:
        if self._public is None:
            self._public = p.x25519_public_bytes(self.self_private)
        return self._public

    def _self_private_bytes(self) -> bytes:
        if self._private_bytes is None:
            self._private_bytes = p.x25519_private_bytes(self.self_private)
        return self._private_bytes

    # ------------------------------------------------------------ initialisation (section 3.3)

    @classmethod
    def initiator(
        cls, shared_secret: bytes, remote_ratchet_key: bytes, rng: p.RandomSource
    ) -> RatchetState:
        """Alice: her first sending chain comes from a DH with Bob's signed prekey."""
        self_private = p.x25519_generate(rng)
        root_key, send_chain = kdf_rk(shared_secret, p.x25519(self_private, remote_ratchet_key))
        return cls(
            root_key=root_key,
            self_private=self_private,
            remote_ratchet_key=remote_ratchet_key,
            send_chain=send_chain,
            receive_chain=None,
        )

    @classmethod
    def responder(cls, shared_secret: bytes, self_private: X25519PrivateKey) -> RatchetState:
        """Bob: his signed prekey pair is his first ratchet key pair."""
        return cls(
            root_key=shared_secret,
            self_private=self_private,
            remote_ratchet_key=None,
            send_chain=None,
            receive_chain=None,
        )

    # ------------------------------------------------------------ encrypt

    @property
    def can_send(self) -> bool:
        return self.send_chain is not None

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> tuple[bytes, bytes]:
        """(encoded header, body) of the next message."""
        if self.send_chain is None:
            raise InvalidState("no sending chain yet: the responder must receive first")
        message_key, self.send_chain = kdf_ck(self.send_chain)
        header = encode_header(self.self_public, self.previous_send_count, self.send_count)
        self.send_count += 1
        return header, seal(message_key, plaintext, associated_data + header)

    # ------------------------------------------------------------ decrypt

    def decrypt(
        self,
        header_bytes: bytes,
        body: bytes,
        associated_data: bytes,
        *,
        rng: p.RandomSource = p.SYSTEM_RANDOM,
        max_skip: int = MAX_SKIP,
        max_skipped_keys: int = MAX_SKIPPED_KEYS,
    ) -> bytes:
        """Decrypt one message; on any error the state is unchanged."""
        header = Header.decode(header_bytes)
        associated = associated_data + header_bytes
        slot = (header.ratchet_key, header.message_number)
        stored = self.skipped.get(slot)
        if stored is not None:
            plaintext = open_sealed(stored, body, associated)
            del self.skipped[slot]
            return plaintext
        if header.ratchet_key in self.previous_ratchet_keys:
            raise DuplicateMessage("message on a finished chain whose key is gone")

        new_skipped: list[tuple[tuple[bytes, int], bytes]] = []
        stepped = header.ratchet_key != self.remote_ratchet_key
        if stepped:
            if self.receive_chain is not None and self.remote_ratchet_key is not None:
                _, new_skipped = _skip(
                    self.receive_chain,
                    self.receive_count,
                    header.previous_chain_length,
                    self.remote_ratchet_key,
                    max_skip,
                )
            root_key, chain = kdf_rk(self.root_key, p.x25519(self.self_private, header.ratchet_key))
            start = 0
        else:
            if self.receive_chain is None:
                # Only an initiator's first remote key, the peer's signed
                # prekey, has no receiving chain: the peer never sends under it.
                raise InvalidKey("ratchet key has no receiving chain")
            if header.message_number < self.receive_count:
                raise DuplicateMessage("message number already used on this chain")
            chain, start = self.receive_chain, self.receive_count
        chain, more = _skip(chain, start, header.message_number, header.ratchet_key, max_skip)
        new_skipped += more
        message_key, chain = kdf_ck(chain)
        plaintext = open_sealed(message_key, body, associated)

        # Commit. The next ratchet key pair is drawn only now, so a forged
        # message costs no key generation and consumes no randomness.
        if stepped:
            next_private = p.x25519_generate(rng)
            root_key, next_send_chain = kdf_rk(root_key, p.x25519(next_private, header.ratchet_key))
            if self.remote_ratchet_key is not None:
                self.previous_ratchet_keys = [
                    self.remote_ratchet_key,
                    *self.previous_ratchet_keys[: MAX_PREVIOUS_RATCHET_KEYS - 1],
                ]
            self.previous_send_count = self.send_count
            self.send_count = 0
            self._set_ratchet_key(next_private)
            self.remote_ratchet_key = header.ratchet_key
            self.root_key = root_key
            self.send_chain = next_send_chain
        self.receive_chain = chain
        self.receive_count = header.message_number + 1
        for slot, key in new_skipped:
            self.skipped[slot] = key
        while len(self.skipped) > max_skipped_keys:
            del self.skipped[next(iter(self.skipped))]
        return plaintext

    # ------------------------------------------------------------ serialization

    def to_wire(self) -> list[object]:
        return [
            self.root_key,
            self._self_private_bytes(),
            self.remote_ratchet_key,
            self.send_chain,
            self.receive_chain,
            self.send_count,
            self.receive_count,
            self.previous_send_count,
            [[key, n, mk] for (key, n), mk in self.skipped.items()],
            list(self.previous_ratchet_keys),
        ]

    @classmethod
    def from_wire(cls, fields: Fields) -> RatchetState:
        root_key = fields.bin(32)
        self_private = fields.bin(32)  # any 32 bytes are an X25519 private key
        remote = fields.optional_bin(32)
        send_chain = fields.optional_bin(32)
        receive_chain = fields.optional_bin(32)
        send_count, receive_count, previous_send_count = fields.uint(), fields.uint(), fields.uint()
        skipped: dict[tuple[bytes, int], bytes] = {}
        for item in fields.array(max_len=MAX_SKIPPED_KEYS * 4):
            entry = Fields(item, what="skipped", count=3)
            key, n, mk = entry.bin(32), entry.uint(), entry.bin(32)
            skipped[(key, n)] = mk
        previous = []
        for item in fields.array(max_len=MAX_PREVIOUS_RATCHET_KEYS):
            if not isinstance(item, bytes) or len(item) != 32:
                raise DecodeError("previous ratchet key must be 32 bytes")
            previous.append(item)
        return cls(
            root_key=root_key,
            self_private=self_private,
            remote_ratchet_key=remote,
            send_chain=send_chain,
            receive_chain=receive_chain,
            send_count=send_count,
            receive_count=receive_count,
            previous_send_count=previous_send_count,
            skipped=skipped,
            previous_ratchet_keys=previous,
        )

    def __repr__(self) -> str:
        return (
            f"RatchetState(send={self.send_count}, receive={self.receive_count}, "
            f"skipped={len(self.skipped)})"
        )
