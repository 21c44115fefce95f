"""Forward-secure keys for what the relay stores about queued mail (spec 07 section 7.13).

Time is cut into *epochs* of ``epoch_seconds``; epoch ``e`` covers the
milliseconds ``[e * L, (e + 1) * L)`` since the Unix epoch. Each epoch has a
*chain key*; the next one is derived from it by a one-way step, and the
epoch's keys are derived from it::

    chain[e + 1]                = HKDF(chain[e], info="hushchat_relay_next_chain", 32)
    seal_key[e] || index_key[e] = HKDF(chain[e], info="hushchat_relay_epoch_keys", 64)

(HKDF-SHA-256, salt of 32 zero bytes.) The relay holds the chain key of
one epoch, the oldest whose mail is still inside the retention window, and
derives the later ones when it needs them; it cannot derive an earlier one.
When an epoch leaves the window its rows are deleted and the held chain key
is replaced by the next one, in memory and in the key file, so that no copy
of the database, with the relay's key state of today, opens them again.

* ``seal_key`` is an AES-256-GCM key: every sealed row is a fresh 12-byte
  random nonce followed by the ciphertext and tag, with the row's identity
  as associated data (:mod:`.rows`).
* ``index_key`` keys a mailbox index, ``HMAC(index_key, pack([user_id,
  device_id]))`` cut to 16 bytes: where a device's mail of that epoch is
  found, and, once the key is gone, a value that names no one.

The key file holds the chain state (:class:`KeyState`), one file of mode
0600 outside the database. It is created exclusively (two relays starting at
once end up with the same one), advanced only forwards under a lock on its
folder, written to a temporary file that is fsynced and renamed over it
(then the folder is fsynced), and the bytes of the replaced state are
overwritten with zeros. Several relay processes sharing a database start
from copies of the same file and each advances its own by the clock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hushchat.protocol.encoding import UINT64_MAX, Fields, pack
from hushchat.protocol.errors import DecodeError, StateError
from hushchat.protocol.primitives import hkdf_sha256, hmac_sha256

from ...wire.errors import TransportError
from ...wire.limits import EPOCHS_PER_RETENTION

KEY_FILE_VERSION = 1
CHAIN_ID_SIZE = 16
CHAIN_KEY_SIZE = 32
MAILBOX_INDEX_SIZE = 16
NONCE_SIZE = 12
CHECKSUM_SIZE = 32
NEXT_CHAIN_INFO = b"hushchat_relay_next_chain"
EPOCH_KEYS_INFO = b"hushchat_relay_epoch_keys"
# A key file is a few dozen bytes; anything much larger is not one.
MAX_KEY_FILE_SIZE = 1024
# Mailbox indexes kept per epoch once computed (an HMAC each); beyond this
# many devices the cache starts over, so it stays a few megabytes.
INDEX_CACHE_SIZE = 50_000


class RelayKeysMissing(TransportError):
    """The relay's key file cannot be used for its database.

    It is damaged, or it is missing (lost, or another path was given) or
    belongs to another database while the database holds mail sealed under
    its own. The relay does not start: restore the key file, or start with
    ``reset_keys`` to discard the queued mail (devices are told).
    """

    code = "RELAY_KEYS_MISSING"


def next_chain(chain: bytes) -> bytes:
    """The one-way step: the next epoch's chain key from this one's."""
    return hkdf_sha256(chain, salt=None, info=NEXT_CHAIN_INFO, length=CHAIN_KEY_SIZE)


def epoch_seconds_for(retention_seconds: int) -> int:
    """The epoch length a new key file gets: the retention cut into EPOCHS_PER_RETENTION parts."""
    return max(1, retention_seconds // EPOCHS_PER_RETENTION)


@dataclass(frozen=True, slots=True)
class KeyState:
    """The chain key of one epoch, and which chain it belongs to: what the key file holds.

    Encoded as ``pack([1, chain_id bin16, epoch_seconds uint, epoch u64,
    chain bin32]) || SHA-256(that)``; the checksum catches a damaged file,
    which is refused rather than read as another chain.
    """

    chain_id: bytes
    epoch_seconds: int
    epoch: int
    chain: bytes = field(repr=False)

    @classmethod
    def new(cls, epoch_seconds: int, epoch: int) -> KeyState:
        """A fresh chain, starting at ``epoch``, from the system CSPRNG."""
        return cls(
            secrets.token_bytes(CHAIN_ID_SIZE),
            epoch_seconds,
            epoch,
            secrets.token_bytes(CHAIN_KEY_SIZE),
        )

    def next(self) -> KeyState:
        """The state of the next epoch (the one-way step)."""
        return KeyState(self.chain_id, self.epoch_seconds, self.epoch + 1, next_chain(self.chain))

    def encode(self) -> bytes:
        body = pack([KEY_FILE_VERSION, self.chain_id, self.epoch_seconds, self.epoch, self.chain])
        return body + hashlib.sha256(body).digest()

    @classmethod
    def decode(cls, data: bytes) -> KeyState:
        """StateError if ``data`` is not an intact key file of this version."""
        body, checksum = data[:-CHECKSUM_SIZE], data[-CHECKSUM_SIZE:]
        if len(data) <= CHECKSUM_SIZE or hashlib.sha256(body).digest() != checksum:
            raise StateError("the relay key file is damaged (its checksum does not match)")
        try:
            fields = Fields.decode(body, what="relay key file", count=5)
            if fields.uint() != KEY_FILE_VERSION:
                raise StateError("the relay key file is of another version")
            state = cls(
                fields.bin(CHAIN_ID_SIZE),
                fields.uint(),
                fields.uint(UINT64_MAX),
                fields.bin(CHAIN_KEY_SIZE),
            )
        except DecodeError as exc:
            raise StateError(f"the relay key file does not decode: {exc.message}") from None
        if state.epoch_seconds < 1:
            raise StateError("the relay key file has no epoch length")
        return state


class EpochKeys:
    """The keys of one epoch: seal and open rows, compute mailbox indexes."""

    __slots__ = ("_aead", "_index_key", "_indexes", "epoch")

    def __init__(self, epoch: int, chain: bytes) -> None:
        keys = hkdf_sha256(chain, salt=None, info=EPOCH_KEYS_INFO, length=64)
        self.epoch = epoch
        self._aead = AESGCM(keys[:32])
        self._index_key = keys[32:]
        self._indexes: dict[tuple[str, int], bytes] = {}

    def index(self, user_id: str, device_id: int) -> bytes:
        """Where a device's mail of this epoch is filed (16 bytes)."""
        device = (user_id, device_id)
        index = self._indexes.get(device)
        if index is None:
            if len(self._indexes) >= INDEX_CACHE_SIZE:
                self._indexes.clear()
            index = hmac_sha256(self._index_key, pack([user_id, device_id]))[:MAILBOX_INDEX_SIZE]
            self._indexes[device] = index
        return index

    def seal(self, associated: bytes, plaintext: bytes, nonce: bytes | None = None) -> bytes:
        """``nonce || AES-256-GCM(plaintext, associated)``; a random nonce unless one is given."""
        nonce = nonce or os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, associated)

    def open(self, associated: bytes, sealed: bytes) -> bytes | None:
        """The plaintext; None unless ``sealed`` is this epoch's seal with ``associated``."""
        if len(sealed) < NONCE_SIZE + 16:
            return None
        try:
            return self._aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], associated)
        except InvalidTag:
            return None

    def __repr__(self) -> str:
        return f"EpochKeys(epoch={self.epoch})"


class KeyChain:
    """The relay's key state in memory: the held epoch's chain key and the keys derived from it.

    :meth:`keys` gives the keys of the held epoch or any later one; the
    keys of an earlier epoch no longer exist (None). :meth:`advance` moves
    the held epoch forwards and forgets everything before it (Python cannot
    wipe the bytes it drops; the guarantee is about what is stored).
    """

    def __init__(self, state: KeyState) -> None:
        self._state = state
        self._chains: dict[int, bytes] = {state.epoch: state.chain}
        self._keys: dict[int, EpochKeys] = {}

    @property
    def state(self) -> KeyState:
        return self._state

    @property
    def chain_id(self) -> bytes:
        return self._state.chain_id

    @property
    def held_epoch(self) -> int:
        """The oldest epoch whose keys exist."""
        return self._state.epoch

    @property
    def epoch_ms(self) -> int:
        return self._state.epoch_seconds * 1000

    def epoch_of(self, ms: int) -> int:
        """The epoch holding the time ``ms`` (milliseconds since the Unix epoch)."""
        return ms // self.epoch_ms

    def start_of(self, epoch: int) -> int:
        """The first millisecond of ``epoch``."""
        return epoch * self.epoch_ms

    def keys(self, epoch: int) -> EpochKeys | None:
        """The keys of ``epoch``, or None if they no longer exist."""
        keys = self._keys.get(epoch)
        if keys is None:
            if epoch < self._state.epoch:
                return None
            keys = self._keys[epoch] = EpochKeys(epoch, self._chain(epoch))
        return keys

    def advance(self, epoch: int) -> bool:
        """Hold ``epoch`` (if later than the held one): every earlier key ceases to exist here."""
        if epoch <= self._state.epoch:
            return False
        self._state = KeyState(self.chain_id, self._state.epoch_seconds, epoch, self._chain(epoch))
        self._chains = {e: c for e, c in self._chains.items() if e >= epoch}
        self._keys = {e: k for e, k in self._keys.items() if e >= epoch}
        return True

    def _chain(self, epoch: int) -> bytes:
        """The chain key of ``epoch`` (not before the held one), derived forwards as needed."""
        newest = max(self._chains)
        while newest < epoch:
            self._chains[newest + 1] = next_chain(self._chains[newest])
            newest += 1
        return self._chains[epoch]

    def __repr__(self) -> str:
        return f"KeyChain(chain_id={self.chain_id.hex()}, held_epoch={self.held_epoch})"


# ------------------------------------------------------------------ the key file


def default_key_file(db_path: str) -> str:
    """Where the key file of a database lives unless told otherwise: beside it."""
    return db_path + ".keys"


def read_key_file(path: str) -> KeyState | None:
    """The state in the key file at ``path``; None if there is none.

    RelayKeysMissing if the file is damaged or not a key file.
    """
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_KEY_FILE_SIZE + 1)
    except FileNotFoundError:
        return None
    try:
        if len(data) > MAX_KEY_FILE_SIZE:
            raise StateError("too large")
        return KeyState.decode(data)
    except StateError as exc:
        raise RelayKeysMissing(
            f"the key file {path} cannot be read ({exc.message}): restore it, or move it away "
            "and start with --reset-keys to discard the queued mail it sealed"
        ) from None


def make_key_file_private(path: str) -> int | None:
    """Make the key file at ``path`` owner-only (0600) if others may read or write it:
    its former mode, or None if it was private already or is not there.

    A key file copied to another relay host with a plain ``cp`` arrives with
    the umask's mode, often 0644: the relay makes it private when it starts,
    as it makes its database files private.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if not mode & 0o077:
            return None
        os.fchmod(fd, 0o600)
        return mode
    finally:
        os.close(fd)


def create_key_file(path: str, state: KeyState) -> KeyState:
    """Write ``state`` as a new key file, unless one exists already: the state the file holds.

    Exclusive: of two relays creating the file at once, both end up with
    the first one's state.
    """
    with _folder_lock(path):
        existing = read_key_file(path)
        if existing is not None:
            return existing
        _write_durably(path, state.encode())
    return state


def advance_key_file(path: str, state: KeyState) -> None:
    """Replace the key file's state by the later ``state``; a state not later is left alone.

    RelayKeysMissing if the file holds another chain (or none).
    """
    with _folder_lock(path):
        current = read_key_file(path)
        if current is None or current.chain_id != state.chain_id:
            raise RelayKeysMissing(f"the key file {path} is gone or holds another key chain")
        if current.epoch >= state.epoch:
            return  # another relay sharing the file advanced it as far already
        old = os.open(path, os.O_WRONLY)
        try:
            _write_durably(path, state.encode())
            # The old state's bytes, in the inode the rename unlinked: overwritten, not
            # merely freed (on a file system that writes in place).
            size = os.fstat(old).st_size
            os.pwrite(old, bytes(size), 0)
            os.fsync(old)
        finally:
            os.close(old)


def _write_durably(path: str, data: bytes) -> None:
    """Temporary file (0600), fsync, rename over ``path``, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    os.close(fd)
    os.rename(temporary, path)
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _folder_lock(path: str) -> Iterator[None]:
    """An exclusive lock on the key file's folder: relays sharing the file change it in turn."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
