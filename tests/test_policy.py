"""The contact policy (SPEC sections 4, 6 and 8), edge by edge, on both implementations.

Every test runs on the compiled Engine and on the plain-Python
ReferenceEngine; expectations are worked out from the specification.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest

from engine import Engine, parse_rules
from engine.policy import holdout_hash, holdout_seed, holdout_threshold
from engine.reference import ReferenceEngine
from tests.conftest import make_batch

S = 1000
M = 60 * S
H = 60 * M
D = 24 * H
SUB = 8613800138000
OTHER = 8613800138001
CALL = 0


def at(text: str, zone: str = "UTC") -> int:
    """ms since the epoch of a local wall time 'YYYY-MM-DD HH:MM' in zone."""
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp() * 1000)


def ev(ts: int, msisdn: int = SUB, kind: int = CALL, **columns: int) -> dict[str, int]:
    return {"ts": ts, "msisdn": msisdn, "kind": kind, **columns}


def rule(rule_id: str, on: str = "call_out", **fields: str) -> str:
    lines = ["[[rule]]", f'id = "{rule_id}"', f'on = "{on}"']
    fields.setdefault("channels", '["sms"]')
    lines += [f"{key} = {value}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def profiles(*rows: dict) -> pa.Table:
    names = sorted({k for row in rows for k in row})
    types = {"msisdn": pa.int64(), "opt_out": pa.bool_(), "channels": pa.list_(pa.string()),
             "opt_out_channels": pa.list_(pa.string()), "contact_days": pa.list_(pa.int64())}
    return pa.table({n: pa.array([row.get(n) for row in rows], types[n]) for n in names})


@pytest.fixture(params=["kernel", "reference"])
def make(request):
    def make(text: str, profile_table: pa.Table | None = None):
        if request.param == "kernel":
            return Engine(parse_rules(text), profiles=profile_table)
        return ReferenceEngine(parse_rules(text), profiles=profile_table)

    return make


def run(engine, rows: list[dict[str, int]]) -> list[dict]:
    return engine.process(make_batch(rows)).to_pylist()


def stopped(engine, rule_id: str) -> dict[str, int]:
    return {k: v for k, v in engine.stats()["rules"][rule_id]["stopped"].items() if v}


# ---------------------------------------------------------------------------
# 1. Opt-out


def test_profile_opt_out_stops_every_matching_rule_before_arbitration(make):
    engine = make(rule("a", priority="2") + rule("b", priority="1"), profiles({"msisdn": SUB, "opt_out": True}))
    out = run(engine, [ev(0), ev(1, OTHER)])
    assert [(r["msisdn"], r["rule"]) for r in out] == [(OTHER, "a")]
    assert stopped(engine, "a") == {"opt_out": 1}
    assert stopped(engine, "b") == {"opt_out": 1, "arbitrated": 1}


def test_feedback_opt_out_applies_to_what_is_processed_after_it(make):
    engine = make(rule("a") + rule("b", on="sms_out"))
    first = run(engine, [ev(0)])
    assert engine.feedback(first[0]["id"], "opt_out", 5) == {"applied": 1, "unknown": 0, "invalid": 0}
    out = run(engine, [ev(10), ev(11, kind=2), ev(12, OTHER)])
    assert [(r["msisdn"], r["rule"]) for r in out] == [(OTHER, "a")]
    assert stopped(engine, "a") == {"opt_out": 1}
    assert stopped(engine, "b") == {"opt_out": 1}
    assert engine.stats()["rules"]["a"]["feedback"]["opt_out"] == 1


def test_channel_opt_out_removes_that_channel_only(make):
    text = rule("a", channels='["sms", "portal"]')
    engine = make(text, profiles({"msisdn": SUB, "opt_out_channels": ["sms"]},
                                 {"msisdn": OTHER, "opt_out_channels": ["sms", "portal"]}))
    out = run(engine, [ev(0), ev(1, OTHER)])
    assert [(r["msisdn"], r["channel"]) for r in out] == [(SUB, "portal")]
    assert stopped(engine, "a") == {"no_channel": 1}


def test_profile_channel_preference_and_missing_means_all(make):
    text = rule("a", channels='["sms", "mms", "crm"]')
    engine = make(text, profiles({"msisdn": SUB, "channels": ["crm", "mms"]}, {"msisdn": OTHER, "channels": None}))
    out = run(engine, [ev(0), ev(1, OTHER), ev(2, 77)])
    assert [r["channel"] for r in out] == ["mms", "sms", "sms"]
    assert engine.stats()["rules"]["a"]["sent_by_channel"] == {"sms": 2, "mms": 1, "crm": 0}


def test_profile_accepting_no_channel_of_the_rule_is_no_channel(make):
    engine = make(rule("a"), profiles({"msisdn": SUB, "channels": ["crm"]}))
    assert run(engine, [ev(0)]) == []
    assert stopped(engine, "a") == {"no_channel": 1}


def test_empty_profile_lists_state_no_preference(make):
    # channels = [] is not "no channel": like a missing value it accepts all; [] refuses none and keeps the days
    engine = make(rule("a", channels='["sms", "portal"]'),
                  profiles({"msisdn": SUB, "channels": [], "opt_out_channels": [], "contact_days": []},
                           {"msisdn": OTHER, "channels": ["portal"], "opt_out_channels": [], "contact_days": []}))
    out = run(engine, [ev(0), ev(1, OTHER)])
    assert [(r["msisdn"], r["channel"]) for r in out] == [(SUB, "sms"), (OTHER, "portal")]
    assert stopped(engine, "a") == {}


# ---------------------------------------------------------------------------
# 2. Suppression and decline cooldown


def test_accepted_suppresses_the_rule_for_good_on_every_channel(make):
    engine = make(rule("a", channels='["sms", "portal"]') + rule("b", priority="-1"))
    first = run(engine, [ev(0)])
    engine.feedback([first[0]["id"]], ["accepted"], [1])
    out = run(engine, [ev(10 * 365 * D), ev(10 * 365 * D + 1, OTHER)])
    # a is suppressed for SUB (so b, lower priority, wins); OTHER still gets a.
    assert [(r["msisdn"], r["rule"]) for r in out] == [(SUB, "b"), (OTHER, "a")]
    assert stopped(engine, "a") == {"suppressed": 1}
    assert stopped(engine, "b") == {"arbitrated": 2}


def test_declined_rests_the_rule_from_the_feedback_time(make):
    text = '[policy]\ndecline_cooldown = "1d"\n' + rule("a") + rule("b", decline_cooldown='"2h"', on="sms_out")
    engine = make(text)
    ids = [r["id"] for r in run(engine, [ev(0), ev(1, kind=2)])]
    engine.feedback(ids, ["declined", "declined"], [10 * H, 10 * H])
    out = run(engine, [ev(12 * H - 1, kind=2), ev(12 * H, kind=2), ev(34 * H - 1), ev(34 * H)])
    assert [(r["rule"], r["ts"]) for r in out] == [("b", 12 * H), ("a", 34 * H)]
    assert stopped(engine, "a") == {"decline_cooldown": 1}
    assert stopped(engine, "b") == {"decline_cooldown": 1}


def test_steps_one_to_three_apply_to_each_rule_before_arbitration(make):
    engine = make(rule("high", priority="9", cooldown='"1h"') + rule("low", priority="1"))
    out = run(engine, [ev(0), ev(1)])
    assert [r["rule"] for r in out] == ["high", "low"]
    assert stopped(engine, "high") == {"cooldown": 1}
    assert stopped(engine, "low") == {"arbitrated": 1}


def test_a_winner_stopped_later_is_not_replaced(make):
    text = rule("high", priority="9", channels='["mms"]') + rule("low", priority="1")
    engine = make(text, profiles({"msisdn": SUB, "opt_out_channels": ["mms"]}))
    assert run(engine, [ev(0)]) == []
    assert stopped(engine, "high") == {"no_channel": 1}
    assert stopped(engine, "low") == {"arbitrated": 1}
    # Losers start no cooldown, and a stopped winner is no instruction: no cooldown either.
    assert engine.stats()["rules"]["low"]["sent"] == 0


# ---------------------------------------------------------------------------
# 6. Caps, by local day and month of delivery


def test_daily_cap_counts_across_rules_by_local_day(make):
    text = '[policy]\ntimezone = "America/New_York"\ndaily_cap = 2\n' + rule("a") + rule("b", on="sms_out")
    engine = make(text)
    zone = "America/New_York"
    rows = [ev(at("2024-06-03 08:00", zone)), ev(at("2024-06-03 20:00", zone), kind=2),
            ev(at("2024-06-03 23:59", zone)),  # third that local day: capped (03:59 UTC the next day)
            ev(at("2024-06-04 00:01", zone), kind=2)]
    out = run(engine, rows)
    assert [r["ts"] for r in out] == [rows[0]["ts"], rows[1]["ts"], rows[3]["ts"]]
    assert stopped(engine, "a") == {"capped": 1}


def test_caps_count_by_the_day_of_not_before(make):
    text = '[policy]\ndaily_cap = 1\nquiet_hours = "21:00-09:00"\n' + rule("a") + rule("b", on="sms_out")
    engine = make(text)
    out = run(engine, [ev(at("2024-06-03 22:00")), ev(at("2024-06-04 08:00"), kind=2),
                       ev(at("2024-06-04 10:00"), kind=2)])
    # 22:00 is delivered 06-04 09:00: it is 06-04's one instruction.
    assert [(r["rule"], r["not_before"]) for r in out] == [("a", at("2024-06-04 09:00"))]
    assert stopped(engine, "b") == {"capped": 2}


def test_monthly_cap_and_passive_channels_do_not_count(make):
    text = ('[policy]\nmonthly_cap = 2\nquiet_hours = "21:00-09:00"\n' + rule("a") +
            rule("p", on="sms_out", channels='["portal"]'))
    engine = make(text)
    days = [at(f"2024-02-{d:02d} 22:00") for d in (1, 10, 20, 28)] + [at("2024-02-29 23:00")]
    out = run(engine, [ev(t) for t in days] + [ev(days[-1] + 1, kind=2)])
    # 02-29 23:00 is delivered 03-01 09:00: March's first.
    assert [(r["rule"], r["not_before"]) for r in out] == [
        ("a", at("2024-02-02 09:00")), ("a", at("2024-02-11 09:00")), ("a", at("2024-03-01 09:00")),
        ("p", days[-1] + 1)]
    assert stopped(engine, "a") == {"capped": 2}


def test_holdout_instructions_count_toward_caps_and_cooldown(make):
    text = '[policy]\ndaily_cap = 1\n' + rule("a", holdout="0.999999", cooldown='"1h"') + rule("b", on="sms_out")
    engine = make(text)
    out = run(engine, [ev(0), ev(10), ev(20, kind=2)])
    assert [(r["rule"], r["holdout"]) for r in out] == [("a", True)]
    assert stopped(engine, "a") == {"cooldown": 1}
    assert stopped(engine, "b") == {"capped": 1}
    figures = engine.stats()["rules"]["a"]
    assert (figures["sent"], figures["holdout"], figures["sent_by_channel"]) == (0, 1, {"sms": 0})


# ---------------------------------------------------------------------------
# 7. Quiet hours and contact days


@pytest.mark.parametrize(("local", "expected"), [
    ("2024-06-05 20:59", "2024-06-05 20:59"),
    ("2024-06-05 21:00", "2024-06-06 09:00"),
    ("2024-06-05 23:30", "2024-06-06 09:00"),
    ("2024-06-06 00:00", "2024-06-06 09:00"),
    ("2024-06-06 08:59", "2024-06-06 09:00"),
    ("2024-06-06 09:00", "2024-06-06 09:00"),
    ("2024-06-08 10:00", "2024-06-10 09:00"),  # Saturday 10:00, contact days Mon-Fri: Monday 09:00
    ("2024-06-07 22:00", "2024-06-10 09:00"),  # Friday night: Monday morning
])
def test_quiet_hours_wrap_midnight_and_contact_days(make, local, expected):
    zone = "Asia/Shanghai"
    text = f'[policy]\ntimezone = "{zone}"\nquiet_hours = "21:00-09:00"\ncontact_days = [1, 2, 3, 4, 5]\n' + rule("a")
    (out,) = run(make(text), [ev(at(local, zone))])
    assert out["not_before"] == at(expected, zone)


def test_quiet_hours_within_one_day_and_passive_channels(make):
    text = '[policy]\nquiet_hours = "12:00-13:30"\n' + rule("a") + rule("p", on="sms_out", channels='["crm"]')
    out = run(make(text), [ev(at("2024-06-05 12:10")), ev(at("2024-06-05 12:20"), kind=2)])
    assert [r["not_before"] for r in out] == [at("2024-06-05 13:30"), at("2024-06-05 12:20")]


def test_profile_contact_days_replace_the_policy_days(make):
    text = '[policy]\ncontact_days = [1, 2, 3, 4, 5]\n' + rule("a")
    engine = make(text, profiles({"msisdn": SUB, "contact_days": [6]}, {"msisdn": OTHER, "contact_days": []}))
    out = run(engine, [ev(at("2024-06-05 10:00")), ev(at("2024-06-05 10:00"), OTHER)])  # a Wednesday
    assert [r["not_before"] for r in out] == [at("2024-06-08 00:00"), at("2024-06-05 10:00")]


def test_quiet_hours_on_dst_days(make):
    zone = "Europe/Berlin"
    text = f'[policy]\ntimezone = "{zone}"\nquiet_hours = "00:00-02:30"\n' + rule("a")
    # 2024-03-31: 02:00 CET jumps to 03:00 CEST, so 02:30 never happens: allowed from the jump on.
    # 2024-10-27: 03:00 CEST falls back to 02:00 CET: the first 02:30 (CEST) ends the quiet hours.
    spring = at("2024-03-31 00:30", zone)
    autumn = at("2024-10-27 00:30", zone)
    out = run(make(text), [ev(spring), ev(autumn)])
    assert out[0]["not_before"] == at("2024-03-31 01:00", "UTC")
    assert out[1]["not_before"] == at("2024-10-27 00:30", "UTC")


def test_daily_cap_on_a_dst_day_uses_the_local_day(make):
    zone = "Europe/Berlin"
    text = f'[policy]\ntimezone = "{zone}"\ndaily_cap = 1\n' + rule("a")
    # Local midnight on 2024-10-27 is 22:00 UTC the day before; the day lasts 25 hours.
    out = run(make(text), [ev(at("2024-10-26 23:30", zone)), ev(at("2024-10-27 00:10", zone)),
                           ev(at("2024-10-27 23:50", zone)), ev(at("2024-10-28 00:00", zone))])
    assert [r["ts"] for r in out] == [at("2024-10-26 23:30", zone), at("2024-10-27 00:10", zone),
                                      at("2024-10-28 00:00", zone)]


# ---------------------------------------------------------------------------
# 8. Holdout


def test_holdout_is_deterministic_per_subscriber_and_rule(make):
    text = rule("a", holdout="0.3")
    subscribers = list(range(1, 2001))
    out = run(make(text), [ev(i, m) for i, m in enumerate(subscribers)])
    flags = {r["msisdn"]: r["holdout"] for r in out}
    threshold, seed = holdout_threshold(0.3), holdout_seed("a")
    assert flags == {m: holdout_hash(m, seed) < threshold for m in subscribers}
    assert 0.25 < sum(flags.values()) / len(flags) < 0.35
    again = run(make(text), [ev(5, m) for m in subscribers[:50]])
    assert [r["holdout"] for r in again] == [flags[m] for m in subscribers[:50]]


# ---------------------------------------------------------------------------
# Guardrail


def test_guardrail_pauses_a_rule_over_its_hourly_maximum(make):
    text = rule("a", max_per_hour="2") + rule("b", priority="-1")
    engine = make(text)
    out = run(engine, [ev(0, 1), ev(10, 2), ev(H - 1, 3), ev(2 * H, 4)])
    # The third within an hour pauses a; b, lower priority, takes the later events.
    assert [(r["msisdn"], r["rule"]) for r in out] == [(1, "a"), (2, "a"), (4, "b")]
    assert stopped(engine, "a") == {"paused": 2}
    assert engine.stats()["rules"]["a"]["paused"] is True
    engine.resume("a")
    assert [r["rule"] for r in run(engine, [ev(3 * H, 5)])] == ["a"]
    assert engine.stats()["rules"]["a"]["paused"] is False


def test_guardrail_counts_a_sliding_hour(make):
    engine = make(rule("a", max_per_hour="2"))
    out = run(engine, [ev(0, 1), ev(10, 2), ev(H, 3), ev(H + 10, 4), ev(H + 11, 5)])
    assert [r["msisdn"] for r in out] == [1, 2, 3, 4]
    assert stopped(engine, "a") == {"paused": 1}


def test_guardrail_pause_is_logged(caplog):
    engine = Engine.from_text(rule("a", max_per_hour="1"))
    with caplog.at_level("WARNING", logger="kairos.engine"):
        engine.process(make_batch([ev(0, 1), ev(1, 2)]))
    assert "rule 'a' paused" in caplog.text
    assert engine.stats()["guardrail_pauses"] == 1


# ---------------------------------------------------------------------------
# Feedback and goals


def test_feedback_unknown_and_invalid_are_counted_never_fatal(make):
    engine = make(rule("a"))
    (first,) = run(engine, [ev(0)])
    result = engine.feedback([first["id"], "0" * 32, first["id"]], ["delivered", "accepted", "clicked"], [1, 1, 1])
    assert result == {"applied": 1, "unknown": 1, "invalid": 1}
    assert engine.stats()["rules"]["a"]["feedback"]["delivered"] == 1


def test_goal_converts_the_earliest_open_instruction_once(make):
    text = rule("a", channels='["portal"]', goal='{ on = "recharge", where = "amount >= 100", within = "1h" }')
    engine = make(text)
    run(engine, [ev(0), ev(10)])  # two open instructions of a for SUB
    run(engine, [ev(0, kind=6, amount=500),  # same ts as the first: not after it
                 ev(5, kind=6, amount=50),  # fails the goal's where
                 ev(20, kind=6, amount=500),  # converts the one at 0
                 ev(30, kind=6, amount=500),  # converts the one at 10
                 ev(40, kind=6, amount=500)])  # nothing left open
    assert engine.stats()["rules"]["a"]["goal"] == {"treated": 2, "holdout": 0}


def test_goal_window_is_half_open_and_holdout_converts_too(make):
    text = rule("a", holdout="0.999999", goal='{ on = "recharge", within = "1h" }')
    engine = make(text)
    run(engine, [ev(0), ev(0, OTHER)])
    run(engine, [ev(H, kind=6), ev(H + 1, OTHER, kind=6)])
    figures = engine.stats()["rules"]["a"]
    assert figures["goal"] == {"treated": 0, "holdout": 1}
    assert figures["rates"]["holdout_conversion"] == 0.5
    assert figures["rates"]["conversion"] is None


def test_uplift_is_treated_minus_holdout_conversion(make):
    text = rule("a", holdout="0.5", goal='{ on = "recharge", within = "1d" }')
    subscribers = list(range(1, 201))
    engine = make(text)
    out = run(engine, [ev(0, m) for m in subscribers])
    treated = [r["msisdn"] for r in out if not r["holdout"]]
    held = [r["msisdn"] for r in out if r["holdout"]]
    # Every treated subscriber recharges, a quarter of the holdout ones do.
    run(engine, [ev(H, m, kind=6) for m in treated + held[: len(held) // 4]])
    rates = engine.stats()["rules"]["a"]["rates"]
    assert rates["conversion"] == 1.0
    assert rates["holdout_conversion"] == (len(held) // 4) / len(held)
    assert rates["uplift"] == pytest.approx(1.0 - (len(held) // 4) / len(held))


def test_goal_records_are_recycled_when_windows_close():
    """Thousands of open instructions: the kernel's record pool sweeps closed windows and still agrees."""
    text = rule("a", goal='{ on = "recharge", within = "1h" }') + rule("b", on="sms_out", holdout="0.5",
                                                                       goal='{ on = "recharge", within = "3h" }')
    rows = []
    for i in range(5000):
        t = i * 10 * S
        rows.append(ev(t, 1000 + i % 1500, kind=CALL if i % 3 else 2))
        if i % 7 == 0:
            rows.append(ev(t + 5 * S, 1000 + (i * 13) % 1500, kind=6))
    kernel, reference = Engine.from_text(text), ReferenceEngine(parse_rules(text))
    for start in range(0, len(rows), 997):
        part = make_batch(rows[start:start + 997])
        assert kernel.process(part).equals(reference.process(part))
    assert kernel.stats()["rules"] == reference.stats()["rules"]
    assert kernel.stats()["rules"]["a"]["goal"]["treated"] > 50
