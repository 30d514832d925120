"""The outbox and its delivery worker: durability, idempotency, deferral, retries, limits; file channel."""

from __future__ import annotations

import random
import sqlite3
import threading
import time

import orjson
import pytest
from channel_testing import ScriptedChannel, hex_id, instruction_table, wait_until

from adapters.channels import channel_kinds, load_channel_class, make_channel
from adapters.channels.base import Channel, Instruction, Retry
from adapters.channels.files import FileChannel, StdoutChannel
from adapters.channels.outbox import DeliveryPolicy, DeliveryWorker, Outbox, OutboxOutput, TokenBucket
from adapters.outputs import Backpressure, make_output

FAST = DeliveryPolicy(concurrency=2, backoff_initial=0.01, backoff_max=0.05)


def statuses(outbox: Outbox) -> dict[str, str]:
    return {row_id: outbox.row(row_id)["status"] for row_id in _ids(outbox)}


def _ids(outbox: Outbox) -> list[str]:
    return [r[0] for r in outbox._db.execute("SELECT id FROM instructions ORDER BY id")]


def test_enqueue_is_idempotent_by_id_and_records_holdouts(tmp_path):
    out = make_output("box", {"type": "outbox", "path": str(tmp_path / "o.db")})
    assert isinstance(out, OutboxOutput)
    with out:
        out.send(instruction_table([hex_id(1), hex_id(2), hex_id(3)], holdout=[False, True, False],
                                   params={"name": "李", "amount": "10"}))
        out.send(instruction_table([hex_id(2), hex_id(3), hex_id(4)]))  # a replay, and one new
        out.flush()
        stats = out.stats()
        assert (stats["instructions"], stats["duplicates"], stats["batches"]) == (4, 2, 2)
        assert 1 <= stats["transactions"] <= 2 and stats["write_errors"] == 0
        box = out.outbox
        assert statuses(box) == {hex_id(1): "pending", hex_id(2): "holdout", hex_id(3): "pending",
                                 hex_id(4): "pending"}
        row = box.row(hex_id(1))
        assert orjson.loads(row["params"]) == {"name": "李", "amount": "10"}
        assert row["msisdn"] == 8613800138000 and row["channel"] == "sms" and row["attempts"] == 0
    # Durable: another connection sees every row.
    again = Outbox(tmp_path / "o.db")
    assert len(_ids(again)) == 4
    again.close()


def test_outbox_output_refuses_bad_config_and_bad_tables(tmp_path):
    with pytest.raises(ValueError, match="output 'box': unknown key"):
        make_output("box", {"type": "outbox", "path": str(tmp_path / "o.db"), "sync": True})
    with pytest.raises(ValueError, match="output 'box': key 'keep'"):
        make_output("box", {"type": "outbox", "path": str(tmp_path / "o.db"), "keep": "forever"})
    with make_output("box", {"type": "outbox", "path": str(tmp_path / "o.db")}) as out:
        with pytest.raises(ValueError, match="INSTRUCTION_SCHEMA"):
            out.send(instruction_table([hex_id(1)]).drop_columns(["params"]))
        assert out.stats()["instructions"] == 0


def run_worker(tmp_path, channel: Channel, policy: DeliveryPolicy = FAST, name: str = "sms", clock=None):
    options = {} if clock is None else {"clock": clock}
    worker = DeliveryWorker(tmp_path / "o.db", {name: (channel, policy)}, seed=1, **options)
    reports: list[tuple[str, str, str, int]] = []
    worker.start(lambda channel_name: lambda i, o, t: reports.append((channel_name, i, o, t)))
    return worker, reports


def test_worker_delivers_retries_with_backoff_and_parks(tmp_path):
    box = Outbox(tmp_path / "o.db")
    script = {hex_id(1): ["retry", "retry"], hex_id(2): ["reject"], hex_id(3): ["retry"] * 10}
    channel = ScriptedChannel("sms", script)
    # max_attempts, when set, parks a row that is still valid (max_age is an hour away).
    policy = DeliveryPolicy(concurrency=2, max_attempts=4, backoff_initial=0.05, backoff_max=0.2, max_age=3600)
    box.enqueue(instruction_table([hex_id(k) for k in range(1, 5)], holdout=[False, False, False, False]))
    box.enqueue(instruction_table([hex_id(9)], holdout=[True]))
    worker, _ = run_worker(tmp_path, channel, policy)
    try:
        wait_until(lambda: statuses(box)[hex_id(3)] == "parked")
        wait_until(lambda: statuses(box)[hex_id(1)] == "delivered")
    finally:
        worker.stop()
    assert statuses(box) == {hex_id(1): "delivered", hex_id(2): "parked", hex_id(3): "parked",
                             hex_id(4): "delivered", hex_id(9): "holdout"}
    assert box.row(hex_id(2))["reason"] == "rejected: no such subscriber"
    assert box.row(hex_id(2))["attempts"] == 1
    assert box.row(hex_id(3))["reason"] == "gave up after 4 attempts: peer busy"
    assert box.row(hex_id(1))["attempts"] == 3
    assert hex_id(9) not in [i for i, _ in channel.attempts]  # holdouts are never delivered
    times = [t for i, t in channel.attempts if i == hex_id(3)]
    assert len(times) == 4
    # Waits are random but capped: never more than the cap (plus scheduling slack) between attempts.
    assert all(b - a < 0.2 + 1.0 for a, b in zip(times, times[1:], strict=False))
    stats = worker.stats()["sms"]
    assert stats["delivered"] == 2 and stats["parked"] == 2 and stats["rejected"] == 1 and stats["retries"] == 5
    assert stats["expired"] == 0


class FakeClock:
    """ms since the epoch, moved on by the test only: an hour of retries takes milliseconds."""

    def __init__(self, now: int):
        self.now = now

    def __call__(self) -> int:
        return self.now


class DownUntil(Channel):
    """A peer that answers Retry until the clock reaches `back_at` (None: never), then accepts."""

    kind = "down"

    def __init__(self, clock: FakeClock, back_at: int | None):
        self.name = "sms"
        self.clock = clock
        self.back_at = back_at
        self.attempts: list[int] = []  # the clock at each attempt
        self.delivered: list[str] = []

    @classmethod
    def from_config(cls, name, options):
        raise NotImplementedError

    def deliver(self, instruction: Instruction) -> None:
        self.attempts.append(self.clock())
        if self.back_at is None or self.clock() < self.back_at:
            raise Retry("HTTP 503 from Kannel")
        self.delivered.append(instruction.id)


def run_until_settled(box: Outbox, worker: DeliveryWorker, clock: FakeClock, row_id: str) -> dict:
    """Move the clock to each retry's due time as soon as the row waits for it, until it is delivered or
    parked; the row then."""
    deadline = time.monotonic() + 20
    while (row := box.row(row_id))["status"] not in ("delivered", "parked"):
        assert time.monotonic() < deadline, row
        due = box.next_due("sms")
        if due is not None and due > clock.now:
            clock.now = due
            worker.wake()
        time.sleep(0.002)
    return row


MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR


def test_a_gateway_down_for_an_hour_is_retried_until_it_is_back(tmp_path):
    # The default backoff (1 s doubling to 5 min) with the old ten attempts parked after about seven
    # minutes; retried by time, an hour down parks nothing.
    start = int(time.time() * 1000)
    clock = FakeClock(start)
    box = Outbox(tmp_path / "o.db")
    box.enqueue(instruction_table([hex_id(1)], not_before=[start], ts=start))
    channel = DownUntil(clock, back_at=start + HOUR)
    worker, _ = run_worker(tmp_path, channel, DeliveryPolicy(concurrency=1, max_age=6 * 3600), clock=clock)
    try:
        row = run_until_settled(box, worker, clock, hex_id(1))
    finally:
        worker.stop()
    assert row["status"] == "delivered", row["reason"]
    assert channel.delivered == [hex_id(1)]
    assert len(channel.attempts) > 10 and row["attempts"] == len(channel.attempts)
    assert channel.attempts[-2] < start + HOUR <= channel.attempts[-1] < start + HOUR + 5 * MINUTE
    stats = worker.stats()["sms"]
    assert (stats["delivered"], stats["retries"], stats["parked"], stats["expired"]) == (
        1, len(channel.attempts) - 1, 0, 0)


def test_retries_end_when_the_next_would_come_after_the_validity(tmp_path):
    start = int(time.time() * 1000)
    clock = FakeClock(start)
    box = Outbox(tmp_path / "o.db")
    box.enqueue(instruction_table([hex_id(1)], not_before=[start], ts=start))
    channel = DownUntil(clock, back_at=None)
    worker, _ = run_worker(tmp_path, channel, DeliveryPolicy(concurrency=1, max_age=2 * 3600), clock=clock)
    try:
        row = run_until_settled(box, worker, clock, hex_id(1))
    finally:
        worker.stop()
    valid_until = start + 2 * HOUR
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(valid_until // 1000))
    assert row["status"] == "parked"
    attempts = len(channel.attempts)
    assert row["reason"] == f"expired: valid until {stamp}, after {attempts} attempts: HTTP 503 from Kannel"
    # Tried for most of the two hours (a retry waits at most backoff_max), never at or after their end.
    assert valid_until - 5 * MINUTE <= channel.attempts[-1] < valid_until
    stats = worker.stats()["sms"]
    assert (stats["parked"], stats["expired"], stats["rejected"], stats["retries"]) == (1, 1, 0, attempts - 1)


def test_a_row_claimed_after_its_validity_is_parked_expired_without_an_attempt(tmp_path):
    # The daemon was stopped for two days: what was pending then is not sent now.
    now = int(time.time() * 1000)
    box = Outbox(tmp_path / "o.db")
    box.enqueue(instruction_table([hex_id(1), hex_id(2)], not_before=[now - 2 * DAY, now - 2 * DAY], ts=now - 2 * DAY))
    box.enqueue(instruction_table([hex_id(3)], not_before=[now], ts=now))
    # Before the stop a worker had claimed all three: hex_id(2) failed once and waited for its retry, the
    # others went back unattempted.
    for instruction, _ in box.claim("sms", 10):
        if instruction.id == hex_id(2):
            box.mark_retry(instruction.id, now - 2 * DAY + MINUTE, "HTTP 503 from Kannel")
        else:
            box.release(instruction.id)
    channel = ScriptedChannel("sms")
    worker, _ = run_worker(tmp_path, channel, DeliveryPolicy(concurrency=1, max_age=86_400))
    try:
        wait_until(lambda: channel.delivered == [hex_id(3)] and statuses(box)[hex_id(1)] == "parked"
                   and statuses(box)[hex_id(2)] == "parked")
    finally:
        worker.stop()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((now - DAY) // 1000))
    assert box.row(hex_id(1))["reason"] == f"expired: valid until {stamp}, not attempted"
    assert box.row(hex_id(1))["attempts"] == 0
    assert box.row(hex_id(2))["reason"] == f"expired: valid until {stamp}, after 1 attempt: HTTP 503 from Kannel"
    assert box.row(hex_id(2))["attempts"] == 1
    assert [i for i, _ in channel.attempts] == [hex_id(3)]
    stats = worker.stats()["sms"]
    assert (stats["delivered"], stats["parked"], stats["expired"], stats["rejected"]) == (1, 2, 2, 0)


def test_without_max_age_and_max_attempts_nothing_expires(tmp_path):
    # DeliveryPolicy's own defaults (no validity, no cap): an in-process caller replaying old event time
    # still delivers.
    assert (DeliveryPolicy().max_age, DeliveryPolicy().max_attempts) == (None, 0)
    now = int(time.time() * 1000)
    box = Outbox(tmp_path / "o.db")
    box.enqueue(instruction_table([hex_id(1)], not_before=[now - 30 * DAY], ts=now - 30 * DAY))
    channel = ScriptedChannel("sms", {hex_id(1): ["retry"] * 12})
    worker, _ = run_worker(tmp_path, channel, DeliveryPolicy(concurrency=1, backoff_initial=0.001, backoff_max=0.005))
    try:
        wait_until(lambda: channel.delivered == [hex_id(1)])
    finally:
        worker.stop()
    assert box.row(hex_id(1))["attempts"] == 13


def test_delivery_policy_refuses_a_validity_of_nothing():
    with pytest.raises(ValueError, match="max_age"):
        DeliveryPolicy(max_age=0)
    with pytest.raises(ValueError, match="max_attempts"):
        DeliveryPolicy(max_attempts=-1)


def test_backoff_is_full_jitter_up_to_the_cap():
    policy = DeliveryPolicy(backoff_initial=1.0, backoff_max=8.0)
    rng = random.Random(7)
    waits = {attempt: [policy.backoff(attempt, None, rng) for _ in range(2000)] for attempt in (1, 2, 3, 4, 10)}
    for attempt, cap in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 8.0)):
        assert 0 <= min(waits[attempt]) < cap * 0.05
        assert cap * 0.95 < max(waits[attempt]) <= cap
    assert policy.backoff(1, 30.0, rng) == 30.0  # the peer's Retry-After wins when longer


def test_not_before_defers_delivery(tmp_path):
    box = Outbox(tmp_path / "o.db")
    now = int(time.time() * 1000)
    box.enqueue(instruction_table([hex_id(1), hex_id(2)], not_before=[now, now + 1500], ts=now))
    channel = ScriptedChannel("sms")
    worker, _ = run_worker(tmp_path, channel)
    try:
        wait_until(lambda: channel.delivered == [hex_id(1)])
        time.sleep(0.5)
        assert channel.delivered == [hex_id(1)] and statuses(box)[hex_id(2)] == "pending"
        wait_until(lambda: len(channel.delivered) == 2, timeout=5)
        delivered_at = dict(channel.attempts)[hex_id(2)]
    finally:
        worker.stop()
    assert delivered_at >= time.monotonic() - (time.time() * 1000 - (now + 1500)) / 1000 - 0.05


def test_in_flight_rows_of_a_crash_are_delivered_again(tmp_path):
    box = Outbox(tmp_path / "o.db")
    box.enqueue(instruction_table([hex_id(1), hex_id(2)]))
    claimed = box.claim("sms", 10)  # a worker took them, then the process died
    assert {i.id for i, _ in claimed} == {hex_id(1), hex_id(2)}
    assert set(statuses(box).values()) == {"in-flight"}
    channel = ScriptedChannel("sms")
    worker, _ = run_worker(tmp_path, channel)
    try:
        wait_until(lambda: len(channel.delivered) == 2)
    finally:
        worker.stop()
    assert worker.requeued == 2
    assert set(statuses(box).values()) == {"delivered"}


def test_concurrency_and_rate_limits(tmp_path):
    box = Outbox(tmp_path / "o.db")
    box.enqueue(instruction_table([hex_id(k) for k in range(40)]))
    channel = ScriptedChannel("sms", delay=0.02)
    worker, _ = run_worker(tmp_path, channel, DeliveryPolicy(concurrency=3, rate=50.0, burst=5))
    try:
        started = time.monotonic()
        wait_until(lambda: len(channel.delivered) == 40, timeout=20)
        elapsed = time.monotonic() - started
    finally:
        worker.stop()
    assert channel.most_concurrent == 3
    # 5 at once from the full bucket, then 50 per second: 35 more take at least 0.7 s.
    assert elapsed >= 0.65
    assert elapsed < 6.0


def test_token_bucket_rate():
    bucket = TokenBucket(rate=200.0, burst=1)
    stopping = threading.Event()
    started = time.monotonic()
    for _ in range(101):
        assert bucket.take(stopping)
    assert 0.45 < time.monotonic() - started < 2.0  # the upper bound only catches a bucket that ignores its rate
    stopping.set()
    slow = TokenBucket(rate=0.001, burst=1)
    assert slow.take(stopping) and not slow.take(stopping)  # stopping ends the wait


def test_stop_returns_claimed_rows_unattempted(tmp_path):
    box = Outbox(tmp_path / "o.db")
    box.enqueue(instruction_table([hex_id(k) for k in range(20)]))
    channel = ScriptedChannel("sms", delay=0.05)
    worker, _ = run_worker(tmp_path, channel, DeliveryPolicy(concurrency=1))
    wait_until(lambda: channel.delivered)
    worker.stop()
    rows = [box.row(i) for i in _ids(box)]
    assert {r["status"] for r in rows} <= {"pending", "delivered"}
    assert all(r["attempts"] == (1 if r["status"] == "delivered" else 0) for r in rows)
    assert sum(r["status"] == "delivered" for r in rows) == len(channel.delivered)


def test_unconfigured_channels_wait(tmp_path):
    box = Outbox(tmp_path / "o.db")
    box.enqueue(instruction_table([hex_id(1)], channel="mms"))
    box.enqueue(instruction_table([hex_id(2)], channel="sms"))
    channel = ScriptedChannel("sms")
    worker, _ = run_worker(tmp_path, channel)
    try:
        wait_until(lambda: channel.delivered == [hex_id(2)])
    finally:
        worker.stop()
    assert box.counts() == {("mms", "pending"): 1, ("sms", "delivered"): 1}
    assert box.waiting() == {("mms", "pending"): 1}


def test_purge_keeps_pending_and_parked(tmp_path):
    box = Outbox(tmp_path / "o.db")
    box.enqueue(instruction_table([hex_id(k) for k in range(4)], holdout=[False, True, False, False]))
    box.mark_delivered(hex_id(0))
    box.mark_parked(hex_id(2), "rejected: x")
    assert box.purge(int(time.time() * 1000) + 1) == 2
    assert set(_ids(box)) == {hex_id(2), hex_id(3)}
    assert box.waiting() == {("sms", "parked"): 1, ("sms", "pending"): 1}


def test_file_channel_writes_json_lines_once_and_reports(tmp_path):
    path = tmp_path / "out" / "sent.jsonl"
    box = Outbox(tmp_path / "o.db")
    box.enqueue(instruction_table([hex_id(k) for k in range(5)], channel="demo", params={"name": "王"}))
    channel = make_channel("demo", {"type": "file", "path": str(path), "report": "delivered"})
    assert isinstance(channel, FileChannel)
    worker, reports = run_worker(tmp_path, channel, name="demo")
    try:
        wait_until(lambda: len(reports) == 5)
    finally:
        worker.stop()
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert sorted(line["id"] for line in lines) == [hex_id(k) for k in range(5)]
    assert lines[0]["params"] == {"name": "王"} and lines[0]["channel"] == "demo"
    assert sorted(r[1] for r in reports) == [hex_id(k) for k in range(5)]
    assert {(r[0], r[2]) for r in reports} == {("demo", "delivered")}
    # After a restart the channel knows what it wrote: a redelivery is not written twice.
    again = FileChannel("demo", path)
    again.deliver(_instruction(hex_id(3)))
    again.deliver(_instruction(hex_id(7)))
    again.close()
    ids = [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()]
    assert ids.count(hex_id(3)) == 1 and ids.count(hex_id(7)) == 1
    assert again.stats() == {"written": 1, "duplicates": 1}


def _instruction(instruction_id: str) -> Instruction:
    return Instruction(id=instruction_id, ts=1, msisdn=1, rule="r", channel="demo", template="t", priority=0,
                       holdout=False, not_before=1, params={})


def test_stdout_channel(capfd):
    channel = make_channel("out", {"type": "stdout"})
    assert isinstance(channel, StdoutChannel)
    channel.deliver(_instruction(hex_id(1)))
    assert orjson.loads(capfd.readouterr().out)["id"] == hex_id(1)


def test_registry_knows_the_builtins_and_refuses_unknown_types():
    assert load_channel_class("file") is FileChannel
    assert {"sms", "file", "stdout", "mms", "portal", "crm"} <= set(channel_kinds())
    with pytest.raises(ValueError, match=r"unknown channel type 'pigeon'; known types: .*'file'.*'sms'"):
        load_channel_class("pigeon")
    with pytest.raises(ValueError, match="channel 'x': key 'type' is required"):
        make_channel("x", {"path": "y"})
    with pytest.raises(ValueError, match=r"channel 'x': unknown key\(s\) 'colour'"):
        make_channel("x", {"type": "stdout", "colour": "red"})
    with pytest.raises(ValueError, match="channel 'x': key 'report' must be one of"):
        make_channel("x", {"type": "stdout", "report": "read"})


def test_a_locked_outbox_is_retried_then_pushes_back_and_loses_nothing(tmp_path):
    out = OutboxOutput("box", tmp_path / "o.db", max_waiting=3)
    out.outbox._db.execute("PRAGMA busy_timeout = 20")
    blocker = sqlite3.connect(tmp_path / "o.db", isolation_level=None, timeout=0)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
        for k in range(3):
            out.send(instruction_table([hex_id(k)]))  # queued: the loop does not wait for SQLite
        with pytest.raises(Backpressure, match="3 tables wait"):
            out.send(instruction_table([hex_id(9)]))
        wait_until(lambda: out.stats()["write_errors"] >= 1)
        assert out.stats()["instructions"] == 0
        blocker.execute("ROLLBACK")
        out.flush()
        out.send(instruction_table([hex_id(9)]))
        out.flush()
        assert out.stats()["instructions"] == 4
        assert set(_ids(out.outbox)) == {hex_id(0), hex_id(1), hex_id(2), hex_id(9)}
    finally:
        blocker.close()
        out.close()
