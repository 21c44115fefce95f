"""protocol/ stays sans-I/O and the packages import only downwards (both checked on
the source, statically), and objects holding secrets never print them."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

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


# ------------------------------------------------------------------ imports go downwards only

# The folders installed as hushchat.* (pyproject's package-dir): folder -> import name.
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGE_DIRS = {folder: name for name, folder in SETUPTOOLS["package-dir"].items()}
# What each package may not import: the pure core neither the transport nor the
# development tools, the transport not the development tools (under either name).
FORBIDDEN_IMPORTS = {
    "protocol": ("hushchat.transport", "hushchat.devtools", "devtools"),
    "transport": ("hushchat.devtools", "devtools"),
}
# The import names before hushchat.protocol and hushchat.transport: installing them
# put two generic top-level packages into site-packages.
OLD_TOP_LEVEL = ("protocol", "transport")
SOURCE_FOLDERS = ("protocol", "transport", "devtools", "tests", "examples")


def package_of(path: Path) -> str:
    """The package a source file's relative imports resolve against."""
    folder, *inner = path.relative_to(REPO).parent.parts
    return ".".join([PACKAGE_DIRS.get(folder, folder), *inner])


def imported_modules(source: str, filename: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute name) of everything ``source`` imports.

    Relative imports are resolved against ``package``; ``from m import n``
    gives both ``m`` and ``m.n`` (``n`` may be a module), and a call of
    ``import_module`` or ``__import__`` with a literal name gives that name.
    """
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: max(0, len(parts) - node.level + 1)])
                module = f"{base}.{module}" if module else base
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args:
            func, first = node.func, node.args[0]
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in {"import_module", "__import__"} and isinstance(first, ast.Constant):
                yield node.lineno, str(first.value)


def imports_of(source: str, filename: str, package: str, forbidden: tuple[str, ...]) -> list[str]:
    """``file:line: imports name`` for every import of ``forbidden`` or a module inside one."""
    return sorted(
        {
            f"{filename}:{line}: imports {name}"
            for line, name in imported_modules(source, filename, package)
            if any(name == f or name.startswith(f + ".") for f in forbidden)
        }
    )


def source_files(folder: str) -> list[Path]:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    return files


def folder_imports(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        found
        for path in source_files(folder)
        for found in imports_of(
            path.read_text(), str(path.relative_to(REPO)), package_of(path), forbidden
        )
    ]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN_IMPORTS))
def test_packages_import_only_downwards(folder: str) -> None:
    found = folder_imports(folder, FORBIDDEN_IMPORTS[folder])
    assert not found, f"{folder}/ imports what it must not:\n" + "\n".join(found)


@pytest.mark.parametrize("folder", SOURCE_FOLDERS)
def test_nothing_imports_the_old_top_level_names(folder: str) -> None:
    found = folder_imports(folder, OLD_TOP_LEVEL)
    assert not found, "import hushchat.protocol / hushchat.transport instead:\n" + "\n".join(found)


def test_package_of_follows_the_package_dirs() -> None:
    assert package_of(REPO / "protocol" / "keys.py") == "hushchat.protocol"
    assert package_of(REPO / "transport" / "relay" / "storage" / "sqlite.py") == (
        "hushchat.transport.relay.storage"
    )
    assert package_of(REPO / "tests" / "protocol" / "test_purity.py") == "tests.protocol"


def found_lines(found: list[str]) -> list[int]:
    return sorted({int(f.split(":")[1]) for f in found})


# Per package: a module name, and lines that each import what the package may not.
UPWARD_IMPORTS = {
    "protocol": (
        "hushchat.protocol",
        """\
from hushchat.transport.wire import frames
import hushchat.transport.relay.server
from hushchat import transport
from .. import transport
from ..transport.client.connection import RelayConnection
import hushchat.devtools
from hushchat import devtools
from ..devtools.bench import main
import devtools.bench
x = importlib.import_module("hushchat.transport.cli")
""",
    ),
    "transport": (
        "hushchat.transport.relay",
        """\
import hushchat.devtools
import hushchat.devtools.bench as bench
from hushchat.devtools.testvectors import generate
from hushchat import devtools
from ... import devtools
from ...devtools.vectors_cli import add_vectors_command
import devtools.bench
from devtools import bench
x = importlib.import_module("hushchat.devtools.bench")
y = __import__("devtools")
""",
    ),
}
# Per package: what it may import (itself, what lies below it, names that only look alike).
DOWNWARD_IMPORTS = {
    "protocol": (
        "hushchat.protocol",
        """\
from . import primitives as p
from .errors import DecodeError
from hushchat.protocol.keys import IdentityKeyPair
import hushchat.transportation
from tests.support import devtools
x = importlib.import_module(name)
""",
    ),
    "transport": (
        "hushchat.transport.relay",
        """\
from . import session
from ..wire.frames import Hello
from hushchat.protocol import keys
import hushchat.devtoolsmith
from tests.support import devtools
x = importlib.import_module(name)
""",
    ),
}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN_IMPORTS))
def test_the_import_check_finds_every_kind_of_upward_import(folder: str) -> None:
    forbidden = FORBIDDEN_IMPORTS[folder]
    package, source = UPWARD_IMPORTS[folder]
    found = imports_of(source, "upward.py", package, forbidden)
    assert found_lines(found) == list(range(1, source.count("\n") + 1)), found
    package, source = DOWNWARD_IMPORTS[folder]
    assert imports_of(source, "downward.py", package, forbidden) == []


def test_the_import_check_finds_the_old_top_level_names() -> None:
    old = """\
import protocol
import transport.wire.frames as frames
from protocol.keys import IdentityKeyPair
from transport import cli
x = importlib.import_module("protocol.session")
"""
    found = imports_of(old, "example.py", "examples", OLD_TOP_LEVEL)
    assert found_lines(found) == [1, 2, 3, 4, 5], found
    new = """\
import hushchat.protocol
from hushchat.transport import cli
from . import protocol
from .transport import wire
from tests.protocol import test_purity
import protocols
"""
    assert imports_of(new, "test.py", "tests.support", OLD_TOP_LEVEL) == []


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
    _, shared = initiate(
        identity,
        bob.account.bundle("bob", 1),
        local=alice.local,
        remote=alice.remote,
        rng=p.SeededRandom(b"s"),
    )
    assert leaks(shared, [shared.secret, shared.associated_data]) == []


def test_the_leak_check_can_fail() -> None:
    secret = bytes(range(16, 48))

    class Leaky:
        def __repr__(self) -> str:
            return f"Leaky({secret!r})"

    assert leaks(Leaky(), [secret]) != []
    with pytest.raises(AssertionError):
        leaks(Leaky(), [])
