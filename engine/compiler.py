"""Compiles a checked RuleSet into the kernel's program arrays.

The boundary between Python and the kernel is this module's output: a dict of
flat numpy arrays, one entry per rule field, plus a straight-line op list per
`where` (OP_DTYPE records, mirroring the C struct `Op` in
engine/_fast/_types.pxd).  Nothing else about rules crosses into C.
"""

from __future__ import annotations

from datetime import date

import numpy as np

from engine.calendar import MINUTE_MS, zone_table
from engine.policy import holdout_seed, holdout_threshold
from engine.profiles import Attribute, string_hash
from engine.rules import (
    Absence,
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
    RuleSet,
    Sum,
)
from engine.schema import COLUMN_INDEX, EVENT_COLUMNS

# Mirrors engine/_fast/_types.pxd; tests/test_kernel_types.py checks the sizes.
OP_DTYPE = np.dtype(
    [
        ("code", np.int32),
        ("dst", np.int32),
        ("a", np.int32),
        ("b", np.int32),
        ("imm", np.int64),
        ("sel", np.int32),
        ("unused", np.int32),
    ],
    align=True,
)
OPCODES = {
    "==": 0, "!=": 1, "<": 2, "<=": 3, ">": 4, ">=": 5, "in": 6, "prefix": 7,
    "and": 8, "or": 9, "not": 10, "narrow_true": 11, "narrow_false": 12,
}
ALL_POSITIONS = 0  # the list id meaning "every position of the selection"
CONDITIONS = {None: 0, Count: 1, First: 2, Changed: 3, Sum: 4, Distinct: 5, After: 6, Absence: 7}


def _cost(expr: Expr) -> int:
    """Rough relative cost per row, so cheap tests run first and narrow the rest."""
    if isinstance(expr, Compare):
        return 1
    if isinstance(expr, InSet):
        return 2 + len(expr.values).bit_length()
    if isinstance(expr, ProfileTest):  # a gather through the row's profile row: a random access
        return 3 + (len(expr.value).bit_length() if expr.op == "in" else 0)
    if isinstance(expr, Prefix):
        return 8 + len({len(str(p)) for p in expr.prefixes}) * 6
    if isinstance(expr, Not):
        return 1 + _cost(expr.item)
    return sum(_cost(item) for item in expr.items) + 1


def evaluation_order(items: tuple[Expr, ...]) -> list[Expr]:
    """The operands of an and/or in the order the kernel runs them: cheapest first."""
    return sorted(items, key=_cost)


def attribute_of(test: ProfileTest) -> Attribute:
    """The kernel attribute column a profile test reads (engine.profiles.ProfileStore.attribute_matrix)."""
    return (test.encoding, test.field, test.value if test.op == "has" else "")


def profile_tests(expr: Expr | None) -> list[ProfileTest]:
    """The profile tests of an expression, in order of appearance."""
    if expr is None or isinstance(expr, Compare | InSet | Prefix):
        return []
    if isinstance(expr, ProfileTest):
        return [expr]
    if isinstance(expr, Not):
        return profile_tests(expr.item)
    return [test for item in expr.items for test in profile_tests(item)]


def profile_attributes(ruleset: RuleSet) -> tuple[Attribute, ...]:
    """Every profile attribute the rules read (where, audience, goal and absence where), in order of first appearance.

    Kernel attribute k is column N_COLUMNS + k of its ops; Engine.load_profiles
    builds the matching matrix.
    """
    found: dict[Attribute, None] = {}
    for rule in ruleset.rules:
        absence = rule.condition if isinstance(rule.condition, Absence) else None
        for expr in (rule.where, rule.audience, rule.goal.where if rule.goal is not None else None,
                     absence.where if absence is not None else None):
            found.update(dict.fromkeys(attribute_of(test) for test in profile_tests(expr)))
    return tuple(found)


def _profile_literal(value: int | bool | str) -> int:
    return string_hash(value) if isinstance(value, str) else int(value)


class _ProgramBuilder:
    """Lowers expressions to ops; registers and lists are numbered afresh per rule.

    `and` and `or` short-circuit: each operand after the first runs only on
    the positions the earlier ones left undecided (a NARROW op computes them),
    and operands run cheapest first.  Both are pure, so order never changes
    a result.
    """

    def __init__(self, attributes: tuple[Attribute, ...] = ()):
        self.attribute_index = {attribute: k for k, attribute in enumerate(attributes)}
        self.ops: list[tuple[int, int, int, int, int, int, int]] = []
        self.constants: list[int] = []
        self.digits: list[int] = []
        self.next_reg = 0
        self.next_list = ALL_POSITIONS + 1
        self.max_regs = 1
        self.max_lists = 1

    def start_rule(self) -> None:
        self.next_reg = 0
        self.next_list = ALL_POSITIONS + 1

    def register(self) -> int:
        reg = self.next_reg
        self.next_reg += 1
        self.max_regs = max(self.max_regs, self.next_reg)
        return reg

    def list(self) -> int:
        lst = self.next_list
        self.next_list += 1
        self.max_lists = max(self.max_lists, self.next_list)
        return lst

    def op(self, code: str, dst: int, a: int, b: int, imm: int, sel: int) -> None:
        self.ops.append((OPCODES[code], dst, a, b, imm, sel, 0))

    def pool(self, values: tuple[int, ...]) -> int:
        offset = len(self.constants)
        self.constants.extend(values)
        self.digits.extend(len(str(v)) if v > 0 else 0 for v in values)
        return offset

    def emit(self, expr: Expr, sel: int = ALL_POSITIONS) -> int:
        if isinstance(expr, Compare):
            dst = self.register()
            self.op(expr.op, dst, COLUMN_INDEX[expr.column], 0, expr.value, sel)
        elif isinstance(expr, InSet):
            dst = self.register()
            offset = self.pool(expr.values)
            self.op("in", dst, COLUMN_INDEX[expr.column], offset, len(expr.values), sel)
        elif isinstance(expr, Prefix):
            dst = self.register()
            prefixes = tuple(sorted(set(expr.prefixes), key=lambda p: (len(str(p)), p)))
            offset = self.pool(prefixes)
            self.op("prefix", dst, COLUMN_INDEX[expr.column], offset, len(prefixes), sel)
        elif isinstance(expr, ProfileTest):
            # The kernel reads PROFILE_MISSING as false whatever the op, so `!=` too is false on a missing field.
            dst = self.register()
            column = len(EVENT_COLUMNS) + self.attribute_index[attribute_of(expr)]
            if expr.op == "has":
                self.op("==", dst, column, 0, 1, sel)
            elif expr.op == "in":
                values = tuple(sorted({_profile_literal(v) for v in expr.value}))
                self.op("in", dst, column, self.pool(values), len(values), sel)
            else:
                self.op(expr.op, dst, column, 0, _profile_literal(expr.value), sel)
        elif isinstance(expr, (And, Or)):
            is_and = isinstance(expr, And)
            items = evaluation_order(expr.items)
            results = [self.emit(items[0], sel)]
            undecided = sel
            for item in items[1:]:
                narrowed = self.list()
                self.op("narrow_true" if is_and else "narrow_false", narrowed, results[-1], 0, 0, undecided)
                undecided = narrowed
                results.append(self.emit(item, undecided))
            dst = results[0]
            for other in results[1:]:
                combined = self.register()
                self.op("and" if is_and else "or", combined, dst, other, 0, sel)
                dst = combined
        elif isinstance(expr, Not):
            inner = self.emit(expr.item, sel)
            dst = self.register()
            self.op("not", dst, inner, inner, 0, sel)
        else:  # pragma: no cover - the parser builds nothing else
            raise TypeError(f"cannot compile {expr!r}")
        return dst


def _kind_mask(kinds: tuple[int, ...]) -> int:
    mask = 0
    for code in kinds:
        mask |= 1 << code
    return mask


def compile_program(ruleset: RuleSet) -> dict[str, np.ndarray | int]:
    """The kernel program of a rule set (see engine._fast.kernel.Kernel).

    Rules keep their file order as kernel rules 0..n-1.  Each rule with a
    `goal` adds a goal filter after them (goal_of = the rule's index): a
    kernel rule with the goal's on + where and nothing else, whose passing
    events convert the rule's open instructions instead of matching.  Then
    each `absence` rule adds its cancel filter (cancel_of = the rule's index),
    whose passing events cancel the rule's pending timer.
    """
    goals = [(r, rule.goal) for r, rule in enumerate(ruleset.rules) if rule.goal is not None]
    cancels = [(r, rule.condition) for r, rule in enumerate(ruleset.rules) if isinstance(rule.condition, Absence)]
    n = len(ruleset.rules) + len(goals) + len(cancels)
    attributes = profile_attributes(ruleset)
    builder = _ProgramBuilder(attributes)
    program: dict[str, np.ndarray | int] = {
        "kinds": np.zeros(n, np.uint32),
        "op_begin": np.zeros(n, np.int32),
        "op_end": np.zeros(n, np.int32),
        "result_reg": np.full(n, -1, np.int32),
        "cond": np.zeros(n, np.int32),
        "cond_n": np.zeros(n, np.int64),
        "cond_window": np.zeros(n, np.int64),
        "cond_column": np.zeros(n, np.int32),
        "cond_resolution": np.zeros(n, np.int64),
        "cooldown": np.zeros(n, np.int64),
        "priority": np.zeros(n, np.int32),
        "goal_of": np.full(n, -1, np.int32),
        "cancel_of": np.full(n, -1, np.int32),
        "shadow": np.array([rule.shadow for rule in ruleset.rules] + [False] * (n - len(ruleset.rules)), np.uint8),
        # Audience: a program over profile attributes only, evaluated per match at trigger time.
        "has_audience": np.zeros(n, np.uint8),
        "aud_begin": np.zeros(n, np.int32),
        "aud_end": np.zeros(n, np.int32),
        "aud_result": np.full(n, -1, np.int32),
    }
    filters = [(rule.on, rule.where) for rule in ruleset.rules] + [(goal.on, goal.where) for _, goal in goals] + [
        (absence.on, absence.where) for _, absence in cancels]
    for r, (kinds, where) in enumerate(filters):
        program["kinds"][r] = _kind_mask(kinds)
        program["op_begin"][r] = len(builder.ops)
        if where is not None:
            builder.start_rule()
            program["result_reg"][r] = builder.emit(where)
        program["op_end"][r] = len(builder.ops)
    for k, (owner, _) in enumerate(goals):
        program["goal_of"][len(ruleset.rules) + k] = owner
    for k, (owner, _) in enumerate(cancels):
        program["cancel_of"][len(ruleset.rules) + len(goals) + k] = owner
    for r, rule in enumerate(ruleset.rules):
        program["aud_begin"][r] = len(builder.ops)
        if rule.audience is not None:
            builder.start_rule()
            program["has_audience"][r] = 1
            program["aud_result"][r] = builder.emit(rule.audience)
        program["aud_end"][r] = len(builder.ops)
    for r, rule in enumerate(ruleset.rules):
        cond = rule.condition
        program["cond"][r] = CONDITIONS[type(cond) if cond is not None else None]
        if isinstance(cond, Count):
            program["cond_n"][r] = cond.at_least
            program["cond_window"][r] = cond.within
        elif isinstance(cond, First):
            program["cond_window"][r] = cond.within
        elif isinstance(cond, Changed):
            program["cond_column"][r] = COLUMN_INDEX[cond.column]
        elif isinstance(cond, (Sum, Distinct)):
            program["cond_n"][r] = cond.at_least
            program["cond_window"][r] = cond.within
            program["cond_column"][r] = COLUMN_INDEX[cond.column]
            program["cond_resolution"][r] = cond.resolution
        elif isinstance(cond, (After, Absence)):
            program["cond_window"][r] = cond.within
        program["cooldown"][r] = rule.cooldown
        program["priority"][r] = rule.priority
    program.update(_sequence_program(ruleset, n))
    program.update(_policy_program(ruleset, n))
    program["n_attrs"] = len(attributes)
    program["attributes"] = attributes
    program["ops"] = np.array(builder.ops, dtype=OP_DTYPE) if builder.ops else np.zeros(0, OP_DTYPE)
    program["n_regs"] = builder.max_regs
    program["n_lists"] = builder.max_lists
    program["constants"] = np.array(builder.constants, dtype=np.int64)
    program["constant_digits"] = np.array(builder.digits, dtype=np.int32)
    return program


def _sequence_program(ruleset: RuleSet, n: int) -> dict[str, np.ndarray]:
    """`after` links and the event columns an `absence` timer keeps for its instruction's params.

    after_rule[b] is the rule whose matches rule b follows (-1 none); dep_list[dep_begin[a]:dep_end[a]]
    are the rules following rule a, which the kernel tells of each match of a.  param_list[param_begin[r]:
    param_end[r]] are the columns of rule r's params, kept from the event that started its timer.
    """
    index = {rule.id: r for r, rule in enumerate(ruleset.rules)}
    after_rule = np.full(n, -1, np.int32)
    followers: dict[int, list[int]] = {}
    for b, rule in enumerate(ruleset.rules):
        if isinstance(rule.condition, After):
            after_rule[b] = index[rule.condition.rule]
            followers.setdefault(int(after_rule[b]), []).append(b)
    dep_begin, dep_end, dep_list = np.zeros(n, np.int32), np.zeros(n, np.int32), []
    param_begin, param_end, param_list = np.zeros(n, np.int32), np.zeros(n, np.int32), []
    for r, rule in enumerate(ruleset.rules):
        dep_begin[r] = len(dep_list)
        dep_list.extend(followers.get(r, ()))
        dep_end[r] = len(dep_list)
        param_begin[r] = len(param_list)
        if isinstance(rule.condition, Absence):
            param_list.extend(COLUMN_INDEX[p] for p in rule.params)
        param_end[r] = len(param_list)
    return {
        "after_rule": after_rule,
        "dep_begin": dep_begin,
        "dep_end": dep_end,
        "dep_list": np.array(dep_list, np.int32),
        "param_begin": param_begin,
        "param_end": param_end,
        "param_list": np.array(param_list, np.int32),
    }


def _policy_program(ruleset: RuleSet, n: int) -> dict[str, np.ndarray | int]:
    """Contact-policy arrays: channel codes, caps, quiet hours, contact days, zone, holdouts, guardrails."""
    policy = ruleset.policy
    codes = {name: code for code, name in enumerate(ruleset.channels)}
    chan_begin, chan_end, chan_list = np.zeros(n, np.int32), np.zeros(n, np.int32), []
    threshold, seed = np.zeros(n, np.int64), np.zeros(n, np.uint64)
    max_per_hour, goal_within = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for r, rule in enumerate(ruleset.rules):
        chan_begin[r] = len(chan_list)
        chan_list.extend(codes[c] for c in rule.channels)
        chan_end[r] = len(chan_list)
        threshold[r] = holdout_threshold(rule.holdout)
        seed[r] = holdout_seed(rule.id)
        max_per_hour[r] = rule.max_per_hour
        goal_within[r] = rule.goal.within if rule.goal is not None else 0
    zone = zone_table(policy.timezone)
    quiet_start, quiet_end = (-1, -1) if policy.quiet_hours is None else policy.quiet_hours
    return {
        "n_channels": len(codes),
        "chan_begin": chan_begin,
        "chan_end": chan_end,
        "chan_list": np.array(chan_list, np.int32),
        "active_mask": sum(1 << codes[c] for c in policy.active_channels),
        "daily_cap": policy.daily_cap,
        "monthly_cap": policy.monthly_cap,
        "quiet_start": quiet_start * MINUTE_MS if quiet_start >= 0 else -1,
        "quiet_end": quiet_end * MINUTE_MS if quiet_end >= 0 else -1,
        "contact_days": sum(1 << (d - 1) for d in policy.contact_days),
        "zone_start": zone.start,
        "zone_offset": zone.offset,
        "holdout_threshold": threshold,
        "holdout_seed": seed,
        "max_per_hour": max_per_hour,
        "goal_within": goal_within,
        **_active_program(ruleset, n),
    }


_EPOCH_DAY = date(1970, 1, 1)
NO_DAY_LIMIT = np.iinfo(np.int64).max


def _active_program(ruleset: RuleSet, n: int) -> dict[str, np.ndarray]:
    """Active periods as local day numbers, a weekday mask and ms after local midnight (docs/rules.md)."""
    program = {
        "active": np.zeros(n, np.uint8),  # 1: the rule has an active period; others never test one
        "active_first": np.full(n, -NO_DAY_LIMIT, np.int64),  # local days since 1970-01-01, inclusive
        "active_last": np.full(n, NO_DAY_LIMIT, np.int64),
        "active_days": np.full(n, 0x7F, np.uint8),  # bit d: ISO weekday d + 1
        "active_start": np.full(n, -1, np.int64),  # [start, end) ms after local midnight; -1: all day
        "active_end": np.full(n, -1, np.int64),
    }
    for r, rule in enumerate(ruleset.rules):
        period = rule.active
        if period is None:
            continue
        program["active"][r] = 1
        if period.first_day is not None:
            program["active_first"][r] = (period.first_day - _EPOCH_DAY).days
        if period.last_day is not None:
            program["active_last"][r] = (period.last_day - _EPOCH_DAY).days
        program["active_days"][r] = sum(1 << (d - 1) for d in period.days)
        if period.hours is not None:
            program["active_start"][r] = period.hours[0] * MINUTE_MS
            program["active_end"][r] = period.hours[1] * MINUTE_MS
    return program
