"""The compiled kernel (engine.Engine) held to the plain-Python reference.

Hypothesis writes random, valid rules files as TOML text (random `on` kinds,
nested `where` expressions over every event column with comparisons, literal
lists, named sets, `not in`, `prefix`, and/or/not; at most one stateful
condition; priorities with ties; cooldowns zero, absent or inherited from
[policy]) and random event streams over small value domains, so that
conditions, windows, cooldowns and arbitration actually come into play.

The contact policy is drawn too: caps, quiet hours, contact days, time zones
with DST, active channels, holdouts, decline cooldowns, guardrails, goals
and active periods (local dates, weekdays, hours wrapping midnight) in the
rules; random subscriber profiles (opt-outs, channel
preferences, contact days); and random feedback (real and unknown ids, every
outcome) between batches.  Event times then step by hours and days across
DST changes so that calendar rules come into play.

For streams in event-time order the two implementations must give identical
instruction tables and identical per-rule counters, whatever the batch
boundaries and however small the kernel's first allocation.  For streams out
of event-time order the kernel keeps bounded state (engine/reference.py
explains it): every kernel match must still be a reference match, and rules
whose conditions do not depend on order must agree exactly.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pyarrow as pa
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

from engine import EVENT_COLUMNS, KIND_CODES, Engine, parse_rules
from engine.reference import ReferenceEngine
from engine.rules import format_duration, parse_duration
from engine.schema import COLUMN_DTYPES

# ---------------------------------------------------------------------------
# Value domains: small, and overlapping the literals the rules use.

KIND_POOL = ("call_out", "sms_out", "data", "device", "balance")
KIND_POOL_CODES = tuple(KIND_CODES[k] for k in KIND_POOL)
MSISDNS = (1, 2, 3, 8613800138000)
MANY_MSISDNS = tuple(range(1, 33)) + (8613800138000, 8613800138001, 85291234567, 2**62)
DOMAINS: dict[str, tuple[int, ...]] = {
    "peer": (0, 7, 12122, 96122, 95555, 955551234, 1095555, 95588, 9558812, 8613800138000),
    "duration": (0, 10, 30, 59, 60, 61, 300),
    "volume": (0, 1, 1024, 10**9),
    "amount": (0, 100, 500, 5000),
    "balance": (-100, 0, 100, 499, 500, 1000),
    "cell": (0, 1, 2, 3, 460001234),
    "mcc": (0, 460, 454, 455),
    "imei": (0, 1, 2, 3, 356938035643809),
    "code": (-1, 0, 1, 2),
}
OPTIONAL_COLUMNS = tuple(DOMAINS)
SETS: dict[str, tuple[int, ...]] = {
    "hotlines": (12122, 96122),
    "banks": (95555, 95588, 95533),
    "roaming": (454, 455),
    "small": (1, 2, 3),
    "subs": (1, 2, 8613800138000),
}
PREFIXES = (1, 9, 95, 955, 95555, 9558, 12122, 86138, 8613800138000, 9555512345, 460)
BASES = (0, 1_700_000_000_000)
STEPS = (0, 0, 0, 1, 1, 2, 3, 4, 5, 9, 10, 11, 50, 999, 1000, 1001)
# A stream draws its steps from one of these: fine steps fill short windows.
STEP_POOLS = ((0, 1), (0, 1, 2), (0, 1, 2, 3, 5), (0, 5, 10, 11), (0, 1, 10, 100, 1000), STEPS)
WINDOWS = ("1ms", "2ms", "3ms", "5ms", "10ms", "11ms", "1s", "1s1ms", "1m")
COOLDOWNS = ("0ms", "0s", "1ms", "2ms", "5ms", "10ms", "1s", "1m")
H = 3_600_000
# Policy streams: hours and days, around DST changes (2024-03-31 in Europe, 2024-11-03 in New York).
POLICY_BASES = (0, 1_711_846_800_000 - 6 * H, 1_730_613_600_000 - 8 * H, 1_700_000_000_000)
POLICY_STEPS = (0, 0, 1, 1000, 20 * 60_000, H, H, 3 * H, 7 * H, 13 * H, 24 * H, 30 * H)
POLICY_WINDOWS = ("1h", "5h", "1d", "2d", "1s")
POLICY_COOLDOWNS = ("0s", "1h", "3h", "1d", "1s")
ZONES = ("UTC", "Asia/Shanghai", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe")
CHANNEL_LISTS = ('["sms"]', '["portal", "sms"]', '["crm"]', '["mms", "sms"]', '["sms", "mms", "crm"]', '["push"]')
PROFILE_CHANNELS = ("sms", "mms", "portal", "crm", "push", "fax")
CHANGED_COLUMNS = tuple(c for c in EVENT_COLUMNS if c not in ("ts", "msisdn"))
CONDITIONS = ("none", "count", "first", "changed", "sum", "distinct", "after", "absence")
SUM_THRESHOLDS = (1, 10, 60, 100, 301, 500, 1000, 5001, 10**9, 2 * 10**9)
RESOLUTIONS = (1, 2, 3, 5, 7, 100, 1000, 60_000, 3_600_000, 7 * 3_600_000)  # ms
# Active periods: local dates around the policy streams' bases (DST changes included) and hours that wrap
# midnight, fall into a DST gap or fold (02:00-03:00), or hold no time at all (12:00-12:00).
ACTIVE_DATES = ("1970-01-01", "1970-01-02", "2023-11-14", "2023-11-15", "2023-11-16", "2024-03-30", "2024-03-31",
                "2024-04-01", "2024-11-02", "2024-11-03", "2024-11-04")
ACTIVE_HOURS = ("09:00-21:00", "21:00-09:00", "02:00-03:00", "01:30-02:30", "23:00-01:00", "00:00-00:30",
                "12:00-12:00", "03:00-02:00", "00:00-23:59")


def literal_domain(column: str) -> tuple[int, ...]:
    """Values worth comparing a column with: its domain plus off-by-one neighbours."""
    if column == "kind":
        base = KIND_POOL_CODES + (12,)
    elif column == "msisdn":
        base = MSISDNS
    elif column == "ts":
        base = (0, 1, 5, 10, 1_700_000_000_000, 1_700_000_000_005)
    else:
        base = DOMAINS[column]
    return tuple(sorted({v + d for v in base for d in (-1, 0, 1)}))


def int_text(value: int, underscore: bool) -> str:
    if underscore and abs(value) >= 1000:
        return f"{value:_}"
    return str(value)


# ---------------------------------------------------------------------------
# Rules files as TOML text.


@st.composite
def comparisons(draw) -> str:
    column = draw(st.sampled_from(EVENT_COLUMNS))
    op = draw(st.sampled_from(("==", "!=", "<", "<=", ">", ">=")))
    value = draw(st.sampled_from(literal_domain(column)))
    space = draw(st.sampled_from(("", " ")))
    return f"{column}{space}{op}{space}{int_text(value, draw(st.booleans()))}"


@st.composite
def memberships(draw) -> str:
    column = draw(st.sampled_from(EVENT_COLUMNS))
    negated = "not in" if draw(st.booleans()) else "in"
    if draw(st.booleans()):
        target = draw(st.sampled_from(sorted(SETS)))
    else:
        values = draw(st.lists(st.sampled_from(literal_domain(column)), min_size=1, max_size=4))
        trailing = "," if draw(st.booleans()) else ""
        target = "[" + ", ".join(str(v) for v in values) + trailing + "]"
    return f"{column} {negated} {target}"


@st.composite
def prefix_tests(draw) -> str:
    column = draw(st.sampled_from(("peer", "msisdn", "cell", "imei", "mcc", "balance")))
    shape = draw(st.integers(0, 2))
    if shape == 0:
        target = str(draw(st.sampled_from(PREFIXES)))
    elif shape == 1:
        prefixes = draw(st.lists(st.sampled_from(PREFIXES), min_size=1, max_size=3))
        target = "[" + ", ".join(str(p) for p in prefixes) + "]"
    else:
        target = draw(st.sampled_from(sorted(SETS)))
    return f"{column} prefix {target}"


def _combine(children):
    def paren(text: str, wrap: bool) -> str:
        return f"({text})" if wrap else text

    pairs = st.tuples(children, children, st.booleans(), st.booleans())
    return st.one_of(
        pairs.map(lambda t: paren(f"{t[0]} and {t[1]}", t[2])),
        pairs.map(lambda t: paren(f"{t[0]} or {t[1]}", t[2])),
        st.tuples(children, st.booleans()).map(lambda t: f"not ({t[0]})" if t[1] else f"not {t[0]}"),
    )


where_leaves = st.one_of(comparisons(), memberships(), prefix_tests())
where_texts = st.recursive(where_leaves, _combine, max_leaves=5)
deep_where_texts = st.recursive(where_leaves, _combine, max_leaves=16)


@st.composite
def active_periods(draw) -> str:
    """An `active` table with any of its parts, sometimes one that holds no moment at all."""
    parts = []
    for key in ("from", "until"):
        if draw(st.booleans()):
            parts.append(f'{key} = "{draw(st.sampled_from(ACTIVE_DATES))}"')
    if draw(st.booleans()):
        parts.append(f"days = {draw(st.lists(st.integers(1, 7), max_size=7, unique=True))}")
    if draw(st.booleans()):
        parts.append(f'hours = "{draw(st.sampled_from(ACTIVE_HOURS))}"')
    return "active = { " + ", ".join(parts) + " }"


@st.composite
def bucketed_conditions(draw, key: str, windows: tuple[str, ...]) -> str:
    """A sum or distinct condition: random column, threshold, window and resolution (or the default)."""
    within = draw(st.sampled_from(windows))
    w = parse_duration(within)
    column = draw(st.sampled_from(OPTIONAL_COLUMNS))
    at_least = draw(st.sampled_from(SUM_THRESHOLDS) if key == "sum" else st.integers(1, 4))
    parts = [f'column = "{column}"', f"at_least = {at_least}", f'within = "{within}"']
    resolutions = [r for r in RESOLUTIONS if r <= w <= 1024 * r]
    if resolutions and draw(st.booleans()):
        parts.append(f'resolution = "{format_duration(draw(st.sampled_from(resolutions)))}"')
    return f"{key} = {{ " + ", ".join(parts) + " }"


@st.composite
def rule_tables(draw, index: int, *, n_rules: int = 1, cooldown_zero: bool = False, conditions=CONDITIONS,
                where=where_texts, policy: bool = False, active_weight: int = 4, shadow: bool = True,
                audience=None):
    lines = ["[[rule]]", f'id = "r{index}"']
    kinds = draw(st.lists(st.sampled_from(KIND_POOL), min_size=1, max_size=3, unique=True))
    if len(kinds) == 1 and draw(st.booleans()):
        lines.append(f'on = "{kinds[0]}"')
    else:
        lines.append("on = [" + ", ".join(f'"{k}"' for k in kinds) + "]")
    if draw(st.booleans()):
        lines.append(f'where = "{draw(where)}"')
    if audience is not None and draw(st.booleans()):
        lines.append(f'audience = "{draw(audience)}"')
    condition = draw(st.sampled_from(conditions))
    windows = POLICY_WINDOWS if policy else WINDOWS
    if condition == "count":
        at_least = draw(st.integers(1, 5))
        lines.append(f'count = {{ at_least = {at_least}, within = "{draw(st.sampled_from(windows))}" }}')
    elif condition == "first":
        lines.append(f'first = {{ within = "{draw(st.sampled_from(windows))}" }}')
    elif condition == "changed":
        lines.append(f'changed = {{ column = "{draw(st.sampled_from(CHANGED_COLUMNS))}" }}')
    elif condition in ("sum", "distinct"):
        lines.append(draw(bucketed_conditions(condition, windows)))
    elif condition == "after" and n_rules > 1:
        followed = draw(st.integers(0, n_rules - 2))
        followed += followed >= index  # any other rule of the file
        lines.append(f'after = {{ rule = "r{followed}", within = "{draw(st.sampled_from(windows))}" }}')
    elif condition == "absence":
        kinds = draw(st.lists(st.sampled_from(KIND_POOL), min_size=1, max_size=2, unique=True))
        cancel_where = f', where = "{draw(where)}"' if draw(st.booleans()) else ""
        on = ", ".join(f'"{k}"' for k in kinds)
        lines.append(f'absence = {{ on = [{on}]{cancel_where}, within = "{draw(st.sampled_from(windows))}" }}')
    if shadow and draw(st.integers(0, 5)) == 0:
        lines.append("shadow = true")
    if policy:
        lines.append(f"channels = {draw(st.sampled_from(CHANNEL_LISTS))}")
    else:
        lines.append(draw(st.sampled_from(('channels = ["sms"]', 'channels = ["portal", "sms"]',
                                           'channels = ["crm"]'))))
    if draw(st.booleans()):
        lines.append(f'template = "t{draw(st.integers(0, 3))}"')
    params = draw(st.lists(st.sampled_from(EVENT_COLUMNS), max_size=4, unique=True))
    if params or draw(st.booleans()):
        lines.append("params = [" + ", ".join(f'"{p}"' for p in params) + "]")
    priority = draw(st.sampled_from((None, -1, 0, 0, 1, 1, 5)))
    if priority is not None:
        lines.append(f"priority = {priority}")
    if cooldown_zero:
        cooldown = draw(st.sampled_from((None, "0ms", "0s")))
    else:
        cooldown = draw(st.sampled_from((None,) + (POLICY_COOLDOWNS if policy else COOLDOWNS)))
    if cooldown is not None:
        lines.append(f'cooldown = "{cooldown}"')
    if policy:
        if draw(st.booleans()):
            lines.append(f"holdout = {draw(st.sampled_from((0, 0.0, 0.3, 0.5, 0.9)))}")
        if draw(st.booleans()):
            lines.append(f'decline_cooldown = "{draw(st.sampled_from(("0s", "1h", "2d")))}"')
        if draw(st.integers(0, 3)) == 0:
            lines.append(f"max_per_hour = {draw(st.integers(1, 3))}")
        if draw(st.booleans()):
            kinds = draw(st.lists(st.sampled_from(KIND_POOL), min_size=1, max_size=2, unique=True))
            # With profile tests about (audience given), a goal's filter may test profiles too.
            leaves = where_leaves if audience is None else st.one_of(where_leaves, profile_leaves())
            goal_where = f', where = "{draw(leaves)}"' if draw(st.booleans()) else ""
            on = ", ".join(f'"{k}"' for k in kinds)
            lines.append(f'goal = {{ on = [{on}]{goal_where}, within = "{draw(st.sampled_from(POLICY_WINDOWS))}" }}')
        if draw(st.integers(1, active_weight)) == 1:
            lines.append(draw(active_periods()))
    return "\n".join(lines)


@st.composite
def policy_tables(draw) -> str:
    """A [policy] table with any of the contact-policy keys."""
    lines = ["[policy]", f'timezone = "{draw(st.sampled_from(ZONES))}"']
    if draw(st.booleans()):
        lines.append(f'cooldown = "{draw(st.sampled_from(POLICY_COOLDOWNS))}"')
    if draw(st.booleans()):
        lines.append(f'decline_cooldown = "{draw(st.sampled_from(("0s", "1h", "1d")))}"')
    for key in ("daily_cap", "monthly_cap"):
        if draw(st.booleans()):
            lines.append(f"{key} = {draw(st.integers(0, 4))}")
    if draw(st.booleans()):
        quiet = draw(st.sampled_from(("21:00-09:00", "00:00-08:00", "12:00-13:30", "23:59-00:01", "01:30-03:00")))
        lines.append(f'quiet_hours = "{quiet}"')
    if draw(st.booleans()):
        days = draw(st.lists(st.integers(1, 7), min_size=1, max_size=7, unique=True))
        lines.append(f"contact_days = {days}")
    if draw(st.booleans()):
        active = draw(st.lists(st.sampled_from(("sms", "mms", "push", "crm")), max_size=3, unique=True))
        lines.append("active_channels = [" + ", ".join(f'"{c}"' for c in active) + "]")
    return "\n".join(lines) + "\n"


@st.composite
def rules_files(draw, *, min_rules: int = 1, max_rules: int = 6, cooldown_zero: bool = False,
                conditions=CONDITIONS, where=where_texts, policy: bool = False,
                active_weight: int = 4, shadow: bool = True, audience=None) -> str:
    parts = []
    if policy:
        parts.append(draw(policy_tables()))
    elif not cooldown_zero and draw(st.booleans()):
        parts.append(f'[policy]\ncooldown = "{draw(st.sampled_from(COOLDOWNS))}"\n')
    parts.append("[sets]\n" + "\n".join(f"{name} = {list(values)}" for name, values in SETS.items()) + "\n")
    n = draw(st.integers(min_rules, max_rules))
    for i in range(n):
        parts.append(draw(rule_tables(i, n_rules=n, cooldown_zero=cooldown_zero, conditions=conditions,
                                      where=where, policy=policy, active_weight=active_weight,
                                      shadow=shadow, audience=audience)) + "\n")
    text = "\n".join(parts)
    parse_rules(text)  # the generator only writes valid files
    return text


# ---------------------------------------------------------------------------
# Event streams.


@st.composite
def event_streams(draw, *, ordered: bool = True, msisdns=MSISDNS, kind_pool=KIND_POOL_CODES, max_size: int = 60,
                  policy: bool = False):
    """A dict-of-numpy batch of random events over small domains (some optional columns absent)."""
    n = draw(st.integers(0, max_size))
    base = draw(st.sampled_from(POLICY_BASES if policy else BASES))
    # Each stream concentrates on a few subscribers and kinds, so that
    # windows fill up and conditions fire.
    subscribers = draw(st.lists(st.sampled_from(msisdns), min_size=1, max_size=len(msisdns), unique=True))
    kinds = draw(st.lists(st.sampled_from(kind_pool), min_size=1, max_size=4, unique=True))
    if ordered:
        pool = POLICY_STEPS if policy and draw(st.integers(0, 3)) else draw(st.sampled_from(STEP_POOLS))
        steps = draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
        ts = base + np.cumsum(np.array(steps, dtype=np.int64))
    else:
        ts = base + np.array(draw(st.lists(st.integers(0, 60), min_size=n, max_size=n)), dtype=np.int64)
    columns: dict[str, np.ndarray] = {
        "ts": ts.astype(np.int64),
        "msisdn": np.array(draw(st.lists(st.sampled_from(subscribers), min_size=n, max_size=n)), dtype=np.int64),
        "kind": np.array(draw(st.lists(st.sampled_from(kinds), min_size=n, max_size=n)), dtype=np.uint8),
    }
    absent = draw(st.sets(st.sampled_from(OPTIONAL_COLUMNS), max_size=3))
    for name in OPTIONAL_COLUMNS:
        if name in absent:
            continue
        values = draw(st.lists(st.sampled_from(DOMAINS[name]), min_size=n, max_size=n))
        columns[name] = np.array(values, dtype=COLUMN_DTYPES[name])
    if draw(st.booleans()):
        columns["kind"] = columns["kind"].astype(np.int64)  # validation casts to uint8
    return columns


@st.composite
def scenarios(draw, rules=None, **stream_options):
    """(rules text, event stream), the stream's kinds drawn mostly from the kinds the rules listen to."""
    text = draw(rules if rules is not None else rules_files())
    used = sorted({code for rule in parse_rules(text).rules for code in rule.on})
    if draw(st.integers(0, 4)) == 0:
        used.append(KIND_CODES["portal"])  # a kind no rule listens to
    stream = draw(event_streams(kind_pool=tuple(used), **stream_options))
    return text, stream


@st.composite
def profile_tables(draw, msisdns=MSISDNS, min_size: int = 0) -> pa.Table:
    """Profiles for some of the subscribers, with every policy key present, null or absent."""
    chosen = draw(st.lists(st.sampled_from(msisdns), min_size=min_size, max_size=len(msisdns), unique=True))
    n = len(chosen)
    channel_lists = st.one_of(st.none(), st.lists(st.sampled_from(PROFILE_CHANNELS), max_size=3, unique=True))
    columns = {"msisdn": pa.array(chosen, pa.int64())}
    if draw(st.booleans()):
        columns["opt_out"] = pa.array(draw(st.lists(st.sampled_from((None, False, False, True)), min_size=n,
                                                    max_size=n)), pa.bool_())
    for name in ("channels", "opt_out_channels"):
        if draw(st.booleans()):
            columns[name] = pa.array(draw(st.lists(channel_lists, min_size=n, max_size=n)), pa.list_(pa.string()))
    if draw(st.booleans()):
        days = st.one_of(st.none(), st.lists(st.integers(1, 7), max_size=4, unique=True))
        columns["contact_days"] = pa.array(draw(st.lists(days, min_size=n, max_size=n)), pa.list_(pa.int64()))
    columns["segment"] = pa.array([f"s{i % 3}" for i in range(n)], pa.string())  # a column policy does not read
    return pa.table(columns)


# ---------------------------------------------------------------------------
# Profile tests: fields of every type the rules test, present, null, or absent from the table.

SEGMENTS = ("prepaid", "postpaid", "s0", "全球通")  # a non-ASCII string hashes by its UTF-8 like any other
PLANS = (128, 388, 588)
TAGS = ("car_owner", "vip", "traveller")


@st.composite
def profile_leaves(draw) -> str:
    """One profile test on a field of profile_attribute_tables, or on `ghost`, a field no table has."""
    shape = draw(st.integers(0, 9))
    op = draw(st.sampled_from(("==", "!=", "<", "<=", ">", ">=")))
    if shape == 0:
        return f"profile.segment {draw(st.sampled_from(('==', '!=')))} '{draw(st.sampled_from(SEGMENTS))}'"
    if shape == 1:
        values = draw(st.lists(st.sampled_from(SEGMENTS + ("gold",)), min_size=1, max_size=3))
        negated = "not in" if draw(st.booleans()) else "in"
        return f"profile.segment {negated} [" + ", ".join(f"'{v}'" for v in values) + "]"
    if shape == 2:  # an integer field tested as text (a CSV plan column reads as integers)
        values = draw(st.lists(st.sampled_from(PLANS + (999,)), min_size=1, max_size=3))
        return "profile.plan in [" + ", ".join(f"'{v}'" for v in values) + "]"
    if shape == 3:
        return f"profile.plan {op} {draw(st.sampled_from(PLANS + (387, 389)))}"
    if shape == 4:
        return f"profile.value_tier {op} {draw(st.integers(-1, 6))}"
    if shape == 5:
        values = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
        negated = "not in" if draw(st.booleans()) else "in"
        return f"profile.value_tier {negated} {values}"
    if shape == 6:
        return f"profile.car_owner {draw(st.sampled_from(('==', '!=')))} {draw(st.sampled_from(('true', 'false')))}"
    if shape == 7:
        return f"profile.tags has '{draw(st.sampled_from(TAGS + ('none',)))}'"
    if shape == 8:
        return f"profile.car_owner {op} {draw(st.integers(-1, 2))}"  # a boolean field read as 0/1
    return draw(st.sampled_from(("profile.ghost == 1", "profile.ghost != 'x'", "not profile.ghost has 'x'")))


profile_where_texts = st.recursive(st.one_of(where_leaves, profile_leaves(), profile_leaves()), _combine,
                                   max_leaves=5)
audience_texts = st.recursive(profile_leaves(), _combine, max_leaves=4)
deep_profile_where_texts = st.recursive(st.one_of(where_leaves, profile_leaves(), profile_leaves()), _combine,
                                        max_leaves=12)


@st.composite
def profile_attribute_tables(draw, msisdns=MSISDNS) -> pa.Table:
    """profile_tables (policy keys) plus the tested fields, each present or not, with nulls."""
    table = draw(profile_tables(msisdns, min_size=len(msisdns) - 1))
    n = table.num_rows
    fields = {
        "segment": (st.sampled_from((None,) + SEGMENTS), pa.string()),
        "plan": (st.sampled_from((None,) + PLANS), pa.int64()),
        "value_tier": (st.one_of(st.none(), st.integers(0, 5)), pa.int32()),
        "car_owner": (st.sampled_from((None, True, False)), pa.bool_()),
        "tags": (st.one_of(st.none(), st.lists(st.sampled_from(TAGS), max_size=2)), pa.list_(pa.string())),
    }
    for name, (values, kind) in fields.items():
        if draw(st.integers(0, 4)):
            column = pa.array(draw(st.lists(values, min_size=n, max_size=n)), kind)
            table = table.set_column(table.column_names.index(name), name, column) if (
                name in table.column_names) else table.append_column(name, column)
    return table


@st.composite
def profile_scenarios(draw, msisdns=MSISDNS, max_size: int = 60, where=profile_where_texts, **rule_options):
    """(rules text with profile tests in where and audience, event stream, profiles or None)."""
    text = draw(rules_files(where=where, audience=audience_texts, **rule_options))
    used = sorted({code for rule in parse_rules(text).rules for code in rule.on})
    stream = draw(event_streams(kind_pool=tuple(used), msisdns=msisdns, max_size=max_size))
    profiles = draw(profile_attribute_tables(msisdns)) if draw(st.integers(0, 4)) else None
    return text, stream, profiles


@st.composite
def policy_scenarios(draw, max_size: int = 60, active_weight: int = 4, where=where_texts, audience=None,
                     profiles=None):
    """(rules text, event stream, profiles, cuts, feedback choices) for the policy tests."""
    text = draw(rules_files(policy=True, active_weight=active_weight, where=where, audience=audience))
    used = sorted({code for rule in parse_rules(text).rules for code in rule.on})
    stream = draw(event_streams(kind_pool=tuple(used), policy=True, max_size=max_size))
    profiles = draw(profiles if profiles is not None else profile_tables()) if draw(st.integers(0, 3)) else None
    cuts = draw(st.lists(st.integers(0, max_size), max_size=4))
    # Per batch boundary: (index into that batch's instructions or -1 for an unknown id, outcome, delay).
    outcomes = ("delivered", "failed", "accepted", "declined", "considering", "opt_out", "bogus")
    feedback = draw(st.lists(st.lists(st.tuples(st.integers(-1, 8), st.sampled_from(outcomes),
                                                st.sampled_from((0, 1, H, 30 * H))), max_size=4),
                             min_size=6, max_size=6))
    return text, stream, profiles, cuts, feedback


def as_input(columns: dict[str, np.ndarray], form: str):
    """The same events in one of the accepted input forms."""
    if form == "dict":
        return columns
    if form == "record_batch":
        return pa.RecordBatch.from_pydict(columns)
    return pa.Table.from_pydict(columns)


input_forms = st.sampled_from(("dict", "record_batch", "table"))


def slices(columns: dict[str, np.ndarray], cuts: list[int]) -> list[dict[str, np.ndarray]]:
    n = len(columns["ts"])
    bounds = [0] + sorted(min(c, n) for c in cuts) + [n]
    return [{k: v[a:b] for k, v in columns.items()} for a, b in zip(bounds, bounds[1:], strict=False)]


# ---------------------------------------------------------------------------
# Comparison helpers.


def describe(text: str, columns: dict[str, np.ndarray]) -> None:
    note(f"rules:\n{text}")
    note("events: " + repr({k: v.tolist() for k, v in columns.items()}))


def assert_same_table(kernel: pa.Table, reference: pa.Table) -> None:
    assert kernel.schema == reference.schema
    assert kernel.to_pylist() == reference.to_pylist()
    assert kernel.equals(reference)


def assert_same_counters(kernel: Engine, reference: ReferenceEngine) -> None:
    k, r = kernel.stats(), reference.stats()
    assert k["rules"] == r["rules"]
    assert k["events"] == r["events"]
    assert k["instructions"] == sum(rule["sent"] + rule["holdout"] for rule in r["rules"].values()
                                    if not rule["shadow"])


def concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables)


def is_subsequence(small: list, big: list) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


# ---------------------------------------------------------------------------
# In event-time order: identical.


@given(scenario=scenarios(), form=input_forms)
def test_kernel_equals_reference(scenario, form):
    text, columns = scenario
    describe(text, columns)
    kernel = Engine.from_text(text)
    reference = ReferenceEngine(parse_rules(text))
    assert_same_table(kernel.process(as_input(columns, form)), reference.process(as_input(columns, form)))
    assert_same_counters(kernel, reference)


@given(scenario=scenarios(), cuts=st.lists(st.integers(0, 60), max_size=5))
def test_batch_boundaries_do_not_matter(scenario, cuts):
    text, columns = scenario
    describe(text, columns)
    note(f"cuts: {sorted(cuts)}")
    whole = Engine.from_text(text)
    expected = whole.process(columns)

    split = Engine.from_text(text)
    got = concat([split.process(part) for part in slices(columns, cuts)])
    assert_same_table(got, expected)
    assert split.stats()["rules"] == whole.stats()["rules"]

    reference = ReferenceEngine(parse_rules(text))
    ref_got = concat([reference.process(part) for part in slices(columns, cuts)])
    assert_same_table(got, ref_got)
    assert_same_counters(split, reference)


@given(scenario=scenarios(msisdns=MANY_MSISDNS, max_size=80))
def test_tiny_initial_allocation_grows_correctly(scenario):
    """initial_subscribers=1: the subscriber table and slot maps grow many times."""
    text, columns = scenario
    describe(text, columns)
    kernel = Engine(parse_rules(text), initial_subscribers=1)
    reference = ReferenceEngine(parse_rules(text))
    assert_same_table(kernel.process(columns), reference.process(columns))
    assert_same_counters(kernel, reference)
    assert kernel.stats()["subscribers"] <= len(set(columns["msisdn"].tolist()))


HOT_SUBSCRIBERS = np.array(MSISDNS, dtype=np.int64)
COLD_SUBSCRIBERS = np.arange(10_000, 10_300, dtype=np.int64)


def long_stream(rng: np.random.Generator, n: int = 3000) -> dict[str, np.ndarray]:
    """n events in event-time order, half of them from a few hot subscribers, half from 300 cold ones."""
    columns = {
        "ts": rng.choice(BASES) + np.cumsum(rng.choice(np.array(STEPS), n)).astype(np.int64),
        "msisdn": np.where(rng.random(n) < 0.5, rng.choice(HOT_SUBSCRIBERS, n),
                           rng.choice(COLD_SUBSCRIBERS, n)).astype(np.int64),
        "kind": rng.choice(np.array(KIND_POOL_CODES, dtype=np.uint8), n),
    }
    for name, domain in DOMAINS.items():
        columns[name] = rng.choice(np.array(domain), n).astype(COLUMN_DTYPES[name])
    return columns


@settings(max_examples=max(5, settings().max_examples // 20))
@given(text=rules_files(), seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(0, 3000), max_size=3))
def test_long_streams_across_kernel_chunks(text, seed, cuts):
    """Thousands of events: several kernel chunks, hundreds of subscribers, state rows regrown."""
    note(f"rules:\n{text}\nseed: {seed}, cuts: {sorted(cuts)}")
    rng = np.random.default_rng(seed)
    columns = long_stream(rng)
    kernel = Engine(parse_rules(text), initial_subscribers=1)
    got = concat([kernel.process(part) for part in slices(columns, cuts)])
    reference = ReferenceEngine(parse_rules(text))
    assert_same_table(got, reference.process(columns))
    assert_same_counters(kernel, reference)


# ---------------------------------------------------------------------------
# The contact policy, with profiles and feedback between batches.


def run_with_feedback(engine, parts, feedback):
    """Process the parts in order; after each, send the drawn feedback; return (tables, feedback results)."""
    tables, results = [], []
    last_ts = 0
    for k, part in enumerate(parts):
        table = engine.process(part)
        tables.append(table)
        if len(part["ts"]):
            last_ts = int(part["ts"][-1])
        ids = table.column("id").to_pylist()
        reports = feedback[k % len(feedback)]
        if not reports:
            continue
        chosen = [ids[i % len(ids)] if ids and i >= 0 else f"{i:032x}" for i, _, _ in reports]
        results.append(engine.feedback(chosen, [o for _, o, _ in reports], [last_ts + d for _, _, d in reports]))
    return tables, results


@given(scenario=policy_scenarios())
def test_policy_kernel_equals_reference(scenario):
    """Every policy step, profiles and feedback: same instructions (every column) and counters."""
    text, columns, profiles, cuts, feedback = scenario
    describe(text, columns)
    note(f"profiles: {None if profiles is None else profiles.to_pylist()}")
    note(f"cuts: {sorted(cuts)}; feedback: {feedback}")
    parts = slices(columns, cuts)
    kernel = Engine(parse_rules(text), profiles=profiles, initial_subscribers=1)
    reference = ReferenceEngine(parse_rules(text), profiles=profiles)
    got, got_results = run_with_feedback(kernel, parts, feedback)
    expected, expected_results = run_with_feedback(reference, parts, feedback)
    assert_same_table(concat(got), concat(expected))
    assert got_results == expected_results
    assert_same_counters(kernel, reference)


@given(scenario=policy_scenarios(active_weight=1))
def test_active_periods_kernel_equals_reference(scenario):
    """Every rule with an active period (DST zones, wrapping hours, empty periods): same instructions and counters."""
    text, columns, profiles, cuts, _ = scenario
    describe(text, columns)
    parts = slices(columns, cuts)
    kernel = Engine(parse_rules(text), profiles=profiles)
    reference = ReferenceEngine(parse_rules(text), profiles=profiles)
    assert_same_table(concat([kernel.process(part) for part in parts]),
                      concat([reference.process(part) for part in parts]))
    assert_same_counters(kernel, reference)


@given(zone=st.sampled_from(ZONES), base=st.sampled_from(POLICY_BASES), period=active_periods())
def test_active_period_boundaries_on_a_grid(zone, base, period):
    """Every quarter hour over three days around a DST change, and 1 ms before each: same events match."""
    text = (f'[policy]\ntimezone = "{zone}"\n\n[[rule]]\nid = "r"\non = "call_out"\nchannels = ["portal"]\n'
            f"{period}\n")
    note(text)
    quarters = max(base - 24 * H, 0) + np.arange(3 * 24 * 4, dtype=np.int64) * 15 * 60_000
    ts = np.sort(np.concatenate([quarters, quarters[1:] - 1]))
    columns = {"ts": ts, "msisdn": np.full(len(ts), 7, np.int64), "kind": np.zeros(len(ts), np.uint8)}
    kernel = Engine.from_text(text)
    reference = ReferenceEngine(parse_rules(text))
    assert_same_table(kernel.process(columns), reference.process(columns))
    assert_same_counters(kernel, reference)


@settings(max_examples=max(5, settings().max_examples // 10))
@given(scenario=policy_scenarios(max_size=300))
def test_policy_profiles_replaced_while_running(scenario):
    """Profiles loaded between batches apply to every event after the load, in both."""
    text, columns, profiles, cuts, feedback = scenario
    describe(text, columns)
    parts = slices(columns, cuts)
    kernel = Engine(parse_rules(text))
    reference = ReferenceEngine(parse_rules(text))
    got, expected = [], []
    for k, part in enumerate(parts):
        if k % 2 == 1 and profiles is not None:
            kernel.load_profiles(profiles)
            reference.load_profiles(profiles)
        got.append(kernel.process(part))
        expected.append(reference.process(part))
    assert_same_table(concat(got), concat(expected))
    assert_same_counters(kernel, reference)


# ---------------------------------------------------------------------------
# Out of event-time order.


# A late event may lower a kernel sum: over negative values (balance, code) that can make one rise, so sum is
# only held to exactness in order.
@given(scenario=scenarios(rules=rules_files(max_rules=1, cooldown_zero=True, shadow=False,
                                            conditions=("none", "count", "first", "changed", "distinct")),
                          ordered=False))
def test_out_of_order_kernel_matches_are_reference_matches(scenario):
    """Bounded state may miss a late count/first/distinct match, never invent one."""
    text, columns = scenario
    describe(text, columns)
    kernel = Engine.from_text(text)
    reference = ReferenceEngine(parse_rules(text))
    got = kernel.process(columns).to_pylist()
    expected = reference.process(columns).to_pylist()
    assert is_subsequence(got, expected)
    (k_rule,) = kernel.stats()["rules"].values()
    (r_rule,) = reference.stats()["rules"].values()
    assert k_rule["matched"] <= r_rule["matched"]
    # Cooldown 0 and a single rule: every match is an instruction, in both.
    assert k_rule["sent"] == k_rule["matched"] == len(got)
    assert r_rule["sent"] == r_rule["matched"] == len(expected)
    assert set(k_rule["stopped"].values()) == set(r_rule["stopped"].values()) == {0}


@given(
    scenario=scenarios(rules=rules_files(conditions=("none", "changed", "absence")), ordered=False),
    cuts=st.lists(st.integers(0, 60), max_size=3),
)
def test_out_of_order_is_exact_for_order_free_conditions(scenario, cuts):
    """No condition or `changed` does not look at time, and an absence timer keeps its whole state: cooldown,
    arbitration and timers agree even out of order."""
    text, columns = scenario
    describe(text, columns)
    kernel = Engine.from_text(text)
    reference = ReferenceEngine(parse_rules(text))
    got = concat([kernel.process(part) for part in slices(columns, cuts)])
    assert_same_table(got, reference.process(columns))
    assert_same_counters(kernel, reference)


# ---------------------------------------------------------------------------
# The where filter alone, harder: deep expressions, full-range values.


@given(
    scenario=scenarios(
        rules=rules_files(conditions=("none",), cooldown_zero=True, where=deep_where_texts), max_size=120
    )
)
def test_deep_where_expressions(scenario):
    """Stateless rules with deeply nested and/or/not: the kernel's short-circuit filter equals plain evaluation."""
    text, columns = scenario
    describe(text, columns)
    kernel = Engine.from_text(text)
    reference = ReferenceEngine(parse_rules(text))
    assert_same_table(kernel.process(columns), reference.process(columns))
    assert_same_counters(kernel, reference)


int64s = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-10, 10**6),
    st.integers(10**17, 2**63 - 1),
)


@given(
    values=st.lists(int64s, min_size=1, max_size=40),
    cut=st.lists(st.tuples(st.integers(0, 39), st.integers(1, 19)), max_size=6),
    extra=st.lists(st.integers(1, 2**63 - 1), max_size=4),
    negate=st.booleans(),
)
def test_prefix_and_in_over_full_int64_range(values, cut, extra, negate):
    """`prefix` compares decimal digits; `in` is exact membership: any int64, any prefix length."""
    # Prefixes taken from the values' own digits, so many of them match.
    prefixes = {int(str(values[i % len(values)])[:k]) for i, k in cut if values[i % len(values)] > 0} | set(extra)
    prefixes.discard(0)
    members = sorted(set(values[::3]) | set(extra))
    assume(prefixes)
    prefix_list = ", ".join(str(p) for p in sorted(prefixes))
    member_list = ", ".join(str(v) for v in members)
    where_prefix = f"not (peer prefix [{prefix_list}])" if negate else f"peer prefix [{prefix_list}]"
    text = (
        f'[[rule]]\nid = "p"\non = "call_out"\nwhere = "{where_prefix}"\nchannels = ["sms"]\n\n'
        f'[[rule]]\nid = "m"\non = "sms_out"\nwhere = "imei in [{member_list}]"\nchannels = ["sms"]\n'
    )
    n = len(values)
    columns = {
        "ts": np.arange(n, dtype=np.int64),
        "msisdn": np.ones(n, np.int64),
        "kind": np.array([KIND_CODES["call_out"], KIND_CODES["sms_out"]] * n, np.uint8)[:n],
        "peer": np.array(values, np.int64),
        "imei": np.array(values, np.int64),
    }
    note(text)
    got = Engine.from_text(text).process(columns)
    assert_same_table(got, ReferenceEngine(parse_rules(text)).process(columns))

    # And against the definition, independently of both implementations.
    def has_prefix(v: int) -> bool:
        return v > 0 and any(str(v).startswith(str(p)) for p in prefixes)

    expected_ts = []
    for i, v in enumerate(values):
        if i % 2 == 0 and has_prefix(v) != negate:
            expected_ts.append(i)
        if i % 2 == 1 and v in members:
            expected_ts.append(i)
    assert got.column("ts").to_pylist() == expected_ts


@given(
    scenario=scenarios(rules=rules_files(conditions=("sum", "distinct"))),
    cuts=st.lists(st.integers(0, 60), max_size=3),
)
def test_sum_and_distinct_equal_reference(scenario, cuts):
    """Only bucketed conditions, in event-time order: every window edge and bucket boundary agrees."""
    text, columns = scenario
    describe(text, columns)
    kernel = Engine(parse_rules(text), initial_subscribers=1)
    reference = ReferenceEngine(parse_rules(text))
    got = concat([kernel.process(part) for part in slices(columns, cuts)])
    assert_same_table(got, reference.process(columns))
    assert_same_counters(kernel, reference)


@given(scenario=scenarios(), cut=st.integers(0, 60))
def test_checkpoint_at_any_row_continues_like_the_reference(scenario, cut):
    """Every condition's state survives a checkpoint taken after any row.

    The kernel pads some state rows in memory (engine/_fast/kernel.pyx,
    row_stride) and writes them unpadded: a restored engine must go on as if
    nothing had happened.
    """
    text, columns = scenario
    describe(text, columns)
    before, after = slices(columns, [cut])
    engine = Engine(parse_rules(text), initial_subscribers=1)
    first = engine.process(before)
    with tempfile.TemporaryDirectory() as directory:
        engine.checkpoint(f"{directory}/checkpoint")
        restored = Engine.restore(f"{directory}/checkpoint")
    reference = ReferenceEngine(parse_rules(text))
    assert_same_table(concat([first, restored.process(after)]), reference.process(columns))
    assert_same_counters(restored, reference)


# ---------------------------------------------------------------------------
# Profile tests in where and audience.


@given(scenario=profile_scenarios(), cuts=st.lists(st.integers(0, 60), max_size=3))
def test_profile_tests_kernel_equals_reference(scenario, cuts):
    """Random profile tests (every type, missing fields, unknown subscribers) in where and audience: identical."""
    text, columns, profiles = scenario
    describe(text, columns)
    note(f"profiles: {None if profiles is None else profiles.to_pylist()}")
    kernel = Engine(parse_rules(text), profiles=profiles, initial_subscribers=1)
    reference = ReferenceEngine(parse_rules(text), profiles=profiles)
    got = concat([kernel.process(part) for part in slices(columns, cuts)])
    assert_same_table(got, reference.process(columns))
    assert_same_counters(kernel, reference)


@given(scenario=policy_scenarios(where=profile_where_texts, audience=audience_texts,
                                 profiles=profile_attribute_tables()))
def test_profile_tests_with_policy_and_feedback(scenario):
    """Profile tests beside every policy step, goals (whose where may test profiles too) and feedback."""
    text, columns, profiles, cuts, feedback = scenario
    describe(text, columns)
    note(f"profiles: {None if profiles is None else profiles.to_pylist()}")
    parts = slices(columns, cuts)
    kernel = Engine(parse_rules(text), profiles=profiles)
    reference = ReferenceEngine(parse_rules(text), profiles=profiles)
    got, got_results = run_with_feedback(kernel, parts, feedback)
    expected, expected_results = run_with_feedback(reference, parts, feedback)
    assert_same_table(concat(got), concat(expected))
    assert got_results == expected_results
    assert_same_counters(kernel, reference)


@settings(max_examples=max(5, settings().max_examples // 4))
@given(scenario=profile_scenarios(), other=profile_attribute_tables(), cuts=st.lists(st.integers(0, 60), max_size=4))
def test_profiles_replaced_between_batches_change_matches(scenario, other, cuts):
    """load_profiles mid-stream: later batches see the new profiles; condition state carries on, in both."""
    text, columns, profiles = scenario
    describe(text, columns)
    note(f"profiles: {None if profiles is None else profiles.to_pylist()}; then {other.to_pylist()}")
    kernel = Engine(parse_rules(text), profiles=profiles)
    reference = ReferenceEngine(parse_rules(text), profiles=profiles)
    got, expected = [], []
    for k, part in enumerate(slices(columns, cuts)):
        if k % 2 == 1:
            table = other if k % 4 == 1 else (profiles if profiles is not None else other)
            kernel.load_profiles(table)
            reference.load_profiles(table)
        got.append(kernel.process(part))
        expected.append(reference.process(part))
    assert_same_table(concat(got), concat(expected))
    assert_same_counters(kernel, reference)


@settings(max_examples=max(5, settings().max_examples // 20))
@given(text=rules_files(where=profile_where_texts, audience=audience_texts), seed=st.integers(0, 2**32 - 1),
       cuts=st.lists(st.integers(0, 3000), max_size=3))
def test_profile_tests_across_kernel_chunks(text, seed, cuts):
    """Thousands of events over hundreds of subscribers, half with profiles: several chunks, a large profile index."""
    note(f"rules:\n{text}\nseed: {seed}, cuts: {sorted(cuts)}")
    rng = np.random.default_rng(seed)
    columns = long_stream(rng)
    subscribers = np.concatenate([HOT_SUBSCRIBERS, COLD_SUBSCRIBERS])
    chosen = np.sort(rng.choice(subscribers, len(subscribers) // 2, replace=False))
    m = len(chosen)
    tag_lists = [None, [], ["car_owner"], ["vip", "car_owner"], ["traveller"]]
    profiles = pa.table({
        "msisdn": chosen,
        "segment": pa.array(rng.choice(np.array(SEGMENTS, dtype=object), m).tolist(), pa.string()),
        "plan": pa.array(rng.choice(np.array(PLANS), m), pa.int64()),
        "value_tier": pa.array(rng.integers(0, 6, m), pa.int64(), mask=rng.random(m) < 0.2),
        "car_owner": pa.array(rng.random(m) < 0.5, pa.bool_()),
        "tags": pa.array([tag_lists[k] for k in rng.integers(0, len(tag_lists), m)], pa.list_(pa.string())),
    })
    kernel = Engine(parse_rules(text), profiles=profiles, initial_subscribers=1)
    got = concat([kernel.process(part) for part in slices(columns, cuts)])
    reference = ReferenceEngine(parse_rules(text), profiles=profiles)
    assert_same_table(got, reference.process(columns))
    assert_same_counters(kernel, reference)


@given(scenario=profile_scenarios(conditions=("none",), cooldown_zero=True, max_rules=3,
                                  where=deep_profile_where_texts),
       cuts=st.lists(st.integers(0, 60), max_size=2))
def test_profile_filters_without_conditions(scenario, cuts):
    """Stateless rules: every event passing on + where + audience is a match, so each test's truth shows."""
    text, columns, profiles = scenario
    describe(text, columns)
    note(f"profiles: {None if profiles is None else profiles.to_pylist()}")
    kernel = Engine(parse_rules(text), profiles=profiles)
    reference = ReferenceEngine(parse_rules(text), profiles=profiles)
    got = concat([kernel.process(part) for part in slices(columns, cuts)])
    assert_same_table(got, reference.process(columns))
    assert_same_counters(kernel, reference)
