"""Active periods (SPEC sections 3 and 8), edge by edge, on both implementations.

A rule matches only when its trigger's local time, in [policy] timezone, is
inside its active period: from/until local dates both inclusive, ISO
weekdays, hours [start, end) wrapping midnight when start > end.  Outside
it the rule does not match (not counted as matched, no policy stop), while
its condition state still moves with every event passing on + where.
Expectations are worked out by hand from local wall-clock times.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from engine import KIND_CODES, RulesError, parse_rules

SUB = 8613800138000
H = 3_600_000


def at(text: str, zone: str) -> int:
    """ms since the epoch of local wall time `text` (ISO, no offset) in `zone`."""
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp() * 1000)


def rules(active: str, zone: str = "Asia/Shanghai", extra: str = "") -> str:
    return (f'[policy]\ntimezone = "{zone}"\n\n[[rule]]\nid = "promo"\non = "call_out"\nchannels = ["portal"]\n'
            f"active = {{ {active} }}\n{extra}")


def ev(ts: int) -> dict[str, int]:
    return {"ts": ts, "msisdn": SUB, "kind": KIND_CODES["call_out"]}


@pytest.fixture
def fires(implementation, batch):
    """fires(rules_text, [local times], zone) -> which of those events made an instruction."""

    def fires(text: str, times: list[str], zone: str = "Asia/Shanghai") -> list[bool]:
        engine = implementation(text)
        stamps = [at(t, zone) for t in times]
        got = {row["ts"] for row in engine.process(batch([ev(ts) for ts in stamps])).to_pylist()}
        return [ts in got for ts in stamps]

    return fires


def test_from_and_until_are_local_dates_both_inclusive(fires):
    text = rules('from = "2026-12-01", until = "2026-12-31"')
    times = ["2026-11-30T23:59:59.999", "2026-12-01T00:00:00", "2026-12-31T23:59:59.999", "2027-01-01T00:00:00"]
    assert fires(text, times) == [False, True, True, False]


def test_dates_are_local_not_utc(fires):
    # 2026-12-01 00:30 in Shanghai is 2026-11-30 16:30 UTC: inside the period, although its UTC date is not.
    text = rules('from = "2026-12-01"')
    assert fires(text, ["2026-12-01T00:30:00", "2026-11-30T23:30:00"]) == [True, False]


def test_hours_end_is_exclusive(fires):
    text = rules('hours = "09:00-21:00"')
    times = ["2026-12-02T08:59:59.999", "2026-12-02T09:00:00", "2026-12-02T20:59:59.999", "2026-12-02T21:00:00"]
    assert fires(text, times) == [False, True, True, False]


def test_hours_wrap_midnight(fires):
    text = rules('hours = "22:00-06:00"')
    times = ["2026-12-02T21:59:59", "2026-12-02T22:00:00", "2026-12-03T00:00:00", "2026-12-03T05:59:59.999",
             "2026-12-03T06:00:00", "2026-12-03T12:00:00"]
    assert fires(text, times) == [False, True, True, True, False, False]


def test_weekdays_are_local_across_a_utc_date_change(fires):
    # Monday 2026-12-07 07:00 in Shanghai is Sunday 23:00 UTC; Sunday 23:30 in Shanghai is Sunday 15:30 UTC.
    text = rules("days = [1]")
    assert fires(text, ["2026-12-07T07:00:00", "2026-12-06T23:30:00", "2026-12-08T00:00:00"]) == [True, False, False]


def test_weekdays_and_hours_west_of_utc(fires):
    # Friday 2026-12-04 20:00 in New York is Saturday 01:00 UTC: still a Friday evening for the rule.
    text = rules('days = [5], hours = "18:00-23:00"', zone="America/New_York")
    times = ["2026-12-04T20:00:00", "2026-12-05T20:00:00", "2026-12-04T17:00:00"]
    assert fires(text, times, zone="America/New_York") == [True, False, False]


def test_hours_follow_wall_clock_across_a_dst_change(fires):
    # Berlin moves from UTC+1 to UTC+2 on 2024-03-31 at 02:00 local: 09:00 is 08:00 UTC before, 07:00 UTC after.
    text = rules('hours = "09:00-10:00"', zone="Europe/Berlin")
    times = ["2024-03-30T09:30:00", "2024-03-31T09:30:00", "2024-03-31T08:59:00", "2024-03-31T10:00:00"]
    assert fires(text, times, zone="Europe/Berlin") == [True, True, False, False]


def test_every_part_together(fires):
    text = rules('from = "2026-12-01", until = "2026-12-31", days = [1, 2, 3, 4, 5], hours = "09:00-21:00"')
    times = ["2026-12-02T10:00:00",   # Wednesday, inside
             "2026-12-05T10:00:00",   # Saturday
             "2026-12-02T21:30:00",   # after hours
             "2027-01-04T10:00:00"]   # Monday after until
    assert fires(text, times) == [True, False, False, False]


def test_empty_days_or_hours_never_match(fires):
    assert fires(rules("days = []"), ["2026-12-02T10:00:00"]) == [False]
    assert fires(rules('hours = "12:00-12:00"'), ["2026-12-02T12:00:00"]) == [False]


def test_out_of_period_is_not_a_match_and_no_stop(implementation, batch):
    engine = implementation(rules('hours = "09:00-21:00"'))
    engine.process(batch([ev(at("2026-12-02T08:00:00", "Asia/Shanghai")),
                          ev(at("2026-12-02T10:00:00", "Asia/Shanghai"))]))
    counters = engine.stats()["rules"]["promo"]
    assert counters["matched"] == 1 and counters["sent"] == 1
    assert sum(counters["stopped"].values()) == 0


def test_condition_state_moves_outside_the_period(implementation, batch):
    # count needs 2 within 1d: the call at 08:00 (outside the hours) still counts toward the one at 10:00.
    text = rules('hours = "09:00-21:00"', extra='count = { at_least = 2, within = "1d" }\n')
    engine = implementation(text)
    rows = engine.process(batch([ev(at("2026-12-02T08:00:00", "Asia/Shanghai")),
                                 ev(at("2026-12-02T10:00:00", "Asia/Shanghai"))])).to_pylist()
    assert [r["ts"] for r in rows] == [at("2026-12-02T10:00:00", "Asia/Shanghai")]
    assert engine.stats()["rules"]["promo"]["matched"] == 1


def test_first_state_moves_outside_the_period(implementation, batch):
    # first within 1d: the 08:00 call is the first, outside the hours; the 10:00 call is not a first.
    text = rules('hours = "09:00-21:00"', extra='first = { within = "1d" }\n')
    engine = implementation(text)
    rows = engine.process(batch([ev(at("2026-12-02T08:00:00", "Asia/Shanghai")),
                                 ev(at("2026-12-02T10:00:00", "Asia/Shanghai"))])).to_pylist()
    assert rows == []


def test_out_of_period_rule_does_not_take_part_in_arbitration(implementation, batch):
    text = ('[policy]\ntimezone = "UTC"\n\n'
            '[[rule]]\nid = "night"\non = "call_out"\nchannels = ["portal"]\npriority = 9\n'
            'active = { hours = "22:00-06:00" }\n\n'
            '[[rule]]\nid = "any"\non = "call_out"\nchannels = ["portal"]\n')
    engine = implementation(text)
    rows = engine.process(batch([ev(at("2026-12-02T12:00:00", "UTC"))])).to_pylist()
    assert [r["rule"] for r in rows] == ["any"]
    assert engine.stats()["rules"]["any"]["stopped"]["arbitrated"] == 0


@pytest.mark.parametrize(("active", "reason"), [
    ('from = "2026-13-01"', "active.from"),
    ('until = "tomorrow"', "active.until"),
    ("from = 2026-12-01T10:00:00", "active.from"),
    ("days = [0, 1]", "active.days"),
    ('hours = "9-21"', "active.hours"),
    ('hours = "09:00-24:00"', "active.hours"),
    ('start = "2026-12-01"', "'active' takes"),
])
def test_malformed_active_periods_name_rule_and_text(active, reason):
    with pytest.raises(RulesError) as info:
        parse_rules(rules(active), source="campaigns/x.toml")
    message = str(info.value)
    assert "campaigns/x.toml" in message and "'promo'" in message and reason in message


def test_toml_dates_are_accepted_like_strings():
    assert parse_rules(rules("from = 2026-12-01")).rules[0].active == parse_rules(
        rules('from = "2026-12-01"')).rules[0].active
