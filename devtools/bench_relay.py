"""``hushchat bench relay``: the real relay under load from many clients on loopback.

The relay is :func:`hushchat.transport.relay.server.serve_relay` with its default SQLite
store (WAL, ``synchronous=FULL``) in a temporary directory, running in a
process of its own (``multiprocessing``, spawned), so its CPU time and peak
memory (``getrusage`` in that process) are its own and the load generator
does not share its core. The load generator is this process: ``clients``
low-level :class:`~hushchat.transport.client.connection.RelayConnection` s (not the full
client library, which would add its own SQLite commit per message and
measure the client store rather than the relay), one user with one device
each, registered with a signed device list and authenticated. A client is
ready once the relay has set up its delivery (it says so by pushing
QueueEmpty); the run starts when every client is ready, so that the
connection storm of the clients' start is not measured as the load's
latency.

Every client sends ``messages`` payloads, one request at a time, alternating
one-to-one (to the next client) and group (to the other members of its group
of ``group_size`` consecutive clients; half of the clients start with each).
A payload is an opaque blob of :data:`PAYLOAD_SIZE` bytes (the size of a
real one-to-one message) naming its sender and sequence number. Each
recipient records when a payload arrives and acknowledges, in one ACK,
whatever arrived while its previous ACK waited for its reply (receiving
never waits for that reply); the relay answers an acknowledgement at once
and commits the deletion with its next batch (spec 7.8). Reported:

* envelopes delivered (acknowledged, each once: a duplicate is not counted)
  per second, from the first send to the last acknowledgement;
* latency from just before the send request (open loop: from its scheduled
  time) to the recipient's receipt, p50/p95/p99/p999. Receipt is the
  envelope's arrival on the recipient's connection; the receiver reads on
  while its ACK waits for its reply (which the relay sends only after the
  device's own request before it, a send once committed), as the client
  library (:class:`~hushchat.transport.client.client.Client`) does, where an
  app also waits for the library's own processing of each envelope;
* lost and duplicated envelopes (each expected delivery must arrive once),
  those pushed to a device they were not sent to (misdelivered) and those
  whose ACK was not answered by the run's end (unacknowledged);
* the relay's peak RSS and CPU time, and the load generator's CPU time.

That is the *burst* mode: each client keeps one send outstanding, so the
relay runs at its saturation rate and the latency is mostly the run's own
queue (Little's law). ``rate`` makes the load *open loop*, as wrk2 does it:
the sends are scheduled in advance at ``rate`` envelopes per second (each
send's envelopes take their share of the schedule, in rounds of every
client's next send), each goes at its scheduled time whether or not earlier
ones were answered (a client's requests overlap on its connection), and the
latency of an envelope runs from its send's *scheduled* time. A relay that
stalls cannot hide the queue that builds behind the stall (no coordinated
omission): the sends it delays count as late from when they were due.
Reported as well: the rate achieved (delivered envelopes over the time from
the first scheduled send to the last acknowledgement) and how late the load
generator itself sent (``send_lag_ms``; if it is large, the generator, not
the relay, was the bound). :func:`run_rate_sweep` measures the saturation
rate with a burst run, then runs open loop at fractions of it.

The relay's CPU time per delivered envelope (``relay_cpu_us_per_envelope``,
the relay process's user + system time during the load over the envelopes
delivered) is reported for every run: it is the figure that carries over to
other machines and loads, where envelopes per second depend on what else
runs.

On PostgreSQL (:class:`Databases`: ``--db postgres`` starts a throwaway
server, durable, with :func:`~hushchat.devtools.pgcluster.throwaway_cluster`
and gives each run a new database) ``relays`` relay processes share the
database, each with its own writer and listener connections, and the
clients are dealt out among them in turn (client ``i`` to relay ``i mod
relays``). An envelope whose sender and recipient are on different relays
reaches its recipient through the other relay's wake-up (PostgreSQL
NOTIFY); their latency is also reported apart (``cross_relay_latency_ms``).
The server's CPU time per envelope (``database_cpu_us_per_envelope``: the
postmaster and all its processes, from ``/proc``) is reported for a server
the benchmark started.

Each client sends at most ``messages`` requests and the whole run is bounded
by ``timeout`` seconds. The relay's send limit (60 requests at once, then 60
per second per connection) is the relay's own; a refused send waits as told
and is retried (counted as ``rate_limited``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from multiprocessing.connection import Connection
from typing import Any

import trio

from hushchat.protocol.devices import DeviceEntry, DeviceList
from hushchat.protocol.errors import ProtocolError
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.transport.client.connection import (
    RelayConnection,
    already_queued,
    connect_relay,
)
from hushchat.transport.relay.config import RelayConfig
from hushchat.transport.relay.server import freeze_startup_objects, serve_relay
from hushchat.transport.wire.errors import RateLimited, TransportError, first_leaf
from hushchat.transport.wire.frames import QueueEmpty
from hushchat.transport.wire.limits import MAX_IN_FLIGHT
from hushchat.transport.wire.records import Envelope

from .arguments import at_least, positive_seconds
from .pgcluster import ThrowawayCluster, throwaway_cluster

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
# Issue 20's open-loop target: p99 at half the saturation rate, on either backend.
TARGET_OPEN_LOOP_P99_MS = 50.0
# The fractions of the saturation rate a sweep runs at when none are given.
DEFAULT_SWEEP = (0.25, 0.5, 0.75, 0.9)
# Burst runs a sweep takes the saturation rate from (their median): one burst
# is a few seconds, and on a shared machine two back to back can differ by
# half (measured), so a single one may set the sweep's rates on a fast moment.
DEFAULT_SATURATION_RUNS = 3
# An open-loop schedule starts this long after the start signal, so that every
# client's scheduler is already waiting for its first send.
SCHEDULE_LEAD_SECONDS = 0.1
# Relay process start-up and shut-down bounds.
RELAY_START_TIMEOUT = 30.0
RELAY_STOP_TIMEOUT = 30.0

BURST = "burst"
OPEN_LOOP = "open loop"
SQLITE = "sqlite"
POSTGRESQL = "postgresql"
# The relay's PostgreSQL storage module, which needs the extra hushchat[postgres].
POSTGRES_STORAGE = "hushchat.transport.relay.storage.postgres"
# --db: the relay's SQLite store (a new file per run), or a throwaway PostgreSQL
# cluster the benchmark starts (a new database per run), or a PostgreSQL URL.
DB_CHOICES = (SQLITE, "postgres")


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
    # Envelopes pushed to a device they were not sent to.
    misdelivered: int = 0
    relay_peak_rss_mb: float = 0.0
    relay_cpu_seconds: float = 0.0
    load_cpu_seconds: float = 0.0
    load_client: str = "hushchat.transport.client.connection.RelayConnection"
    mode: str = BURST
    # Open loop only: the rate the sends were scheduled at, and how late they went.
    offered_rate: float | None = None
    send_lag_ms: dict[str, float] = field(default_factory=dict)
    database: str = SQLITE
    relays: int = 1
    # Envelopes whose sender and recipient were connected to different relays.
    cross_relay_envelopes: int = 0
    cross_relay_latency_ms: dict[str, float] = field(default_factory=dict)
    # The database server's processes (a cluster the benchmark started): None if unknown.
    database_cpu_seconds: float | None = None

    @property
    def unacknowledged(self) -> int:
        """Envelopes that arrived but whose ACK was not answered by the run's end (the
        relay would push them again)."""
        return self.expected - self.lost - self.delivered

    @property
    def exact(self) -> bool:
        """Every envelope arrived once, where it was sent, and was acknowledged."""
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.misdelivered == 0
            and self.unacknowledged == 0
        )

    @property
    def database_cpu_us_per_envelope(self) -> float | None:
        """The database server's CPU time during the load over the envelopes delivered."""
        if self.database_cpu_seconds is None or not self.delivered:
            return None
        return 1e6 * self.database_cpu_seconds / self.delivered

    @property
    def relay_cpu_us_per_envelope(self) -> float:
        """The relay's CPU time during the load over the envelopes delivered."""
        if not self.delivered:
            return math.nan
        return 1e6 * self.relay_cpu_seconds / self.delivered

    @property
    def achieved_fraction(self) -> float | None:
        """Open loop: the rate achieved over the rate offered."""
        if self.offered_rate is None:
            return None
        return self.envelopes_per_second / self.offered_rate

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("seconds", "envelopes_per_second", "relay_peak_rss_mb"):
            out[key] = _finite(round(out[key], 2))
        out["relay_cpu_seconds"] = _finite(round(self.relay_cpu_seconds, 3))
        out["load_cpu_seconds"] = _finite(round(self.load_cpu_seconds, 3))
        out["relay_cpu_us_per_envelope"] = _finite(round(self.relay_cpu_us_per_envelope, 1))
        out["unacknowledged"] = self.unacknowledged
        database_cpu = self.database_cpu_us_per_envelope
        if self.database_cpu_seconds is not None:
            out["database_cpu_seconds"] = _finite(round(self.database_cpu_seconds, 3))
        out["database_cpu_us_per_envelope"] = (
            None if database_cpu is None else _finite(round(database_cpu, 1))
        )
        if self.offered_rate is not None:
            out["offered_rate"] = round(self.offered_rate, 1)
        return out


def _finite(value: float) -> float | None:
    """JSON has no NaN: a figure that could not be measured is null."""
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------ the relay process


def _usage() -> tuple[int, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_maxrss, usage.ru_utime + usage.ru_stime


def _relay_config(database: str, key_file: str) -> RelayConfig:
    """A relay on a free loopback port over ``database`` (a SQLite path or a PostgreSQL URL)."""
    return RelayConfig(port=0, db_path=database, key_file=key_file)


def _relay_process(database: str, key_file: str, pipe: Connection) -> None:
    """Run a relay; answer "usage" with (peak RSS KiB, CPU seconds) until told to stop.

    Ctrl-C reaches every process of the terminal's group: the parent stops this
    one through the pipe, so it ignores SIGINT rather than die mid-answer.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # What goes wrong in a relay is said on stderr (the library is silent by default).
    logging.basicConfig(
        level=logging.WARNING, format=f"relay (pid {os.getpid()}): %(levelname)s %(message)s"
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_relay, _relay_config(database, key_file))
            freeze_startup_objects()  # as hushchat relay does
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

    def __init__(self, database: str, key_file: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(
            target=_relay_process, args=(database, key_file, child), daemon=True
        )
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


class Databases:
    """Where each run's relays keep their data.

    ``db``: ``"sqlite"`` (a new SQLite file per run, under ``db_dir``),
    ``"postgres"`` (a throwaway PostgreSQL cluster started here, under
    ``db_dir``, with a new database per run, whose server CPU time is
    measured) or a ``postgresql://`` URL (an empty database: every run of
    this benchmark on it, with one key file, the load's user names differing
    per run; its server's CPU is not measured).
    A context manager: the cluster, if any, is stopped and deleted on exit.
    """

    def __init__(self, db: str = SQLITE, db_dir: str | None = None) -> None:
        self.db = db
        self.db_dir = db_dir
        self.cluster: ThrowawayCluster | None = None
        self._stack = contextlib.ExitStack()
        self._databases = 0
        self._shared_keys: str | None = None
        if db != SQLITE and db != "postgres" and not _is_postgres_url(db):
            raise ValueError(f"unknown database {db!r}")
        self.kind = SQLITE if db == SQLITE else POSTGRESQL

    def __enter__(self) -> Databases:
        if self.kind == POSTGRESQL and find_spec(POSTGRES_STORAGE) is None:
            raise RelayBenchError("this relay has no PostgreSQL storage")
        if self.kind == POSTGRESQL and find_spec("psycopg") is None:
            raise RelayBenchError("PostgreSQL needs psycopg: pip install 'hushchat[postgres]'")
        if self.db == "postgres":
            try:
                self.cluster = self._stack.enter_context(
                    throwaway_cluster(durable=True, parent=self.db_dir)
                )
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                raise RelayBenchError(f"cannot start a PostgreSQL server: {exc}") from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cluster = None
        self._stack.close()

    def for_run(self, directory: str) -> tuple[str, str]:
        """The database a new run's relays use, and their key file (``directory``: the
        run's own folder). On a database given by URL every run shares one key file, as
        every run shares its queue (in a folder of its own, deleted on exit)."""
        if self.kind == SQLITE:
            return os.path.join(directory, "relay.db"), os.path.join(directory, "relay.keys")
        if self.cluster is not None:
            self._databases += 1
            try:
                database = self.cluster.create_database(f"bench{self._databases}")
            except Exception as exc:  # psycopg's, whose module is an optional extra
                raise RelayBenchError(f"cannot create a database: {exc}") from None
            return database, os.path.join(directory, "relay.keys")
        if self._shared_keys is None:
            keys = self._stack.enter_context(
                tempfile.TemporaryDirectory(prefix="hushchat-bench-keys-", dir=self.db_dir)
            )
            self._shared_keys = os.path.join(keys, "relay.keys")
        return self.db, self._shared_keys

    @property
    def cpu_seconds(self) -> Callable[[], float] | None:
        """The database server's CPU seconds so far, where it can be read."""
        return None if self.cluster is None else self.cluster.cpu_seconds


def _is_postgres_url(text: str) -> bool:
    return text.startswith(("postgresql://", "postgres://"))


# ------------------------------------------------------------------ the load


@dataclass(frozen=True, slots=True)
class _Plan:
    """Who sends what to whom."""

    clients: int
    messages: int
    group_size: int
    # Makes the user names of a run its own, for runs on one database.
    tag: str = ""

    def user(self, index: int) -> str:
        return f"load{self.tag}{index:05d}"

    def group_of(self, index: int) -> list[int]:
        """The other members of ``index``'s group (consecutive clients)."""
        start = index - index % self.group_size
        return [i for i in range(start, min(start + self.group_size, self.clients)) if i != index]

    def is_direct(self, sender: int, seq: int) -> bool:
        """Every other send of a client goes one-to-one, the others to its group (all of
        them one-to-one from a client alone in a group); at each sequence number, half
        of the clients send one-to-one."""
        return (sender + seq) % 2 == 0 or not self.group_of(sender)

    def recipients(self, sender: int, seq: int) -> list[int]:
        if self.is_direct(sender, seq):
            return [(sender + 1) % self.clients]
        return self.group_of(sender)

    def schedule(self, rate: float) -> dict[tuple[int, int], float]:
        """Each send's time in an open-loop run at ``rate`` envelopes per second, in
        seconds from the start: each send takes its envelopes' share of the time.

        Order: rounds of every client's next send, so that a client's sends are a
        round apart (a relay answers a connection's requests one at a time: two
        sends of one client back to back would measure the second waiting for the
        first's commit), and one-to-one and group sends alternate within each round.
        """
        offsets: dict[tuple[int, int], float] = {}
        envelopes = 0
        for seq in range(self.messages):
            for sender in range(self.clients):
                offsets[(sender, seq)] = envelopes / rate
                envelopes += len(self.recipients(sender, seq))
        return offsets


class _Load:
    """The bookkeeping of one run, shared by every client task (one trio thread)."""

    def __init__(self, plan: _Plan, rate: float | None = None, relays: int = 1) -> None:
        self.plan = plan
        self.rate = rate
        self.relays = relays
        self.ready = 0
        self.all_ready = trio.Event()
        self.start = trio.Event()
        self.all_in = trio.Event()
        self.all_acknowledged = trio.Event()
        # When each send went (open loop: when it was due): its envelopes' latency
        # runs from then.
        self.sent_at: dict[tuple[int, int], float] = {}
        self.received: Counter[tuple[int, int, int]] = Counter()
        self.latencies: list[float] = []
        self.cross_relay_latencies: list[float] = []
        self.send_lags: list[float] = []
        self.expected_by = [0] * plan.clients
        # (sender, seq, recipient) of every delivery the plan makes.
        self.deliveries: set[tuple[int, int, int]] = set()
        for sender in range(plan.clients):
            for seq in range(plan.messages):
                for recipient in plan.recipients(sender, seq):
                    self.expected_by[recipient] += 1
                    self.deliveries.add((sender, seq, recipient))
        self.unique_by = [0] * plan.clients
        self.complete = sum(1 for count in self.expected_by if count == 0)
        self.delivered = 0
        self.sends = 0
        self.rate_limited = 0
        self.first_send = math.inf
        self.last_ack = 0.0
        self._offsets = {} if rate is None else plan.schedule(rate)

    @property
    def expected(self) -> int:
        return sum(self.expected_by)

    def registered(self) -> None:
        self.ready += 1
        if self.ready == self.plan.clients:
            self.all_ready.set()

    def begin(self) -> None:
        """Start the run (open loop: fix every send's due time, from a moment just ahead)."""
        if self.rate is not None:
            start = time.perf_counter() + SCHEDULE_LEAD_SECONDS
            self.sent_at = {key: start + offset for key, offset in self._offsets.items()}
            self.first_send = start
        self.start.set()

    def relay_of(self, index: int) -> int:
        """The relay a client connects to: the clients are dealt out in turn."""
        return index % self.relays

    def due_times(self, sender: int) -> list[tuple[int, float]]:
        """Open loop: this client's sends (sequence number, due time), in order."""
        return [(seq, self.sent_at[(sender, seq)]) for seq in range(self.plan.messages)]

    def acknowledged(self, envelopes: int) -> None:
        """An ACK was answered, for this many envelopes that arrived for the first time."""
        self.delivered += envelopes
        self.last_ack = time.perf_counter()
        if self.delivered == self.expected:
            self.all_acknowledged.set()

    def arrived(self, sender: int, seq: int, recipient: int) -> bool:
        """Count an envelope; the first copy of each expected one sets its latency. Whether
        it was that (not a copy, nor one pushed to a device it was not for)."""
        key = (sender, seq, recipient)
        self.received[key] += 1
        if self.received[key] > 1 or key not in self.deliveries:
            return False
        latency = time.perf_counter() - self.sent_at[(sender, seq)]
        self.latencies.append(latency)
        if self.relay_of(sender) != self.relay_of(recipient):
            self.cross_relay_latencies.append(latency)
        self.unique_by[recipient] += 1
        if self.unique_by[recipient] == self.expected_by[recipient]:
            self.complete += 1
            if self.complete == self.plan.clients:
                self.all_in.set()
        return True


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


async def _until_queue_empty(connection: RelayConnection) -> None:
    """Wait until the relay has read the new device's (empty) mailbox and said so."""
    while not any(isinstance(item, QueueEmpty) for item in await connection.receive_batch()):
        pass


async def _client(load: _Load, index: int, ports: Sequence[int]) -> None:
    port = ports[load.relay_of(index)]
    async with connect_relay("127.0.0.1", port, keepalive_interval=None) as connection:
        await _register(connection, load.plan.user(index))
        await _until_queue_empty(connection)
        load.registered()
        await load.start.wait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_receive, load, index, connection)
            if load.rate is None:
                for seq in range(load.plan.messages):
                    await _send(load, index, connection, seq)
            else:
                await _send_scheduled(load, index, connection)


async def _send_scheduled(load: _Load, index: int, connection: RelayConnection) -> None:
    """Open loop: start each send at its due time, whether or not the earlier ones were
    answered (requests overlap on the connection); return once all were accepted."""
    async with trio.open_nursery() as sends:
        for seq, due in load.due_times(index):
            await trio.sleep(max(0.0, due - time.perf_counter()))
            sends.start_soon(_send, load, index, connection, seq, due)


async def _send(
    load: _Load, index: int, connection: RelayConnection, seq: int, due: float | None = None
) -> None:
    """Send one message (open loop: ``due`` when it was due); a rate-limited send waits
    as told and goes again."""
    if due is not None:
        load.send_lags.append(time.perf_counter() - due)
    plan = load.plan
    payload = _payload(index, seq)
    while True:
        now = time.perf_counter()
        if load.rate is None:
            load.sent_at[(index, seq)] = now
            load.first_send = min(load.first_send, now)
        try:
            if plan.is_direct(index, seq):
                peer = plan.user((index + 1) % plan.clients)
                await connection.send_direct(peer, [(1, payload)])
            else:
                group = [(plan.user(i), 1) for i in plan.group_of(index)]
                await connection.send_group(payload, group)
        except RateLimited as limited:
            load.rate_limited += 1
            await trio.sleep(max(limited.retry_after_ms, 1) / 1000)
            continue
        load.sends += 1
        return


async def _receive(load: _Load, index: int, connection: RelayConnection) -> None:
    """Record every envelope as it arrives; acknowledge in one ACK whatever arrived while
    the last ACK waited for its reply.

    The relay deletes them with its next batch commit. It answers a
    connection's requests one at a time, so an ACK's reply may wait for the
    client's own send before it (for its commit): receiving does not wait for
    it, or an envelope's latency would include that wait.
    """
    # What arrived together: its guids, and how many of them arrived for the first time.
    send_guids, receive_guids = trio.open_memory_channel[tuple[list[bytes], int]](MAX_IN_FLIGHT)

    async def acknowledge() -> None:
        async for guids, first in receive_guids:
            for more, more_first in already_queued(receive_guids):
                guids += more
                first += more_first
            # Every copy is acknowledged (the relay holds it in its window until then);
            # a duplicate is not delivered again, nor is the rate's end moved by it.
            await connection.ack(*dict.fromkeys(guids))
            if first:
                load.acknowledged(first)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(acknowledge)
        while True:
            envelopes = [
                item for item in await connection.receive_batch() if isinstance(item, Envelope)
            ]
            first = 0
            for envelope in envelopes:
                first += load.arrived(*_read_payload(envelope.payload), index)
            if envelopes:
                # At most a window of envelopes is pushed unacknowledged: never full.
                await send_guids.send(([envelope.guid for envelope in envelopes], first))


@dataclass(slots=True)
class _Usage:
    """CPU seconds during the load: the relays' (together), the load generator's, the
    database server's (None: not measured)."""

    relays: float = math.nan
    load: float = math.nan
    database: float | None = None


async def _run_load(
    load: _Load,
    relays: Sequence[_RelayProcess],
    timeout: float,
    database_cpu: Callable[[], float] | None,
) -> _Usage:
    """Run every client to completion (or ``timeout``); the CPU time used under load.
    RelayBenchError if ``timeout`` came before every client was ready.

    Ctrl-C (SIGINT) cancels the load as a whole and then raises
    KeyboardInterrupt: trio would otherwise raise it inside whichever task
    runs at that moment, where it can leave a coroutine half entered or end
    a connection that another task then finds closed.
    """
    usage = _Usage()
    interrupted = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT) as interrupts, trio.move_on_after(timeout):
        try:
            async with trio.open_nursery() as nursery:
                cancel_scope = nursery.cancel_scope
                nursery.start_soon(_cancel_on_interrupt, interrupts, interrupted, cancel_scope)
                await _load_in(nursery, load, relays, usage, database_cpu)
        except* (TransportError, ProtocolError):
            if not interrupted.is_set():
                raise  # the load failed on its own (a connection closed by the cancel is not)
    if interrupted.is_set():
        raise KeyboardInterrupt
    if not load.all_ready.is_set():
        # Nothing was sent: no envelope was lost, the run never started.
        raise RelayBenchError(
            f"{load.ready} of {load.plan.clients} clients were ready (their relay said "
            "QUEUE_EMPTY) when the run timed out"
        )
    return usage


async def _cancel_on_interrupt(
    interrupts: AsyncIterator[int], interrupted: trio.Event, scope: trio.CancelScope
) -> None:
    async for _ in interrupts:
        interrupted.set()
        scope.cancel()
        return


async def _load_in(
    nursery: trio.Nursery,
    load: _Load,
    relays: Sequence[_RelayProcess],
    usage: _Usage,
    database_cpu: Callable[[], float] | None,
) -> None:
    """Start every client in ``nursery``; measure the CPU time under load into ``usage``;
    end the run (cancelling ``nursery``) once every envelope arrived and was acknowledged
    and the drain ended."""
    ports = [relay.port for relay in relays]
    for index in range(load.plan.clients):
        nursery.start_soon(_client, load, index, ports)
    await load.all_ready.wait()
    # The load generator's own collections would count as the relay's latency (a
    # full one scans every object it holds: 50 ms pauses were measured mid-run), so
    # none runs during the run, as timeit does it; the run is bounded by its timeout.
    # Afterwards the collector is as the caller had it (a process that runs other things).
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        relays_before = sum(relay.usage()[1] for relay in relays)
        database_before = None if database_cpu is None else database_cpu()
        load_before = _usage()[1]
        load.begin()
        await load.all_in.wait()
        # Receivers read on while their ACKs wait: the run's end is the last reply.
        await load.all_acknowledged.wait()
        # Anything still coming now is a duplicate.
        await trio.sleep(DRAIN_SECONDS)
    finally:
        if collecting:
            gc.enable()
    usage.load = _usage()[1] - load_before
    usage.relays = sum(relay.usage()[1] for relay in relays) - relays_before
    if database_cpu is not None and database_before is not None:
        usage.database = database_cpu() - database_before
    nursery.cancel_scope.cancel()


PERCENTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99), ("p999", 0.999))


def _stop_all(relays: Sequence[_RelayProcess]) -> float:
    """Stop every relay, even if one fails to stop; their highest peak RSS in MiB."""
    peak_mb = 0.0
    failure: RelayBenchError | None = None
    for relay in relays:
        try:
            peak_mb = max(peak_mb, relay.stop()[0])
        except RelayBenchError as exc:
            failure = exc
    if failure is not None:
        raise failure
    return peak_mb


def _percentiles(samples: Sequence[float]) -> dict[str, float]:
    """Nearest-rank percentiles of ``samples`` (seconds), in milliseconds."""
    if not samples:
        return {name: math.nan for name, _ in PERCENTILES}
    ordered = sorted(samples)
    return {
        name: round(1000 * ordered[max(0, math.ceil(q * len(ordered)) - 1)], 2)
        for name, q in PERCENTILES
    }


def run_relay_bench(
    *,
    clients: int = DEFAULT_CLIENTS,
    messages: int = DEFAULT_MESSAGES,
    group_size: int = DEFAULT_GROUP_SIZE,
    timeout: float = DEFAULT_TIMEOUT,
    db_dir: str | None = None,
    rate: float | None = None,
    relays: int = 1,
    databases: Databases | None = None,
) -> RelayLoadResult:
    """Start ``relays`` relay processes on one database, run the load against them,
    stop them; what was measured.

    ``rate``: open loop at that many envelopes per second (None: burst).
    ``databases``: where the relays keep their data (default: a SQLite file).
    A run's files (SQLite database, the relays' key file) go in a new
    temporary directory under ``db_dir`` (default: the system's).
    """
    if clients < 2 or messages < 1 or group_size < 1 or relays < 1:
        raise ValueError("at least 2 clients, 1 message each, groups of at least 1, 1 relay")
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ValueError("an open-loop rate is a number of envelopes per second above 0")
    databases = databases or Databases(SQLITE, db_dir)
    if relays > 1 and databases.kind != POSTGRESQL:
        raise ValueError("several relays share one PostgreSQL database: --db postgres")
    plan = _Plan(clients, messages, group_size, tag=os.urandom(3).hex())
    load = _Load(plan, rate, relays)
    with tempfile.TemporaryDirectory(prefix="hushchat-bench-", dir=db_dir) as directory:
        database, key_file = databases.for_run(directory)
        started: list[_RelayProcess] = []
        peak_mb = 0.0
        failure: BaseException | None = None
        usage = _Usage()
        try:
            for _ in range(relays):
                started.append(_RelayProcess(database, key_file))
            try:
                usage = trio.run(_run_load, load, started, timeout, databases.cpu_seconds)
            except* (TransportError, ProtocolError) as group:
                failure = first_leaf(group)
        finally:
            peak_mb = _stop_all(started)
        if failure is not None:
            raise RelayBenchError(f"a load client failed: {failure!r}")
    received = set(load.received)
    expected = load.expected
    misdelivered = len(received - load.deliveries)
    seconds = load.last_ack - load.first_send if load.delivered else math.nan
    return RelayLoadResult(
        clients=clients,
        messages_per_client=messages,
        group_size=group_size,
        sends=load.sends,
        expected=expected,
        delivered=load.delivered,
        lost=len(load.deliveries - received),
        duplicated=sum(load.received.values()) - len(received),
        rate_limited=load.rate_limited,
        seconds=seconds,
        envelopes_per_second=load.delivered / seconds if load.delivered else 0.0,
        latency_ms=_percentiles(load.latencies),
        misdelivered=misdelivered,
        relay_peak_rss_mb=peak_mb,
        relay_cpu_seconds=usage.relays,
        load_cpu_seconds=usage.load,
        mode=BURST if rate is None else OPEN_LOOP,
        offered_rate=rate,
        send_lag_ms=_percentiles(load.send_lags) if rate is not None else {},
        database=databases.kind,
        relays=relays,
        cross_relay_envelopes=len(load.cross_relay_latencies),
        cross_relay_latency_ms=(
            _percentiles(load.cross_relay_latencies) if load.cross_relay_latencies else {}
        ),
        database_cpu_seconds=usage.database,
    )


@dataclass(slots=True)
class RateSweep:
    """Burst runs (the saturation rate: their median), then open-loop runs at fractions of it."""

    bursts: list[RelayLoadResult]
    fractions: tuple[float, ...]
    runs: list[RelayLoadResult]
    # Why the sweep stopped before its last fraction, if it did.
    failure: str | None = None

    @property
    def saturation(self) -> RelayLoadResult:
        """The median burst (of an even number, the faster middle one: a sweep never runs
        below its fractions of the median)."""
        return sorted(self.bursts, key=lambda burst: burst.envelopes_per_second)[
            len(self.bursts) // 2
        ]

    @property
    def exact(self) -> bool:
        """Whether every run happened and delivered every envelope exactly once."""
        return self.failure is None and all(r.exact for r in (*self.bursts, *self.runs))

    def as_json(self) -> dict[str, Any]:
        return {
            "saturation": self.saturation.as_json(),
            "bursts": [burst.as_json() for burst in self.bursts],
            "fractions": list(self.fractions),
            "runs": [run.as_json() for run in self.runs],
            "failure": self.failure,
        }


def run_rate_sweep(
    fractions: Sequence[float],
    *,
    saturation_runs: int = DEFAULT_SATURATION_RUNS,
    **options: Any,
) -> RateSweep:
    """Measure the saturation rate (the median of ``saturation_runs`` burst runs), then
    run open loop at each fraction of it; ``options`` are :func:`run_relay_bench`'s,
    each run on a new relay."""
    if not fractions or not all(math.isfinite(f) and f > 0 for f in fractions):
        raise ValueError("a sweep runs at one or more fractions of the saturation rate above 0")
    if saturation_runs < 1:
        raise ValueError("a sweep measures the saturation rate with at least one burst run")
    bursts = [run_relay_bench(**options) for _ in range(saturation_runs)]
    sweep = RateSweep(bursts, tuple(fractions), [])
    saturation = sweep.saturation.envelopes_per_second
    if not saturation > 0:
        raise RelayBenchError("the burst runs delivered nothing: no saturation rate to sweep")
    for fraction in fractions:
        try:
            sweep.runs.append(run_relay_bench(rate=fraction * saturation, **options))
        except RelayBenchError as exc:
            # The runs done so far are reported, and why the sweep stopped.
            sweep.failure = f"the run at {fraction:g} of the saturation rate failed: {exc}"
            break
    return sweep


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def render(result: RelayLoadResult) -> str:
    """The human-readable report, each figure beside its target."""
    lat = result.latency_ms
    if result.offered_rate is None:
        rate_ok = result.envelopes_per_second >= TARGET_ENVELOPES_PER_SECOND
        p99_ok = lat["p99"] <= TARGET_P99_MS
        head = [
            f"relay bench (burst): {_setup(result)}",
            f"  sends accepted        {result.sends}  (rate limited and retried: "
            f"{result.rate_limited})",
            f"  envelopes delivered   {result.delivered} of {result.expected} in "
            f"{result.seconds:.2f} s",
            f"  envelopes per second  {result.envelopes_per_second:.0f}  "
            f"(target {TARGET_ENVELOPES_PER_SECOND}: {_verdict(rate_ok)})",
            f"  latency ms            {_render_percentiles(lat)}  (target p99 <= "
            f"{TARGET_P99_MS:.0f}: {_verdict(p99_ok)})",
        ]
    else:
        lag = result.send_lag_ms
        head = [
            f"relay bench (open loop at {result.offered_rate:.0f} envelopes/s offered): "
            f"{_setup(result)}",
            f"  sends accepted        {result.sends}  (rate limited and retried: "
            f"{result.rate_limited})",
            f"  envelopes delivered   {result.delivered} of {result.expected} in "
            f"{result.seconds:.2f} s",
            f"  envelopes per second  {result.envelopes_per_second:.0f} achieved of "
            f"{result.offered_rate:.0f} offered ({100 * (result.achieved_fraction or 0):.0f}%)",
            f"  latency ms            {_render_percentiles(lat)}  (from each send's scheduled "
            f"time; target p99 <= {TARGET_OPEN_LOOP_P99_MS:.0f} at half the saturation rate)",
            f"  send lag ms           p50 {lag['p50']:.1f}  p99 {lag['p99']:.1f}  (how late the "
            "load generator started sends; large means it, not the relay, was the bound)",
        ]
    others = [
        f", {name} {count}"
        for name, count in (
            ("misdelivered", result.misdelivered),
            ("unacknowledged", result.unacknowledged),
        )
        if count
    ]
    tail = [
        f"  lost {result.lost}, duplicated {result.duplicated}{''.join(others)}  "
        f"({_verdict(result.exact)})"
    ]
    if result.relays > 1:
        cross = result.cross_relay_latency_ms
        tail.append(
            f"  cross-relay latency   {_render_percentiles(cross) if cross else 'none'}  "
            f"({result.cross_relay_envelopes} envelopes between clients of different relays)"
        )
    relays = "relay" if result.relays == 1 else f"{result.relays} relays together"
    tail.append(
        f"  relay CPU per envelope {result.relay_cpu_us_per_envelope:.0f} µs "
        f"({relays}: {result.relay_cpu_seconds:.2f} s for {result.delivered} envelopes)"
    )
    database_cpu = result.database_cpu_us_per_envelope
    if database_cpu is not None and result.database_cpu_seconds is not None:
        tail.append(
            f"  database CPU per envelope {database_cpu:.0f} µs (the PostgreSQL server's "
            f"processes: {result.database_cpu_seconds:.2f} s)"
        )
    tail.append(
        f"  relay peak RSS {result.relay_peak_rss_mb:.1f} MiB, load generator CPU "
        f"{result.load_cpu_seconds:.2f} s (during the sends)"
    )
    return "\n".join([*head, *tail])


def _setup(result: RelayLoadResult) -> str:
    """What ran: clients, sends, groups, database and relays."""
    database = "SQLite" if result.database == SQLITE else "PostgreSQL"
    relays = "1 relay" if result.relays == 1 else f"{result.relays} relays"
    return (
        f"{result.clients} clients x {result.messages_per_client} sends (one-to-one and groups "
        f"of {result.group_size}), {relays} on {database}, load clients: {result.load_client}"
    )


def _render_percentiles(latency: dict[str, float]) -> str:
    return "  ".join(f"{name} {latency[name]:.1f}" for name, _ in PERCENTILES)


def render_sweep(sweep: RateSweep) -> str:
    """The sweep as a table: latency at each fraction of the saturation rate."""
    saturation = sweep.saturation
    bursts = ", ".join(f"{burst.envelopes_per_second:.0f}" for burst in sweep.bursts)
    lines = [
        render(saturation),
        "",
        f"saturation rate: the median of {len(sweep.bursts)} burst runs ({bursts} "
        "envelopes/s), whose report is above",
        f"rate sweep: open loop at fractions of the saturation rate "
        f"({saturation.envelopes_per_second:.0f} envelopes/s), a new relay for each run; "
        "latency from each send's scheduled time",
        "  fraction  offered/s  achieved/s   p50 ms   p99 ms  p999 ms  lost  dup  "
        "relay µs/env  db µs/env",
    ]
    for fraction, run in zip(sweep.fractions[: len(sweep.runs)], sweep.runs, strict=True):
        lat = run.latency_ms
        database_cpu = run.database_cpu_us_per_envelope
        lines.append(
            f"  {fraction:8.2f}  {run.offered_rate or 0:9.0f}  {run.envelopes_per_second:10.0f}"
            f"  {lat['p50']:7.1f}  {lat['p99']:7.1f}  {lat['p999']:7.1f}  {run.lost:4d}"
            f"  {run.duplicated:3d}  {run.relay_cpu_us_per_envelope:12.0f}"
            f"  {'-' if database_cpu is None else f'{database_cpu:.0f}':>9}"
        )
    if sweep.failure is not None:
        lines.append(f"  stopped: {sweep.failure}")
    return "\n".join(lines)


# ------------------------------------------------------------------ command line


def _rate(text: str) -> float:
    """An argparse type: envelopes per second, above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of envelopes per second"
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a rate above 0 envelopes per second")
    return value


def _fractions(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated fractions of the saturation rate, each above 0."""
    values: list[float] = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} is not a fraction (give them as 0.25,0.5,0.9)"
            ) from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{part.strip()} is not a fraction above 0")
        values.append(value)
    return tuple(values)


def _database(text: str) -> str:
    """An argparse type: sqlite, postgres, or a PostgreSQL URL."""
    if text in DB_CHOICES or _is_postgres_url(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not sqlite, postgres or a postgresql:// URL")


def add_relay_bench_command(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``hushchat bench relay``, under the bench command's parser."""
    parser = targets.add_parser(
        "relay",
        help="load real relays (own processes, SQLite or PostgreSQL) with many clients on loopback",
        description="Start a relay on loopback with its SQLite store (or N relays on one "
        "PostgreSQL database) and measure envelopes delivered per second, latency, the "
        "relays' (and a PostgreSQL server's) CPU time per envelope and exactly-once "
        "delivery under N clients. Burst by default (each client keeps one send "
        "outstanding: the saturation rate); --rate for an open-loop load at a fixed "
        "offered rate, --rate-sweep for open-loop runs at fractions of the saturation rate "
        "(the median of --saturation-runs bursts). "
        "Exit status: 0, 1 if an envelope was lost, duplicated, misdelivered or left "
        "unacknowledged or the run could not start (the reason on stderr), 2 for bad "
        "arguments, 130 after Ctrl-C.",
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
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--rate",
        type=_rate,
        default=None,
        metavar="R",
        help="open loop: schedule the sends at R envelopes per second and measure latency "
        "from each send's scheduled time (default: burst)",
    )
    load.add_argument(
        "--rate-sweep",
        type=_fractions,
        nargs="?",
        const=DEFAULT_SWEEP,
        default=None,
        metavar="F,F,...",
        help="a burst run for the saturation rate, then open-loop runs at these fractions of "
        f"it (without a value: {','.join(str(f) for f in DEFAULT_SWEEP)})",
    )
    parser.add_argument(
        "--saturation-runs",
        type=at_least(1, "at least 1 burst run: the saturation rate is their median"),
        default=argparse.SUPPRESS,
        metavar="N",
        help="with --rate-sweep: burst runs whose median is the saturation rate (default: "
        f"{DEFAULT_SATURATION_RUNS})",
    )
    parser.add_argument(
        "--db",
        type=_database,
        default=SQLITE,
        metavar="{sqlite,postgres,postgresql://...}",
        help="the relays' database: SQLite (a new file per run), postgres (a throwaway "
        "PostgreSQL cluster started here under --db-dir, a new database per run, its CPU "
        "time measured) or the URL of a PostgreSQL database (its CPU time not measured)",
    )
    parser.add_argument(
        "--relays",
        type=at_least(1),
        default=1,
        help="relay processes on the one database, the clients dealt out among them in turn "
        "(more than 1: PostgreSQL only)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        help="bound on each run, in seconds",
    )
    parser.add_argument(
        "--db-dir",
        default=tempfile.gettempdir(),
        help="directory for each run's temporary files: the SQLite database, the relays' "
        "key file, a throwaway PostgreSQL cluster (its file system's fsync cost bounds the "
        "relay)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.db_dir):
        print(f"hushchat bench relay: no such folder for --db-dir: {args.db_dir}", file=sys.stderr)
        return 1
    if args.relays > 1 and args.db == SQLITE:
        print(
            "hushchat bench relay: several relays share one PostgreSQL database: add --db "
            "postgres (a throwaway cluster) or --db postgresql://...",
            file=sys.stderr,
        )
        return 2
    saturation_runs = getattr(args, "saturation_runs", None)
    if saturation_runs is not None and args.rate_sweep is None:
        print(
            "hushchat bench relay: --saturation-runs sets the bursts of a --rate-sweep",
            file=sys.stderr,
        )
        return 2
    interrupted = False
    outcome: RelayLoadResult | RateSweep | None = None
    try:
        try:
            with Databases(args.db, args.db_dir) as databases:
                options: dict[str, Any] = {
                    "clients": args.clients,
                    "messages": args.messages,
                    "group_size": args.group_size,
                    "timeout": args.timeout,
                    "db_dir": args.db_dir,
                    "relays": args.relays,
                    "databases": databases,
                }
                if args.rate_sweep is not None:
                    outcome = run_rate_sweep(
                        args.rate_sweep,
                        saturation_runs=saturation_runs or DEFAULT_SATURATION_RUNS,
                        **options,
                    )
                else:
                    outcome = run_relay_bench(rate=args.rate, **options)
        except KeyboardInterrupt:
            interrupted = True
        except BaseExceptionGroup as group:
            # Ctrl-C reaches the relay and the clients too: trio may raise it in a
            # group beside what they met meanwhile (a connection closed mid-ack).
            if group.subgroup(KeyboardInterrupt) is None:
                raise
            interrupted = True
    except RelayBenchError as exc:
        print(f"hushchat bench relay: {exc}", file=sys.stderr)
        return 1
    if interrupted or outcome is None:
        print("hushchat bench relay: interrupted; the relay was stopped", file=sys.stderr)
        return 130
    if isinstance(outcome, RateSweep):
        print(json.dumps(outcome.as_json(), indent=2) if args.json else render_sweep(outcome))
        return 0 if outcome.exact else 1
    print(json.dumps(outcome.as_json(), indent=2) if args.json else render(outcome))
    return 0 if outcome.exact else 1
