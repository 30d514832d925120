"""Event batch validation (SPEC section 2): engine.validate_events and engine.BatchError."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from engine import EVENT_COLUMNS, KIND_CODES, BatchError, Engine, parse_rules, validate_events
from engine.reference import ReferenceEngine
from engine.rules import MAX_DURATION
from engine.schema import COLUMN_DTYPES, MAX_TS, MIN_TS

RULES = """
[[rule]]
id = "calls"
on = "call_out"
where = "peer prefix 95555 or duration >= 60"
count = { at_least = 2, within = "1h" }
channels = ["sms"]
params = ["peer", "duration"]
cooldown = "10ms"

[[rule]]
id = "silent"
on = "call_out"
where = "peer == 0"
channels = ["crm"]
priority = -1
"""


def good(n: int = 6, start: int = 1_000) -> dict[str, np.ndarray]:
    """A valid batch: call_out events of two subscribers, every column present."""
    i = np.arange(n, dtype=np.int64)
    columns = {name: np.zeros(n, dtype=COLUMN_DTYPES[name]) for name in EVENT_COLUMNS}
    columns["ts"] = start + 10 * i
    columns["msisdn"] = 8613800138000 + i % 2
    columns["kind"] = np.full(n, KIND_CODES["call_out"], np.uint8)
    columns["peer"] = np.where(i % 3 == 0, 955551234, 12345).astype(np.int64)
    columns["duration"] = (i * 20).astype(np.int32)
    return columns


def expect_error(batch, column: str, row: int | None, fragment: str = "") -> BatchError:
    with pytest.raises(BatchError) as info:
        validate_events(batch)
    err = info.value
    assert (err.column, err.row) == (column, row), str(err)
    assert repr(column) in str(err)
    if row is not None:
        assert f"row {row}" in str(err)
    assert fragment in str(err)
    assert isinstance(err, ValueError)
    return err


# ---------------------------------------------------------------------------
# What validation refuses.


@pytest.mark.parametrize("name", ["ts", "msisdn", "kind"])
def test_missing_required_column_is_named(name):
    batch = good()
    del batch[name]
    expect_error(batch, name, None, "missing")
    expect_error(pa.RecordBatch.from_pydict(batch), name, None, "missing")


@pytest.mark.parametrize("bad_value", [0, -1, -8613800138000])
def test_msisdn_not_positive_reports_first_bad_row(bad_value):
    batch = good()
    batch["msisdn"][[2, 4]] = bad_value
    expect_error(batch, "msisdn", 2, str(bad_value))


def test_unknown_kind_code():
    batch = good()
    batch["kind"][3] = len(KIND_CODES)  # 13: one past "portal"
    batch["kind"][5] = 255
    expect_error(batch, "kind", 3, "13")


def test_negative_ts():
    batch = good()
    batch["ts"][4] = -1
    expect_error(batch, "ts", 4, "-1")


def test_ts_zero_is_valid():
    batch = good()
    batch["ts"][:] = 0
    assert validate_events(batch).n == 6


@pytest.mark.parametrize("form", ["numpy", "arrow"])
@pytest.mark.parametrize("value", [MAX_TS + 1, 2**63 - 1])
def test_ts_beyond_the_event_time_range(form, value):
    batch = good()
    batch["ts"][[3, 5]] = value
    expect_error(batch if form == "numpy" else pa.RecordBatch.from_pydict(batch), "ts", 3, str(value))
    expect_error(batch, "ts", 3, "event time range")


def test_ts_range_bounds_are_valid():
    batch = good()
    batch["ts"][:] = [MIN_TS, 1, MAX_TS - 1, MAX_TS, 0, MAX_TS]
    assert validate_events(batch)["ts"].tolist() == [0, 1, MAX_TS - 1, MAX_TS, 0, MAX_TS]


# The idle clock (engine/daemon.py) advances to the last event's ts plus the
# silence: after an event at 2^63 - 1 that sum overflowed int64 in advance().
@pytest.mark.parametrize("ts", [-1, MAX_TS + 1, 2**63 - 1, 2**63 - 1 + 1_000, 2**64])
def test_advance_outside_the_event_time_range_raises_value_error(ts):
    engine = Engine.from_text(RULES)
    engine.process(good())
    before = (engine.watermark, engine.stats())
    with pytest.raises(ValueError, match="event time range"):
        engine.advance(ts)
    assert (engine.watermark, engine.stats()) == before


def test_advance_to_the_last_accepted_ts():
    engine = Engine.from_text(RULES)
    assert engine.process(good(6, start=MAX_TS - 5_000)).num_rows > 0
    assert engine.watermark == MAX_TS - 4_950
    engine.advance(min(engine.watermark + 10_000, MAX_TS))  # the idle clock, clamped
    assert engine.watermark == MAX_TS


def test_null_in_arrow_column_names_the_row():
    batch = pa.RecordBatch.from_pydict(good()).set_column(
        EVENT_COLUMNS.index("peer"), "peer", pa.array([1, 2, None, 4, None, 6], pa.int64())
    )
    expect_error(batch, "peer", 2, "null")


def test_null_in_second_chunk_of_a_table_gives_the_table_row():
    first = pa.RecordBatch.from_pydict(good(4))
    second = pa.RecordBatch.from_pydict(good(4, start=2_000))
    second = second.set_column(EVENT_COLUMNS.index("ts"), "ts", pa.array([2_000, None, 2_020, 2_030], pa.int64()))
    table = pa.Table.from_batches([first, second.cast(first.schema)])
    assert table.column("ts").num_chunks == 2
    expect_error(table, "ts", 5, "null")


@pytest.mark.parametrize(
    "column",
    [
        np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        np.array([True, False] * 3),
        np.array(["1", "2", "3", "4", "5", "6"]),
        np.array([1, 2, 3, 4, 5, 2**70], dtype=object),
    ],
    ids=["float", "bool", "str", "object"],
)
def test_non_integer_numpy_dtype(column):
    batch = good()
    batch["peer"] = column
    expect_error(batch, "peer", None, "integer")


@pytest.mark.parametrize(
    "array", [pa.array([1.5] * 6), pa.array(["x"] * 6), pa.array([True] * 6)], ids=["float", "string", "bool"]
)
def test_non_integer_arrow_type(array):
    batch = pa.RecordBatch.from_pydict(good()).set_column(EVENT_COLUMNS.index("duration"), "duration", array)
    expect_error(batch, "duration", None, "integer")


def test_two_dimensional_column():
    batch = good()
    batch["peer"] = np.zeros((6, 1), np.int64)
    with pytest.raises(BatchError) as info:
        validate_events(batch)
    assert info.value.column == "peer"


@pytest.mark.parametrize(
    ("name", "dtype", "value", "row"),
    [
        ("kind", np.int64, 300, 1),
        ("kind", np.int16, -1, 3),
        ("mcc", np.int64, 70_000, 0),
        ("mcc", np.int32, -460, 5),
        ("duration", np.int64, 2**31, 2),
        ("code", np.int64, -(2**31) - 1, 4),
        ("ts", np.uint64, 2**63, 1),
        ("msisdn", np.uint64, 2**64 - 1, 0),
    ],
)
def test_values_that_do_not_fit_the_column_type(name, dtype, value, row):
    batch = good()
    column = batch[name].astype(dtype)
    column[row] = value
    batch[name] = column
    expect_error(batch, name, row, str(value))


def test_wider_integer_types_that_fit_are_cast():
    batch = good()
    batch["kind"] = batch["kind"].astype(np.int64)
    batch["mcc"] = np.full(6, 460, np.int64)
    batch["ts"] = batch["ts"].astype(np.uint64)
    batch["peer"] = batch["peer"].astype(">i8")  # big-endian
    events = validate_events(batch)
    for name in EVENT_COLUMNS:
        assert events[name].dtype == COLUMN_DTYPES[name]
    assert events["mcc"].tolist() == [460] * 6
    assert events["peer"].tolist() == good()["peer"].tolist()


def test_dict_with_mismatched_lengths():
    batch = good()
    batch["duration"] = batch["duration"][:4]
    err = expect_error(batch, "duration", None)
    assert "4" in str(err) and "6" in str(err)


def test_not_a_batch():
    with pytest.raises(TypeError):
        validate_events([{"ts": 1, "msisdn": 1, "kind": 0}])


def test_an_unknown_column_is_refused_naming_it_and_the_nearest_name():
    batch = good()
    batch["durration"] = np.arange(6, dtype=np.int32)
    with pytest.raises(BatchError, match="'durration'.*did you mean 'duration'") as caught:
        validate_events(batch)
    assert caught.value.column == "durration"
    batch = good()
    batch["subscriber_note"] = np.arange(6)
    with pytest.raises(BatchError, match="subscriber_note.*the columns are ts, msisdn"):
        validate_events(batch)


def test_unknown_extra_columns_are_ignored_when_asked():
    batch = good()
    batch["imsi"] = np.arange(6)
    batch["note"] = np.array(["x"] * 6)
    assert validate_events(batch, unknown_columns="ignore").n == 6
    with pytest.raises(ValueError, match="unknown_columns"):
        validate_events(batch, unknown_columns="lenient")


def test_the_engine_refuses_a_misspelt_column_unless_told_to_ignore_it():
    from engine import Engine

    batch = good()
    batch["durration"] = np.arange(6, dtype=np.int32)
    with pytest.raises(BatchError, match="durration"):
        Engine.from_text("").process(batch)
    assert Engine.from_text("", unknown_columns="ignore").process(batch).num_rows == 0


def test_max_ts_keeps_local_days_inside_the_caps_keys():
    """The kernel packs a subscriber's local day into 20 bits of a caps key with a bias
    of 2^19 (engine/_fast/kernel.pyx caps_key): a later day spills into the month flag
    and the subscriber bits and shares another key's count.  The latest day it may
    count: that of MAX_TS plus a UTC offset (under a day) plus 64 days of quiet hours
    and contact days."""
    day = 86_400_000
    assert (MAX_TS + day + 64 * day) // day < 2**19
    assert MAX_TS + 2 * MAX_DURATION < 2**63 - 1  # ts plus a window plus a cooldown


END_OF_RANGE_RULES = """
[policy]
timezone = "Pacific/Kiritimati"
daily_cap = 2
monthly_cap = 3
quiet_hours = "21:00-09:00"
contact_days = [1, 2, 3, 4, 5]
cooldown = "0s"

[[rule]]
id = "count"
on = "call_out"
count = { at_least = 2, within = "36600d" }
channels = ["sms"]
params = ["peer"]
cooldown = "36600d"

[[rule]]
id = "first"
on = "call_in"
first = { within = "36600d" }
channels = ["sms", "crm"]

[[rule]]
id = "sum"
on = "data"
sum = { column = "volume", at_least = 10, within = "36600d" }
channels = ["sms"]

[[rule]]
id = "distinct"
on = "location"
distinct = { column = "cell", at_least = 2, within = "36600d" }
channels = ["sms"]
active = { from = "2999-12-01", until = "3000-01-01", hours = "00:00-23:59" }

[[rule]]
id = "after"
on = "sms_out"
after = { rule = "count", within = "36600d" }
channels = ["crm"]

[[rule]]
id = "absence"
on = "balance"
absence = { on = "recharge", within = "1d" }
channels = ["sms"]
params = ["balance"]

[[rule]]
id = "absence_long"
on = "balance"
absence = { on = "recharge", within = "36600d" }
channels = ["sms"]
"""


def test_the_end_of_the_event_time_range_matches_the_reference():
    """Events up to MAX_TS through every condition, the longest windows and cooldowns,
    quiet hours, contact days and caps in the zone furthest ahead of UTC (+14:00, so
    local time passes into the year 3000): the kernel's int64 arithmetic agrees with
    the reference's unbounded Python integers."""
    kinds = ["balance", "call_out", "call_out", "call_in", "data", "data", "location", "location", "sms_out",
             "balance", "call_out"]
    n = len(kinds)
    ts = MAX_TS - 5 * 3_600_000 * np.arange(n - 1, -1, -1, dtype=np.int64)
    batch = {"ts": ts, "msisdn": np.full(n, 86, np.int64),
             "kind": np.array([KIND_CODES[k] for k in kinds], np.uint8),
             "peer": np.full(n, 7, np.int64), "volume": np.full(n, 6, np.int64),
             "cell": np.arange(1, n + 1, dtype=np.int64), "balance": np.full(n, 3, np.int64)}
    kernel = Engine.from_text(END_OF_RANGE_RULES)
    reference = ReferenceEngine(parse_rules(END_OF_RANGE_RULES))
    out = kernel.process(batch)
    assert out.to_pylist() == reference.process(batch).to_pylist()
    assert kernel.advance(MAX_TS).to_pylist() == reference.advance(MAX_TS).to_pylist()
    rules = kernel.stats()["rules"]
    assert rules == reference.stats()["rules"]
    # Not vacuous: every condition matched, and quiet hours, caps and cooldowns all acted.
    assert {rule for rule, counts in rules.items() if counts["matched"]} == set(rules) - {"absence_long"}
    assert any(row["not_before"] > row["ts"] for row in out.to_pylist())
    assert rules["sum"]["stopped"]["capped"] and rules["count"]["stopped"]["cooldown"]


# ---------------------------------------------------------------------------
# What validation accepts.


def test_missing_optional_columns_read_as_zero():
    batch = {k: good()[k] for k in ("ts", "msisdn", "kind")}
    events = validate_events(batch)
    for name in EVENT_COLUMNS[3:]:
        assert events.columns[EVENT_COLUMNS.index(name)] is None
        assert events[name].dtype == COLUMN_DTYPES[name]
        assert events[name].tolist() == [0] * 6


def test_absent_peer_behaves_like_peer_zero(implementation):
    rules = """
[[rule]]
id = "no_peer"
on = "call_out"
where = "peer == 0"
channels = ["sms"]
params = ["peer"]

[[rule]]
id = "has_peer"
on = "sms_out"
where = "peer != 0"
channels = ["sms"]
"""
    ts = np.array([1, 2], np.int64)
    msisdn = np.array([5, 5], np.int64)
    kinds = np.array([KIND_CODES["call_out"], KIND_CODES["sms_out"]], np.uint8)
    absent = implementation(rules).process({"ts": ts, "msisdn": msisdn, "kind": kinds}).to_pylist()
    zero = implementation(rules).process(
        {"ts": ts, "msisdn": msisdn, "kind": kinds, "peer": np.zeros(2, np.int64)}
    ).to_pylist()
    assert absent == zero
    assert [(r["rule"], r["params"]) for r in absent] == [("no_peer", [("peer", "0")])]


def test_empty_batch():
    engine = Engine.from_text(RULES)
    out = engine.process({k: v[:0] for k, v in good().items()})
    assert out.num_rows == 0
    assert engine.stats()["events"] == 0


def _read_only(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, column in batch.items():
        column = column.copy()
        column.flags.writeable = False
        out[name] = column
    return out


def test_read_only_numpy_arrays_are_accepted():
    expected = Engine.from_text(RULES).process(good(40))
    assert expected.num_rows > 0
    batch = _read_only(good(40))
    assert not batch["ts"].flags.writeable
    assert Engine.from_text(RULES).process(batch).equals(expected)
    # Also when a column needs a cast first.
    batch = good(40)
    batch["kind"] = batch["kind"].astype(np.int64)
    assert Engine.from_text(RULES).process(_read_only(batch)).equals(expected)


def test_read_only_arrays_from_a_memory_map(tmp_path):
    expected = Engine.from_text(RULES).process(good(40))
    batch = {}
    for name, column in good(40).items():
        path = tmp_path / f"{name}.npy"
        np.save(path, column)
        batch[name] = np.load(path, mmap_mode="r")
    assert not batch["msisdn"].flags.writeable
    assert Engine.from_text(RULES).process(batch).equals(expected)


@pytest.mark.parametrize("form", ["record_batch", "table", "multi_chunk_table", "sliced_record_batch"])
def test_arrow_inputs_are_accepted(form):
    columns = good(40)
    expected = Engine.from_text(RULES).process(columns)
    assert expected.num_rows > 0
    record_batch = pa.RecordBatch.from_pydict(columns)
    if form == "record_batch":
        batch = record_batch
    elif form == "table":
        batch = pa.Table.from_batches([record_batch])
    elif form == "multi_chunk_table":
        batch = pa.Table.from_batches([record_batch.slice(0, 7), record_batch.slice(7, 0), record_batch.slice(7)])
        assert batch.column("ts").num_chunks == 3
    else:
        # A view into a larger buffer (non-zero offset): the same events as rows 5..
        expected = Engine.from_text(RULES).process({k: v[5:] for k, v in columns.items()})
        batch = record_batch.slice(5)
    assert Engine.from_text(RULES).process(batch).equals(expected)


def test_arrow_input_with_narrow_and_missing_columns():
    columns = good(40)
    expected = Engine.from_text(RULES).process({k: columns[k] for k in ("ts", "msisdn", "kind", "peer", "duration")})
    batch = pa.RecordBatch.from_arrays(
        [
            pa.array(columns["ts"].astype(np.uint32)),
            pa.array(columns["msisdn"]),
            pa.array(columns["kind"].astype(np.int8)),
            pa.array(columns["peer"]),
            pa.array(columns["duration"].astype(np.int16)),
        ],
        names=["ts", "msisdn", "kind", "peer", "duration"],
    )
    assert Engine.from_text(RULES).process(batch).equals(expected)


# ---------------------------------------------------------------------------
# A refused batch changes nothing.


def _bad_batches():
    late_bad_msisdn = good(10, start=5_000)
    late_bad_msisdn["msisdn"][9] = 0  # every row before it is valid
    bad_kind = good(10, start=5_000)
    bad_kind["kind"] = bad_kind["kind"].astype(np.int64)
    bad_kind["kind"][8] = 300
    null_ts = pa.RecordBatch.from_pydict(good(10, start=5_000))
    null_ts = null_ts.set_column(0, "ts", pa.array([5_000] * 9 + [None], pa.int64()))
    mismatched = good(10, start=5_000)
    mismatched["peer"] = mismatched["peer"][:9]
    return {"msisdn": late_bad_msisdn, "kind": bad_kind, "null": null_ts, "lengths": mismatched}


@pytest.mark.parametrize("which", ["msisdn", "kind", "null", "lengths"])
def test_a_failing_batch_changes_no_state(which):
    bad = _bad_batches()[which]
    first, then = good(10), good(10, start=5_000)

    engine = Engine.from_text(RULES)
    out_first = engine.process(first)
    before = engine.stats()
    with pytest.raises(BatchError):
        engine.process(bad)
    assert engine.stats() == before
    out_then = engine.process(then)

    clean = Engine.from_text(RULES)
    assert clean.process(first).equals(out_first)
    assert clean.process(then).equals(out_then)
    assert engine.stats() == clean.stats()
    assert out_then.num_rows > 0


def test_a_failing_first_batch_leaves_a_fresh_engine():
    engine = Engine.from_text(RULES)
    fresh = Engine.from_text(RULES)
    before = engine.stats()
    with pytest.raises(BatchError):
        engine.process(_bad_batches()["msisdn"])
    assert engine.stats() == before == fresh.stats()
    assert engine.process(good(10)).equals(fresh.process(good(10)))
    assert engine.stats() == fresh.stats()
