"""The daemon end to end: `kairos run` as a subprocess, fed over real ZeroMQ sockets.

Each test starts the real daemon with its own config in a temporary
directory, sends traffic in one of the wire formats, and reads the
instructions back from the file output (JSON lines) or a ZeroMQ output
socket.  What the daemon produced is compared with an in-process Engine run
over the same valid events: coalescing, decoding and draining must not
change a single instruction.
"""

from __future__ import annotations

import importlib.resources
import os
import signal
import socket as socketlib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import orjson
import pyarrow as pa
import pytest
import zmq

from adapters.zmq_input import sequence_header
from engine import Engine
from engine.schema import EVENT_COLUMNS, KINDS
from engine.synth import TrafficGenerator

RULES = importlib.resources.files("engine").joinpath("data", "demo_rules.toml").read_text(encoding="utf-8")
START_TIMEOUT = 60.0


class DaemonProcess:
    """`kairos run -c CONFIG` in a subprocess, with its JSON logs in a file."""

    def __init__(self, directory: Path, config: str, rules: str = RULES):
        self.directory = directory
        (directory / "rules.toml").write_text(rules, encoding="utf-8")
        self.config_path = directory / "kairos.toml"
        self.config_path.write_text(config, encoding="utf-8")
        self.log_path = directory / "daemon.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "run", "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL, stderr=self._log, cwd=directory,
        )
        self.started = self.wait_for_log("started")
        host_port = self.started.get("metrics")
        self.metrics_url = f"http://{host_port}" if host_port else None

    def logs(self) -> list[dict]:
        lines = self.log_path.read_bytes().splitlines()
        return [orjson.loads(line) for line in lines if line.startswith(b"{")]

    def wait_for_log(self, msg: str, timeout: float = START_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.logs():
                if entry["msg"] == msg:
                    return entry
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}: {self.log_path.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"no {msg!r} in the daemon's log: {self.log_path.read_text()}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as err:
            body = err.read().decode()
            err.close()
            return err.code, body

    def post(self, path: str) -> tuple[int, dict]:
        request = urllib.request.Request(self.metrics_url + path, method="POST", data=b"")
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                return reply.status, orjson.loads(reply.read())
        except urllib.error.HTTPError as err:
            body = orjson.loads(err.read())
            err.close()
            return err.code, body

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample in /metrics (0 when absent)."""
        _, text = self.get("/metrics")
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            metric, _, label_text = series.partition("{")
            if metric == name and ",".join(sorted(label_text.rstrip("}").split(","))) == wanted:
                return float(value)
        return 0.0

    def wait_for_metric(self, name: str, at_least: float, timeout: float = 60.0, **labels: str) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.metric(name, **labels)
            if value >= at_least:
                return value
            time.sleep(0.05)
        raise AssertionError(f"{name}{labels} stayed at {self.metric(name, **labels)}, wanted {at_least}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log.close()


@pytest.fixture
def daemons():
    started: list[DaemonProcess] = []

    def start(directory: Path, config: str, rules: str = RULES) -> DaemonProcess:
        daemon = DaemonProcess(directory, config, rules)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop(signal.SIGKILL) if daemon.process.poll() is None else daemon._log.close()


class Sockets:
    """ZeroMQ sockets of one test, all closed at its end."""

    def __init__(self):
        self.context = zmq.Context()
        self.open: list[zmq.Socket] = []

    def push(self, endpoint: str) -> zmq.Socket:
        return self.make(zmq.PUSH, endpoint)

    def make(self, kind: int, endpoint: str) -> zmq.Socket:
        socket = self.context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint)
        self.open.append(socket)
        return socket

    def close(self):
        for socket in self.open:
            socket.close(0)
        self.context.term()


@pytest.fixture
def sockets():
    made = Sockets()
    yield made
    made.close()


def config_text(directory: Path, inputs: str, outputs: str | None = None, extra: str = "") -> str:
    outputs = outputs or '[outputs.file]\ntype = "file"\npath = "out"\nformat = "jsonl"\n'
    return f"""
[engine]
rules = "rules.toml"
initial_subscribers = 4096
{extra}
[metrics]
listen = "127.0.0.1:0"

[deadletter]
path = "dead"

[batching]
linger = "2ms"

{inputs}
{outputs}
"""


def traffic(events: int = 40_000, batch: int = 5_000, seed: int = 3) -> list[pa.RecordBatch]:
    return list(TrafficGenerator(3_000, seed=seed).batches(events, batch))


def arrow_message(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def expected_instructions(batches, rules: str = RULES) -> pa.Table:
    engine = Engine.from_text(rules)
    return pa.concat_tables([engine.process(b) for b in batches])


def file_instructions(directory: Path) -> list[dict]:
    rows = []
    for path in sorted(directory.glob("*.jsonl"), key=lambda p: int(p.stem.rsplit("-", 1)[1])):
        rows.extend(orjson.loads(line) for line in path.read_bytes().splitlines())
    return rows


def comparable(rows) -> list[tuple]:
    return [(r["id"], r["ts"], r["msisdn"], r["rule"], r["channel"], r["template"]) for r in rows]


def test_arrow_feed_gives_the_instructions_an_embedded_engine_gives(tmp_path, daemons, sockets):
    batches = traffic()
    endpoint = f"ipc://{tmp_path}/switch"
    daemon = daemons(tmp_path, config_text(tmp_path, f'[inputs.switch]\nendpoint = "{endpoint}"\n'))
    feeder = sockets.push(endpoint)
    for seq, batch in enumerate(batches):
        feeder.send_multipart([sequence_header(7, seq), arrow_message(batch)])
    total = sum(b.num_rows for b in batches)
    daemon.wait_for_metric("kairos_events_total", total)
    assert daemon.stop() == 0
    got = file_instructions(tmp_path / "out")
    expected = expected_instructions(batches)
    assert expected.num_rows > 50
    assert comparable(got) == comparable(expected.to_pylist())
    logs = daemon.logs()
    assert any(e["msg"] == "stopped" and e["instructions"] == expected.num_rows for e in logs)
    assert not any(e["msg"] == "sequence gap" for e in logs)


def test_msgpack_and_ndjson_feeds_with_field_maps_and_bad_input(tmp_path, daemons, sockets):
    batches = traffic(events=12_000, batch=3_000)
    table = pa.Table.from_batches(batches)
    columns = [c for c in EVENT_COLUMNS if c in table.column_names]
    rows = [list(r) for r in zip(*(table.column(c).to_pylist() for c in columns), strict=True)]
    half = len(rows) // 2
    inputs = f"""
[inputs.probe]
endpoint = "ipc://{tmp_path}/probe"
format = "msgpack"
columns = {orjson.dumps(columns).decode()}

[inputs.mediation]
endpoint = "ipc://{tmp_path}/mediation"
format = "ndjson"

[inputs.mediation.fields]
msisdn = "calling_number"
ts = {{ from = "start_s", scale = 1000 }}
kind = {{ from = "kind_name" }}
"""
    daemon = daemons(tmp_path, config_text(tmp_path, inputs))
    probe = sockets.push(f"ipc://{tmp_path}/probe")
    mediation = sockets.push(f"ipc://{tmp_path}/mediation")
    # The first half by msgpack, in messages of 500 rows; one row is broken (msisdn 0) and one message is garbage.
    first = [list(r) for r in rows[:half]]
    broken_row = 123
    first[broken_row][columns.index("msisdn")] = 0
    for start in range(0, half, 500):
        probe.send(msgpack.packb(first[start:start + 500]))
    probe.send(b"\xc1 not msgpack at all")
    daemon.wait_for_metric("kairos_input_messages_total", half // 500 + 1, input="probe")
    # The second half as NDJSON in the mediation system's own names; ts in whole seconds.
    lines = []
    for r in rows[half:]:
        event = dict(zip(columns, r, strict=True))
        event["ts"] = event["ts"] // 1000 * 1000  # the feed has second resolution
        mapped = {k: v for k, v in event.items() if k not in ("msisdn", "ts", "kind")}
        mapped.update(calling_number=event["msisdn"], start_s=event["ts"] // 1000, kind_name=KINDS[event["kind"]])
        lines.append(orjson.dumps(mapped))
    lines.insert(10, b'{"calling_number": 1, "start_s": "yesterday", "kind_name": "call_out"}')
    lines.insert(20, b"{not json")
    mediation.send(b"\n".join(lines[:len(lines) // 2]))
    mediation.send(b"\n".join(lines[len(lines) // 2:]))
    valid = len(rows) - 1
    daemon.wait_for_metric("kairos_events_total", valid)
    assert daemon.metric("kairos_dead_letters_total", input="probe", reason="msisdn") == 1
    assert daemon.metric("kairos_dead_letters_total", input="probe", reason="undecodable") == 1
    assert daemon.metric("kairos_dead_letters_total", input="mediation", reason="undecodable") == 1
    assert daemon.metric("kairos_dead_letters_total", input="mediation", reason="bad_value") == 1
    assert daemon.stop() == 0

    kept = [r for i, r in enumerate(rows) if i != broken_row]
    kept_second = [list(r) for r in kept[half - 1:]]
    for r in kept_second:
        r[columns.index("ts")] = r[columns.index("ts")] // 1000 * 1000
    events = kept[:half - 1] + kept_second
    batch = {c: np.array([r[i] for r in events], dtype=table.schema.field(c).type.to_pandas_dtype())
             for i, c in enumerate(columns)}
    expected = expected_instructions([batch])
    got = file_instructions(tmp_path / "out")
    assert comparable(got) == comparable(expected.to_pylist())
    dead_files = (tmp_path / "dead").glob("*.jsonl")
    dead = [orjson.loads(line) for path in dead_files for line in path.read_bytes().splitlines()]
    assert sorted((d["input"], d["reason"]) for d in dead) == [
        ("mediation", "bad_value"), ("mediation", "undecodable"), ("probe", "msisdn"), ("probe", "undecodable")]
    garbage = next(d for d in dead if d["input"] == "probe" and d["reason"] == "undecodable")
    assert "not msgpack at all" in (garbage.get("record") or "") or garbage.get("record_b64")


def test_zmq_output_and_sequence_gaps_and_health(tmp_path, daemons, sockets):
    batches = traffic(events=25_000)
    out_endpoint = f"ipc://{tmp_path}/instructions"
    outputs = f'[outputs.downstream]\ntype = "zmq"\nendpoint = "{out_endpoint}"\nformat = "arrow"\n'
    endpoint = f"ipc://{tmp_path}/switch"
    daemon = daemons(tmp_path, config_text(tmp_path, f'[inputs.switch]\nendpoint = "{endpoint}"\n', outputs))
    receiver = sockets.make(zmq.PULL, out_endpoint)
    assert daemon.get("/healthz") == (200, "ok\n")
    assert daemon.get("/readyz")[0] == 200
    feeder = sockets.push(endpoint)
    # Sender 1 skips messages 2 and 3; sender 2 restarts from 0.
    sequence = [(1, 0), (1, 1), (1, 4), (2, 5), (2, 0)]
    for (sender, seq), batch in zip(sequence, batches, strict=True):
        feeder.send_multipart([sequence_header(sender, seq), arrow_message(batch)])
    daemon.wait_for_metric("kairos_events_total", sum(b.num_rows for b in batches[:5]))
    assert daemon.metric("kairos_input_sequence_gaps_total", input="switch") == 1
    assert daemon.metric("kairos_input_sequence_missing_total", input="switch") == 2
    assert daemon.metric("kairos_input_sequence_regressions_total", input="switch") == 1
    assert daemon.stop() == 0
    got = []
    while receiver.poll(2000):
        got.extend(pa.ipc.open_stream(receiver.recv()).read_all().to_pylist())
    expected = expected_instructions(batches[:5])
    assert comparable(got) == comparable(expected.to_pylist())
    gap = next(e for e in daemon.logs() if e["msg"] == "sequence gap")
    assert (gap["input"], gap["sender"], gap["expected"], gap["got"]) == ("switch", 1, 2, 4)


def test_reload_on_sighup_and_control_keeps_state_and_refuses_bad_rules(tmp_path, daemons, sockets, batch):
    rules = """
[[rule]]
id = "hotline"
on = "call_out"
where = "peer == 12122"
count = { at_least = 2, within = "1d" }
channels = ["sms"]
template = "hotline_v1"
cooldown = "0s"
"""
    endpoint = f"ipc://{tmp_path}/switch"
    daemon = daemons(tmp_path, config_text(tmp_path, f'[inputs.switch]\nendpoint = "{endpoint}"\n'), rules)
    feeder = sockets.push(endpoint)

    def call(ts: int, n_events: int) -> None:
        event = batch([{"ts": ts, "msisdn": 8613800000001, "kind": 0, "peer": 12122}])
        feeder.send(arrow_message(pa.RecordBatch.from_pydict(event)))
        daemon.wait_for_metric("kairos_events_total", n_events)

    call(1_000, 1)
    (tmp_path / "rules.toml").write_text(rules.replace("hotline_v1", "hotline_v2"), encoding="utf-8")
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for_metric("kairos_rules_reloads_total", 1, result="ok")
    call(2_000, 2)  # the second call in the window: the count survived the reload
    (tmp_path / "rules.toml").write_text(rules.replace('"peer == 12122"', '"peer === 12122"'), encoding="utf-8")
    status, reply = daemon.post("/control/reload")
    assert status == 400 and not reply["ok"] and "hotline" in reply["message"]
    call(3_000, 3)  # the old rules keep running
    (tmp_path / "rules.toml").write_text(rules.replace("hotline_v1", "hotline_v3"), encoding="utf-8")
    status, reply = daemon.post("/control/reload")
    assert status == 200 and reply["ok"], reply
    call(4_000, 4)
    assert daemon.stop() == 0
    assert [r["template"] for r in file_instructions(tmp_path / "out")] == ["hotline_v2", "hotline_v2", "hotline_v3"]
    refused = next(e for e in daemon.logs() if e["msg"].startswith("reload refused"))
    assert "===" in refused["error"]


def test_state_survives_a_restart_through_the_state_dir(tmp_path, daemons, sockets, batch):
    rules = """
[[rule]]
id = "hotline"
on = "call_out"
where = "peer == 12122"
count = { at_least = 2, within = "1d" }
channels = ["sms"]
template = "t"
"""
    endpoint = f"ipc://{tmp_path}/switch"
    config = config_text(tmp_path, f'[inputs.switch]\nendpoint = "{endpoint}"\n', extra='state_dir = "state"')
    event = pa.RecordBatch.from_pydict(batch([{"ts": 1_000, "msisdn": 8613800000001, "kind": 0, "peer": 12122}]))
    first = daemons(tmp_path, config, rules)
    feeder = sockets.push(endpoint)
    feeder.send(arrow_message(event))
    first.wait_for_metric("kairos_events_total", 1)
    assert first.stop() == 0
    assert list((tmp_path / "state" / "checkpoints").glob("*/meta.json"))
    second = daemons(tmp_path, config, rules)
    assert next(e for e in second.logs() if e["msg"] == "state restored")["subscribers"] == 1
    feeder = sockets.push(endpoint)
    second_event = batch([{"ts": 2_000, "msisdn": 8613800000001, "kind": 0, "peer": 12122}])
    feeder.send(arrow_message(pa.RecordBatch.from_pydict(second_event)))
    second.wait_for_metric("kairos_events_total", 2)
    assert second.stop() == 0
    assert [r["ts"] for r in file_instructions(tmp_path / "out")] == [2_000]


def test_idle_feed_lets_event_time_follow_the_wall_clock(tmp_path, daemons, sockets, batch):
    endpoint = f"ipc://{tmp_path}/switch"
    config = config_text(tmp_path, f'[inputs.switch]\nendpoint = "{endpoint}"\n').replace(
        'linger = "2ms"', 'linger = "2ms"\nidle_advance = "200ms"')
    daemon = daemons(tmp_path, config)
    feeder = sockets.push(endpoint)
    feeder.send(arrow_message(pa.RecordBatch.from_pydict(batch([{"ts": 10_000, "msisdn": 5, "kind": 5}]))))
    daemon.wait_for_metric("kairos_events_total", 1)
    daemon.wait_for_metric("kairos_idle_advances_total", 1, timeout=10)
    watermark = daemon.wait_for_metric("kairos_event_time_watermark_ms", 10_300, timeout=10)
    time.sleep(0.5)
    assert daemon.metric("kairos_event_time_watermark_ms") >= watermark + 300
    assert daemon.stop() == 0


def test_absence_timers_fire_on_the_idle_clock_after_the_lateness(tmp_path, daemons, sockets, batch):
    rules = """
[[rule]]
id = "recharge_bonus"
on = "balance"
where = "balance < 500"
absence = { on = "recharge", within = "1s" }
channels = ["sms"]
params = ["balance"]

[[rule]]
id = "bonus_forecast"
on = "balance"
absence = { on = "recharge", within = "1s" }
channels = ["sms"]
shadow = true
"""
    endpoint = f"ipc://{tmp_path}/switch"
    config = config_text(tmp_path, f'[inputs.switch]\nendpoint = "{endpoint}"\n', extra='lateness = "500ms"').replace(
        'linger = "2ms"', 'linger = "2ms"\nidle_advance = "100ms"')
    daemon = daemons(tmp_path, config, rules)
    feeder = sockets.push(endpoint)
    feeder.send(arrow_message(pa.RecordBatch.from_pydict(batch([
        {"ts": 10_000, "msisdn": 5, "kind": 7, "balance": 300},  # balance: starts both timers
        {"ts": 10_000, "msisdn": 6, "kind": 7, "balance": 300},
        {"ts": 10_400, "msisdn": 6, "kind": 6, "amount": 100},  # recharge: cancels subscriber 6's
    ]))))
    # Due at 11,000; with 500 ms of lateness it fires once the idle clock passes 11,500.
    daemon.wait_for_metric("kairos_rule_sent_total", 1, rule="recharge_bonus", channel="sms", mode="live")
    assert daemon.metric("kairos_event_time_watermark_ms") >= 11_500
    assert daemon.metric("kairos_rule_sent_total", rule="bonus_forecast", channel="sms", mode="shadow") == 1
    assert daemon.stop() == 0
    (row,) = file_instructions(tmp_path / "out")
    assert (row["ts"], row["msisdn"], row["rule"], row["params"]) == (11_000, 5, "recharge_bonus", {"balance": "300"})


def test_bad_config_is_refused_at_start_with_the_key(tmp_path):
    (tmp_path / "rules.toml").write_text(RULES, encoding="utf-8")
    config = tmp_path / "kairos.toml"
    config.write_text(config_text(tmp_path, '[inputs.switch]\nendpoint = "tcp://0.0.0.0:5999"\n'), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "engine.cli", "run", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, env={**os.environ})
    assert result.returncode == 2
    assert "inputs.switch.endpoint" in result.stderr and "allow_remote" in result.stderr


def test_a_stalled_output_stops_the_feeds_instead_of_growing_memory(tmp_path, daemons, sockets):
    batches = traffic(events=60_000, batch=2_000)
    expected = expected_instructions(batches)
    out_endpoint = f"ipc://{tmp_path}/instructions"
    outputs = f'[outputs.downstream]\ntype = "zmq"\nendpoint = "{out_endpoint}"\nsndhwm = 1\n'
    endpoint = f"ipc://{tmp_path}/switch"
    inputs = f'[inputs.switch]\nendpoint = "{endpoint}"\nrcvhwm = 2\n'
    config = config_text(tmp_path, inputs, outputs).replace(
        'linger = "2ms"', 'linger = "2ms"\nmax_events = 2000\nmax_waiting_instructions = 20')
    daemon = daemons(tmp_path, config)
    feeder = sockets.push(endpoint)
    feeder.setsockopt(zmq.SNDHWM, 2)
    messages = [arrow_message(b) for b in batches]
    # Nobody reads the output: the daemon must stop reading, and the feeder must block, well before the end.
    accepted = 0
    deadline = time.monotonic() + 10
    while accepted < len(messages) and time.monotonic() < deadline:
        try:
            feeder.send(messages[accepted], zmq.NOBLOCK)
            accepted += 1
        except zmq.Again:
            time.sleep(0.05)
    assert accepted < len(messages) // 2
    waiting = daemon.metric("kairos_output_waiting_instructions", output="downstream")
    assert 20 <= waiting <= 20 + 2_000  # the limit plus at most one batch's instructions (one per event)
    received = daemon.metric("kairos_input_messages_total", input="switch")
    time.sleep(0.5)
    assert daemon.metric("kairos_input_messages_total", input="switch") == received  # not reading
    # A reader arrives: everything flows, nothing was lost.
    receiver = sockets.make(zmq.PULL, out_endpoint)
    feeder.setsockopt(zmq.SNDTIMEO, 30_000)
    for message in messages[accepted:]:
        feeder.send(message)
    daemon.wait_for_metric("kairos_events_total", sum(b.num_rows for b in batches))
    got = []
    while len(got) < expected.num_rows and receiver.poll(5000):
        got.extend(pa.ipc.open_stream(receiver.recv()).read_all().to_pylist())
    assert daemon.stop() == 0
    assert comparable(got) == comparable(expected.to_pylist())


def test_garbage_between_valid_messages_loses_nothing_valid(tmp_path, daemons, sockets):
    """Fuzzed input over the real socket: random bytes and mutated messages among valid ones."""
    rng = np.random.default_rng(11)
    batches = traffic(events=20_000, batch=1_000)
    endpoint = f"ipc://{tmp_path}/switch"
    daemon = daemons(tmp_path, config_text(tmp_path, f'[inputs.switch]\nendpoint = "{endpoint}"\n'))
    feeder = sockets.push(endpoint)
    valid = [arrow_message(b) for b in batches]
    garbage = 0
    for message in valid:
        for _ in range(rng.integers(0, 3)):
            kind = rng.integers(0, 3)
            if kind == 0:
                junk = rng.bytes(int(rng.integers(0, 2_000)))
            elif kind == 1:  # a valid message cut short
                junk = message[: int(rng.integers(1, len(message)))]
            else:  # a valid message with bytes flipped in its header
                junk = bytearray(message)
                for i in rng.integers(0, 200, 8):
                    junk[i] ^= 0xFF
                junk = bytes(junk)
            feeder.send(junk)
            garbage += 1
        feeder.send(message)
    total_messages = garbage + len(valid)
    daemon.wait_for_metric("kairos_input_messages_total", total_messages, input="switch")
    events = sum(b.num_rows for b in batches)
    daemon.wait_for_metric("kairos_events_total", events)
    assert daemon.stop() == 0
    assert daemon.process.returncode == 0
    # Mutated messages may still decode in part; no valid message may be lost or changed.
    got = comparable(file_instructions(tmp_path / "out"))
    expected = comparable(expected_instructions(batches).to_pylist())
    assert set(expected) <= set(got)
    dead_files = list((tmp_path / "dead").glob("*.jsonl"))
    assert sum(len(p.read_bytes().splitlines()) for p in dead_files) >= garbage // 2


def test_metrics_port_in_use_is_refused_at_start(tmp_path):
    (tmp_path / "rules.toml").write_text(RULES, encoding="utf-8")
    with socketlib.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "kairos.toml"
        text = config_text(tmp_path, f'[inputs.switch]\nendpoint = "ipc://{tmp_path}/switch"\n')
        config.write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'), encoding="utf-8")
        result = subprocess.run([sys.executable, "-m", "engine.cli", "run", "-c", str(config)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert str(port) in result.stderr


def test_sub_input_connecting_to_a_publisher_counts_what_the_topic_and_sequence_say(tmp_path, daemons, sockets):
    batches = traffic(events=10_000, batch=2_000)
    endpoint = f"ipc://{tmp_path}/signalling"
    publisher = sockets.context.socket(zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    publisher.bind(endpoint)
    sockets.open.append(publisher)
    inputs = f'[inputs.signalling]\nendpoint = "{endpoint}"\nsocket = "sub"\nbind = false\nsubscribe = ["loc"]\n'
    daemon = daemons(tmp_path, config_text(tmp_path, inputs))
    empty = arrow_message(pa.RecordBatch.from_pydict(
        {"ts": pa.array([], pa.int64()), "msisdn": pa.array([], pa.int64()), "kind": pa.array([], pa.uint8())}))
    # A subscription takes a moment to reach the publisher: until then PUB drops (the slow joiner).
    deadline = time.monotonic() + 30
    while daemon.metric("kairos_input_messages_total", input="signalling") < 1:
        assert time.monotonic() < deadline
        publisher.send_multipart([b"loc", empty])
        time.sleep(0.05)
    publisher.send_multipart([b"other-topic", arrow_message(batches[0])])  # not subscribed: never arrives
    for seq, batch in enumerate(batches):
        if seq != 2:  # message 2 is lost on the way
            publisher.send_multipart([b"loc", sequence_header(9, seq), arrow_message(batch)])
    kept = [b for seq, b in enumerate(batches) if seq != 2]
    daemon.wait_for_metric("kairos_events_total", sum(b.num_rows for b in kept))
    assert daemon.metric("kairos_input_sequence_missing_total", input="signalling") == 1
    assert daemon.stop() == 0
    assert comparable(file_instructions(tmp_path / "out")) == comparable(expected_instructions(kept).to_pylist())


def test_batcher_joins_messages_whose_optional_columns_differ(batch):
    from engine.daemon import Batcher

    batcher = Batcher(max_events=10)
    first = batch([{"ts": 1, "msisdn": 5, "kind": 0, "peer": 7}])
    second = batch([{"ts": 2, "msisdn": 6, "kind": 8, "imei": 9}, {"ts": 3, "msisdn": 6, "kind": 5}])
    batcher.add(first, 1, arrived=10.0)
    batcher.add(second, 2, arrived=11.0)
    joined, n, oldest = batcher.take()
    assert (n, oldest, batcher.n) == (3, 10.0, 0)
    assert joined["peer"].tolist() == [7, 0, 0] and joined["imei"].tolist() == [0, 9, 0]
    assert joined["kind"].tolist() == [0, 8, 5] and joined["imei"].dtype == np.int64
    assert "duration" not in joined
    batcher.add(first, 1, arrived=12.0)
    alone, n, _ = batcher.take()
    assert alone is first and n == 1  # one message: no copy


def test_feedback_input_closes_the_loop(tmp_path, daemons, sockets, batch):
    rules = """
[[rule]]
id = "hotline"
on = "call_out"
where = "peer == 12122"
channels = ["sms"]
template = "t"
cooldown = "0s"
"""
    out_endpoint = f"ipc://{tmp_path}/instructions"
    inputs = f"""
[inputs.switch]
endpoint = "ipc://{tmp_path}/switch"

[inputs.outcomes]
endpoint = "ipc://{tmp_path}/outcomes"
role = "feedback"
format = "ndjson"
"""
    outputs = f'[outputs.downstream]\ntype = "zmq"\nendpoint = "{out_endpoint}"\n'
    daemon = daemons(tmp_path, config_text(tmp_path, inputs, outputs), rules)
    receiver = sockets.make(zmq.PULL, out_endpoint)
    feeder, outcomes = sockets.push(f"ipc://{tmp_path}/switch"), sockets.push(f"ipc://{tmp_path}/outcomes")

    def call(ts: int) -> None:
        feeder.send(arrow_message(pa.RecordBatch.from_pydict(
            batch([{"ts": ts, "msisdn": 8613800000001, "kind": 0, "peer": 12122}]))))

    call(1_000)
    assert receiver.poll(30_000)
    (first,) = pa.ipc.open_stream(receiver.recv()).read_all().to_pylist()
    reports = [{"id": first["id"], "outcome": "accepted", "ts": 1_500},
               {"id": "f" * 32, "outcome": "accepted", "ts": 1_500},
               {"id": first["id"], "outcome": "maybe", "ts": 1_500}]
    outcomes.send(b"\n".join(orjson.dumps(r) for r in reports) + b"\n{broken")
    daemon.wait_for_metric("kairos_feedback_reports_total", 1, input="outcomes", result="applied")
    call(2_000)  # accepted: suppressed on every channel for good
    daemon.wait_for_metric("kairos_events_total", 2)
    assert daemon.metric("kairos_feedback_reports_total", input="outcomes", result="unknown") == 1
    assert daemon.metric("kairos_feedback_reports_total", input="outcomes", result="invalid") == 1
    assert daemon.metric("kairos_dead_letters_total", input="outcomes", reason="undecodable") == 1
    daemon.wait_for_metric("kairos_policy_stops_total", 1, rule="hotline", reason="suppressed")
    assert daemon.metric("kairos_rule_feedback_total", rule="hotline", outcome="accepted") == 1
    assert daemon.stop() == 0
    assert not receiver.poll(200)  # no second instruction


def test_profiles_from_the_config_and_their_reload(tmp_path, daemons, sockets, batch):
    rules = """
[[rule]]
id = "hotline"
on = "call_out"
channels = ["sms"]
template = "t"
cooldown = "0s"
"""
    (tmp_path / "profiles.csv").write_text("msisdn,opt_out\n8613800000001,true\n8613800000002,false\n",
                                           encoding="utf-8")
    endpoint = f"ipc://{tmp_path}/switch"
    config = config_text(tmp_path, f'[inputs.switch]\nendpoint = "{endpoint}"\n', extra='profiles = "profiles.csv"')
    daemon = daemons(tmp_path, config, rules)
    feeder = sockets.push(endpoint)

    def calls(ts: int, total: int) -> None:
        rows = [{"ts": ts, "msisdn": m, "kind": 0} for m in (8613800000001, 8613800000002)]
        feeder.send(arrow_message(pa.RecordBatch.from_pydict(batch(rows))))
        daemon.wait_for_metric("kairos_events_total", total)

    calls(1_000, 2)
    daemon.wait_for_metric("kairos_policy_stops_total", 1, rule="hotline", reason="opt_out")
    # The subscriber opts back in, the other out; a reload reads the profiles again.
    (tmp_path / "profiles.csv").write_text("msisdn,opt_out\n8613800000001,false\n8613800000002,true\n",
                                           encoding="utf-8")
    status, reply = daemon.post("/control/reload")
    assert status == 200, reply
    calls(2_000, 4)
    assert daemon.stop() == 0
    assert [(r["ts"], r["msisdn"]) for r in file_instructions(tmp_path / "out")] == [
        (1_000, 8613800000002), (2_000, 8613800000001)]


def test_a_reload_whose_profile_tests_the_profiles_cannot_serve_is_refused(tmp_path, daemons, sockets, batch):
    rules = """
[[rule]]
id = "gold"
on = "call_out"
where = "profile.segment == 'gold'"
channels = ["sms"]
template = "t"
cooldown = "0s"
"""
    (tmp_path / "profiles.csv").write_text("msisdn,segment,score\n8613800000001,gold,1.5\n", encoding="utf-8")
    endpoint = f"ipc://{tmp_path}/switch"
    config = config_text(tmp_path, f'[inputs.switch]\nendpoint = "{endpoint}"\n', extra='profiles = "profiles.csv"')
    daemon = daemons(tmp_path, config, rules)
    feeder = sockets.push(endpoint)

    def call(ts: int, total: int) -> None:
        feeder.send(arrow_message(pa.RecordBatch.from_pydict(batch([{"ts": ts, "msisdn": 8613800000001, "kind": 0}]))))
        daemon.wait_for_metric("kairos_events_total", total)

    call(1_000, 1)
    # score holds floats: a rule testing it is refused, and the rules and profiles in use stay.
    (tmp_path / "rules.toml").write_text(rules.replace("profile.segment == 'gold'", "profile.score >= 1"),
                                         encoding="utf-8")
    status, reply = daemon.post("/control/reload")
    assert status == 400 and not reply["ok"] and "column 'score'" in reply["message"], reply
    call(2_000, 2)
    assert daemon.metric("kairos_rules_reloads_total", result="refused") == 1
    assert daemon.stop() == 0
    assert [r["ts"] for r in file_instructions(tmp_path / "out")] == [1_000, 2_000]


def test_an_oversized_message_cuts_its_sender_off_and_is_counted(tmp_path, daemons, sockets):
    batches = traffic(events=4_000, batch=1_000)
    small, big = arrow_message(batches[0]), arrow_message(pa.concat_batches(batches[1:]))
    endpoint = f"ipc://{tmp_path}/switch"
    inputs = f'[inputs.switch]\nendpoint = "{endpoint}"\nmax_message_bytes = {len(small) + 1000}\n'
    daemon = daemons(tmp_path, config_text(tmp_path, inputs))
    feeder = sockets.push(endpoint)
    feeder.send(small)
    daemon.wait_for_metric("kairos_events_total", batches[0].num_rows)
    assert daemon.metric("kairos_input_connections_total", input="switch") >= 1
    feeder.send(big)  # over the limit: ZeroMQ drops the connection, and with it the message
    daemon.wait_for_metric("kairos_input_disconnections_total", 1, input="switch")
    feeder.send(small)  # the feeder reconnects by itself
    daemon.wait_for_metric("kairos_events_total", 2 * batches[0].num_rows)
    assert daemon.stop() == 0


def test_an_endpoint_in_use_is_refused_naming_the_input(tmp_path):
    import socket as sockets_module

    holder = sockets_module.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        config = tmp_path / "kairos.toml"
        config.write_text(config_text(tmp_path, f'[inputs.switch]\nendpoint = "tcp://127.0.0.1:{port}"\n'),
                          encoding="utf-8")
        (tmp_path / "rules.toml").write_text(RULES, encoding="utf-8")
        result = subprocess.run([sys.executable, "-m", "engine.cli", "run", "-c", str(config)],
                                capture_output=True, text=True, timeout=60, env={**os.environ})
    finally:
        holder.close()
    assert result.returncode == 2
    assert f"kairos.toml: inputs.switch: tcp://127.0.0.1:{port}: Address already in use" in result.stderr
