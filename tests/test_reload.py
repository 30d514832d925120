"""Engine.reload_rules and Engine.advance: new rules while running, state kept where it means the same."""

from __future__ import annotations

import importlib.resources

import numpy as np
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


BENCH = importlib.resources.files("engine").joinpath("data", "bench_rules.toml").read_text(encoding="utf-8")


def _reordered(text: str) -> str:
    """The same rules in reverse order (bench rules have distinct priorities, so order decides nothing)."""
    head, *rules = text.split("[[rule]]")
    return head + "".join("[[rule]]" + body.rstrip() + "\n\n" for body in reversed(rules))


def _feedback_for(table: pa.Table, k: int) -> tuple[list[str], list[str], list[int]]:
    """Some feedback for a table of instructions: every outcome, on every k-th instruction."""
    outcomes = ["accepted", "declined", "opt_out", "delivered", "considering", "failed"]
    picked = table.take(list(range(0, table.num_rows, k)))
    ids = picked.column("id").to_pylist()
    times = (np.asarray(picked.column("ts")) + 1).tolist()
    return ids, [outcomes[i % len(outcomes)] for i in range(len(ids))], times


def test_reordering_rules_keeps_every_kind_of_policy_state():
    """Condition state, cooldowns, caps, opt-outs, acceptances, declines, goals, guardrail counts and the
    memory of issued instructions all follow their rule through a reload that renumbers every rule."""
    batches = _traffic(events=120_000, batch=20_000)
    steady, reloaded = Engine.from_text(BENCH), Engine.from_text(BENCH)
    for i, b in enumerate(batches):
        if i == 3:
            fate = reloaded.reload_rules(parse_rules(_reordered(BENCH)))
            assert sorted(fate["kept"]) == sorted(r.id for r in steady.ruleset.rules)
        out_steady, out_reloaded = steady.process(b), reloaded.process(b)
        assert out_reloaded.equals(out_steady)
        feedback = _feedback_for(out_steady, 7)
        assert reloaded.feedback(*feedback) == steady.feedback(*feedback)
    assert reloaded.stats()["rules"] == steady.stats()["rules"]
    stats = steady.stats()["rules"]
    assert sum(r["stopped"]["suppressed"] + r["stopped"]["opt_out"] for r in stats.values()) > 0


def test_feedback_to_a_removed_rule_is_unknown_and_a_goal_can_go(batch):
    rules = BENCH
    eng = Engine.from_text(rules)
    out = pa.concat_tables([eng.process(b) for b in _traffic(events=40_000, batch=20_000)])
    by_rule = {rule: out.filter(pa.compute.equal(out.column("rule"), rule)) for rule in ("low_balance", "car_owner")}
    assert all(t.num_rows for t in by_rule.values())
    head, *bodies = rules.split("[[rule]]")
    kept = [b for b in bodies if 'id = "car_owner"' not in b]
    without_goal = [b.replace('goal = { on = "recharge", within = "24h" }', "") for b in kept]
    fate = eng.reload_rules(parse_rules(head + "".join("[[rule]]" + b for b in without_goal)))
    assert fate["removed"] == ["car_owner"] and "low_balance" in fate["kept"]
    gone = by_rule["car_owner"].column("id")[0].as_py()
    still = by_rule["low_balance"].column("id")[0].as_py()
    assert eng.feedback([gone, still], ["accepted", "accepted"], [10**13, 10**13]) == {
        "applied": 1, "unknown": 1, "invalid": 0}
    assert eng.stats()["rules"]["low_balance"]["feedback"]["accepted"] == 1


BUCKETED = """
[[rule]]
id = "heavy"
on = "call_out"
sum = { column = "duration", at_least = 100, within = "1d", resolution = "2h" }
channels = ["sms"]
template = "t"

[[rule]]
id = "traveller"
on = "call_out"
distinct = { column = "cell", at_least = 2, within = "1d" }
channels = ["sms"]
template = "d"
"""


def test_sum_and_distinct_keep_their_windows_across_a_reload_and_a_checkpoint(tmp_path, batch):
    eng = Engine.from_text(BUCKETED)
    assert eng.process(batch([{"ts": 1_000, "msisdn": 5, "kind": 0, "duration": 60, "cell": 7}])).num_rows == 0
    edited = BUCKETED.replace('template = "t"', 'template = "t2"').replace('template = "d"', 'template = "d2"')
    assert eng.reload_rules(parse_rules(edited))["kept"] == ["heavy", "traveller"]
    eng.checkpoint(tmp_path / "state")
    restored = Engine.restore(tmp_path / "state")
    # 60 + 40 reaches 100 and cell 8 is a second cell only if the first event's state survived.
    out = restored.process(batch([{"ts": 3 * 3_600_000, "msisdn": 5, "kind": 0, "duration": 40, "cell": 8}]))
    assert out.column("template").to_pylist() == ["t2"]  # one instruction per event: the earlier rule wins
    rules = restored.stats()["rules"]
    assert rules["heavy"]["matched"] == rules["traveller"]["matched"] == 1


def test_a_changed_resolution_starts_the_window_afresh(batch):
    eng = Engine.from_text(BUCKETED)
    eng.process(batch([{"ts": 1_000, "msisdn": 5, "kind": 0, "duration": 60}]))
    fate = eng.reload_rules(parse_rules(BUCKETED.replace('resolution = "2h"', 'resolution = "1h"')))
    assert fate["fresh"] == ["heavy"]
    out = eng.process(batch([{"ts": 2_000, "msisdn": 5, "kind": 0, "duration": 40}]))
    assert out.num_rows == 0
