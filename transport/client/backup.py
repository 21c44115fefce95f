"""A device's state in one file, encrypted with a passphrase: export and import.

::

    export_backup(store, "alice.backup", passphrase)       # the store must be closed to others
    store = import_backup("alice.backup", passphrase, "new/client.db")

The file (spec/README.md, "Device backups"): a fixed header naming the
format version and the scrypt parameters, then the device's records,
msgpack-encoded and sealed with ChaCha20-Poly1305 under a key that scrypt
derives from the passphrase and a random salt; the header is the associated
data, so no byte of the file can change unnoticed.

What is restored: the device (its identity and prekeys), the device lists it
holds, the groups and the sender keys it received. What is not: one-to-one
sessions and our own sender keys, which are dropped so that no key of the
old state is used again (the device may have sent with them after the
export); new ones are made on the next send, and a message that a contact
sent on an old session reads as undecryptable (NO_SESSION). Messages
delivered after the export are not in it, and pending sends are not kept.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Final

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from hushchat.protocol import client_core as core
from hushchat.protocol.errors import InvalidArgument, ProtocolError

from ..wire.errors import TransportError
from .store import ClientStore

BACKUP_MAGIC: Final = b"HUSHBKUP"
BACKUP_VERSION: Final = 1
# scrypt's cost: N = 2**17, r = 8, p = 1 is the cost RFC 7914 section 2 and
# OWASP give for interactive use in 2024 (128 MiB, a fraction of a second),
# so each passphrase guess against a stolen file costs as much.
SCRYPT_LOG2_N: Final = 17
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
# Bounds on what a file may ask for, so a crafted file cannot make the import
# allocate gigabytes: up to 2**20 and r * p up to 64 (1 GiB at the extreme).
MAX_SCRYPT_LOG2_N: Final = 20
MAX_SCRYPT_RP: Final = 64
SALT_SIZE: Final = 16
NONCE_SIZE: Final = 12
# magic, version, log2 N, r, p, salt, nonce
_HEADER = struct.Struct(f">8sBBBB{SALT_SIZE}s{NONCE_SIZE}s")
# A backup is one device's records; this bounds what an import reads.
MAX_BACKUP_SIZE: Final = 256 * 1024 * 1024
# Dropped on import: keys that the device may have used after the export.
_NOT_RESTORED = frozenset({core.RecordKind.SESSION, core.RecordKind.OUTBOUND})


class BackupError(TransportError):
    """A backup cannot be read: not a backup, a newer format, damaged, or the wrong passphrase."""

    code = "BACKUP_UNREADABLE"


@dataclass(frozen=True, slots=True)
class BackupInfo:
    """Whose device a backup holds."""

    user_id: str
    device_id: int


def _key(passphrase: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    if not passphrase:
        raise InvalidArgument("a backup passphrase cannot be empty")
    kdf = Scrypt(salt=salt, length=32, n=2**log2_n, r=r, p=p)
    return kdf.derive(passphrase.encode("utf-8"))


def export_backup(store: ClientStore, path: str, passphrase: str) -> BackupInfo:
    """Write the device in ``store`` to a new file at ``path`` (0600), sealed with ``passphrase``.

    InvalidArgument if the store holds no device or ``path`` exists (a
    backup never overwrites a file).
    """
    records = sorted((key.encode(), value) for key, value in store.records())
    device = core.ClientCore.load(store.records()) if records else None
    if device is None:
        raise InvalidArgument("this store holds no device to export")
    plaintext = msgpack.packb(
        [BACKUP_VERSION, device.user_id, device.device_id, [list(r) for r in records]],
        use_bin_type=True,
    )
    salt, nonce = os.urandom(SALT_SIZE), os.urandom(NONCE_SIZE)
    header = _HEADER.pack(
        BACKUP_MAGIC, BACKUP_VERSION, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P, salt, nonce
    )
    key = _key(passphrase, salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)
    sealed = ChaCha20Poly1305(key).encrypt(nonce, plaintext, header)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidArgument(f"{path} exists; a backup never overwrites a file") from None
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(header + sealed)
        file.flush()
        os.fsync(file.fileno())
    return BackupInfo(device.user_id, device.device_id)


def read_backup(
    path: str, passphrase: str
) -> tuple[BackupInfo, list[tuple[core.RecordKey, bytes]]]:
    """The device and records in a backup file; BackupError if it cannot be read."""
    with open(path, "rb") as file:
        data = file.read(MAX_BACKUP_SIZE + 1)
    if len(data) > MAX_BACKUP_SIZE:
        raise BackupError(f"{path} is larger than any backup")
    if len(data) < _HEADER.size or not data.startswith(BACKUP_MAGIC):
        raise BackupError(f"{path} is not a hushchat backup")
    _, version, log2_n, r, p, salt, nonce = _HEADER.unpack_from(data)
    if version != BACKUP_VERSION:
        raise BackupError(
            f"{path} is a backup of format {version}; this hushchat reads {BACKUP_VERSION}"
        )
    if not (1 <= log2_n <= MAX_SCRYPT_LOG2_N and r >= 1 and p >= 1 and r * p <= MAX_SCRYPT_RP):
        raise BackupError(f"{path} asks for scrypt parameters beyond this hushchat's bounds")
    header = data[: _HEADER.size]
    key = _key(passphrase, salt, log2_n, r, p)
    try:
        plaintext = ChaCha20Poly1305(key).decrypt(nonce, data[_HEADER.size :], header)
    except InvalidTag:
        raise BackupError(f"wrong passphrase for {path}, or the file is damaged") from None
    try:
        version_, user_id, device_id, rows = msgpack.unpackb(plaintext, raw=False)
        if version_ != BACKUP_VERSION:
            raise ValueError("inner version")
        records = [(core.RecordKey.decode(bytes(k)), bytes(v)) for k, v in rows]
    except (ValueError, TypeError, ProtocolError) as exc:
        # Sealed by someone who knew the passphrase, yet malformed: a bug, not an attack.
        raise BackupError(f"{path} holds records this hushchat cannot read") from exc
    return BackupInfo(str(user_id), int(device_id)), records


def import_backup(path: str, passphrase: str, store_path: str) -> ClientStore:
    """A new store at ``store_path`` holding the device in the backup at ``path``.

    InvalidArgument if ``store_path`` exists (an import never replaces a
    device); BackupError if the backup cannot be read. The store is open:
    close it, or hand it to :func:`~hushchat.transport.client.open_client`.
    Sessions and our own sender keys are not restored (module docstring).
    """
    if os.path.lexists(store_path):
        raise InvalidArgument(f"{store_path} exists; import into a new folder")
    _, records = read_backup(path, passphrase)
    restored: dict[core.RecordKey, bytes | None] = {
        key: value for key, value in records if key.kind not in _NOT_RESTORED
    }
    # The records make a device (or StateError, CORRUPT_STATE) before anything is created.
    core.ClientCore.load((key, value) for key, value in records if key in restored)
    store = ClientStore.open(store_path)
    try:
        store.commit(restored)
    except BaseException:
        store.close()
        raise
    return store
