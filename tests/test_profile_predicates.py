"""Profile tests in `where` and a rule's `audience` (SPEC sections 3 and 8, docs/rules.md).

Each test form on known profiles, in the kernel and the reference alike; the
missing-field rule; parse and profile errors; the audience's place in a match
(after the condition, which moves regardless); profiles replaced mid-stream;
reloads; and `kairos check`'s plan.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from engine import KIND_CODES, Engine, parse_rules
from engine.cli import main
from engine.compiler import compile_program, profile_attributes
from engine.profiles import PROFILE_MISSING, ProfileError, ProfileStore, string_hash
from engine.reference import ReferenceEngine
from engine.rules import RulesError
from tests.conftest import make_batch

# 1: every field set; 2: the other values; 3: every field null; 4: no profile at all.
PROFILES = pa.table({
    "msisdn": pa.array([1, 2, 3], pa.int64()),
    "segment": pa.array(["prepaid", "postpaid", None]),
    "plan": pa.array([388, 588, None], pa.int64()),
    "value_tier": pa.array([3, 1, None], pa.int32()),
    "car_owner": pa.array([True, False, None]),
    "tags": pa.array([["car_owner", "vip"], [], None], pa.list_(pa.string())),
    "score": pa.array([0.5, 1.5, None], pa.float64()),
})
SUBSCRIBERS = (1, 2, 3, 4)


def rules(key: str, text: str, extra: str = "") -> str:
    return f'[[rule]]\nid = "r"\non = "call_out"\n{key} = "{text}"\nchannels = ["sms"]\n{extra}'


def matched_msisdns(engine, events=None) -> list[int]:
    events = events or make_batch([{"ts": k, "msisdn": m, "kind": 0, "duration": 10}
                                   for k, m in enumerate(SUBSCRIBERS)])
    return engine.process(events).column("msisdn").to_pylist()


@pytest.fixture(params=["kernel", "reference"])
def build(request):
    """(rules text, profiles or None) -> the compiled Engine or the ReferenceEngine."""
    if request.param == "kernel":
        return lambda text, profiles=PROFILES: Engine(parse_rules(text), profiles=profiles)
    return lambda text, profiles=PROFILES: ReferenceEngine(parse_rules(text), profiles=profiles)


PROFILE_CASES = [
    ("profile.segment == 'prepaid'", [1]),
    ("profile.segment != 'prepaid'", [2]),  # null and unknown: false, != included
    ("not profile.segment == 'prepaid'", [2, 3, 4]),  # `not` inverts the test's result
    ("profile.segment in ['prepaid', 'gold']", [1]),
    ("profile.segment not in ['prepaid']", [2, 3, 4]),
    ("profile.plan in ['388', '588']", [1, 2]),  # an integer column tested as text
    ("profile.plan == 388", [1]),
    ("profile.plan in [588, 1]", [2]),
    ("profile.value_tier >= 3", [1]),
    ("profile.value_tier < 3", [2]),
    ("profile.value_tier <= 3 and profile.value_tier > 0", [1, 2]),
    ("profile.car_owner == true", [1]),
    ("profile.car_owner == false", [2]),
    ("profile.car_owner != true", [2]),
    ("profile.car_owner >= 1", [1]),  # booleans read as 0/1
    ("profile.tags has 'car_owner'", [1]),
    ("profile.tags has 'vip' and profile.tags has 'car_owner'", [1]),
    ("not profile.tags has 'car_owner'", [2, 3, 4]),
    ("profile.ghost == 1", []),  # no such column
    ("profile.ghost != 'x'", []),
    ("not profile.ghost == 1", [1, 2, 3, 4]),
    ("profile.segment == 'prepaid' or profile.value_tier == 1", [1, 2]),
]


@pytest.mark.parametrize(("text", "expected"), PROFILE_CASES)
def test_each_test_form_in_where(build, text, expected):
    assert matched_msisdns(build(rules("where", text))) == expected


@pytest.mark.parametrize(("text", "expected"), PROFILE_CASES)
def test_each_test_form_as_an_audience(build, text, expected):
    assert matched_msisdns(build(rules("audience", text))) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("profile.segment == 'prepaid' and duration > 5", [1]),
    ("profile.segment == 'prepaid' and duration > 50", []),
    ("profile.segment == 'prepaid' or duration > 5", [1, 2, 3, 4]),
    ("not (profile.tags has 'vip' or msisdn == 2)", [3, 4]),
])
def test_profile_and_event_tests_combine(build, text, expected):
    assert matched_msisdns(build(rules("where", text))) == expected


def test_without_profiles_every_test_is_false_and_not_inverts_it(build):
    assert matched_msisdns(build(rules("where", "profile.segment != 'x'"), None)) == []
    assert matched_msisdns(build(rules("audience", "not profile.segment == 'x'"), None)) == [1, 2, 3, 4]


def test_strings_hash_the_same_in_rules_and_profiles():
    expected = int.from_bytes(hashlib.blake2b("全球通".encode(), digest_size=8).digest(), "big") & (2**63 - 1)
    assert string_hash("全球通") == expected
    text = rules("where", "profile.segment == '全球通'")
    program = compile_program(parse_rules(text))
    assert program["attributes"] == (("str", "segment", ""),)
    assert program["ops"][0]["imm"] == expected
    store = ProfileStore(pa.table({"msisdn": [5, 6], "segment": ["全球通", None]}))
    assert store.attribute_matrix(program["attributes"]).tolist() == [[expected], [PROFILE_MISSING]]
    assert matched_msisdns(Engine(parse_rules(text), profiles=store),
                           make_batch([{"ts": 0, "msisdn": 5, "kind": 0}, {"ts": 1, "msisdn": 6, "kind": 0}])) == [5]


def test_the_compiler_lists_each_attribute_once():
    text = (rules("where", "profile.plan == 388 and profile.plan in ['388'] and profile.tags has 'a'",
                  'audience = "profile.tags has \'b\' or profile.plan > 1"\n'))
    assert profile_attributes(parse_rules(text)) == (
        ("int", "plan", ""), ("str", "plan", ""), ("has", "tags", "a"), ("has", "tags", "b"))


@pytest.mark.parametrize(("key", "text", "reason"), [
    ("audience", "duration > 30", "an audience tests profile fields only"),
    ("audience", "profile.tier > 1 and peer == 5", "an audience tests profile fields only"),
    ("where", "duration == 'long'", "strings and true/false compare with profile fields"),
    ("where", "profile.segment < 'b'", "'<' orders integers"),
    ("where", "profile.car_owner >= true", "'>=' orders integers"),
    ("where", "profile.plan in ['388', 588]", "integers or strings, not both"),
    ("where", "profile.tags has 3", "'has' takes a string tag"),
    ("where", "peer has 'x'", "'has' tests a list of a profile field"),
    ("where", "profile.plan prefix 38", "expected a comparison, 'in' or 'has'"),
    ("where", "profile.segment == 'open", "unexpected character"),
])
def test_bad_profile_tests_name_file_rule_and_text(key, text, reason):
    with pytest.raises(RulesError) as info:
        parse_rules(rules(key, text), source="campaigns.toml")
    message = str(info.value)
    assert message.startswith("campaigns.toml: rule 'r'") and reason in message and repr(text) in message


def test_a_float_column_a_rule_tests_is_refused_and_the_old_profiles_stay():
    text = rules("where", "profile.score > 1")
    with pytest.raises(ProfileError, match="column 'score' is double"):
        Engine(parse_rules(text), profiles=PROFILES)
    engine = Engine(parse_rules(rules("where", "profile.segment == 'prepaid'")), profiles=PROFILES)
    with pytest.raises(ProfileError, match="column 'segment' is list<item: string>"):
        engine.load_profiles(pa.table({"msisdn": [1], "segment": pa.array([["prepaid"]])}))
    assert len(engine.profiles) == 3 and matched_msisdns(engine) == [1]
    # A float column no rule tests is simply kept.
    assert len(Engine(parse_rules(rules("where", "profile.plan == 388")), profiles=PROFILES).profiles) == 3


def test_text_that_is_not_an_integer_is_refused_where_integers_are_compared():
    with pytest.raises(ProfileError, match="column 'tier' is string: the rules test it as integers"):
        Engine(parse_rules(rules("where", "profile.tier >= 2")),
               profiles=pa.table({"msisdn": [1, 2], "tier": ["2", "gold"]}))
    engine = Engine(parse_rules(rules("where", "profile.tier >= 2")),
                    profiles=pa.table({"msisdn": [1, 2], "tier": ["2", "1"]}))
    assert matched_msisdns(engine) == [1]


def test_csv_profiles_with_tags_and_numeric_plans(tmp_path, build):
    path = tmp_path / "profiles.csv"
    path.write_text("msisdn,plan,tags,car_owner\n1,388,car_owner;vip,true\n2,588,,false\n3,,vip,\n")
    text = rules("where", "profile.plan in ['388'] or profile.tags has 'vip'",
                 'audience = "not profile.car_owner == false"\n')
    assert matched_msisdns(build(text, ProfileStore.load(path))) == [1, 3]


# ---------------------------------------------------------------------------
# The audience in a match; profiles replaced while running.

COUNTED = """
[[rule]]
id = "heavy"
on = "call_out"
count = { at_least = 2, within = "1d" }
audience = "profile.value_tier >= 3"
channels = ["sms"]
"""


def calls(msisdn: int, *times: int) -> dict[str, np.ndarray]:
    return make_batch([{"ts": t, "msisdn": msisdn, "kind": 0} for t in times])


def test_the_condition_moves_outside_the_audience_and_a_miss_is_no_match(build):
    engine = build(COUNTED, pa.table({"msisdn": [7], "value_tier": [1]}))
    assert engine.process(calls(7, 0, 1, 2)).num_rows == 0
    figures = engine.stats()["rules"]["heavy"]
    assert figures["matched"] == 0 and set(figures["stopped"].values()) == {0}
    # Moved into the audience: the next call finds three calls in its window already.
    engine.load_profiles(pa.table({"msisdn": [7], "value_tier": [4]}))
    assert engine.process(calls(7, 3)).column("ts").to_pylist() == [3]
    assert engine.stats()["rules"]["heavy"]["matched"] == 1


def test_a_profile_test_in_where_gates_the_condition_state(build):
    text = COUNTED.replace('audience = "profile.value_tier >= 3"', 'where = "profile.value_tier >= 3"')
    engine = build(text, pa.table({"msisdn": [7], "value_tier": [1]}))
    assert engine.process(calls(7, 0, 1, 2)).num_rows == 0
    engine.load_profiles(pa.table({"msisdn": [7], "value_tier": [4]}))
    # Calls outside the filter were never counted: the first one after the load is alone in the window.
    assert engine.process(calls(7, 3, 4)).column("ts").to_pylist() == [4]


def test_load_profiles_mid_stream_applies_from_the_next_batch():
    text = rules("where", "profile.segment == 'prepaid'", 'count = { at_least = 1, within = "1d" }\n')
    engine = Engine(parse_rules(text))
    assert matched_msisdns(engine) == []
    engine.load_profiles(PROFILES)
    events = make_batch([{"ts": 10 + k, "msisdn": m, "kind": 0} for k, m in enumerate(SUBSCRIBERS)])
    assert matched_msisdns(engine, events) == [1]
    engine.load_profiles(pa.table({"msisdn": [2, 4], "segment": ["prepaid", "prepaid"]}))
    events = make_batch([{"ts": 20 + k, "msisdn": m, "kind": 0} for k, m in enumerate(SUBSCRIBERS)])
    assert matched_msisdns(engine, events) == [2, 4]


def test_a_reload_treats_a_changed_where_or_audience_as_a_changed_rule():
    base = (COUNTED + '\n[[rule]]\nid = "tagged"\non = "call_out"\nwhere = "profile.tags has \'vip\'"\n'
            'count = { at_least = 2, within = "1d" }\nchannels = ["sms"]\n')
    profiles = pa.table({"msisdn": [7], "value_tier": [4], "tags": pa.array([["vip"]])})
    engine = Engine(parse_rules(base), profiles=profiles)
    engine.process(calls(7, 0))
    assert engine.reload_rules(parse_rules(base)) == {"kept": ["heavy", "tagged"], "fresh": [], "removed": []}
    changed = base.replace("value_tier >= 3", "value_tier >= 2").replace("has 'vip'", "has 'vip' or msisdn == 1")
    assert engine.reload_rules(parse_rules(changed)) == {"kept": [], "fresh": ["heavy", "tagged"], "removed": []}
    # Fresh state: one more call is alone in both windows.
    assert engine.process(calls(7, 1)).num_rows == 0
    assert engine.process(calls(7, 2)).column("rule").to_pylist() == ["heavy"]


def test_a_reload_whose_tests_the_profiles_cannot_serve_is_refused():
    engine = Engine(parse_rules(COUNTED), profiles=PROFILES)
    with pytest.raises(ProfileError, match="column 'score'"):
        engine.reload_rules(parse_rules(rules("where", "profile.score > 1")))
    assert [rule.id for rule in engine.ruleset.rules] == ["heavy"]
    assert engine.process(calls(1, 0, 1)).column("ts").to_pylist() == [1]


def test_a_checkpoint_restores_profile_tests(tmp_path):
    engine = Engine(parse_rules(COUNTED), profiles=PROFILES)
    engine.process(calls(1, 0))
    engine.checkpoint(tmp_path / "cp")
    restored = Engine.restore(tmp_path / "cp")
    assert restored.process(calls(1, 1)).column("ts").to_pylist() == [1]
    assert restored.process(calls(2, 2, 3)).num_rows == 0


# ---------------------------------------------------------------------------
# kairos check


def test_check_prints_profile_tests_in_words(tmp_path, capsys):
    path = tmp_path / "campaigns.toml"
    path.write_text(
        '[[rule]]\nid = "car_owner"\non = "call_out"\n'
        "where = 'profile.segment == \"prepaid\" and duration >= 30 and profile.plan in [\"388\", \"588\"]'\n"
        "audience = 'profile.tags has \"car_owner\" and profile.value_tier != 0'\n"
        'channels = ["sms"]\n')
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert ('  filter     duration >= 30 and then profile field segment is "prepaid" and then profile field plan is '
            'one of ["388", "588"]') in out
    assert ("  profile    segment, plan, tags, value_tier; a test on a field the subscriber's profile lacks is false"
            in out)
    assert ('  audience   profile field tags holds tag "car_owner" and then profile field value_tier is set and is '
            "not 0 (tested at trigger time, after the condition and active period)") in out
    assert out.rstrip().endswith("OK")


def test_a_named_set_of_integers_works_on_a_profile_field(tmp_path):
    (tmp_path / "none.txt").write_text("# switched off\n")
    text = ("[sets]\nplans = [388, 1]\noff = { file = \"none.txt\" }\n\n"
            + rules("where", "profile.plan in plans or profile.value_tier in off"))
    ruleset = parse_rules(text, base=tmp_path)
    for engine in (Engine(ruleset, profiles=PROFILES), ReferenceEngine(ruleset, profiles=PROFILES)):
        assert matched_msisdns(engine) == [1]


def test_a_reload_with_profiles_checks_the_new_rules_against_the_new_profiles():
    engine = Engine(parse_rules(COUNTED), profiles=PROFILES)  # score is a float here
    tested = rules("where", "profile.score >= 2")
    whole = pa.table({"msisdn": [1, 2], "score": [1, 3]})
    assert engine.reload_rules(parse_rules(tested), profiles=whole)["fresh"] == ["r"]
    assert engine.profiles.table.column("score").to_pylist() == [1, 3]
    assert matched_msisdns(engine, make_batch([{"ts": 9, "msisdn": m, "kind": 0} for m in (1, 2)])) == [2]
    # New profiles the new rules cannot test: refused, the rules and profiles in use stay.
    with pytest.raises(ProfileError, match="column 'score' is double"):
        engine.reload_rules(parse_rules(COUNTED.replace("value_tier", "score")), profiles=PROFILES)
    assert [rule.id for rule in engine.ruleset.rules] == ["r"]
    assert engine.profiles.table.column("score").to_pylist() == [1, 3]


def test_a_goal_filter_can_test_profiles(build):
    text = ('[[rule]]\nid = "offer"\non = "call_out"\nchannels = ["portal"]\n'
            'goal = { on = "recharge", where = "profile.segment == \'prepaid\'", within = "1d" }\n')
    engine = build(text)
    offers = make_batch([{"ts": 0, "msisdn": m, "kind": 0} for m in SUBSCRIBERS])
    assert engine.process(offers).num_rows == 4
    engine.process(make_batch([{"ts": 10, "msisdn": m, "kind": KIND_CODES["recharge"]} for m in SUBSCRIBERS]))
    assert engine.stats()["rules"]["offer"]["goal"]["treated"] == 1  # only the prepaid subscriber's recharge
