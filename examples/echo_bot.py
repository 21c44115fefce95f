"""A group echo bot: the smallest useful app on hushchat's client library.

It connects to a relay as a user of its own, joins every group someone adds
it to, and answers each group message with an echo of it, end-to-end
encrypted like any member's message::

    hushchat relay --port 7400 &
    python examples/echo_bot.py --relay 127.0.0.1:7400
    python examples/group_chat.py chat --relay 127.0.0.1:7400 --name alice
        /group create bots echo-bot
        hello bot

What it shows, in order of appearance below:

1. A ClientStore (one SQLite file) holds the device: keys, sessions, groups.
   The first run creates the user; later runs are the same device.
2. open_client connects, registers and authenticates the device, and keeps
   it connected (reconnecting by itself) for the ``async with`` block.
3. client.events() yields typed events in order. A group invitation needs
   no code: the library verifies the signed change and the bot is in.
4. send_group encrypts once for the whole group; the relay fans it out.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import trio
from state_folder import default_state_dir

from hushchat.protocol import HushchatError
from hushchat.protocol.client_core import GroupUpdated, MessageReceived
from hushchat.protocol.devices import check_user_id
from hushchat.protocol.errors import InvalidArgument
from hushchat.protocol.group import TitleChanged
from hushchat.transport.client.client import Client, open_client
from hushchat.transport.client.store import ClientStore

# Echoes of the same message are skipped: events come at least once (the last
# one taken before a restart comes again). Kept in memory: a sketch, not a product.
REMEMBERED_MESSAGES = 1000


async def echo(client: Client) -> None:
    """Answer every group message (but our own) with ``echo: <message>``, until cancelled."""
    me = client.address.user_id
    answered: list[bytes] = []
    async for event in client.events():
        if isinstance(event, GroupUpdated) and event.joined:
            # A join's changes list the group as we first see it: members, then its title.
            title = next((c.title for c in event.changes if isinstance(c, TitleChanged)), "")
            print(f"joined {title!r}, added by {event.author.user_id}", flush=True)
        elif isinstance(event, MessageReceived) and event.group_id is not None:
            if event.sender.user_id == me or event.message_id in answered:
                continue  # our own message from another of our devices, or a repeat
            try:
                await client.send_group(event.group_id, b"echo: " + event.body)
            except HushchatError as exc:
                # Say, we were removed from the group meanwhile, or the relay is out of
                # reach for longer than the client waits: log it, keep serving.
                print(f"could not answer in a group: {exc.message} ({exc.code})", flush=True)
            answered = [*answered[-REMEMBERED_MESSAGES:], event.message_id]


async def run_bot(
    host: str, port: int, name: str, state_dir: str, invite: str | None = None
) -> None:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    store = ClientStore.open(os.path.join(state_dir, "client.db"))
    try:
        # user_id (and invite, at a relay that registers by invitation) are used only
        # the first time, to create the user.
        async with open_client(store, host, port, user_id=name, invite=invite) as client:
            print(f"{client.address.user_id} ready on {host}:{port}", flush=True)
            await echo(client)
    finally:
        store.close()


def user_name(text: str) -> str:
    """argparse type: a user name by the protocol's rule for user ids."""
    try:
        return check_user_id(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A hushchat bot that echoes group messages.")
    parser.add_argument("--relay", required=True, metavar="HOST:PORT", help="the relay")
    parser.add_argument(
        "--name", type=user_name, default="echo-bot", help="the bot's user name (default echo-bot)"
    )
    parser.add_argument("--state", metavar="DIR", help="its state (default ~/.hushchat/NAME)")
    parser.add_argument(
        "--invite",
        metavar="TOKEN",
        help="at a relay that registers by invitation: the token its operator issued "
        "(`hushchat relay invite`), used at the bot's first start",
    )
    args = parser.parse_args(argv)
    host, _, port = args.relay.rpartition(":")
    if not host or not port.isdigit():
        parser.error("--relay: expected HOST:PORT, e.g. 127.0.0.1:7400")
    state = args.state or default_state_dir(args.name)
    status = 0
    try:
        trio.run(run_bot, host, int(port), args.name, state, args.invite)
    except* KeyboardInterrupt:  # Ctrl-C stops the bot (trio may raise it in a group)
        print("bye", flush=True)
    except* HushchatError as group:
        # What no retry changes (the relay registers no new users, or by invitation
        # only; the name is another identity's): open_client raises it, once.
        refused = group.exceptions[0]
        assert isinstance(refused, HushchatError)
        print(f"echo_bot.py: {refused.message} ({refused.code})", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
