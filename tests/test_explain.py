"""`kairos check`: the plan of each rule in words, and warnings for what can never fire or never reads a field."""

from __future__ import annotations

import importlib.resources

import pytest

from engine.cli import main
from engine.explain import describe_filter, rule_warnings
from engine.rules import parse_rules
from engine.schema import EVENT_COLUMNS, KIND_FIELDS, KINDS


def one_rule(body: str, sets: str = "") -> str:
    return f'{sets}[[rule]]\nid = "promo"\nchannels = ["sms"]\n{body}\n'


def warnings_of(body: str, sets: str = "", base=None) -> list[str]:
    return rule_warnings(parse_rules(one_rule(body, sets), base=base).rules[0])


def check(tmp_path, capsys, text: str) -> tuple[int, str]:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    status = main(["check", str(path)])
    return status, capsys.readouterr().out


def test_kind_fields_table_covers_every_kind_with_real_columns():
    assert set(KIND_FIELDS) == set(KINDS)
    for fields in KIND_FIELDS.values():
        assert set(fields) <= set(EVENT_COLUMNS) - {"ts", "msisdn", "kind"}


@pytest.mark.parametrize("where", [
    "duration > 60 and duration < 30",
    "duration >= 30 and (peer == 1 and duration < 30)",
    "duration == 5 and duration != 5",
    "peer in [1, 2] and peer not in [1, 2]",
    "peer in [1, 2] and peer > 2",
    "duration >= 0 and duration <= 1 and duration != 0 and duration != 1",
    "not (duration <= 60) and duration < 30",
    "(duration > 60 and duration < 30) or (peer in [1] and peer in [2])",
])
def test_contradictory_filters_never_fire(where):
    found = warnings_of(f'on = "call_out"\nwhere = "{where}"')
    assert len(found) == 1 and found[0].startswith("never fires: the filter cannot hold: no value of ")


@pytest.mark.parametrize("where", [
    "duration > 30 and duration < 60",
    "duration > 60 or duration < 30",
    "duration == 5 and peer == 5",
    "peer in [1, 2] and peer not in [1]",
    "not (duration > 60 and duration < 30)",
    "duration >= 0 and duration <= 2 and duration != 0 and duration != 1",
])
def test_satisfiable_filters_do_not_warn(where):
    assert warnings_of(f'on = "call_out"\nwhere = "{where}"') == []


def test_in_an_empty_set_file_never_fires(tmp_path):
    (tmp_path / "cells.txt").write_text("# none yet\n")
    found = warnings_of('on = "location"\nwhere = "cell in airports"', '[sets]\nairports = { file = "cells.txt" }\n',
                        base=tmp_path)
    assert found == ["never fires: the filter cannot hold: cell in airports (0 values) is empty"]
    # `not in` an empty set holds for every event: nothing to warn about.
    assert warnings_of('on = "location"\nwhere = "cell not in airports"',
                       '[sets]\nairports = { file = "cells.txt" }\n', base=tmp_path) == []


@pytest.mark.parametrize(("active", "reason"), [
    ('from = "2026-12-31", until = "2026-12-01"', "until 2026-12-01 is before from 2026-12-31"),
    ("days = []", "days is empty"),
    ('hours = "10:00-10:00"', "hours 10:00-10:00 is empty"),
    ('from = "2026-12-05", until = "2026-12-06", days = [1, 2, 3, 4, 5]', "no day from 2026-12-05 until 2026-12-06"),
])
def test_empty_active_periods_never_fire(active, reason):
    found = warnings_of(f'on = "call_out"\nactive = {{ {active} }}')
    assert len(found) == 1 and found[0].startswith("never fires: the active period holds no moment: " + reason)


def test_active_period_with_a_possible_moment_does_not_warn():
    assert warnings_of('on = "call_out"\nactive = { from = "2026-12-05", until = "2026-12-07", days = [1] }') == []


@pytest.mark.parametrize(("on", "where", "field"), [
    ('"sms_in"', "duration >= 30", "duration"),
    ('"balance"', "peer == 1", "peer"),
    ('["sms_in", "portal"]', "cell in [1, 2]", "cell"),
    ('"device"', "not (mcc prefix 46)", "mcc"),
])
def test_field_a_kind_never_carries(on, where, field):
    found = warnings_of(f'on = {on}\nwhere = "{where}"')
    assert len(found) == 1 and found[0].startswith(f"field {field} is never carried by ")


def test_field_carried_by_one_of_several_kinds_does_not_warn():
    assert warnings_of('on = ["balance", "recharge"]\nwhere = "amount > 0 and balance < 1500"') == []
    assert warnings_of('on = "sms_in"\nwhere = "ts > 0 and msisdn > 0 and kind == 3"') == []


def test_changed_on_a_field_the_kind_never_carries():
    found = warnings_of('on = "portal"\nchanged = { column = "imei" }')
    assert found == ["field imei is never carried by portal events (it reads 0 there)"]


def test_sum_and_distinct_are_described_with_their_buckets(tmp_path, capsys):
    text = (one_rule('on = "call_out"\nsum = { column = "duration", at_least = 180000, within = "30d" }')
            + one_rule('on = "data"\ndistinct = { column = "cell", at_least = 20, within = "1d", resolution = "1h" }')
            .replace('id = "promo"', 'id = "travel"'))
    status, out = check(tmp_path, capsys, text)
    assert status == 0
    assert "sum: duration adds up to at least 180000 within 30d (in buckets of 2d12h)" in out
    assert "distinct: at least 20 different non-zero cell values within 1d (in buckets of 1h)" in out


def test_sum_on_a_field_the_kind_never_carries():
    found = warnings_of('on = "portal"\nsum = { column = "amount", at_least = 5, within = "1d" }')
    assert found == ["field amount is never carried by portal events (it reads 0 there)"]


def test_filter_is_shown_in_evaluation_order():
    rules = parse_rules(one_rule('on = "call_out"\nwhere = "peer prefix 95555 and (duration >= 30 or peer in [1, 2])"'))
    # Prefix tests cost more than comparisons and set lookups, so the kernel runs them last.
    assert describe_filter(rules.rules[0].where) == (
        "(duration >= 30 or else peer in [1, 2]) and then peer prefix [95555]")


def test_check_prints_plan_and_warnings_and_exits_0(tmp_path, capsys):
    text = ('[policy]\ntimezone = "Asia/Shanghai"\n\n' + one_rule(
        'on = "sms_in"\nwhere = "duration > 60 and duration < 30"\n'
        'active = { from = "2026-12-01", until = "2026-12-31", days = [1, 2, 3, 4, 5], hours = "21:00-09:00" }'))
    status, out = check(tmp_path, capsys, text)
    assert status == 0
    assert "  filter     duration > 60 and then duration < 30\n" in out
    assert ("  active     from 2026-12-01 until 2026-12-31 (both inclusive), on Mon, Tue, Wed, Thu, Fri, "
            "21:00-09:00 (wraps midnight) local time (Asia/Shanghai)") in out
    assert "  warning    never fires: the filter cannot hold: no value of duration satisfies" in out
    assert "  warning    field duration is never carried by sms_in events" in out
    assert out.rstrip().endswith("OK, 2 warnings")


def test_check_names_set_files(tmp_path, capsys):
    (tmp_path / "cells.txt").write_text("1\n2\n3\n")
    status, out = check(tmp_path, capsys, one_rule('on = "location"\nwhere = "cell in airports"',
                                                   '[sets]\nairports = { file = "cells.txt" }\n'))
    assert status == 0
    assert f"set airports = 3 values from {tmp_path / 'cells.txt'}" in out
    assert "filter     cell in airports (3 values)" in out


def test_check_error_in_a_set_file_exits_2(tmp_path, capsys):
    (tmp_path / "cells.txt").write_text("1\nx\n")
    path = tmp_path / "rules.toml"
    path.write_text(one_rule('on = "location"\nwhere = "cell in airports"',
                             '[sets]\nairports = { file = "cells.txt" }\n'))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "airports" in err and "cells.txt" in err and "line 2" in err


@pytest.mark.parametrize("name", ["demo_rules.toml", "bench_rules.toml"])
def test_no_warning_on_the_packaged_rules_files(name):
    text = importlib.resources.files("engine").joinpath("data", name).read_text(encoding="utf-8")
    for rule in parse_rules(text).rules:
        assert rule_warnings(rule) == [], rule.id
