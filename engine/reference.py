"""The rule semantics in plain Python: the specification the kernel is held to.

One event at a time, full history kept, no cleverness: every condition is
written as SPEC sections 3 and 8 state it.  tests/test_differential.py runs
random rules and random event streams through this and through the kernel and
demands the same instructions and counters.

One documented difference: the kernel keeps bounded state per subscriber
(count: the at_least - 1 latest timestamps; first: the latest timestamp), so
when a subscriber's qualifying events arrive out of event-time order it may
miss a count or first match that this full-history reference finds.  It never
produces a match the reference does not.  For streams in event-time order per
subscriber and rule the two are identical.  docs/kernel.md explains why.

Far too slow for traffic (under 200,000 events per second on the standard
benchmark, against millions for the kernel); it is the baseline of the
benchmark ratio, never a fallback.
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa

from engine.instructions import instruction_id, rule_seed
from engine.rules import And, Changed, Compare, Count, Expr, First, InSet, Not, Or, Prefix, RuleSet
from engine.schema import EVENT_COLUMNS, INSTRUCTION_SCHEMA, validate_events

_COMPARE = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def evaluate(expr: Expr, event: dict[str, int]) -> bool:
    """The truth of a where expression for one event."""
    if isinstance(expr, Compare):
        return _COMPARE[expr.op](event[expr.column], expr.value)
    if isinstance(expr, InSet):
        return event[expr.column] in expr.values
    if isinstance(expr, Prefix):
        value = event[expr.column]
        return value > 0 and any(str(value).startswith(str(p)) for p in expr.prefixes)
    if isinstance(expr, And):
        return all(evaluate(item, event) for item in expr.items)
    if isinstance(expr, Or):
        return any(evaluate(item, event) for item in expr.items)
    if isinstance(expr, Not):
        return not evaluate(expr.item, event)
    raise TypeError(f"not an expression: {expr!r}")


class ReferenceEngine:
    """Same interface as engine.Engine for process() and stats()."""

    def __init__(self, ruleset: RuleSet):
        self.ruleset = ruleset
        self.seeds = [rule_seed(rule.id) for rule in ruleset.rules]
        # (rule index, msisdn) -> every qualifying ts, in arrival order
        self.history: dict[tuple[int, int], list[int]] = defaultdict(list)
        # (rule index, msisdn) -> last non-zero value of a `changed` column
        self.last_value: dict[tuple[int, int], int] = {}
        # (rule index, msisdn) -> trigger ts of the rule's last instruction
        self.last_instruction: dict[tuple[int, int], int] = {}
        n = len(ruleset.rules)
        self.counters = {name: [0] * n for name in ("matched", "emitted", "stopped_cooldown", "stopped_arbitrated")}
        self.events = 0

    def condition_holds(self, r: int, event: dict[str, int]) -> bool:
        """Evaluate rule r's stateful condition and move its state."""
        condition = self.ruleset.rules[r].condition
        key = (r, event["msisdn"])
        t = event["ts"]
        if condition is None:
            return True
        if isinstance(condition, Changed):
            value = event[condition.column]
            if value == 0:
                return False
            previous = self.last_value.get(key)
            self.last_value[key] = value
            return previous is not None and previous != value
        earlier = self.history[key]
        if isinstance(condition, Count):
            in_window = sum(1 for s in earlier if t - condition.within < s <= t) + 1
            holds = in_window >= condition.at_least
        else:
            assert isinstance(condition, First)
            holds = not any(t - condition.within <= s <= t for s in earlier)
        earlier.append(t)
        return holds

    def decide(self, event: dict[str, int]) -> int | None:
        """The rule index that makes an instruction of this event, if any."""
        survivors = []
        for r, rule in enumerate(self.ruleset.rules):
            if event["kind"] not in rule.on:
                continue
            if rule.where is not None and not evaluate(rule.where, event):
                continue
            if not self.condition_holds(r, event):
                continue
            self.counters["matched"][r] += 1
            last = self.last_instruction.get((r, event["msisdn"]))
            if rule.cooldown > 0 and last is not None and last > event["ts"] - rule.cooldown:
                self.counters["stopped_cooldown"][r] += 1
                continue
            survivors.append(r)
        if not survivors:
            return None
        # Highest priority wins; on a tie, the rule earlier in the file.
        winner = max(survivors, key=lambda r: (self.ruleset.rules[r].priority, -r))
        for r in survivors:
            if r != winner:
                self.counters["stopped_arbitrated"][r] += 1
        self.counters["emitted"][winner] += 1
        self.last_instruction[(winner, event["msisdn"])] = event["ts"]
        return winner

    def process(self, batch) -> pa.Table:
        events = validate_events(batch)
        columns = [events[name].tolist() for name in EVENT_COLUMNS]
        rows = []
        for values in zip(*columns, strict=True):
            event = dict(zip(EVENT_COLUMNS, values, strict=True))
            r = self.decide(event)
            self.events += 1
            if r is None:
                continue
            rule = self.ruleset.rules[r]
            rows.append(
                {
                    "id": instruction_id(self.seeds[r], values),
                    "ts": event["ts"],
                    "msisdn": event["msisdn"],
                    "rule": rule.id,
                    "channel": rule.channels[0],
                    "template": rule.template,
                    "priority": rule.priority,
                    "holdout": False,
                    "not_before": event["ts"],
                    "params": [(name, str(event[name])) for name in rule.params],
                }
            )
        return pa.Table.from_pylist(rows, schema=INSTRUCTION_SCHEMA)

    def stats(self) -> dict:
        """The per-rule part of engine.Engine.stats(), from the same counters."""
        c = self.counters
        return {
            "events": self.events,
            "rules": {
                rule.id: {
                    "matched": c["matched"][r],
                    "sent": c["emitted"][r],
                    "stopped": {"cooldown": c["stopped_cooldown"][r], "arbitrated": c["stopped_arbitrated"][r]},
                }
                for r, rule in enumerate(self.ruleset.rules)
            },
        }
