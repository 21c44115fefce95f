"""The relay on a full disk: a real small filesystem (tmpfs) under a ``hushchat relay`` process.

A tmpfs mounted for the test holds the relay's database, a filler file the
"operator" deletes to free space, and whatever else fills it to the last
byte. The relay must answer STORAGE_FULL (not INTERNAL_ERROR), spend no
rate-limit token on a refused request, recover by itself once space
returns (its WAL must not eat the space freed), and stop cleanly on SIGTERM
while the disk is full. Mounting needs root: the test is skipped, saying
so, where ``mount`` is not permitted.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import trio

from hushchat.transport.wire.errors import RateLimited, StorageFull
from hushchat.transport.wire.frames import QueueEmpty
from hushchat.transport.wire.limits import BUNDLE_FETCH_CAPACITY
from hushchat.transport.wire.records import Envelope, PreKeyCounts
from tests.support.children import RELAY_COMMAND, REPO, STARTED, child_env
from tests.support.relay import connected, make_prekeys, register
from tests.support.users import Device, make_user

TIMEOUT = 30
LISTENING = re.compile(r"listening on \S+ port (\d+)")
DISK_SIZE = "4m"
FILLER_SIZE = 1536 * 1024  # the space the operator frees: more than the WAL may hold
PAYLOAD = 60 * 1024


@contextmanager
def small_filesystem(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` for the block (skip if mounting is refused)."""
    folder.mkdir()
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount command to make a small filesystem")
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs (needs root): {result.stderr.strip()}")
    try:
        yield folder
    finally:
        for _ in range(3):  # lazily: a child still holding a file cannot keep it mounted
            if not os.path.ismount(folder):
                break
            subprocess.run(["umount", "-l", str(folder)], check=True)
        assert not os.path.ismount(folder)


def fill_to_the_last_byte(path: Path) -> None:
    """Write ``path`` until the filesystem refuses (ENOSPC)."""
    with path.open("wb", buffering=0) as out, suppress(OSError):
        while True:
            out.write(bytes(4096))
    with pytest.raises(OSError) as info, path.open("ab", buffering=0) as out:
        out.write(bytes(4096))
    assert info.value.errno == errno.ENOSPC


class RelayProcess:
    """``hushchat relay`` on a database, its log (stderr) in a file off the small disk."""

    def __init__(self, process: trio.Process, log: Path, start: int) -> None:
        self.process = process
        self.log = log
        self._start = start  # where this process's lines begin in the log

    @classmethod
    async def start(cls, db: Path, log: Path) -> RelayProcess:
        with log.open("ab") as stderr:
            start = stderr.tell()
            process = await trio.lowlevel.open_process(
                [*RELAY_COMMAND, "--port", "0", "--db", str(db), "--log-level", "DEBUG"],
                stderr=stderr,
                env=child_env(),
                cwd=str(REPO),
            )
        STARTED.append(process)
        return cls(process, log, start)

    def output(self) -> str:
        return self.log.read_bytes()[self._start :].decode()

    async def port(self) -> int:
        with trio.fail_after(TIMEOUT):
            while (found := LISTENING.search(self.output())) is None:
                assert self.process.poll() is None, self.output()
                await trio.sleep(0.05)
        return int(found.group(1))

    async def stop(self) -> None:
        """SIGTERM: it must exit 0 without a traceback, whatever its storage's state."""
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(TIMEOUT):
            status = await self.process.wait()
        log = self.output()
        assert status == 0, log
        assert "Traceback" not in log, log
        # A full disk is said once, not once per refused request.
        assert log.count("the relay's disk is full") <= 1, log


async def fill_mailbox_until_full(port: int, sender_device: Device, size: int) -> int:
    """Send bob ``size``-byte payloads until STORAGE_FULL; how many were accepted."""
    accepted = 0
    async with connected(port, sender_device) as sender:
        with pytest.raises(StorageFull), trio.fail_after(TIMEOUT):
            while True:
                await sender.send_direct("bob", [(1, bytes([accepted % 256]) * size)])
                accepted += 1
    return accepted


async def read_all(port: int, device: Device) -> list[Envelope]:
    """Every envelope in the device's mailbox, each read's acknowledged in one ACK.

    As the client library does: one deletion of many envelopes, which the
    relay must split when the disk has room for single ones only.
    """
    got: list[Envelope] = []
    async with connected(port, device) as receiver:
        with trio.fail_after(TIMEOUT):
            queue_empty = False
            while not queue_empty:
                batch = await receiver.receive_batch()
                queue_empty = any(isinstance(item, QueueEmpty) for item in batch)
                envelopes = [item for item in batch if isinstance(item, Envelope)]
                if envelopes:
                    got.extend(envelopes)
                    await receiver.ack(*(e.guid for e in envelopes))
    return got


async def test_a_full_disk_is_storage_full_spends_no_token_and_passes(tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    log = tmp_path / "relay.log"
    with small_filesystem(tmp_path / "disk", DISK_SIZE) as disk:
        db = disk / "relay.db"
        relay = await RelayProcess.start(db, log)
        port = await relay.port()
        await register(port, alice, bob)
        async with connected(port, bob.devices[1]) as owner:
            await owner.upload_prekeys(**make_prekeys(bob.devices[1], one_time=8, one_time_kem=8))
        (disk / "filler").write_bytes(bytes(FILLER_SIZE))

        accepted = await fill_mailbox_until_full(port, alice.devices[1], PAYLOAD)
        assert accepted > 0
        fill_to_the_last_byte(disk / "rest")
        # A failed transaction leaves its WAL frames' space behind, which a smaller
        # one may still use: small sends take what is left.
        accepted += await fill_mailbox_until_full(port, alice.devices[1], 100)
        capacity = int(BUNDLE_FETCH_CAPACITY)
        async with connected(port, alice.devices[1]) as sender:
            # Bundle fetches that fail inside storage: more than the limit allows
            # at once. None takes a prekey, none spends a token.
            taken = failed = 0
            while failed <= capacity:
                try:
                    await sender.fetch_bundle("bob", 1)
                    taken += 1
                except StorageFull as refusal:
                    assert refusal.wire_code == "STORAGE_FULL"
                    failed += 1
            assert taken < capacity

        # The operator frees space; the relay goes on by itself, without a restart.
        (disk / "filler").unlink()
        (disk / "rest").unlink()
        async with connected(port, alice.devices[1]) as sender:
            with trio.fail_after(TIMEOUT):
                while True:
                    try:
                        await sender.send_direct("bob", [(1, b"after")])
                        break
                    except StorageFull:
                        await trio.sleep(0.1)
            for _ in range(capacity - taken):
                await sender.fetch_bundle("bob", 1)
            with pytest.raises(RateLimited):
                await sender.fetch_bundle("bob", 1)
        async with connected(port, bob.devices[1]) as owner:
            assert await owner.upload_prekeys() == PreKeyCounts(8 - capacity, 8 - capacity)

        mail = await read_all(port, bob.devices[1])
        assert [e.payload for e in mail][-1] == b"after" and len(mail) == accepted + 1
        read = {e.guid for e in mail}
        # What bob read and deleted is room again: the WAL does not keep it.
        again = await fill_mailbox_until_full(port, alice.devices[1], PAYLOAD)
        assert again * PAYLOAD >= accepted * PAYLOAD - FILLER_SIZE // 4, (again, accepted)
        await relay.stop()

        # A restart on the full disk serves what is stored; SIGTERM while the disk
        # is full, then a restart once space returns: all there.
        relay = await RelayProcess.start(db, log)
        port = await relay.port()
        fill_to_the_last_byte(disk / "rest")
        again += await fill_mailbox_until_full(port, alice.devices[1], PAYLOAD)
        await relay.stop()
        (disk / "rest").unlink()
        relay = await RelayProcess.start(db, log)
        port = await relay.port()
        # Everything accepted arrives; an acknowledgement whose deletion met the full
        # disk brings its envelope once more (spec 7.8), which the client knows by its guid.
        last = await read_all(port, bob.devices[1])
        assert len([e for e in last if e.guid not in read]) == again
        await relay.stop()
