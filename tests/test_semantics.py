"""SPEC section 8, edge by edge, on both implementations.

Every test takes the `implementation` fixture (tests/conftest.py), a factory
from rules text to either the compiled Engine or the plain-Python
ReferenceEngine, so the same assertions hold both to the specification.
Expectations are worked out from the specification in each test, never
copied from a run.
"""

from __future__ import annotations

import re

import pytest

from engine import INSTRUCTION_SCHEMA, KIND_CODES

S = 1000  # one second in ms
H = 3600 * S
T0 = 1_700_000_000_000  # an arbitrary event time, ms since the epoch
SUB = 8613800138000
OTHER = 8613800138001


def ev(ts: int, msisdn: int = SUB, kind: str = "call_out", **columns: int) -> dict[str, int]:
    return {"ts": ts, "msisdn": msisdn, "kind": KIND_CODES[kind], **columns}


def rule(rule_id: str, on: str = "call_out", **fields: str) -> str:
    """One [[rule]] table; values in `fields` are TOML text."""
    lines = ["[[rule]]", f'id = "{rule_id}"', f'on = "{on}"']
    fields.setdefault("channels", '["sms"]')
    lines += [f"{key} = {value}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def run(implementation, batch):
    """run(rules_text, rows, ...) -> (instructions as a list of dicts, engine).

    Each further argument after `rows` is another batch, processed in order.
    """

    def run(text: str, *batches: list[dict[str, int]]):
        engine = implementation(text)
        rows = []
        for rows_of_batch in batches:
            table = engine.process(batch(rows_of_batch))
            assert table.schema == INSTRUCTION_SCHEMA
            rows += table.to_pylist()
        return rows, engine

    return run


def counters(engine, rule_id: str) -> tuple[int, int, int, int]:
    c = engine.stats()["rules"][rule_id]
    return c["matched"], c["sent"], c["stopped"]["cooldown"], c["stopped"]["arbitrated"]


# ---------------------------------------------------------------------------
# count


HOTLINE = rule("hotline", where='"peer in [12122, 96122]"', count='{ at_least = 2, within = "10s" }',
               params='["peer"]')


def test_count_window_is_half_open(run):
    # The second call is exactly W after the first: the first is outside (t - W, t].
    out, engine = run(HOTLINE, [ev(T0, peer=12122), ev(T0 + 10 * S, peer=12122)])
    assert out == []
    assert counters(engine, "hotline") == (0, 0, 0, 0)


def test_count_window_includes_an_event_just_inside(run):
    out, engine = run(HOTLINE, [ev(T0, peer=12122), ev(T0 + 10 * S - 1, peer=96122)])
    assert [r["ts"] for r in out] == [T0 + 10 * S - 1]
    assert counters(engine, "hotline") == (1, 1, 0, 0)


def test_count_includes_the_current_event_and_same_ts_events(run):
    out, _ = run(HOTLINE, [ev(T0, peer=12122), ev(T0, peer=12122)])
    assert [r["ts"] for r in out] == [T0]


def test_count_is_per_subscriber_and_only_counts_qualifying_events(run):
    rows = [
        ev(T0, peer=12122),
        ev(T0 + 1, msisdn=OTHER, peer=12122),  # another subscriber
        ev(T0 + 2, peer=555),  # fails where
        ev(T0 + 3, kind="sms_out", peer=12122),  # fails on
        ev(T0 + 4, msisdn=OTHER, peer=96122),  # OTHER's second: matches
        ev(T0 + 5, peer=96122),  # SUB's second: matches
    ]
    out, engine = run(HOTLINE, rows)
    assert [(r["ts"], r["msisdn"]) for r in out] == [(T0 + 4, OTHER), (T0 + 5, SUB)]
    assert counters(engine, "hotline") == (2, 2, 0, 0)


def test_fourth_hotline_call_in_the_window_matches_again(run):
    text = rule("hotline", where='"peer in [12122]"', count='{ at_least = 3, within = "1h" }')
    out, engine = run(text, [ev(T0 + i * S, peer=12122) for i in range(4)])
    assert [r["ts"] for r in out] == [T0 + 2 * S, T0 + 3 * S]
    assert counters(engine, "hotline") == (2, 2, 0, 0)


def test_count_window_slides(run):
    text = rule("hotline", count='{ at_least = 3, within = "10s" }')
    times = [T0, T0 + 4 * S, T0 + 8 * S, T0 + 12 * S, T0 + 20 * S, T0 + 30 * S]
    # Windows (t - 10s, t] hold: 1, 2, 3, 3 (4s, 8s, 12s), 2 (12s, 20s), 1.
    out, _ = run(text, [ev(t) for t in times])
    assert [r["ts"] for r in out] == [T0 + 8 * S, T0 + 12 * S]


# ---------------------------------------------------------------------------
# first

FIRST = rule("roam", on="location", where='"mcc in [454, 455]"', first='{ within = "10s" }')


def test_first_fires_on_the_first_event(run):
    out, engine = run(FIRST, [ev(T0, kind="location", mcc=454)])
    assert [r["ts"] for r in out] == [T0]
    assert counters(engine, "roam") == (1, 1, 0, 0)


def test_first_does_not_fire_after_a_gap_of_exactly_w(run):
    out, _ = run(FIRST, [ev(T0, kind="location", mcc=454), ev(T0 + 10 * S, kind="location", mcc=455)])
    assert [r["ts"] for r in out] == [T0]


def test_first_fires_after_a_gap_of_w_plus_one(run):
    out, _ = run(FIRST, [ev(T0, kind="location", mcc=454), ev(T0 + 10 * S + 1, kind="location", mcc=455)])
    assert [r["ts"] for r in out] == [T0, T0 + 10 * S + 1]


def test_first_gap_is_measured_from_the_latest_qualifying_event(run):
    rows = [
        ev(T0, kind="location", mcc=454),  # fires
        ev(T0 + 6 * S, kind="location", mcc=454),  # within W of T0: no, but moves the state
        ev(T0 + 12 * S, kind="location", mcc=454),  # 6 s after the last: no
        ev(T0 + 14 * S, kind="location", mcc=460),  # fails where: does not move the state
        ev(T0 + 22 * S + 1, kind="location", mcc=455),  # 10 s + 1 after 12 s: fires
    ]
    out, engine = run(FIRST, rows)
    assert [r["ts"] for r in out] == [T0, T0 + 22 * S + 1]
    assert counters(engine, "roam") == (2, 2, 0, 0)


# ---------------------------------------------------------------------------
# changed

CHANGED = rule("handset", on="device", changed='{ column = "imei" }', params='["imei"]')


def test_changed_first_observation_zero_and_change_back(run):
    a, b = 356938035643809, 356938035643817
    rows = [
        ev(T0, kind="device", imei=0),  # unknown: ignored
        ev(T0 + 1, kind="device", imei=a),  # first observation: no
        ev(T0 + 2, kind="device", imei=0),  # ignored, and does not forget a
        ev(T0 + 3, kind="device", imei=a),  # same: no
        ev(T0 + 4, kind="device", imei=b),  # change: fires
        ev(T0 + 5, kind="device", imei=0),  # ignored
        ev(T0 + 6, kind="device", imei=a),  # back to the older value: fires
        ev(T0 + 7, kind="device", msisdn=OTHER, imei=b),  # another subscriber's first: no
    ]
    out, engine = run(CHANGED, rows)
    assert [(r["ts"], dict(r["params"])["imei"]) for r in out] == [(T0 + 4, str(b)), (T0 + 6, str(a))]
    assert counters(engine, "handset") == (2, 2, 0, 0)


def test_changed_of_an_absent_column_never_fires(run):
    out, engine = run(CHANGED, [ev(T0 + i, kind="device") for i in range(3)])
    assert out == []
    assert counters(engine, "handset") == (0, 0, 0, 0)


# ---------------------------------------------------------------------------
# cooldown


def test_cooldown_boundary(run):
    text = rule("low", on="balance", where='"balance < 500"', cooldown='"10s"')
    times = [T0, T0 + 10 * S - 1, T0 + 10 * S, T0 + 20 * S - 1, T0 + 20 * S]
    out, engine = run(text, [ev(t, kind="balance", balance=100) for t in times])
    # Exactly `cooldown` after the last instruction is allowed; 1 ms less is stopped.
    assert [r["ts"] for r in out] == [T0, T0 + 10 * S, T0 + 20 * S]
    assert counters(engine, "low") == (5, 3, 2, 0)


def test_cooldown_is_per_subscriber_and_per_rule(run):
    text = rule("a", cooldown='"1h"') + rule("b", on="sms_out", cooldown='"1h"')
    rows = [ev(T0), ev(T0 + 1, msisdn=OTHER), ev(T0 + 2, kind="sms_out"), ev(T0 + 3)]
    out, engine = run(text, rows)
    assert [(r["ts"], r["rule"]) for r in out] == [(T0, "a"), (T0 + 1, "a"), (T0 + 2, "b")]
    assert counters(engine, "a") == (3, 2, 1, 0)


def test_policy_default_cooldown_and_explicit_zero(run):
    text = '[policy]\ncooldown = "1h"\n\n' + rule("inherits") + rule("zero", on="sms_out", cooldown='"0s"')
    rows = [ev(T0), ev(T0 + 1), ev(T0 + 2, kind="sms_out"), ev(T0 + 3, kind="sms_out")]
    out, _ = run(text, rows)
    assert [(r["ts"], r["rule"]) for r in out] == [(T0, "inherits"), (T0 + 2, "zero"), (T0 + 3, "zero")]


def test_condition_state_moves_when_cooldown_stops_the_match(run):
    text = rule("roam", on="location", first='{ within = "10s" }', cooldown='"1h"')
    rows = [
        ev(T0, kind="location"),  # first: sent
        ev(T0 + 20 * S, kind="location"),  # first again, stopped by cooldown, state moves to 20 s
        ev(T0 + 25 * S, kind="location"),  # 5 s after the stopped one: not a first
        ev(T0 + H + 40 * S, kind="location"),  # first, cooldown over: sent
    ]
    out, engine = run(text, rows)
    assert [r["ts"] for r in out] == [T0, T0 + H + 40 * S]
    assert counters(engine, "roam") == (3, 2, 1, 0)


def test_changed_state_moves_when_cooldown_stops_the_match(run):
    text = rule("handset", on="device", changed='{ column = "imei" }', cooldown='"1h"')
    rows = [
        ev(T0, kind="device", imei=1),
        ev(T0 + 1, kind="device", imei=2),  # change: sent
        ev(T0 + 2, kind="device", imei=3),  # change: stopped by cooldown, last value is now 3
        ev(T0 + 2 * H, kind="device", imei=3),  # no change from 3
        ev(T0 + 3 * H, kind="device", imei=2),  # change: sent
    ]
    out, engine = run(text, rows)
    assert [r["ts"] for r in out] == [T0 + 1, T0 + 3 * H]
    assert counters(engine, "handset") == (3, 2, 1, 0)


# ---------------------------------------------------------------------------
# arbitration

ARBITRATION = (
    rule("low", priority="1", cooldown='"1h"')
    + rule("high", where='"peer == 7"', priority="5")
    + rule("tied", where='"peer == 7"', priority="5")
)


def test_arbitration_highest_priority_wins_losers_start_no_cooldown(run):
    rows = [
        ev(T0, peer=7),  # low, high, tied match: high wins (tie with tied: earlier in file)
        ev(T0 + 1, peer=8),  # only low: it lost at T0, so no cooldown from there: sent
        ev(T0 + 2, peer=8),  # low's own instruction at T0 + 1 stops it
    ]
    out, engine = run(ARBITRATION, rows)
    assert [(r["ts"], r["rule"], r["priority"]) for r in out] == [(T0, "high", 5), (T0 + 1, "low", 1)]
    assert counters(engine, "high") == (1, 1, 0, 0)
    assert counters(engine, "tied") == (1, 0, 0, 1)
    assert counters(engine, "low") == (3, 1, 1, 1)


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_arbitration_tie_goes_to_the_earlier_rule_in_the_file(run, order):
    text = "".join(rule(name, priority="3", template=f'"tpl_{name}"') for name in order)
    out, engine = run(text, [ev(T0)])
    assert [(r["rule"], r["template"]) for r in out] == [(order[0], f"tpl_{order[0]}")]
    assert counters(engine, order[1]) == (1, 0, 0, 1)


def test_negative_priority_loses_to_default_priority(run):
    text = rule("neg", priority="-3") + rule("default")
    out, _ = run(text, [ev(T0)])
    assert [r["rule"] for r in out] == ["default"]


def test_a_rule_stopped_by_cooldown_does_not_take_part_in_arbitration(run):
    text = rule("hi", priority="9", cooldown='"1h"') + rule("lo", priority="1")
    out, engine = run(text, [ev(T0), ev(T0 + 1)])
    assert [(r["ts"], r["rule"]) for r in out] == [(T0, "hi"), (T0 + 1, "lo")]
    assert counters(engine, "hi") == (2, 1, 1, 0)
    assert counters(engine, "lo") == (2, 1, 0, 1)


def test_condition_state_moves_when_arbitration_drops_the_match(run):
    text = rule("vip", priority="9", where='"peer == 7"') + rule("counter", count='{ at_least = 2, within = "1h" }')
    out, engine = run(text, [ev(T0, peer=7), ev(T0 + 1, peer=8)])
    # counter's first event lost arbitration to vip but still counts toward its window.
    assert [(r["ts"], r["rule"]) for r in out] == [(T0, "vip"), (T0 + 1, "counter")]
    assert counters(engine, "counter") == (1, 1, 0, 0)


# ---------------------------------------------------------------------------
# where


@pytest.mark.parametrize(
    ("peer", "matches"),
    [
        (955551234, True),
        (95555, True),
        (9555512345678, True),
        (1095555, False),
        (9555, False),
        (95556, False),
        (0, False),
        (-95555, False),
    ],
)
def test_number_prefix_compares_decimal_digits(run, peer, matches):
    text = rule("bank", where='"peer prefix 95555"')
    out, _ = run(text, [ev(T0, peer=peer)])
    assert len(out) == int(matches)


def test_prefix_zero_value_never_matches_even_when_column_is_absent(run):
    text = rule("bank", where='"peer prefix [1, 9, 95555]"') + rule("not_bank", on="sms_out",
                                                                       where='"not (peer prefix 9)"')
    out, _ = run(text, [ev(T0), ev(T0 + 1, kind="sms_out")])
    assert [r["rule"] for r in out] == ["not_bank"]


def test_where_in_set_not_in_and_precedence(run):
    text = (
        "[sets]\nhotlines = [12122, 96122]\n\n"
        + rule("r", where='"peer in hotlines and duration >= 30 or peer not in [1, 2, 12122, 96122] and not mcc == 0"')
    )
    rows = [
        ev(T0, peer=12122, duration=30),  # first branch
        ev(T0 + 1, peer=96122, duration=29),  # neither
        ev(T0 + 2, peer=5, mcc=460),  # second branch
        ev(T0 + 3, peer=5, mcc=0),  # neither
        ev(T0 + 4, peer=2, mcc=460),  # neither
    ]
    out, _ = run(text, rows)
    assert [r["ts"] for r in out] == [T0, T0 + 2]


# ---------------------------------------------------------------------------
# instructions


def test_instruction_fields_and_params(run):
    text = rule(
        "offer",
        where='"peer == 12122"',
        channels='["portal", "sms"]',
        template='"car_owner"',
        params='["peer", "duration", "mcc", "balance", "kind"]',
        priority="7",
    ) + rule("plain", on="sms_out")
    rows = [ev(T0, peer=12122, duration=45, balance=-5), ev(T0 + 9, kind="sms_out", peer=3)]
    out, _ = run(text, rows)
    assert len(out) == 2
    first, second = out
    assert {k: v for k, v in first.items() if k != "id"} == {
        "ts": T0,
        "msisdn": SUB,
        "rule": "offer",
        "channel": "portal",
        "template": "car_owner",
        "priority": 7,
        "holdout": False,
        "not_before": T0,
        # In the file's order; decimal strings; an absent column (mcc) reads 0.
        "params": [("peer", "12122"), ("duration", "45"), ("mcc", "0"), ("balance", "-5"), ("kind", "0")],
    }
    assert second["rule"] == second["template"] == "plain"  # template defaults to the rule id
    assert second["params"] == []
    assert second["not_before"] == second["ts"] == T0 + 9
    for row in out:
        assert re.fullmatch(r"[0-9a-f]{32}", row["id"])


def test_param_values_are_decimal_text_at_every_width(run):
    # Each digit count, both signs and both ends of int64: the text Arrow's int64 -> string cast gives.
    values = [0, 7, -7, 10, -10, 99, 100, -999, 2**31, -(2**31) - 1, 10**18 - 1, -(10**18), 10**18,
              2**63 - 1, -(2**63), -(2**63) + 1]
    text = rule("offer", params='["balance", "amount", "duration"]')
    rows = [ev(T0 + k, balance=v, amount=-v if v > -(2**63) else 0, duration=-(2**31) if k % 2 else 2**31 - 1)
            for k, v in enumerate(values)]
    out, _ = run(text, rows)
    assert [row["params"] for row in out] == [
        [("balance", str(v)), ("amount", str(-v if v > -(2**63) else 0)),
         ("duration", str(-(2**31) if k % 2 else 2**31 - 1))]
        for k, v in enumerate(values)]


def test_instruction_ids_are_deterministic_and_batch_independent(implementation, batch):
    text = rule("a") + rule("b", on="sms_out") + rule("c", on="data", count='{ at_least = 2, within = "1h" }')
    rows = [
        ev(T0, peer=1),
        ev(T0 + 1, peer=2),
        ev(T0 + 1, kind="sms_out", peer=2),
        ev(T0 + 2, msisdn=OTHER, peer=1),
        ev(T0 + 3, kind="data", volume=5),
        ev(T0 + 4, kind="data", volume=5),
        ev(T0 + 5, peer=1, cell=9),
    ]
    one = implementation(text).process(batch(rows)).column("id").to_pylist()
    again = implementation(text).process(batch(rows)).column("id").to_pylist()
    engine = implementation(text)
    # One batch per event, each with only the columns its event names (absent reads 0).
    split = [engine.process(batch([row])).column("id").to_pylist() for row in rows]
    assert len(one) == 6  # every row but the first data event
    assert one == again == [i for ids in split for i in ids]
    # An id depends on the rule and on the triggering event: all distinct here.
    assert len(set(one)) == len(one)


def test_instruction_id_depends_on_the_rule(implementation, batch):
    one = implementation(rule("a")).process(batch([ev(T0)])).column("id").to_pylist()
    other = implementation(rule("b")).process(batch([ev(T0)])).column("id").to_pylist()
    assert len(one) == len(other) == 1 and one != other


def test_instruction_table_schema(implementation, batch):
    engine = implementation(rule("a", params='["peer"]'))
    for rows in ([], [ev(T0, kind="sms_out")], [ev(T0, peer=4)]):
        table = engine.process(batch(rows))
        assert table.schema == INSTRUCTION_SCHEMA
        assert table.schema.names == [
            "id", "ts", "msisdn", "rule", "channel", "template", "priority", "holdout", "not_before", "params",
        ]
    assert table.num_rows == 1


# ---------------------------------------------------------------------------
# sum and distinct: buckets of `resolution` aligned to multiples of it in event time; the window of an event
# at t holds the buckets that start after t - W, up to t's own (docs/rules.md).

HEAVY = rule("heavy", where='"peer != 0"',
             sum='{ column = "amount", at_least = 100, within = "10s", resolution = "1s" }')
TRAVEL = rule("travel", distinct='{ column = "cell", at_least = 3, within = "10s", resolution = "1s" }')


def test_sum_includes_the_current_event_and_holds_on_every_event(run):
    out, engine = run(HEAVY, [ev(T0, peer=1, amount=100), ev(T0 + 1, peer=1, amount=0), ev(T0 + 2, peer=1, amount=5)])
    assert [r["ts"] for r in out] == [T0, T0 + 1, T0 + 2]
    assert counters(engine, "heavy") == (3, 3, 0, 0)


def test_sum_window_exactly_w_before_is_outside(run):
    out, _ = run(HEAVY, [ev(T0, peer=1, amount=60), ev(T0 + 10 * S, peer=1, amount=60)])
    assert out == []


def test_sum_window_counts_whole_buckets_starting_after_t_minus_w(run):
    # t - W = T0 + 400 falls inside the bucket [T0, T0 + 1s): that bucket is out, though its event is 9.9s back.
    out, _ = run(HEAVY, [ev(T0 + 500, peer=1, amount=60), ev(T0 + 10 * S + 400, peer=1, amount=60)])
    assert out == []
    # t - W = T0 + 999: the bucket starting at T0 + 1s is in, all of it.
    out, _ = run(HEAVY, [ev(T0 + S, peer=1, amount=60), ev(T0 + 11 * S - 1, peer=1, amount=60)])
    assert [r["ts"] for r in out] == [T0 + 11 * S - 1]


def test_sum_counts_only_events_passing_where_and_slides(run):
    out, _ = run(HEAVY, [ev(T0, peer=1, amount=60), ev(T0 + S, peer=0, amount=500), ev(T0 + 2 * S, peer=1, amount=40),
                         ev(T0 + 12 * S, peer=1, amount=60)])
    assert [r["ts"] for r in out] == [T0 + 2 * S]


def test_sum_default_resolution_is_a_twelfth_of_the_window(run):
    text = rule("heavy", sum='{ column = "amount", at_least = 100, within = "12s" }')
    # Buckets of 1s: at T0 + 12s + 999 the window starts with the bucket at T0 + 1s.
    out, _ = run(text, [ev(T0 + 999, amount=60), ev(T0 + S, amount=30), ev(T0 + 12 * S + 999, amount=10)])
    assert out == []
    out, _ = run(text, [ev(T0 + S, amount=60), ev(T0 + 2 * S, amount=30), ev(T0 + 12 * S + 999, amount=10)])
    assert [r["ts"] for r in out] == [T0 + 12 * S + 999]


def test_distinct_ignores_zero_and_repeats(run):
    out, engine = run(TRAVEL, [ev(T0, cell=1), ev(T0 + 1, cell=0), ev(T0 + 2, cell=1), ev(T0 + 3, cell=2),
                               ev(T0 + 4, cell=0), ev(T0 + 5, cell=3), ev(T0 + 6, cell=0)])
    # The third distinct cell arrives at T0 + 5; an event of unknown cell still sees three in the window.
    assert [r["ts"] for r in out] == [T0 + 5, T0 + 6]
    assert counters(engine, "travel") == (2, 2, 0, 0)


def test_distinct_window_edges(run):
    out, _ = run(TRAVEL, [ev(T0, cell=1), ev(T0 + 5 * S, cell=2), ev(T0 + 10 * S, cell=3)])
    assert out == []
    out, _ = run(TRAVEL, [ev(T0, cell=1), ev(T0 + 5 * S, cell=2), ev(T0 + 10 * S - 1, cell=3)])
    assert [r["ts"] for r in out] == [T0 + 10 * S - 1]


def test_distinct_a_value_seen_again_stays_in_the_window(run):
    out, _ = run(TRAVEL, [ev(T0, cell=1), ev(T0 + 5 * S, cell=2), ev(T0 + 8 * S, cell=1), ev(T0 + 12 * S, cell=3)])
    assert [r["ts"] for r in out] == [T0 + 12 * S]


def test_distinct_keeps_the_most_recent_values_when_more_arrive(run):
    # Five cells for a threshold of three: the kernel keeps three pairs; the latest three are what counts.
    rows = [ev(T0 + k * S, cell=c) for k, c in enumerate((1, 2, 3, 4, 5))] + [ev(T0 + 14 * S, cell=6)]
    out, _ = run(TRAVEL, rows)
    # At T0 + 14s the window starts after T0 + 4s: cells 5 (T0 + 4s) is out, only 6 is in.
    assert [r["ts"] for r in out] == [T0 + 2 * S, T0 + 3 * S, T0 + 4 * S]
