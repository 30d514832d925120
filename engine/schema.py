"""Event and instruction schemas (SPEC sections 2 and 5) and batch validation.

An event batch enters Kairos as an Arrow record batch, an Arrow table, or a
dict of equal-length numpy arrays.  `validate_events` turns any of these into
an `EventColumns`: one contiguous numpy array per canonical column, typed as
the schema says, zero-copy where the input already has that type.  A missing
optional column stays `None` and means 0 for every row; the kernel reads it as
zeros without allocating anything.

`validate_rows` applies the same value checks row by row: instead of raising at
the first bad row it returns which rows pass, so wire decoders
(adapters/wire.py) keep the good rows of a message and reject the others.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

# Event kind codes, SPEC section 2.  The position in this tuple is the code.
KINDS: tuple[str, ...] = (
    "call_out",
    "call_in",
    "sms_out",
    "sms_in",
    "data",
    "location",
    "recharge",
    "balance",
    "device",
    "order",
    "care",
    "status",
    "portal",
)
KIND_CODES: dict[str, int] = {name: code for code, name in enumerate(KINDS)}

# The accepted event time range (SPEC section 2): ms since the epoch, both
# bounds included, 1970-01-01T00:00:00.000Z to 2999-12-31T23:59:59.999Z.
# Events outside it are refused and Engine.advance refuses a ts outside it, so
# nothing the engine derives from a ts overflows int64 or aliases: ts plus a
# window, cooldown or timer (at most engine.rules.MAX_DURATION, 100 years),
# quiet hours and contact days (at most 64 local days ahead), and the caps
# keys, which pack a local day or month into 20 bits with a bias of 2^19 (a
# day past 3405-06-14 would spill into the month flag and subscriber bits and
# share another key's count).  Year 3000 keeps four centuries clear of that.
# A caller that moves event time on by itself (the daemon's idle advance)
# clamps to MAX_TS.
MIN_TS = 0
MAX_TS = 32_503_679_999_999
TS_RANGE = f"{MIN_TS}..{MAX_TS} (1970-01-01T00:00:00.000Z to 2999-12-31T23:59:59.999Z)"

# The fields each kind carries besides ts, msisdn and kind (SPEC section 2's
# "typical fields"); any other field of that kind reads 0.  `kairos check`
# warns about a filter on a field its kinds never carry.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "call_out": ("peer", "duration", "cell", "mcc"),
    "call_in": ("peer", "duration", "cell", "mcc"),
    "sms_out": ("peer", "cell"),
    "sms_in": ("peer",),
    "data": ("volume", "duration", "cell", "mcc", "code"),
    "location": ("cell", "mcc"),
    "recharge": ("amount", "balance"),
    "balance": ("balance",),
    "device": ("imei",),
    "order": ("code", "amount"),
    "care": ("code",),
    "status": ("code",),
    "portal": (),
}

# Canonical event columns in kernel order.  The kernel addresses columns by
# their index in this tuple (see COLUMN_INDEX), so the order is part of the
# compiled-rule format: append, never reorder.
EVENT_SCHEMA = pa.schema(
    [
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("msisdn", pa.int64(), nullable=False),
        pa.field("kind", pa.uint8(), nullable=False),
        pa.field("peer", pa.int64()),
        pa.field("duration", pa.int32()),
        pa.field("volume", pa.int64()),
        pa.field("amount", pa.int64()),
        pa.field("balance", pa.int64()),
        pa.field("cell", pa.int64()),
        pa.field("mcc", pa.uint16()),
        pa.field("imei", pa.int64()),
        pa.field("code", pa.int32()),
    ]
)
EVENT_COLUMNS: tuple[str, ...] = tuple(EVENT_SCHEMA.names)
REQUIRED_COLUMNS: tuple[str, ...] = ("ts", "msisdn", "kind")
COLUMN_INDEX: dict[str, int] = {name: i for i, name in enumerate(EVENT_COLUMNS)}
COLUMN_DTYPES: dict[str, np.dtype] = {
    f.name: np.dtype(f.type.to_pandas_dtype()) for f in EVENT_SCHEMA
}

# SPEC section 5.  `params` is a map so that channels read fields by name
# without parsing; the values are decimal strings of the event fields.
INSTRUCTION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("msisdn", pa.int64(), nullable=False),
        pa.field("rule", pa.string(), nullable=False),
        pa.field("channel", pa.string(), nullable=False),
        pa.field("template", pa.string(), nullable=False),
        pa.field("priority", pa.int32(), nullable=False),
        pa.field("holdout", pa.bool_(), nullable=False),
        pa.field("not_before", pa.int64(), nullable=False),
        pa.field("params", pa.map_(pa.string(), pa.string()), nullable=False),
    ]
)


class BatchError(ValueError):
    """An event batch that does not satisfy SPEC section 2.

    `column` names the offending column and `row` the first bad row (None when
    the problem is the column as a whole, such as a missing or mistyped column).
    """

    def __init__(self, column: str, row: int | None, reason: str):
        self.column = column
        self.row = row
        self.reason = reason
        where = f"column {column!r}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class EventColumns:
    """A validated batch: canonical columns as contiguous numpy arrays.

    `columns[i]` belongs to `EVENT_COLUMNS[i]` and is either an array of
    `COLUMN_DTYPES` type and length `n`, or None for an absent optional column
    (all zeros).  Arrays may be read-only views of the caller's buffers.
    """

    n: int
    columns: tuple[np.ndarray | None, ...]

    def __getitem__(self, name: str) -> np.ndarray:
        """The named column, materialising zeros for an absent one."""
        col = self.columns[COLUMN_INDEX[name]]
        if col is None:
            return np.zeros(self.n, dtype=COLUMN_DTYPES[name])
        return col


def _column_sources(batch) -> tuple[dict[str, object], int]:
    if isinstance(batch, (pa.RecordBatch, pa.Table)):
        return {name: batch.column(name) for name in batch.schema.names}, batch.num_rows
    if isinstance(batch, dict):
        lengths = {name: len(col) for name, col in batch.items()}
        n = lengths.get("ts", next(iter(lengths.values()), 0))
        for name, length in lengths.items():
            if length != n:
                raise BatchError(name, None, f"length {length} differs from column 'ts' ({n})")
        return dict(batch), n
    raise TypeError(
        f"an event batch is a pyarrow RecordBatch/Table or a dict of numpy arrays, not {type(batch).__name__}"
    )


def _to_numpy(name: str, source) -> np.ndarray:
    """One input column as a contiguous numpy array, nulls rejected."""
    if isinstance(source, pa.ChunkedArray):
        source = source.combine_chunks() if source.num_chunks != 1 else source.chunk(0)
    if isinstance(source, pa.Array):
        if source.null_count:
            first = int(np.flatnonzero(source.is_null().to_numpy(zero_copy_only=False))[0])
            raise BatchError(name, first, "null value (missing values must be 0, not null)")
        if not pa.types.is_integer(source.type):
            raise BatchError(name, None, f"type {source.type} is not an integer type")
        return source.to_numpy(zero_copy_only=False)
    array = np.asarray(source)
    if array.ndim != 1:
        raise BatchError(name, None, f"expected a 1-d array, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise BatchError(name, None, f"dtype {array.dtype} is not an integer type")
    return array


def _cast(name: str, array: np.ndarray) -> np.ndarray:
    """Cast to the canonical dtype, refusing values that do not fit."""
    dtype = COLUMN_DTYPES[name]
    if array.dtype == dtype:
        return np.ascontiguousarray(array)
    info = np.iinfo(dtype)
    if array.size and (np.iinfo(array.dtype).min < info.min or np.iinfo(array.dtype).max > info.max):
        bad = (array < info.min) | (array > info.max)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise BatchError(name, row, f"value {array[row]} does not fit {dtype}")
    return array.astype(dtype)


def _check_range(columns: list, name: str, low: int | None, high: int | None, reason: str) -> None:
    """Raise BatchError at the first value outside [low, high]; one reduction when all is well."""
    col = columns[COLUMN_INDEX[name]]
    if (low is None or col.min() >= low) and (high is None or col.max() <= high):
        return
    bad = np.zeros(len(col), dtype=bool)
    if low is not None:
        bad |= col < low
    if high is not None:
        bad |= col > high
    row = int(np.flatnonzero(bad)[0])
    raise BatchError(name, row, f"value {col[row]} {reason}")


UNKNOWN_COLUMNS = ("refuse", "ignore")


def validate_events(batch, *, unknown_columns: str = "refuse") -> EventColumns:
    """Check a batch against SPEC section 2 and return its canonical columns.

    Raises BatchError naming the column and the first bad row for: a missing
    required column, a non-integer or null column, a value that does not fit
    the column's type, ts outside MIN_TS..MAX_TS, msisdn <= 0, or an unknown
    kind code.  A column that is not in the schema is refused too, naming it
    and the nearest column name (`durration`: did you mean `duration`?): a
    misspelt column would otherwise read as 0 in every row without a word.
    `unknown_columns="ignore"` takes batches that carry extra fields.

    This is the embedding API's check: a batch is accepted whole or refused.
    `validate_rows` is its per-row counterpart for ingest, where the good rows
    of a batch are kept and the bad ones rejected one by one.
    """
    sources, n = _column_sources(batch)
    if unknown_columns != "ignore":
        if unknown_columns != "refuse":
            raise ValueError(f"unknown_columns must be one of {', '.join(UNKNOWN_COLUMNS)}, not {unknown_columns!r}")
        for name in sources:
            if name not in COLUMN_DTYPES:
                near = difflib.get_close_matches(str(name), EVENT_COLUMNS, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; the columns are {', '.join(EVENT_COLUMNS)}"
                raise BatchError(str(name), None, "is not an event column (SPEC section 2)" + hint +
                                 " (Engine(unknown_columns=\"ignore\") takes extra columns)")
    for name in REQUIRED_COLUMNS:
        if name not in sources:
            raise BatchError(name, None, "required column is missing")
    columns: list[np.ndarray | None] = []
    for name in EVENT_COLUMNS:
        if name not in sources:
            columns.append(None)
            continue
        columns.append(_cast(name, _to_numpy(name, sources[name])))
    if n:
        _check_range(columns, "msisdn", 1, None, "is not a subscriber number (must be > 0)")
        _check_range(columns, "ts", MIN_TS, MAX_TS, f"is outside the event time range {TS_RANGE}")
        _check_range(columns, "kind", None, len(KINDS) - 1, f"is not a kind code (0..{len(KINDS) - 1})")
    return EventColumns(n=n, columns=tuple(columns))


# Why validate_rows refuses a row.  Decoders use these strings as reject
# reasons (adapters.wire.REJECT_REASONS), so they are metric labels: keep the set small.
ROW_REASONS: tuple[str, ...] = ("bad_value", "kind", "msisdn", "ts")


_IINFO: dict[np.dtype, np.iinfo] = {}


def _iinfo(dtype: np.dtype) -> np.iinfo:
    """np.iinfo, cached: it costs a microsecond a call, a dozen calls a batch."""
    info = _IINFO.get(dtype)
    if info is None:
        info = _IINFO[dtype] = np.iinfo(dtype)
    return info


def _fit_violations(name: str, array: np.ndarray) -> np.ndarray | None:
    """Mask of the values of `array` outside `name`'s canonical dtype, None if all fit.

    A bound is compared only where the source dtype can pass it, so the scalar
    always fits the array's dtype (no uint64-vs-negative promotion).
    """
    if array.dtype == COLUMN_DTYPES[name]:
        return None
    target, source = _iinfo(COLUMN_DTYPES[name]), _iinfo(array.dtype)
    low = target.min if source.min < target.min else None
    high = target.max if source.max > target.max else None
    if (low is None and high is None) or not array.size:
        return None
    if (low is None or array.min() >= low) and (high is None or array.max() <= high):
        return None
    bad = np.zeros(len(array), dtype=bool)
    if low is not None:
        bad |= array < low
    if high is not None:
        bad |= array > high
    return bad


def validate_rows(
    columns: dict[str, np.ndarray], n: int, valid: np.ndarray | None = None
) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """Check each row of a batch against SPEC section 2; keep what passes.

    `columns` maps column names to 1-d integer numpy arrays of length `n`, of
    any integer dtype (a decoder may hand over int64 for a uint8 column);
    names that are not event columns are ignored.  `valid`, when given, is a
    bool mask of rows already known bad elsewhere (False): they are neither
    checked nor reported again.

    Returns `(valid, failures)`: a new bool mask of the rows that pass every
    check, and for each row that fails here `(row, reason, detail)` in row
    order, `reason` from ROW_REASONS, one entry per row (its first failure in
    the order below):

    - "bad_value": a value that does not fit its column's dtype (kind excepted)
    - "kind": a kind outside the code table (0..12)
    - "msisdn": msisdn <= 0
    - "ts": ts outside MIN_TS..MAX_TS

    These are the value checks of `validate_events`, which raises BatchError at
    the first bad row instead.  Problems of the batch as a whole are not row
    failures and raise BatchError here as well: a missing required column, a
    column of another length, or a non-integer dtype.

    When every row passes, the cost is one min/max reduction per checked
    column: no per-row Python.  Python runs per failing row only.
    """
    for name in REQUIRED_COLUMNS:
        if name not in columns:
            raise BatchError(name, None, "required column is missing")
    arrays: dict[str, np.ndarray] = {}
    for name in EVENT_COLUMNS:
        if name not in columns:
            continue
        array = np.asarray(columns[name])
        if array.ndim != 1 or len(array) != n:
            raise BatchError(name, None, f"expected {n} values, got shape {array.shape}")
        if array.dtype.kind not in "iu":
            raise BatchError(name, None, f"dtype {array.dtype} is not an integer type")
        arrays[name] = array
    ok = np.ones(n, dtype=bool) if valid is None else valid.copy()
    failures: list[tuple[int, str, str]] = []

    def fail(bad: np.ndarray, name: str, reason: str, why: str) -> None:
        bad &= ok
        rows = np.flatnonzero(bad)
        if not len(rows):
            return
        ok[rows] = False
        values = arrays[name][rows].tolist()
        failures.extend(
            (row, reason, f"column {name!r}: value {value} {why}")
            for row, value in zip(rows.tolist(), values, strict=True)
        )

    def below(name: str, low: int) -> np.ndarray | None:
        array = arrays[name]
        if not n or array.min() >= low:
            return None
        return array < low

    def above(name: str, high: int) -> np.ndarray | None:
        array = arrays[name]
        if not n or array.max() <= high:
            return None
        return array > high

    for name, array in arrays.items():
        if name == "kind":
            continue
        bad = _fit_violations(name, array)
        if bad is not None:
            fail(bad, name, "bad_value", f"does not fit {COLUMN_DTYPES[name]}")
    kind = arrays["kind"]
    if n and (kind.max() > len(KINDS) - 1 or (kind.dtype.kind == "i" and kind.min() < 0)):
        fail((kind < 0) | (kind > len(KINDS) - 1), "kind", "kind", f"is not a kind code (0..{len(KINDS) - 1})")
    bad = below("msisdn", 1)
    if bad is not None:
        fail(bad, "msisdn", "msisdn", "is not a subscriber number (must be > 0)")
    bad = below("ts", MIN_TS)
    if bad is not None:
        fail(bad, "ts", "ts", f"is before the event time range {TS_RANGE}")
    bad = above("ts", MAX_TS)
    if bad is not None:
        fail(bad, "ts", "ts", f"is after the event time range {TS_RANGE}")
    if len(failures) > 1:
        failures.sort(key=lambda failure: failure[0])
    return ok, failures
