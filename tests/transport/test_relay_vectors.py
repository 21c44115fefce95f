"""vectors/relay.json's scripted session is what a real relay does, frame for frame.

The vectors are built from the frame classes, not recorded from a relay
(its challenge and guids are random). Here a relay on 127.0.0.1 is driven
with the session's client frames (AUTH signed over the relay's real
challenge, the ACK naming the real guid); every frame it sends must be the
session's, but for those two random values.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import trio

from hushchat.devtools.testvectors import relay as relay_vectors
from hushchat.devtools.testvectors._common import unhex_any
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.transport.wire.auth import sign_auth
from hushchat.transport.wire.frames import (
    Ack,
    Auth,
    EnvelopePush,
    Welcome,
    decode_relay_frame,
    encode_body,
)
from tests.support.paths import REPO
from tests.support.relay import RawClient, connected, register, relay_config
from tests.support.relay import running_relay as run_relay
from tests.support.users import make_user

VECTORS = REPO / "vectors" / "relay.json"


def _session() -> dict[str, Any]:
    data = json.loads(VECTORS.read_text(encoding="utf-8"))
    (group,) = [g for g in data["testGroups"] if g["type"] == "Session"]
    (test,) = group["tests"]
    session: dict[str, Any] = test
    return session


async def test_the_scripted_session_is_what_a_relay_does() -> None:
    session = _session()
    steps = session["steps"]
    device = IdentityKeyPair(unhex_any(session["device_identity_seed"]))
    accepted = next(s["decoded"] for s in steps if s["decoded"]["name"] == "ACCEPTED")
    pushed = next(s["decoded"] for s in steps if s["decoded"]["name"] == "ENVELOPE")["envelope"]
    now = [accepted["server_ts"]]
    bob = make_user(pushed["sender_user"], [pushed["sender_device"]])
    config = relay_config(clock=lambda: now[0], name=session["relay_name"])
    challenge = b""
    guid = b""
    async with run_relay(config) as port:
        await register(port, bob, expected_relay_name=session["relay_name"])
        client = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
        with trio.fail_after(10):
            for index, step in enumerate(steps):
                expected = copy.deepcopy(step["decoded"])
                if step["from"] == "client":
                    frame = relay_vectors.frame_from_json(expected)
                    if isinstance(frame, Auth):
                        signature = sign_auth(
                            device, session["relay_name"], challenge, frame.user_id, frame.device_id
                        )
                        frame = Auth(frame.request_id, frame.user_id, frame.device_id, signature)
                    if isinstance(frame, Ack):
                        frame = Ack(frame.request_id, (guid,))
                    await client.send_body(encode_body(frame))
                    continue
                if expected["name"] == "ENVELOPE":
                    # Bob's message, sent while Alice's connection is open.
                    now[0] = pushed["server_ts"]
                    async with connected(
                        port,
                        bob.devices[pushed["sender_device"]],
                        expected_relay_name=session["relay_name"],
                    ) as sender:
                        await sender.send_direct("alice", [(1, unhex_any(pushed["payload"]))])
                body = await client.receive_body()
                assert body is not None, f"step {index}: the relay closed the connection"
                received = decode_relay_frame(body)
                if isinstance(received, Welcome):
                    challenge = received.challenge
                    expected["challenge"] = challenge.hex()
                if isinstance(received, EnvelopePush):
                    guid = received.envelope.guid
                    expected["envelope"]["guid"] = guid.hex()
                assert relay_vectors.frame_json(received) == expected, f"step {index}"
        await client.stream.aclose()
