"""Decoding channel feedback (SPEC section 6) from a feed: instruction id, outcome, time.

A feedback input (`role = "feedback"` in kairos.toml) carries reports from
channels: which instruction (`id`, the 32-hex-digit instruction id), what
became of it (`outcome`: delivered, failed, accepted, declined, considering,
opt_out) and when (`ts`, ms since the epoch, event time).  The wire formats
are those of the event feeds:

- arrow: an Arrow IPC stream with string columns `id`, `outcome` and an
  integer column `ts`;
- msgpack: an array of records, each a map {"id", "outcome", "ts"} or an
  array [id, outcome, ts];
- ndjson: one object {"id": ..., "outcome": ..., "ts": ...} per line.

Feedback is a small stream (one report per instruction, not per event), so
this is plain Python over the decoded records.  Bad records are rejected with
the reasons of `adapters.wire.REJECT_REASONS`; whether an id is known and an
outcome valid is the engine's to say (`Engine.feedback` counts those).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import numpy as np
import orjson
import pyarrow as pa

from adapters.wire import TOO_LARGE_KEPT, Reject

FEEDBACK_FIELDS = ("id", "outcome", "ts")


@dataclass(frozen=True)
class DecodedFeedback:
    """The valid reports of one message, as equal-length columns, and the rejects."""

    ids: list[str] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    ts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    rejects: list[Reject] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.ids)


class FeedbackDecoder:
    """Decodes one feedback message; never raises for bad input."""

    def __init__(self, format: str, max_message_bytes: int = 64 << 20):
        if format not in ("arrow", "msgpack", "ndjson"):
            raise ValueError(f"feedback format must be arrow, msgpack or ndjson, not {format!r}")
        self.format = format
        self.max_message_bytes = max_message_bytes

    def decode(self, message: bytes | memoryview) -> DecodedFeedback:
        data = bytes(message)
        if len(data) > self.max_message_bytes:
            return DecodedFeedback(rejects=[Reject("too_large", f"{len(data)} bytes (the record keeps the first "
                                                   f"{min(len(data), TOO_LARGE_KEPT)})", None, data[:TOO_LARGE_KEPT])])
        if not data:
            return DecodedFeedback(rejects=[Reject("undecodable", "empty message", None, data)])
        if self.format == "arrow":
            return self._arrow(data)
        if self.format == "msgpack":
            try:
                records = msgpack.unpackb(data, raw=False, strict_map_key=False)
            except Exception as exc:  # noqa: BLE001 - msgpack raises many types for bad bytes
                return DecodedFeedback(rejects=[Reject("undecodable", f"msgpack: {exc}", None, data)])
            if not isinstance(records, list):
                return DecodedFeedback(rejects=[Reject("not_records", "not an array of records", None, data)])
            return self._records(records, lambda record: msgpack.packb(record, default=str))
        records, rejects = [], []
        for row, line in enumerate(data.split(b"\n")):
            if not line.strip():
                continue
            try:
                records.append((row, orjson.loads(line)))
            except orjson.JSONDecodeError as exc:
                rejects.append(Reject("undecodable", f"json: {exc}", row, line))
        decoded = self._records([record for _, record in records], orjson.dumps,
                                rows=[row for row, _ in records])
        return DecodedFeedback(decoded.ids, decoded.outcomes, decoded.ts, rejects + decoded.rejects)

    def _arrow(self, data: bytes) -> DecodedFeedback:
        try:
            table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            return DecodedFeedback(rejects=[Reject("undecodable", f"arrow: {exc}", None, data)])
        missing = [name for name in FEEDBACK_FIELDS if name not in table.column_names]
        if missing:
            return DecodedFeedback(rejects=[Reject("missing_field", f"no column {missing[0]!r}", None, data)])
        columns = {name: table.column(name).to_pylist() for name in FEEDBACK_FIELDS}
        records = [dict(zip(FEEDBACK_FIELDS, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        return self._records(records, orjson.dumps)

    @staticmethod
    def _records(records: list, encode, rows: list[int] | None = None) -> DecodedFeedback:
        ids, outcomes, times, rejects = [], [], [], []
        for k, record in enumerate(records):
            row = rows[k] if rows is not None else k
            if isinstance(record, list) and len(record) == len(FEEDBACK_FIELDS):
                record = dict(zip(FEEDBACK_FIELDS, record, strict=True))
            if not isinstance(record, dict):
                rejects.append(Reject("not_records", "a report is a map of id, outcome, ts", row,
                                      _encode(encode, record)))
                continue
            missing = [name for name in FEEDBACK_FIELDS if record.get(name) is None]
            if missing:
                rejects.append(Reject("missing_field", f"no {missing[0]!r}", row, _encode(encode, record)))
                continue
            report_id, outcome, ts = record["id"], record["outcome"], record["ts"]
            if not isinstance(report_id, str) or not isinstance(outcome, str) or isinstance(ts, bool) \
                    or not isinstance(ts, int) or not 0 <= ts < 1 << 62:
                rejects.append(Reject("bad_value", "id and outcome are strings, ts an integer >= 0", row,
                                      _encode(encode, record)))
                continue
            ids.append(report_id)
            outcomes.append(outcome)
            times.append(ts)
        return DecodedFeedback(ids, outcomes, np.array(times, np.int64), rejects)


def _encode(encode, record) -> bytes:
    try:
        return encode(record)
    except (TypeError, ValueError, OverflowError):
        return repr(record).encode()
