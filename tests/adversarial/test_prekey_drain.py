"""A sybil army drains a device's one-time prekeys.

Each fetch of a bundle takes one one-time X25519 prekey and one one-time
ML-KEM prekey of the target device; once none is left, initiators fall back
to handshakes without them (weaker forward secrecy for the first messages,
and the last-resort KEM key reused). The rate limit per (requester, target)
stops one device, not many: against the code before the per-target budget,
17 freshly registered users took all 100 + 100 one-time prekeys of a device
in well under a second, and 20 took 100 bundles with one-time keys here.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from hushchat.protocol.consts import PREKEY_BATCH_SIZE
from hushchat.protocol.prekeys import PreKeyBundle
from hushchat.transport.client.client import open_client
from hushchat.transport.client.store import ClientStore
from hushchat.transport.relay.ratelimit import RateLimit
from hushchat.transport.wire.errors import NoPreKeys, RateLimited
from hushchat.transport.wire.limits import (
    PREKEY_LOW_THRESHOLD,
    TARGET_ONE_TIME_CAPACITY,
    TARGET_ONE_TIME_PER_SECOND,
)
from tests.support.relay import (
    connected,
    make_prekeys,
    register,
    relay_config,
    running_relay,
)
from tests.support.users import make_user

SYBILS = 20


async def test_many_fresh_users_take_no_more_than_the_budget() -> None:
    bob = make_user("bob")
    sybils = [make_user(f"sybil{i:02}") for i in range(SYBILS)]
    async with running_relay(relay_config()) as port:
        await register(port, bob, *sybils)
        async with connected(port, bob.devices[1]) as owner:
            stock = make_prekeys(bob.devices[1], one_time=100, one_time_kem=100)
            await owner.upload_prekeys(**stock)
        started = trio.current_time()
        bundles = []
        for sybil in sybils:
            async with connected(port, sybil.devices[1]) as connection:
                while True:
                    try:
                        bundles.append(PreKeyBundle.decode(await connection.fetch_bundle("bob", 1)))
                    except RateLimited:
                        break
        elapsed = trio.current_time() - started
        with_one_time = [b for b in bundles if b.one_time_prekey is not None]
        one_time_kem = [b for b in bundles if not b.kem_is_last_resort]
        bound = TARGET_ONE_TIME_CAPACITY + int(elapsed * TARGET_ONE_TIME_PER_SECOND) + 1
        assert len(with_one_time) <= bound and len(one_time_kem) <= bound, (
            len(with_one_time),
            bound,
        )
        # The rest still got a bundle to start a session with (no one-time keys).
        assert len(bundles) == SYBILS * 6
        async with connected(port, bob.devices[1]) as owner:
            counts = await owner.upload_prekeys()
        assert counts.one_time >= 100 - bound and counts.one_time_kem >= 100 - bound


async def test_a_fetch_that_takes_nothing_costs_nothing() -> None:
    """Refused fetches (no prekeys) and fetches from an empty stock spend no token."""
    bob, alice = make_user("bob"), make_user("alice")
    limits = {"bundle_fetch_rate": RateLimit(2, 1e-6), "one_time_prekey_budget": RateLimit(2, 1e-6)}
    async with running_relay(relay_config(**limits)) as port:
        await register(port, bob, alice)
        async with connected(port, alice.devices[1]) as fetcher:
            for _ in range(5):
                with pytest.raises(NoPreKeys):
                    await fetcher.fetch_bundle("bob", 1)
        async with connected(port, bob.devices[1]) as owner:
            await owner.upload_prekeys(**make_prekeys(bob.devices[1], one_time=0, one_time_kem=0))
        carol = make_user("carol")
        await register(port, carol)
        async with connected(port, carol.devices[1]) as fetcher:
            for _ in range(2):  # the stock is empty: the budget stays untouched
                assert PreKeyBundle.decode(await fetcher.fetch_bundle("bob", 1)).kem_is_last_resort
        async with connected(port, bob.devices[1]) as owner:
            await owner.upload_prekeys(**make_prekeys(bob.devices[1], one_time=3, one_time_kem=3))
        async with connected(port, alice.devices[1]) as fetcher:
            first = PreKeyBundle.decode(await fetcher.fetch_bundle("bob", 1))
            second = PreKeyBundle.decode(await fetcher.fetch_bundle("bob", 1))
            assert first.one_time_prekey is not None and second.one_time_prekey is not None
            with pytest.raises(RateLimited):
                await fetcher.fetch_bundle("bob", 1)


async def test_a_device_whose_stock_runs_low_is_told_and_refills(tmp_path: Path) -> None:
    """Fetches bring bob's stock below PREKEY_LOW_THRESHOLD: his client hears PREKEYS_LOW
    and uploads a new batch, so initiators keep getting one-time prekeys."""
    plenty = RateLimit(1000, 1.0)
    config = relay_config(tmp_path, bundle_fetch_rate=plenty, one_time_prekey_budget=plenty)
    fetcher_user = make_user("fetcher")
    store = ClientStore.open(str(tmp_path / "bob.db"))
    async with running_relay(config) as port:
        await register(port, fetcher_user)
        async with open_client(store, "127.0.0.1", port, user_id="bob") as bob:
            first_batch = stock(tmp_path, "bob")
            assert first_batch == PREKEY_BATCH_SIZE
            async with connected(port, fetcher_user.devices[1]) as fetcher:
                for _ in range(first_batch - PREKEY_LOW_THRESHOLD + 1):
                    bundle = PreKeyBundle.decode(await fetcher.fetch_bundle("bob", 1))
                    assert bundle.one_time_prekey is not None
            with trio.fail_after(20):
                while stock(tmp_path, "bob") < PREKEY_LOW_THRESHOLD:
                    await trio.sleep(0.05)
            assert stock(tmp_path, "bob") == PREKEY_LOW_THRESHOLD - 1 + PREKEY_BATCH_SIZE
            assert bob.core.account.one_time_prekey_count >= stock(tmp_path, "bob")
    store.close()


def stock(tmp_path: Path, user_id: str) -> int:
    """The relay's count of the user's one-time X25519 prekeys, read from its database."""
    with sqlite3.connect(tmp_path / "relay.db") as db:
        (count,) = db.execute(
            "SELECT COUNT(*) FROM one_time_prekeys WHERE user_id = ?", (user_id,)
        ).fetchone()
    return int(count)
