"""Ingest memory: a SUB input offered far more than the daemon can take stays within `[ingest] memory`.

A publisher process floods a real daemon's SUB input with Arrow messages of
1.5 MiB (92,000 events each, sequence headers on), as fast as ZeroMQ takes
them, for a few seconds: the daemon decodes and processes far fewer than
that.  With the budget set small (32 MiB), the daemon's peak resident memory
(VmHWM in /proc/PID/status) during the flood must stay under its resident
memory before it plus the budget plus ALLOWANCE; and the messages lost to it
(the publisher's ZeroMQ drops them once the daemon's queue is full and the
socket behind it too) must show as sequence gaps.

With the same flood and the rcvhwm of 1000 taken as configured (as before
the budget; `memory = "64GiB"` does it now) the daemon grew by about 940 MiB
in the 5 s, to over 1 GiB, and was still growing: 1000 of these messages are
1.5 GiB.  With the budget it grew by about 12 MiB.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zmq
from test_daemon import DaemonProcess, arrow_message, config_text

from adapters.zmq_input import HARD_LIMIT_FACTOR, ZmqInput
from engine.config import ConfigError, InputConfig, parse_config
from engine.synth import TrafficGenerator

MiB = 1 << 20
BUDGET = 32 * MiB
MAX_MESSAGE_BYTES = 2 * MiB
# Beyond the budget: the decoded columns and the kernel's scratch for the batch being processed (one message
# of 92,000 events here, about 10 MiB at the most), and what glibc keeps of freed blocks in the arena of the
# ZeroMQ thread that allocated them.  Measured: 12 MiB above the resident memory before the flood, in all.
ALLOWANCE = 32 * MiB
FLOOD_SECONDS = 5.0

PUBLISHER = textwrap.dedent("""
    import select, sys, time
    import zmq
    from adapters.zmq_input import sequence_header

    endpoint, path = sys.argv[1], sys.argv[2]
    payload = zmq.Frame(open(path, "rb").read())  # sent zero-copy, over and over
    context = zmq.Context()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.SNDHWM, 2)  # this process drops at once when the daemon's socket is full
    publisher.setsockopt(zmq.LINGER, 0)
    publisher.connect(endpoint)
    seq = 0

    def send():
        global seq
        publisher.send_multipart([sequence_header(7, seq), payload], copy=False)
        seq += 1

    # Warm-up: one message every 50 ms, which the daemon keeps up with, until told to flood.
    while not select.select([sys.stdin], [], [], 0.05)[0]:
        send()
    seconds = float(sys.stdin.readline())
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        send()
    print(seq, flush=True)
    publisher.close(0)
    context.term()
""")


def status_bytes(pid: int, field: str) -> int:
    """A memory field (VmRSS, VmHWM) of /proc/PID/status in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where that is not possible."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def message() -> bytes:
    """One Arrow IPC message of 92,000 events in the three required columns: 1.5 MiB, 3,000 subscribers."""
    batch = next(TrafficGenerator(3_000, seed=5).batches(92_000, 92_000)).select(["ts", "msisdn", "kind"])
    return arrow_message(batch)


def flood_config(directory: Path, ingest: str) -> str:
    inputs = (f'[inputs.signalling]\nendpoint = "ipc://{directory}/signalling"\nsocket = "sub"\n'
              f"max_message_bytes = {MAX_MESSAGE_BYTES}\n")
    return config_text(directory, inputs, extra=ingest)


def flood(directory: Path, ingest: str, seconds: float = FLOOD_SECONDS) -> dict:
    """Start a daemon, warm it up, flood it; its resident memory before, its peak during, and its counters."""
    payload = message()
    assert 1.4 * MiB < len(payload) < MAX_MESSAGE_BYTES
    (directory / "message.arrows").write_bytes(payload)
    daemon = DaemonProcess(directory, flood_config(directory, ingest))
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, f"ipc://{directory}/signalling", str(directory / "message.arrows")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        daemon.wait_for_metric("kairos_input_messages_total", 10, timeout=30, input="signalling")
        time.sleep(0.3)  # the warm-up's batches processed, their memory back with the allocator
        pid = daemon.process.pid
        before = status_bytes(pid, "VmRSS")
        peak_reset = reset_peak(pid)
        publisher.stdin.write(f"{seconds}\n")
        publisher.stdin.flush()
        peak = before
        while publisher.poll() is None:  # sampled too, where VmHWM could not be reset
            peak = max(peak, status_bytes(pid, "VmRSS"))
            time.sleep(0.02)
        sent = int(publisher.stdout.read())
        if peak_reset:
            peak = max(peak, status_bytes(pid, "VmHWM"))
        result = {
            "before": before, "peak": peak, "sent": sent,
            "received": daemon.metric("kairos_input_messages_total", input="signalling"),
            "missing": daemon.metric("kairos_input_sequence_missing_total", input="signalling"),
            "rcvhwm": daemon.metric("kairos_input_rcvhwm", input="signalling"),
            "logs": daemon.logs(),
        }
        result["exit"] = daemon.stop()
        return result
    finally:
        if publisher.poll() is None:
            publisher.kill()
        publisher.wait()
        publisher.stdin.close()
        publisher.stdout.close()
        if daemon.process.poll() is None:
            daemon.stop(signal.SIGKILL)


def test_a_flooded_sub_input_stays_within_the_ingest_memory_and_counts_what_it_lost(tmp_path):
    ingest = f'[ingest]\nmemory = "{BUDGET // MiB}MiB"\n'
    result = flood(tmp_path, ingest)
    grown = result["peak"] - result["before"]
    assert result["peak"] <= result["before"] + BUDGET + ALLOWANCE, (
        f"peak {result['peak'] / MiB:.0f} MiB, {grown / MiB:.0f} MiB over {result['before'] / MiB:.0f} MiB before")
    # Far more was offered than taken, and what was lost shows as sequence gaps.
    assert 0 < result["received"] < result["sent"] / 2
    assert result["missing"] > 0
    assert result["exit"] == 0
    # The effective rcvhwm is the one the configuration derives, exposed and logged with the budget.
    config = parse_config(flood_config(tmp_path, ingest), "kairos.toml", tmp_path)
    expected = config.ingest.rcvhwm["signalling"]
    assert 1 <= expected < 1000
    assert result["rcvhwm"] == expected
    line = next(e for e in result["logs"] if e["msg"] == "ingest memory")
    assert line["memory"] == BUDGET
    assert line["inputs"]["signalling"]["rcvhwm"] == expected
    assert line["inputs"]["signalling"]["configured_rcvhwm"] == 1000
    # Its queue and the message ZeroMQ reads beyond it fit in the input's share, at the largest message size.
    share = line["inputs"]["signalling"]["share"]
    assert (expected + 1) * HARD_LIMIT_FACTOR * MAX_MESSAGE_BYTES <= share


@pytest.mark.parametrize("memory, reason", [
    ('"2MiB"', "at least 16 MiB"),  # one input of 2 MiB messages: 2 x (2 x 2 MiB) queued and read, 2 x 4 MiB held
    ('"32 MB"', "units KiB, MiB, GiB"),
    ("0", "at least"),
    ("true", "expected"),
])
def test_a_budget_that_cannot_hold_one_message_is_refused_with_the_key(tmp_path, memory, reason):
    with pytest.raises(ConfigError, match=reason) as error:
        parse_config(flood_config(tmp_path, f"[ingest]\nmemory = {memory}\n"), "kairos.toml", tmp_path)
    assert error.value.key == "ingest.memory"


@pytest.mark.parametrize("memory, expected", [
    ("33554432", 32 * MiB), ('"32MiB"', 32 * MiB), ('"1GiB"', 1 << 30), ('" 40960 KiB "', 40 * MiB)])
def test_ingest_memory_takes_bytes_or_binary_units(tmp_path, memory, expected):
    config = parse_config(flood_config(tmp_path, f"[ingest]\nmemory = {memory}\n"), "kairos.toml", tmp_path)
    assert config.ingest_memory == config.ingest.memory == expected


def test_the_plan_splits_the_budget_and_never_raises_a_configured_rcvhwm(tmp_path):
    text = config_text(tmp_path, """
[inputs.switch]
endpoint = "ipc:///tmp/switch"
max_message_bytes = 4194304

[inputs.outcomes]
endpoint = "ipc:///tmp/outcomes"
role = "feedback"
max_message_bytes = 65536
rcvhwm = 10
""", extra='[ingest]\nmemory = "64MiB"\n')
    plan = parse_config(text, "kairos.toml", tmp_path).ingest
    hard = {"switch": 8 * MiB, "outcomes": 128 << 10}
    assert plan.hard_limits == hard and plan.hold_bytes == 8 * MiB
    # Two of the largest for the daemon, two of each input's own, the rest split equally.
    extra = (64 * MiB - 2 * 8 * MiB - 2 * sum(hard.values())) // 2
    assert plan.shares == {name: 2 * h + extra for name, h in hard.items()}
    assert plan.rcvhwm == {"switch": plan.shares["switch"] // (8 * MiB) - 1, "outcomes": 10}
    assert 2 * plan.hold_bytes + sum(plan.shares.values()) <= 64 * MiB
    # The default budget with the default max_message_bytes (16 MiB): room for five messages per peer.
    default = parse_config(config_text(tmp_path, '[inputs.switch]\nendpoint = "ipc:///tmp/switch"\n'),
                           "kairos.toml", tmp_path)
    assert default.ingest_memory == 256 * MiB and default.ingest.rcvhwm == {"switch": 5}


def test_unknown_ingest_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError) as error:
        parse_config(flood_config(tmp_path, '[ingest]\nmemory = "32MiB"\nmemroy = 1\n'), "kairos.toml", tmp_path)
    assert error.value.key == "ingest.memroy"


def test_more_peers_lower_the_rcvhwm_of_every_connection_to_keep_the_share(tmp_path):
    """Each connection has a queue of its own: with three feeders, each may hold a third of the share."""
    config = InputConfig("switch", f"ipc://{tmp_path}/switch", max_message_bytes=MiB)
    context = zmq.Context()
    feed = ZmqInput(config, context, rcvhwm=11, share=24 * MiB)  # 24 MiB / 2 MiB = 12 messages, less one read
    feeders = []
    try:
        assert feed.rcvhwm == feed.socket.getsockopt(zmq.RCVHWM) == 11
        for _ in range(3):
            feeder = context.socket(zmq.PUSH)
            feeder.setsockopt(zmq.LINGER, 0)
            feeder.connect(config.endpoint)
            feeders.append(feeder)
        deadline = time.monotonic() + 10
        while feed.peers < 3:
            assert time.monotonic() < deadline, feed.peers
            feed.count_connections()
            time.sleep(0.01)
        assert feed.rcvhwm == feed.socket.getsockopt(zmq.RCVHWM) == 24 // (3 * 2) - 1
        # A burst stops once it holds max_bytes (the last message may pass it).
        for feeder in feeders:
            for _ in range(3):
                feeder.send(b"x" * 1000)
        messages: list = []
        while len(messages) < 9:
            assert time.monotonic() < deadline
            taken, _ = feed.receive(64, max_bytes=2500)
            assert len(taken) <= 3
            messages += taken
        for feeder in feeders[1:]:
            feeder.close(0)
        while feed.peers > 1:
            assert time.monotonic() < deadline, feed.peers
            feed.count_connections()
            time.sleep(0.01)
        assert feed.rcvhwm == 11
    finally:
        for feeder in feeders:
            feeder.close(0)
        feed.close()
        context.term()
