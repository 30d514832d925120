"""Wire decoding for ingest: one ZeroMQ message in, valid event columns and rejects out.

A decoder turns one message into a `Decoded`: the rows that satisfy SPEC
section 2 as a dict of canonical numpy columns (ready for `Engine.process`),
and a `Reject` for each row that does not, or one for a message that cannot be
read at all.  Decoding never raises for bad input and never loses a good row
because of a bad one beside it.

    decoder = make_decoder("msgpack", FieldMap.from_config(config["inputs"]["switch"].get("fields", {})))
    decoded = decoder.decode(frame.buffer)      # bytes, memoryview or any read-only buffer
    engine.process(decoded.batch)
    for reject in decoded.rejects:              # reason is one of REJECT_REASONS
        dead_letter.write(reject)

Formats (`make_decoder(format)`):

- "arrow": one Arrow IPC stream (schema, then one or more record batches),
  read zero-copy from the message.  Columns may be of any integer type (cast to
  the canonical type), floats holding integers, or strings where a value map
  applies (kind names, `map`).  A missing required column or a column of
  another type rejects the whole message.
- "msgpack": one msgpack array of records; a record is an array (fields in the
  order of `columns`, default the canonical order ts, msisdn, kind, peer,
  duration, volume, amount, balance, cell, mcc, imei, code) or a map (field
  name -> value).  Integers in any msgpack encoding; floats only when
  integral; strings where a value map applies.  Decoded by a compiled parser
  (adapters/_msgpack.pyx) straight into int64 columns, no Python object per
  value.  Anything but an array at the top is rejected whole ("not_records").
- "ndjson": one JSON object per line, parsed by orjson.  Blank lines are
  skipped; a row index is the line's index (0-based) in the message.

Row rules, the same in every format:

- A required field (ts, msisdn, kind) that is absent rejects the row
  ("missing_field"); null/nil there rejects it ("bad_value").
- An optional field that is absent, null or nil is 0 (SPEC section 2: a missing
  optional value is 0).  Fields that are not event columns are ignored.
- kind is an integer code (0..12) or a kind name ("call_out", ...).
- Values that do not fit their column, or are not integers, reject the row
  ("bad_value"); a boolean is never an integer (JSON true/false, msgpack
  true/false; an Arrow bool column rejects the message).  Then msisdn <= 0,
  ts outside engine.schema.MIN_TS..MAX_TS (1970 to 2999) and unknown kinds
  reject it ("msisdn", "ts", "kind"), as `engine.schema.validate_rows` checks.

Field map: a feed whose field names or units differ from SPEC section 2 is
mapped under its input in kairos.toml:

    [inputs.switch.fields]
    msisdn = "calling_number"                          # rename: canonical name = source field
    ts = { from = "start_time", scale = 1000 }         # seconds -> milliseconds (times a positive integer)
    kind = { from = "record_type", map = { MOC = 0, MTC = 1 } }   # source values -> codes
    mcc = { value = 460 }                               # the same constant for every row

- Every key is a canonical column; a column not named reads from the field of
  its own name.  A renamed column reads only its source field, never a field
  with the canonical name.  `from` may be left out to scale or map a field of
  the canonical name.  Two columns may not read the same field.
- `scale` multiplies (a product beyond int64 rejects the row, "bad_value").
- `map` keys match string values; a key that is a decimal integer ("7")
  also matches that integer (TOML keys are always strings).  When a map names
  integers, an integer it does not name is rejected; otherwise integers pass
  through unchanged.  A string it does not name is rejected, "kind" for the
  kind column (where kind names are understood as well, and a map target may be
  a kind name: `MOC = "call_out"`), "bad_value" for others.  `map` and
  `scale` do not combine.
- `value` is an integer (or a kind name for kind) that must itself satisfy
  SPEC section 2; the column is not read from the message.
- msgpack array records: `columns` (the input's `columns = [...]`, given to
  `make_decoder`) names the source field at each position.

Rejects: one per rejected row, in row order, plus at most one for the message:

- the whole message (`row` None, `record` the message as received, or its
  first `TOO_LARGE_KEPT` bytes when too large): too large, empty,
  unparseable, not records, or an Arrow message lacking a required column or
  carrying a column of an unusable type;
- one row (`row` its index, `record` the row as JSON: the ndjson line itself, a
  msgpack record re-encoded, an Arrow row as an object of its columns);
- msgpack only: the rest of a message whose bytes run out or hold the
  never-used byte 0xc1 ("undecodable", `row` the first row lost, `record` the
  raw bytes from that row on; the rows before it are kept), or bytes after the
  array ("undecodable", `row` None, `record` those bytes).

Cost: the good path is columnar (no Python per row or value, except orjson's
objects for ndjson); Python runs once per rejected row, to describe it.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import repeat

import msgpack
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from adapters._msgpack import STOP, RecordDecoder
from engine.schema import (
    COLUMN_DTYPES,
    EVENT_COLUMNS,
    KIND_CODES,
    KINDS,
    MAX_TS,
    MIN_TS,
    REQUIRED_COLUMNS,
    BatchError,
    validate_rows,
)

# Reject reasons: small and fixed, they label metrics.
REJECT_REASONS: tuple[str, ...] = (
    "undecodable",    # the message, a line, or the rest of a message cannot be parsed
    "not_records",    # parsed, but not records (not an array of records; a record of the wrong shape)
    "missing_field",  # a required field is absent (or a required column, for an Arrow message)
    "bad_value",      # not an integer, null in a required field, or does not fit the column
    "msisdn",         # msisdn <= 0
    "ts",             # ts outside MIN_TS..MAX_TS (engine.schema)
    "kind",           # kind is not a known code or name, or not in the field's value map
    "too_large",      # the message is over max_message_bytes (the record: its first TOO_LARGE_KEPT bytes)
    "extra_frames",   # a ZeroMQ frame before the payload that is neither a topic nor a sequence header
)

TOO_LARGE_KEPT = 64 << 10  # bytes of a too_large message kept in its dead letter: a sample, not a second copy

FORMATS: tuple[str, ...] = ("arrow", "msgpack", "ndjson")

_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Reject:
    """A row, or a whole message, that was not decoded into the batch."""

    reason: str          # one of REJECT_REASONS
    detail: str          # for people: the row, the column or field, the value, the parser's message
    row: int | None      # row index in the message (ndjson: line index); None for the message as a whole
    record: bytes        # what to dead-letter: the raw message, or the row as JSON (see the module docstring)


@dataclass(frozen=True)
class Decoded:
    """The result of decoding one message."""

    batch: dict[str, np.ndarray]  # valid rows: canonical names and dtypes, equal lengths; ts, msisdn, kind always
    n: int                        # valid rows
    rejects: list[Reject] = field(default_factory=list)  # in row order; whole-message rejects have row None


@dataclass(frozen=True)
class FieldSource:
    """Where one canonical column comes from."""

    column: str                    # canonical column name
    source: str | None             # field name in the feed; None for a constant
    scale: int = 1                 # multiplier applied to the source value
    strings: Mapping[str, int] | None = None   # string value -> code (kind: names included)
    integers: Mapping[int, int] | None = None  # integer value -> code; None: integers pass through
    constant: int | None = None    # the value of every row, when not read from the feed

    @property
    def required(self) -> bool:
        return self.column in REQUIRED_COLUMNS


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _code(column: str, value: object, where: str) -> int:
    """A map target or constant: an integer that fits the column, or a kind name."""
    if column == "kind" and isinstance(value, str):
        if value not in KIND_CODES:
            raise ValueError(f"{where}: {value!r} is not a kind name ({', '.join(KINDS)})")
        return KIND_CODES[value]
    if not _is_int(value):
        raise ValueError(f"{where}: expected an integer{' or a kind name' if column == 'kind' else ''}, "
                         f"got {value!r}")
    info = np.iinfo(COLUMN_DTYPES[column])
    if not info.min <= value <= info.max:
        raise ValueError(f"{where}: {value} does not fit column {column!r} ({COLUMN_DTYPES[column]})")
    if column == "kind" and not 0 <= value < len(KINDS):
        raise ValueError(f"{where}: {value} is not a kind code (0..{len(KINDS) - 1})")
    return value


class FieldMap:
    """How a feed's fields become canonical columns (see the module docstring).

    Immutable once built; `FieldMap()` is the identity: every column from the
    field of its own name, kind names understood.
    """

    def __init__(self, sources: Mapping[str, FieldSource] | None = None):
        explicit = dict(sources or {})
        readers: dict[str, str] = {}
        for name, spec in explicit.items():
            if name not in EVENT_COLUMNS or spec.column != name:
                raise ValueError(f"fields: {name!r} is not an event column ({', '.join(EVENT_COLUMNS)})")
            if spec.source is not None:
                if spec.source in readers:
                    raise ValueError(f"fields: columns {readers[spec.source]!r} and {name!r} both read {spec.source!r}")
                readers[spec.source] = name
        self.sources: dict[str, FieldSource] = {}
        for name in EVENT_COLUMNS:
            if name in explicit:
                self.sources[name] = explicit[name]
            elif name in readers:
                # Its field name belongs to another column: this one reads nothing.
                self.sources[name] = FieldSource(name, None)
            else:
                self.sources[name] = FieldSource(name, name, strings=dict(KIND_CODES) if name == "kind" else None)
        for name in REQUIRED_COLUMNS:
            spec = self.sources[name]
            if spec.source is None and spec.constant is None:
                raise ValueError(f"fields: required column {name!r} reads no field "
                                 f"({readers[name]!r} reads the field {name!r})")

    @property
    def read(self) -> list[FieldSource]:
        """Columns read from the feed, in canonical order."""
        return [spec for spec in self.sources.values() if spec.source is not None]

    @property
    def constants(self) -> dict[str, int]:
        return {name: spec.constant for name, spec in self.sources.items() if spec.constant is not None}

    @classmethod
    def from_config(cls, table: Mapping[str, object]) -> FieldMap:
        """Build from an input's `fields` table (kairos.toml); ValueError on a bad table."""
        if not isinstance(table, Mapping):
            raise ValueError(f"fields: expected a table, got {type(table).__name__}")
        sources: dict[str, FieldSource] = {}
        for column, spec in table.items():
            where = f"fields.{column}"
            if column not in EVENT_COLUMNS:
                raise ValueError(f"{where}: {column!r} is not an event column ({', '.join(EVENT_COLUMNS)})")
            if isinstance(spec, str):
                spec = {"from": spec}
            if not isinstance(spec, Mapping):
                raise ValueError(f"{where}: expected a field name or a table, got {spec!r}")
            unknown = set(spec) - {"from", "scale", "map", "value"}
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)} (from, scale, map, value)")
            if "value" in spec:
                if len(spec) != 1:
                    raise ValueError(f"{where}: 'value' is a constant and takes no from, scale or map")
                constant = _code(column, spec["value"], f"{where}.value")
                if (column == "msisdn" and constant <= 0) or (column == "ts" and not MIN_TS <= constant <= MAX_TS):
                    raise ValueError(f"{where}.value: {constant} is not a valid {column}")
                sources[column] = FieldSource(column, None, constant=constant)
                continue
            source = spec.get("from", column)
            if not isinstance(source, str) or not source:
                raise ValueError(f"{where}.from: expected a field name, got {source!r}")
            scale = spec.get("scale", 1)
            if not _is_int(scale) or scale < 1:
                raise ValueError(f"{where}.scale: expected a positive integer, got {scale!r}")
            if "map" in spec and "scale" in spec:
                raise ValueError(f"{where}: 'map' and 'scale' do not combine (scale numbers or map codes)")
            strings = dict(KIND_CODES) if column == "kind" else None
            integers = None
            if "map" in spec:
                mapping = spec["map"]
                if not isinstance(mapping, Mapping) or not mapping:
                    raise ValueError(f"{where}.map: expected a table of source value = code")
                strings = dict(strings or {})
                for key, target in mapping.items():
                    code = _code(column, target, f"{where}.map.{key}")
                    if _is_int(key):
                        integers = {**(integers or {}), key: code}
                        continue
                    if not isinstance(key, str):
                        raise ValueError(f"{where}.map: key {key!r} is neither a string nor an integer")
                    strings[key] = code
                    try:
                        number = int(key)
                    except ValueError:
                        continue
                    if str(number) == key:
                        integers = {**(integers or {}), number: code}
            sources[column] = FieldSource(column, source, scale=scale, strings=strings, integers=integers)
        return cls(sources)


# -- the steps every format shares -----------------------------------------------------


class _Faults:
    """Rows rejected while reading columns, before validation; one entry per row."""

    def __init__(self, n: int):
        self.n = n
        self.valid: np.ndarray | None = None     # allocated at the first fault
        self.entries: list[tuple[int, str, str]] = []

    def add(self, bad: np.ndarray, reason: str, describe: Callable[[int], str]) -> None:
        """Reject the rows of mask `bad` not rejected already; describe(row) says why."""
        if self.valid is None:
            self.valid = np.ones(self.n, dtype=bool)
        rows = np.flatnonzero(bad & self.valid)
        self.valid[rows] = False
        self.entries.extend((row, reason, describe(row)) for row in rows.tolist())


def _scaled(name: str, spec: FieldSource, values: np.ndarray, faults: _Faults) -> np.ndarray:
    if spec.scale == 1:
        return values
    limit = _INT64_MAX // spec.scale
    values = values.astype(np.int64, copy=False)
    if len(values) and (values.max() > limit or values.min() < -limit):
        bad = (values > limit) | (values < -limit)
        faults.add(bad, "bad_value",
                   lambda row: f"field {spec.source!r} ({name}): {values[row]} times {spec.scale} overflows int64")
    return values * spec.scale


def _assemble(
    columns: dict[str, np.ndarray],
    n: int,
    faults: _Faults,
    fields: FieldMap,
    record: Callable[[int], bytes],
    source_rows: np.ndarray | None = None,
    rejects: list[Reject] | None = None,
) -> Decoded:
    """Scale, add constants, validate, keep the valid rows, cast to canonical dtypes.

    `columns` are the columns read from the message, any integer dtype, `n`
    rows each.  `source_rows[i]` is row i's index in the message (identity when
    None); `record(i)` the dead-letter bytes of row i; `rejects` those the
    format made already (message row indices).
    """
    for spec in fields.read:
        if spec.column in columns:
            columns[spec.column] = _scaled(spec.column, spec, columns[spec.column], faults)
    for name, value in fields.constants.items():
        columns[name] = np.broadcast_to(np.array(value, dtype=COLUMN_DTYPES[name]), (n,))
    try:
        valid, failures = validate_rows(columns, n, faults.valid)
    except BatchError as exc:  # a required column the message lacks
        return Decoded(_empty_batch(), 0, [*(rejects or []), Reject("missing_field", str(exc), None, record(-1))])
    failures = faults.entries + failures
    out = list(rejects or [])
    if failures:
        failures.sort(key=lambda failure: failure[0])
        for row, reason, detail in failures:
            where = int(source_rows[row]) if source_rows is not None else row
            out.append(Reject(reason, f"row {where}: {detail}", where, record(row)))
        out.sort(key=lambda reject: -1 if reject.row is None else reject.row)
        keep = np.flatnonzero(valid)
        batch = {name: np.ascontiguousarray(col[keep], dtype=COLUMN_DTYPES[name]) for name, col in columns.items()}
        m = len(keep)
    else:
        batch = {name: col.astype(COLUMN_DTYPES[name], copy=False) for name, col in columns.items()}
        m = n
    for name in fields.constants:
        batch[name] = np.full(m, fields.constants[name], dtype=COLUMN_DTYPES[name])
    return Decoded(batch, m, out)


def _empty_batch() -> dict[str, np.ndarray]:
    return {name: np.zeros(0, dtype=COLUMN_DTYPES[name]) for name in REQUIRED_COLUMNS}


def _json_default(value: object) -> object:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, msgpack.ExtType):
        return {"ext": value.code, "data": value.data.hex()}
    return str(value)


def _json(value: object) -> bytes | None:
    try:
        return orjson.dumps(value, default=_json_default, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return None


# -- decoders --------------------------------------------------------------------------


class Decoder(abc.ABC):
    """Decodes one wire message into valid rows and rejects.  Built once per input, reused for every message."""

    format: str

    def __init__(self, fields: FieldMap | None = None, max_message_bytes: int = 64 << 20):
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be positive, not {max_message_bytes}")
        self.fields = fields or FieldMap()
        self.max_message_bytes = max_message_bytes

    def decode(self, message: bytes | memoryview) -> Decoded:
        """Decode one message; never raises for bad input (only rejects it)."""
        view = memoryview(message).cast("B") if not isinstance(message, bytes) else message
        size = len(view)
        if size > self.max_message_bytes:
            return self._whole("too_large", f"{size} bytes, over the limit of {self.max_message_bytes} (the record "
                               f"keeps the first {min(size, TOO_LARGE_KEPT)})", view[:TOO_LARGE_KEPT])
        if size == 0:
            return self._whole("undecodable", "empty message", view)
        return self._decode(view)

    @abc.abstractmethod
    def _decode(self, message: bytes | memoryview) -> Decoded: ...

    def _whole(self, reason: str, detail: str, message: bytes | memoryview) -> Decoded:
        return Decoded(_empty_batch(), 0, [Reject(reason, f"{self.format} message: {detail}", None, bytes(message))])


class ArrowDecoder(Decoder):
    format = "arrow"

    def _decode(self, message: bytes | memoryview) -> Decoded:
        try:
            reader = pa.ipc.open_stream(pa.py_buffer(message))
            batches = list(reader)
            schema = reader.schema
            for batch in batches:
                # Buffer sizes against lengths, offsets of string columns: a
                # corrupt message must fail here, not read out of bounds later.
                batch.validate(full=True)
        except Exception as exc:  # pyarrow raises a dozen types (ArrowInvalid, OSError, ...) on corrupt streams
            return self._whole("undecodable", f"not an Arrow IPC stream: {exc}", message)
        names = schema.names
        n = sum(batch.num_rows for batch in batches)
        table = None

        def column(index: int) -> pa.Array:
            if len(batches) == 1:
                return batches[0].column(index)
            nonlocal table
            if table is None:
                table = pa.Table.from_batches(batches, schema)
            return table.column(index).combine_chunks()

        def record(row: int) -> bytes:
            if row < 0:
                return bytes(message)
            nonlocal table
            if table is None:
                table = pa.Table.from_batches(batches, schema)
            return _json(table.slice(row, 1).to_pylist()[0]) or b"{}"

        faults = _Faults(n)
        columns: dict[str, np.ndarray] = {}
        for spec in self.fields.read:
            if spec.source not in names:
                if spec.required:
                    return self._whole("missing_field", f"no column {spec.source!r} ({spec.column})", message)
                continue
            if names.count(spec.source) > 1:
                return self._whole("bad_value", f"column {spec.source!r} appears twice", message)
            array = column(names.index(spec.source))
            if isinstance(array.type, pa.DictionaryType):
                array = array.dictionary_decode()
            problem = _arrow_type_problem(spec, array.type)
            if problem:
                return self._whole("bad_value", problem, message)
            values = _arrow_values(spec, array, faults, missing=None)
            if values is not None:
                columns[spec.column] = values
        return _assemble(columns, n, faults, self.fields, record)


def _arrow_type_problem(spec: FieldSource, type_: pa.DataType) -> str | None:
    if pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_null(type_):
        return None
    if (pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_)) \
            and spec.strings:
        return None
    return f"column {spec.source!r} ({spec.column}) has type {type_}, not integers" + (
        " or mapped strings" if spec.strings else "")


def _arrow_values(
    spec: FieldSource, array: pa.Array, faults: _Faults, missing: Callable[[int], bool] | None
) -> np.ndarray | None:
    """One source column as integers (any int dtype), its bad rows added to faults.

    Nulls: optional columns read 0; required ones reject the row, as
    "missing_field" where missing(row) says the field was absent, else
    "bad_value".  Returns None for an optional column that is null throughout.
    """
    name, source = spec.column, spec.source
    type_ = array.type
    n = len(array)
    if pa.types.is_null(type_):
        if not spec.required:
            return None
        _null_faults(spec, np.ones(n, dtype=bool), faults, missing)
        return np.zeros(n, dtype=np.int64)
    nulls = None
    if array.null_count:
        nulls = array.is_null().to_numpy(zero_copy_only=False)
        if spec.required:
            _null_faults(spec, nulls, faults, missing)
    if pa.types.is_integer(type_):
        values = (array.fill_null(0) if nulls is not None else array).to_numpy(zero_copy_only=False)
        if values.dtype == np.uint64 and len(values) and values.max() > _INT64_MAX:
            big = values > _INT64_MAX
            faults.add(big, "bad_value", lambda row: f"field {source!r} ({name}): {values[row]} is beyond int64")
            values = np.where(big, 0, values).astype(np.int64)
        if spec.integers is not None:
            values = _map_integers(spec, values, nulls, faults)
        return values
    if pa.types.is_floating(type_):
        floats = array.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        integral = np.isfinite(floats) & (np.floor(floats) == floats) & (floats >= -(2.0**63)) & (floats < 2.0**63)
        if not integral.all():
            faults.add(~integral, "bad_value",
                       lambda row: f"field {source!r} ({name}): {floats[row]!r} is not an integer")
        values = np.where(integral, floats, 0).astype(np.int64)
        if spec.integers is not None:
            values = _map_integers(spec, values, nulls, faults)
        return values
    # Strings through the value map (kind names for kind): vectorised lookup.
    keys = list(spec.strings)
    codes = np.array([spec.strings[k] for k in keys] + [0], dtype=np.int64)
    index = pc.index_in(array.cast(pa.string()), value_set=pa.array(keys, pa.string()))
    found = index.is_valid().to_numpy(zero_copy_only=False)
    values = codes[index.fill_null(len(keys)).to_numpy(zero_copy_only=False)]
    unmapped = ~found if nulls is None else ~found & ~nulls
    if unmapped.any():
        faults.add(unmapped, "kind" if name == "kind" else "bad_value",
                   lambda row: f"field {source!r} ({name}): {array[row].as_py()!r} {_unmapped(spec)}")
    return values


def _unmapped(spec: FieldSource) -> str:
    return "is not a kind code, kind name or mapped value" if spec.column == "kind" else "is not in the value map"


def _null_faults(spec: FieldSource, nulls: np.ndarray, faults: _Faults, missing: Callable[[int], bool] | None) -> None:
    name, source = spec.column, spec.source
    if missing is None:
        faults.add(nulls, "bad_value", lambda row: f"field {source!r} ({name}): null in a required field")
        return
    absent = np.zeros(len(nulls), dtype=bool)
    for row in np.flatnonzero(nulls).tolist():
        absent[row] = missing(row)
    faults.add(absent, "missing_field", lambda row: f"field {source!r} ({name}) is missing")
    faults.add(nulls & ~absent, "bad_value", lambda row: f"field {source!r} ({name}): null in a required field")


def _map_integers(spec: FieldSource, values: np.ndarray, nulls: np.ndarray | None, faults: _Faults) -> np.ndarray:
    """Integer source values through the value map, vectorised (sorted keys + searchsorted)."""
    keys = np.array(sorted(spec.integers), dtype=np.int64)
    codes = np.array([spec.integers[k] for k in keys.tolist()], dtype=np.int64)
    values = values.astype(np.int64, copy=False)
    at = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
    found = keys[at] == values
    if nulls is not None:
        found |= nulls
    if not found.all():
        faults.add(~found, "kind" if spec.column == "kind" else "bad_value",
                   lambda row: f"field {spec.source!r} ({spec.column}): {values[row]} {_unmapped(spec)}")
    return np.where(found, codes[at], 0)


class NdjsonDecoder(Decoder):
    format = "ndjson"

    def _decode(self, message: bytes | memoryview) -> Decoded:
        lines = bytes(message).split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        records, line_of, rejects = _ndjson_records(lines)
        if not records and not rejects:
            return self._whole("undecodable", "no lines", message)
        n = len(records)
        faults = _Faults(n)
        columns: dict[str, np.ndarray] = {}
        for spec in self.fields.read:
            source = spec.source
            raw = list(map(dict.get, records, repeat(source)))  # C-level loop; None where absent
            values = _json_column(spec, raw, faults, lambda row, source=source: source not in records[row])
            if values is not None:
                columns[spec.column] = values
        return _assemble(columns, n, faults, self.fields,
                         lambda row: lines[line_of[row]] if row >= 0 else bytes(message), line_of, rejects)


def _ndjson_records(lines: list[bytes]) -> tuple[list[dict], np.ndarray, list[Reject]]:
    """The JSON objects among the lines, each one's line index, and rejects for the other lines."""
    try:
        # Every line an object: one pass of orjson in C, no Python per line.
        records = list(map(orjson.loads, lines))
        if all(type(record) is dict for record in records):
            return records, np.arange(len(records), dtype=np.int64), []
    except orjson.JSONDecodeError:
        pass
    records, line_of, rejects = [], [], []
    for i, line in enumerate(lines):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if line.strip():
                rejects.append(Reject("undecodable", f"line {i}: {exc}", i, line))
            continue
        if type(obj) is dict:
            records.append(obj)
            line_of.append(i)
        else:
            rejects.append(Reject("not_records", f"line {i}: a JSON {type(obj).__name__}, not an object", i, line))
    return records, np.asarray(line_of, dtype=np.int64), rejects


def _json_column(
    spec: FieldSource, raw: list, faults: _Faults, missing: Callable[[int], bool]
) -> np.ndarray | None:
    """One field of every record as integers: through Arrow when the values share a type
    (all integers, or all strings for a value map, nulls allowed), else value by value."""
    try:
        array = pa.array(raw)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        array = None
    # pyarrow reads [1.0, true] as doubles [1.0, 1.0]: a boolean would pass as
    # an integer.  Its integer and string inference refuses booleans, and an
    # all-boolean field infers bool (refused below), so only a float field
    # needs the look; the value-by-value path rejects each boolean.
    if array is not None and pa.types.is_floating(array.type) and bool in map(type, raw):
        array = None
    if array is not None and _arrow_type_problem(spec, array.type) is None:
        return _arrow_values(spec, array, faults, missing)
    # Mixed types (a kind given by code in some rows and by name in others,
    # a string in a number field): the slow path, per value.
    name, source = spec.column, spec.source
    n = len(raw)
    values = np.zeros(n, dtype=np.int64)
    reasons: dict[str, np.ndarray] = {}
    why: dict[int, str] = {}

    def bad(row: int, reason: str, text: str) -> None:
        reasons.setdefault(reason, np.zeros(n, dtype=bool))[row] = True
        why[row] = f"field {source!r} ({name}): {text}"

    for row, value in enumerate(raw):
        if value is None:
            if spec.required:
                if missing(row):
                    bad(row, "missing_field", "is missing")
                else:
                    bad(row, "bad_value", "null in a required field")
            continue
        if isinstance(value, float) and math.isfinite(value) and value == math.floor(value):
            value = int(value)
        if _is_int(value):
            if spec.integers is not None:
                if value not in spec.integers:
                    bad(row, "kind" if name == "kind" else "bad_value", f"{value} {_unmapped(spec)}")
                    continue
                value = spec.integers[value]
            if not -(2**63) <= value <= _INT64_MAX:
                bad(row, "bad_value", f"{value} is beyond int64")
                continue
            values[row] = value
        elif isinstance(value, str) and spec.strings:
            code = spec.strings.get(value)
            if code is None:
                bad(row, "kind" if name == "kind" else "bad_value", f"{value!r} {_unmapped(spec)}")
                continue
            values[row] = code
        else:
            bad(row, "bad_value", f"{value!r} is not an integer")
    for reason, mask in reasons.items():
        faults.add(mask, reason, why.__getitem__)
    return values


# msgpack row statuses (adapters/_msgpack.pyx ROW_STATUS) as reject reasons.
_STATUS_REASON = {1: "not_records", 2: "not_records", 3: "missing_field", 4: "bad_value", 5: "bad_value",
                  6: "bad_value", 7: "kind"}


class MsgpackDecoder(Decoder):
    format = "msgpack"

    def __init__(self, fields: FieldMap | None = None, max_message_bytes: int = 64 << 20,
                 columns: list[str] | None = None):
        super().__init__(fields, max_message_bytes)
        self.slots = self.fields.read
        positions = list(EVENT_COLUMNS) if columns is None else list(columns)
        if columns is not None:
            if not all(isinstance(c, str) and c for c in positions) or len(set(positions)) != len(positions):
                raise ValueError(f"columns: expected distinct field names, got {columns!r}")
            placed = {spec.column for spec in self.slots if spec.source in positions}
            lost = [name for name in REQUIRED_COLUMNS if self.fields.sources[name].source is not None
                    and name not in placed]
            if lost:
                raise ValueError(f"columns: no position for required column(s) {lost} "
                                 f"(fields {[self.fields.sources[n].source for n in lost]})")
        slot_of = {spec.source: s for s, spec in enumerate(self.slots)}
        self.positions = positions
        self._parser = RecordDecoder(
            len(self.slots),
            [slot_of.get(source, -1) for source in positions],
            [spec.source.encode() for spec in self.slots],
            list(range(len(self.slots))),
            [spec.required for spec in self.slots],
            [{k.encode(): c for k, c in spec.strings.items()} if spec.strings else None for spec in self.slots],
            [dict(spec.integers) if spec.integers is not None else None for spec in self.slots],
        )

    def _decode(self, message: bytes | memoryview) -> Decoded:
        cols, rows, table, claimed, stop, stop_row, stop_at = self._parser.decode(message)
        if STOP[stop] == "not_array":
            return self._whole("not_records", "not an array of records", message)
        if stop_row == 0 and STOP[stop] in ("truncated", "invalid"):
            return self._whole("undecodable", f"{STOP[stop]} before the first record", message)
        rejects = [self._row_reject(message, *entry) for entry in table.tolist()]
        if STOP[stop] in ("truncated", "invalid"):
            what = "runs past the end" if STOP[stop] == "truncated" else "holds the invalid byte 0xc1"
            rejects.append(Reject(
                "undecodable",
                f"rows {stop_row}..{claimed - 1} of {claimed} not decoded: the record at byte {stop_at} {what}",
                stop_row, bytes(message[stop_at:])))
        elif STOP[stop] == "trailing":
            rejects.append(Reject("undecodable", f"{len(message) - stop_at} bytes after the array of {claimed} records",
                                  None, bytes(message[stop_at:])))
        k = cols.shape[1]
        columns = {spec.column: cols[s] for s, spec in enumerate(self.slots)}
        return _assemble(
            columns, k, _Faults(k), self.fields,
            lambda i: self._row_json(message[rows[1, i]:rows[2, i]]) if i >= 0 else bytes(message),
            rows[0], rejects)

    def _row_json(self, raw: bytes | memoryview) -> bytes:
        try:
            value = msgpack.unpackb(raw, raw=False, strict_map_key=False, unicode_errors="replace")
        except Exception:  # noqa: BLE001  # any failure to re-decode falls back to hex
            value = None
        else:
            encoded = _json(value)
            if encoded is not None:
                return encoded
        return orjson.dumps({"msgpack": bytes(raw).hex()})

    def _row_reject(self, message, row: int, status: int, slot: int, start: int, end: int, aux: int) -> Reject:
        record = self._row_json(message[start:end])
        reason = _STATUS_REASON[status]
        if slot >= 0:
            spec = self.slots[slot]
            name = f"field {spec.source!r} ({spec.column})"
            if reason == "kind" and spec.column != "kind":
                reason = "bad_value"
        if status == 1:
            detail = "not a record (an array or a map)"
        elif status == 2:
            detail = f"{aux} fields, expected {len(self.positions)} ({', '.join(self.positions)})"
        elif status == 3:
            detail = f"{name} is missing"
        else:
            value = self._field_value(message[start:end], aux, spec.source)
            detail = {
                4: f"{name}: {value} is not an integer",
                5: f"{name}: nil in a required field",
                6: f"{name}: {value} is beyond int64",
                7: f"{name}: {value} {_unmapped(spec)}",
            }[status]
        return Reject(reason, f"row {row}: {detail}", row, record)

    @staticmethod
    def _field_value(raw, position: int, source: str) -> str:
        """The offending value, for the detail text (bad path only)."""
        try:
            record = msgpack.unpackb(raw, raw=False, strict_map_key=False, unicode_errors="replace")
            value = record[position] if isinstance(record, list) else record.get(source)
        except Exception:  # noqa: BLE001
            return "the value"
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."


def make_decoder(
    format: str,
    fields: FieldMap | None = None,
    max_message_bytes: int = 64 << 20,
    columns: list[str] | None = None,
) -> Decoder:
    """A decoder for one input: its wire format, field map, message size limit and,
    for msgpack array records, the source field at each position (`columns`)."""
    if format == "msgpack":
        return MsgpackDecoder(fields, max_message_bytes, columns)
    if columns is not None:
        raise ValueError(f"columns applies to msgpack array records, not to {format!r}")
    if format == "arrow":
        return ArrowDecoder(fields, max_message_bytes)
    if format == "ndjson":
        return NdjsonDecoder(fields, max_message_bytes)
    raise ValueError(f"unknown wire format {format!r} ({', '.join(FORMATS)})")
