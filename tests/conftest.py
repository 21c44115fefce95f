"""Shared fixtures: deterministic randomness, accounts, one-to-one peers, the in-memory
network of ClientCores, curve25519 math."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hushchat.devtools.pgcluster import ThrowawayCluster
from hushchat.protocol.account import Account
from hushchat.protocol.primitives import SeededRandom
from tests.support.children import reap_started
from tests.support.clock import NOW
from tests.support.fuzzing import CHECKED
from tests.support.harness import Network
from tests.support.peers import Peer
from tests.support.postgres import DatabasePool, database_pool, session_cluster
from tests.support.reference import Curve25519
from tests.support.relay import use_database
from tests.support.terminals import Terminal


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the fuzz count to HUSHCHAT_FUZZ_REPORT (the figure spec 9.7 quotes)."""
    path = os.environ.get("HUSHCHAT_FUZZ_REPORT")
    if path and CHECKED:
        with open(path, "w") as out:
            json.dump({"total": sum(CHECKED.values()), "per_target": dict(CHECKED)}, out, indent=1)


@pytest.fixture(autouse=True)
def reap_children() -> Iterator[None]:
    """No child process a test started outlives it (tests/support/children.py)."""
    yield
    reap_started()


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> SeededRandom:
    """Randomness seeded by the test's id: every run of a test sees the same bytes."""
    return SeededRandom(request.node.nodeid.encode())


@pytest.fixture
def make_account(rng: SeededRandom) -> Callable[..., Account]:
    """Factory for accounts with a few one-time prekeys (key generation is the slow part)."""

    def make(one_time_prekeys: int = 2) -> Account:
        return Account.create(now=NOW, one_time_prekeys=one_time_prekeys, rng=rng)

    return make


@pytest.fixture
def peers(
    make_account: Callable[..., Account], rng: SeededRandom
) -> Callable[..., tuple[Peer, Peer]]:
    """Factory: (alice, bob) where Alice has started a session from Bob's bundle.

    ``post_quantum`` picks PQXDH or X3DH and ``one_time`` whether Bob's bundle
    carries one-time prekeys. Nothing is sent yet, unless ``established``:
    then one message went each way, so both send RatchetMessages.
    """

    def make(
        *, post_quantum: bool = True, one_time: bool = True, established: bool = False
    ) -> tuple[Peer, Peer]:
        alice = Peer(make_account(), rng, me="alice", peer="bob")
        bob = Peer(make_account(), rng, me="bob", peer="alice")
        bundle = bob.account.bundle("bob", 1, one_time=one_time, post_quantum=post_quantum)
        alice.start(bundle, post_quantum=post_quantum)
        if established:
            assert bob.decrypt(alice.encrypt(b"hello")).plaintext == b"hello"
            assert alice.decrypt(bob.encrypt(b"hi")).plaintext == b"hi"
        return alice, bob

    return make


@pytest.fixture
def net(rng: SeededRandom) -> Network:
    """An in-memory relay between ClientCores (tests/support/harness.py), on the test's rng."""
    return Network(rng)


@pytest.fixture(scope="session")
def curve25519() -> Curve25519:
    return Curve25519()


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    """Chats in pseudo-terminals (tests/support/terminals.py), closed after the test; none
    may have printed a traceback."""
    opened: list[Terminal] = []
    yield opened
    for terminal in opened:
        terminal.close()
    for terminal in opened:
        assert "Traceback" not in terminal.text, terminal.text


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[ThrowawayCluster]:
    """One throwaway PostgreSQL server for the session (skips without its binaries)."""
    with session_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgres_databases(postgres_cluster: ThrowawayCluster) -> Iterator[DatabasePool]:
    with database_pool(postgres_cluster) as pool:
        yield pool


@pytest.fixture
def postgres_dsn(postgres_databases: DatabasePool) -> Iterator[str]:
    """The URL of a fresh database with the relay's schema, on the session's server;
    dropped after the test (its connections closed)."""
    dsn = postgres_databases.take()
    yield dsn
    postgres_databases.drop(dsn)


@pytest.fixture(params=["sqlite", "postgres"])
def relay_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A relay's ``--db``: a SQLite file, then a fresh PostgreSQL database (one run each)."""
    if request.param == "sqlite":
        return str(tmp_path / "relay.db")
    dsn: str = request.getfixturevalue("postgres_dsn")
    return dsn


@pytest.fixture(params=["sqlite", "postgres"])
def relay_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test once per relay backend: relay_config() gives SQLite in memory, then
    a fresh PostgreSQL database (a module opts in with ``usefixtures("relay_backend")``)."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    dsn: str = request.getfixturevalue("postgres_dsn")
    with use_database(dsn):
        yield "postgres"
