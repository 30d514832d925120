"""The synthetic traffic generator: schema, ordering, determinism, realism the demo relies on."""

import numpy as np
import pyarrow as pa

from engine import EVENT_SCHEMA, KIND_CODES, validate_events
from engine.synth import TrafficGenerator


def _table(gen: TrafficGenerator, n: int, batch_size: int) -> pa.Table:
    return pa.Table.from_batches(list(gen.batches(n, batch_size)))


def test_batches_have_the_event_schema_and_pass_validation():
    batches = list(TrafficGenerator(2_000, seed=1).batches(20_000, 4_096))
    assert [b.num_rows for b in batches] == [4_096] * 4 + [20_000 - 4 * 4_096]
    for batch in batches:
        assert batch.schema.equals(EVENT_SCHEMA, check_metadata=False)
        validate_events(batch)


def test_event_time_never_decreases_across_batches():
    ts = _table(TrafficGenerator(2_000, seed=2), 30_000, 1_000).column("ts").to_numpy()
    assert (np.diff(ts) >= 0).all()


def test_stream_does_not_depend_on_batch_size_or_length():
    a = _table(TrafficGenerator(3_000, seed=3), 25_000, 65_536)
    b = _table(TrafficGenerator(3_000, seed=3), 25_000, 777)
    assert a.equals(b)
    c = _table(TrafficGenerator(3_000, seed=3), 10_000, 4_096)
    assert c.equals(a.slice(0, 10_000))
    d = _table(TrafficGenerator(3_000, seed=4), 25_000, 65_536)
    assert not d.equals(a)


def _luhn_ok(number: int) -> bool:
    digits = [int(c) for c in str(number)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return total % 10 == 0


def test_traffic_carries_what_the_sample_campaigns_look_for():
    table = _table(TrafficGenerator(5_000, seed=5), 200_000, 65_536)
    kind = table.column("kind").to_numpy()
    peer = table.column("peer").to_numpy()
    mcc = table.column("mcc").to_numpy()
    imei = table.column("imei").to_numpy()
    msisdn = table.column("msisdn").to_numpy()
    assert set(np.unique(kind)) == set(KIND_CODES.values())
    calls = kind == KIND_CODES["call_out"]
    assert np.isin(peer[calls], [12122, 96122]).any()
    assert np.isin(mcc[kind == KIND_CODES["location"]], [454, 455]).any()
    device_imeis = imei[kind == KIND_CODES["device"]]
    assert all(len(str(v)) == 15 and _luhn_ok(int(v)) for v in device_imeis[:200])
    assert (table.column("balance").to_numpy()[kind == KIND_CODES["balance"]] < 500).any()
    # Zipf skew: the busiest 1% of subscribers make far more than 1% of events.
    _, counts = np.unique(msisdn, return_counts=True)
    top = np.sort(counts)[::-1][: max(1, len(counts) // 100)].sum()
    assert top > 0.05 * len(msisdn)
