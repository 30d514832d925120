"""Recovery of a real daemon (`kairos run`) after kill -9: a torn journal tail, a damaged checkpoint, acks, cooldowns.

Each test runs the daemon with `state_dir`, the outbox and a `file` channel,
kills it with SIGKILL, damages what a crash (or a disk) can damage, starts it
again, and compares what was delivered with an in-process Engine over the
same events, one that never crashed.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest
import zmq
from kannel import free_port
from test_daemon import DaemonProcess, arrow_message
from test_durability import ROWS, RULES, config, delivered, kill, never_crashed, wait_for

from adapters.sender import ResendingSender
from engine import KIND_CODES
from engine.checkpoint import verify
from engine.journal import FILE_HEADER, RECORD_HEADER
from engine.synth import TrafficGenerator


def traffic(events: int, seed: int) -> list[pa.RecordBatch]:
    return list(TrafficGenerator(1_500, seed=seed).batches(events, ROWS))


def make_sender(directory: Path, port: int, **options) -> ResendingSender:
    sender = ResendingSender(f"ipc://{directory}/switch", f"http://127.0.0.1:{port}/acks", "switch", 7, **options)
    sender.resume()
    return sender


def acks(daemon: DaemonProcess) -> dict:
    status, body = daemon.get("/acks")
    assert status == 200, body
    return orjson.loads(body)


def acked(daemon: DaemonProcess) -> int:
    return int(acks(daemon)["inputs"]["switch"].get("7", 0))


def logged(daemon: DaemonProcess, msg: str) -> list[dict]:
    return [entry for entry in daemon.logs() if entry["msg"] == msg]


def checkpoint(daemon: DaemonProcess) -> int:
    """POST /control/checkpoint; the journal position it covers."""
    status, reply = daemon.post("/control/checkpoint")
    assert status == 200 and reply["ok"], reply
    match = re.match(r"checkpoint at journal position (\d+) ", reply["message"])
    assert match, reply
    return int(match.group(1))


def assert_delivered_exactly(directory: Path, expected) -> None:
    wait_for(lambda: sum(delivered(directory).values()) >= sum(expected.values()), 30, "the deliveries")
    time.sleep(0.5)  # anything extra would show up now
    got = delivered(directory)
    missing, extra = expected - got, got - expected
    assert not missing and not extra, f"{len(missing)} missing, {len(extra)} extra of {sum(expected.values())}"


def records(segment: Path) -> list[tuple[int, int, int]]:
    """(offset, kind, size) of each record of a journal segment."""
    data = segment.read_bytes()
    offset, found = FILE_HEADER.size, []
    while offset < len(data):
        _, kind, _, length, _ = RECORD_HEADER.unpack_from(data, offset)
        found.append((offset, kind, RECORD_HEADER.size + length))
        offset += RECORD_HEADER.size + length
    return found


def test_a_torn_journal_tail_is_cut_back_and_the_sender_resends_what_it_held(tmp_path):
    batches = traffic(30_000, seed=11)
    expected = never_crashed(batches)
    assert sum(expected.values()) > 100
    first, second = batches[:40], batches[40:]
    port = free_port()
    daemon = DaemonProcess(tmp_path, config(tmp_path, port), RULES)
    # The sender reads no acknowledgement while it sends the first part: it still holds all of it at the crash,
    # as a sender holds what the daemon had not yet made durable when a power cut tore the journal.
    sender = make_sender(tmp_path, port, window=10_000, poll_every=3_600, resend_after=3_600)
    try:
        for batch in first:
            sender.send(arrow_message(batch))
        wait_for(lambda: acked(daemon) == len(first), 20, "the first part journaled")
        kill(daemon, 0)
        assert not list((tmp_path / "state" / "checkpoints").iterdir())  # everything is in the journal
        (segment,) = sorted((tmp_path / "state" / "journal").glob("*.journal"))
        *_, (offset, kind, size) = records(segment)
        assert kind == 1 and segment.stat().st_size == offset + size  # the last record: the last message
        cut = 7
        with open(segment, "r+b") as f:
            f.truncate(offset + size - cut)

        daemon = DaemonProcess(tmp_path, config(tmp_path, port), RULES)
        (torn,) = logged(daemon, "journal tail torn by a crash; cut back to the last whole record")
        assert torn["bytes_dropped"] == size - cut
        (replayed,) = logged(daemon, "journal replayed")
        assert replayed["events"] == (len(first) - 1) * ROWS
        assert daemon.metric("kairos_journal_torn_bytes") == size - cut
        assert acked(daemon) == len(first) - 1  # the torn message is no longer acknowledged ...
        sender.poll_every = 0.05
        sender.flush(timeout=20)  # ... so the sender, seeing the restart, sends it again
        assert sender.resends >= 1 and acked(daemon) == len(first)
        for batch in second:
            sender.send(arrow_message(batch))
        sender.flush(timeout=20)
        assert_delivered_exactly(tmp_path, expected)
        assert daemon.metric("kairos_input_sequence_missing_total", input="switch") == 0
        assert daemon.stop() == 0
    finally:
        sender.close()
        daemon.stop(signal.SIGKILL)


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before_and_the_journal_replayed(tmp_path):
    batches = traffic(30_000, seed=12)
    expected = never_crashed(batches)
    parts = [batches[:15], batches[15:30], batches[30:45], batches[45:]]
    port = free_port()
    # Small segments: the journal a kept checkpoint needs must survive the releases after each checkpoint.
    daemon = DaemonProcess(tmp_path, config(tmp_path, port, segment_bytes=100_000), RULES)
    sender = make_sender(tmp_path, port)
    try:
        positions = []
        for part in parts[:2]:
            for batch in part:
                sender.send(arrow_message(batch))
            sender.flush(timeout=20)
            positions.append(checkpoint(daemon))
        older, newest = positions
        assert older < newest
        for batch in parts[2]:
            sender.send(arrow_message(batch))
        sender.flush(timeout=20)
        kill(daemon, 0)
        journal = sorted((tmp_path / "state" / "journal").glob("*.journal"))
        assert int(journal[0].name[:-8]) > 1  # released up to what the older checkpoint covers ...
        assert int(journal[0].name[:-8]) <= older + 1  # ... and no further
        store = tmp_path / "state" / "checkpoints"
        assert sorted(int(p.name) for p in store.iterdir()) == [older, newest]
        state = store / f"{newest:020d}" / "state.npz"
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0x01
        state.write_bytes(bytes(data))

        daemon = DaemonProcess(tmp_path, config(tmp_path, port, segment_bytes=100_000), RULES)
        (damaged,) = logged(daemon, "checkpoint damaged; trying the one before it")
        assert f"{newest:020d}" in damaged["error"] and "state.npz" in damaged["error"]
        assert damaged["moved_to"] == str(store / f"{newest:020d}.damaged") and Path(damaged["moved_to"]).is_dir()
        (restored,) = logged(daemon, "state restored")
        assert restored["position"] == older and restored["checkpoint"].endswith(f"{older:020d}")
        (replayed,) = logged(daemon, "journal replayed")
        assert replayed["events"] == (len(parts[1]) + len(parts[2])) * ROWS
        assert acked(daemon) == sum(len(p) for p in parts[:3])
        # The checkpoint a recovery writes at once: the damaged one must not count among the two kept, or a
        # damage of this one would find nothing good to fall back to.
        written = daemon.wait_for_log("checkpoint written", timeout=20)
        kept = sorted(int(p.name) for p in store.iterdir() if p.name.isdigit())
        assert kept[-1] == written["position"] and len(kept) == 2, kept
        for position in kept:
            verify(store / f"{position:020d}")
        for batch in parts[3]:
            sender.send(arrow_message(batch))
        sender.flush(timeout=20)
        assert_delivered_exactly(tmp_path, expected)
        assert daemon.stop() == 0
    finally:
        sender.close()
        daemon.stop(signal.SIGKILL)


def test_control_checkpoint_answers_its_position_and_acks_report_what_is_durable_and_the_instance(tmp_path):
    batches = traffic(6_000, seed=13)
    port = free_port()
    # fsync every hour: what is processed is not durable until something syncs (a checkpoint does).
    daemon = DaemonProcess(tmp_path, config(tmp_path, port, fsync="1h"), RULES)
    sender = make_sender(tmp_path, port, poll_every=3_600, resend_after=3_600)
    try:
        first = acks(daemon)
        assert first["journal"] is True and first["inputs"] == {"switch": {}} and first["instance"]
        for batch in batches[:5]:
            sender.send(arrow_message(batch))
        daemon.wait_for_metric("kairos_events_total", 5 * ROWS, timeout=20)
        assert acked(daemon) == 0  # taken and processed, not yet durable: not acknowledged
        position = checkpoint(daemon)
        assert position == daemon.metric("kairos_journal_position") == 6  # the rules at start, then 5 messages
        # the loop takes the writer's result on its next turn (the reply comes from the writer)
        assert daemon.wait_for_metric("kairos_checkpoint_position", position, timeout=5) == position
        assert (tmp_path / "state" / "checkpoints" / f"{position:020d}" / "meta.json").exists()
        assert acked(daemon) == 5  # the checkpoint synced the journal
        assert checkpoint(daemon) == position  # nothing since: the same position again
        sender.poll_every = 0.05
        for batch in batches[5:8]:
            sender.send(arrow_message(batch))
        daemon.wait_for_metric("kairos_events_total", 8 * ROWS, timeout=20)
        kill(daemon, 0)

        daemon = DaemonProcess(tmp_path, config(tmp_path, port, fsync="1h"), RULES)
        again = acks(daemon)
        assert again["instance"] != first["instance"]
        # kill -9 loses nothing the OS has: the three messages after the checkpoint were replayed, and a start
        # counts what it replayed as durable.
        assert again["inputs"] == {"switch": {"7": 8}}
        sender.flush(timeout=20)
        assert sender.acked == 8 and not sender.unacked
        assert daemon.stop() == 0
    finally:
        sender.close()
        daemon.stop(signal.SIGKILL)


COOLDOWN_RULES = """
[[rule]]
id = "welcome"
on = "call_out"
channels = ["sms"]
template = "hello"
cooldown = "1d"
"""


def call(ts: int) -> bytes:
    return arrow_message(pa.RecordBatch.from_pydict({
        "ts": np.array([ts], np.int64), "msisdn": np.array([8613800000001], np.int64),
        "kind": np.array([KIND_CODES["call_out"]], np.uint8)}))


@pytest.mark.parametrize("how", ["journal", "checkpoint"])
def test_a_cooldown_survives_kill_9(tmp_path, how):
    """The first instruction's cooldown holds after the crash: from the journal's replay, or from a checkpoint."""
    directory = tmp_path
    port = free_port()
    ts = int(time.time() * 1000) - 2 * 86_400_000  # due at once: not_before is in the past
    context = zmq.Context()
    feeder = context.socket(zmq.PUSH)
    feeder.setsockopt(zmq.LINGER, 0)
    feeder.connect(f"ipc://{directory}/switch")
    daemon = DaemonProcess(directory, config(directory, port, sequence="count"), COOLDOWN_RULES)
    try:
        feeder.send(call(ts))
        wait_for(lambda: sum(delivered(directory).values()) == 1, 20, "the first instruction delivered")
        if how == "checkpoint":
            checkpoint(daemon)
        kill(daemon, 0)
        daemon = DaemonProcess(directory, config(directory, port, sequence="count"), COOLDOWN_RULES)
        feeder.send(call(ts + 60_000))
        daemon.wait_for_metric("kairos_policy_stops_total", 1, timeout=20, rule="welcome", reason="cooldown")
        assert daemon.metric("kairos_events_total") == 2
        time.sleep(0.5)
        lines = (directory / "delivered.jsonl").read_bytes().splitlines()
        assert [orjson.loads(line)["ts"] for line in lines] == [ts]
        assert daemon.metric("kairos_instructions_total", rule="welcome", channel="sms") == 0
        assert daemon.stop() == 0
    finally:
        feeder.close(0)
        context.term()
        daemon.stop(signal.SIGKILL)
