"""Helpers for the relay tests: prekeys, a running relay, connections to it.

No tests here; the relay, client and hardening tests import it.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hushchat.protocol.keys import encode_mlkem768, encode_x25519, sign_prekey
from hushchat.protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic
from hushchat.protocol.primitives import (
    SeededRandom,
    mlkem768_generate,
    mlkem768_public_bytes,
    x25519_generate,
    x25519_public_bytes,
)
from hushchat.transport.client.connection import (
    RelayConnection,
    connect_relay,
    open_relay_connection,
)
from hushchat.transport.relay.config import RelayConfig, RelayLimits
from hushchat.transport.relay.server import Relay, serve_relay
from hushchat.transport.wire.frames import QueueEmpty
from hushchat.transport.wire.framing import FrameDecoder, encode_frame
from hushchat.transport.wire.records import Envelope
from tests.support.users import Device, User


def make_prekeys(
    device: Device, *, one_time: int, one_time_kem: int, first_id: int = 1, seed: bytes = b""
) -> dict[str, Any]:
    """Keyword arguments for upload_prekeys: signed + last resort + one-time keys."""
    rng = SeededRandom(seed or f"{device.user_id}/{device.device_id}/{first_id}".encode())
    identity = device.identity

    def x25519_public() -> bytes:
        return x25519_public_bytes(x25519_generate(rng))

    def kem(key_id: int) -> KemPreKeyPublic:
        public = mlkem768_public_bytes(mlkem768_generate(rng))
        return KemPreKeyPublic(key_id, public, sign_prekey(identity, encode_mlkem768(public)))

    spk = x25519_public()
    return {
        "signed_prekey": SignedPreKeyPublic(1, spk, sign_prekey(identity, encode_x25519(spk))),
        "last_resort_kem": kem(1_000_000),
        "one_time": [OneTimePreKeyPublic(first_id + i, x25519_public()) for i in range(one_time)],
        "one_time_kem": [kem(first_id + i) for i in range(one_time_kem)],
    }


# The database of a relay_config() given no folder: SQLite in memory, or the
# PostgreSQL database of a test run on that backend (use_database).
_default_db = [":memory:"]


@contextmanager
def use_database(db: str) -> Iterator[None]:
    """Let relay_config() without a folder give ``db`` (a PostgreSQL URL) for the block."""
    _default_db.append(db)
    try:
        yield
    finally:
        _default_db.pop()


def relay_config(tmp_path: Any = None, **overrides: Any) -> RelayConfig:
    """A test relay on 127.0.0.1, any port; limits overridable by keyword.

    Its database is ``tmp_path``'s relay.db, else the test's database
    (SQLite in memory, or PostgreSQL: see use_database); ``db`` names another
    (a PostgreSQL URL gets the key file ``tmp_path``/relay.keys, else keys in memory).
    """
    config_keys = {
        "clock",
        "retention_seconds",
        "name",
        "ssl_context",
        "key_file",
        "reset_keys",
        "registration",
    }
    config_args = {k: v for k, v in overrides.items() if k in config_keys}
    limits = RelayLimits(
        **{k: v for k, v in overrides.items() if k not in config_keys and k != "db"}
    )
    db_path = overrides.pop("db", None) or (
        _default_db[-1] if tmp_path is None else str(tmp_path / "relay.db")
    )
    if db_path.startswith("postgresql://") and tmp_path is not None:
        config_args.setdefault("key_file", str(tmp_path / "relay.keys"))
    return RelayConfig(host="127.0.0.1", port=0, db_path=db_path, limits=limits, **config_args)


@asynccontextmanager
async def running_relay(config: RelayConfig) -> AsyncIterator[int]:
    """Run a relay for the block; yields its port."""
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(serve_relay, config)
        yield port
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connected(
    port: int, device: Device | None = None, **kwargs: Any
) -> AsyncIterator[RelayConnection]:
    """A connection, authenticated as ``device`` if given."""
    kwargs.setdefault("keepalive_interval", None)
    async with connect_relay("127.0.0.1", port, **kwargs) as connection:
        if device is not None:
            await connection.authenticate(device.user_id, device.device_id, device.identity)
        yield connection


@asynccontextmanager
async def memory_connection(
    relay: Relay, device: Device | None = None
) -> AsyncIterator[RelayConnection]:
    """A connection to ``relay`` over an in-memory stream, authenticated as ``device`` if given."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.handle_connection, server_stream)
        async with open_relay_connection(
            client_stream, expected_relay_name=relay.config.name, keepalive_interval=None
        ) as connection:
            if device is not None:
                await connection.authenticate(device.user_id, device.device_id, device.identity)
            yield connection
        nursery.cancel_scope.cancel()


async def next_envelope(connection: RelayConnection, *, timeout: float = 5) -> Envelope:
    """The next envelope, skipping notices."""
    with trio.fail_after(timeout):
        while not isinstance(item := await connection.receive(), Envelope):
            pass
    return item


async def envelopes_until_empty(
    connection: RelayConnection, *, acknowledge: bool = False, timeout: float = 5
) -> list[Envelope]:
    """The envelopes up to the QUEUE_EMPTY marker, skipping notices.

    With ``acknowledge``, each is acknowledged as it arrives (which frees the
    in-flight window for the next).
    """
    envelopes = []
    with trio.fail_after(timeout):
        while not isinstance(item := await connection.receive(), QueueEmpty):
            if isinstance(item, Envelope):
                envelopes.append(item)
                if acknowledge:
                    await connection.ack(item.guid)
    return envelopes


async def announced_port(process: trio.Process) -> int:
    """The port a ``hushchat relay`` process says it listens on (its stderr)."""
    assert process.stderr is not None
    output = b""
    with trio.fail_after(20):
        while (match := re.search(rb"listening on 127\.0\.0\.1 port (\d+)", output)) is None:
            chunk = await process.stderr.receive_some(4096)
            assert chunk, output
            output += chunk
    return int(match.group(1))


async def register(port: int, *users: User, invite: str | None = None, **kwargs: Any) -> None:
    """Register each user at the relay on ``port`` (with ``invite``; ``kwargs``: for
    connect_relay)."""
    for user in users:
        async with connected(port, **kwargs) as connection:
            await connection.upload_device_list(user.signed_list(), invite=invite)


class RawClient:
    """Frames over a raw stream, for malformed and out-of-order input."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    async def send_body(self, body: bytes) -> None:
        await self.stream.send_all(encode_frame(body))

    async def receive_body(self) -> bytes | None:
        """The next frame body, or None at end of stream."""
        while True:
            body = self.decoder.next_frame()
            if body is not None:
                return body
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.decoder.receive_data(data)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed TLS certificate for localhost and 127.0.0.1: (cert, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hushchat test relay")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
