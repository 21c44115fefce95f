"""Sender Keys: a group sender's hash chain and the two messages that carry it.

As libsignal's ``sender_keys.rs`` and ``protocol.rs``, with msgpack for
protobuf and Ed25519 for XEdDSA. :mod:`hushchat.protocol.group_cipher` holds the
objects that use them (our outbound key, a peer's inbound record).

Chain
=====

A sender chain is ``(chain_id, iteration i, chain key CK_i, Ed25519 signing
key)``. For each iteration::

    seed_i       = HMAC-SHA-256(CK_i, 0x01)
    CK_(i+1)     = HMAC-SHA-256(CK_i, 0x02)
    IV_i || K_i  = HKDF-SHA-256(ikm=seed_i, salt=32 zero bytes,
                                info="hushchat_sender_key", length=48)
                   IV_i = bytes [0:16], K_i = bytes [16:48]
    ciphertext_i = AES-256-CBC(K_i, IV_i, PKCS#7(plaintext))

There is no MAC: the Ed25519 signature over the whole message authenticates
it. A chain sends at iterations 0 .. MAX_SENDER_KEY_ITERATION (2^32 - 2).

Binding to the sender
=====================

Our addition to libsignal's construction (spec/04-sender-keys.md, section
4.7): a chain belongs to the device that created it. Its distribution names
that device, and a receiver refuses it (SenderMismatch) from any other; each
message is signed over the sender's address as well as the message::

    signed = pack([sender_user_id, sender_device_id]) || body

The address is not sent: the receiver takes it from the envelope the relay
stamped (and keeps one record per sender device). A message restamped with
another sender, or sent by a member that forwarded another's chain as its
own, fails the signature under that sender's address.

Wire formats
============

Both are canonical msgpack (:mod:`hushchat.protocol.encoding`); ``uint`` is the
shortest msgpack unsigned integer (1, 2, 3 or 5 bytes), ``bin N`` a byte
string of exactly N bytes (``c4 NN`` then the bytes for N < 256), ``str`` a
UTF-8 string (``a0 + N`` then the bytes for N < 32).

SenderKeyDistributionMessage (SKDM), sent only inside 1:1 sessions, an
array of 8 (94..166 bytes)::

    98                  fixarray, 8 elements
    03                  version       = SENDER_KEY_VERSION
    c4 10 <16 bytes>    group_id
    <str>               sender_user_id    a user id (check_user_id): the chain's creator
    <uint>              sender_device_id  u32
    <uint>              chain_id      u32 (made as big-endian 4 random bytes >> 1)
    <uint>              iteration     u32, the chain's next iteration
    c4 20 <32 bytes>    chain_key     CK_iteration
    c4 20 <32 bytes>    signing_key   raw Ed25519 public key

SenderKeyMessage, ``body || signature``::

    95                  fixarray, 5 elements
    03                  version       = SENDER_KEY_VERSION
    c4 10 <16 bytes>    group_id
    <uint>              chain_id      u32
    <uint>              iteration     0 .. 2^32 - 2
    c4 NN <N bytes>     ciphertext    N a positive multiple of 16, at most
                                      MAX_PLAINTEXT_SIZE + 16 (bin 16/32 headers
                                      c5 NNNN / c6 NNNNNNNN when N >= 256)
    <64 bytes>          signature     Ed25519 over the sender's address and the body

The signature is the last 64 bytes; the body before it must be exactly one
canonical array. Size: 139 + len(uint iteration) + 64 bytes for a 100-byte
plaintext (112-byte ciphertext) and a chain id of 2^16 or more (a 5-byte
uint, as nearly all 31-bit random ids): 204 bytes at iterations 0..127, 205
at 128..255, 206 at 256..65535. libsignal's protobuf form of the same costs
205 at 0..127, 206 at 128..16383 and 207 at 16384..65535 (chain id >=
2^28).

Decoders raise only :class:`~hushchat.protocol.errors.ProtocolError` subclasses:
UnknownVersion for another version, InvalidKey for a signing key that does
not decode or has small order, DecodeError for anything else malformed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import primitives as p
from .address import Address
from .consts import (
    CHAIN_MESSAGE_KEY_SEED,
    CHAIN_NEXT_KEY_SEED,
    ED25519_KEY_SIZE,
    ED25519_SIGNATURE_SIZE,
    GROUP_ID_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_PLAINTEXT_SIZE,
    MAX_SENDER_KEY_ITERATION,
    SENDER_KEY_INFO,
    SENDER_KEY_VERSION,
    SENDER_MESSAGE_KEY_MATERIAL_SIZE,
)
from .devices import read_user_id
from .encoding import UINT64_MAX, Fields, pack
from .errors import DecodeError, UnknownVersion

CHAIN_KEY_SIZE = 32
_AES_BLOCK = 16
_IV_SIZE = 16
# PKCS#7 adds 1..16 bytes, so this is the largest ciphertext a sender makes.
_MAX_CIPHERTEXT_SIZE = MAX_PLAINTEXT_SIZE + _AES_BLOCK


# ------------------------------------------------------------------ chain


def message_seed(chain_key: bytes) -> bytes:
    """``seed_i = HMAC-SHA-256(CK_i, 0x01)``: the input of iteration i's message key."""
    return p.hmac_sha256(chain_key, CHAIN_MESSAGE_KEY_SEED)


def next_chain_key(chain_key: bytes) -> bytes:
    """``CK_(i+1) = HMAC-SHA-256(CK_i, 0x02)``."""
    return p.hmac_sha256(chain_key, CHAIN_NEXT_KEY_SEED)


def message_key(seed: bytes) -> tuple[bytes, bytes]:
    """``(IV, AES key)`` of a message: HKDF-SHA-256 of ``seed``, 16 + 32 bytes."""
    material = p.hkdf_sha256(
        seed, salt=None, info=SENDER_KEY_INFO, length=SENDER_MESSAGE_KEY_MATERIAL_SIZE
    )
    return material[:_IV_SIZE], material[_IV_SIZE:]


def encrypt_with_seed(seed: bytes, plaintext: bytes) -> bytes:
    """AES-256-CBC under the message key derived from ``seed``."""
    iv, key = message_key(seed)
    return p.aes256_cbc_encrypt(key, iv, plaintext)


def decrypt_with_seed(seed: bytes, ciphertext: bytes) -> bytes:
    """Inverse of :func:`encrypt_with_seed`; DecryptionFailed on bad padding."""
    iv, key = message_key(seed)
    return p.aes256_cbc_decrypt(key, iv, ciphertext)


# ------------------------------------------------------------------ distribution message


@dataclass(frozen=True, slots=True)
class SenderKeyDistributionMessage:
    """A sender chain at one iteration: what a receiver needs to decrypt from there on.

    Made by :meth:`hushchat.protocol.group_cipher.OutboundSenderKey.distribution_message`
    or :meth:`decode`. ``sender`` is the device that created the chain (and
    alone sends on it). It holds a chain key: send it only inside a 1:1 session.
    """

    group_id: bytes
    sender: Address
    chain_id: int
    iteration: int
    chain_key: bytes = field(repr=False)
    signing_key: bytes

    def encode(self) -> bytes:
        return pack(
            [
                SENDER_KEY_VERSION,
                self.group_id,
                self.sender.user_id,
                self.sender.device_id,
                self.chain_id,
                self.iteration,
                self.chain_key,
                self.signing_key,
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> SenderKeyDistributionMessage:
        """Parse and check an SKDM (including that the signing key is a sound point)."""
        fields = Fields.decode(data, what="sender key distribution message")
        _read_version(fields)
        group_id = fields.bin(GROUP_ID_SIZE)
        sender = Address(read_user_id(fields), fields.uint())
        chain_id = fields.uint()
        iteration = fields.uint()
        chain_key = fields.bin(CHAIN_KEY_SIZE)
        signing_key = fields.bin(ED25519_KEY_SIZE)
        fields.end()
        check_signing_key(signing_key)
        return cls(group_id, sender, chain_id, iteration, chain_key, signing_key)


def check_signing_key(public: bytes) -> None:
    """Refuse an Ed25519 key that does not decode, has small order or a torsion part.

    A small-order signing key would let anyone forge signatures that verify
    under it. The X25519 conversion performs exactly these checks; its
    result is not needed.
    """
    p.ed25519_public_to_x25519(public)


# ------------------------------------------------------------------ group message


@dataclass(frozen=True, slots=True)
class SenderKeyMessage:
    """One group message: which group and where in which chain, unverified.

    :meth:`decode` is also how a caller routes a message (``group_id``,
    ``chain_id``, ``iteration``) before any record is loaded. Nothing here
    is authenticated until :meth:`hushchat.protocol.group_cipher.SenderKeyRecord.decrypt`
    has verified the signature.
    """

    group_id: bytes
    chain_id: int
    iteration: int
    ciphertext: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    # The exact signed bytes (the encoded first five fields).
    body: bytes = field(repr=False, compare=False)

    @staticmethod
    def encode_body(group_id: bytes, chain_id: int, iteration: int, ciphertext: bytes) -> bytes:
        """The message before its signature."""
        return pack([SENDER_KEY_VERSION, group_id, chain_id, iteration, ciphertext])

    def encode(self) -> bytes:
        return self.body + self.signature

    @classmethod
    def decode(cls, data: bytes) -> SenderKeyMessage:
        """Split ``body || signature`` and parse the body (the signature is not checked)."""
        what = "sender key message"
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"{what}: expected bytes")
        data = bytes(data)
        if len(data) > MAX_MESSAGE_SIZE:
            raise DecodeError(f"{what}: {len(data)} bytes exceeds the limit of {MAX_MESSAGE_SIZE}")
        if len(data) <= ED25519_SIGNATURE_SIZE:
            raise DecodeError(f"{what}: too short")
        body, signature = data[:-ED25519_SIGNATURE_SIZE], data[-ED25519_SIGNATURE_SIZE:]
        fields = Fields.decode(body, what=what)
        _read_version(fields)
        group_id = fields.bin(GROUP_ID_SIZE)
        chain_id = fields.uint()
        iteration = fields.uint(MAX_SENDER_KEY_ITERATION)
        ciphertext = fields.bin(max_size=_MAX_CIPHERTEXT_SIZE)
        fields.end()
        if not ciphertext or len(ciphertext) % _AES_BLOCK:
            raise DecodeError(f"{what}: ciphertext is not a positive multiple of 16 bytes")
        return cls(group_id, chain_id, iteration, ciphertext, signature, body)


def signed_bytes(sender: Address, body: bytes) -> bytes:
    """What a sender signs: its own address, then the message body.

    The address binds the message to the device whose chain it is on; it is
    not sent, the receiver takes it from the envelope.
    """
    return pack([sender.user_id, sender.device_id]) + body


def _read_version(fields: Fields) -> None:
    # Read before the field count is known, so a future layout is reported
    # as UNKNOWN_VERSION rather than MALFORMED.
    version = fields.uint(UINT64_MAX)
    if version != SENDER_KEY_VERSION:
        raise UnknownVersion(f"version {version} is not {SENDER_KEY_VERSION}")
