"""A device's state exported to a passphrase-sealed file and imported elsewhere."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from hushchat.protocol.client_core import Address, ClientCore, MessageReceived, RecordKind
from hushchat.protocol.errors import InvalidArgument
from hushchat.transport.client import (
    BackupError,
    Client,
    ClientStore,
    backup,
    export_backup,
    import_backup,
    open_client,
)
from hushchat.transport.testing import open_test_relay

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cost is a parameter of the file; tests write cheap ones (the reader checks bounds).
    monkeypatch.setattr(backup, "SCRYPT_LOG2_N", 10)


async def first_message(client: Client, body: bytes) -> MessageReceived:
    with trio.fail_after(10):
        async for event in client.events():
            if isinstance(event, MessageReceived) and event.body == body:
                return event
    raise AssertionError("unreachable")


async def test_an_imported_device_is_the_same_device(tmp_path: Path) -> None:
    file = str(tmp_path / "alice.backup")
    async with open_test_relay() as relay:
        alice_store = ClientStore.open(str(tmp_path / "alice.db"))
        bob_store = ClientStore.open(str(tmp_path / "bob.db"))
        async with open_client(bob_store, relay.host, relay.port, user_id="bob") as bob:
            async with open_client(alice_store, relay.host, relay.port, user_id="alice") as alice:
                group_id = await alice.create_group("friends", ["bob"])
                await alice.send_direct("bob", b"before the backup")
                await first_message(bob, b"before the backup")
            info = export_backup(alice_store, file, PASSPHRASE)
            alice_store.close()
            assert (info.user_id, info.device_id) == ("alice", 1)
            assert stat.S_IMODE(os.stat(file).st_mode) == 0o600
            assert b"friends" not in Path(file).read_bytes()  # sealed

            (tmp_path / "new").mkdir()
            restored = import_backup(file, PASSPHRASE, str(tmp_path / "new" / "client.db"))
            try:
                kinds = {key.kind for key, _ in restored.records()}
                assert RecordKind.SESSION not in kinds and RecordKind.OUTBOUND not in kinds
                device = ClientCore.load(restored.records())
                assert device.address == Address(info.user_id, info.device_id)
                async with open_client(restored, relay.host, relay.port) as alice_again:
                    assert alice_again.group(group_id).user_ids == ("alice", "bob")
                    await alice_again.send_group(group_id, b"after the import")
                    await first_message(bob, b"after the import")
                    await bob.send_direct("alice", b"welcome back")
                    await first_message(alice_again, b"welcome back")
            finally:
                restored.close()
        bob_store.close()


def make_backup(tmp_path: Path) -> Path:
    store = ClientStore.open(str(tmp_path / "device.db"))
    try:
        device = ClientCore.create_primary("alice", 1, now=1_700_000_000)
        store.commit(device.take_changes())
        export_backup(store, str(tmp_path / "device.backup"), PASSPHRASE)
    finally:
        store.close()
    return tmp_path / "device.backup"


def test_a_wrong_passphrase_or_a_changed_byte_is_refused_and_creates_nothing(
    tmp_path: Path,
) -> None:
    file = make_backup(tmp_path)
    target = tmp_path / "restored" / "client.db"
    with pytest.raises(BackupError, match="wrong passphrase"):
        import_backup(str(file), "not it", str(target))
    data = file.read_bytes()
    for position in (len(backup.BACKUP_MAGIC) + 2, backup._HEADER.size - 1, len(data) - 1):
        flipped = bytearray(data)
        flipped[position] ^= 1
        file.write_bytes(bytes(flipped))
        with pytest.raises(BackupError):
            import_backup(str(file), PASSPHRASE, str(target))
    file.write_bytes(b"not a backup at all")
    with pytest.raises(BackupError, match="not a hushchat backup"):
        import_backup(str(file), PASSPHRASE, str(target))
    assert not target.parent.exists()


def test_a_file_asking_for_huge_scrypt_costs_is_refused_before_deriving(tmp_path: Path) -> None:
    file = make_backup(tmp_path)
    data = bytearray(file.read_bytes())
    data[len(backup.BACKUP_MAGIC) + 1] = 40  # log2 N: 2**40
    file.write_bytes(bytes(data))
    with pytest.raises(BackupError, match="scrypt parameters"):
        import_backup(str(file), PASSPHRASE, str(tmp_path / "x.db"))


def test_export_and_import_never_overwrite(tmp_path: Path) -> None:
    file = make_backup(tmp_path)
    store = ClientStore.open(str(tmp_path / "device.db"))
    try:
        with pytest.raises(InvalidArgument, match="never overwrites"):
            export_backup(store, str(file), PASSPHRASE)
    finally:
        store.close()
    with pytest.raises(InvalidArgument, match="exists"):
        import_backup(str(file), PASSPHRASE, str(tmp_path / "device.db"))
    empty = ClientStore.open(str(tmp_path / "empty.db"))
    try:
        with pytest.raises(InvalidArgument, match="no device"):
            export_backup(empty, str(tmp_path / "empty.backup"), PASSPHRASE)
    finally:
        empty.close()
