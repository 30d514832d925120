"""Outputs: instructions written to real files and real ZeroMQ sockets and read back exactly."""

from __future__ import annotations

import errno
import resource
import signal
import subprocess
import sys
import time

import orjson
import pyarrow as pa
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from adapters.outputs import (
    OUTPUT_TYPES,
    PARTIAL_SUFFIX,
    Backpressure,
    FileOutput,
    ZmqOutput,
    jsonl_chunks,
    make_output,
    output_types,
)
from engine.schema import INSTRUCTION_SCHEMA

TEMPLATES = ["您好，您的余额不足 10 元，充值 50 送 5！", 'say "hi"\\', "two\nlines\tand\x01\x1f", "plain"]


def instructions(n: int, start: int = 0) -> pa.Table:
    """A valid instruction table of `n` rows with params maps and Chinese text."""
    rows = range(start, start + n)
    return pa.Table.from_pydict(
        {
            "id": [f"{i:032x}" for i in rows],
            "ts": [1_700_000_000_000 + i for i in rows],
            "msisdn": [8613800000000 + i for i in rows],
            "rule": [f"rule_{i % 3}" for i in rows],
            "channel": ["sms" if i % 2 else "mms" for i in rows],
            "template": [TEMPLATES[i % len(TEMPLATES)] for i in rows],
            "priority": [i % 5 for i in rows],
            "holdout": [i % 7 == 0 for i in rows],
            "not_before": [1_700_000_000_000 + i + 60_000 * (i % 2) for i in rows],
            "params": [[("amount", str(i * 100)), ("城市", "北京")] if i % 4 else [] for i in rows],
        },
        schema=INSTRUCTION_SCHEMA,
    )


def as_json_rows(table: pa.Table) -> list[dict]:
    """What the JSONL form of `table` must decode to: params as an object."""
    return [{**row, "params": dict(row["params"])} for row in table.to_pylist()]


def read_arrow(path) -> pa.Table:
    with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
        return reader.read_all()


def read_jsonl(path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


class Clock:
    """A settable clock for rotation by time."""

    def __init__(self, now: float = 1_763_800_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------
# JSON lines encoding


texts = st.text(st.characters(codec="utf-8"), max_size=12)


@given(
    st.lists(
        st.tuples(texts, texts, st.lists(st.tuples(texts, st.none() | texts), max_size=3)),
        min_size=1,
        max_size=20,
    ),
    st.integers(0, 5),
)
def test_jsonl_is_exact_for_any_text(rows, cut):
    n = len(rows)
    table = pa.Table.from_pydict(
        {
            "id": [r[0] for r in rows],
            "ts": [-(2**63)] + [2**63 - 1] * (n - 1),
            "msisdn": list(range(n)),
            "rule": ["r"] * n,
            "channel": ["sms"] * n,
            "template": [r[1] for r in rows],
            "priority": [-(2**31)] * n,
            "holdout": [i % 2 == 0 for i in range(n)],
            "not_before": [0] * n,
            "params": [dict(r[2]) for r in rows],
        },
        schema=INSTRUCTION_SCHEMA,
    )
    # A slice and several chunks: offsets that do not start at zero.
    table = pa.concat_tables([table.slice(min(cut, n - 1)), table.slice(0, 1)])
    lines = b"".join(jsonl_chunks(table)).split(b"\n")
    assert lines[-1] == b""
    assert [orjson.loads(line) for line in lines[:-1]] == as_json_rows(table)


# ---------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("fmt", ["arrow", "jsonl"])
def test_file_round_trip(tmp_path, fmt):
    tables = [instructions(5), instructions(0), instructions(17, 5), instructions(1, 22)]
    with FileOutput("sms", tmp_path, format=fmt) as out:
        for table in tables:
            out.send(table)
        assert out.finished_files() == []
        out.flush()
    files = out.finished_files()
    assert len(files) == 1
    name = files[0].name
    assert name.startswith("sms-") and name.endswith(".arrows" if fmt == "arrow" else ".jsonl")
    sent = pa.concat_tables(tables)
    if fmt == "arrow":
        assert read_arrow(files[0]).equals(sent)
    else:
        assert read_jsonl(files[0]) == as_json_rows(sent)
    assert out.stats() == {"instructions": 23, "batches": 3, "bytes": files[0].stat().st_size, "files": 1}


@pytest.mark.parametrize("fmt", ["arrow", "jsonl"])
def test_rotation_by_bytes(tmp_path, fmt):
    with FileOutput("out", tmp_path, format=fmt, rotate_bytes=4000) as out:
        for start in range(0, 200, 10):
            out.send(instructions(10, start))
    files = out.finished_files()
    assert len(files) > 3
    sizes = [f.stat().st_size for f in files]
    # A file is finished by the send that takes it to rotate_bytes, so only
    # the last one may be smaller.
    assert all(size >= 4000 for size in sizes[:-1])
    if fmt == "arrow":
        assert pa.concat_tables([read_arrow(f) for f in files]).equals(instructions(200))
    else:
        assert [row for f in files for row in read_jsonl(f)] == as_json_rows(instructions(200))
    sequence = [int(f.name.split("-")[2].split(".")[0]) for f in files]
    assert sequence == list(range(1, len(files) + 1))


def test_rotation_by_time_and_only_finished_files_visible(tmp_path):
    clock = Clock()
    out = FileOutput("crm", tmp_path, rotate_seconds=60, clock=clock)
    out.send(instructions(3))
    (partial,) = tmp_path.iterdir()
    assert partial.name == "crm-20251122T082640Z-000001.arrows" + PARTIAL_SUFFIX
    clock.now += 59
    out.flush()
    assert out.finished_files() == []
    clock.now += 1
    out.flush()  # the hour is up: flush finishes the file
    assert [f.name for f in out.finished_files()] == ["crm-20251122T082640Z-000001.arrows"]
    assert list(tmp_path.glob("*" + PARTIAL_SUFFIX)) == []

    clock.now += 3600  # quiet: no file for this period
    out.flush()
    assert len(list(tmp_path.iterdir())) == 1

    out.send(instructions(2, 3))
    clock.now += 30
    out.send(instructions(2, 5))
    clock.now += 30
    out.send(instructions(2, 7))  # after 60 s: the open file is finished first
    out.close()
    out.close()
    files = out.finished_files()
    assert [f.name for f in files] == [
        "crm-20251122T082640Z-000001.arrows",
        "crm-20251122T092740Z-000002.arrows",
        "crm-20251122T092840Z-000003.arrows",
    ]
    assert [read_arrow(f).num_rows for f in files] == [3, 4, 2]
    assert pa.concat_tables([read_arrow(f) for f in files]).equals(instructions(9))


def test_flush_makes_written_data_readable(tmp_path):
    with FileOutput("portal", tmp_path, format="jsonl") as out:
        out.send(instructions(4))
        out.flush()
        (partial,) = tmp_path.glob("*" + PARTIAL_SUFFIX)
        assert read_jsonl(partial) == as_json_rows(instructions(4))


def test_no_files_without_instructions(tmp_path):
    with FileOutput("idle", tmp_path) as out:
        out.send(instructions(0))
        out.flush()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["arrow", "jsonl"])
def test_crash_leftovers_are_cut_to_whole_instructions_and_finished(tmp_path, fmt):
    with FileOutput("sms", tmp_path, format=fmt) as out:
        out.send(instructions(6))
        out.send(instructions(6, 6))
    (finished,) = out.finished_files()
    data = finished.read_bytes()
    # Leftovers of a crash: one torn in the second batch or line, one torn in the first.
    kept = finished.with_name(finished.name.replace("000001", "000007") + PARTIAL_SUFFIX)
    kept.write_bytes(data[: len(data) - 40])
    lost = finished.with_name(finished.name.replace("000001", "000008") + PARTIAL_SUFFIX)
    lost.write_bytes(data[:30] if fmt == "jsonl" else data[: len(data) // 3])
    # A crash between completing a file and renaming it.
    whole = finished.with_name(finished.name.replace("000001", "000005") + PARTIAL_SUFFIX)
    whole.write_bytes(data)
    unrelated = tmp_path / ("other-20251122T083320Z-000009.arrows" + PARTIAL_SUFFIX)
    unrelated.write_bytes(b"not ours")

    with FileOutput("sms", tmp_path, format=fmt) as again:
        assert again.stats()["files"] == 2
        again.send(instructions(1, 100))
    files = again.finished_files()
    assert [f.name.split("-")[2].split(".")[0] for f in files] == ["000001", "000005", "000007", "000009"]
    assert unrelated.exists() and not lost.exists()
    assert files[1].read_bytes() == data
    if fmt == "arrow":
        assert read_arrow(files[2]).equals(instructions(6))
    else:
        assert read_jsonl(files[2]) == as_json_rows(instructions(11))


@pytest.fixture
def file_size_limit():
    """Set a file size limit for this process (writes beyond it fail with EFBIG), restored after."""
    saved_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    saved_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by signal
    try:
        yield lambda size: resource.setrlimit(resource.RLIMIT_FSIZE, (size, saved_limit[1]))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, saved_limit)
        signal.signal(signal.SIGXFSZ, saved_handler)


@pytest.mark.parametrize("fmt", ["arrow", "jsonl"])
def test_a_failed_write_leaves_the_file_whole(tmp_path, fmt, file_size_limit):
    with FileOutput("sms", tmp_path, format=fmt) as out:
        out.send(instructions(5))
        (partial,) = tmp_path.iterdir()
        size = partial.stat().st_size
        file_size_limit(size + 100)  # room for part of the next table, not all of it
        with pytest.raises(OSError) as failed:
            out.send(instructions(50, 5))
        assert failed.value.errno == errno.EFBIG
        assert partial.stat().st_size == size
        assert out.stats()["instructions"] == 5 and out.stats()["bytes"] == size
        file_size_limit(resource.RLIM_INFINITY)
        out.send(instructions(3, 55))
    (finished,) = out.finished_files()
    expected = pa.concat_tables([instructions(5), instructions(3, 55)])
    if fmt == "arrow":
        assert read_arrow(finished).equals(expected)
    else:
        assert read_jsonl(finished) == as_json_rows(expected)
    assert out.stats()["bytes"] == finished.stat().st_size


def test_bad_tables_are_refused_whole(tmp_path):
    with FileOutput("sms", tmp_path) as out:
        with pytest.raises(ValueError, match="INSTRUCTION_SCHEMA"):
            out.send(instructions(3).drop_columns(["params"]))
        with pytest.raises(TypeError, match="pyarrow Table"):
            out.send(instructions(3).to_batches()[0])
        bad = instructions(3)
        bad = bad.set_column(2, INSTRUCTION_SCHEMA.field("msisdn"), pa.array([1, None, 3], pa.int64()))
        with pytest.raises(ValueError, match="'msisdn' holds 1 null"):
            out.send(bad)
        out.send(instructions(2))
    (finished,) = out.finished_files()
    assert read_arrow(finished).equals(instructions(2))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "output 'f': key 'path' is required"),
        ({"path": "x", "format": "csv"}, "key 'format' must be one of 'arrow', 'jsonl', not 'csv'"),
        ({"path": "x", "rotate_bytes": 0}, "key 'rotate_bytes' must be an integer >= 1"),
        ({"path": "x", "rotate_bytes": True}, "key 'rotate_bytes' must be an integer"),
        ({"path": "x", "rotate_seconds": -1}, "key 'rotate_seconds' must be a positive number"),
        ({"path": "x", "rotate_every": 10}, "output 'f': unknown key\\(s\\) 'rotate_every'"),
        ({"path": 3}, "key 'path' must be a non-empty string"),
    ],
)
def test_file_options_refused_with_the_key_named(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        FileOutput.from_config("f", options)
    assert list(tmp_path.iterdir()) == []


def test_make_output(tmp_path):
    with make_output("f", {"type": "file", "path": str(tmp_path / "new"), "format": "jsonl"}) as out:
        assert isinstance(out, FileOutput) and out.format == "jsonl" and out.name == "f"
    assert (tmp_path / "new").is_dir()
    with pytest.raises(ValueError, match="output 'k': key 'type' must be one of 'file', 'outbox', 'zmq', not 'kafka'"):
        make_output("k", {"type": "kafka"})
    with pytest.raises(ValueError, match="key 'type' must be one of"):
        make_output("k", {"path": "x"})
    assert set(OUTPUT_TYPES) == {"file", "zmq"}
    assert set(output_types()) == {"file", "outbox", "zmq"}  # the channels' outbox joins from adapters.channels
    with pytest.raises(ValueError, match="name may hold only"):
        FileOutput("../escape", tmp_path)


# ---------------------------------------------------------------------------
# ZeroMQ


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def pull(context, endpoint: str, *, bind: bool = False, rcvhwm: int = 1000) -> zmq.Socket:
    socket = context.socket(zmq.PULL)
    socket.rcvhwm = rcvhwm
    socket.rcvtimeo = 5000
    socket.linger = 0
    if bind:
        socket.bind(endpoint)
    else:
        socket.connect(endpoint)
    return socket


def send_retrying(out: ZmqOutput, table: pa.Table) -> None:
    """Send as the daemon does under backpressure: wait `retry_after` and try again."""
    deadline = time.monotonic() + 5
    while True:
        try:
            out.send(table)
            return
        except Backpressure as refused:
            assert time.monotonic() < deadline, "the reader never took the table"
            time.sleep(refused.retry_after)


def wait_for_reader(out: ZmqOutput) -> None:
    """Send until the connecting reader is attached (a bound PUSH refuses until then)."""
    send_retrying(out, instructions(1, 999))


def test_zmq_arrow_received_exactly(context):
    with ZmqOutput("push", "tcp://127.0.0.1:*", context=context) as out:
        assert out.endpoint.startswith("tcp://127.0.0.1:")
        receiver = pull(context, out.endpoint)
        try:
            wait_for_reader(out)
            assert pa.ipc.open_stream(receiver.recv()).read_all().equals(instructions(1, 999))
            sent = [instructions(7), instructions(1, 7), instructions(30, 8)]
            for table in sent:
                out.send(table)
            out.send(instructions(0))  # nothing to send, no message
            out.flush()
            got = [pa.ipc.open_stream(receiver.recv()).read_all() for _ in sent]
            assert all(g.equals(s) for g, s in zip(got, sent, strict=True))
            assert receiver.poll(50) == 0
        finally:
            receiver.close()
        assert out.stats()["instructions"] == 39
        assert out.stats()["batches"] == 4


def test_zmq_jsonl_connecting_to_a_bound_reader(context):
    receiver = pull(context, "tcp://127.0.0.1:*", bind=True)
    try:
        endpoint = receiver.last_endpoint.decode()
        out = ZmqOutput.from_config("push", {"endpoint": endpoint, "bind": False, "format": "jsonl"})
        with out:
            # Connecting sockets queue for a reader, so this does not wait.
            out.send(instructions(12))
            message = receiver.recv()
        assert [orjson.loads(line) for line in message.splitlines()] == as_json_rows(instructions(12))
        assert out.stats() == {"instructions": 12, "batches": 1, "bytes": len(message), "backpressure": 0}
    finally:
        receiver.close()


def test_zmq_backpressure_when_nobody_reads(context):
    with ZmqOutput("push", "inproc://nobody", sndhwm=1, context=context) as out:
        with pytest.raises(Backpressure) as refused:
            out.send(instructions(3))
        assert refused.value.retry_after > 0
        assert out.stats()["backpressure"] == 1 and out.stats()["instructions"] == 0

        receiver = pull(context, "inproc://nobody", rcvhwm=1)
        try:
            wait_for_reader(out)
            assert pa.ipc.open_stream(receiver.recv()).read_all().equals(instructions(1, 999))
            taken = 0
            with pytest.raises(Backpressure):
                for _ in range(100):  # inproc queues at most sndhwm + rcvhwm messages
                    out.send(instructions(1, taken))
                    taken += 1
            assert 0 < taken <= 2
            # Every table taken arrives, in order; after reading, sending works again.
            got = [pa.ipc.open_stream(receiver.recv()).read_all() for _ in range(taken)]
            assert pa.concat_tables(got).equals(instructions(taken))
            send_retrying(out, instructions(1, taken))
            assert pa.ipc.open_stream(receiver.recv()).read_all().equals(instructions(1, taken))
            assert out.stats()["batches"] == taken + 2
            assert receiver.poll(50) == 0
        finally:
            receiver.close()


def test_zmq_blocking_send_waits_then_refuses(context):
    with ZmqOutput("push", "inproc://slow", block=True, send_timeout=0.2, sndhwm=1, context=context) as out:
        started = time.monotonic()
        with pytest.raises(Backpressure):
            out.send(instructions(1))
        assert time.monotonic() - started >= 0.15


def test_zmq_remote_bind_needs_allow_remote(context):
    with pytest.raises(ValueError, match="output 'push': endpoint 'tcp://\\*:5560' binds beyond loopback"):
        ZmqOutput.from_config("push", {"endpoint": "tcp://*:5560"})
    with pytest.raises(ValueError, match="beyond loopback"):
        ZmqOutput("push", "tcp://0.0.0.0:5560", context=context)
    with ZmqOutput("push", "tcp://0.0.0.0:*", allow_remote=True, context=context) as out:
        assert out.endpoint.startswith("tcp://0.0.0.0:")
    # Connecting is not listening: no permission needed.
    with ZmqOutput("push", "tcp://192.0.2.1:5560", bind=False, linger=0.001, context=context):
        pass



@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "output 'z': key 'endpoint' is required"),
        ({"endpoint": "127.0.0.1:5560"}, "key 'endpoint' must be a ZeroMQ endpoint"),
        ({"endpoint": "inproc://a", "bind": "yes"}, "key 'bind' must be true or false"),
        ({"endpoint": "inproc://a", "sndhwm": 0}, "key 'sndhwm' must be an integer >= 1"),
        ({"endpoint": "inproc://a", "format": "msgpack"}, "key 'format' must be one of 'arrow', 'jsonl'"),
        ({"endpoint": "inproc://a", "send_timeout": 0}, "key 'send_timeout' must be a positive number"),
        ({"endpoint": "inproc://a", "hwm": 5}, "unknown key\\(s\\) 'hwm'"),
        ({"endpoint": "tcp://127.0.0.1:notaport"}, "output 'z': cannot bind 'tcp://127.0.0.1:notaport'"),
    ],
)
def test_zmq_options_refused_with_the_key_named(options, message):
    with pytest.raises(ValueError, match=message):
        ZmqOutput.from_config("z", options)


def test_the_outputs_module_imports_no_module_that_builds_on_it():
    """No import circle: adapters.outputs finds the outbox by entry point, and imports it only when asked."""
    code = ("import sys, adapters.outputs; "
            "assert not any(m.startswith('adapters.channels') for m in sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
