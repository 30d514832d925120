"""Engine.reload_rules and Engine.advance: new rules while running, state kept where it means the same."""

from __future__ import annotations

import importlib.resources

import pyarrow as pa
import pytest

from engine import Engine, parse_rules
from engine.rules import RulesError
from engine.synth import TrafficGenerator

DEMO = importlib.resources.files("engine").joinpath("data", "demo_rules.toml").read_text(encoding="utf-8")

HOTLINE = """
[[rule]]
id = "hotline"
on = "call_out"
where = "peer == 12122"
count = { at_least = 2, within = "1d" }
channels = ["sms"]
template = "t"
cooldown = "0s"

[[rule]]
id = "any_call"
on = "call_out"
channels = ["sms"]
template = "any"
"""


def _traffic(events: int = 60_000, batch: int = 10_000) -> list[pa.RecordBatch]:
    return list(TrafficGenerator(2_000, seed=7).batches(events, batch))


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables)


def test_reloading_the_same_rules_changes_nothing():
    batches = _traffic()
    reloaded, untouched = Engine.from_text(DEMO), Engine.from_text(DEMO)
    half = len(batches) // 2
    for b in batches[:half]:
        reloaded.process(b)
        untouched.process(b)
    fate = reloaded.reload_rules(parse_rules(DEMO))
    assert fate["kept"] == [r.id for r in untouched.ruleset.rules]
    assert fate["fresh"] == fate["removed"] == []
    after = [reloaded.process(b) for b in batches[half:]]
    expected = [untouched.process(b) for b in batches[half:]]
    assert _concat(after).equals(_concat(expected))
    assert sum(t.num_rows for t in after) > 0
    assert reloaded.stats()["rules"] == untouched.stats()["rules"]


def test_a_changed_rule_starts_fresh_and_the_others_keep_state(batch):
    eng = Engine.from_text(HOTLINE)
    eng.process(batch([{"ts": 1_000, "msisdn": 5, "kind": 0, "peer": 12122}]))
    changed = HOTLINE.replace("peer == 12122", "peer == 12122 or peer == 96122")
    fate = eng.reload_rules(parse_rules(changed))
    assert fate == {"kept": ["any_call"], "fresh": ["hotline"], "removed": []}
    # Before the reload this would be the second hotline call in the window; after it, the first.
    out = eng.process(batch([{"ts": 2_000, "msisdn": 5, "kind": 0, "peer": 12122}]))
    assert out.column("rule").to_pylist() == ["any_call"]
    out = eng.process(batch([{"ts": 3_000, "msisdn": 5, "kind": 0, "peer": 96122}]))
    assert out.column("rule").to_pylist() == ["hotline"]  # the second in the window; any_call loses arbitration


def test_unchanged_rule_keeps_its_window_across_a_reload(batch):
    eng = Engine.from_text(HOTLINE)
    eng.process(batch([{"ts": 1_000, "msisdn": 5, "kind": 0, "peer": 12122}]))
    # Template, priority and channels change; the condition does not: the count goes on.
    edited = HOTLINE.replace('template = "t"', 'template = "t2"\npriority = 9')
    assert eng.reload_rules(parse_rules(edited))["kept"] == ["hotline", "any_call"]
    out = eng.process(batch([{"ts": 2_000, "msisdn": 5, "kind": 0, "peer": 12122}]))
    hotline = out.filter(pa.compute.equal(out.column("rule"), "hotline"))
    assert hotline.column("template").to_pylist() == ["t2"]
    assert hotline.column("priority").to_pylist() == [9]


def test_rules_can_be_added_and_removed_and_counters_follow_the_id(batch):
    eng = Engine.from_text(HOTLINE)
    eng.process(batch([{"ts": 1_000, "msisdn": 5, "kind": 0, "peer": 1}]))
    only_any = HOTLINE.split("[[rule]]\nid = \"any_call\"")[0].replace('id = "hotline"', 'id = "hotline_b"')
    only_any += '[[rule]]\nid = "any_call"\non = "call_out"\nchannels = ["sms"]\ntemplate = "any"\n'
    fate = eng.reload_rules(parse_rules(only_any))
    assert fate == {"kept": ["any_call"], "fresh": ["hotline_b"], "removed": ["hotline"]}
    eng.process(batch([{"ts": 2_000, "msisdn": 5, "kind": 0, "peer": 1}]))
    rules = eng.stats()["rules"]
    assert set(rules) == {"hotline_b", "any_call"}
    assert rules["any_call"]["matched"] == 2  # one before the reload, one after
    assert rules["hotline_b"]["matched"] == 0


def test_a_bad_file_is_refused_and_the_old_rules_keep_running(tmp_path, batch):
    eng = Engine.from_text(HOTLINE)
    bad = tmp_path / "rules.toml"
    bad.write_text(HOTLINE.replace("peer == 12122", "peer === 12122"), encoding="utf-8")
    with pytest.raises(RulesError) as err:
        eng.reload_rules(bad)
    assert err.value.rule_id == "hotline" and str(bad) in str(err.value)
    eng.process(batch([{"ts": 1_000, "msisdn": 5, "kind": 0, "peer": 12122}]))
    out = eng.process(batch([{"ts": 2_000, "msisdn": 5, "kind": 0, "peer": 12122}]))
    assert "hotline" in out.column("rule").to_pylist()


def test_reload_then_checkpoint_restores_the_new_rules(tmp_path, batch):
    eng = Engine.from_text(HOTLINE)
    eng.process(batch([{"ts": 1_000, "msisdn": 5, "kind": 0, "peer": 12122}]))
    eng.reload_rules(parse_rules(HOTLINE.replace('template = "any"', 'template = "any2"')))
    eng.checkpoint(tmp_path / "state")
    restored = Engine.restore(tmp_path / "state")
    out = restored.process(batch([{"ts": 2_000, "msisdn": 5, "kind": 0, "peer": 12122},
                                  {"ts": 2_000, "msisdn": 6, "kind": 0, "peer": 1}]))
    assert out.column("template").to_pylist() == ["t", "any2"]  # hotline's window survived both


def test_advance_moves_the_watermark_forward_only(batch):
    eng = Engine.from_text(HOTLINE)
    assert eng.watermark == -1
    eng.process(batch([{"ts": 5_000, "msisdn": 5, "kind": 0}]))
    assert eng.watermark == 5_000
    assert eng.advance(9_000).num_rows == 0
    assert eng.watermark == 9_000
    eng.advance(1_000)
    eng.process(batch([{"ts": 7_000, "msisdn": 5, "kind": 0}]))  # a late event does not move it back
    assert eng.watermark == 9_000
