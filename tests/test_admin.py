"""Operator commands: `kairos outbox`, `kairos deadletters`, dead-letter retention, `--version`, build info.

Everything runs on real files: outboxes written through OutboxOutput and Outbox, dead-letter files
written by DeadLetterFile from what the wire decoders refused, and a real PULL socket for replays.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import msgpack
import orjson
import pyarrow as pa
import pytest
import zmq
from channel_testing import ScriptedChannel, hex_id, instruction_table, wait_until

import engine
from adapters.channels.outbox import DeliveryPolicy, DeliveryWorker, Outbox, OutboxOutput, RowFilter
from adapters.deadletter import DeadLetterFile, dead_letter_files, entries
from adapters.wire import FieldMap, make_decoder
from engine import _version
from engine.cli import main
from engine.config import load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
DAY_MS = 86_400_000


def now_ms() -> int:
    return int(time.time() * 1000)


class Clock:
    """ms since the epoch, set by the test: rows written "days ago"."""

    def __init__(self, now: int):
        self.now = now

    def __call__(self) -> int:
        return self.now


def write_config(tmp_path: Path, *, inputs: str | None = None, outbox: bool = True, deadletter: str = "",
                 engine_keys: str = "", more: str = "") -> Path:
    rules = tmp_path / "rules.toml"
    if not rules.exists():
        rules.write_text("", encoding="utf-8")  # never read by the admin commands
    outputs = ('[outputs.box]\ntype = "outbox"\npath = "outbox.db"\n\n[channels.sms]\ntype = "file"\n'
               'path = "sms.jsonl"\nmax_age = "2d"\n\n[channels.crm]\ntype = "file"\npath = "crm.jsonl"\n'
               if outbox else '[outputs.out]\ntype = "file"\npath = "out"\n')
    inputs = inputs or '[inputs.switch]\nendpoint = "tcp://127.0.0.1:5999"\n'
    text = (f'[engine]\nrules = "rules.toml"\n{engine_keys}\n[deadletter]\npath = "dead"\n{deadletter}\n'
            f'{more}\n{inputs}\n{outputs}')
    path = tmp_path / "kairos.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------------------
# kairos outbox


def filled_outbox(tmp_path: Path) -> dict[str, str]:
    """An outbox as a daemon leaves it: pending, delivered, parked and holdout rows, some changed days ago.

    Returns id -> what the row is."""
    db = tmp_path / "outbox.db"
    output = OutboxOutput("box", db)
    with output:
        output.send(instruction_table([hex_id(k) for k in range(1, 5)], holdout=[False, False, False, True]))
        output.send(instruction_table([hex_id(k) for k in range(5, 7)], channel="crm"))
    old = Outbox(db, clock=Clock(now_ms() - 3 * DAY_MS))  # what happened three days ago
    old.mark_delivered(hex_id(1))
    old.mark_parked(hex_id(2), "rejected: unknown subscriber")
    old.close()
    box = Outbox(db)
    box.mark_parked(hex_id(5), "gave up after 5 attempts: HTTP 503 from the CRM")
    box.close()
    return {hex_id(1): "delivered, 3 days ago", hex_id(2): "parked sms, 3 days ago", hex_id(3): "pending sms",
            hex_id(4): "holdout", hex_id(5): "parked crm, now", hex_id(6): "pending crm"}


def test_outbox_list_filters_rows_and_prints_a_table_or_json(tmp_path, capsys):
    config = write_config(tmp_path)
    filled_outbox(tmp_path)
    status, out, _ = run(capsys, "outbox", "-c", str(config), "list")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["updated", "id", "channel", "rule", "msisdn", "status", "attempts", "due", "reason"]
    assert sum(hex_id(k) in out for k in range(1, 7)) == 6
    assert lines[-1] == "6 of 6 matching rows (pending 2, delivered 1, parked 2, holdout 1)"
    # The least recently changed first: the rows changed three days ago lead.
    assert hex_id(1) in lines[2] + lines[3] and hex_id(2) in lines[2] + lines[3]

    status, out, _ = run(capsys, "outbox", "-c", str(config), "list", "--status", "parked", "--json")
    rows = [orjson.loads(line) for line in out.splitlines()]
    assert status == 0 and {r["id"] for r in rows} == {hex_id(2), hex_id(5)}
    assert rows[0]["params"] == {"name": "Li"} and rows[0]["holdout"] is False

    def ids(*filters: str) -> set[str]:
        status, out, _ = run(capsys, "outbox", "list", "-c", str(config), "--json", *filters)  # -c after the action
        assert status == 0
        return {orjson.loads(line)["id"] for line in out.splitlines()}

    assert ids("--channel", "crm") == {hex_id(5), hex_id(6)}
    assert ids("--reason", "http 503") == {hex_id(5)}  # a substring, whatever the case
    assert ids("--older-than", "2d") == {hex_id(1), hex_id(2)}
    assert ids("--newer-than", "1d", "--status", "parked") == {hex_id(5)}
    assert ids("--rule", "r1", "--status", "pending", "--status", "holdout") == {hex_id(3), hex_id(4), hex_id(6)}
    assert ids("--rule", "r2") == set()
    assert len(ids("--limit", "2")) == 2
    status, out, _ = run(capsys, "outbox", "-c", str(config), "list", "--limit", "2")
    assert out.splitlines()[-1].startswith("2 of 6 matching rows") and "--limit" in out.splitlines()[-1]


def test_retry_makes_a_parked_row_deliverable_and_touches_nothing_else(tmp_path, capsys):
    config = write_config(tmp_path)
    db = tmp_path / "outbox.db"
    box = Outbox(db)
    box.enqueue(instruction_table([hex_id(1), hex_id(2), hex_id(3)]))
    box.mark_delivered(hex_id(3))
    # The peer refuses hex_id(1) for good; hex_id(2) goes through: a real worker parks one and delivers the other.
    refusing = ScriptedChannel("sms", {hex_id(1): ["reject"]})
    worker = DeliveryWorker(db, {"sms": (refusing, DeliveryPolicy(concurrency=1))})
    worker.start(lambda name: lambda *report: None)
    try:
        wait_until(lambda: box.row(hex_id(1))["status"] == "parked" and box.row(hex_id(2))["status"] == "delivered")
    finally:
        worker.stop()
    parked = box.row(hex_id(1))
    assert parked["attempts"] == 1 and parked["reason"] == "rejected: no such subscriber"

    status, _, err = run(capsys, "outbox", "-c", str(config), "retry", "--status", "delivered")
    assert status == 2 and "only parked rows are retried" in err
    status, out, _ = run(capsys, "outbox", "-c", str(config), "retry", "--dry-run")
    assert status == 0 and "would retry 1 parked row" in out and box.row(hex_id(1))["status"] == "parked"

    before = now_ms()
    status, out, _ = run(capsys, "outbox", "-c", str(config), "retry", "--channel", "sms")
    assert status == 0
    assert "retried 1 parked row" in out
    assert "left 2 matching rows that are not parked (delivered 2)" in out
    row = box.row(hex_id(1))
    assert row["status"] == "pending" and row["attempts"] == 0 and before <= row["due_at"] <= now_ms()
    assert row["updated_at"] >= before
    assert [box.row(hex_id(k))["status"] for k in (2, 3)] == ["delivered", "delivered"]
    assert box.row(hex_id(2))["updated_at"] < before  # not touched

    # Deliverable: a worker whose peer now accepts it delivers it, as its first attempt.
    accepting = ScriptedChannel("sms")
    worker = DeliveryWorker(db, {"sms": (accepting, DeliveryPolicy(concurrency=1))})
    worker.start(lambda name: lambda *report: None)
    try:
        wait_until(lambda: box.row(hex_id(1))["status"] == "delivered")
    finally:
        worker.stop()
    assert accepting.delivered == [hex_id(1)] and box.row(hex_id(1))["attempts"] == 1
    box.close()


def test_retry_leaves_rows_whose_validity_has_ended(tmp_path, capsys):
    config = write_config(tmp_path)  # channels.sms max_age = "2d"; crm the default, a day
    box = Outbox(tmp_path / "outbox.db")
    long_ago = now_ms() - 3 * DAY_MS
    box.enqueue(instruction_table([hex_id(1)], not_before=[long_ago], ts=long_ago))
    box.enqueue(instruction_table([hex_id(2)]))
    box.enqueue(instruction_table([hex_id(3)], not_before=[long_ago], ts=long_ago, channel="nowhere"))
    for k in (1, 2, 3):
        box.mark_parked(hex_id(k), "rejected: x")
    status, out, _ = run(capsys, "outbox", "-c", str(config), "retry")
    assert status == 0 and "retried 2 parked rows" in out
    assert "left 1 parked row past their validity" in out
    # A channel the config does not name has no validity to end: its rows wait for it, as the worker's do.
    assert [box.row(hex_id(k))["status"] for k in (1, 2, 3)] == ["parked", "pending", "pending"]
    box.close()


def test_purge_refuses_pending_rows_and_deletes_finished_ones(tmp_path, capsys):
    config = write_config(tmp_path)
    rows = filled_outbox(tmp_path)
    box = Outbox(tmp_path / "outbox.db")
    status, _, err = run(capsys, "outbox", "-c", str(config), "purge", "--status", "pending")
    assert status == 2 and "--force" in err
    status, _, err = run(capsys, "outbox", "-c", str(config), "purge", "--status", "in-flight", "--dry-run")
    assert status == 2
    assert len(box.find(RowFilter())) == 6

    status, out, _ = run(capsys, "outbox", "-c", str(config), "purge", "--dry-run")
    assert status == 0 and "would delete 4 rows (delivered 1, parked 2, holdout 1)" in out
    assert len(box.find(RowFilter())) == 6

    status, out, _ = run(capsys, "outbox", "-c", str(config), "purge", "--older-than", "2d")
    assert status == 0 and "deleted 2 rows (delivered 1, parked 1)" in out
    assert {r["id"] for r in box.find(RowFilter())} == set(rows) - {hex_id(1), hex_id(2)}

    status, out, _ = run(capsys, "outbox", "-c", str(config), "purge")
    assert status == 0 and "deleted 2 rows (parked 1, holdout 1)" in out
    assert "left 2 matching rows of other statuses (pending 2)" in out
    assert {r["status"] for r in box.find(RowFilter())} == {"pending"}

    status, out, _ = run(capsys, "outbox", "-c", str(config), "purge", "--status", "pending", "--channel", "crm",
                         "--force")
    assert status == 0 and "deleted 1 row (pending 1)" in out
    assert [r["id"] for r in box.find(RowFilter())] == [hex_id(3)]
    box.close()


def test_changes_go_a_chunk_of_rows_per_statement(tmp_path, monkeypatch):
    """Short transactions: a daemon writing beside a purge or a retry waits for one chunk, not for all of it."""
    box = Outbox(tmp_path / "outbox.db")
    box.enqueue(instruction_table([hex_id(k) for k in range(95)]))
    for k in range(95):
        box.mark_parked(hex_id(k), "rejected: x")
    monkeypatch.setattr(Outbox, "CHUNK", 10)
    statements: list[str] = []
    box._db.set_trace_callback(statements.append)
    assert box.retry_parked(RowFilter(limit=45), {}) == 45
    assert sum(s.startswith("UPDATE") for s in statements) == 5
    statements.clear()
    assert box.delete_rows(RowFilter(statuses=("pending", "parked"))) == {"pending": 45, "parked": 50}
    assert sum(s.startswith("DELETE") for s in statements) == 10
    assert box.find(RowFilter()) == []
    box.close()


def test_outbox_commands_beside_a_writing_daemon_and_in_a_subprocess(tmp_path):
    config = write_config(tmp_path)
    output = OutboxOutput("box", tmp_path / "outbox.db")
    stop = time.monotonic() + 1.0
    k = 0
    with output:
        process = subprocess.Popen([sys.executable, "-m", "engine.cli", "outbox", "-c", str(config), "purge",
                                    "--status", "pending", "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while time.monotonic() < stop or process.poll() is None:  # the daemon's writer keeps committing meanwhile
            output.send(instruction_table([hex_id(k * 10 + j) for j in range(10)]))
            k += 1
            time.sleep(0.005)
        output.flush()
        assert output.stats()["write_errors"] == 0
    out, err = process.communicate()
    assert process.returncode == 0, err
    assert re.fullmatch(rb"deleted [\d,]+ rows( \(pending [\d,]+\))?\n", out)
    listed = subprocess.run([sys.executable, "-m", "engine.cli", "outbox", "-c", str(config), "list", "--json",
                             "--limit", "100000"], capture_output=True, check=True)
    deleted = int(out.split()[1].replace(b",", b""))
    assert len(listed.stdout.splitlines()) == k * 10 - deleted


def test_outbox_refuses_a_config_without_an_outbox_and_a_missing_file(tmp_path, capsys):
    status, _, err = run(capsys, "outbox", "-c", str(write_config(tmp_path, outbox=False)), "list")
    assert status == 2 and 'no output has type = "outbox"' in err
    status, _, err = run(capsys, "outbox", "-c", str(write_config(tmp_path)), "list")
    assert status == 1 and "no outbox at" in err and not (tmp_path / "outbox.db").exists()
    status, _, err = run(capsys, "outbox", "list")
    assert status == 2 and "--config is required" in err
    status, _, err = run(capsys, "outbox", "-c", str(write_config(tmp_path)), "list", "--status", "sent")
    assert status == 2 and "unknown status 'sent'" in err


# ---------------------------------------------------------------------------
# Dead-letter retention


def dead_file(directory: Path, name: str, size: int, age_days: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"deadletter-{name}.jsonl"
    path.write_bytes(b"x" * (size - 1) + b"\n")
    at = time.time() - age_days * 86_400
    os.utime(path, (at, at))
    return path


def test_retention_deletes_the_oldest_files_first_and_never_the_current_one(tmp_path):
    directory = tmp_path / "dead"
    oldest = dead_file(directory, "20250101T000000-1", 4000, age_days=5)
    older = dead_file(directory, "20250102T000000-1", 4000, age_days=4)
    old = dead_file(directory, "20250103T000000-1", 4000, age_days=3)
    letters = DeadLetterFile(directory, rotate_bytes=4000, keep_bytes=10_000, keep_ms=30 * DAY_MS)
    try:
        letters.write("switch", make_decoder("ndjson").decode(b'{"ts": 1}\n').rejects)
        assert not oldest.exists() and older.exists() and old.exists()  # 12,000 bytes: the oldest goes
        assert letters.deleted_files == 1 and letters.path.exists()
        # Over the budget with the current file alone: every other file goes, the current one stays.
        letters.keep_bytes = 1
        letters.rotate_bytes = 1
        letters.write("switch", make_decoder("ndjson").decode(b'{"ts": 2}\n').rejects)
        assert [p for p, _ in dead_letter_files(directory)] == [letters.path]
        assert [e["record"] for _, e in entries(letters.path)] == ['{"ts": 2}']
    finally:
        letters.close()


def test_retention_by_age_and_a_file_another_writer_holds(tmp_path):
    directory = tmp_path / "dead"
    too_old = dead_file(directory, "20250101T000000-1", 100, age_days=31)
    recent = dead_file(directory, "20250201T000000-1", 100, age_days=29)
    other = DeadLetterFile(directory, keep_ms=365 * DAY_MS)  # a second writer on this directory
    other.write("switch", make_decoder("ndjson").decode(b"[1]\n").rejects)
    held = other.path
    os.utime(held, (time.time() - 40 * 86_400,) * 2)
    letters = DeadLetterFile(directory, keep_ms=30 * DAY_MS)
    try:
        letters.write("switch", make_decoder("ndjson").decode(b"[2]\n").rejects)
        assert not too_old.exists() and recent.exists()
        assert held.exists()  # older than keep, but being written by another writer
    finally:
        letters.close()
        other.close()


def test_deadletter_retention_keys_in_the_config(tmp_path):
    base = '[engine]\nrules = "r.toml"\n[inputs.a]\nendpoint = "tcp://127.0.0.1:5999"\n[outputs.o]\ntype = "file"\n'
    config = parse_config(base, "k.toml", tmp_path)
    assert (config.deadletter_keep_bytes, config.deadletter_keep_ms) == (1 << 30, 30 * DAY_MS)
    config = parse_config(base + '[deadletter]\nkeep_bytes = "2GiB"\nkeep = "7d"\n', "k.toml", tmp_path)
    assert (config.deadletter_keep_bytes, config.deadletter_keep_ms) == (2 << 30, 7 * DAY_MS)
    assert parse_config(base + "[deadletter]\nkeep_bytes = 70000000\n", "k.toml", tmp_path).deadletter_keep_bytes \
        == 70_000_000
    for table, message in (('keep_bytes = "1MiB"', "cannot hold one file of rotate_bytes"),
                           ('keep_bytes = "lots"', "is not a size"), ('keep = "0s"', "longer than 0ms"),
                           ('keep = "forever"', "deadletter.keep")):
        with pytest.raises(ValueError, match=message):
            parse_config(base + f"[deadletter]\n{table}\n", "k.toml", tmp_path)


# ---------------------------------------------------------------------------
# kairos deadletters

BROKEN_FIELDS = {"msisdn": "caller"}  # the feed calls it calling_number: every row is refused, missing_field
FIXED_FIELDS = {"msisdn": "calling_number"}
TS = 1_767_225_600_000  # 2026-01-01


def ndjson_lines(rows: list[dict]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def arrow_message(columns: dict[str, list]) -> bytes:
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def mediation_rows() -> list[dict]:
    return [{"ts": TS + k, "calling_number": 8613800000000 + k, "kind": "call_out", "duration": 30 + k}
            for k in range(3)]


def refuse(letters: DeadLetterFile, name: str, format: str, fields: dict, message: bytes, columns=None) -> int:
    """Decode `message` as the daemon did with `fields`, and dead-letter what was refused; returns rejects."""
    decoded = make_decoder(format, FieldMap.from_config(fields), columns=columns).decode(message)
    letters.write(name, decoded.rejects)
    return len(decoded.rejects)


def replay_config(tmp_path: Path, ports: dict[str, int], mediation_fields: dict) -> Path:
    fields = "".join(f'{k} = "{v}"\n' for k, v in mediation_fields.items())
    inputs = (f'[inputs.mediation]\nendpoint = "tcp://127.0.0.1:{ports["mediation"]}"\nformat = "ndjson"\n'
              f'[inputs.mediation.fields]\n{fields}\n'
              f'[inputs.switch]\nendpoint = "tcp://127.0.0.1:{ports["switch"]}"\nformat = "arrow"\n'
              f'[inputs.switch.fields]\nmsisdn = "calling_number"\n\n'
              f'[inputs.probe]\nendpoint = "tcp://127.0.0.1:{ports["probe"]}"\nformat = "msgpack"\n'
              f'columns = ["ts", "msisdn", "kind"]\n'
              f'[inputs.probe.fields]\nkind = {{ map = {{ MOC = "call_out" }} }}\n\n'
              f'[inputs.outcomes]\nendpoint = "tcp://127.0.0.1:{ports["outcomes"]}"\nformat = "ndjson"\n'
              f'role = "feedback"\n')
    return write_config(tmp_path, inputs=inputs, outbox=False, more='[ingest]\nmemory = "1GiB"\n')


@pytest.fixture
def pull_sockets():
    context = zmq.Context()
    sockets = {}
    for name in ("mediation", "switch", "probe", "outcomes"):
        socket = context.socket(zmq.PULL)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind("tcp://127.0.0.1:*")
        sockets[name] = socket
    yield sockets
    for socket in sockets.values():
        socket.close(0)
    context.term()


def port_of(socket: zmq.Socket) -> int:
    return int(socket.getsockopt(zmq.LAST_ENDPOINT).decode().rpartition(":")[2])


def receive_all(socket: zmq.Socket, timeout_ms: int = 2000) -> list[bytes]:
    got = []
    while socket.poll(timeout_ms):
        got.append(socket.recv())
        timeout_ms = 200
    return got


def write_refusals(directory: Path) -> DeadLetterFile:
    """What a daemon with a broken field map on `mediation` refused, and a few records nothing fixes."""
    letters = DeadLetterFile(directory)
    # mediation: three rows refused for the missing msisdn (the field map names the wrong field) ...
    assert refuse(letters, "mediation", "ndjson", BROKEN_FIELDS, ndjson_lines(mediation_rows())) == 3
    # ... and one whose msisdn is not a subscriber's, which no field map fixes.
    bad = {"ts": TS, "calling_number": -5, "kind": "call_out"}
    assert refuse(letters, "mediation", "ndjson", BROKEN_FIELDS, ndjson_lines([bad])) == 1
    # switch (Arrow): a whole message refused for want of a column, before its field map was added.
    whole = arrow_message({"ts": [TS, TS + 1], "calling_number": [8613900000001, 8613900000002], "kind": [0, 0]})
    assert refuse(letters, "switch", "arrow", {}, whole) == 1
    # probe (msgpack arrays): a row refused for a kind name its value map did not have yet; bytes that are no
    # message; a feedback input's refusal.
    probe = msgpack.packb([[TS, 8613700000001, 0], [TS, 8613700000002, "MOC"]])
    assert refuse(letters, "probe", "msgpack", {}, probe, columns=["ts", "msisdn", "kind"]) == 1
    assert refuse(letters, "probe", "msgpack", {}, b"\x01" * 10) == 1  # not an array at all
    assert refuse(letters, "outcomes", "ndjson", {}, b"not json\n") == 1  # feedback: not events
    letters.close()
    return letters


def test_deadletters_list_counts_by_input_and_reason(tmp_path, capsys, pull_sockets):
    config = replay_config(tmp_path, {n: port_of(s) for n, s in pull_sockets.items()}, FIXED_FIELDS)
    write_refusals(tmp_path / "dead")
    status, out, err = run(capsys, "deadletters", "-c", str(config), "list")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'dead'}: 1 dead-letter file, ")
    table = {tuple(line.split()[:2]): line.split()[2] for line in lines[3:]}
    assert table == {("mediation", "missing_field"): "4", ("switch", "missing_field"): "1", ("probe", "kind"): "1",
                     ("probe", "not_records"): "1",
                     ("outcomes", "undecodable"): "1"}
    status, out, _ = run(capsys, "deadletters", "-c", str(config), "list", "--input", "mediation", "--verbose")
    assert status == 0 and len([line for line in out.splitlines() if ".jsonl:" in line]) == 4
    assert "row 0: field 'caller' (msisdn) is missing" in out
    status, out, _ = run(capsys, "deadletters", "list", "-c", str(config), "--json", "--reason", "missing_field")
    found = [orjson.loads(line) for line in out.splitlines()]
    assert [(e["input"], e["line"]) for e in found] == [("mediation", 1), ("mediation", 2), ("mediation", 3),
                                                        ("mediation", 4), ("switch", 5)]
    assert found[0]["record"] == orjson.dumps(mediation_rows()[0]).decode()
    status, out, _ = run(capsys, "deadletters", "-c", str(config), "list", "--older-than", "1h")
    assert status == 0 and "no dead letters match" in out


def test_replay_sends_what_now_decodes_to_the_input_and_keeps_the_rest(tmp_path, capsys, pull_sockets):
    ports = {n: port_of(s) for n, s in pull_sockets.items()}
    directory = tmp_path / "dead"
    write_refusals(directory)
    # Before the fix nothing of mediation's decodes; a dry run sends nothing and removes nothing.
    config = replay_config(tmp_path, ports, BROKEN_FIELDS)
    status, out, _ = run(capsys, "deadletters", "-c", str(config), "replay", "--input", "mediation", "--dry-run")
    assert status == 0 and "would send nothing" in out
    assert "left 4: still refused by the decoder of input 'mediation': missing_field" in out

    config = replay_config(tmp_path, ports, FIXED_FIELDS)
    status, out, _ = run(capsys, "deadletters", "-c", str(config), "replay", "--dry-run")
    assert status == 0 and "would send 3 dead letters (3 events) to input 'mediation'" in out
    assert receive_all(pull_sockets["mediation"], 300) == []
    lines_before = sum(1 for _ in entries(dead_letter_files(directory)[0][0]))

    status, out, _ = run(capsys, "deadletters", "-c", str(config), "replay")
    assert status == 0, out
    assert f"sent 3 dead letters (3 events) to input 'mediation' at tcp://127.0.0.1:{ports['mediation']}" in out
    assert f"sent 1 dead letter (2 events) to input 'switch' at tcp://127.0.0.1:{ports['switch']}" in out
    assert f"sent 1 dead letter (1 event) to input 'probe' at tcp://127.0.0.1:{ports['probe']}" in out
    assert "left 1: still refused by the decoder of input 'mediation': msisdn" in out
    assert "left 1: input 'outcomes' carries feedback" in out

    # What arrived is what the daemon's decoder, with the fixed map, takes: the refused events, all of them.
    fixed = make_decoder("ndjson", FieldMap.from_config(FIXED_FIELDS))
    got = [fixed.decode(m) for m in receive_all(pull_sockets["mediation"])]
    assert all(not d.rejects for d in got)
    assert sorted(int(m) for d in got for m in d.batch["msisdn"]) == [r["calling_number"] for r in mediation_rows()]
    switch = [make_decoder("arrow", FieldMap.from_config(FIXED_FIELDS)).decode(m)
              for m in receive_all(pull_sockets["switch"])]
    assert [list(d.batch["msisdn"]) for d in switch] == [[8613900000001, 8613900000002]]
    probe = make_decoder("msgpack", FieldMap.from_config({"kind": {"map": {"MOC": "call_out"}}}),
                         columns=["ts", "msisdn", "kind"])
    (decoded,) = [probe.decode(m) for m in receive_all(pull_sockets["probe"])]
    assert not decoded.rejects and (list(decoded.batch["msisdn"]), list(decoded.batch["kind"])) == ([8613700000002],
                                                                                                   [0])
    assert receive_all(pull_sockets["outcomes"], 200) == []

    # The records sent left the dead-letter file; those that still fail stayed, in their order.
    (path, _), = dead_letter_files(directory)
    kept = [(e["input"], e["reason"]) for _, e in entries(path)]
    assert kept == [("mediation", "missing_field"), ("probe", "not_records"), ("outcomes", "undecodable")]
    assert lines_before - len(kept) == 5
    # Run again: nothing more to send.
    status, out, _ = run(capsys, "deadletters", "-c", str(config), "replay")
    assert status == 0 and "sent nothing" in out and receive_all(pull_sockets["mediation"], 200) == []


def test_replay_leaves_the_file_being_written_and_says_when_no_daemon_listens(tmp_path, capsys, pull_sockets):
    ports = {n: port_of(s) for n, s in pull_sockets.items()}
    config = replay_config(tmp_path, ports, FIXED_FIELDS)
    directory = tmp_path / "dead"
    live = DeadLetterFile(directory)  # the running daemon's: open, and written to
    refuse(live, "mediation", "ndjson", BROKEN_FIELDS, ndjson_lines(mediation_rows()[:1]))
    try:
        status, out, _ = run(capsys, "deadletters", "-c", str(config), "replay")
        assert status == 0 and "sent nothing" in out and "the file the daemon writes now" in out
        assert receive_all(pull_sockets["mediation"], 300) == []
        assert len(list(entries(live.path))) == 1
    finally:
        live.close()
    status, _, err = run(capsys, "deadletters", "-c", str(config), "replay", "--to", "tcp://127.0.0.1:1")
    assert status == 2 and "--input" in err
    pull_sockets["mediation"].close(0)  # the daemon is gone
    status, out, err = run(capsys, "deadletters", "-c", str(config), "replay", "--timeout", "0.3")
    assert status == 1 and "no daemon took a message" in out
    assert len(list(entries(dead_letter_files(directory)[0][0]))) == 1  # kept: it was not sent


def test_deadletters_purge_by_age(tmp_path, capsys):
    config = write_config(tmp_path, outbox=False)
    directory = tmp_path / "dead"
    old = dead_file(directory, "20250101T000000-1", 100, age_days=10)
    recent = dead_file(directory, "20250110T000000-1", 100, age_days=1)
    live = DeadLetterFile(directory)
    live.write("switch", make_decoder("ndjson").decode(b"[1]\n").rejects)
    os.utime(live.path, (time.time() - 20 * 86_400,) * 2)
    try:
        status, out, _ = run(capsys, "deadletters", "-c", str(config), "purge", "--older-than", "7d", "--dry-run")
        assert status == 0 and "would delete 2 dead-letter files" in out and old.exists()
        status, out, _ = run(capsys, "deadletters", "-c", str(config), "purge", "--older-than", "7d")
        assert status == 0 and "deleted 1 dead-letter file" in out and "1 being written, kept" in out
        assert not old.exists() and recent.exists() and live.path.exists()
    finally:
        live.close()
    with pytest.raises(SystemExit):
        main(["deadletters", "-c", str(config), "purge"])  # --older-than is required


# ---------------------------------------------------------------------------
# Version and build info


def pyproject_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def test_version(capsys, monkeypatch):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"kairos {pyproject_version()}\n"
    assert engine.__version__ == pyproject_version()
    done = subprocess.run([sys.executable, "-m", "engine.cli", "--version"], capture_output=True, text=True,
                          check=True)
    assert done.stdout == f"kairos {pyproject_version()}\n"

    def not_installed(name):
        raise _version.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_version.importlib.metadata, "version", not_installed)
    assert _version.read_version() == pyproject_version()  # a source tree that is not installed


def test_build_info_and_server_header_from_a_daemon(tmp_path):
    from engine.daemon import Daemon

    (tmp_path / "rules.toml").write_text((ROOT / "engine" / "data" / "demo_rules.toml").read_text())
    config_path = write_config(tmp_path, outbox=False, deadletter='keep_bytes = "512MiB"\nkeep = "3d"\n',
                               engine_keys="initial_subscribers = 1024\n",
                               more='[metrics]\nlisten = "127.0.0.1:0"\n',
                               inputs='[inputs.switch]\nendpoint = "tcp://127.0.0.1:0"\n')
    config = load_config(config_path)
    daemon = Daemon(config)
    try:
        assert (daemon.deadletter.keep_bytes, daemon.deadletter.keep_ms) == (512 << 20, 3 * DAY_MS)
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_server.port}/metrics", timeout=10) as reply:
            body = reply.read().decode()
            server = reply.headers["Server"]
    finally:
        daemon._close()
    assert server == f"kairos/{pyproject_version()}"
    info = [line for line in body.splitlines() if line.startswith("kairos_build_info")]
    assert info == [f'kairos_build_info{{version="{pyproject_version()}",python="{sys.version.split()[0]}",'
                    f'pyarrow="{pa.__version__}",numpy="{__import__("numpy").__version__}"}} 1']
    assert "# TYPE kairos_build_info gauge" in body
