"""A crash loses no event and contacts no subscriber twice (SPEC section 10), tested with kill -9.

A real daemon (`kairos run`) with a journal and checkpoints on a schedule, a
real reference sender (`kairos replay`, adapters/sender.py) in a process of
its own, the outbox and a file channel delivering to a file: the daemon is
killed with SIGKILL at random moments, many times, under load, and so is the
sender now and then; everything is restarted each time.  The instructions
delivered at the end must be exactly those of a run that never crashed: the
same engine over the same events in one process, no checkpoint, no journal.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from kannel import free_port
from test_daemon import DaemonProcess

from engine import Engine
from engine.synth import TrafficGenerator

# A stateless rule, a count in a window with a cooldown, an absence timer, under daily and monthly caps:
# each keeps state a crash must not lose or repeat.
RULES = """
[policy]
timezone = "Asia/Shanghai"
daily_cap = 2
monthly_cap = 6

[[rule]]
id = "portal_login"
on = "portal"
channels = ["portal"]
template = "welcome_back"
cooldown = "0s"

[[rule]]
id = "third_call"
on = "call_out"
count = { at_least = 3, within = "1h" }
channels = ["sms"]
template = "calls"
cooldown = "1d"
priority = 10

[[rule]]
id = "no_recharge"
on = "balance"
where = "balance < 2000"
absence = { on = "recharge", where = "amount > 0", within = "30m" }
channels = ["sms"]
template = "recharge"
params = ["balance"]
cooldown = "3d"
priority = 20
"""

ROWS = 500  # rows per message


def capture(path: Path, events: int, seed: int) -> list[pa.RecordBatch]:
    batches = list(TrafficGenerator(1_500, seed=seed).batches(events, 5_000))
    table = pa.Table.from_batches(batches)
    with ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    return batches


def never_crashed(batches: list[pa.RecordBatch]) -> Counter:
    """Instruction ids a run without crashes delivers: every instruction but the control group's."""
    engine = Engine.from_text(RULES)
    tables = [engine.process(b) for b in batches]
    table = pa.concat_tables(tables)
    ids = [i for i, held in zip(table.column("id").to_pylist(), table.column("holdout").to_pylist(), strict=True)
           if not held]
    return Counter(ids)


def config(directory: Path, port: int, *, every: str = "1h", fsync: str = "batch", segment_bytes: int = 64 << 20,
           sequence: str = "exact") -> str:
    return f"""
[engine]
rules = "rules.toml"
state_dir = "state"
initial_subscribers = 4096

[batching]
linger = "2ms"
idle_advance = "1h"   # event time moves only with events: the clean run has no wall clock

[journal]
fsync = "{fsync}"
segment_bytes = {segment_bytes}

[checkpoint]
every = "{every}"

[metrics]
listen = "127.0.0.1:{port}"

[deadletter]
path = "dead"

[inputs.switch]
endpoint = "ipc://{directory}/switch"
sequence = "{sequence}"

[outputs.box]
type = "outbox"
path = "outbox.db"

[channels.sms]
type = "file"
path = "delivered.jsonl"
max_age = "36500d"

[channels.portal]
type = "file"
path = "delivered.jsonl"
max_age = "36500d"
"""


def start_sender(directory: Path, port: int, rate: float) -> subprocess.Popen:
    with open(directory / "sender.log", "ab") as log:  # the child has its own descriptor of it
        return subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "replay", str(directory / "capture.arrow"), "--to",
             f"ipc://{directory}/switch", "--input", "switch", "--sender", "7", "--acks",
             f"http://127.0.0.1:{port}/acks", "--rows", str(ROWS), "--window", "16", "--rate", str(rate)],
            stdout=log, stderr=log, cwd=directory)


def delivered(directory: Path) -> Counter:
    path = directory / "delivered.jsonl"
    lines = path.read_bytes().splitlines() if path.exists() else []
    return Counter(orjson.loads(line)["id"] for line in lines)


def kill(daemon: DaemonProcess, k: int) -> None:
    """kill -9, keeping the log of that run beside the others."""
    daemon.stop(signal.SIGKILL)
    daemon.log_path.rename(daemon.log_path.with_name(f"daemon-{k}.log"))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# kill -9 loses nothing the OS has, whatever the fsync policy: "100ms" acknowledges less often, and the sender
# resends more; "batch" is what also survives a power cut.
@pytest.mark.parametrize("fsync", ["batch", "100ms"])
def test_kill_9_of_daemon_and_sender_under_load_delivers_exactly_a_clean_runs_instructions(tmp_path, fsync):
    rng = random.Random(int(os.environ.get("KAIROS_CRASH_SEED", "14")) + len(fsync))
    batches = capture(tmp_path / "capture.arrow", 120_000, seed=5)
    expected = never_crashed(batches)
    assert len(expected) > 1_000 and len({i.split(":")[0] for i in expected}) >= 1
    port = free_port()
    daemon = DaemonProcess(tmp_path, config(tmp_path, port, every="700ms", fsync=fsync), RULES)
    sender = start_sender(tmp_path, port, rate=12_000)
    kills = sender_kills = 0
    try:
        while sender.poll() is None and kills < 12:
            time.sleep(rng.uniform(0.2, 1.2))
            kill(daemon, kills)
            kills += 1
            if rng.random() < 0.3:
                sender.send_signal(signal.SIGKILL)
                sender.wait()
                sender_kills += 1
            daemon = DaemonProcess(tmp_path, config(tmp_path, port, every="700ms", fsync=fsync), RULES)
            if sender.poll() is not None and sender.returncode != 0:
                sender = start_sender(tmp_path, port, rate=12_000)
        assert kills >= 10, f"the sender finished after {kills} kills: send more slowly"
        if sender_kills == 0:  # the seed spared the sender: kill it once now, mid-stream or not
            sender.send_signal(signal.SIGKILL)
            sender.wait()
            sender_kills += 1
            sender = start_sender(tmp_path, port, rate=12_000)
        assert sender.wait(timeout=240) == 0, (tmp_path / "sender.log").read_text()
        wait_for(lambda: sum(delivered(tmp_path).values()) >= sum(expected.values()), 120, "the deliveries")
        time.sleep(0.5)  # anything extra (a duplicate) would show up now
        got = delivered(tmp_path)
        assert daemon.metric("kairos_input_sequence_missing_total", input="switch") == 0
        assert daemon.metric("kairos_dead_letters_total", input="switch", reason="undecodable") == 0
        assert daemon.stop() == 0
    finally:
        if sender.poll() is None:
            sender.kill()
        daemon.stop(signal.SIGKILL)
    # The figures of the run, for `pytest -s`: what the loop did and what came out.
    print(f"fsync {fsync}: {kills} kills of the daemon, {sender_kills} of the sender; {sum(got.values()):,} "
          f"instructions delivered, {sum(expected.values()):,} by the run that never crashed")
    duplicates = {i: n for i, n in got.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} instructions delivered twice"
    missing = expected - got
    extra = got - expected
    assert not missing and not extra, (f"{len(missing)} missing, {len(extra)} extra of {sum(expected.values())} "
                                       f"after {kills} kills of the daemon and {sender_kills} of the sender")
