"""What a checked rule does, in words, and what in it can never happen: `kairos check`'s plan and warnings.

The plan shows the filter as the kernel evaluates it (engine.compiler's
order: cheapest test first, and/or stopping early), the condition and the
active period.  Warnings name what is legal but almost surely a mistake:

- a rule that can never fire: comparisons on one column that no value
  satisfies (`duration > 60 and duration < 30`), `in` an empty set, an active
  period that ends before it starts or whose days or hours exclude every
  moment;
- a filter on a field that none of the rule's kinds carries
  (engine.schema.KIND_FIELDS): the field reads 0 on every event it sees;
- a channel name that is neither a built-in channel nor an installed
  plug-in's (the `kairos.channels` entry points): a typo, unless the daemon's
  config names a channel so (`[channels.NAME]`), which this check cannot see.

Warnings are conservative: a warning is a proof, silence is not (the channel
warning excepted: it proves only that no channel type has that name).
"""

from __future__ import annotations

from datetime import timedelta
from importlib.metadata import entry_points

from adapters.channels import BUILTIN_CHANNELS, ENTRY_POINT_GROUP
from engine.compiler import evaluation_order, profile_tests
from engine.rules import (
    Absence,
    Active,
    After,
    And,
    Changed,
    Compare,
    Count,
    Distinct,
    Expr,
    First,
    InSet,
    Not,
    Or,
    Prefix,
    ProfileTest,
    Rule,
    RuleSet,
    Sum,
    format_duration,
)
from engine.schema import KIND_FIELDS, KINDS

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_ALWAYS_CARRIED = ("ts", "msisdn", "kind")
_SHOWN_VALUES = 6  # a longer literal list is shown by its first values and its size
_INT64 = (-(2**63), 2**63 - 1)
_NEGATED = {"==": "!=", "!=": "==", "<": ">=", "<=": ">", ">": "<=", ">=": "<"}


def describe_condition(rule: Rule) -> str:
    cond = rule.condition
    if cond is None:
        return "none (every event that passes on + where)"
    if isinstance(cond, Count):
        return f"count: at least {cond.at_least} within {format_duration(cond.within)}"
    if isinstance(cond, First):
        return f"first: none in the previous {format_duration(cond.within)}"
    if isinstance(cond, Changed):
        return f"changed: {cond.column} differs from its last non-zero value"
    if isinstance(cond, Sum):
        return (f"sum: {cond.column} adds up to at least {cond.at_least} within {format_duration(cond.within)}"
                f" (in buckets of {format_duration(cond.resolution)})")
    if isinstance(cond, Distinct):
        return (f"distinct: at least {cond.at_least} different non-zero {cond.column} values within "
                f"{format_duration(cond.within)} (in buckets of {format_duration(cond.resolution)})")
    if isinstance(cond, After):
        return f"after: rule {cond.rule} matched on an earlier event within {format_duration(cond.within)}"
    if isinstance(cond, Absence):
        cancel = ", ".join(KINDS[k] for k in cond.on)
        if cond.where is not None:
            cancel += f" where {describe_filter(cond.where)}"
        return (f"absence: starts a timer; fires {format_duration(cond.within)} later unless {cancel} "
                f"comes first (the instruction's time is the timer's)")
    return repr(cond)  # pragma: no cover - the parser builds nothing else


def clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def describe_active(active: Active | None, timezone: str) -> str:
    """The active period in words, in the rules file's time zone."""
    if active is None:
        return "always"
    parts = []
    if active.first_day is not None and active.last_day is not None:
        parts.append(f"from {active.first_day} until {active.last_day} (both inclusive)")
    elif active.first_day is not None:
        parts.append(f"from {active.first_day} on")
    elif active.last_day is not None:
        parts.append(f"until {active.last_day} (inclusive)")
    if active.days != (1, 2, 3, 4, 5, 6, 7):
        parts.append(f"on {', '.join(WEEKDAYS[d - 1] for d in active.days) or 'no day'}")
    if active.hours is not None:
        start, end = active.hours
        wraps = " (wraps midnight)" if start > end else ""
        parts.append(f"{clock(start)}-{clock(end)}{wraps}")
    return f"{', '.join(parts) or 'always'} local time ({timezone})"


def describe_filter(expr: Expr | None) -> str:
    """The filter in the order the kernel evaluates it."""
    if expr is None:
        return "(none: every event of these kinds)"
    return _render(expr, top=True)


def describe_audience(audience: Expr | None) -> str:
    """The audience in words; tested per match, after the condition and the active period."""
    if audience is None:
        return "everyone"
    return f"{_render(audience, top=True)} (tested at trigger time, after the condition and active period)"


def describe_profile_fields(rule: Rule) -> str | None:
    """The profile fields a rule tests, and what a missing one means; None when it tests none."""
    tests = profile_tests(rule.where) + profile_tests(rule.audience)
    if not tests:
        return None
    fields = ", ".join(dict.fromkeys(test.field for test in tests))
    return f"{fields}; a test on a field the subscriber's profile lacks is false (no profile: every test false)"


def _literal(value: int | bool | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def _render_profile(test: ProfileTest) -> str:
    field = f"profile field {test.field}"
    if test.op == "has":
        return f"{field} holds tag {_literal(test.value)}"
    if test.op == "in":
        shown = [_literal(v) for v in test.value]
        if len(shown) > _SHOWN_VALUES:
            shown = [*shown[:_SHOWN_VALUES], f"... {len(shown):,} values"]
        return f"{field} is one of [{', '.join(shown)}]"
    if test.op == "==":
        return f"{field} is {_literal(test.value)}"
    if test.op == "!=":
        return f"{field} is set and is not {_literal(test.value)}"
    return f"{field} {test.op} {test.value}"


def _values(values: tuple[int, ...], set_name: str | None) -> str:
    if set_name is not None:
        return f"{set_name} ({len(values):,} values)"
    if len(values) > _SHOWN_VALUES:
        return f"[{', '.join(map(str, values[:_SHOWN_VALUES]))}, ... {len(values):,} values]"
    return f"[{', '.join(map(str, values))}]"


def _render(expr: Expr, top: bool = False) -> str:
    if isinstance(expr, ProfileTest):
        return _render_profile(expr)
    if isinstance(expr, Compare):
        return f"{expr.column} {expr.op} {expr.value}"
    if isinstance(expr, InSet):
        return f"{expr.column} in {_values(expr.values, expr.set_name)}"
    if isinstance(expr, Prefix):
        return f"{expr.column} prefix {_values(expr.prefixes, expr.set_name)}"
    if isinstance(expr, Not):
        if isinstance(expr.item, InSet):
            return f"{expr.item.column} not in {_values(expr.item.values, expr.item.set_name)}"
        return f"not {_render(expr.item)}"
    word = " and then " if isinstance(expr, And) else " or else "
    text = word.join(_render(item) for item in evaluation_order(expr.items))
    return text if top else f"({text})"


# ---------------------------------------------------------------------------
# Warnings.


def rule_warnings(rule: Rule, ruleset: RuleSet | None = None) -> list[str]:
    """Why `rule` can never fire, and filters on fields its kinds never carry.

    With the `ruleset` it belongs to, also `after` chains that lead back to the rule.
    """
    warnings = []
    if ruleset is not None and isinstance(rule.condition, After):
        cycle = _after_cycle(rule, ruleset)
        if cycle is not None:
            warnings.append(f"never fires: each rule of {' -> '.join(cycle)} needs the next to have matched first")
    if rule.where is not None:
        reason = _never(rule.where)
        if reason is not None:
            warnings.append(f"never fires: the filter cannot hold: {reason}")
    if rule.active is not None:
        reason = _empty_period(rule.active)
        if reason is not None:
            warnings.append(f"never fires: the active period holds no moment: {reason}")
    used = _columns(rule.where) if rule.where is not None else []
    if isinstance(rule.condition, (Changed, Sum, Distinct)) and rule.condition.column not in used:
        used.append(rule.condition.column)
    for column in used:
        # A rule over several kinds may well test a field only some of them carry (amount > 0 picks the
        # recharges out of balance and recharge events); a field none of them carries is always 0.
        kinds = [KINDS[k] for k in rule.on]
        if column not in _ALWAYS_CARRIED and not any(column in KIND_FIELDS[kind] for kind in kinds):
            warnings.append(f"field {column} is never carried by {', '.join(kinds)} events (it reads 0 there)")
    for channel in _unknown_channels(rule.channels):
        warnings.append(f"channel {channel} is neither a built-in channel ({', '.join(BUILTIN_CHANNELS)}) nor an "
                        f"installed plug-in's: with an outbox, kairos run refuses the rule unless its config has "
                        f"[channels.{channel}]")
    return warnings


def _unknown_channels(channels: tuple[str, ...]) -> list[str]:
    """The names in `channels` that no channel type has (built-in, or a `kairos.channels` entry point)."""
    unknown = [c for c in channels if c not in BUILTIN_CHANNELS]
    if unknown:  # only then look the plug-ins up
        plugins = {point.name for point in entry_points(group=ENTRY_POINT_GROUP)}
        unknown = [c for c in unknown if c not in plugins]
    return unknown


def _after_cycle(rule: Rule, ruleset: RuleSet) -> list[str] | None:
    """The chain of `after` conditions from `rule` back to itself, if it has one."""
    by_id = {r.id: r for r in ruleset.rules}
    chain = [rule.id]
    current = rule
    while isinstance(current.condition, After):
        followed = current.condition.rule
        if followed == rule.id:
            return [*chain, rule.id]
        if followed in chain or followed not in by_id:
            return None  # a cycle that does not pass through `rule`: reported on its own rules
        chain.append(followed)
        current = by_id[followed]
    return None


def _columns(expr: Expr) -> list[str]:
    """Columns an expression reads, in order of first appearance."""
    if isinstance(expr, Compare | InSet | Prefix):
        return [expr.column]
    if isinstance(expr, ProfileTest):  # a profile field: never an event column's "not carried" case
        return []
    if isinstance(expr, Not):
        return _columns(expr.item)
    found: dict[str, None] = {}
    for item in expr.items:
        found.update(dict.fromkeys(_columns(item)))
    return list(found)


def _never(expr: Expr) -> str | None:
    """Why expr is false for every event, or None when that is not proven."""
    if isinstance(expr, InSet) and not expr.values:
        return f"{_render(expr)} is empty"
    if isinstance(expr, Prefix) and not expr.prefixes:
        return f"{_render(expr)} is empty"
    if isinstance(expr, Or):
        reasons = [_never(item) for item in expr.items]
        return "; ".join(reasons) if all(reasons) else None  # type: ignore[arg-type]
    if isinstance(expr, And):
        items = _flatten_and(expr)
        for item in items:
            reason = _never(item)
            if reason is not None:
                return reason
        return _contradiction(items)
    return None


def _flatten_and(expr: And) -> list[Expr]:
    items = []
    for item in expr.items:
        items.extend(_flatten_and(item) if isinstance(item, And) else [item])
    return items


def _contradiction(items: list[Expr]) -> str | None:
    """Tests on one column, among the operands of an `and`, that no value satisfies together."""
    by_column: dict[str, list[Expr]] = {}
    for item in items:
        inner = item.item if isinstance(item, Not) else item
        if isinstance(inner, Compare | InSet):
            by_column.setdefault(inner.column, []).append(item)
    for column, tests in by_column.items():
        if len(tests) > 1 and not _satisfiable(tests):
            return f"no value of {column} satisfies {' and '.join(_render(t) for t in tests)}"
    return None


def _satisfiable(tests: list[Expr]) -> bool:
    lo, hi = _INT64
    allowed: set[int] | None = None
    excluded: set[int] = set()
    for test in tests:
        negated = isinstance(test, Not)
        inner = test.item if negated else test
        if isinstance(inner, InSet):
            if negated:
                excluded.update(inner.values)
            else:
                allowed = set(inner.values) if allowed is None else allowed & set(inner.values)
            continue
        op, v = (_NEGATED[inner.op] if negated else inner.op), inner.value
        if op == "==":
            lo, hi = max(lo, v), min(hi, v)
        elif op == "!=":
            excluded.add(v)
        elif op == "<":
            hi = min(hi, v - 1)
        elif op == "<=":
            hi = min(hi, v)
        elif op == ">":
            lo = max(lo, v + 1)
        else:
            lo = max(lo, v)
    if allowed is not None:
        return any(lo <= v <= hi and v not in excluded for v in allowed)
    return hi - lo + 1 > len({v for v in excluded if lo <= v <= hi})


def _empty_period(active: Active) -> str | None:
    first, last = active.first_day, active.last_day
    if first is not None and last is not None and last < first:
        return f"until {last} is before from {first}"
    if not active.days:
        return "days is empty"
    if active.hours is not None and active.hours[0] == active.hours[1]:
        return f"hours {clock(active.hours[0])}-{clock(active.hours[1])} is empty ([start, end) with start == end)"
    if first is not None and last is not None and (last - first).days < 7:
        dates = [first + timedelta(days=k) for k in range((last - first).days + 1)]
        if not any(d.isoweekday() in active.days for d in dates):
            return f"no day from {first} until {last} is on {', '.join(WEEKDAYS[d - 1] for d in active.days)}"
    return None

