"""What a real daemon does with odd ZeroMQ messages: junk frames before the payload, and messages too large.

A frame before the payload that is neither a sequence header nor (SUB) a
topic is dead-lettered as `extra_frames` and counted, and the payload is
still processed.  A message over `max_message_bytes` but at most twice that
(`adapters.zmq_input.HARD_LIMIT_FACTOR`) reaches the daemon and is
dead-lettered as `too_large` by its first 64 KiB; one over twice the limit
is refused by ZeroMQ, which drops the sender's connection (counted as a
disconnection) and nothing of it reaches the dead-letter file.
"""

from __future__ import annotations

import base64
import signal

import orjson
import pyarrow as pa
import pytest
from test_daemon import RULES, DaemonProcess, Sockets, arrow_message, config_text, file_instructions, traffic

from adapters.wire import REJECT_REASONS, TOO_LARGE_KEPT
from adapters.zmq_input import HARD_LIMIT_FACTOR, sequence_header
from engine import Engine

LIMIT = 100_000  # max_message_bytes of the "mediation" input


@pytest.fixture
def daemon(tmp_path):
    """A daemon with the two inputs below, killed at the end if a test left it running."""
    started = DaemonProcess(tmp_path, config_text(tmp_path, inputs(tmp_path)))
    yield started
    started.stop(signal.SIGKILL)


@pytest.fixture
def sockets():
    made = Sockets()
    yield made
    made.close()


def dead_letters(directory) -> list[dict]:
    return [orjson.loads(line) for path in sorted((directory / "dead").glob("*.jsonl"))
            for line in path.read_bytes().splitlines()]


def record_of(letter: dict) -> bytes:
    return letter["record"].encode() if "record" in letter else base64.b64decode(letter["record_b64"])


def lines(size: int, start: int = 0) -> bytes:
    """`size` bytes of numbered lines, so that a prefix of them is recognisable (not valid events: never decoded)."""
    text = b"".join(b"%09d\n" % k for k in range(start, start + size // 10 + 1))
    return text[:size]


def inputs(directory) -> str:
    return f"""
[inputs.switch]
endpoint = "ipc://{directory}/switch"

[inputs.mediation]
endpoint = "ipc://{directory}/mediation"
format = "ndjson"
max_message_bytes = {LIMIT}
"""


def test_a_junk_frame_is_dead_lettered_and_counted_and_the_payload_still_processed(tmp_path, daemon, sockets):
    batches = traffic(events=6_000, batch=2_000)
    _, text = daemon.get("/metrics")
    for reason in {*REJECT_REASONS, "extra_frames", "too_large"}:  # every reason's counter is there from the start
        assert f'kairos_dead_letters_total{{input="switch",reason="{reason}"}} 0' in text, reason
    feeder = sockets.push(f"ipc://{tmp_path}/switch")
    feeder.send_multipart([b"not a header", arrow_message(batches[0])])
    # Junk before a sequence header: the header is still recognised, the junk still dead-lettered.
    feeder.send_multipart([b"\x00\x01junk", b"more junk", sequence_header(3, 1), arrow_message(batches[1])])
    feeder.send_multipart([sequence_header(3, 2), arrow_message(batches[2])])  # a clean one: nothing dead-lettered
    daemon.wait_for_metric("kairos_events_total", sum(b.num_rows for b in batches), timeout=20)
    assert daemon.metric("kairos_input_junk_frames_total", input="switch") == 3
    assert daemon.metric("kairos_dead_letters_total", input="switch", reason="extra_frames") == 3
    assert daemon.metric("kairos_input_sequence_gaps_total", input="switch") == 0
    assert daemon.metric("kairos_input_sequence_regressions_total", input="switch") == 0
    assert daemon.stop() == 0
    letters = dead_letters(tmp_path)
    assert [(d["input"], d["reason"], d["row"]) for d in letters] == [("switch", "extra_frames", None)] * 3
    assert [record_of(d) for d in letters] == [b"not a header", b"\x00\x01junk", b"more junk"]
    assert all("before the payload" in d["detail"] for d in letters)
    engine = Engine.from_text(RULES)
    expected = pa.concat_tables([engine.process(b) for b in batches])
    assert [r["id"] for r in file_instructions(tmp_path / "out")] == expected.column("id").to_pylist()


def test_message_sizes_between_the_limit_and_twice_it_are_dead_lettered_and_beyond_cut_the_sender_off(
        tmp_path, daemon, sockets):
    assert HARD_LIMIT_FACTOR == 2
    feeder = sockets.push(f"ipc://{tmp_path}/mediation")
    good = b'{"ts": 1000, "msisdn": 8613800000001, "kind": 0}\n'
    feeder.send(good)
    daemon.wait_for_metric("kairos_input_events_total", 1, timeout=20, input="mediation")
    over = lines(LIMIT + LIMIT // 2)
    feeder.send(over)  # over the limit, within twice it: reaches the daemon, dead-lettered
    at_hard_limit = lines(HARD_LIMIT_FACTOR * LIMIT, start=10**6)
    feeder.send(at_hard_limit)  # exactly twice the limit: still reaches it
    daemon.wait_for_metric("kairos_dead_letters_total", 2, timeout=20, input="mediation", reason="too_large")
    assert daemon.metric("kairos_input_disconnections_total", input="mediation") == 0
    feeder.send(lines(HARD_LIMIT_FACTOR * LIMIT + 1))  # one byte more: ZeroMQ refuses it and drops the connection
    daemon.wait_for_metric("kairos_input_disconnections_total", 1, timeout=20, input="mediation")
    feeder.send(good)  # the feeder reconnects by itself
    daemon.wait_for_metric("kairos_input_events_total", 2, timeout=20, input="mediation")
    assert daemon.metric("kairos_input_messages_total", input="mediation") == 4
    assert daemon.metric("kairos_dead_letters_total", input="mediation", reason="too_large") == 2
    assert daemon.stop() == 0
    letters = dead_letters(tmp_path)
    assert [(d["input"], d["reason"], d["row"]) for d in letters] == [("mediation", "too_large", None)] * 2
    for letter, message in zip(letters, (over, at_hard_limit), strict=True):
        assert record_of(letter) == message[:TOO_LARGE_KEPT]  # a sample of it, not the whole message
        assert f"{len(message)} bytes" in letter["detail"] and str(LIMIT) in letter["detail"]
    assert sum(path.stat().st_size for path in (tmp_path / "dead").glob("*.jsonl")) < 3 * TOO_LARGE_KEPT
