"""Rules files (SPEC section 3): TOML in, a checked `RuleSet` out.

This module only parses and checks; it never runs anything.  The kernel
compiler (`engine.compiler`) and the plain-Python reference
(`engine.reference`) both consume the `RuleSet` built here, so the two agree
on what a rules file means by construction.

The `where` language is a small, closed grammar (docs/rules.md):

    expr    := and ("or" and)*
    and     := unary ("and" unary)*
    unary   := "not" unary | "(" expr ")" | test
    test    := COLUMN OP INTEGER
             | COLUMN ["not"] "in" (LIST | SETNAME)
             | COLUMN "prefix" (INTEGER | LIST | SETNAME)
             | PROFILE OP INTEGER | PROFILE ("==" | "!=") (STRING | "true" | "false")
             | PROFILE ["not"] "in" (LIST | STRINGS)
             | PROFILE "has" STRING
    OP      := "==" | "!=" | "<" | "<=" | ">" | ">="
    LIST    := "[" INTEGER ("," INTEGER)* [","] "]"
    STRINGS := "[" STRING ("," STRING)* [","] "]"
    PROFILE := "profile." NAME
    STRING  := '"' characters '"' | "'" characters "'"     (no escapes)

An `audience` is the same language over profile fields only.  Nothing in a
rules file is ever evaluated as Python.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv

from engine.schema import EVENT_COLUMNS, KIND_CODES

# ---------------------------------------------------------------------------
# The checked form of a rules file.


@dataclass(frozen=True)
class Compare:
    """`column op value`, op one of == != < <= > >=."""

    column: str
    op: str
    value: int


@dataclass(frozen=True)
class InSet:
    """`column in [...]` or `column in set_name`; `values` sorted, unique."""

    column: str
    values: tuple[int, ...]
    set_name: str | None = None


@dataclass(frozen=True)
class Prefix:
    """`column prefix ...`: the value's decimal digits start with one of `prefixes`.

    0 and negative values never match; 95555 matches 955551234, not 1095555.
    """

    column: str
    prefixes: tuple[int, ...]
    set_name: str | None = None


@dataclass(frozen=True)
class And:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Not:
    item: Expr


@dataclass(frozen=True)
class ProfileTest:
    """A test on a field of the subscriber's profile (SPEC section 8), written `profile.FIELD ...`.

    `op` is one of == != < <= > >= (value an int, or for == and != also a
    str or bool), `in` (value a sorted tuple of ints or of strs) or `has`
    (value a str: the field is a list of strings holding it).  The test is
    false when the profile lacks the field: unknown subscriber, null value,
    or no such column.
    """

    field: str
    op: str
    value: int | bool | str | tuple[int, ...] | tuple[str, ...]

    @property
    def encoding(self) -> str:
        """How the kernel reads the field for this test: "int" (integers, booleans 0/1), "str" (hashes), "has"."""
        if self.op == "has":
            return "has"
        if isinstance(self.value, tuple):  # `in`: a list never mixes types; a set (maybe from an empty file) holds ints
            return "str" if self.value and isinstance(self.value[0], str) else "int"
        return "str" if isinstance(self.value, str) else "int"


Expr = Compare | InSet | Prefix | ProfileTest | And | Or | Not


@dataclass(frozen=True)
class Count:
    """At least `at_least` qualifying events with ts in (t - within, t], this one included."""

    at_least: int
    within: int  # milliseconds


@dataclass(frozen=True)
class First:
    """No earlier qualifying event with ts in [t - within, t]."""

    within: int  # milliseconds


@dataclass(frozen=True)
class Changed:
    """The column differs from the last non-zero value seen; 0 is ignored."""

    column: str


@dataclass(frozen=True)
class Sum:
    """The column summed over the window's buckets is at least `at_least` (docs/rules.md, "sum and distinct").

    Event time is cut into buckets [k * resolution, (k + 1) * resolution);
    the window of an event at t holds the buckets that start after t - within,
    up to t's own bucket, this event included.
    """

    column: str
    at_least: int
    within: int  # milliseconds
    resolution: int  # milliseconds, the bucket width


@dataclass(frozen=True)
class Distinct:
    """At least `at_least` distinct non-zero values of the column in the window's buckets (as for Sum)."""

    column: str
    at_least: int
    within: int  # milliseconds
    resolution: int  # milliseconds, the bucket width


@dataclass(frozen=True)
class After:
    """Rule `rule` matched for this subscriber on an earlier event with ts in (t - within, t] (a sequence).

    The earlier match is not consumed; what the contact policy did with it does not matter.
    """

    rule: str  # id of the earlier rule
    within: int  # milliseconds


@dataclass(frozen=True)
class Absence:
    """The event starts a timer; unless an event passing `on` + `where` arrives within `within`, fire at t + within.

    At most one timer per rule and subscriber is pending: a start while one is pending is ignored.  An event
    passing `on` + `where` with t0 <= ts < t0 + within cancels it.  Timers fire as the watermark (the largest
    ts seen, less the engine's allowed lateness) reaches them (docs/rules.md, "absence").
    """

    on: tuple[int, ...]  # kind codes of the cancelling events, sorted
    where: Expr | None
    within: int  # milliseconds
    where_text: str = ""


Condition = Count | First | Changed | Sum | Distinct | After | Absence
CONDITION_KEYS = ("count", "first", "changed", "sum", "distinct", "after", "absence")
MAX_BUCKETS = 1024  # buckets a window may span: within / resolution, rounded up


def window_buckets(within: int, resolution: int) -> int:
    """Buckets a sum or distinct window may touch: within / resolution, rounded up."""
    return -(-within // resolution)


@dataclass(frozen=True)
class Goal:
    """What counts as the subscriber doing what a rule's instruction asked (SPEC section 8).

    An event passing `on` + `where` with ts in (t, t + within] of an
    instruction at t converts the earliest open instruction of the rule for
    that subscriber, once; treated and holdout alike.
    """

    on: tuple[int, ...]  # kind codes, sorted
    where: Expr | None
    within: int  # milliseconds
    where_text: str = ""


@dataclass(frozen=True)
class Active:
    """When a rule may match, in local time of [policy] timezone (SPEC section 8).

    A match needs the trigger's local date in [first_day, last_day] (both
    inclusive; None: unbounded), its ISO weekday in `days`, and its local
    time of day in `hours` = [start, end) minutes after midnight, wrapping
    midnight when start > end (None: all day; start == end: no time at all).
    """

    first_day: date | None = None
    last_day: date | None = None
    days: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
    hours: tuple[int, int] | None = None


@dataclass(frozen=True)
class Rule:
    id: str
    on: tuple[int, ...]  # kind codes, sorted
    where: Expr | None  # None: every event of the `on` kinds
    condition: Condition | None
    channels: tuple[str, ...]
    template: str
    params: tuple[str, ...]  # event columns the instruction carries
    priority: int
    cooldown: int  # milliseconds, 0 = none
    where_text: str = ""
    audience: Expr | None = None  # profile tests only; None: every subscriber
    audience_text: str = ""
    holdout: float = 0.0  # fraction of subscribers in the control group, [0, 1)
    decline_cooldown: int = 0  # milliseconds the rule rests for a subscriber after `declined`
    max_per_hour: int = 0  # guardrail: more instructions than this within an hour pauses the rule; 0 = none
    goal: Goal | None = None
    active: Active | None = None  # None: always active
    shadow: bool = False  # runs with full state and policy, counts what it would send, sends nothing


# Channels that push to the subscriber unless [policy] active_channels says otherwise.
DEFAULT_ACTIVE_CHANNELS = ("sms", "mms")
ALL_DAYS = (1, 2, 3, 4, 5, 6, 7)
MAX_CHANNELS = 64  # channel sets are 64-bit masks in the kernel


@dataclass(frozen=True)
class Policy:
    timezone: str = "UTC"
    cooldown: int = 0  # default rule cooldown, milliseconds
    decline_cooldown: int = 30 * 86_400_000  # default rest after `declined`, milliseconds
    daily_cap: int = 0  # instructions per subscriber and local day on active channels; 0 = no cap
    monthly_cap: int = 0  # the same per local calendar month; 0 = no cap
    quiet_hours: tuple[int, int] | None = None  # [start, end) local, minutes after midnight; wraps if start > end
    contact_days: tuple[int, ...] = ALL_DAYS  # ISO weekdays (1 = Monday) for active channels
    active_channels: tuple[str, ...] = DEFAULT_ACTIVE_CHANNELS


@dataclass(frozen=True)
class RuleSet:
    """A checked rules file.  Rule order is file order (it breaks priority ties)."""

    rules: tuple[Rule, ...]
    sets: dict[str, tuple[int, ...]] = field(default_factory=dict)
    policy: Policy = Policy()
    source: str = "<string>"
    text: str = ""  # the file as read: checkpoints carry it so a restore needs no other file
    # Sets read from files (name -> the file's path): a checkpoint stores their values beside `text`,
    # so a restore needs neither the rules file nor its set files.
    set_files: dict[str, str] = field(default_factory=dict)

    @property
    def channels(self) -> tuple[str, ...]:
        """Every channel the rules name, then the declared active ones: index = channel code."""
        names: dict[str, None] = {}
        for rule in self.rules:
            names.update(dict.fromkeys(rule.channels))
        names.update(dict.fromkeys(self.policy.active_channels))
        return tuple(names)


class RulesError(ValueError):
    """A rules file that cannot be compiled.

    The message names the file, the rule id (when the problem is inside a
    rule) and the offending text.
    """

    def __init__(self, source: str, rule_id: str | None, text: str | None, reason: str):
        self.source = source
        self.rule_id = rule_id
        self.text = text
        self.reason = reason
        message = source
        if rule_id is not None:
            message += f": rule {rule_id!r}"
        message += f": {reason}"
        if text is not None:
            message += f": {text!r}"
        super().__init__(message)


# ---------------------------------------------------------------------------
# Durations: "500ms", "30s", "15m", "2h", "30d", "1w", or combined "1d12h".

_DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
MAX_DURATION = 100 * 366 * 86_400_000  # keeps ts - W far from int64 overflow in the kernel
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w)")


def parse_duration(value: object) -> int:
    """A duration string as milliseconds; raises ValueError on anything else."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError("a duration is a string such as '30d', '2h', '15m', '90s' or '1d12h'")
    text = value.strip()
    pos, total = 0, 0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if not m:
            raise ValueError("a duration is a string such as '30d', '2h', '15m', '90s' or '1d12h'")
        total += int(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not text:
        raise ValueError("empty duration")
    if total > MAX_DURATION:
        raise ValueError("a duration is at most 100 years")
    return total


def format_duration(ms: int) -> str:
    """Milliseconds in the rules-file notation, the inverse of parse_duration: 129600000 -> '1d12h'."""
    if ms == 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s", "ms"):
        count, ms = divmod(ms, _DURATION_UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


# ---------------------------------------------------------------------------
# The `where` expression parser.

_TOKEN = re.compile(
    r"\s*(?:(?P<int>-?\d[\d_]*)|(?P<profile>profile\.[A-Za-z_][A-Za-z0-9_]*)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>==|!=|<=|>=|<|>)|(?P<punct>[()\[\],])|(?P<str>\"[^\"\\]*\"|'[^'\\]*'))"
)
_KEYWORDS = {"and", "or", "not", "in", "prefix", "has", "true", "false"}


class _ExprSyntaxError(Exception):
    pass


class _Parser:
    def __init__(self, text: str, sets: dict[str, tuple[int, ...]], profile_only: bool = False):
        self.text = text
        self.sets = sets
        self.profile_only = profile_only
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if not m:
                raise _ExprSyntaxError(f"unexpected character {text[pos:].lstrip()[:1]!r}")
            kind = m.lastgroup
            value = m.group(kind)
            if kind == "name" and value in _KEYWORDS:
                kind = value
            self.tokens.append((kind, value))
            pos = m.end()
        self.i = 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

    def take(self, kind: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if kind is not None and tok[0] != kind:
            found = tok[1] or "end of expression"
            raise _ExprSyntaxError(f"expected {kind}, found {found!r}")
        self.i += 1
        return tok

    def parse(self) -> Expr:
        expr = self.parse_or()
        if self.peek()[0] != "end":
            raise _ExprSyntaxError(f"unexpected {self.peek()[1]!r}")
        return expr

    def parse_or(self) -> Expr:
        items = [self.parse_and()]
        while self.peek()[0] == "or":
            self.take()
            items.append(self.parse_and())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def parse_and(self) -> Expr:
        items = [self.parse_unary()]
        while self.peek()[0] == "and":
            self.take()
            items.append(self.parse_unary())
        return items[0] if len(items) == 1 else And(tuple(items))

    def parse_unary(self) -> Expr:
        kind, _ = self.peek()
        if kind == "not":
            self.take()
            return Not(self.parse_unary())
        if kind == "punct" and self.peek()[1] == "(":
            self.take()
            expr = self.parse_or()
            if self.take("punct")[1] != ")":
                raise _ExprSyntaxError("expected ')'")
            return expr
        return self.parse_test()

    def parse_test(self) -> Expr:
        if self.peek()[0] == "profile":
            return self.parse_profile_test()
        if self.profile_only:
            found = self.peek()[1] or "end of expression"
            raise _ExprSyntaxError(f"an audience tests profile fields only (profile.NAME), not {found!r}")
        _, column = self.take("name")
        if column not in EVENT_COLUMNS:
            raise _ExprSyntaxError(f"unknown column {column!r} (columns: {', '.join(EVENT_COLUMNS)})")
        kind, value = self.take()
        if kind == "op":
            if self.peek()[0] in ("str", "true", "false"):
                raise _ExprSyntaxError(f"{column!r} is an event column: it compares with integers; strings and "
                                       "true/false compare with profile fields (profile.NAME)")
            return Compare(column, value, self.integer(self.take("int")[1]))
        if kind == "has":
            raise _ExprSyntaxError(f"'has' tests a list of a profile field (profile.NAME), not {column!r}")
        if kind == "in":
            values, set_name = self.values()
            return InSet(column, values, set_name)
        if kind == "not" and self.peek()[0] == "in":
            self.take()
            values, set_name = self.values()
            return Not(InSet(column, values, set_name))
        if kind == "prefix":
            if self.peek()[0] == "int":
                prefixes, set_name = (self.integer(self.take()[1]),), None
            else:
                prefixes, set_name = self.values()
            for p in prefixes:
                if p <= 0:
                    raise _ExprSyntaxError(f"a prefix is a positive number, not {p}")
            return Prefix(column, prefixes, set_name)
        raise _ExprSyntaxError(f"expected a comparison, 'in' or 'prefix' after {column!r}, found {value or 'end'!r}")

    def parse_profile_test(self) -> Expr:
        _, name = self.take("profile")
        field = name.split(".", 1)[1]
        kind, value = self.take()
        if kind == "op":
            literal_kind, literal = self.take()
            if literal_kind == "int":
                return ProfileTest(field, value, self.integer(literal))
            if literal_kind in ("str", "true", "false"):
                if value not in ("==", "!="):
                    raise _ExprSyntaxError(f"{value!r} orders integers; a string or true/false takes == or !=")
                if literal_kind == "str":
                    return ProfileTest(field, value, literal[1:-1])
                return ProfileTest(field, value, literal_kind == "true")
            raise _ExprSyntaxError(f"expected an integer, a string or true/false after {name} {value}, "
                                   f"found {literal or 'end'!r}")
        if kind == "in":
            return ProfileTest(field, "in", self.profile_values(name))
        if kind == "not" and self.peek()[0] == "in":
            self.take()
            return Not(ProfileTest(field, "in", self.profile_values(name)))
        if kind == "has":
            literal_kind, literal = self.take()
            if literal_kind != "str":
                raise _ExprSyntaxError(f"'has' takes a string tag, e.g. {name} has \"car_owner\"")
            return ProfileTest(field, "has", literal[1:-1])
        raise _ExprSyntaxError(f"expected a comparison, 'in' or 'has' after {name}, found {value or 'end'!r}")

    def profile_values(self, name: str) -> tuple[int, ...] | tuple[str, ...]:
        """A literal list of integers or of strings (never mixed) after `profile.NAME in`; or a named set."""
        if self.peek()[0] == "name":
            return self.values()[0]
        if self.peek() != ("punct", "["):
            raise _ExprSyntaxError(f"expected a list [...] or a set name after {name} in, "
                                   f"found {self.peek()[1] or 'end'!r}")
        self.take()
        items: list[tuple[str, str]] = []
        while True:
            items.append(self.take())
            sep = self.take("punct")[1]
            if sep == "]":
                break
            if sep != ",":
                raise _ExprSyntaxError("expected ',' or ']' in a list")
            if self.peek() == ("punct", "]"):
                self.take()
                break
        kinds = {kind for kind, _ in items}
        if kinds == {"int"}:
            return tuple(sorted({self.integer(text) for _, text in items}))
        if kinds == {"str"}:
            return tuple(sorted({text[1:-1] for _, text in items}))
        raise _ExprSyntaxError(f"a list after {name} in holds integers or strings, not both nor anything else")

    def values(self) -> tuple[tuple[int, ...], str | None]:
        kind, value = self.peek()
        if kind == "name":
            self.take()
            if value not in self.sets:
                known = ", ".join(sorted(self.sets)) or "none defined"
                raise _ExprSyntaxError(f"unknown set {value!r} (sets: {known})")
            return self.sets[value], value
        if kind == "punct" and value == "[":
            self.take()
            values = []
            while True:
                values.append(self.integer(self.take("int")[1]))
                sep = self.take("punct")[1]
                if sep == "]":
                    break
                if sep != ",":
                    raise _ExprSyntaxError("expected ',' or ']' in a list")
                if self.peek() == ("punct", "]"):
                    self.take()
                    break
            return tuple(sorted(set(values))), None
        raise _ExprSyntaxError(f"expected a list [...] or a set name, found {value or 'end'!r}")

    @staticmethod
    def integer(text: str) -> int:
        value = int(text.replace("_", ""))
        if not -(2**63) <= value < 2**63:
            raise _ExprSyntaxError(f"integer {text} does not fit 64 bits")
        return value


def parse_where(text: str, sets: dict[str, tuple[int, ...]] | None = None, profile_only: bool = False) -> Expr:
    """Parse one `where` expression (an `audience` with profile_only); raises ValueError with the reason."""
    try:
        return _Parser(text, sets or {}, profile_only).parse()
    except _ExprSyntaxError as exc:
        raise ValueError(str(exc)) from None


# ---------------------------------------------------------------------------
# The TOML layer.

_RULE_KEYS = {
    "id", "on", "where", "channels", "template", "params", "priority", "cooldown", *CONDITION_KEYS,
    "holdout", "decline_cooldown", "max_per_hour", "goal", "active", "shadow", "audience",
}
_TOP_KEYS = {"policy", "sets", "rule"}
_POLICY_KEYS = {
    "timezone", "cooldown", "decline_cooldown", "daily_cap", "monthly_cap", "quiet_hours", "contact_days",
    "active_channels",
}
MAX_PER_HOUR = 1_000_000  # the guardrail keeps this many timestamps per rule
_CLOCK = re.compile(r"([01]\d|2[0-3]):([0-5]\d)\Z")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}\Z")
_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
_INT64 = (-(2**63), 2**63 - 1)
_INTEGER = re.compile(r"[+-]?\d+\Z")


def _int_list(values: object) -> tuple[int, ...] | None:
    if not isinstance(values, list):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and _INT64[0] <= v <= _INT64[1] for v in values):
        return None
    return tuple(sorted(set(values)))


class _RuleBuilder:
    """Checks one [[rule]] table; every error names the rule and its text."""

    def __init__(self, source: str, table: dict, position: int, sets: dict, policy: Policy):
        self.source = source
        self.table = table
        self.sets = sets
        self.policy = policy
        raw_id = table.get("id")
        self.rule_id = raw_id if isinstance(raw_id, str) else f"#{position + 1}"

    def fail(self, reason: str, text: object = None) -> RulesError:
        return RulesError(self.source, self.rule_id, None if text is None else str(text), reason)

    def build(self) -> Rule:
        t = self.table
        unknown = sorted(set(t) - _RULE_KEYS)
        if unknown:
            raise self.fail(f"unknown key (keys: {', '.join(sorted(_RULE_KEYS))})", unknown[0])
        if "id" not in t:
            raise self.fail("missing 'id'")
        if not isinstance(t["id"], str) or not _ID.match(t["id"]):
            raise self.fail("'id' must be a name of letters, digits, '_', '.', '-'", t["id"])
        conditions = [k for k in CONDITION_KEYS if k in t]
        if len(conditions) > 1:
            raise self.fail("a rule has at most one stateful condition", ", ".join(conditions))
        where_text = t.get("where", "")
        where = self.where("where", where_text)
        audience_text = t.get("audience", "")
        audience = self.where("audience", audience_text, profile_only=True)
        return Rule(
            id=t["id"],
            on=self.kinds(),
            where=where,
            condition=self.condition(conditions[0]) if conditions else None,
            channels=self.channels(),
            template=self.string("template", default=t["id"]),
            params=self.params(),
            priority=self.integer("priority", default=0),
            cooldown=self.duration("cooldown", default=self.policy.cooldown),
            where_text=where_text,
            audience=audience,
            audience_text=audience_text,
            holdout=self.holdout(),
            decline_cooldown=self.duration("decline_cooldown", default=self.policy.decline_cooldown),
            max_per_hour=self.max_per_hour(),
            goal=self.goal(),
            active=self.active(),
            shadow=self.boolean("shadow", default=False),
        )

    def where(self, key: str, text: object, profile_only: bool = False) -> Expr | None:
        if not isinstance(text, str):
            raise self.fail(f"'{key}' must be a string", text)
        try:
            return parse_where(text, self.sets, profile_only) if text.strip() else None
        except ValueError as exc:
            raise self.fail(f"{key}: {exc}", text) from None

    def kinds(self, key: str = "on", on: object = None) -> tuple[int, ...]:
        if key == "on":
            on = self.table.get("on")
        if on is None:
            raise self.fail(f"missing '{key}' (the event kinds the rule listens to)")
        names = [on] if isinstance(on, str) else on
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise self.fail(f"'{key}' is a kind name or a list of kind names", on)
        for name in names:
            if name not in KIND_CODES:
                raise self.fail(f"{key}: unknown event kind (kinds: {', '.join(KIND_CODES)})", name)
        return tuple(sorted({KIND_CODES[n] for n in names}))

    def holdout(self) -> float:
        value = self.table.get("holdout", 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise self.fail("'holdout' is a fraction from 0 up to (not including) 1, e.g. 0.1", value)
        return float(value)

    def max_per_hour(self) -> int:
        value = self.table.get("max_per_hour", 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PER_HOUR:
            raise self.fail(f"'max_per_hour' is an integer from 1 to {MAX_PER_HOUR:,} (0: no guardrail)", value)
        return value

    def goal(self) -> Goal | None:
        spec = self.table.get("goal")
        if spec is None:
            return None
        example = '{ on = "recharge", where = "amount >= 1000", within = "24h" }'
        if not isinstance(spec, dict) or not {"on", "within"} <= set(spec) or set(spec) - {"on", "where", "within"}:
            raise self.fail(f"'goal' takes on, within and an optional where, e.g. {example}", spec)
        within = self.duration_value("goal.within", spec["within"])
        if within <= 0:
            raise self.fail("goal: 'within' must be positive", spec["within"])
        where_text = spec.get("where", "")
        return Goal(self.kinds("goal.on", spec["on"]), self.where("goal.where", where_text), within, where_text)

    def active(self) -> Active | None:
        spec = self.table.get("active")
        if spec is None:
            return None
        example = '{ from = "2026-12-01", until = "2026-12-31", days = [1, 2, 3, 4, 5], hours = "09:00-21:00" }'
        if not isinstance(spec, dict) or set(spec) - {"from", "until", "days", "hours"}:
            raise self.fail(f"'active' takes from, until, days and hours, each optional, e.g. {example}", spec)
        bounds = []
        for key in ("from", "until"):
            value = spec.get(key)
            if isinstance(value, str) and _DATE.match(value):
                try:
                    value = date.fromisoformat(value)
                except ValueError:
                    pass
            if value is not None and (not isinstance(value, date) or hasattr(value, "hour")):
                raise self.fail(f"active.{key}: a local date \"YYYY-MM-DD\"", value)
            bounds.append(value)
        days = ALL_DAYS
        if "days" in spec:
            days = _int_list(spec["days"])
            if days is None or not set(days) <= set(ALL_DAYS):
                raise self.fail("active.days: a list of ISO weekdays, 1 (Monday) to 7 (Sunday)", spec["days"])
        hours = None
        if "hours" in spec:
            hours = _clock_range(spec["hours"])
            if hours is None:
                raise self.fail('active.hours: "HH:MM-HH:MM" local time, [start, end), e.g. "09:00-21:00"',
                                spec["hours"])
        return Active(bounds[0], bounds[1], days, hours)

    def condition(self, key: str) -> Condition:
        spec = self.table[key]
        if not isinstance(spec, dict):
            raise self.fail(f"'{key}' is a table, e.g. {_CONDITION_EXAMPLES[key]}", spec)
        if key in ("sum", "distinct"):
            return self.bucketed(key, spec)
        if key == "absence":
            return self.absence(spec)
        if key == "after":
            if set(spec) != {"rule", "within"} or not isinstance(spec["rule"], str):
                raise self.fail(f"'after' takes exactly rule and within, e.g. {_CONDITION_EXAMPLES[key]}", spec)
            within = self.duration_value("after.within", spec["within"])
            if within <= 0:
                raise self.fail("after: 'within' must be positive", spec["within"])
            if spec["rule"] == self.rule_id:
                raise self.fail("after: a rule cannot follow itself", spec["rule"])
            return After(spec["rule"], within)  # parse_rules checks that the rule exists
        expected = {"count": {"at_least", "within"}, "first": {"within"}, "changed": {"column"}}[key]
        if set(spec) != expected:
            raise self.fail(f"'{key}' takes exactly {sorted(expected)}, e.g. {_CONDITION_EXAMPLES[key]}", spec)
        if key == "changed":
            column = spec["column"]
            if column not in EVENT_COLUMNS or column in ("ts", "msisdn"):
                raise self.fail("changed: 'column' must be an event column other than ts and msisdn", column)
            return Changed(column)
        within = self.duration_value(f"{key}.within", spec["within"])
        if within <= 0:
            raise self.fail(f"{key}: 'within' must be positive", spec["within"])
        if key == "first":
            return First(within)
        at_least = spec["at_least"]
        if isinstance(at_least, bool) or not isinstance(at_least, int) or not 1 <= at_least <= 1024:
            raise self.fail("count: 'at_least' must be an integer from 1 to 1024", at_least)
        return Count(at_least, within)

    def absence(self, spec: dict) -> Absence:
        if not {"on", "within"} <= set(spec) or set(spec) - {"on", "where", "within"}:
            raise self.fail(f"'absence' takes on, within and an optional where, e.g. {_CONDITION_EXAMPLES['absence']}",
                            spec)
        within = self.duration_value("absence.within", spec["within"])
        if within <= 0:
            raise self.fail("absence: 'within' must be positive", spec["within"])
        where_text = spec.get("where", "")
        return Absence(self.kinds("absence.on", spec["on"]), self.where("absence.where", where_text), within,
                       where_text)

    def bucketed(self, key: str, spec: dict) -> Sum | Distinct:
        required = {"column", "at_least", "within"}
        if not required <= set(spec) or set(spec) - required - {"resolution"}:
            raise self.fail(f"'{key}' takes column, at_least, within and an optional resolution, "
                            f"e.g. {_CONDITION_EXAMPLES[key]}", spec)
        column = spec["column"]
        if column not in EVENT_COLUMNS or column in ("ts", "msisdn", "kind"):
            raise self.fail(f"{key}: 'column' must be an event column other than ts, msisdn and kind", column)
        within = self.duration_value(f"{key}.within", spec["within"])
        if within <= 0:
            raise self.fail(f"{key}: 'within' must be positive", spec["within"])
        resolution = max(within // 12, 1)
        if "resolution" in spec:
            resolution = self.duration_value(f"{key}.resolution", spec["resolution"])
            if not 0 < resolution <= within or window_buckets(within, resolution) > MAX_BUCKETS:
                raise self.fail(f"{key}: 'resolution' must be positive, at most 'within', and at least "
                                f"within / {MAX_BUCKETS}", spec["resolution"])
        at_least = spec["at_least"]
        if key == "sum":
            if isinstance(at_least, bool) or not isinstance(at_least, int) or not 1 <= at_least < 2**62:
                raise self.fail("sum: 'at_least' must be a positive integer below 2**62", at_least)
            return Sum(column, at_least, within, resolution)
        if isinstance(at_least, bool) or not isinstance(at_least, int) or not 1 <= at_least <= 1024:
            raise self.fail("distinct: 'at_least' must be an integer from 1 to 1024", at_least)
        return Distinct(column, at_least, within, resolution)

    def channels(self) -> tuple[str, ...]:
        channels = self.table.get("channels")
        if channels is None:
            raise self.fail("missing 'channels' (preference-ordered list, e.g. [\"sms\", \"portal\"])")
        if (
            not isinstance(channels, list)
            or not channels
            or not all(isinstance(c, str) and _ID.match(c) for c in channels)
            or len(set(channels)) != len(channels)
        ):
            raise self.fail("'channels' is a non-empty list of distinct channel names", channels)
        return tuple(channels)

    def params(self) -> tuple[str, ...]:
        params = self.table.get("params", [])
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise self.fail("'params' is a list of event column names", params)
        for p in params:
            if p not in EVENT_COLUMNS:
                raise self.fail(f"params: unknown column (columns: {', '.join(EVENT_COLUMNS)})", p)
        return tuple(params)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"'{key}' must be true or false", value)
        return value

    def string(self, key: str, default: str) -> str:
        value = self.table.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.fail(f"'{key}' must be a non-empty string", value)
        return value

    def integer(self, key: str, default: int) -> int:
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not -(2**31) <= value < 2**31:
            raise self.fail(f"'{key}' must be a 32-bit integer", value)
        return value

    def duration(self, key: str, default: int) -> int:
        if key not in self.table:
            return default
        return self.duration_value(key, self.table[key])

    def duration_value(self, key: str, value: object) -> int:
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.fail(f"{key}: {exc}", value) from None


_CONDITION_EXAMPLES = {
    "count": '{ at_least = 3, within = "30d" }',
    "first": '{ within = "30d" }',
    "changed": '{ column = "imei" }',
    "sum": '{ column = "amount", at_least = 10000, within = "7d", resolution = "14h" }',
    "distinct": '{ column = "cell", at_least = 5, within = "1d" }',
    "after": '{ rule = "roaming_welcome", within = "2h" }',
    "absence": '{ on = "recharge", where = "amount > 0", within = "2h" }',
}


def _policy(source: str, table: object) -> Policy:
    if not isinstance(table, dict):
        raise RulesError(source, None, str(table), "[policy] must be a table")
    unknown = sorted(set(table) - _POLICY_KEYS)
    if unknown:
        raise RulesError(source, None, unknown[0], f"[policy]: unknown key (keys: {', '.join(sorted(_POLICY_KEYS))})")

    def fail(key: str, reason: str) -> RulesError:
        return RulesError(source, None, f"{key} = {table[key]!r}", f"[policy] {key}: {reason}")

    timezone = table.get("timezone", "UTC")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise RulesError(source, None, str(timezone), "[policy]: unknown time zone") from None
    durations = {}
    for key in ("cooldown", "decline_cooldown"):
        if key in table:
            try:
                durations[key] = parse_duration(table[key])
            except ValueError as exc:
                raise fail(key, str(exc)) from None
    caps = {}
    for key in ("daily_cap", "monthly_cap"):
        value = table.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            raise fail(key, "a cap is a non-negative integer (0: no cap)")
        caps[key] = value
    quiet = None
    if "quiet_hours" in table:
        quiet = _quiet_hours(table["quiet_hours"])
        if quiet is None:
            raise fail("quiet_hours", 'quiet hours are "HH:MM-HH:MM" local time, start != end, e.g. "21:00-09:00"')
    days = ALL_DAYS
    if "contact_days" in table:
        days = _int_list(table["contact_days"])
        if not days or not set(days) <= set(ALL_DAYS):
            raise fail("contact_days", "contact days are a non-empty list of ISO weekdays, 1 (Monday) to 7 (Sunday)")
    active = DEFAULT_ACTIVE_CHANNELS
    if "active_channels" in table:
        active = table["active_channels"]
        if (
            not isinstance(active, list)
            or not all(isinstance(c, str) and _ID.match(c) for c in active)
            or len(set(active)) != len(active)
        ):
            raise fail("active_channels", "a list of distinct channel names, e.g. [\"sms\", \"mms\"]")
        active = tuple(active)
    defaults = Policy()
    return Policy(
        timezone=timezone,
        cooldown=durations.get("cooldown", defaults.cooldown),
        decline_cooldown=durations.get("decline_cooldown", defaults.decline_cooldown),
        daily_cap=caps["daily_cap"],
        monthly_cap=caps["monthly_cap"],
        quiet_hours=quiet,
        contact_days=days,
        active_channels=active,
    )


def _quiet_hours(value: object) -> tuple[int, int] | None:
    """"21:00-09:00" -> (1260, 540); None when malformed or start == end."""
    bounds = _clock_range(value)
    if bounds is None or bounds[0] == bounds[1]:
        return None
    return bounds


def _clock_range(value: object) -> tuple[int, int] | None:
    """"21:00-09:00" -> (1260, 540), minutes after midnight; None when malformed."""
    if not isinstance(value, str) or value.count("-") != 1:
        return None
    bounds = []
    for part in value.split("-"):
        m = _CLOCK.match(part.strip())
        if not m:
            return None
        bounds.append(int(m.group(1)) * 60 + int(m.group(2)))
    return bounds[0], bounds[1]


def _sets(
    source: str, table: object, base: Path | None, stored: dict[str, tuple[int, ...]]
) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The [sets] table: name -> sorted unique values, and name -> path for the sets read from files.

    A set read from a file takes its values from `stored` when that holds it
    (a checkpoint's copy), so a restore never reads the file again.
    """
    if not isinstance(table, dict):
        raise RulesError(source, None, str(table), "[sets] must be a table of name = [numbers]")
    sets, files = {}, {}
    for name, values in table.items():
        if not _ID.match(name) or name in _KEYWORDS or name in EVENT_COLUMNS:
            raise RulesError(source, None, name, "[sets]: a set name is an identifier that is not a column or keyword")
        if isinstance(values, dict):
            path = _set_file_path(source, name, values, base, must_resolve=name not in stored)
            files[name] = str(path)
            sets[name] = stored[name] if name in stored else _read_set_file(source, name, path, values.get("column"))
            continue
        parsed = _int_list(values)
        if not parsed:  # an empty file is a set switched off; an empty list is a slip
            raise RulesError(source, None, f"{name} = {values}", "[sets]: a set is a non-empty list of 64-bit "
                             'integers, or { file = "cells.txt" } or { file = "cells.csv", column = "cell" }')
        sets[name] = parsed
    return sets, files


def _set_file_path(source: str, name: str, spec: dict, base: Path | None, must_resolve: bool) -> Path:
    if not (set(spec) == {"file"} or set(spec) == {"file", "column"}) or not isinstance(spec["file"], str) or (
            not isinstance(spec.get("column", ""), str)):
        raise RulesError(source, None, f"{name} = {spec}", '[sets]: a set file is { file = "cells.txt" } '
                         '(one integer a line) or { file = "cells.csv", column = "cell" }')
    path = Path(spec["file"])
    if not path.is_absolute():
        if base is None and must_resolve:
            raise RulesError(source, None, spec["file"], f"[sets] {name}: a relative set file needs the rules "
                             "file's directory; load the rules from a file or give an absolute path")
        path = path if base is None else base / path
    return path


def _read_set_file(source: str, name: str, path: Path, column: str | None) -> tuple[int, ...]:
    """Values of a set file: one integer a line (blank lines and # comments allowed), or a CSV column."""

    def fail(reason: str, text: str | None = None) -> RulesError:
        return RulesError(source, None, text, f"[sets] {name}: set file {path}: {reason}")

    if column is not None:
        return _read_set_csv(path, column, fail)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 text (byte {exc.start})") from None
    values = []
    for number, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        if not _INTEGER.match(item) or not _INT64[0] <= int(item) <= _INT64[1]:
            raise fail(f"line {number} is not a 64-bit integer", line)
        values.append(int(item))
    return tuple(sorted(set(values)))


def _read_set_csv(path: Path, column: str, fail) -> tuple[int, ...]:
    # Read as text, so a bad value is reported with its line rather than as a type guess of pyarrow's.
    try:
        table = csv.read_csv(path, convert_options=csv.ConvertOptions(column_types={column: pa.string()}))
    except FileNotFoundError:
        raise fail("cannot read: No such file or directory") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise fail(f"cannot read as CSV with a header line: {exc}") from None
    if column not in table.column_names:
        raise fail(f"no column {column!r} (columns: {', '.join(table.column_names)})")
    text = pc.utf8_trim_whitespace(table.column(column))
    try:
        values = pc.cast(text, pa.int64())
        if values.null_count:
            raise pa.ArrowInvalid("empty value")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for row, item in enumerate(text.to_pylist()):
            if item is None or not _INTEGER.match(item) or not _INT64[0] <= int(item) <= _INT64[1]:
                raise fail(f"row {row + 1} after the header, column {column!r}, is not a 64-bit integer",
                           item) from None
        raise fail(f"column {column!r} does not hold 64-bit integers") from None
    return tuple(sorted(set(values.to_pylist())))


def parse_rules(
    text: str,
    source: str = "<string>",
    base: str | Path | None = None,
    set_values: dict[str, tuple[int, ...]] | None = None,
) -> RuleSet:
    """Parse and check the text of a rules file.

    `base` is the directory set files are relative to (load_rules passes the
    file's); without it only absolute set-file paths are read.  `set_values`
    holds the values of file sets already read (a checkpoint's), used instead
    of reading those files.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(source, None, None, f"not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise RulesError(source, None, unknown[0], "unknown top-level key (expected [policy], [sets], [[rule]])")
    policy = _policy(source, doc.get("policy", {}))
    sets, set_files = _sets(source, doc.get("sets", {}), None if base is None else Path(base),
                            {name: tuple(values) for name, values in (set_values or {}).items()})
    tables = doc.get("rule", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RulesError(source, None, None, "rules are [[rule]] tables")
    rules = []
    seen = set()
    for position, table in enumerate(tables):
        rule = _RuleBuilder(source, table, position, sets, policy).build()
        if rule.id in seen:
            raise RulesError(source, rule.id, rule.id, "duplicate rule id")
        seen.add(rule.id)
        rules.append(rule)
    for rule in rules:
        if isinstance(rule.condition, After) and rule.condition.rule not in seen:
            raise RulesError(source, rule.id, rule.condition.rule, "after: no rule with this id in the file")
    ruleset = RuleSet(rules=tuple(rules), sets=sets, policy=policy, source=source, text=text, set_files=set_files)
    if len(ruleset.channels) > MAX_CHANNELS:
        raise RulesError(source, None, ", ".join(ruleset.channels[MAX_CHANNELS:]),
                         f"at most {MAX_CHANNELS} distinct channels in one rules file")
    return ruleset


def load_rules(path: str | Path) -> RuleSet:
    """Read and check a rules file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(str(path), None, None, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise RulesError(str(path), None, None, f"not UTF-8 text (byte {exc.start})") from None
    return parse_rules(text, source=str(path), base=path.parent)
