"""`kairos forget` on a running daemon leaves no trace of the subscriber in state, checkpoints, journal,
outbox or offers: the bytes of every file are searched for the number (SPEC section 10)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow as pa
from channel_testing import wait_until
from kannel import free_port
from test_daemon import DaemonProcess, Sockets, arrow_message

from adapters.channels.store import OfferStore
from adapters.zmq_input import sequence_header

FORGOTTEN = 8613912345678
KEPT = 8613800000002

RULES = """
[[rule]]
id = "portal_offer"
on = "portal"
channels = ["portal"]
template = "offer"
params = ["msisdn"]
cooldown = "0s"

[[rule]]
id = "calls"
on = "call_out"
count = { at_least = 2, within = "1d" }
channels = ["sms"]
template = "calls"
params = ["peer"]
cooldown = "0s"
"""


def config(directory: Path, port: int, portal_port: int) -> str:
    return f"""
[engine]
rules = "rules.toml"
state_dir = "state"
initial_subscribers = 4096

[batching]
linger = "2ms"
idle_advance = "1h"

[journal]
retain = "1d"        # segments a checkpoint covers are kept for audit: erasure must rewrite them

[checkpoint]
every = "1h"

[metrics]
listen = "127.0.0.1:{port}"

[deadletter]
path = "dead"

[inputs.switch]
endpoint = "ipc://{directory}/switch"
sequence = "exact"

[outputs.box]
type = "outbox"
path = "outbox.db"

[channels.sms]          # one delivery an hour: the rest stay pending in the outbox
type = "file"
path = "delivered.jsonl"
rate = 0.0003
max_age = "36500d"

[channels.portal]
type = "portal"
path = "portal.sqlite"
listen = "127.0.0.1:{portal_port}"
offer_ttl = "36500d"
max_age = "36500d"
"""


def traces(number: int) -> list[bytes]:
    """How a number may sit in a file: int64 both ways round, SQLite's 6-byte big-endian integer, text."""
    return [struct.pack("<q", number), struct.pack(">q", number), struct.pack(">q", number)[2:], str(number).encode()]


def files_holding(root: Path, number: int, skip: set[str]) -> list[str]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in skip:
            data = path.read_bytes()
            if any(trace in data for trace in traces(number)):
                found.append(str(path.relative_to(root)))
    return found


# The file channel's output is the peer's side (what reached the subscriber); logs and the rules are not
# subscriber data the daemon keeps; the capture of this test is the test's own.
NOT_KAIROS_STATE = {"delivered.jsonl", "daemon.log", "rules.toml", "kairos.toml"}


def test_forget_erases_the_subscriber_from_every_file_the_daemon_keeps(tmp_path, batch):
    port, portal_port = free_port(), free_port()
    daemon = DaemonProcess(tmp_path, config(tmp_path, port, portal_port), RULES)
    sockets = Sockets()
    try:
        feeder = sockets.push(f"ipc://{tmp_path}/switch")
        rows = []
        for k, msisdn in enumerate([FORGOTTEN, KEPT] * 4):
            rows.append({"ts": 1_793_491_200_000 + k * 1_000, "msisdn": msisdn, "kind": 0, "peer": 95555})
            rows.append({"ts": 1_793_491_200_000 + k * 1_000 + 1, "msisdn": msisdn, "kind": 12})
        # The kept subscriber calls the forgotten one: the number sits in another subscriber's event too.
        rows.append({"ts": 1_793_491_300_000, "msisdn": KEPT, "kind": 0, "peer": FORGOTTEN})
        seq = 0
        for seq, k in enumerate(range(0, len(rows), 3), start=1):
            feeder.send_multipart([sequence_header(1, seq),
                                   arrow_message(pa.RecordBatch.from_pydict(batch(rows[k:k + 3])))])
        daemon.wait_for_metric("kairos_events_total", len(rows))
        assert daemon.post("/control/checkpoint")[1]["ok"]
        feeder.send_multipart([sequence_header(1, seq + 1), arrow_message(pa.RecordBatch.from_pydict(
            batch([{"ts": 1_793_491_400_000, "msisdn": FORGOTTEN, "kind": 12}])))])
        daemon.wait_for_metric("kairos_events_total", len(rows) + 1)
        store = OfferStore(str(tmp_path / "portal.sqlite"))
        wait_until(lambda: store.count() >= 5)
        store.close()
        before = files_holding(tmp_path, FORGOTTEN, NOT_KAIROS_STATE)
        # The search finds the number where the daemon keeps it: the control for the search after erasure.
        assert any(p.startswith("state/checkpoints/") for p in before), before
        assert any(p.startswith("state/journal/") for p in before), before
        assert "outbox.db" in before or "outbox.db-wal" in before, before
        assert any(p.startswith("portal.sqlite") for p in before), before

        result = subprocess.run([sys.executable, "-m", "engine.cli", "forget", "-c", str(daemon.config_path),
                                 str(FORGOTTEN), "--by", "privacy-desk"], capture_output=True, text=True,
                                timeout=120, env={**os.environ})
        assert result.returncode == 0, result.stderr
        assert "erased 1 subscriber" in result.stdout

        after = files_holding(tmp_path, FORGOTTEN, NOT_KAIROS_STATE)
        assert after == [], f"the number is still in {after}"
        # What was kept about the other subscriber is still there.
        assert files_holding(tmp_path, KEPT, NOT_KAIROS_STATE)
        (record,) = [orjson.loads(line) for line in (tmp_path / "state" / "erasures.jsonl").read_bytes().splitlines()]
        assert record["by"] == "privacy-desk" and record["subscribers_asked"] == 1
        assert record["engine_subscribers"] == 1 and record["outbox_rows"] >= 1 and record["journal_rows"] >= 9
        assert record["channel_portal"] >= 5
        # The daemon goes on: a new event of the forgotten subscriber makes them a new subscriber.
        feeder.send_multipart([sequence_header(1, seq + 2), arrow_message(pa.RecordBatch.from_pydict(
            batch([{"ts": 1_793_491_500_000, "msisdn": KEPT, "kind": 12}])))])
        daemon.wait_for_metric("kairos_events_total", len(rows) + 2)
        assert daemon.stop() == 0
        assert files_holding(tmp_path, FORGOTTEN, NOT_KAIROS_STATE) == []
    finally:
        sockets.close()
        daemon.stop()
