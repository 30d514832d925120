"""Sequences (`after`), timers (`absence`) and shadow rules: semantics, checkpoints, reloads, errors.

SPEC section 8 states the semantics; tests/test_differential.py holds the kernel to the reference on random
rules that use these conditions.  Here each rule of the semantics gets a test of its own, plus what random
streams reach rarely: lateness, `Engine.advance`, timers across a checkpoint and a reload.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from engine import KIND_CODES, Engine, RulesError, parse_rules
from engine.reference import ReferenceEngine
from tests.test_differential import assert_same_counters, assert_same_table, rules_files, scenarios, slices

H = 3_600_000
M = 60_000

LOW_BALANCE = """
[[rule]]
id = "recharge_bonus"
on = "balance"
where = "balance < 500"
absence = { on = "recharge", where = "amount > 0", within = "2h" }
channels = ["sms"]
params = ["balance", "ts"]
"""


def events(*rows: tuple) -> dict[str, np.ndarray]:
    """Events from (ts, msisdn, kind, {column: value}) tuples."""
    columns: dict[str, list[int]] = {"ts": [], "msisdn": [], "kind": []}
    extra_names = sorted({name for row in rows for name in (row[3] if len(row) > 3 else {})})
    for name in extra_names:
        columns[name] = []
    for row in rows:
        ts, msisdn, kind = row[:3]
        extra = row[3] if len(row) > 3 else {}
        columns["ts"].append(ts)
        columns["msisdn"].append(msisdn)
        columns["kind"].append(KIND_CODES[kind])
        for name in extra_names:
            columns[name].append(extra.get(name, 0))
    return {name: np.array(values, np.int64) for name, values in columns.items()}


def fired(table) -> list[tuple]:
    return [(row["ts"], row["msisdn"], row["rule"]) for row in table.to_pylist()]


# ---------------------------------------------------------------------------
# absence


def test_absence_fires_at_start_plus_window_with_the_start_events_params():
    engine = Engine.from_text(LOW_BALANCE)
    assert engine.process(events((0, 1, "balance", {"balance": 300}))).num_rows == 0
    # The event that moves the watermark to the due time comes after the timer's instruction.
    table = engine.process(events((2 * H, 2, "call_out")))
    (row,) = table.to_pylist()
    assert (row["ts"], row["msisdn"], row["rule"], row["not_before"]) == (2 * H, 1, "recharge_bonus", 2 * H)
    assert dict(row["params"]) == {"balance": "300", "ts": str(2 * H)}
    stats = engine.stats()["rules"]["recharge_bonus"]
    assert (stats["matched"], stats["sent"]) == (1, 1)


def test_absence_cancel_window_is_half_open():
    engine = Engine.from_text(LOW_BALANCE)
    engine.process(events((0, 1, "balance", {"balance": 300}), (0, 2, "balance", {"balance": 300})))
    # A recharge at t0 cancels; one at exactly t0 + W comes after the timer fired.
    table = engine.process(events((0, 1, "recharge", {"amount": 100}), (2 * H, 2, "recharge", {"amount": 100})))
    assert fired(table) == [(2 * H, 2, "recharge_bonus")]
    # A recharge that fails the cancel filter does not cancel.
    engine.process(events((3 * H, 3, "balance", {"balance": 1}), (3 * H + 1, 3, "recharge", {"amount": 0})))
    assert fired(engine.advance(5 * H)) == [(5 * H, 3, "recharge_bonus")]
    assert engine.stats()["rules"]["recharge_bonus"]["matched"] == 2


def test_absence_cancel_applies_before_a_start_on_the_same_event():
    text = """
[[rule]]
id = "quiet_after_call"
on = "call_out"
absence = { on = "call_out", within = "10m" }
channels = ["crm"]
"""
    engine = Engine.from_text(text)
    # 0: start.  5m: cancels the pending timer, then starts a new one (due 15m).  7m: cancels and restarts
    # (due 17m).  A start while pending is ignored: only one timer at a time.
    engine.process(events((0, 1, "call_out"), (5 * M, 1, "call_out"), (7 * M, 1, "call_out")))
    assert fired(engine.advance(16 * M)) == []
    assert fired(engine.advance(17 * M)) == [(17 * M, 1, "quiet_after_call")]
    assert fired(engine.advance(60 * M)) == []


def test_absence_start_ignored_while_pending():
    text = """
[[rule]]
id = "a"
on = "balance"
absence = { on = "recharge", within = "1h" }
channels = ["sms"]
"""
    engine = Engine.from_text(text)
    engine.process(events((0, 1, "balance"), (30 * M, 1, "balance")))
    assert fired(engine.advance(H)) == [(H, 1, "a")]  # from the first start, not the second
    assert fired(engine.advance(2 * H)) == []


def test_lateness_delays_timers_and_advance_never_goes_back():
    engine = Engine.from_text(LOW_BALANCE, lateness=10 * M)
    engine.process(events((0, 1, "balance", {"balance": 300})))
    assert fired(engine.process(events((2 * H + 9 * M, 2, "call_out")))) == []
    assert fired(engine.advance(2 * H)) == []  # behind the watermark: nothing moves
    assert engine.watermark == 2 * H + 9 * M
    table = engine.advance(2 * H + 10 * M)
    assert fired(table) == [(2 * H, 1, "recharge_bonus")]  # instruction time is the due time


def test_late_start_whose_timer_is_already_due_fires_right_after_it():
    engine = Engine.from_text(LOW_BALANCE)
    table = engine.process(events((10 * H, 2, "call_out"), (H, 1, "balance", {"balance": 1}), (10 * H, 3, "call_out")))
    assert fired(table) == [(3 * H, 1, "recharge_bonus")]
    # Its place: after the late event, before the next one (the batch had no instruction of its own).
    reference = ReferenceEngine(parse_rules(LOW_BALANCE))
    assert_same_table(table, reference.process(events((10 * H, 2, "call_out"), (H, 1, "balance", {"balance": 1}),
                                                        (10 * H, 3, "call_out"))))


def test_timer_instructions_are_ordered_among_event_instructions_and_replay_to_the_same_ids():
    text = LOW_BALANCE + """
[[rule]]
id = "every_call"
on = "call_out"
channels = ["portal"]
"""
    stream = events((0, 1, "balance", {"balance": 300}), (0, 2, "balance", {"balance": 300}), (H, 3, "call_out"),
                    (3 * H, 4, "call_out"))
    engine = Engine.from_text(text)
    table = engine.process(stream)
    assert [(r["ts"], r["msisdn"], r["rule"]) for r in table.to_pylist()] == [
        (H, 3, "every_call"), (2 * H, 1, "recharge_bonus"), (2 * H, 2, "recharge_bonus"), (3 * H, 4, "every_call")]
    again = Engine.from_text(text)
    assert again.process(stream).column("id").equals(table.column("id"))
    assert len(set(table.column("id").to_pylist())) == 4


def test_a_batch_whose_only_instructions_are_timers_keeps_the_start_events_params_in_their_own_types():
    text = """
[[rule]]
id = "quiet"
on = "care"
absence = { on = "order", within = "1h" }
channels = ["sms"]
params = ["code", "mcc", "duration", "balance", "kind"]
"""
    start = events((0, 1, "care", {"code": -3, "mcc": 65535, "duration": -(2**31), "balance": -(2**63)}),
                   (M, 2, "care", {"code": 2**31 - 1, "balance": 2**63 - 1}))
    engine, reference = Engine.from_text(text), ReferenceEngine(parse_rules(text))
    for eng in (engine, reference):
        assert eng.process(start).num_rows == 0
    # Nothing listens to this event; the first timer falls due before it, the second after.
    only_timers = events((H + M // 2, 3, "data"))
    table = engine.process(only_timers)
    assert_same_table(table, reference.process(only_timers))
    assert fired(table) == [(H, 1, "quiet")]
    assert table.column("params").to_pylist() == [
        [("code", "-3"), ("mcc", "65535"), ("duration", str(-(2**31))), ("balance", str(-(2**63))),
         ("kind", str(KIND_CODES["care"]))]]
    empty = events()
    assert_same_table(engine.process(empty), reference.process(empty))
    late = engine.advance(2 * H)
    assert_same_table(late, reference.advance(2 * H))
    assert late.column("params").to_pylist() == [
        [("code", str(2**31 - 1)), ("mcc", "0"), ("duration", "0"), ("balance", str(2**63 - 1)),
         ("kind", str(KIND_CODES["care"]))]]
    assert_same_counters(engine, reference)


def test_timer_policy_is_evaluated_at_the_due_time():
    text = """
[policy]
timezone = "UTC"
quiet_hours = "21:00-09:00"
daily_cap = 1

[[rule]]
id = "bonus"
on = "balance"
absence = { on = "recharge", within = "2h" }
channels = ["sms"]
active = { hours = "08:00-23:00" }
"""
    engine = Engine.from_text(text)
    # Due at 22:00: inside the active period, so it matches; quiet hours defer delivery to 09:00 next day.
    engine.process(events((20 * H, 1, "balance")))
    (row,) = engine.advance(22 * H).to_pylist()
    assert (row["ts"], row["not_before"]) == (22 * H, 33 * H)
    # Due at 23:30: outside the active period, no match at all.
    engine.process(events((21 * H + 30 * M, 2, "balance")))
    assert engine.advance(24 * H).num_rows == 0
    assert engine.stats()["rules"]["bonus"]["matched"] == 1


# ---------------------------------------------------------------------------
# after

ROAMING = """
[[rule]]
id = "welcome"
on = "location"
where = "mcc in [454, 455]"
channels = ["sms"]
cooldown = "1d"

[[rule]]
id = "first_call_abroad"
on = "call_out"
after = { rule = "welcome", within = "2h" }
channels = ["portal"]
"""


def test_after_follows_an_earlier_match_within_the_window():
    engine = Engine.from_text(ROAMING)
    table = engine.process(events(
        (0, 1, "location", {"mcc": 460}), (10, 1, "location", {"mcc": 454}), (20, 1, "call_out"),
        (2 * H + 10, 1, "call_out"),  # exactly W after the match: outside (t - W, t]
        (30, 2, "call_out"),  # never matched welcome
    ))
    assert fired(table) == [(10, 1, "welcome"), (20, 1, "first_call_abroad")]


def test_after_counts_a_match_the_policy_stopped_but_not_one_outside_the_active_period():
    engine = Engine.from_text(ROAMING)
    # The second welcome match (455) is stopped by welcome's cooldown; it still starts a new window.
    table = engine.process(events(
        (0, 1, "location", {"mcc": 460}), (10, 1, "location", {"mcc": 454}), (H, 1, "location", {"mcc": 455}),
        (2 * H + 20, 1, "call_out"),
    ))
    assert fired(table) == [(10, 1, "welcome"), (2 * H + 20, 1, "first_call_abroad")]
    assert engine.stats()["rules"]["welcome"]["stopped"]["cooldown"] == 1

    inactive = ROAMING.replace('cooldown = "1d"', 'cooldown = "1d"\nactive = { until = "1969-12-31" }')
    engine = Engine.from_text(inactive)
    table = engine.process(events((0, 1, "location", {"mcc": 460}), (10, 1, "location", {"mcc": 454}),
                                  (20, 1, "call_out")))
    assert table.num_rows == 0


def test_after_does_not_see_a_match_on_the_same_event():
    text = """
[[rule]]
id = "a"
on = "call_out"
channels = ["sms"]

[[rule]]
id = "b"
on = "call_out"
after = { rule = "a", within = "1h" }
channels = ["crm"]
priority = 1
"""
    engine = Engine.from_text(text)
    table = engine.process(events((0, 1, "call_out"), (10, 1, "call_out")))
    assert fired(table) == [(0, 1, "a"), (10, 1, "b")]


def test_after_a_timer_firing():
    text = LOW_BALANCE + """
[[rule]]
id = "call_after_bonus"
on = "call_out"
after = { rule = "recharge_bonus", within = "1h" }
channels = ["crm"]
"""
    engine = Engine.from_text(text)
    engine.process(events((0, 1, "balance", {"balance": 1})))
    table = engine.process(events((2 * H + 5, 1, "call_out")))
    assert fired(table) == [(2 * H, 1, "recharge_bonus"), (2 * H + 5, 1, "call_after_bonus")]


# ---------------------------------------------------------------------------
# shadow

SHADOW = """
[policy]
daily_cap = 1

[[rule]]
id = "live"
on = "call_out"
channels = ["sms"]
priority = 1

[[rule]]
id = "forecast"
on = ["call_out", "sms_out"]
count = { at_least = 2, within = "1d" }
channels = ["sms", "portal"]
priority = 5
shadow = true
"""


def test_shadow_rule_sends_nothing_takes_no_cap_and_counts_what_it_would_send():
    engine = Engine.from_text(SHADOW)
    table = engine.process(events((0, 1, "sms_out"), (10, 1, "call_out"), (20, 2, "call_out"), (30, 2, "sms_out")))
    # The live rule reaches both subscribers although the shadow rule, of higher priority, would have won
    # subscriber 1's call and taken the only daily cap slot.
    assert fired(table) == [(10, 1, "live"), (20, 2, "live")]
    stats = engine.stats()["rules"]
    forecast = stats["forecast"]
    assert forecast["shadow"] and not stats["live"]["shadow"]
    assert forecast["matched"] == 2
    # Subscriber 1 at 10: it would win; subscriber 2 at 30: the live rule took the cap at 20.
    assert (forecast["sent"], forecast["sent_by_channel"], forecast["cap_draw"]) == (1, {"sms": 1, "portal": 0}, 1)
    assert forecast["stopped"]["capped"] == 1
    assert stats["live"]["cap_draw"] == 2
    assert engine.stats()["instructions"] == 2


def test_shadow_rule_loses_to_a_live_rule_that_beats_it():
    text = SHADOW.replace("priority = 5", "priority = 0")
    engine = Engine.from_text(text)
    engine.process(events((0, 1, "sms_out"), (10, 1, "call_out")))
    assert engine.stats()["rules"]["forecast"]["stopped"]["arbitrated"] == 1


def test_switching_a_shadow_rule_live_keeps_its_state_and_restarts_its_figures():
    engine = Engine.from_text(SHADOW)
    engine.process(events((0, 1, "sms_out")))  # one of the two events the count needs
    assert engine.stats()["rules"]["forecast"]["matched"] == 0
    engine.process(events((5, 3, "sms_out"), (6, 3, "sms_out")))
    assert engine.stats()["rules"]["forecast"]["matched"] == 1
    fate = engine.reload_rules(parse_rules(SHADOW.replace("shadow = true", "shadow = false")))
    assert "forecast" in fate["kept"]
    assert engine.stats()["rules"]["forecast"]["matched"] == 0
    table = engine.process(events((10, 1, "sms_out")))
    assert fired(table) == [(10, 1, "forecast")]


# ---------------------------------------------------------------------------
# timers across checkpoints and reloads


def test_pending_timers_survive_a_checkpoint(tmp_path):
    engine = Engine.from_text(LOW_BALANCE, lateness=M)
    engine.process(events((0, 1, "balance", {"balance": 1}), (H, 2, "balance", {"balance": 2}),
                          (H + 1, 2, "recharge", {"amount": 5}), (H + 2, 3, "balance", {"balance": 3})))
    engine.checkpoint(tmp_path / "cp")
    restored = Engine.restore(tmp_path / "cp", lateness=M)
    later = events((2 * H + M, 9, "call_out"), (4 * H, 9, "call_out"))
    assert_same_table(restored.process(later), engine.process(later))
    assert fired(restored.advance(10 * H)) == []
    assert restored.stats()["rules"] == engine.stats()["rules"]


def test_reload_keeps_timers_of_an_unchanged_rule_and_drops_a_changed_ones():
    text = LOW_BALANCE + """
[[rule]]
id = "idle"
on = "call_out"
absence = { on = "call_out", within = "1h" }
channels = ["crm"]
"""
    engine = Engine.from_text(text)
    engine.process(events((0, 1, "balance", {"balance": 1}), (0, 2, "call_out")))
    fate = engine.reload_rules(parse_rules(text.replace('within = "1h"', 'within = "3h"')))
    assert fate == {"kept": ["recharge_bonus"], "fresh": ["idle"], "removed": []}
    assert fired(engine.advance(5 * H)) == [(2 * H, 1, "recharge_bonus")]


def test_reload_treats_changed_params_of_an_absence_rule_as_a_new_rule():
    engine = Engine.from_text(LOW_BALANCE)
    engine.process(events((0, 1, "balance", {"balance": 1})))
    fate = engine.reload_rules(parse_rules(LOW_BALANCE.replace('params = ["balance", "ts"]', 'params = ["cell"]')))
    assert fate["fresh"] == ["recharge_bonus"]
    assert engine.advance(5 * H).num_rows == 0


@given(
    scenario=scenarios(rules=rules_files(conditions=("none", "count", "after", "absence"), policy=True),
                       policy=True),
    lateness=st.sampled_from((0, 1, 1000, H)),
    cuts=st.lists(st.integers(0, 60), max_size=3),
    advances=st.lists(st.sampled_from((0, 1, H, 5 * H, 50 * H)), max_size=3),
)
def test_lateness_and_advance_equal_the_reference(scenario, lateness, cuts, advances):
    text, columns = scenario
    note(f"rules:\n{text}\nlateness {lateness}, cuts {cuts}, advances {advances}")
    kernel = Engine(parse_rules(text), lateness=lateness)
    reference = ReferenceEngine(parse_rules(text), lateness=lateness)
    clock = 0
    for part, step in zip(slices(columns, cuts), [*advances, *[None] * 4], strict=False):
        assert_same_table(kernel.process(part), reference.process(part))
        if len(part["ts"]):
            clock = max(clock, int(part["ts"].max()))
        if step is not None:
            clock += step
            assert_same_table(kernel.advance(clock), reference.advance(clock))
    assert_same_table(kernel.advance(clock + 100 * H), reference.advance(clock + 100 * H))
    assert_same_counters(kernel, reference)


# ---------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(("body", "message", "text"), [
    ('after = { rule = "nope", within = "1h" }', "no rule with this id", "nope"),
    ('after = { rule = "x", within = "1h" }', "cannot follow itself", "x"),
    ('after = { rule = "x" }', "takes exactly rule and within", None),
    ('after = { rule = "y", within = "0s" }', "'within' must be positive", None),
    ('absence = { within = "1h" }', "takes on, within", None),
    ('absence = { on = "recharge", within = "-1h" }', "absence.within", None),
    ('absence = { on = "nothing", within = "1h" }', "unknown event kind", "nothing"),
    ('absence = { on = "recharge", where = "amout > 0", within = "1h" }', "unknown column", "amout > 0"),
    ("shadow = 1", "'shadow' must be true or false", "1"),
])
def test_bad_sequences_are_refused_with_rule_and_text(body, message, text):
    rules = f'[[rule]]\nid = "x"\non = "call_out"\nchannels = ["sms"]\n{body}\n'
    with pytest.raises(RulesError) as info:
        parse_rules(rules, "rules.toml")
    assert "rules.toml" in str(info.value) and "'x'" in str(info.value)
    assert message in str(info.value)
    if text is not None:
        assert text in str(info.value)


# ---------------------------------------------------------------------------
# kairos check


def test_check_explains_after_absence_and_shadow_and_warns_of_after_cycles(tmp_path, capsys):
    from engine.cli import main

    text = LOW_BALANCE + ROAMING + """
[[rule]]
id = "ping"
on = "sms_out"
after = { rule = "pong", within = "1h" }
channels = ["sms"]
shadow = true

[[rule]]
id = "pong"
on = "sms_in"
after = { rule = "ping", within = "1h" }
channels = ["sms"]
"""
    path = tmp_path / "rules.toml"
    path.write_text(text)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("absence: starts a timer; fires 2h later unless recharge where amount > 0 comes first" in out)
    assert "after: rule welcome matched on an earlier event within 2h" in out
    assert "shadow     runs on live traffic and counts what it would send; sends nothing" in out
    assert "never fires: each rule of ping -> pong -> ping needs the next to have matched first" in out
    assert "never fires: each rule of pong -> ping -> pong needs the next to have matched first" in out
    assert "first_call_abroad" in out and out.count("never fires") == 2
