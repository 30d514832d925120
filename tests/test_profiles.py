"""engine.profiles.ProfileStore, Engine.from_files(rules, profiles), load_profiles, and policy state in checkpoints."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from engine import Engine
from engine.profiles import ProfileError, ProfileStore
from tests.conftest import make_batch

RULES = """
[policy]
daily_cap = 2
quiet_hours = "21:00-09:00"

[[rule]]
id = "offer"
on = "call_out"
channels = ["sms", "portal"]
cooldown = "1h"
holdout = 0.2
goal = { on = "recharge", within = "1d" }
"""

TABLE = pa.table({
    "msisdn": pa.array([30, 10, 20], pa.int64()),
    "opt_out": pa.array([None, True, False]),
    "channels": pa.array([["portal"], None, ["sms", "fax"]], pa.list_(pa.string())),
    "opt_out_channels": pa.array([None, None, ["sms"]], pa.list_(pa.string())),
    "contact_days": pa.array([[6, 7], None, []], pa.list_(pa.int64())),
    "segment": pa.array(["gold", "silver", "gold"]),
})


def write(tmp_path, kind: str):
    if kind == "parquet":
        path = tmp_path / "p.parquet"
        pq.write_table(TABLE, path)
    elif kind == "ipc-file":
        path = tmp_path / "p.arrow"
        with ipc.new_file(str(path), TABLE.schema) as writer:
            writer.write_table(TABLE)
    elif kind == "ipc-stream":
        path = tmp_path / "p.arrows"
        with ipc.new_stream(str(path), TABLE.schema) as writer:
            writer.write_table(TABLE)
    else:
        path = tmp_path / "p.csv"
        path.write_text("msisdn,opt_out,channels,opt_out_channels,contact_days,segment\n"
                        "30,,portal,,\"6,7\",gold\n10,true,,,,silver\n20,false,sms;fax,sms,,gold\n")
    return path


@pytest.mark.parametrize("kind", ["parquet", "ipc-file", "ipc-stream", "csv"])
def test_load_from_every_format(tmp_path, kind):
    store = ProfileStore.load(write(tmp_path, kind))
    assert store.msisdn.tolist() == [10, 20, 30]
    assert store.get(30) == {"msisdn": 30, "channels": ["portal"], "contact_days": [6, 7], "segment": "gold"}
    assert store.get(10)["opt_out"] is True
    assert store.get(20)["channels"] == ["sms", "fax"] and store.get(20)["opt_out_channels"] == ["sms"]
    assert store.get(99) == {}
    assert store.rows(np.array([5, 10, 20, 25, 30, 31])).tolist() == [-1, 0, 1, -1, 2, -1]
    arrays = store.policy_arrays(("sms", "portal", "mms"))
    assert arrays["flags"].tolist() == [1, 0, 0]
    assert arrays["allowed"].tolist() == [2**64 - 1, 0, 0b010]  # 20: sms accepted but opted out
    assert arrays["days"].tolist()[2] == 0b1100000


@pytest.mark.parametrize(("table", "message"), [
    (pa.table({"id": [1]}), "msisdn"),
    (pa.table({"msisdn": [1, 1]}), "more than one"),
    (pa.table({"msisdn": [0, 1]}), "not positive"),
    (pa.table({"msisdn": pa.array([1, None], pa.int64())}), "empty"),
    (pa.table({"msisdn": [1], "contact_days": [[8]]}), "ISO weekday"),
    (pa.table({"msisdn": [1], "channels": [5]}), "channels"),
])
def test_bad_profiles_are_refused_with_the_reason(table, message):
    with pytest.raises(ProfileError, match=message):
        ProfileStore(table, "p.parquet")


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(ProfileError, match="cannot read"):
        ProfileStore.load(tmp_path / "missing.parquet")
    (tmp_path / "p.json").write_text("{}")
    with pytest.raises(ProfileError, match=".parquet"):
        ProfileStore.load(tmp_path / "p.json")


def test_engine_from_files_with_profiles_and_replacement(tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    engine = Engine.from_files(rules, profiles=write(tmp_path, "parquet"))
    noon = 1_717_588_800_000  # 2024-06-05 12:00 UTC, a Wednesday
    events = make_batch([{"ts": noon, "msisdn": m, "kind": 0} for m in (10, 20, 30, 40)])
    out = engine.process(events).to_pylist()
    # 10 opted out; 20 accepts sms only but opted out of it; 30 portal (passive); 40 no profile.
    assert [(r["msisdn"], r["channel"], r["not_before"]) for r in out] == [(30, "portal", noon), (40, "sms", noon)]
    assert engine.stats()["profiles"] == 3
    bad = pa.table({"msisdn": [1, 1]})
    with pytest.raises(ProfileError):
        engine.load_profiles(bad)
    assert engine.stats()["profiles"] == 3  # the current profiles stay
    engine.load_profiles(pa.table({"msisdn": pa.array([40], pa.int64()), "opt_out": [True]}))
    later = make_batch([{"ts": noon + 2 * 3_600_000, "msisdn": m, "kind": 0} for m in (10, 40)])
    assert [r["msisdn"] for r in engine.process(later).to_pylist()] == [10]


def test_checkpoint_carries_profiles_feedback_and_policy_state(tmp_path):
    engine = Engine.from_text(RULES, profiles=TABLE)
    noon = 1_717_588_800_000
    first = engine.process(make_batch([{"ts": noon + i, "msisdn": m, "kind": 0}
                                       for i, m in enumerate(range(100, 160))]))
    ids = first.column("id").to_pylist()
    engine.feedback(ids[:5], "accepted", noon + 100)
    engine.checkpoint(tmp_path / "ck")
    restored = Engine.restore(tmp_path / "ck")
    assert restored.stats()["rules"] == engine.stats()["rules"]
    assert restored.profiles.table.equals(engine.profiles.table)
    # Memory of issued instructions survives: feedback on them still applies.
    assert restored.feedback(ids[5:7], "declined", noon + 200) == {"applied": 2, "unknown": 0, "invalid": 0}
    engine.feedback(ids[5:7], "declined", noon + 200)
    more = make_batch([{"ts": noon + 2 * 3_600_000 + i, "msisdn": m, "kind": k}
                       for i, (m, k) in enumerate([(m, k) for m in range(95, 165) for k in (0, 6)])])
    assert restored.process(more).equals(engine.process(more))
    assert restored.stats()["rules"] == engine.stats()["rules"]


def test_issued_memory_is_bounded_and_old_ids_are_unknown():
    engine = Engine.from_text('[[rule]]\nid = "a"\non = "call_out"\nchannels = ["sms"]\n', issued_max_entries=3,
                              issued_max_age=10_000)
    out = engine.process(make_batch([{"ts": t, "msisdn": t + 1, "kind": 0} for t in range(5)]))
    ids = out.column("id").to_pylist()
    assert engine.stats()["issued_in_memory"] == 3
    assert engine.feedback(ids, "delivered", 10) == {"applied": 3, "unknown": 2, "invalid": 0}
    engine.process(make_batch([{"ts": 20_000, "msisdn": 99, "kind": 0}]))
    assert engine.feedback(ids[-1], "delivered", 20_001) == {"applied": 0, "unknown": 1, "invalid": 0}
    assert engine.stats()["feedback"] == {"applied": 3, "unknown": 3, "invalid": 0}


# An empty list is no preference, as a missing value is, for every policy list column and in every format.
EMPTY = pa.table({
    "msisdn": pa.array([1, 2, 3], pa.int64()),
    "channels": pa.array([[], None, ["portal"]], pa.list_(pa.string())),
    "opt_out_channels": pa.array([[], None, ["sms"]], pa.list_(pa.string())),
    "contact_days": pa.array([[], None, [6, 7]], pa.list_(pa.int64())),
})


def write_empty_lists(tmp_path, kind: str):
    path = tmp_path / {"parquet": "e.parquet", "ipc-file": "e.arrow", "ipc-stream": "e.arrows"}.get(kind, "e.csv")
    if kind == "parquet":
        pq.write_table(EMPTY, path)
    elif kind == "ipc-file":
        with ipc.new_file(str(path), EMPTY.schema) as writer:
            writer.write_table(EMPTY)
    elif kind == "ipc-stream":
        with ipc.new_stream(str(path), EMPTY.schema) as writer:
            writer.write_table(EMPTY)
    elif kind == "csv":  # an empty field is null
        path.write_text('msisdn,channels,opt_out_channels,contact_days\n1,,,\n2,,,\n3,portal,sms,"6,7"\n')
    else:  # "csv-separators": a field of separators only is an empty list
        path.write_text('msisdn,channels,opt_out_channels,contact_days\n1,;,"",| \n2,,,\n3,portal,sms,6;7\n')
    return path


@pytest.mark.parametrize("kind", ["parquet", "ipc-file", "ipc-stream", "csv", "csv-separators"])
def test_an_empty_list_reads_as_missing_in_every_format(tmp_path, kind):
    store = ProfileStore.load(write_empty_lists(tmp_path, kind))
    channels = ("sms", "portal", "mms")
    arrays = store.policy_arrays(channels)
    # 1 (empty lists) reads as 2 (nulls): every channel, none refused, the policy's days
    assert arrays["allowed"].tolist() == [2**64 - 1, 2**64 - 1, 0b010]
    assert arrays["days"].tolist() == [0, 0, 0b1100000]
    assert arrays["flags"].tolist() == [0, 0, 0]
    assert store.get(1) == {"msisdn": 1} and store.get(2) == {"msisdn": 2}
    reference = ProfileStore(EMPTY).policy_arrays(channels)
    for key, values in arrays.items():
        assert values.tolist() == reference[key].tolist(), key

