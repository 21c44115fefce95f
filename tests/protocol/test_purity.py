"""protocol/ stays sans-I/O (checked on the source, statically), and objects holding
secrets never print them."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator

import msgpack
import pytest

from hushchat.protocol import primitives as p
from hushchat.protocol.account import Account
from hushchat.protocol.double_ratchet import RatchetState
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.protocol.pqxdh import initiate
from tests.support.paths import REPO
from tests.support.peers import Peer

PROTOCOL = REPO / "protocol"

# Importing these means I/O, concurrency, clocks, logging or unseeded randomness.
FORBIDDEN_MODULES = {
    "asyncio",
    "concurrent",
    "http",
    "logging",
    "multiprocessing",
    "random",
    "selectors",
    "socket",
    "sqlite3",
    "ssl",
    "subprocess",
    "threading",
    "time",
    "trio",
    "urllib",
}
# Dotted names that may not be used (called or read) even when their module may be imported.
FORBIDDEN_NAMES = {
    "os.environ",
    "os.getenv",
    "os.putenv",
    "os.urandom",
    "os.system",
    "os.popen",
    "datetime.datetime.now",
    "datetime.datetime.utcnow",
    "datetime.datetime.today",
    "datetime.date.today",
    "sys.stdin",
    "sys.stdout",
    "sys.stderr",
}
FORBIDDEN_BUILTINS = {"open", "input", "print", "breakpoint", "__import__"}


def violations(source: str, filename: str) -> Iterator[str]:
    """``file:line: what`` for every impure import, name or call in ``source``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> dotted name it stands for

    def report(node: ast.AST, what: str) -> str:
        return f"{filename}:{getattr(node, 'lineno', 0)}: {what}"

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
                if alias.name.split(".")[0] in FORBIDDEN_MODULES | {"importlib"}:
                    yield report(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            root = node.module.split(".")[0]
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                aliases[alias.asname or alias.name] = dotted
                if root in FORBIDDEN_MODULES | {"importlib"} or dotted in FORBIDDEN_NAMES:
                    yield report(node, f"from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute | ast.Name) and not isinstance(node.ctx, ast.Store):
            used = dotted_name(node, aliases)
            if used is not None and any(
                used == name or used.startswith(name + ".") for name in FORBIDDEN_NAMES
            ):
                yield report(node, f"uses {used}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in FORBIDDEN_BUILTINS
            and node.func.id not in aliases
        ):
            yield report(node, f"calls {node.func.id}()")


def dotted_name(node: ast.expr, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    return ".".join([aliases[node.id], *reversed(parts)])


def test_protocol_is_sans_io() -> None:
    files = sorted(PROTOCOL.rglob("*.py"))
    assert len(files) > 10
    found = [v for path in files for v in violations(path.read_text(), str(path))]
    assert not found, "protocol/ must stay pure (no I/O, clocks, threads, logging):\n" + "\n".join(
        found
    )


IMPURE_SAMPLE = """\
import time
import socket as s
import logging.handlers
from random import randbytes
from os import environ
import os, datetime  # allowed: only some of their names are forbidden
from datetime import datetime as dt
import importlib
x = os.environ["HOME"]
y = os.getenv("HOME")
z = datetime.datetime.now()
w = dt.now()
open("f")
print("hi")
os.urandom(8)
"""


def test_the_scanner_finds_every_kind_of_violation() -> None:
    found = list(violations(IMPURE_SAMPLE, "sample.py"))
    lines = sorted({int(v.split(":")[1]) for v in found})
    assert lines == [1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15], found
    clean = "import hashlib\nfrom os import path\nx = hashlib.sha256(b'')\nopen = 1\n"
    assert list(violations(clean, "clean.py")) == []


# ------------------------------------------------------------------ secrets never printed


def leaks(obj: object, secrets: list[bytes]) -> list[str]:
    shown = repr(obj) + str(obj)
    assert secrets and all(len(s) >= 16 for s in secrets)
    return [s.hex() for s in secrets if s.hex() in shown or repr(s)[2:-1] in shown]


def ratchet_secrets(state: RatchetState) -> list[bytes]:
    secrets = [state.root_key, p.x25519_private_bytes(state.self_private)]
    secrets += [k for k in (state.send_chain, state.receive_chain) if k is not None]
    return secrets + list(state.skipped.values())


def account_secrets(account: Account) -> list[bytes]:
    """Private keys, by their place in the pickle (see Account.to_bytes)."""
    value = msgpack.unpackb(account.to_bytes())
    secrets = [value[1]]
    secrets += [entry[1] for entry in value[4]]  # signed prekeys
    secrets += [entry[1] for entry in value[5]]  # one-time prekeys
    secrets += [entry[1] for entry in value[6] + value[8]]  # ML-KEM seeds
    secrets.append(p.ed25519_private_to_x25519(value[1]))
    return secrets


def test_reprs_hold_no_secrets(peers: Callable[..., tuple[Peer, Peer]]) -> None:
    alice, bob = peers()
    held = [alice.encrypt(b"%d" % i) for i in range(3)]
    bob.decrypt(held[2])  # two skipped keys stored
    alice.decrypt(bob.encrypt(b"reply"))
    session = bob.record.current
    assert session is not None and len(session.ratchet.skipped) == 2

    identity = IdentityKeyPair(bytes(range(32)))
    assert leaks(identity, [identity.seed, p.ed25519_private_to_x25519(identity.seed)]) == []
    for account in (alice.account, bob.account):
        assert leaks(account, account_secrets(account)) == []
    for record in (alice.record, bob.record):
        secrets = [s for session in record.sessions() for s in ratchet_secrets(session.ratchet)]
        assert leaks(record, secrets) == []
        assert leaks(record.current, secrets) == []
        assert leaks(record.current.ratchet, secrets) == []  # type: ignore[union-attr]
    _, shared = initiate(identity, bob.account.bundle("bob", 1), rng=p.SeededRandom(b"s"))
    assert leaks(shared, [shared.secret, shared.associated_data]) == []


def test_the_leak_check_can_fail() -> None:
    secret = bytes(range(16, 48))

    class Leaky:
        def __repr__(self) -> str:
            return f"Leaky({secret!r})"

    assert leaks(Leaky(), [secret]) != []
    with pytest.raises(AssertionError):
        leaks(Leaky(), [])
