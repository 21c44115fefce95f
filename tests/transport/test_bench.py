"""``hushchat bench``: the benchmarks run, with tiny counts, and report the documented shape.

Nothing here asserts a time: the figures depend on the machine. What is
checked is that every operation is reported with its floor, that sizes are
reported, and that the relay load delivers everything exactly once.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from hushchat.devtools import bench, bench_relay, pgcluster
from hushchat.transport import cli
from hushchat.transport.client.connection import RelayConnection
from hushchat.transport.wire.records import Envelope, EnvelopeKind

OPERATIONS = {
    "pqxdh_complete",
    "x3dh_complete",
    "ratchet_stream",
    "ratchet_ping_pong",
    "sender_key_encrypt",
    "sender_key_decrypt",
    "group_send_3",
    "group_send_4",
    "group_send_after_removal_3",
    "session_record_save",
    "session_record_load",
    "group_state_save",
    "group_state_load",
}


def test_protocol_bench_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--json", "--repeats", "1", "--group-sizes", "3,4"]
    assert cli.main([*argv, "--removal-group-size", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == OPERATIONS | {"bytes"}
    for name in OPERATIONS:
        figures = report[name]
        assert set(figures) == {"us", "floor_us", "ratio"}, name
        assert figures["us"] > 0 and figures["floor_us"] > 0, name
        assert figures["ratio"] == pytest.approx(figures["us"] / figures["floor_us"], rel=0.02)
    sizes = report["bytes"]
    assert all(isinstance(size, int) and size > 0 for size in sizes.values())
    # Sizes do not depend on the machine: a 100-byte plaintext, small counters.
    assert sizes["one_to_one_message"] == 100 + sizes["one_to_one_added"]
    assert sizes["one_to_one_message"] <= bench.LIBSIGNAL_ONE_TO_ONE_BYTES
    assert sizes["group_message"] <= bench.LIBSIGNAL_GROUP_BYTES
    assert sizes["session_record"] <= bench.SESSION_RECORD_TARGET_BYTES


def test_the_text_report_names_every_operation_and_target() -> None:
    results = bench.run_protocol_bench(repeats=1, group_sizes=(3,), removal_group_size=3)
    text = bench.render(results)
    for name in OPERATIONS - {"group_send_4"}:
        assert name in text
    assert "one_to_one_added" in text and "libsignal" in text


def test_measure_takes_medians_of_operation_and_floor() -> None:
    calls = {"op": 0, "floor": 0, "prepare": 0}

    def count(key: str) -> None:
        calls[key] += 1

    case = bench.Case(
        "count",
        lambda: count("op"),
        lambda: count("floor"),
        number=4,
        prepare=lambda: count("prepare"),
    )
    timing = bench.measure(case, repeats=3)
    # One warm-up batch and three timed ones, each of 4 calls; prepare before each.
    assert calls == {"op": 16, "floor": 16, "prepare": 4}
    assert timing.ratio == timing.us / timing.floor_us


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["bench", "--group-sizes", "1"], "at least 2 members"),
        (["bench", "--repeats", "0"], "0 is less than 1"),
        (["bench", "--repeats", "many"], "'many' is not a whole number"),
        (["bench", "--removal-group-size", "1"], "at least 2 members"),
        (["bench", "relay", "--clients", "0"], "at least 2 clients"),
        (["bench", "relay", "--messages", "0"], "0 is less than 1"),
        (["bench", "relay", "--group-size", "0"], "0 is less than 1"),
        (["bench", "relay", "--timeout", "0"], "0 is not above 0 seconds"),
        (["bench", "relay", "--rate", "0"], "0 is not a rate above 0 envelopes per second"),
        (["bench", "relay", "--rate", "-5"], "-5 is not a rate above 0"),
        (["bench", "relay", "--rate", "nan"], "nan is not a rate above 0"),
        (["bench", "relay", "--rate", "fast"], "'fast' is not a number of envelopes per second"),
        (["bench", "relay", "--rate-sweep", "0.5,x"], "'x' is not a fraction"),
        (["bench", "relay", "--rate-sweep", "0.5,0"], "0 is not a fraction above 0"),
        (["bench", "relay", "--rate", "100", "--rate-sweep"], "not allowed with argument --rate"),
        (["bench", "relay", "--rate-sweep", "--saturation-runs", "0"], "at least 1 burst run"),
        (["bench", "relay", "--db", "mysql://x"], "is not sqlite, postgres or a postgresql://"),
        (["bench", "relay", "--relays", "0"], "0 is less than 1"),
    ],
)
def test_bench_arguments_are_usage_errors(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and err.startswith("usage: hushchat bench")


def test_bench_relay_needs_an_existing_db_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "relay", "--db-dir", "/nonexistent"]) == 1
    assert capsys.readouterr().err == (
        "hushchat bench relay: no such folder for --db-dir: /nonexistent\n"
    )


def test_several_relays_need_postgresql(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "relay", "--relays", "2"]) == 2
    assert capsys.readouterr().err == (
        "hushchat bench relay: several relays share one PostgreSQL database: add --db "
        "postgres (a throwaway cluster) or --db postgresql://...\n"
    )


def test_saturation_runs_go_with_a_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "relay", "--saturation-runs", "5"]) == 2
    assert capsys.readouterr().err == (
        "hushchat bench relay: --saturation-runs sets the bursts of a --rate-sweep\n"
    )


def test_bench_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, defaults in [
        (["bench", "--help"], ["9", "10,100,1000", "100"]),
        (["bench", "relay", "--help"], ["200", "10", "300.0", "3"]),
    ]:
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = " ".join(capsys.readouterr().out.split())
        for default in defaults:
            assert f"(default: {default})" in out, (argv, default)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


def test_ctrl_c_stops_the_relay_bench_in_one_line(tmp_path: Path) -> None:
    # A run far longer than the test; Ctrl-C reaches the whole process group, as
    # from a terminal, once the relay process is up.
    argv = ["bench", "relay", "--clients", "50", "--messages", "2000", "--timeout", "120"]
    bench_process = subprocess.Popen(
        [sys.executable, "-m", "hushchat.transport.cli", *argv, "--db-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob("hushchat-bench-*/relay.db")):
            assert time.monotonic() < deadline and bench_process.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)  # the clients connect
        assert children(bench_process.pid)
        os.killpg(bench_process.pid, signal.SIGINT)
        out, err = bench_process.communicate(timeout=60)
    finally:
        if bench_process.poll() is None:
            os.killpg(bench_process.pid, signal.SIGKILL)
            bench_process.wait()
    assert bench_process.returncode == 130, err
    assert err == "hushchat bench relay: interrupted; the relay was stopped\n"
    assert out == "" and list(tmp_path.iterdir()) == []


def test_relay_plan_sends_one_to_one_and_to_groups() -> None:
    plan = bench_relay._Plan(clients=5, messages=4, group_size=3)
    assert plan.recipients(0, 0) == [1] and plan.recipients(4, 2) == [0]
    assert plan.recipients(0, 1) == [1, 2] and plan.recipients(4, 1) == [3]
    load = bench_relay._Load(plan)
    # Per sender: 2 direct (1 each) + 2 group sends (to 2, 2, 1, 2, 1 others).
    assert load.expected == 5 * 2 + 2 * (2 + 2 + 2 + 1 + 1)


def test_relay_bench_delivers_everything_once(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "relay", "--clients", "4", "--messages", "4", "--group-size", "3"]
    assert cli.main([*argv, "--timeout", "60", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clients"] == 4 and report["sends"] == 16
    # Clients 0-2 (a group): 2 one-to-one and 2 group sends to 2 others; client 3,
    # alone in its group, sends all 4 one-to-one.
    assert report["delivered"] == report["expected"] == 3 * (2 + 2 * 2) + 4
    assert report["lost"] == 0 and report["duplicated"] == 0
    assert set(report["latency_ms"]) == {"p50", "p95", "p99", "p999"}
    assert report["envelopes_per_second"] > 0 and report["relay_peak_rss_mb"] > 0
    assert report["load_client"] == "hushchat.transport.client.connection.RelayConnection"
    assert report["mode"] == "burst" and report["offered_rate"] is None
    assert report["relay_cpu_us_per_envelope"] > 0
    assert gc.isenabled()  # off during the run only (the load generator's collections)


def test_open_loop_schedule_spreads_the_envelopes_evenly() -> None:
    plan = bench_relay._Plan(clients=5, messages=3, group_size=3)
    offsets = plan.schedule(rate=10.0)
    assert set(offsets) == {(sender, seq) for sender in range(5) for seq in range(3)}
    # Rounds of every client's next send: a client's sends are a round apart (its
    # relay would answer the second only after the first committed), and one-to-one
    # and group sends alternate within a round.
    order = sorted(offsets, key=offsets.__getitem__)
    assert order == [(sender, seq) for seq in range(3) for sender in range(5)]
    assert [plan.is_direct(sender, 0) for sender in range(4)] == [True, False, True, False]
    # Each send is due when the envelopes scheduled before it have had their time.
    envelopes = 0
    for key in order:
        assert offsets[key] == pytest.approx(envelopes / 10.0)
        envelopes += len(plan.recipients(*key))
    assert envelopes == bench_relay._Load(plan).expected


class _HeldAcks:
    """A relay connection for the load's receiver: pushes what the test gives it; each
    ACK's reply waits until the test lets it through. It has the two methods of
    RelayConnection that the receiver calls, and stands in for one (cast)."""

    def __init__(self) -> None:
        self.pushes, self._pushed = trio.open_memory_channel[list[object]](10)
        self.acks: list[tuple[bytes, ...]] = []
        self.reply = trio.Event()

    async def receive_batch(self) -> list[object]:
        return await self._pushed.receive()

    async def ack(self, *guids: bytes) -> None:
        self.acks.append(guids)
        await self.reply.wait()
        self.reply = trio.Event()


def _pushed(sender: int, seq: int) -> Envelope:
    payload = bench_relay._payload(sender, seq)
    return Envelope(bytes([sender, seq]) * 8, 0, "someone", 1, EnvelopeKind.DIRECT, payload)


async def test_the_load_records_arrivals_while_an_ack_waits_for_its_reply() -> None:
    """An ACK's reply can wait behind the receiver's own send at its relay: the envelopes
    that arrive meanwhile are recorded as they come, and acknowledged together next."""
    plan = bench_relay._Plan(clients=2, messages=2, group_size=1)
    load = bench_relay._Load(plan)
    load.sent_at = {(0, 0): 0.0, (0, 1): 0.0}
    connection = _HeldAcks()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bench_relay._receive, load, 1, cast(RelayConnection, connection))
        await connection.pushes.send([_pushed(0, 0)])
        await wait_all_tasks_blocked()
        assert connection.acks == [(_pushed(0, 0).guid,)]  # its reply not yet come
        await connection.pushes.send([_pushed(0, 1)])
        await wait_all_tasks_blocked()
        assert load.received[(0, 1, 1)] == 1  # recorded, the first ACK still waiting
        assert len(connection.acks) == 1 and load.delivered == 0
        connection.reply.set()
        await wait_all_tasks_blocked()
        assert connection.acks[1:] == [(_pushed(0, 1).guid,)] and load.delivered == 1
        connection.reply.set()
        await wait_all_tasks_blocked()
        assert load.delivered == 2
        nursery.cancel_scope.cancel()


async def test_the_load_counts_an_envelope_pushed_twice_as_delivered_once() -> None:
    """A relay that pushes an envelope twice is caught as a duplicate; each copy is
    acknowledged (the relay holds it in its window until then), but the envelope is
    delivered once: counting the copies would raise the rate the run reports."""
    plan = bench_relay._Plan(clients=2, messages=1, group_size=1)
    load = bench_relay._Load(plan)
    load.sent_at = {(0, 0): 0.0}
    guid = _pushed(0, 0).guid
    connection = _HeldAcks()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bench_relay._receive, load, 1, cast(RelayConnection, connection))
        await connection.pushes.send([_pushed(0, 0), _pushed(0, 0)])
        await wait_all_tasks_blocked()
        connection.reply.set()
        await wait_all_tasks_blocked()
        acknowledged = load.last_ack
        await connection.pushes.send([_pushed(0, 0)])  # once more, later
        await wait_all_tasks_blocked()
        connection.reply.set()
        await wait_all_tasks_blocked()
        assert connection.acks == [(guid,), (guid,)] and load.received[(0, 0, 1)] == 3
        assert load.delivered == 1 and load.last_ack == acknowledged > 0
        nursery.cancel_scope.cancel()


def test_relay_bench_leaves_the_collector_as_it_found_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The load generator collects nothing during a run: afterwards the collector is as
    the caller had it (here: off), not switched on behind its back."""
    argv = ["bench", "relay", "--clients", "2", "--messages", "1", "--timeout", "60"]
    gc.disable()
    try:
        assert cli.main([*argv, "--json"]) == 0
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert json.loads(capsys.readouterr().out)["lost"] == 0


def test_a_run_whose_clients_never_get_ready_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A relay that never says QUEUE_EMPTY keeps its clients from being ready until the
    run's timeout: the run says so, rather than report every envelope lost by it."""

    async def never(connection: object) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(bench_relay, "_until_queue_empty", never)
    argv = ["bench", "relay", "--clients", "2", "--messages", "1", "--timeout", "2"]
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "hushchat bench relay: 0 of 2 clients were ready (their relay said QUEUE_EMPTY) "
        "when the run timed out\n"
    )


def test_a_run_whose_acks_go_unanswered_is_not_exact(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The receiver reads on while its ACK waits for its reply, so every envelope can
    arrive with no ACK answered: the relay would push them all again, and none counts
    as delivered. Such a run fails (exit status 1), however many arrived."""

    async def unanswered(self: RelayConnection, *guids: bytes) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(RelayConnection, "ack", unanswered)
    argv = ["bench", "relay", "--clients", "2", "--messages", "2", "--timeout", "3"]
    assert cli.main([*argv, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["expected"] == 4 and report["lost"] == 0 and report["duplicated"] == 0
    assert report["delivered"] == 0 and report["unacknowledged"] == 4


def test_a_run_ends_once_every_ack_was_answered(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ACK's reply can come after the last envelope arrived and after the drain
    that follows (here the drain is 0 and every reply late): the run waits for it, so
    the envelopes count as delivered and the rate runs to the last acknowledgement."""
    answer = RelayConnection.ack

    async def late(self: RelayConnection, *guids: bytes) -> None:
        await trio.sleep(0.2)
        await answer(self, *guids)

    monkeypatch.setattr(RelayConnection, "ack", late)
    monkeypatch.setattr(bench_relay, "DRAIN_SECONDS", 0.0)
    argv = ["bench", "relay", "--clients", "2", "--messages", "2", "--timeout", "60"]
    assert cli.main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["delivered"] == report["expected"] == 4 and report["unacknowledged"] == 0


def test_an_envelope_pushed_to_the_wrong_device_is_not_counted_as_delivered(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three clients each send one envelope to the next (0 to 1, 1 to 2, 2 to 0); here
    what reaches client 1 is taken for client 2's, as if the relay had pushed client 0's
    envelope to the wrong device. That envelope is misdelivered and client 1's lost: the
    arrivals are as many as expected, but not the ones expected."""
    receive = bench_relay._receive

    async def mixed_up(load: bench_relay._Load, index: int, connection: RelayConnection) -> None:
        await receive(load, 2 if index == 1 else index, connection)

    monkeypatch.setattr(bench_relay, "_receive", mixed_up)
    argv = ["bench", "relay", "--clients", "3", "--messages", "1", "--group-size", "1"]
    assert cli.main([*argv, "--timeout", "4", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["expected"] == 3 and report["delivered"] == 2
    assert report["lost"] == 1 and report["misdelivered"] == 1 and report["duplicated"] == 0


def test_open_loop_run_delivers_everything_once(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "relay", "--clients", "4", "--messages", "4", "--group-size", "3"]
    assert cli.main([*argv, "--rate", "200", "--timeout", "60", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "open loop" and report["offered_rate"] == 200
    assert report["sends"] == 16 and report["delivered"] == report["expected"] == 22
    assert report["lost"] == 0 and report["duplicated"] == 0
    assert set(report["latency_ms"]) == set(report["send_lag_ms"]) == {"p50", "p95", "p99", "p999"}
    assert report["relay_cpu_us_per_envelope"] > 0


def test_rate_sweep_runs_at_fractions_of_the_burst_rate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["bench", "relay", "--clients", "3", "--messages", "2", "--group-size", "3"]
    sweep = ["--rate-sweep", "0.5", "--saturation-runs", "2", "--timeout", "60", "--json"]
    assert cli.main([*argv, *sweep]) == 0
    report = json.loads(capsys.readouterr().out)
    saturation = report["saturation"]
    assert saturation["mode"] == "burst" and report["fractions"] == [0.5]
    # Of two bursts, the faster: a sweep never runs below its fractions of the median.
    assert len(report["bursts"]) == 2
    assert saturation == max(report["bursts"], key=lambda burst: burst["envelopes_per_second"])
    (run,) = report["runs"]
    assert run["mode"] == "open loop"
    assert run["offered_rate"] == pytest.approx(saturation["envelopes_per_second"] / 2, rel=0.01)
    for figures in (*report["bursts"], run):
        assert figures["delivered"] == figures["expected"] == 3 * (1 + 2)
        assert figures["lost"] == 0 and figures["duplicated"] == 0


def test_process_tree_cpu_counts_live_and_ended_children() -> None:
    before = pgcluster.process_tree_cpu_seconds(os.getpid())
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    # The child ended and was reaped: its time is in ours (cutime), once.
    assert pgcluster.process_tree_cpu_seconds(os.getpid()) > before


@pytest.mark.skipif(pgcluster.server_binaries() is None, reason="no PostgreSQL server binaries")
def test_throwaway_cluster_cpu_time_is_its_processes() -> None:
    with pgcluster.throwaway_cluster(durable=True) as cluster:
        # The postmaster and its background processes, which started it up.
        assert cluster.cpu_seconds() > 0
    with pytest.raises(pgcluster.ClusterError, match="not running"):
        cluster.cpu_seconds()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the cluster to another user")
def test_throwaway_cluster_refuses_a_folder_its_user_cannot_reach(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with (
        pytest.raises(pgcluster.ClusterError, match=r"cannot reach .*private"),
        pgcluster.throwaway_cluster(parent=str(private)),
    ):
        pass
    assert list(private.iterdir()) == []


def _fake_result(rate: float | None, envelopes_per_second: float) -> bench_relay.RelayLoadResult:
    return bench_relay.RelayLoadResult(
        clients=2, messages_per_client=1, group_size=1, sends=2, expected=2, delivered=2,
        lost=0, duplicated=0, rate_limited=0, seconds=0.01,
        envelopes_per_second=envelopes_per_second,
        latency_ms=bench_relay._percentiles([0.001]), offered_rate=rate,
        send_lag_ms=bench_relay._percentiles([0.0]) if rate else {},
    )  # fmt: skip


def test_a_sweep_runs_at_fractions_of_the_median_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    burst_rates = iter([3_000.0, 1_000.0, 2_000.0])

    def fake_run(*, rate: float | None = None, **_: object) -> bench_relay.RelayLoadResult:
        return _fake_result(rate, rate or next(burst_rates))

    monkeypatch.setattr(bench_relay, "run_relay_bench", fake_run)
    sweep = bench_relay.run_rate_sweep((0.5, 0.9))
    assert [burst.envelopes_per_second for burst in sweep.bursts] == [3_000, 1_000, 2_000]
    assert sweep.saturation is sweep.bursts[2]
    assert [run.offered_rate for run in sweep.runs] == [1_000, 1_800] and sweep.exact
    report = sweep.as_json()
    assert report["saturation"]["envelopes_per_second"] == 2_000 and len(report["bursts"]) == 3
    assert "the median of 3 burst runs (3000, 1000, 2000 envelopes/s)" in (
        bench_relay.render_sweep(sweep)
    )
    # A burst that lost an envelope makes the whole sweep inexact, median or not.
    sweep.bursts[0].lost = 1
    assert not sweep.exact


def test_a_sweep_that_fails_midway_reports_the_runs_it_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fake_run(*, rate: float | None = None, **_: object) -> bench_relay.RelayLoadResult:
        if rate is not None and rate > 150:
            raise bench_relay.RelayBenchError("a load client failed: InternalError()")
        return _fake_result(rate, 200.0)

    monkeypatch.setattr(bench_relay, "run_relay_bench", fake_run)
    sweep = bench_relay.run_rate_sweep((0.5, 0.9))
    assert [run.offered_rate for run in sweep.runs] == [100.0] and not sweep.exact
    assert sweep.failure == (
        "the run at 0.9 of the saturation rate failed: a load client failed: InternalError()"
    )
    assert "stopped: the run at 0.9" in bench_relay.render_sweep(sweep)


@pytest.mark.skipif(
    pgcluster.server_binaries() is None or importlib.util.find_spec("psycopg") is None,
    reason="no PostgreSQL server binaries or no psycopg",
)
def test_open_loop_on_a_throwaway_postgresql(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "relay", "--clients", "3", "--messages", "2", "--group-size", "3"]
    assert cli.main([*argv, "--db", "postgres", "--rate", "100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["database"] == "postgresql" and report["relays"] == 1
    assert report["delivered"] == report["expected"] == 3 * (1 + 2)
    assert report["lost"] == 0 and report["duplicated"] == 0
    # The server's processes were measured (the relay's writes cost it some CPU).
    assert report["database_cpu_seconds"] is not None
    assert report["database_cpu_us_per_envelope"] is not None
