"""Encryption at rest of a client store, under a key the app provides.

As vodozemac encrypts its pickles with a pickle key, and Signal Desktop its
database with a key from the operating system's key store, an app opens its
:class:`~.store.ClientStore` with a 32-byte key (``ClientStore.open(path,
key=...)``); the examples derive it from a passphrase. From that key and a
random salt kept in the store, HKDF-SHA-256 derives two keys:

* an AES-256-GCM key that seals every stored value: the record values (with
  their keys), every outbox and inbox row. The associated data is the row's
  identity, its table and its key or id, so that a value copied to another
  row, or another store, does not open;
* an HMAC-SHA-256 key for the identifiers the store looks rows up by: a
  record's key (which names users, groups and devices) and an envelope's
  guid are stored as their HMAC, not in clear.

A sealed value is ``version (1) || nonce (12 random bytes) || ciphertext ||
tag (16)``. A random 96-bit nonce is safe for up to 2^32 values per key
(NIST SP 800-38D); each store has its own key (the salt), and a device
writes far fewer values in its life. A value that does not open is a
:class:`~hushchat.protocol.errors.StateError` (the store sets it aside); a
key that does not open the store's key check is ``WrongStoreKey``.

What stays in clear: the number of rows of each table and their sizes, the
outbox order, when each guid was processed (for pruning) and the SQLite
structure. The layout is in spec/README.md ("Client storage").
"""

from __future__ import annotations

import hmac
import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hushchat.protocol.errors import InvalidArgument, StateError, UnknownStateVersion
from hushchat.protocol.primitives import hkdf_sha256

# The key an app gives, and the store's salt: 256 bits each.
STORE_KEY_SIZE: Final = 32
SALT_SIZE: Final = 32
# HKDF's info for the two keys (64 bytes: the AEAD key, then the HMAC key).
STORE_KEY_INFO: Final = b"hushchat_client_store"
# Every associated data starts with this, then the table, a 0 byte, the row.
ASSOCIATED_DATA_PREFIX: Final = b"hushchat_client_store_row"
SEALED_VERSION: Final = 1
NONCE_SIZE: Final = 12
# What the key check row holds once opened (its row: table "meta", "key_check").
KEY_CHECK: Final = b"hushchat client store key check"


def check_store_key(key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != STORE_KEY_SIZE:
        raise InvalidArgument(f"a client store key is {STORE_KEY_SIZE} bytes")
    return key


class PlainCodec:
    """A store without a key: values and identifiers as they are."""

    encrypted = False

    def index(self, identifier: bytes) -> bytes:
        return identifier

    def seal(self, table: str, row: bytes, data: bytes) -> bytes:
        return data

    def open(self, table: str, row: bytes, data: bytes) -> bytes:
        return data


class StoreCipher:
    """The keys of one encrypted store (its app key and its salt)."""

    encrypted = True

    def __init__(self, key: bytes, salt: bytes) -> None:
        check_store_key(key)
        if not isinstance(salt, bytes) or len(salt) != SALT_SIZE:
            raise StateError(f"a client store's salt is {SALT_SIZE} bytes")
        material = hkdf_sha256(key, salt=salt, info=STORE_KEY_INFO, length=64)
        self._aead = AESGCM(material[:32])
        self._index_key = material[32:]

    def index(self, identifier: bytes) -> bytes:
        """The HMAC a row is looked up by, instead of ``identifier``."""
        return hmac.digest(self._index_key, identifier, "sha256")

    def seal(self, table: str, row: bytes, data: bytes, *, nonce: bytes | None = None) -> bytes:
        """``data`` sealed for row ``row`` of ``table`` (``nonce``: fixed, for tests only)."""
        nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        sealed = self._aead.encrypt(nonce, data, _associated_data(table, row))
        return bytes([SEALED_VERSION]) + nonce + sealed

    def open(self, table: str, row: bytes, data: bytes) -> bytes:
        """What :meth:`seal` sealed for this row; StateError if it does not open here."""
        if not data or data[0] != SEALED_VERSION:
            if data and data[0] > SEALED_VERSION:
                raise UnknownStateVersion(f"{table}: sealed with version {data[0]}")
            raise StateError(f"{table}: not a sealed value")
        nonce, sealed = data[1 : 1 + NONCE_SIZE], data[1 + NONCE_SIZE :]
        try:
            return self._aead.decrypt(nonce, sealed, _associated_data(table, row))
        except (InvalidTag, ValueError):
            raise StateError(f"{table}: a stored value does not open under this key") from None


def _associated_data(table: str, row: bytes) -> bytes:
    return ASSOCIATED_DATA_PREFIX + table.encode() + b"\x00" + row


StoreCodec = PlainCodec | StoreCipher
