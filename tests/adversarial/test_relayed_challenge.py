"""A hostile relay passes another relay's login challenge to a device (spec 7.4).

Alice's device is registered at relay B (``127.0.0.1``). A hostile relay A,
which alice's app reaches as ``localhost``, opens its own connection to B and
relays B's WELCOME (its name and fresh challenge) to alice's device, then
alice's AUTH back to B. A device that signs whatever relay name it is told
logs relay A in at B as alice: A then reads alice's mail at B. The device
must compare the announced name with the relay it meant and refuse; and
if A rewrites the name to its own, B refuses the signature, which names A.

Against the code before clients checked the name by default (open_client
called connect_relay without an expected name), the proxy below saw B answer
OK to alice's AUTH, and open_client returned a connected client.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio

from hushchat.transport.client.client import open_client
from hushchat.transport.client.connection import connect_relay
from hushchat.transport.client.store import ClientStore
from hushchat.transport.relay.config import RelayConfig
from hushchat.transport.relay.server import serve_relay
from hushchat.transport.wire.errors import AuthenticationFailed, RelayNameMismatch
from hushchat.transport.wire.frames import (
    Auth,
    ErrorFrame,
    Ok,
    Welcome,
    decode_relay_frame,
    decode_request,
    encode_body,
)
from hushchat.transport.wire.framing import FrameDecoder, encode_frame
from hushchat.transport.wire.limits import RECEIVE_CHUNK_SIZE

TIMEOUT = 20


class RelayingRelay:
    """Relay A: a TCP proxy to relay B that passes B's challenge on as its own.

    ``announce`` (if set) replaces the name in B's WELCOME, as A would to
    make the device sign for A's name. ``logged_in`` records every AUTH that
    B accepted through A, ``refused`` every one B refused.
    """

    def __init__(self, upstream_port: int, announce: str | None = None) -> None:
        self.upstream_port = upstream_port
        self.announce = announce
        self.logged_in: list[str] = []
        self.refused: list[str] = []

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(listeners[0].socket.getsockname()[1])

    async def _handle(self, device: trio.abc.Stream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        auths: dict[int, str] = {}
        try:
            async with trio.open_nursery() as nursery:

                async def to_relay() -> None:
                    async for body in _bodies(device):
                        request = decode_request(body)
                        if isinstance(request, Auth):
                            auths[request.request_id] = request.user_id
                        await upstream.send_all(encode_frame(body))
                    nursery.cancel_scope.cancel()

                async def to_device() -> None:
                    async for body in _bodies(upstream):
                        frame = decode_relay_frame(body)
                        if isinstance(frame, Welcome) and self.announce is not None:
                            body = encode_body(dataclasses.replace(frame, relay_name=self.announce))
                        request_id = getattr(frame, "request_id", None)
                        if request_id in auths:
                            user_id = auths.pop(request_id)
                            if isinstance(frame, Ok):
                                self.logged_in.append(user_id)
                            elif isinstance(frame, ErrorFrame):
                                self.refused.append(user_id)
                        await device.send_all(encode_frame(body))
                    nursery.cancel_scope.cancel()

                for pump in (to_relay, to_device):
                    nursery.start_soon(_quietly, pump)
        finally:
            await trio.aclose_forcefully(device)
            await trio.aclose_forcefully(upstream)


async def _quietly(pump: object) -> None:
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await pump()  # type: ignore[operator]


async def _bodies(stream: trio.abc.Stream) -> AsyncIterator[bytes]:
    decoder = FrameDecoder()
    while True:
        while (body := decoder.next_frame()) is not None:
            yield body
        data = await stream.receive_some(RECEIVE_CHUNK_SIZE)
        if not data:
            return
        decoder.receive_data(data)


@asynccontextmanager
async def relay_b(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[int]:
    config = RelayConfig(db_path=str(tmp_path / "b.db"), host="127.0.0.1", name="127.0.0.1")
    yield await nursery.start(serve_relay, config)


async def registered_at_b(tmp_path: Path, port: int) -> ClientStore:
    """Alice's device, registered at relay B (which she reaches, and names, as 127.0.0.1)."""
    store = ClientStore.open(str(tmp_path / "alice.db"))
    async with open_client(store, "127.0.0.1", port, user_id="alice"):
        pass
    return store


async def test_a_challenge_relayed_from_another_relay_is_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with relay_b(nursery, tmp_path) as port_b:
        store = await registered_at_b(tmp_path, port_b)
        relay_a = RelayingRelay(port_b)
        port_a = await nursery.start(relay_a.serve)
        with trio.fail_after(TIMEOUT), pytest.raises(RelayNameMismatch):
            async with open_client(store, "localhost", port_a, reconnect_first_delay=0.05):
                pass
        assert relay_a.logged_in == []
        # The same at the connection level: the device never signs.
        with trio.fail_after(TIMEOUT), pytest.raises(RelayNameMismatch):
            async with connect_relay("localhost", port_a, keepalive_interval=None):
                pass
        assert relay_a.logged_in == [] and relay_a.refused == []
        store.close()


async def test_a_challenge_relayed_under_the_relays_own_name_fails_at_the_other(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A announces its own name with B's challenge: alice signs for A, B refuses it."""
    async with relay_b(nursery, tmp_path) as port_b:
        store = await registered_at_b(tmp_path, port_b)
        relay_a = RelayingRelay(port_b, announce="localhost")
        port_a = await nursery.start(relay_a.serve)
        from hushchat.protocol.client_core import ClientCore

        core = ClientCore.load(store.records())
        with trio.fail_after(TIMEOUT):
            async with connect_relay("localhost", port_a, keepalive_interval=None) as connection:
                with pytest.raises(AuthenticationFailed):
                    await connection.authenticate("alice", 1, core.account.identity)
        assert relay_a.logged_in == [] and relay_a.refused == ["alice"]
        store.close()
