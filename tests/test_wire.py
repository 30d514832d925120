"""Wire decoding (adapters.wire) and per-row validation (engine.schema.validate_rows).

Messages are made with the real encoders (pyarrow, msgpack, orjson), plus a
few hand-built msgpack byte strings for encodings msgpack-python never writes
(non-minimal integer widths).
"""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import orjson
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.feedback import FeedbackDecoder
from adapters.wire import REJECT_REASONS, TOO_LARGE_KEPT, Decoded, FieldMap, make_decoder
from engine import Engine
from engine.schema import (
    COLUMN_DTYPES,
    EVENT_COLUMNS,
    KIND_CODES,
    KINDS,
    MAX_TS,
    BatchError,
    validate_events,
    validate_rows,
)
from engine.synth import TrafficGenerator

FORMATS = ("arrow", "msgpack", "ndjson")


@pytest.fixture(scope="module")
def events() -> pa.RecordBatch:
    """2,000 events of the standard mix, every column present."""
    return next(TrafficGenerator(5_000, seed=3).batches(2_000, batch_size=2_000))


def arrow_message(*batches: pa.RecordBatch | pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batches[0].schema) as writer:
        for batch in batches:
            writer.write(batch)
    return sink.getvalue().to_pybytes()


def rows_of(batch: pa.RecordBatch) -> list[dict]:
    return batch.to_pylist()


def encode(fmt: str, rows: list[dict], *, positional: bool = False) -> bytes:
    if fmt == "arrow":
        return arrow_message(pa.Table.from_pylist(rows))
    if fmt == "msgpack":
        if positional:
            return msgpack.packb([[row.get(c, 0) for c in EVENT_COLUMNS] for row in rows])
        return msgpack.packb(rows)
    return b"\n".join(orjson.dumps(row) for row in rows) + b"\n"


def assert_valid(decoded: Decoded) -> None:
    """Invariants of every Decoded, good input or bad."""
    assert set(decoded.batch) >= {"ts", "msisdn", "kind"}
    for name, column in decoded.batch.items():
        assert column.dtype == COLUMN_DTYPES[name], name
        assert column.ndim == 1 and len(column) == decoded.n, name
    for reject in decoded.rejects:
        assert reject.reason in REJECT_REASONS
        assert isinstance(reject.record, bytes) and isinstance(reject.detail, str) and reject.detail
        assert reject.row is None or reject.row >= 0
    if decoded.n:
        assert decoded.batch["msisdn"].min() > 0 and decoded.batch["ts"].min() >= 0
        assert decoded.batch["kind"].max() < len(KINDS)


def assert_batch_equal(decoded: Decoded, expected: pa.RecordBatch | dict) -> None:
    columns = expected.schema.names if isinstance(expected, pa.RecordBatch) else list(expected)
    for name in columns:
        want = expected.column(name).to_numpy() if isinstance(expected, pa.RecordBatch) else expected[name]
        got = decoded.batch[name]
        assert got.dtype == COLUMN_DTYPES[name], name
        np.testing.assert_array_equal(got, np.asarray(want, dtype=COLUMN_DTYPES[name]), err_msg=name)


def mp_uint64(value: int) -> bytes:
    return b"\xcf" + struct.pack(">Q", value)


def mp_int64(value: int) -> bytes:
    return b"\xd3" + struct.pack(">q", value)


# -- round trips ---------------------------------------------------------------------------


def test_arrow_round_trip_is_exact_and_zero_copy(events):
    decoded = make_decoder("arrow").decode(arrow_message(events))
    assert decoded.n == events.num_rows and decoded.rejects == []
    assert_batch_equal(decoded, events)
    assert not decoded.batch["msisdn"].flags.writeable  # a view of the message, not a copy


def test_arrow_several_batches_and_other_integer_types(events):
    narrow = pa.RecordBatch.from_arrays(
        [events.column(n).cast(t) for n, t in zip(
            events.schema.names,
            [pa.int64(), pa.uint64(), pa.int32(), pa.int64(), pa.int64(), pa.uint64(), pa.int64(), pa.int64(),
             pa.int64(), pa.int32(), pa.int64(), pa.int16()], strict=True)],
        names=events.schema.names,
    )
    decoded = make_decoder("arrow").decode(arrow_message(narrow.slice(0, 700), narrow.slice(700)))
    assert decoded.n == events.num_rows and decoded.rejects == []
    assert_batch_equal(decoded, events)


def test_msgpack_array_records_round_trip(events):
    decoded = make_decoder("msgpack").decode(encode("msgpack", rows_of(events), positional=True))
    assert decoded.n == events.num_rows and decoded.rejects == []
    assert_batch_equal(decoded, events)


def test_msgpack_map_records_round_trip(events):
    rows = rows_of(events)
    for i, row in enumerate(rows):  # key order must not matter
        if i % 3 == 0:
            rows[i] = dict(reversed(row.items()))
        if i % 5 == 0:
            row["extra"] = ["ignored", {"nested": 1}]
    decoded = make_decoder("msgpack").decode(msgpack.packb(rows))
    assert decoded.n == events.num_rows and decoded.rejects == []
    assert_batch_equal(decoded, events)


def test_ndjson_round_trip(events):
    decoded = make_decoder("ndjson").decode(encode("ndjson", rows_of(events)))
    assert decoded.n == events.num_rows and decoded.rejects == []
    assert_batch_equal(decoded, events)


EDGE_INTEGERS = [0, 1, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**63 - 1,
                 -1, -32, -33, -128, -129, -32_768, -32_769, -(2**31), -(2**31) - 1, -(2**63)]


def test_msgpack_every_integer_encoding():
    rows = [[1, 8613800138000, 0, 0, 0, value, 0, 0, 0, 0, 0, 0] for value in EDGE_INTEGERS]
    decoded = make_decoder("msgpack").decode(msgpack.packb(rows))
    assert decoded.rejects == []
    assert decoded.batch["volume"].tolist() == EDGE_INTEGERS
    # Non-minimal widths, which msgpack-python never writes but other encoders do.
    row = b"\x9c" + mp_uint64(5) + mp_int64(8613800138000) + b"\xcc\x02" + b"\xcd\x00\x07" + b"\xce\x00\x00\x00\x09" \
        + b"\xd0\xfe" + b"\xd1\xff\xfd" + b"\xd2\xff\xff\xff\xfc" + b"\xcb" + struct.pack(">d", 42.0) \
        + b"\xca" + struct.pack(">f", 460.0) + b"\xc0" + b"\x00"
    decoded = make_decoder("msgpack").decode(b"\x91" + row)
    assert decoded.rejects == [] and decoded.n == 1
    assert [int(decoded.batch[c][0]) for c in EVENT_COLUMNS] == [5, 8613800138000, 2, 7, 9, -2, -3, -4, 42, 460, 0, 0]


def test_array_containers_of_every_size():
    """array16/array32 and map16/map32 headers for the message and for records."""
    row = [1, 8613800138000, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    one = msgpack.packb(row)
    body = one * 3
    for header in (b"\x93", b"\xdc\x00\x03", b"\xdd\x00\x00\x00\x03"):
        decoded = make_decoder("msgpack").decode(header + body)
        assert decoded.n == 3 and decoded.rejects == []
    as_map = dict(zip(EVENT_COLUMNS[:3], row[:3], strict=True))
    fields = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in as_map.items())
    for header in (b"\x83", b"\xde\x00\x03", b"\xdf\x00\x00\x00\x03"):
        decoded = make_decoder("msgpack").decode(b"\x91" + header + fields)
        assert decoded.n == 1 and decoded.rejects == [], decoded.rejects


@pytest.mark.parametrize("fmt", FORMATS)
def test_field_map_round_trip(fmt):
    fields = FieldMap.from_config({
        "msisdn": "calling_number",
        "ts": {"from": "start_time", "scale": 1000},
        "kind": {"from": "record_type", "map": {"MOC": 0, "MTC": "call_in", "17": 6}},
        "mcc": {"value": 460},
        "duration": {"from": "secs"},
    })
    rows = [
        {"calling_number": 8613800000001, "start_time": 1_700_000_000, "record_type": "MOC", "secs": 30},
        {"calling_number": 8613800000002, "start_time": 1_700_000_001, "record_type": "MTC", "secs": 0},
        {"calling_number": 8613800000003, "start_time": 1_700_000_002, "record_type": "17", "secs": 5},
        {"calling_number": 8613800000004, "start_time": 1_700_000_003, "record_type": "sms_in", "secs": 1},
        {"calling_number": 8613800000005, "start_time": 1_700_000_004, "record_type": "MOC", "secs": 2,
         "msisdn": -1, "mcc": 999},  # canonical names that the map replaced: ignored
    ]
    decoded = make_decoder(fmt, fields).decode(encode(fmt, rows))
    assert decoded.rejects == []
    assert_batch_equal(decoded, {
        "ts": [1_700_000_000_000 + 1000 * i for i in range(5)],
        "msisdn": [8613800000001 + i for i in range(5)],
        "kind": [0, 1, 6, KIND_CODES["sms_in"], 0],
        "duration": [30, 0, 5, 1, 2],
        "mcc": [460] * 5,
    })


@pytest.mark.parametrize("fmt", ("msgpack", "ndjson"))
def test_integer_value_map_and_kind_names(fmt):
    fields = FieldMap.from_config({"kind": {"from": "type", "map": {"1": 0, "2": 1}}})
    rows = [{"ts": 5, "msisdn": 86, "type": 1}, {"ts": 5, "msisdn": 86, "type": 2},
            {"ts": 5, "msisdn": 86, "type": 3}, {"ts": 5, "msisdn": 86, "type": "location"}]
    decoded = make_decoder(fmt, fields).decode(encode(fmt, rows))
    assert decoded.batch["kind"].tolist() == [0, 1, KIND_CODES["location"]]
    assert [(r.reason, r.row) for r in decoded.rejects] == [("kind", 2)]


def test_msgpack_columns_config():
    fields = FieldMap.from_config({"msisdn": "caller", "ts": {"from": "t", "scale": 1000}})
    decoder = make_decoder("msgpack", fields, columns=["t", "caller", "unused", "kind", "mcc"])
    decoded = decoder.decode(msgpack.packb([[1, 86, "x", "data", 460], [2, 87, None, 4, 454]]))
    assert decoded.rejects == []
    assert decoded.batch["ts"].tolist() == [1000, 2000]
    assert decoded.batch["kind"].tolist() == [4, 4]
    assert decoded.batch["mcc"].tolist() == [460, 454]
    with pytest.raises(ValueError, match="required"):
        make_decoder("msgpack", fields, columns=["t", "kind"])
    with pytest.raises(ValueError, match="distinct"):
        make_decoder("msgpack", columns=["ts", "ts"])
    with pytest.raises(ValueError, match="msgpack"):
        make_decoder("arrow", columns=["ts"])
    with pytest.raises(ValueError, match="wire format"):
        make_decoder("csv")


def test_decoded_batch_feeds_the_engine(events):
    eng = Engine.from_text('[[rule]]\nid = "calls"\non = "call_out"\nchannels = ["sms"]\n')
    decoded = make_decoder("msgpack").decode(encode("msgpack", rows_of(events)))
    expected = Engine.from_text('[[rule]]\nid = "calls"\non = "call_out"\nchannels = ["sms"]\n').process(events)
    assert eng.process(decoded.batch).column("id").to_pylist() == expected.column("id").to_pylist()


# -- bad rows among good ones --------------------------------------------------------------

GOOD = {"ts": 1_000, "msisdn": 8613800138000, "kind": 0, "peer": 5, "duration": 3, "mcc": 460}
BAD_ROWS = [  # (row overrides, reason); None drops the field
    ({"msisdn": -5}, "msisdn"),
    ({"msisdn": 0}, "msisdn"),
    ({"ts": -1}, "ts"),
    ({"ts": MAX_TS + 1}, "ts"),
    ({"ts": 2**63 - 1}, "ts"),
    ({"kind": 13}, "kind"),
    ({"kind": "no_such_kind"}, "kind"),
    ({"duration": 2**31}, "bad_value"),
    ({"mcc": -1}, "bad_value"),
    ({"ts": None}, "missing_field"),
    ({"peer": "text"}, "bad_value"),
    ({"msisdn": 2**63}, "bad_value"),
    ({"kind": True}, "bad_value"),
    ({"peer": False}, "bad_value"),
]


def bad_row(override: dict) -> dict:
    row = dict(GOOD)
    for key, value in override.items():
        if value is None:
            del row[key]
        else:
            row[key] = value
    return row


@pytest.mark.parametrize("fmt", ("msgpack", "msgpack-array", "ndjson"))
def test_bad_rows_rejected_one_by_one(fmt):
    rows, expected = [], []
    for i, (override, reason) in enumerate(BAD_ROWS):
        rows.append(dict(GOOD, ts=10_000 + i))
        rows.append(bad_row(override))
        expected.append((len(rows) - 1, reason))
    rows.append(dict(GOOD, ts=99_999))
    if fmt == "msgpack-array":  # positional records: a missing field is a short record
        message = msgpack.packb([[row[c] for c in GOOD if c in row] for row in rows])
        expected = [(row, "not_records" if reason == "missing_field" else reason) for row, reason in expected]
        decoder = make_decoder("msgpack", columns=list(GOOD))
    else:
        message = encode(fmt, rows)
        decoder = make_decoder(fmt)
    decoded = decoder.decode(message)
    assert_valid(decoded)
    assert [(r.row, r.reason) for r in decoded.rejects] == expected
    bad = {row for row, _ in expected}
    assert decoded.batch["ts"].tolist() == [r["ts"] for i, r in enumerate(rows) if i not in bad]
    assert decoded.n == len(rows) - len(expected)
    for reject in decoded.rejects:  # the record is the row, as JSON
        record = orjson.loads(reject.record)
        values = record if isinstance(record, list) else [record.get(c) for c in EVENT_COLUMNS if c in record]
        assert values[:2] == [rows[reject.row].get(c) for c in EVENT_COLUMNS if c in rows[reject.row]][:2]


def test_arrow_bad_rows_rejected_one_by_one():
    table = pa.table({
        "ts": pa.array([1, 2, None, 4, 5, 6, 7], pa.int64()),
        "msisdn": pa.array([86, -1, 86, 86, 86, 0, 86], pa.int64()),
        "kind": pa.array(["call_out", "data", "data", "bogus", "sms_in", "data", "portal"]),
        "duration": pa.array([1, 2, 3, 4, 2**40, 6, 7], pa.int64()),
    })
    decoded = make_decoder("arrow").decode(arrow_message(table))
    assert_valid(decoded)
    assert [(r.row, r.reason) for r in decoded.rejects] == [
        (1, "msisdn"), (2, "bad_value"), (3, "kind"), (4, "bad_value"), (5, "msisdn")]
    assert decoded.batch["ts"].tolist() == [1, 7]
    assert decoded.batch["kind"].tolist() == [0, KIND_CODES["portal"]]
    assert [orjson.loads(r.record)["ts"] for r in decoded.rejects] == [2, None, 4, 5, 6]


@pytest.mark.parametrize("fmt", ("arrow", "msgpack", "msgpack-array", "ndjson"))
def test_ts_outside_the_event_time_range_rejects_the_row(fmt):
    stamps = [0, MAX_TS, MAX_TS + 1, 2**63 - 1, -1, 1_000]
    rows = [dict(GOOD, ts=ts) for ts in stamps]
    if fmt == "msgpack-array":
        message = msgpack.packb([list(row.values()) for row in rows])
        decoder = make_decoder("msgpack", columns=list(GOOD))
    else:
        message = encode(fmt, rows)
        decoder = make_decoder(fmt)
    decoded = decoder.decode(message)
    assert_valid(decoded)
    assert [(r.row, r.reason) for r in decoded.rejects] == [(2, "ts"), (3, "ts"), (4, "ts")]
    assert decoded.batch["ts"].tolist() == [0, MAX_TS, 1_000]
    assert "after the event time range" in decoded.rejects[0].detail
    assert "before the event time range" in decoded.rejects[2].detail


def test_scaled_ts_beyond_the_event_time_range_rejects_the_row():
    fields = FieldMap.from_config({"ts": {"from": "t", "scale": 1000}})
    last = MAX_TS // 1000
    decoded = make_decoder("ndjson", fields).decode(
        b"\n".join(orjson.dumps({"t": t, "msisdn": 86, "kind": 0}) for t in (last, last + 1)))
    assert decoded.batch["ts"].tolist() == [last * 1000]
    assert [(r.row, r.reason) for r in decoded.rejects] == [(1, "ts")]


BOOLEAN_FIELDS = {"ts": 1_000, "msisdn": 86, "kind": 1, "peer": 1, "mcc": 460}


@pytest.mark.parametrize("fmt", ("msgpack", "msgpack-array", "ndjson"))
@pytest.mark.parametrize("name", list(BOOLEAN_FIELDS))
@pytest.mark.parametrize("others", ["float", "int", "none"])
def test_a_boolean_is_never_an_integer(fmt, name, others):
    """true and false reject their row (bad_value) in any field, whatever the other rows hold there:
    pyarrow reads the JSON values [1.0, true] as the doubles [1.0, 1.0]."""
    value = {"float": float(BOOLEAN_FIELDS[name]), "int": BOOLEAN_FIELDS[name], "none": True}[others]
    rows = [dict(BOOLEAN_FIELDS, **{name: v}) for v in (value, True, value, False)]
    if fmt == "msgpack-array":
        message = msgpack.packb([list(row.values()) for row in rows])
        decoder = make_decoder("msgpack", columns=list(BOOLEAN_FIELDS))
    else:
        message = encode(fmt, rows)
        decoder = make_decoder(fmt)
    decoded = decoder.decode(message)
    assert_valid(decoded)
    if others == "none":
        assert decoded.n == 0 and [(r.row, r.reason) for r in decoded.rejects] == [(i, "bad_value") for i in range(4)]
        return
    assert [(r.row, r.reason) for r in decoded.rejects] == [(1, "bad_value"), (3, "bad_value")]
    assert decoded.batch[name].tolist() == [BOOLEAN_FIELDS[name]] * 2
    assert decoded.batch["ts"].tolist() == [rows[0]["ts"], rows[2]["ts"]]


@pytest.mark.parametrize("name", list(BOOLEAN_FIELDS))
def test_arrow_boolean_column_rejects_the_message(name):
    columns = {field: pa.array([value, value]) for field, value in BOOLEAN_FIELDS.items()}
    columns[name] = pa.array([True, False])
    decoded = make_decoder("arrow").decode(arrow_message(pa.table(columns)))
    assert decoded.n == 0
    assert [(r.row, r.reason) for r in decoded.rejects] == [(None, "bad_value")]
    assert "bool" in decoded.rejects[0].detail


def test_msgpack_row_shapes_and_values():
    good = [1, 8613800138000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    rows = [
        good,
        [1, 2, 3],                                  # arity
        7,                                          # not a record
        "text",                                     # not a record
        {"ts": 1, "msisdn": 86},                    # map without kind
        [1, 8613800138000, 0, None, 0, 0, 0, 0, 0, 0, 0, 0],   # nil in optional: 0
        [None, 8613800138000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],   # nil in required
        [1.5, 8613800138000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],    # non-integral float
        [float("nan"), 8613800138000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1e30, 8613800138000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [True, 8613800138000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [b"\x01", 8613800138000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [[1], 8613800138000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [{"a": [1, 2]}, 8613800138000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [msgpack.ExtType(5, b"xy"), 8613800138000, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 8613800138000, 2**64 - 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 8613800138000, "call_in", 0, 0, 0, 0, 0, 0, 0, 0, 0],
        {1: 2, "ts": 3, "msisdn": 86, "kind": 1, b"bin": 4},  # non-str keys ignored
        good,
    ]
    decoded = make_decoder("msgpack").decode(msgpack.packb(rows, use_bin_type=True))
    assert_valid(decoded)
    assert [(r.row, r.reason) for r in decoded.rejects] == [
        (1, "not_records"), (2, "not_records"), (3, "not_records"), (4, "missing_field"), (6, "bad_value"),
        (7, "bad_value"), (8, "bad_value"), (9, "bad_value"), (10, "bad_value"), (11, "bad_value"),
        (12, "bad_value"), (13, "bad_value"), (14, "bad_value"), (15, "bad_value"),
    ]
    assert decoded.n == 5
    assert decoded.batch["kind"].tolist() == [0, 0, 1, 1, 0]
    assert decoded.batch["peer"].tolist() == [0] * 5
    assert "'kind'" in decoded.rejects[3].detail
    assert orjson.loads(decoded.rejects[0].record) == [1, 2, 3]


def test_scale_overflow_rejects_the_row():
    fields = FieldMap.from_config({"ts": {"scale": 1000}})
    decoded = make_decoder("msgpack", fields, columns=["ts", "msisdn", "kind"]).decode(
        msgpack.packb([[1, 86, 0], [2**62, 86, 0]]))
    assert decoded.batch["ts"].tolist() == [1000]
    assert [(r.row, r.reason) for r in decoded.rejects] == [(1, "bad_value")]
    assert "overflows" in decoded.rejects[0].detail


def test_ndjson_lines():
    lines = [
        b'{"ts": 1, "msisdn": 86, "kind": 0}',
        b"",
        b"   ",
        b'{"ts": 2, "msisdn": 86, "kind": "sms_out", "peer": null, "duration": 4.0}',
        b"{not json",
        b"[1, 2]",
        b'{"ts": 3, "msisdn": 86}',
        b'{"ts": null, "msisdn": 86, "kind": 0}',
        b'{"ts": 4, "msisdn": 86, "kind": 2, "duration": 1.5}',
        b'{"ts": 5, "msisdn": 86, "kind": 3}\r',
    ]
    decoded = make_decoder("ndjson").decode(b"\n".join(lines))
    assert_valid(decoded)
    assert [(r.row, r.reason) for r in decoded.rejects] == [
        (4, "undecodable"), (5, "not_records"), (6, "missing_field"), (7, "bad_value"), (8, "bad_value")]
    assert [r.record for r in decoded.rejects] == [lines[i] for i in (4, 5, 6, 7, 8)]
    assert decoded.batch["ts"].tolist() == [1, 2, 5]
    assert decoded.batch["kind"].tolist() == [0, 2, 3]
    assert decoded.batch["duration"].tolist() == [0, 4, 0]


def test_arrow_column_problems():
    def message(**columns) -> bytes:
        return arrow_message(pa.table(columns))

    ok = {"ts": pa.array([1, 2, 3]), "msisdn": pa.array([86, 87, 88]), "kind": pa.array([0, 1, 2], pa.uint8())}
    decoded = make_decoder("arrow").decode(message(**{**ok, "msisdn": pa.array([86, None, 88])}))
    assert [(r.row, r.reason) for r in decoded.rejects] == [(1, "bad_value")]
    assert orjson.loads(decoded.rejects[0].record) == {"ts": 2, "msisdn": None, "kind": 1}
    decoded = make_decoder("arrow").decode(message(**ok, peer=pa.array([None, 5, None])))
    assert decoded.rejects == [] and decoded.batch["peer"].tolist() == [0, 5, 0]
    decoded = make_decoder("arrow").decode(message(**{**ok, "ts": pa.array([1.0, 2.5, 3.0])}))
    assert decoded.batch["ts"].tolist() == [1, 3] and [r.row for r in decoded.rejects] == [1]
    decoded = make_decoder("arrow").decode(message(**{**ok, "kind": pa.array(["call_out", "nope", "data"])}))
    assert decoded.batch["kind"].tolist() == [0, 4] and [(r.row, r.reason) for r in decoded.rejects] == [(1, "kind")]
    decoded = make_decoder("arrow").decode(message(**{**ok, "msisdn": pa.array([86, 2**64 - 1, 5], pa.uint64())}))
    assert [(r.row, r.reason) for r in decoded.rejects] == [(1, "bad_value")]
    decoded = make_decoder("arrow").decode(message(ts=ok["ts"], kind=ok["kind"]))
    assert [(r.row, r.reason) for r in decoded.rejects] == [(None, "missing_field")] and decoded.n == 0
    decoded = make_decoder("arrow").decode(message(**{**ok, "ts": pa.array(["1", "2", "3"])}))
    assert [(r.row, r.reason) for r in decoded.rejects] == [(None, "bad_value")] and decoded.n == 0
    decoded = make_decoder("arrow").decode(message(**{**ok, "peer": pa.array([[1], [2], []])}))
    assert [(r.row, r.reason) for r in decoded.rejects] == [(None, "bad_value")]


# -- whole messages ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("message", [b"", b"\x00", b"\xc1", b"garbage \xff\xfe", b"\xdd\xff\xff\xff\xff",
                                     b"\xdb\xff\xff\xff\xff", b"ARROW1\x00\x00"])
def test_garbage_messages_are_rejected_whole(fmt, message):
    decoded = make_decoder(fmt).decode(message)
    assert_valid(decoded)
    assert decoded.n == 0 and len(decoded.rejects) == 1
    assert decoded.rejects[0].reason in ("undecodable", "not_records")
    assert decoded.rejects[0].record == message


def test_msgpack_wrong_shapes():
    decoder = make_decoder("msgpack")
    for message in (msgpack.packb({"ts": 1, "msisdn": 86, "kind": 0}), msgpack.packb(5), msgpack.packb("x")):
        decoded = decoder.decode(message)
        assert [(r.row, r.reason) for r in decoded.rejects] == [(None, "not_records")]
    assert decoder.decode(msgpack.packb([])).rejects == []


def test_too_large():
    message = encode("msgpack", [GOOD] * 10)
    for fmt in FORMATS:
        decoded = make_decoder(fmt, max_message_bytes=len(message) - 1).decode(message)
        assert [(r.row, r.reason) for r in decoded.rejects] == [(None, "too_large")]
        assert decoded.rejects[0].record == message


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_too_large_message_is_dead_lettered_by_its_first_64_kib_with_its_size(fmt):
    message = encode(fmt, [GOOD] * 10_000)
    assert len(message) > 3 * TOO_LARGE_KEPT and TOO_LARGE_KEPT == 64 << 10
    limit = len(message) // 2
    for received in (message, memoryview(message), bytearray(message)):
        (reject,) = make_decoder(fmt, max_message_bytes=limit).decode(received).rejects
        assert (reject.reason, reject.row) == ("too_large", None)
        assert reject.record == message[:TOO_LARGE_KEPT] and type(reject.record) is bytes
        assert f"{len(message)} bytes" in reject.detail and str(limit) in reject.detail
    # Just over the limit and under 64 KiB: the record is the whole message.
    small = encode(fmt, [GOOD] * 3)
    (reject,) = make_decoder(fmt, max_message_bytes=len(small) - 1).decode(small).rejects
    assert reject.record == small


def test_a_too_large_feedback_message_is_dead_lettered_by_its_first_64_kib_with_its_size():
    message = b"\n".join(orjson.dumps({"id": f"r:{k}", "outcome": "delivered", "ts": k}) for k in range(10_000))
    assert len(message) > 3 * TOO_LARGE_KEPT
    (reject,) = FeedbackDecoder("ndjson", max_message_bytes=len(message) - 1).decode(message).rejects
    assert reject.reason == "too_large" and reject.record == message[:TOO_LARGE_KEPT]
    assert f"{len(message)} bytes" in reject.detail


def test_every_reason_the_daemon_dead_letters_is_a_reject_reason():
    # The daemon makes a counter per input and reason from REJECT_REASONS; a reason outside it has none at start.
    assert {"too_large", "extra_frames", "undecodable"} <= set(REJECT_REASONS)
    assert len(set(REJECT_REASONS)) == len(REJECT_REASONS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_messages_never_raise(fmt, events):
    message = encode(fmt, rows_of(events.slice(0, 20)))
    for cut in range(len(message)):
        assert_valid(make_decoder(fmt).decode(message[:cut]))


def test_msgpack_truncated_keeps_the_rows_before():
    rows = [dict(GOOD, ts=i) for i in range(10)]
    message = msgpack.packb(rows)
    last = len(msgpack.packb(rows[-1]))
    decoded = make_decoder("msgpack").decode(message[:-last // 2])
    assert decoded.batch["ts"].tolist() == list(range(9))
    assert [(r.row, r.reason) for r in decoded.rejects] == [(9, "undecodable")]
    assert decoded.rejects[0].record == message[-last:-last // 2]
    # A count claiming more records than there are.
    decoded = make_decoder("msgpack").decode(b"\xdd\x00\x01\x00\x00" + message[1:])
    assert decoded.n == 10 and [(r.row, r.reason) for r in decoded.rejects] == [(10, "undecodable")]
    # Bytes after the array.
    decoded = make_decoder("msgpack").decode(message + b"\x01\x02")
    assert decoded.n == 10 and [(r.row, r.reason, r.record) for r in decoded.rejects] == [
        (None, "undecodable", b"\x01\x02")]
    # The never-used byte 0xc1 inside a record loses that record and the rest.
    broken = bytearray(message)
    broken[len(message) - 3 * last + 1] = 0xC1
    decoded = make_decoder("msgpack").decode(bytes(broken))
    assert decoded.n == 7 and [(r.row, r.reason) for r in decoded.rejects] == [(7, "undecodable")]


def test_hostile_lengths():
    decoder = make_decoder("msgpack")
    for message in (b"\x91\xdd\xff\xff\xff\xff", b"\x91\xdf\xff\xff\xff\xff", b"\x91\xdb\xff\xff\xff\xff",
                    b"\x91\xc6\xff\xff\xff\xff", b"\x91\xc9\xff\xff\xff\xff\x01", b"\xdd\x7f\xff\xff\xff\x90",
                    b"\x92" + b"\x91" * 100_000, b"\x91\x9c" + b"\x91" * 100_000):
        decoded = decoder.decode(message)
        assert_valid(decoded)
        assert decoded.n == 0 and decoded.rejects


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_only_buffers(fmt, events):
    message = encode(fmt, rows_of(events.slice(0, 50)))
    for buffer in (memoryview(message), memoryview(bytearray(message)), bytearray(message),
                   memoryview(np.frombuffer(message, dtype=np.uint8))):
        decoded = make_decoder(fmt).decode(buffer)
        assert decoded.n == 50 and decoded.rejects == []
        assert_batch_equal(decoded, events.slice(0, 50))


# -- field map configuration ---------------------------------------------------------------


@pytest.mark.parametrize("table, message", [
    ({"nope": "x"}, "not an event column"),
    ({"ts": 5}, "field name or a table"),
    ({"ts": {"from": ""}}, "from"),
    ({"ts": {"scale": 0}}, "positive integer"),
    ({"ts": {"scale": 2.5}}, "positive integer"),
    ({"ts": {"scale": True}}, "positive integer"),
    ({"ts": {"from": "t", "bogus": 1}}, "unknown keys"),
    ({"kind": {"map": {"A": 0}, "scale": 2}}, "do not combine"),
    ({"kind": {"map": {}}}, "table of source value"),
    ({"kind": {"map": {"A": "no_such_kind"}}}, "not a kind name"),
    ({"kind": {"map": {"A": 13}}}, "not a kind code"),
    ({"mcc": {"map": {"A": 70_000}}}, "does not fit"),
    ({"mcc": {"value": 460, "from": "x"}}, "constant"),
    ({"mcc": {"value": "460"}}, "integer"),
    ({"msisdn": {"value": 0}}, "not a valid msisdn"),
    ({"ts": {"value": -1}}, "not a valid ts"),
    ({"ts": {"value": MAX_TS + 1}}, "not a valid ts"),
    ({"ts": {"value": True}}, "integer"),
    ({"msisdn": "a", "peer": "a"}, "both read"),
    ({"peer": "msisdn"}, "reads no field"),
])
def test_field_map_errors(table, message):
    with pytest.raises(ValueError, match=message):
        FieldMap.from_config(table)


def test_field_map_kind_constant_and_freed_names():
    fields = FieldMap.from_config({"kind": {"value": "portal"}, "peer": "msisdn", "msisdn": "caller"})
    decoded = make_decoder("ndjson", fields).decode(b'{"ts": 1, "caller": 86, "msisdn": 99}')
    assert decoded.batch["kind"].tolist() == [KIND_CODES["portal"]]
    assert decoded.batch["peer"].tolist() == [99] and decoded.batch["msisdn"].tolist() == [86]
    with pytest.raises(ValueError, match="expected a table"):
        FieldMap.from_config(["ts"])


# -- validate_rows ---------------------------------------------------------------------------


def test_validate_rows_keeps_good_rows():
    columns = {
        "ts": np.array([1, -1, 3, 4, 5, 6], np.int64),
        "msisdn": np.array([86, 86, 0, 86, 2**63, 86], np.uint64),
        "kind": np.array([0, 0, 0, 13, 0, 255], np.int64),
        "mcc": np.array([460, 70_000, 0, 0, 0, 0], np.int64),
        "unrelated": np.array(["x"] * 6),
    }
    valid, failures = validate_rows(columns, 6)
    assert valid.tolist() == [True, False, False, False, False, False]
    assert [(row, reason) for row, reason, _ in failures] == [
        (1, "bad_value"), (2, "msisdn"), (3, "kind"), (4, "bad_value"), (5, "kind")]
    assert "mcc" in failures[0][2]
    valid, failures = validate_rows(columns, 6, valid=np.array([True, True, False, True, True, True]))
    assert 2 not in [row for row, _, _ in failures] and not valid[2]


def test_validate_rows_ts_range():
    columns = {"ts": np.array([0, MAX_TS, MAX_TS + 1, -1, 2**63 - 1], np.int64),
               "msisdn": np.full(5, 86, np.int64), "kind": np.zeros(5, np.uint8)}
    valid, failures = validate_rows(columns, 5)
    assert valid.tolist() == [True, True, False, False, False]
    assert [(row, reason) for row, reason, _ in failures] == [(2, "ts"), (3, "ts"), (4, "ts")]
    assert str(MAX_TS + 1) in failures[0][2] and "after" in failures[0][2] and "before" in failures[1][2]
    # Beyond int64 is a value that does not fit, reported once, not also as out of range.
    unsigned = np.array([1, 2**63, MAX_TS + 1, 3, 4], np.uint64)
    valid, failures = validate_rows({**columns, "ts": unsigned}, 5)
    assert [(row, reason) for row, reason, _ in failures] == [(1, "bad_value"), (2, "ts")]
    with pytest.raises(BatchError) as info:  # the whole-batch check refuses the same first row
        validate_events(columns)
    assert (info.value.column, info.value.row) == ("ts", 2)


def test_validate_rows_and_validate_events_agree():
    columns = {"ts": np.array([1, 2], np.int64), "msisdn": np.array([86, 87], np.int64),
               "kind": np.array([0, 12], np.uint8)}
    valid, failures = validate_rows(columns, 2)
    assert valid.all() and failures == []
    with pytest.raises(BatchError, match="required"):
        validate_rows({"ts": columns["ts"], "kind": columns["kind"]}, 2)
    with pytest.raises(BatchError, match="integer"):
        validate_rows({**columns, "peer": np.array([1.0, 2.0])}, 2)
    with pytest.raises(BatchError, match="expected 2 values"):
        validate_rows({**columns, "peer": np.array([1])}, 2)
    valid, failures = validate_rows({name: col[:0] for name, col in columns.items()}, 0)
    assert len(valid) == 0 and failures == []


# -- fuzzing -----------------------------------------------------------------------------------

FUZZ_ROWS = [dict(GOOD, ts=1_000 + i, msisdn=8613800138000 + i) for i in range(8)]
MESSAGES = {fmt: encode(fmt, FUZZ_ROWS) for fmt in FORMATS}
MESSAGES["msgpack-array"] = encode("msgpack", FUZZ_ROWS, positional=True)


def decoder_for(name: str):
    return make_decoder(name.split("-")[0])


@pytest.mark.parametrize("name", sorted(MESSAGES))
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes(name, data):
    assert_valid(decoder_for(name).decode(data))


@pytest.mark.parametrize("name", sorted(MESSAGES))
@given(edits=st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]),
                                st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_mutated_messages(name, edits):
    message = bytearray(MESSAGES[name])
    for op, where, byte in edits:
        if not message:
            break
        at = where % len(message)
        if op == "flip":
            message[at] ^= byte or 1
        elif op == "insert":
            message.insert(at, byte)
        elif op == "delete":
            del message[at]
        else:
            del message[at:]
    assert_valid(decoder_for(name).decode(bytes(message)))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=12) | st.sampled_from(list(KINDS)),
    lambda inner: st.lists(inner, max_size=13) | st.dictionaries(st.sampled_from(list(EVENT_COLUMNS) + ["x"]), inner,
                                                                 max_size=13),
    max_leaves=30,
)


@pytest.mark.parametrize("positional", [True, False])
@given(replacements=st.dictionaries(st.integers(0, len(FUZZ_ROWS) - 1), msgpack_values, max_size=4))
def test_fuzz_replaced_records_lose_no_valid_row(positional, replacements):
    """Records replaced by any msgpack value: each is kept or rejected alone, and
    every record left intact comes through."""
    rows = [[row.get(c, 0) for c in EVENT_COLUMNS] if positional else row for row in FUZZ_ROWS]
    parts = [msgpack.packb(replacements.get(i, row)) for i, row in enumerate(rows)]
    decoded = make_decoder("msgpack").decode(b"\x98" + b"".join(parts))
    assert_valid(decoded)
    rejected = [r.row for r in decoded.rejects]
    assert None not in rejected and len(set(rejected)) == len(rejected)
    assert decoded.n + len(rejected) == len(FUZZ_ROWS)
    assert set(rejected) <= set(replacements)
    kept = set(decoded.batch["ts"].tolist())
    assert {FUZZ_ROWS[i]["ts"] for i in range(len(FUZZ_ROWS)) if i not in replacements} <= kept


@given(values=st.lists(st.sampled_from([0, 127, 2**31, 2**40, -1, -(2**40), 1.0, None, "x", [], {}, True]),
                       min_size=12, max_size=12))
def test_fuzz_one_field_any_value(values):
    """A record of any field values: accepted exactly when each value is one the schema takes."""
    row = [1, 8613800138000, 0, *values[3:]]
    decoded = make_decoder("msgpack").decode(msgpack.packb([row, row]))
    assert_valid(decoded)
    assert decoded.n + len(decoded.rejects) == 2
    if decoded.n:
        expect = [0 if v is None else int(v) for v in row]
        assert [int(decoded.batch[c][0]) for c in EVENT_COLUMNS] == expect


def test_fuzz_many_mutations_fast():
    """Many cheap random mutations straight into the compiled parser (seeded)."""
    rng = np.random.default_rng(20261122)
    decoders = {name: decoder_for(name) for name in ("msgpack", "msgpack-array")}
    for name, decoder in decoders.items():
        base = np.frombuffer(MESSAGES[name], dtype=np.uint8)
        for _ in range(3_000):
            message = base.copy()
            at = rng.integers(0, len(message), size=rng.integers(1, 6))
            message[at] = rng.integers(0, 256, size=len(at), dtype=np.uint8)
            message = message[: rng.integers(1, len(message) + 1)] if rng.random() < 0.3 else message
            assert_valid(decoder.decode(message.tobytes()))
