"""``hushchat bench relay``: the real relay under load from many clients on loopback.

The relay is :func:`hushchat.transport.relay.server.serve_relay` with its default SQLite
store (WAL, ``synchronous=FULL``) in a temporary directory, running in a
process of its own (``multiprocessing``, spawned), so its CPU time and peak
memory (``getrusage`` in that process) are its own and the load generator
does not share its core. The load generator is this process: ``clients``
low-level :class:`~hushchat.transport.client.connection.RelayConnection` s (not the full
client library, which would add its own SQLite commit per message and
measure the client store rather than the relay), one user with one device
each, registered with a signed device list and authenticated.

Every client sends ``messages`` payloads, one request at a time, alternating
one-to-one (to the next client) and group (to the other members of its group
of ``group_size`` consecutive clients). A payload is an opaque blob of
:data:`PAYLOAD_SIZE` bytes (the size of a real one-to-one message) naming
its sender and sequence number. Each recipient records when a payload
arrives and acknowledges, in one ACK, the envelopes that arrived together;
the relay answers an acknowledgement at once and commits the deletion with
its next batch (spec 7.8). Reported:

* envelopes delivered (acknowledged) per second, from the first send to the
  last acknowledgement;
* latency from just before the send request to the recipient's receipt,
  p50/p95/p99;
* lost and duplicated envelopes (each expected delivery must arrive once);
* the relay's peak RSS and CPU time, and the load generator's CPU time.

Each client sends at most ``messages`` requests and the whole run is bounded
by ``timeout`` seconds. The relay's send limit (60 requests at once, then 60
per second per connection) is the relay's own; a refused send waits as told
and is retried (counted as ``rate_limited``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import trio

from hushchat.protocol.devices import DeviceEntry, DeviceList
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.transport.client.connection import RelayConnection, connect_relay
from hushchat.transport.relay.config import RelayConfig
from hushchat.transport.relay.server import serve_relay
from hushchat.transport.wire.errors import RateLimited
from hushchat.transport.wire.records import Envelope

from .arguments import at_least, positive_seconds

DEFAULT_CLIENTS = 200
DEFAULT_MESSAGES = 10
DEFAULT_GROUP_SIZE = 10
DEFAULT_TIMEOUT = 300.0
# A real one-to-one message for a 100-byte text is about this long.
PAYLOAD_SIZE = 200
# After every expected envelope arrived: how long to keep listening for duplicates.
DRAIN_SECONDS = 1.0
# The targets the report checks: throughput, and latency at 200 clients.
TARGET_ENVELOPES_PER_SECOND = 10_000
TARGET_P99_MS = 100.0
# Relay process start-up and shut-down bounds.
RELAY_START_TIMEOUT = 30.0
RELAY_STOP_TIMEOUT = 30.0


@dataclass(slots=True)
class RelayLoadResult:
    """What one run measured (times in seconds unless named otherwise)."""

    clients: int
    messages_per_client: int
    group_size: int
    sends: int
    expected: int
    delivered: int
    lost: int
    duplicated: int
    rate_limited: int
    seconds: float
    envelopes_per_second: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    relay_peak_rss_mb: float = 0.0
    relay_cpu_seconds: float = 0.0
    load_cpu_seconds: float = 0.0
    load_client: str = "hushchat.transport.client.connection.RelayConnection"

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("seconds", "envelopes_per_second", "relay_peak_rss_mb"):
            out[key] = round(out[key], 2)
        out["relay_cpu_seconds"] = round(self.relay_cpu_seconds, 2)
        out["load_cpu_seconds"] = round(self.load_cpu_seconds, 2)
        return out


# ------------------------------------------------------------------ the relay process


def _usage() -> tuple[int, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_maxrss, usage.ru_utime + usage.ru_stime


def _relay_process(db_path: str, pipe: Connection) -> None:
    """Run a relay; answer "usage" with (peak RSS KiB, CPU seconds) until told to stop.

    Ctrl-C reaches every process of the terminal's group: the parent stops this
    one through the pipe, so it ignores SIGINT rather than die mid-answer.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_relay, RelayConfig(port=0, db_path=db_path))
            pipe.send(port)
            while await trio.to_thread.run_sync(pipe.recv) == "usage":
                pipe.send(_usage())
            nursery.cancel_scope.cancel()

    trio.run(main)
    pipe.send(_usage())


class RelayBenchError(Exception):
    """The run could not go on: the message says why."""


class _RelayProcess:
    """The relay in a spawned process, and a pipe to read its usage and stop it."""

    def __init__(self, db_path: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(target=_relay_process, args=(db_path, child), daemon=True)
        self._process.start()
        child.close()
        self.port: int = self._receive(RELAY_START_TIMEOUT)

    def _receive(self, timeout: float) -> Any:
        try:
            if self._pipe.poll(timeout):
                return self._pipe.recv()
        except (EOFError, OSError):
            raise RelayBenchError("the relay process ended unexpectedly") from None
        raise RelayBenchError("the relay process does not answer")

    def usage(self) -> tuple[float, float]:
        """The relay's (peak RSS in MiB, CPU seconds) so far."""
        self._pipe.send("usage")
        peak_kib, cpu = self._receive(RELAY_STOP_TIMEOUT)
        return peak_kib / 1024, cpu

    def stop(self) -> tuple[float, float]:
        """Stop the relay; its final (peak RSS in MiB, CPU seconds)."""
        try:
            try:
                self._pipe.send("stop")
            except OSError:
                raise RelayBenchError("the relay process ended unexpectedly") from None
            peak_kib, cpu = self._receive(RELAY_STOP_TIMEOUT)
        finally:
            self._process.join(RELAY_STOP_TIMEOUT)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        return peak_kib / 1024, cpu


# ------------------------------------------------------------------ the load


@dataclass(frozen=True, slots=True)
class _Plan:
    """Who sends what to whom."""

    clients: int
    messages: int
    group_size: int

    def user(self, index: int) -> str:
        return f"load{index:05d}"

    def group_of(self, index: int) -> list[int]:
        """The other members of ``index``'s group (consecutive clients)."""
        start = index - index % self.group_size
        return [i for i in range(start, min(start + self.group_size, self.clients)) if i != index]

    def is_direct(self, sender: int, seq: int) -> bool:
        """Even sequence numbers go one-to-one (and everything from a client alone in a group)."""
        return seq % 2 == 0 or not self.group_of(sender)

    def recipients(self, sender: int, seq: int) -> list[int]:
        if self.is_direct(sender, seq):
            return [(sender + 1) % self.clients]
        return self.group_of(sender)


class _Load:
    """The bookkeeping of one run, shared by every client task (one trio thread)."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.ready = 0
        self.all_ready = trio.Event()
        self.start = trio.Event()
        self.all_in = trio.Event()
        self.sent_at: dict[tuple[int, int], float] = {}
        self.received: Counter[tuple[int, int, int]] = Counter()
        self.latencies: list[float] = []
        self.expected_by = [0] * plan.clients
        for sender in range(plan.clients):
            for seq in range(plan.messages):
                for recipient in plan.recipients(sender, seq):
                    self.expected_by[recipient] += 1
        self.unique_by = [0] * plan.clients
        self.complete = sum(1 for count in self.expected_by if count == 0)
        self.delivered = 0
        self.sends = 0
        self.rate_limited = 0
        self.first_send = math.inf
        self.last_ack = 0.0

    @property
    def expected(self) -> int:
        return sum(self.expected_by)

    def registered(self) -> None:
        self.ready += 1
        if self.ready == self.plan.clients:
            self.all_ready.set()

    def arrived(self, sender: int, seq: int, recipient: int) -> None:
        """Count an envelope; the first copy of each sets its latency."""
        key = (sender, seq, recipient)
        self.received[key] += 1
        if self.received[key] > 1:
            return
        self.latencies.append(time.perf_counter() - self.sent_at[(sender, seq)])
        self.unique_by[recipient] += 1
        if self.unique_by[recipient] == self.expected_by[recipient]:
            self.complete += 1
            if self.complete == self.plan.clients:
                self.all_in.set()


def _payload(sender: int, seq: int) -> bytes:
    """An opaque payload that names its sender and sequence number."""
    return sender.to_bytes(4, "big") + seq.to_bytes(4, "big") + bytes(PAYLOAD_SIZE - 8)


def _read_payload(payload: bytes) -> tuple[int, int]:
    return int.from_bytes(payload[:4], "big"), int.from_bytes(payload[4:8], "big")


async def _register(connection: RelayConnection, user_id: str) -> None:
    """A new user with one device: upload its signed device list, then authenticate."""
    user_identity = IdentityKeyPair.generate()
    device_identity = IdentityKeyPair.generate()
    entry = DeviceEntry.prove(device_identity, user_id, 1, user_identity.public.ed25519)
    signed = DeviceList.initial(user_id, user_identity.public.ed25519, [entry]).sign(user_identity)
    await connection.upload_device_list(signed.encode())
    await connection.authenticate(user_id, 1, device_identity)


async def _client(load: _Load, index: int, port: int) -> None:
    async with connect_relay("127.0.0.1", port, keepalive_interval=None) as connection:
        await _register(connection, load.plan.user(index))
        load.registered()
        await load.start.wait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_receive, load, index, connection)
            await _send_all(load, index, connection)


async def _send_all(load: _Load, index: int, connection: RelayConnection) -> None:
    """Send every message of this client, one request at a time."""
    plan = load.plan
    group = [(plan.user(i), 1) for i in plan.group_of(index)]
    peer = plan.user((index + 1) % plan.clients)
    for seq in range(plan.messages):
        payload = _payload(index, seq)
        while True:
            load.sent_at[(index, seq)] = now = time.perf_counter()
            load.first_send = min(load.first_send, now)
            try:
                if plan.is_direct(index, seq):
                    await connection.send_direct(peer, [(1, payload)])
                else:
                    await connection.send_group(payload, group)
            except RateLimited as limited:
                load.rate_limited += 1
                await trio.sleep(max(limited.retry_after_ms, 1) / 1000)
                continue
            load.sends += 1
            break


async def _receive(load: _Load, index: int, connection: RelayConnection) -> None:
    """Record every envelope; acknowledge what arrived together in one ACK.

    The relay deletes them with its next batch commit.
    """
    while True:
        envelopes = [
            item for item in await connection.receive_batch() if isinstance(item, Envelope)
        ]
        if not envelopes:
            continue
        for envelope in envelopes:
            sender, seq = _read_payload(envelope.payload)
            load.arrived(sender, seq, index)
        await connection.ack(*(envelope.guid for envelope in envelopes))
        load.delivered += len(envelopes)
        load.last_ack = time.perf_counter()


async def _run_load(load: _Load, relay: _RelayProcess, timeout: float) -> tuple[float, float]:
    """Run every client to completion (or ``timeout``); the relay's CPU seconds under load."""
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for index in range(load.plan.clients):
                nursery.start_soon(_client, load, index, relay.port)
            await load.all_ready.wait()
            _, relay_cpu_before = relay.usage()
            load_cpu_before = _usage()[1]
            load.start.set()
            await load.all_in.wait()
            # Anything still coming now is a duplicate.
            await trio.sleep(DRAIN_SECONDS)
            _, relay_cpu_after = relay.usage()
            load_cpu = _usage()[1] - load_cpu_before
            nursery.cancel_scope.cancel()
            return relay_cpu_after - relay_cpu_before, load_cpu
    return math.nan, math.nan


def _percentiles(latencies: Sequence[float]) -> dict[str, float]:
    if len(latencies) < 2:
        only = 1000 * latencies[0] if latencies else math.nan
        return {"p50": only, "p95": only, "p99": only}
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        name: round(1000 * cuts[q - 1], 2) for name, q in (("p50", 50), ("p95", 95), ("p99", 99))
    }


def run_relay_bench(
    *,
    clients: int = DEFAULT_CLIENTS,
    messages: int = DEFAULT_MESSAGES,
    group_size: int = DEFAULT_GROUP_SIZE,
    timeout: float = DEFAULT_TIMEOUT,
    db_dir: str | None = None,
) -> RelayLoadResult:
    """Start a relay, run the load against it, stop it; what was measured.

    The relay's database goes in a new temporary directory under ``db_dir``
    (default: the system's temporary directory).
    """
    if clients < 2 or messages < 1 or group_size < 1:
        raise ValueError("at least 2 clients, 1 message each, groups of at least 1")
    plan = _Plan(clients, messages, group_size)
    load = _Load(plan)
    with tempfile.TemporaryDirectory(prefix="hushchat-bench-", dir=db_dir) as directory:
        relay = _RelayProcess(os.path.join(directory, "relay.db"))
        try:
            relay_cpu, load_cpu = trio.run(_run_load, load, relay, timeout)
        finally:
            peak_mb, _ = relay.stop()
    received = set(load.received)
    expected = load.expected
    seconds = load.last_ack - load.first_send if load.delivered else math.nan
    return RelayLoadResult(
        clients=clients,
        messages_per_client=messages,
        group_size=group_size,
        sends=load.sends,
        expected=expected,
        delivered=load.delivered,
        lost=expected - len(received),
        duplicated=sum(load.received.values()) - len(received),
        rate_limited=load.rate_limited,
        seconds=seconds,
        envelopes_per_second=load.delivered / seconds if load.delivered else 0.0,
        latency_ms=_percentiles(load.latencies),
        relay_peak_rss_mb=peak_mb,
        relay_cpu_seconds=relay_cpu,
        load_cpu_seconds=load_cpu,
    )


def render(result: RelayLoadResult) -> str:
    """The human-readable report, each figure beside its target."""
    rate_ok = result.envelopes_per_second >= TARGET_ENVELOPES_PER_SECOND
    p99_ok = result.latency_ms["p99"] <= TARGET_P99_MS
    exact = result.lost == 0 and result.duplicated == 0
    lat = result.latency_ms
    return "\n".join(
        [
            f"relay bench: {result.clients} clients x {result.messages_per_client} sends "
            f"(one-to-one and groups of {result.group_size}), load clients: {result.load_client}",
            f"  sends accepted        {result.sends}  (rate limited and retried: "
            f"{result.rate_limited})",
            f"  envelopes delivered   {result.delivered} of {result.expected} in "
            f"{result.seconds:.2f} s",
            f"  envelopes per second  {result.envelopes_per_second:.0f}  "
            f"(target {TARGET_ENVELOPES_PER_SECOND}: {'ok' if rate_ok else 'MISSED'})",
            f"  latency ms            p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  "
            f"p99 {lat['p99']:.1f}  (target p99 <= {TARGET_P99_MS:.0f}: "
            f"{'ok' if p99_ok else 'MISSED'})",
            f"  lost {result.lost}, duplicated {result.duplicated}  "
            f"({'ok' if exact else 'MISSED'})",
            f"  relay peak RSS {result.relay_peak_rss_mb:.1f} MiB, relay CPU "
            f"{result.relay_cpu_seconds:.2f} s, load generator CPU {result.load_cpu_seconds:.2f} s "
            "(during the sends)",
        ]
    )


# ------------------------------------------------------------------ command line


def add_relay_bench_command(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``hushchat bench relay``, under the bench command's parser."""
    parser = targets.add_parser(
        "relay",
        help="load a real relay (own process, SQLite) with many clients on loopback",
        description="Start a relay on loopback with its SQLite store and measure envelopes "
        "delivered per second, latency and exactly-once delivery under N clients. "
        "Exit status: 0, 1 if an envelope was lost or duplicated or the run could not "
        "start (the reason on stderr), 2 for bad arguments, 130 after Ctrl-C.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--clients",
        type=at_least(2, "at least 2 clients: each sends to the next"),
        default=DEFAULT_CLIENTS,
        help="connected clients",
    )
    parser.add_argument(
        "--messages", type=at_least(1), default=DEFAULT_MESSAGES, help="sends per client"
    )
    parser.add_argument(
        "--group-size", type=at_least(1), default=DEFAULT_GROUP_SIZE, help="clients per group"
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        help="bound on the run, in seconds",
    )
    parser.add_argument(
        "--db-dir",
        default=tempfile.gettempdir(),
        help="directory for the relay's temporary database (its file system's fsync cost "
        "bounds the relay)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.db_dir):
        print(f"hushchat bench relay: no such folder for --db-dir: {args.db_dir}", file=sys.stderr)
        return 1
    interrupted = False
    try:
        try:
            result = run_relay_bench(
                clients=args.clients,
                messages=args.messages,
                group_size=args.group_size,
                timeout=args.timeout,
                db_dir=args.db_dir,
            )
        except* KeyboardInterrupt:  # trio may raise it inside a group
            interrupted = True
    except RelayBenchError as exc:
        print(f"hushchat bench relay: {exc}", file=sys.stderr)
        return 1
    if interrupted:
        print("hushchat bench relay: interrupted; the relay was stopped", file=sys.stderr)
        return 130
    print(json.dumps(result.as_json(), indent=2) if args.json else render(result))
    return 0 if result.lost == 0 and result.duplicated == 0 else 1
