"""Feedback messages (SPEC section 6) in each wire format: valid reports kept, bad ones rejected with a reason."""

from __future__ import annotations

import msgpack
import orjson
import pyarrow as pa
import pytest

from adapters.feedback import FeedbackDecoder

REPORTS = [("a" * 32, "delivered", 1_000), ("b" * 32, "accepted", 2_000), ("c" * 32, "opt_out", 3_000)]


def arrow(reports) -> bytes:
    ids, outcomes, ts = zip(*reports, strict=True)
    table = pa.table({"id": list(ids), "outcome": list(outcomes), "ts": pa.array(ts, pa.int64())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


ENCODINGS = {
    "arrow": arrow,
    "msgpack": lambda reports: msgpack.packb([dict(zip(("id", "outcome", "ts"), r, strict=True)) for r in reports]),
    "ndjson": lambda reports: b"\n".join(orjson.dumps(dict(zip(("id", "outcome", "ts"), r, strict=True)))
                                         for r in reports),
}


@pytest.mark.parametrize("fmt", sorted(ENCODINGS))
def test_reports_round_trip(fmt):
    decoded = FeedbackDecoder(fmt).decode(ENCODINGS[fmt](REPORTS))
    assert list(zip(decoded.ids, decoded.outcomes, decoded.ts.tolist(), strict=True)) == REPORTS
    assert decoded.rejects == []


def test_msgpack_positional_records_and_bad_records_beside_good_ones():
    message = msgpack.packb([list(REPORTS[0]), {"id": "x", "outcome": "accepted"}, 7,
                             {"id": "y", "outcome": "declined", "ts": "noon"}, list(REPORTS[1])])
    decoded = FeedbackDecoder("msgpack").decode(message)
    assert decoded.ids == [REPORTS[0][0], REPORTS[1][0]]
    assert [(r.reason, r.row) for r in decoded.rejects] == [("missing_field", 1), ("not_records", 2),
                                                            ("bad_value", 3)]


def test_ndjson_bad_line_is_rejected_and_the_rest_kept():
    lines = ENCODINGS["ndjson"](REPORTS).split(b"\n")
    lines.insert(1, b"{not json")
    decoded = FeedbackDecoder("ndjson").decode(b"\n".join(lines))
    assert decoded.n == 3
    assert [(r.reason, r.row, r.record) for r in decoded.rejects] == [("undecodable", 1, b"{not json")]


@pytest.mark.parametrize("fmt", sorted(ENCODINGS))
@pytest.mark.parametrize("message", [b"", b"\xc1\xc1", b"\x93\x01\x02", b"[1,2,3]", b"\x00" * 40])
def test_garbage_never_raises(fmt, message):
    decoded = FeedbackDecoder(fmt).decode(message)
    assert decoded.n == 0 and decoded.rejects


def test_arrow_without_an_outcome_column_is_refused_whole():
    table = pa.table({"id": ["a"], "ts": [1]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    decoded = FeedbackDecoder("arrow").decode(sink.getvalue().to_pybytes())
    assert [(r.reason, r.row) for r in decoded.rejects] == [("missing_field", None)]
