"""The rules parser: engine.parse_rules, engine.load_rules, engine.RulesError (SPEC section 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

import engine
from engine import KIND_CODES, RulesError, load_rules, parse_rules
from engine.rules import (
    MAX_DURATION,
    And,
    Changed,
    Compare,
    Count,
    First,
    InSet,
    Not,
    Or,
    Prefix,
    parse_duration,
    parse_where,
)

SOURCE = "campaigns/test.toml"
SETS = "[sets]\nhotlines = [96122, 12122, 12122]\nbanks = [95588, 95555]\n\n"


def one_rule(body: str, rule_id: str = "promo", sets: str = SETS) -> str:
    return f'{sets}[[rule]]\nid = "{rule_id}"\n{body}\n'


VALID = 'on = "call_out"\nchannels = ["sms"]\n'


def parse_error(text: str, source: str = SOURCE) -> RulesError:
    with pytest.raises(RulesError) as info:
        parse_rules(text, source=source)
    return info.value


def assert_names(err: RulesError, rule_id: str | None, offending: str | None) -> None:
    """The message names the file, the rule (when there is one) and the offending text."""
    message = str(err)
    assert err.source == SOURCE
    assert message.startswith(SOURCE)
    assert err.rule_id == rule_id
    if rule_id is not None:
        assert repr(rule_id) in message
    if offending is not None:
        assert err.text is not None
        assert offending in message
    assert isinstance(err, ValueError)


# ---------------------------------------------------------------------------
# Errors inside a rule: file, rule id and offending text.


@pytest.mark.parametrize(
    ("body", "offending"),
    [
        # A typo in a key.
        (VALID + 'cooldwon = "1d"', "cooldwon"),
        (VALID + 'wehre = "peer == 1"', "wehre"),
        # `on`.
        ('on = "call_outt"\nchannels = ["sms"]', "call_outt"),
        ('on = ["call_out", "smsout"]\nchannels = ["sms"]', "smsout"),
        ('on = []\nchannels = ["sms"]', "[]"),
        ('on = 3\nchannels = ["sms"]', "3"),
        # `where`: unknown column, unknown set, syntax.
        (VALID + 'where = "peeer == 1"', "peeer == 1"),
        (VALID + 'where = "peer in hotlinez"', "peer in hotlinez"),
        (VALID + 'where = "peer not in hotlinez"', "peer not in hotlinez"),
        (VALID + 'where = "peer prefix bankz"', "peer prefix bankz"),
        (VALID + 'where = "(peer == 1"', "(peer == 1"),
        (VALID + 'where = "peer == 1)"', "peer == 1)"),
        (VALID + 'where = "(peer == 1 or (duration > 3)"', "(peer == 1 or (duration > 3)"),
        (VALID + 'where = "peer == 1 and"', "peer == 1 and"),
        (VALID + 'where = "and peer == 1"', "and peer == 1"),
        (VALID + 'where = "peer == 1 or or duration > 2"', "peer == 1 or or duration > 2"),
        (VALID + 'where = "peer =="', "peer =="),
        (VALID + 'where = "peer = 1"', "peer = 1"),
        (VALID + 'where = "peer == 1 duration == 2"', "peer == 1 duration == 2"),
        (VALID + 'where = "peer == duration"', "peer == duration"),
        (VALID + 'where = "peer in []"', "peer in []"),
        (VALID + 'where = "peer in [1, 2"', "peer in [1, 2"),
        (VALID + 'where = "peer in [1 2]"', "peer in [1 2]"),
        (VALID + 'where = "peer prefix 0"', "peer prefix 0"),
        (VALID + 'where = "peer prefix [95555, -1]"', "peer prefix [95555, -1]"),
        (VALID + 'where = "peer == 99999999999999999999"', "peer == 99999999999999999999"),
        (VALID + 'where = "peer == 1.5"', "peer == 1.5"),
        (VALID + 'where = "not"', "not"),
        (VALID + "where = 5", "5"),
        # Conditions.
        (VALID + 'count = { at_least = 3, within = "1d" }\nfirst = { within = "1d" }', "count, first"),
        (VALID + 'first = { within = "1d" }\nchanged = { column = "imei" }', "first, changed"),
        (VALID + 'count = { at_least = 3, within = "5" }', "5"),
        (VALID + 'count = { at_least = 3, within = "1y" }', "1y"),
        (VALID + 'count = { at_least = 3, within = "" }', "count.within"),
        (VALID + 'count = { at_least = 3, within = "0s" }', "0s"),
        (VALID + 'count = { at_least = 0, within = "1d" }', "0"),
        (VALID + 'count = { at_least = 1025, within = "1d" }', "1025"),
        (VALID + 'count = { at_least = "3", within = "1d" }', "3"),
        (VALID + 'count = { at_least = 3 }', "at_least"),
        (VALID + 'count = { at_least = 3, within = "1d", extra = 1 }', "extra"),
        (VALID + 'count = 3', "3"),
        (VALID + 'first = { within = 30 }', "30"),
        (VALID + 'changed = { column = "imeii" }', "imeii"),
        (VALID + 'changed = { column = "ts" }', "ts"),
        (VALID + 'sum = { column = "amount", at_least = 0, within = "7d" }', "0"),
        (VALID + 'sum = { column = "msisdn", at_least = 10, within = "7d" }', "msisdn"),
        (VALID + 'sum = { column = "amount", at_least = 10 }', "at_least"),
        (VALID + 'sum = { column = "amount", at_least = 10, within = "7d", resolution = "8d" }', "8d"),
        (VALID + 'sum = { column = "amount", at_least = 10, within = "7d", resolution = "1m" }', "1m"),
        (VALID + 'sum = { column = "amount", at_least = 10, within = "7d", resolution = "0s" }', "0s"),
        (VALID + 'distinct = { column = "cell", at_least = 1025, within = "1d" }', "1025"),
        (VALID + 'distinct = { column = "kind", at_least = 5, within = "1d" }', "kind"),
        (VALID + 'distinct = { column = "cell", at_least = 5, within = "1d", window = "1d" }', "window"),
        # Durations, channels, params, scalars.
        (VALID + 'cooldown = "1y"', "1y"),
        (VALID + 'cooldown = "5 s"', "5 s"),
        (VALID + "cooldown = 5", "5"),
        ('on = "call_out"\nchannels = []', "[]"),
        ('on = "call_out"\nchannels = ["sms", "sms"]', "sms"),
        ('on = "call_out"\nchannels = "sms"', "sms"),
        (VALID + 'params = ["peer", "pier"]', "pier"),
        (VALID + 'params = "peer"', "peer"),
        (VALID + "priority = 2147483648", "2147483648"),
        (VALID + "priority = true", "True"),
        (VALID + 'priority = "high"', "high"),
        (VALID + 'template = ""', ""),
    ],
)
def test_rule_errors_name_file_rule_and_text(body, offending):
    err = parse_error(one_rule(body))
    assert_names(err, "promo", offending)


def test_error_in_a_later_rule_names_that_rule():
    text = one_rule(VALID, rule_id="fine") + '[[rule]]\nid = "broken"\non = "call_out"\nchannels = ["sms"]\n' \
        'where = "duration >> 3"\n'
    err = parse_error(text)
    assert_names(err, "broken", "duration >> 3")


def test_missing_channels_names_the_rule():
    err = parse_error(one_rule('on = "call_out"'))
    assert_names(err, "promo", None)
    assert "channels" in str(err)


def test_missing_on_names_the_rule():
    err = parse_error(one_rule('channels = ["sms"]'))
    assert_names(err, "promo", None)
    assert "'on'" in str(err)


def test_missing_id_names_the_rule_by_position():
    text = one_rule(VALID, rule_id="a") + '[[rule]]\non = "call_out"\nchannels = ["sms"]\n'
    err = parse_error(text)
    assert_names(err, "#2", None)
    assert "id" in str(err)


@pytest.mark.parametrize("bad_id", ['"has space"', '"1starts_with_digit"', '""', "7"])
def test_bad_rule_id(bad_id):
    err = parse_error(f'[[rule]]\nid = {bad_id}\non = "call_out"\nchannels = ["sms"]\n')
    assert err.source == SOURCE
    assert str(err.text) in str(err)


def test_duplicate_id():
    err = parse_error(one_rule(VALID, rule_id="twice") + one_rule(VALID, rule_id="twice", sets=""))
    assert_names(err, "twice", "twice")
    assert "duplicate" in str(err)


# ---------------------------------------------------------------------------
# Errors outside rules: the file and the offending text.


@pytest.mark.parametrize(
    ("text", "offending"),
    [
        ("[sets]\nempty = []\n", "empty"),
        ("[sets]\npeer = [1]\n", "peer"),
        ("[sets]\nand = [1]\n", "and"),
        ('[sets]\nwords = ["a"]\n', "words"),
        ("[sets]\nflags = [true]\n", "flags"),
        ("[sets]\nhuge = [9223372036854775808]\n", "huge"),
        ("sets = 3\n", "3"),
        ('[policy]\ntimezone = "Mars/Olympus"\n', "Mars/Olympus"),
        ('[policy]\ncooldown = "forever"\n', "forever"),
        ("[policy]\nquiet = 1\n", "quiet"),
        ("[polciy]\ncooldown = \"1d\"\n", "polciy"),
    ],
)
def test_file_level_errors_name_file_and_text(text, offending):
    err = parse_error(text)
    assert_names(err, None, offending)


def test_rule_as_a_table_instead_of_an_array_of_tables():
    err = parse_error('[rule]\nid = "x"\non = "call_out"\nchannels = ["sms"]\n')
    assert err.source == SOURCE and "[[rule]]" in str(err)


@pytest.mark.parametrize("text", ["[[rule]\nid = 1\n", 'id = "a" = "b"\n', '[[rule]]\nid = "a"\nid = "b"\n'])
def test_invalid_toml_names_the_file(text):
    err = parse_error(text)
    assert err.source == SOURCE and err.rule_id is None
    assert "TOML" in str(err)


def test_load_rules_of_a_missing_file_names_it(tmp_path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)


def test_load_rules_of_a_directory_names_it(tmp_path):
    with pytest.raises(RulesError) as info:
        load_rules(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_load_rules_of_a_file_that_is_not_utf8_names_it(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(one_rule(VALID).encode() + '# caf\xe9\n'.encode("latin-1"))
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(path) in str(info.value) and "UTF-8" in str(info.value)


def test_load_rules_error_in_file_names_the_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(one_rule(VALID + 'cooldwon = "1d"'))
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert info.value.source == str(path)
    assert str(info.value).startswith(str(path))
    assert "cooldwon" in str(info.value) and "'promo'" in str(info.value)


def test_load_rules_reads_a_file(tmp_path):
    path = tmp_path / "ok.toml"
    text = one_rule(VALID)
    path.write_text(text, encoding="utf-8")
    ruleset = load_rules(path)
    assert ruleset.source == str(path)
    assert ruleset.text == text
    assert [r.id for r in ruleset.rules] == ["promo"]


def test_demo_rules_load():
    path = Path(engine.__file__).parent / "data" / "demo_rules.toml"
    ruleset = load_rules(path)
    assert len(ruleset.rules) >= 1
    assert len({r.id for r in ruleset.rules}) == len(ruleset.rules)


# ---------------------------------------------------------------------------
# Nothing is evaluated as Python.


@pytest.mark.parametrize(
    "where",
    [
        "__import__('os')",
        "__import__('os').system('touch pwned')",
        "peer == 1 or __import__('os')",
        "peer.__class__ == 1",
        "eval('1') == 1",
        "True",
        "1 == 1",
        "peer == 1; import os",
        "peer == peer",
        "lambda: 1",
        "peer == 0x10",
        "peer == 1e3",
        "peer in (1, 2)",
        "peer in {1, 2}",
        "peer == 1 if True else 0",
        "peer is 1",
        "peer == -(1)",
        "peer + 1 == 2",
    ],
)
def test_where_is_never_python(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    escaped = where.replace("\\", "\\\\").replace('"', '\\"')
    err = parse_error(one_rule(VALID + f'where = "{escaped}"'))
    assert_names(err, "promo", where)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------
# The checked form of valid files.


def c(column: str, op: str, value: int) -> Compare:
    return Compare(column, op, value)


A, B, C = c("peer", "==", 1), c("duration", ">", 2), c("mcc", "!=", 460)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("peer == 1", A),
        ("peer==1", A),
        ("  peer   ==   1  ", A),
        ("peer == 1 or duration > 2 and mcc != 460", Or((A, And((B, C))))),
        ("peer == 1 and duration > 2 or mcc != 460", Or((And((A, B)), C))),
        ("(peer == 1 or duration > 2) and mcc != 460", And((Or((A, B)), C))),
        ("peer == 1 and duration > 2 and mcc != 460", And((A, B, C))),
        ("peer == 1 or duration > 2 or mcc != 460", Or((A, B, C))),
        ("not peer == 1 and duration > 2", And((Not(A), B))),
        ("not peer == 1 or duration > 2", Or((Not(A), B))),
        ("not (peer == 1 or duration > 2)", Not(Or((A, B)))),
        ("not not peer == 1", Not(Not(A))),
        ("((peer == 1))", A),
        ("balance < -5", c("balance", "<", -5)),
        ("volume >= 1_000_000", c("volume", ">=", 1_000_000)),
        ("imei <= 9223372036854775807", c("imei", "<=", 2**63 - 1)),
        ("amount > -9223372036854775808", c("amount", ">", -(2**63))),
        ("peer in [3, 1, 2, 1,]", InSet("peer", (1, 2, 3))),
        ("peer in [-1, 5]", InSet("peer", (-1, 5))),
        ("peer not in [2, 1]", Not(InSet("peer", (1, 2)))),
        ("peer in hotlines", InSet("peer", (12122, 96122), "hotlines")),
        ("peer not in hotlines", Not(InSet("peer", (12122, 96122), "hotlines"))),
        ("not peer in hotlines", Not(InSet("peer", (12122, 96122), "hotlines"))),
        ("peer prefix 95555", Prefix("peer", (95555,))),
        ("peer prefix [95588, 95555, 95588]", Prefix("peer", (95555, 95588))),
        ("peer prefix banks", Prefix("peer", (95555, 95588), "banks")),
        (
            "kind in [0, 1] and (peer prefix banks or not duration < 60)",
            And((InSet("kind", (0, 1)), Or((Prefix("peer", (95555, 95588), "banks"), Not(c("duration", "<", 60)))))),
        ),
    ],
)
def test_where_ast(text, expected):
    sets = {"hotlines": (12122, 96122), "banks": (95555, 95588)}
    assert parse_where(text, sets) == expected
    rule = parse_rules(one_rule(VALID + f'where = "{text}"')).rules[0]
    assert rule.where == expected
    assert rule.where_text == text


def test_rule_defaults_and_fields():
    text = (
        '[policy]\ncooldown = "1d"\ntimezone = "Asia/Shanghai"\n\n'
        + SETS
        + '[[rule]]\nid = "a"\non = "call_out"\nchannels = ["sms"]\n\n'
        '[[rule]]\nid = "b"\non = ["sms_out", "call_out", "sms_out"]\nwhere = "  "\n'
        'count = { at_least = 3, within = "30d" }\nchannels = ["portal", "sms"]\ntemplate = "tb"\n'
        'params = ["peer", "mcc"]\npriority = -4\ncooldown = "0s"\n\n'
        '[[rule]]\nid = "c"\non = "location"\nfirst = { within = "1d12h" }\nchannels = ["crm"]\ncooldown = "2h"\n\n'
        '[[rule]]\nid = "d"\non = "device"\nchanged = { column = "imei" }\nchannels = ["sms"]\n'
    )
    ruleset = parse_rules(text, source=SOURCE)
    assert ruleset.source == SOURCE and ruleset.text == text
    assert ruleset.policy.timezone == "Asia/Shanghai" and ruleset.policy.cooldown == 86_400_000
    assert ruleset.sets == {"hotlines": (12122, 96122), "banks": (95555, 95588)}
    a, b, c_, d = ruleset.rules
    assert [r.id for r in ruleset.rules] == ["a", "b", "c", "d"]  # file order
    assert (a.on, a.where, a.condition, a.channels, a.template, a.params, a.priority, a.cooldown) == (
        (KIND_CODES["call_out"],), None, None, ("sms",), "a", (), 0, 86_400_000,
    )
    assert b.on == tuple(sorted({KIND_CODES["sms_out"], KIND_CODES["call_out"]}))
    assert b.where is None  # blank where: every event of the kinds
    assert b.condition == Count(3, 30 * 86_400_000)
    assert (b.channels, b.template, b.params, b.priority, b.cooldown) == (("portal", "sms"), "tb", ("peer", "mcc"),
                                                                           -4, 0)
    assert c_.condition == First(129_600_000) and c_.cooldown == 7_200_000
    assert d.condition == Changed("imei")


def test_empty_file_has_no_rules():
    ruleset = parse_rules("")
    assert ruleset.rules == () and ruleset.sets == {}


# ---------------------------------------------------------------------------
# Durations.


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("1d12h", 129_600_000),
        ("500ms", 500),
        ("0s", 0),
        ("90s", 90_000),
        ("15m", 900_000),
        ("1m30s", 90_000),
        ("2h", 7_200_000),
        ("30d", 2_592_000_000),
        ("1w", 604_800_000),
        ("1s500ms", 1_500),
        (" 5m ", 300_000),
    ],
)
def test_durations(text, ms):
    assert parse_duration(text) == ms


@pytest.mark.parametrize(
    "text", ["", "  ", "5", "1y", "5 s", "-5s", "5S", "1.5h", "ms", "1d 12h", "36601d", 5, True, None]
)
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_longest_duration():
    assert parse_duration(f"{MAX_DURATION}ms") == MAX_DURATION
    with pytest.raises(ValueError):
        parse_duration(f"{MAX_DURATION + 1}ms")


# ---------------------------------------------------------------------------
# Contact-policy keys (docs/rules.md, docs/policy.md).


def test_policy_keys_and_defaults():
    default = parse_rules(one_rule(VALID)).policy
    assert (default.daily_cap, default.monthly_cap, default.quiet_hours) == (0, 0, None)
    assert default.contact_days == (1, 2, 3, 4, 5, 6, 7)
    assert default.active_channels == ("sms", "mms")
    assert default.decline_cooldown == parse_duration("30d")
    text = (
        '[policy]\ntimezone = "Asia/Shanghai"\ndaily_cap = 1\nmonthly_cap = 4\nquiet_hours = "21:00-09:30"\n'
        'contact_days = [5, 1, 2]\nactive_channels = ["sms", "mms", "push"]\ndecline_cooldown = "7d"\n\n'
        + one_rule(VALID)
    )
    ruleset = parse_rules(text)
    policy = ruleset.policy
    assert (policy.daily_cap, policy.monthly_cap) == (1, 4)
    assert policy.quiet_hours == (21 * 60, 9 * 60 + 30)
    assert policy.contact_days == (1, 2, 5)
    assert policy.active_channels == ("sms", "mms", "push")
    assert ruleset.rules[0].decline_cooldown == parse_duration("7d")
    assert ruleset.channels == ("sms", "mms", "push")


def test_rule_policy_keys():
    body = VALID + (
        'holdout = 0.1\ndecline_cooldown = "3d"\nmax_per_hour = 5000\n'
        'goal = { on = ["recharge", "order"], where = "amount >= 1000", within = "24h" }\n'
    )
    rule = parse_rules(one_rule(body)).rules[0]
    assert rule.holdout == 0.1
    assert rule.decline_cooldown == parse_duration("3d")
    assert rule.max_per_hour == 5000
    assert rule.goal.on == (KIND_CODES["recharge"], KIND_CODES["order"])
    assert rule.goal.where == Compare("amount", ">=", 1000)
    assert rule.goal.within == 86_400_000
    bare = parse_rules(one_rule(VALID)).rules[0]
    assert (bare.holdout, bare.max_per_hour, bare.goal) == (0.0, 0, None)


@pytest.mark.parametrize(
    ("key", "value", "offending"),
    [
        ("daily_cap", "-1", "daily_cap"),
        ("daily_cap", "true", "daily_cap"),
        ("monthly_cap", '"4"', "monthly_cap"),
        ("quiet_hours", '"21:00"', "21:00"),
        ("quiet_hours", '"9:00-21:00"', "9:00-21:00"),
        ("quiet_hours", '"21:00-21:00"', "21:00-21:00"),
        ("quiet_hours", '"24:00-08:00"', "24:00-08:00"),
        ("contact_days", "[]", "contact_days"),
        ("contact_days", "[0, 1]", "contact_days"),
        ("contact_days", "[8]", "contact_days"),
        ("active_channels", '"sms"', "active_channels"),
        ("active_channels", '["sms", "sms"]', "active_channels"),
        ("decline_cooldown", '"soon"', "soon"),
    ],
)
def test_bad_policy_values_name_file_key_and_text(key, value, offending):
    err = parse_error(f"[policy]\n{key} = {value}\n\n" + one_rule(VALID))
    assert_names(err, None, offending)
    assert key in str(err)


@pytest.mark.parametrize(
    ("body", "offending"),
    [
        ("holdout = 1", "1"),
        ("holdout = -0.1", "-0.1"),
        ('holdout = "10%"', "10%"),
        ("max_per_hour = -5", "-5"),
        ("max_per_hour = 2_000_000", "2000000"),
        ('decline_cooldown = "1x"', "1x"),
        ('goal = { on = "recharge" }', "recharge"),
        ('goal = { on = "recharge", within = "0s" }', "0s"),
        ('goal = { on = "recharhe", within = "1d" }', "recharhe"),
        ('goal = { on = "recharge", within = "1d", where = "amout > 1" }', "amout > 1"),
        ('goal = { on = "recharge", within = "1d", whenever = 1 }', "whenever"),
        ('goal = "recharge"', "recharge"),
    ],
)
def test_bad_rule_policy_values_name_the_rule_and_text(body, offending):
    err = parse_error(one_rule(VALID + body))
    assert_names(err, "promo", offending)


def test_too_many_channels_are_refused():
    channels = ", ".join(f'"c{i}"' for i in range(65))
    err = parse_error(one_rule(f'on = "call_out"\nchannels = [{channels}]\n'))
    assert_names(err, None, "c64")
