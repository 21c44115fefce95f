"""The relay's forward-secure key chain and its key file (spec 07 section 7.13)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hushchat.protocol.encoding import pack
from hushchat.protocol.primitives import hkdf_sha256, hmac_sha256
from hushchat.transport.relay.storage.atrest import (
    EpochKeys,
    KeyChain,
    KeyState,
    RelayKeysMissing,
    advance_key_file,
    create_key_file,
    epoch_seconds_for,
    read_key_file,
)
from hushchat.transport.relay.storage.sqlite import SqliteDatabase
from hushchat.transport.wire.limits import DEFAULT_RETENTION_SECONDS, EPOCHS_PER_RETENTION

STATE = KeyState(bytes(range(16)), 3600, 100, bytes(range(32, 64)))


def test_the_chain_and_the_epoch_keys_are_the_spec_s_derivations() -> None:
    chain = KeyChain(STATE)
    following = hkdf_sha256(STATE.chain, salt=None, info=b"hushchat_relay_next_chain", length=32)
    assert STATE.next() == KeyState(STATE.chain_id, 3600, 101, following)
    keys = hkdf_sha256(following, salt=None, info=b"hushchat_relay_epoch_keys", length=64)
    epoch_101 = chain.keys(101)
    assert epoch_101 is not None
    index = hmac_sha256(keys[32:], pack(["bob", 2]))[:16]
    assert epoch_101.index("bob", 2) == index
    sealed = epoch_101.seal(b"ad", b"plain", nonce=bytes(12))
    assert sealed == bytes(12) + AESGCM(keys[:32]).encrypt(bytes(12), b"plain", b"ad")


def test_two_relays_with_one_key_file_derive_the_same_keys() -> None:
    one, other = KeyChain(STATE), KeyChain(STATE)
    other.advance(130)  # another relay, further on: it agrees on every epoch it still has
    for epoch in range(130, 140):
        a, b = one.keys(epoch), other.keys(epoch)
        assert a is not None and b is not None
        assert a.index("alice", 1) == b.index("alice", 1)
        assert b.open(b"row", a.seal(b"row", b"routing data")) == b"routing data"


def test_keys_before_the_held_epoch_no_longer_exist() -> None:
    chain = KeyChain(STATE)
    old = chain.keys(100)
    assert old is not None and chain.keys(99) is None
    sealed = old.seal(b"row", b"secret")
    assert chain.advance(173)
    assert chain.held_epoch == 173 and chain.keys(172) is None and chain.keys(100) is None
    assert not chain.advance(150)  # never backwards
    # The state now held is not the old one, and opens nothing sealed under it.
    assert chain.state.chain != STATE.chain and STATE.chain not in chain.state.encode()
    for epoch in range(173, 173 + EPOCHS_PER_RETENTION + 1):
        keys = chain.keys(epoch)
        assert keys is not None and keys.open(b"row", sealed) is None


def test_a_sealed_row_opens_only_with_its_own_identity_and_intact() -> None:
    keys = EpochKeys(7, bytes(32))
    sealed = keys.seal(pack(["delivery", 7, 1]), b"routing data")
    assert keys.open(pack(["delivery", 7, 1]), sealed) == b"routing data"
    assert keys.open(pack(["delivery", 7, 2]), sealed) is None  # moved to another row
    assert EpochKeys(7, b"\x01" * 32).open(pack(["delivery", 7, 1]), sealed) is None  # other key
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert keys.open(pack(["delivery", 7, 1]), flipped) is None
    assert keys.open(pack(["delivery", 7, 1]), sealed[:10]) is None
    assert keys.seal(b"", b"x") != keys.seal(b"", b"x")  # a fresh nonce each time
    assert repr(keys) == "EpochKeys(epoch=7)"


def test_mailbox_indexes_are_unambiguous_per_device_and_epoch() -> None:
    chain = KeyChain(STATE)
    a, b = chain.keys(100), chain.keys(101)
    assert a is not None and b is not None
    indexes = {
        a.index("ab", 1),
        a.index("a", 1),
        a.index("ab", 2),
        a.index("b", 1),
        b.index("ab", 1),
    }
    assert len(indexes) == 5 and all(len(i) == 16 for i in indexes)


def test_the_epoch_follows_the_retention() -> None:
    assert epoch_seconds_for(DEFAULT_RETENTION_SECONDS) == 3600
    assert epoch_seconds_for(30 * 86400) == 10 * 3600
    assert epoch_seconds_for(60) == 1 == epoch_seconds_for(1)
    chain = KeyChain(STATE)
    assert chain.epoch_of(chain.start_of(100)) == 100
    assert chain.epoch_of(chain.start_of(101) - 1) == 100


def test_secrets_are_not_in_repr() -> None:
    assert STATE.chain.hex() not in repr(STATE) and STATE.chain.hex() not in repr(KeyChain(STATE))


# ------------------------------------------------------------------ the key file


def test_the_key_file_is_created_once_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = str(tmp_path / "relay.db.keys")
    old_umask = os.umask(0)
    try:
        assert create_key_file(path, STATE) == STATE
    finally:
        os.umask(old_umask)
    assert os.stat(path).st_mode & 0o777 == 0o600
    # A second relay starting at the same time keeps the first one's chain.
    other = KeyState.new(3600, 100)
    assert create_key_file(path, other) == STATE
    assert read_key_file(path) == STATE
    assert os.listdir(tmp_path) == ["relay.db.keys"]  # no temporary file left


def test_the_key_file_advances_forwards_only_and_overwrites_the_old_state(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "keys")
    create_key_file(path, STATE)
    held_open = os.open(path, os.O_RDONLY)  # as a reader of the old file would
    try:
        later = STATE.next().next()
        advance_key_file(path, later)
        assert read_key_file(path) == later
        assert os.stat(path).st_mode & 0o777 == 0o600
        # The replaced state's bytes were overwritten, not merely unlinked.
        old = os.pread(held_open, 4096, 0)
        assert old and old == bytes(len(old)) and STATE.chain not in old
    finally:
        os.close(held_open)
    advance_key_file(path, STATE.next())  # an earlier state (another relay behind): ignored
    assert read_key_file(path) == later
    with pytest.raises(RelayKeysMissing):
        advance_key_file(path, KeyState.new(3600, 500))  # another chain
    assert os.listdir(tmp_path) == ["keys"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:-1] + bytes([data[-1] ^ 1]),  # checksum
        lambda data: bytes([data[0] ^ 1]) + data[1:],  # body
        lambda data: data[:20],
        lambda data: b"",
        lambda data: data * 100,
    ],
)
def test_a_damaged_key_file_is_refused_not_read_as_another_chain(
    tmp_path: Path, damage: object
) -> None:
    path = tmp_path / "keys"
    path.write_bytes(damage(STATE.encode()))  # type: ignore[operator]
    with pytest.raises(RelayKeysMissing, match="cannot be read"):
        read_key_file(str(path))
    assert read_key_file(str(tmp_path / "absent")) is None


def test_a_key_file_others_can_read_is_made_owner_only_when_the_relay_opens_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Copied to another relay host with a plain ``cp`` (README, Running a relay cluster),
    the key file may arrive 0644: anyone on that host could read the queue's keys."""
    db = str(tmp_path / "relay.db")
    SqliteDatabase(db).close()
    os.chmod(f"{db}.keys", 0o644)
    with caplog.at_level(logging.WARNING, logger="hushchat.relay"):
        SqliteDatabase(db).close()
    assert os.stat(f"{db}.keys").st_mode & 0o777 == 0o600
    (line,) = [r.getMessage() for r in caplog.records if "key file" in r.getMessage()]
    assert "0644" in line and "owner-only" in line
