"""The rule semantics in plain Python: the specification the kernel is held to.

One event at a time, full history kept, no cleverness: every condition is
written as SPEC sections 3 and 8 state it.  tests/test_differential.py runs
random rules and random event streams through this and through the kernel and
demands the same instructions and counters.

One documented difference: the kernel keeps bounded state per subscriber
(count: the at_least - 1 latest timestamps; first: the latest timestamp), so
when a subscriber's qualifying events arrive out of event-time order it may
miss a count or first match that this full-history reference finds.  It never
produces a match the reference does not.  `sum` and `distinct` keep buckets:
the kernel drops a late event whose bucket has left its ring (sum) or whose
value it no longer tracks (distinct), so late events may lower a sum or a
distinct count, never raise one (a sum over negative values can then rise).
`after` keeps only the followed rule's latest match, so a late event may
miss an earlier match that full history finds.  For streams in event-time
order per subscriber and rule the two are identical.  docs/kernel.md
explains why.  `absence` timers are exact in any order in both.

The contact policy (SPEC sections 4 and 8) is here too, as plainly: full
history of cap counts, instructions and feedback; local time from zoneinfo
directly.  The kernel prunes cap counts of past local days and bounds its
issued-instruction memory and goal windows (docs/policy.md); for event
streams in event-time order that changes nothing.

Far too slow for traffic (under 200,000 events per second on the standard
benchmark, against millions for the kernel); it is the baseline of the
benchmark ratio, never a fallback.
"""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pyarrow as pa

from engine.calendar import transitions_between
from engine.instructions import instruction_id, rule_seed
from engine.policy import (
    FOREVER,
    HOUR_MS,
    OUTCOMES,
    STOP_REASONS,
    holdout_hash,
    holdout_seed,
    holdout_threshold,
    rule_report,
)
from engine.profiles import ProfileStore
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
    RuleSet,
    Sum,
)
from engine.schema import EVENT_COLUMNS, INSTRUCTION_SCHEMA, validate_events

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_COMPARE = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def profile_holds(test: ProfileTest, profile: dict) -> bool:
    """A profile test on one subscriber's profile (field -> value, null fields left out): false when it lacks the field.

    Integers compare as integers (booleans as 0/1), strings as strings (an
    integer field as its decimal text); `has` asks whether the list holds the
    tag (a text field is split as a CSV list is).
    """
    value = profile.get(test.field)
    if value is None:
        return False
    if test.op == "has":
        if isinstance(value, str):
            text = value.strip(" ;,|")
            value = re.split(r"[;,| ]+", text) if text else []
        return test.value in value
    if test.encoding == "str":
        value = str(value) if isinstance(value, int) else value
    else:
        value = int(value)
    if test.op == "in":
        return value in test.value
    return _COMPARE[test.op](value, test.value)


def evaluate(expr: Expr, event: dict[str, int], profile: dict | None = None) -> bool:
    """The truth of a where expression for one event of a subscriber with `profile` (None: empty)."""
    if isinstance(expr, ProfileTest):
        return profile_holds(expr, profile or {})
    if isinstance(expr, Compare):
        return _COMPARE[expr.op](event[expr.column], expr.value)
    if isinstance(expr, InSet):
        return event[expr.column] in expr.values
    if isinstance(expr, Prefix):
        value = event[expr.column]
        return value > 0 and any(str(value).startswith(str(p)) for p in expr.prefixes)
    if isinstance(expr, And):
        return all(evaluate(item, event, profile) for item in expr.items)
    if isinstance(expr, Or):
        return any(evaluate(item, event, profile) for item in expr.items)
    if isinstance(expr, Not):
        return not evaluate(expr.item, event, profile)
    raise TypeError(f"not an expression: {expr!r}")


class ReferenceEngine:
    """Same interface as engine.Engine for process(), feedback(), load_profiles(), resume() and stats()."""

    def __init__(self, ruleset: RuleSet, profiles=None, lateness: int = 0):
        self.ruleset = ruleset
        self.lateness = lateness
        self.max_ts = -1  # the largest ts seen or advanced to; the watermark is this less the lateness
        # (rule index, msisdn) -> (start ts, start event) of the pending absence timer
        self.timers: dict[tuple[int, int], tuple[int, dict[str, int]]] = {}
        # (rule index, msisdn) -> ts of every match of a rule that another rule follows (`after`)
        self.matches: dict[tuple[int, int], list[int]] = defaultdict(list)
        self.followed = {self.index(rule.condition.rule) for rule in ruleset.rules if isinstance(rule.condition, After)}
        self.policy = ruleset.policy
        self.zone = ZoneInfo(ruleset.policy.timezone)
        self.seeds = [rule_seed(rule.id) for rule in ruleset.rules]
        # (rule index, msisdn) -> every qualifying ts, in arrival order
        self.history: dict[tuple[int, int], list[int]] = defaultdict(list)
        # (rule index, msisdn) -> (ts, column value) of every qualifying event of a `sum` or `distinct` rule
        self.samples: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        # (rule index, msisdn) -> last non-zero value of a `changed` column
        self.last_value: dict[tuple[int, int], int] = {}
        # (rule index, msisdn) -> trigger ts of the rule's last instruction
        self.last_instruction: dict[tuple[int, int], int] = {}
        # policy state
        self.opted_out: set[int] = set()  # by feedback
        self.blocked: dict[tuple[int, int], int] = {}  # (rule, msisdn) -> blocked for ts < this
        self.per_day: dict[tuple[int, object], int] = defaultdict(int)  # (msisdn, local date) -> active instructions
        self.per_month: dict[tuple[int, tuple[int, int]], int] = defaultdict(int)
        self.rule_instructions: dict[int, list[int]] = defaultdict(list)  # guardrail: ts since the last resume
        self.paused: set[int] = set()
        self.issued: dict[str, tuple[int, int]] = {}  # instruction id -> (rule, msisdn)
        self.open_goals: dict[tuple[int, int], list[list[int]]] = defaultdict(list)  # -> [[ts, holdout, converted]]
        n = len(ruleset.rules)
        names = ("matched", "emitted", "holdout", *(f"stopped_{r}" for r in STOP_REASONS), *OUTCOMES,
                 "goal_treated", "goal_holdout", "cap_draw")
        self.counters = {name: [0] * n for name in names}
        self.sent_by_channel = [dict.fromkeys(rule.channels, 0) for rule in ruleset.rules]
        self.events = 0
        self.profiles = ProfileStore.empty()
        self.profile_cache = {}
        if profiles is not None:
            self.load_profiles(profiles)

    def index(self, rule_id: str) -> int:
        return [rule.id for rule in self.ruleset.rules].index(rule_id)

    def load_profiles(self, source) -> None:
        self.profiles = ProfileStore.load(source)
        self.profile_cache: dict[int, dict] = {}

    def resume(self, rule_id: str) -> None:
        r = [rule.id for rule in self.ruleset.rules].index(rule_id)
        self.paused.discard(r)
        self.rule_instructions[r] = []

    # -- conditions ---------------------------------------------------------------

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
        if isinstance(condition, (Sum, Distinct)):
            return self.bucketed_holds(condition, key, t, event[condition.column])
        if isinstance(condition, After):
            earlier = self.matches.get((self.index(condition.rule), event["msisdn"]), ())
            return any(t - condition.within < s <= t for s in earlier)
        if isinstance(condition, Absence):
            if key not in self.timers:  # a start while a timer is pending is ignored
                self.timers[key] = (t, event)
            return False
        earlier = self.history[key]
        if isinstance(condition, Count):
            in_window = sum(1 for s in earlier if t - condition.within < s <= t) + 1
            holds = in_window >= condition.at_least
        else:
            assert isinstance(condition, First)
            holds = not any(t - condition.within <= s <= t for s in earlier)
        earlier.append(t)
        return holds

    def bucketed_holds(self, condition: Sum | Distinct, key: tuple[int, int], t: int, value: int) -> bool:
        """The events whose bucket (ts // resolution) starts after t - within, up to t's bucket, this one included."""
        samples = self.samples[key]
        samples.append((t, value))
        res = condition.resolution
        first, last = (t - condition.within) // res + 1, t // res
        in_window = [v for s, v in samples if first <= s // res <= last]
        if isinstance(condition, Sum):
            return sum(in_window) >= condition.at_least
        return len(set(in_window) - {0}) >= condition.at_least

    # -- local time -----------------------------------------------------------------

    def local(self, ts: int) -> datetime:
        return (_EPOCH + timedelta(milliseconds=ts)).astimezone(self.zone)

    def allowed(self, ts: int, days: tuple[int, ...]) -> bool:
        """ts is on a contact day and outside quiet hours, in local time."""
        local = self.local(ts)
        if local.isoweekday() not in days:
            return False
        quiet = self.policy.quiet_hours
        if quiet is None:
            return True
        minute_ms = (local.hour * 60 + local.minute) * 60_000 + local.second * 1000 + local.microsecond // 1000
        start, end = quiet[0] * 60_000, quiet[1] * 60_000
        if start < end:
            return not start <= minute_ms < end
        return not (minute_ms >= start or minute_ms < end)

    def in_period(self, period: Active, ts: int) -> bool:
        """ts lies in the active period, in local time: dates inclusive, hours [start, end) wrapping midnight."""
        local = self.local(ts)
        if period.first_day is not None and local.date() < period.first_day:
            return False
        if period.last_day is not None and local.date() > period.last_day:
            return False
        if local.isoweekday() not in period.days:
            return False
        if period.hours is None:
            return True
        start, end = (minutes * 60_000 for minutes in period.hours)
        tod = (local.hour * 60 + local.minute) * 60_000 + local.second * 1000 + local.microsecond // 1000
        return start <= tod < end if start <= end else (tod >= start or tod < end)

    def not_before(self, ts: int, days: tuple[int, ...]) -> int:
        """The first instant >= ts that is allowed: ts itself, a local midnight or quiet-hours end, or an
        offset change (a boundary inside a DST gap begins at the transition)."""
        if self.allowed(ts, days):
            return ts
        start = self.local(ts).date()
        candidates = set(transitions_between(self.policy.timezone, ts, ts + 10 * 86_400_000))
        for d in range(-1, 10):
            date = start + timedelta(days=d)
            walls = [datetime(date.year, date.month, date.day)]
            if self.policy.quiet_hours is not None:
                end = self.policy.quiet_hours[1]
                walls.append(walls[0] + timedelta(minutes=end))
            for wall in walls:
                for fold in (0, 1):
                    moment = wall.replace(tzinfo=self.zone, fold=fold)
                    candidates.add((moment - _EPOCH) // timedelta(milliseconds=1))
        return min(c for c in candidates if c >= ts and self.allowed(c, days))

    # -- one event --------------------------------------------------------------------

    def profile(self, msisdn: int) -> dict:
        # Cached per load: looking a profile up in the Arrow table costs more than the rest of an event.
        if msisdn not in self.profile_cache:
            self.profile_cache[msisdn] = self.profiles.get(msisdn)
        return self.profile_cache[msisdn]

    def decide(self, event: dict[str, int]) -> tuple[int, str, int, bool] | None:
        """(rule index, channel, not_before, holdout) of the instruction this event makes, if any."""
        msisdn, ts = event["msisdn"], event["ts"]
        rules = self.ruleset.rules
        profile = self.profile(msisdn)
        for r, rule in enumerate(rules):
            goal = rule.goal
            if goal is not None and event["kind"] in goal.on and (
                    goal.where is None or evaluate(goal.where, event, profile)):
                for entry in self.open_goals.get((r, msisdn), ()):
                    if not entry[2] and entry[0] < ts <= entry[0] + goal.within:
                        entry[2] = 1
                        self.counters["goal_holdout" if entry[1] else "goal_treated"][r] += 1
                        break
        # On one event, a cancel applies before the same event may start the timer again.
        for r, rule in enumerate(rules):
            absence = rule.condition
            if isinstance(absence, Absence) and (r, msisdn) in self.timers and event["kind"] in absence.on and (
                    absence.where is None or evaluate(absence.where, event, profile)):
                start = self.timers[(r, msisdn)][0]
                if start <= ts < start + absence.within:
                    del self.timers[(r, msisdn)]
        survivors, shadows, matched = [], [], []
        for r, rule in enumerate(rules):
            if event["kind"] not in rule.on:
                continue
            if rule.where is not None and not evaluate(rule.where, event, profile):
                continue
            if not self.condition_holds(r, event):
                continue
            if rule.active is not None and not self.in_period(rule.active, ts):
                continue
            # The audience is part of the match, after the condition (whose state has moved) and the period.
            if rule.audience is not None and not evaluate(rule.audience, event, profile):
                continue
            self.counters["matched"][r] += 1
            matched.append(r)
            if not self.admit(r, msisdn, ts, profile):
                continue
            (shadows if rule.shadow else survivors).append(r)
        # Rules following a match see it from the next event on.
        for r in matched:
            if r in self.followed:
                self.matches[(r, msisdn)].append(ts)
        # Highest priority wins; on a tie, the rule earlier in the file.
        winner = max(survivors, key=lambda r: (rules[r].priority, -r)) if survivors else None
        # A shadow rule does what it would have done had it alone been live: it loses to a live survivor
        # that beats it, else goes on with the caps as they stand; it changes nothing for live rules.
        for r in shadows:
            if winner is not None and (rules[winner].priority, -winner) > (rules[r].priority, -r):
                self.stop(r, "arbitrated")
            else:
                self.deliver(r, msisdn, ts, profile)
        if winner is None:
            return None
        for r in survivors:
            if r != winner:
                self.stop(r, "arbitrated")
        return self.deliver(winner, msisdn, ts, profile)

    def admit(self, r: int, msisdn: int, ts: int, profile: dict) -> bool:
        """Policy steps 1-3 for one match; counts the stop."""
        rule = self.ruleset.rules[r]
        if r in self.paused:
            self.stop(r, "paused")
            return False
        if profile.get("opt_out") or msisdn in self.opted_out:
            self.stop(r, "opt_out")
            return False
        until = self.blocked.get((r, msisdn))
        if until is not None and ts < until:
            self.stop(r, "suppressed" if until == FOREVER else "decline_cooldown")
            return False
        last = self.last_instruction.get((r, msisdn))
        if rule.cooldown > 0 and last is not None and last > ts - rule.cooldown:
            self.stop(r, "cooldown")
            return False
        return True

    def deliver(self, r: int, msisdn: int, ts: int, profile: dict) -> tuple[int, str, int, bool] | None:
        """Policy steps 5-8 for an arbitration winner; a shadow rule takes no cap slot and opens no goal."""
        rule = self.ruleset.rules[r]
        refused = set(profile.get("opt_out_channels", ()))
        accepted = profile.get("channels")
        choice = [c for c in rule.channels if c not in refused and (accepted is None or c in accepted)]
        if not choice:
            self.stop(r, "no_channel")
            return None
        channel = choice[0]
        not_before = ts
        active = channel in self.policy.active_channels
        if active:
            days = tuple(profile.get("contact_days") or ()) or self.policy.contact_days
            not_before = self.not_before(ts, days)
            local = self.local(not_before)
            day_key, month_key = (msisdn, local.date()), (msisdn, (local.year, local.month))
            if (self.policy.daily_cap and self.per_day[day_key] >= self.policy.daily_cap) or (
                self.policy.monthly_cap and self.per_month[month_key] >= self.policy.monthly_cap
            ):
                self.stop(r, "capped")
                return None
        if rule.max_per_hour:
            recent = [t for t in self.rule_instructions[r] if t > ts - HOUR_MS]
            if len(recent) >= rule.max_per_hour:
                self.paused.add(r)
                self.stop(r, "paused")
                return None
            self.rule_instructions[r].append(ts)
        holdout = holdout_hash(msisdn, holdout_seed(rule.id)) < holdout_threshold(rule.holdout)
        if active:
            self.counters["cap_draw"][r] += 1
            if not rule.shadow:
                self.per_day[day_key] += 1
                self.per_month[month_key] += 1
        self.counters["emitted"][r] += 1
        if holdout:
            self.counters["holdout"][r] += 1
        else:
            self.sent_by_channel[r][channel] += 1
        self.last_instruction[(r, msisdn)] = ts
        if rule.goal is not None and not rule.shadow:
            self.open_goals[(r, msisdn)].append([ts, int(holdout), 0])
        return r, channel, not_before, holdout

    # -- timers -------------------------------------------------------------------------

    def fire_due(self) -> list[tuple[int, dict[str, int], tuple[int, str, int, bool]]]:
        """Fire every timer due at or before the watermark, by (due, rule, msisdn); returns the instructions."""
        watermark = self.max_ts - self.lateness
        fired = []
        while True:
            due = [(start + self.ruleset.rules[r].condition.within, r, msisdn)
                   for (r, msisdn), (start, _) in self.timers.items()
                   if start + self.ruleset.rules[r].condition.within <= watermark]
            if not due:
                return fired
            t, r, msisdn = min(due)
            _, start_event = self.timers.pop((r, msisdn))
            decision = self.fire(r, msisdn, t)
            if decision is not None:
                # The instruction's event: ts = due time, msisdn, the start event's params, zeros elsewhere.
                event = dict.fromkeys(EVENT_COLUMNS, 0)
                event.update({name: start_event[name] for name in self.ruleset.rules[r].params})
                event.update(ts=t, msisdn=msisdn)
                fired.append((r, event, decision))

    def fire(self, r: int, msisdn: int, t: int) -> tuple[int, str, int, bool] | None:
        """A timer firing is its own trigger at t: a match of its rule alone, its policy evaluated at t."""
        rule = self.ruleset.rules[r]
        if rule.active is not None and not self.in_period(rule.active, t):
            return None
        profile = self.profile(msisdn)
        if rule.audience is not None and not evaluate(rule.audience, {}, profile):
            return None
        self.counters["matched"][r] += 1
        if r in self.followed:
            self.matches[(r, msisdn)].append(t)
        if not self.admit(r, msisdn, t, profile):
            return None
        decision = self.deliver(r, msisdn, t, profile)
        return None if rule.shadow else decision

    def stop(self, r: int, reason: str) -> None:
        self.counters[f"stopped_{reason}"][r] += 1

    def process(self, batch) -> pa.Table:
        events = validate_events(batch)
        columns = [events[name].tolist() for name in EVENT_COLUMNS]
        rows = []
        for values in zip(*columns, strict=True):
            event = dict(zip(EVENT_COLUMNS, values, strict=True))
            # Timers the watermark has reached fire before the event that moved it.
            self.max_ts = max(self.max_ts, event["ts"])
            rows.extend(self.instruction(r, e, d) for r, e, d in self.fire_due())
            decision = self.decide(event)
            self.events += 1
            if decision is not None:
                rows.append(self.instruction(decision[0], event, decision))
        rows.extend(self.instruction(r, e, d) for r, e, d in self.fire_due())
        return pa.Table.from_pylist(rows, schema=INSTRUCTION_SCHEMA)

    def advance(self, ts: int) -> pa.Table:
        """Move the watermark as an event with this ts would; the instructions of the timers that fire."""
        self.max_ts = max(self.max_ts, ts)
        rows = [self.instruction(r, e, d) for r, e, d in self.fire_due()]
        return pa.Table.from_pylist(rows, schema=INSTRUCTION_SCHEMA)

    def instruction(self, r: int, event: dict[str, int], decision: tuple[int, str, int, bool]) -> dict:
        _, channel, not_before, holdout = decision
        rule = self.ruleset.rules[r]
        row = {
            "id": instruction_id(self.seeds[r], tuple(event[name] for name in EVENT_COLUMNS)),
            "ts": event["ts"],
            "msisdn": event["msisdn"],
            "rule": rule.id,
            "channel": channel,
            "template": rule.template,
            "priority": rule.priority,
            "holdout": holdout,
            "not_before": not_before,
            "params": [(name, str(event[name])) for name in rule.params],
        }
        self.issued[row["id"]] = (r, event["msisdn"])
        return row

    def feedback(self, ids, outcomes, ts) -> dict[str, int]:
        """One report per (id, outcome, ts); same meaning and result as engine.Engine.feedback."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        outcomes = [outcomes] * len(ids) if isinstance(outcomes, str) else list(outcomes)
        times = [ts] * len(ids) if isinstance(ts, int) else list(ts)
        result = {"applied": 0, "unknown": 0, "invalid": 0}
        for issued_id, outcome, t in zip(ids, outcomes, times, strict=True):
            if outcome not in OUTCOMES:
                result["invalid"] += 1
                continue
            if issued_id not in self.issued:
                result["unknown"] += 1
                continue
            r, msisdn = self.issued[issued_id]
            result["applied"] += 1
            self.counters[outcome][r] += 1
            decline = self.ruleset.rules[r].decline_cooldown
            if outcome == "accepted":
                self.blocked[(r, msisdn)] = FOREVER
            elif outcome == "declined" and decline > 0:
                self.blocked[(r, msisdn)] = max(self.blocked.get((r, msisdn), t + decline), t + decline)
            elif outcome == "opt_out":
                self.opted_out.add(msisdn)
        return result

    def stats(self) -> dict:
        """The per-rule part of engine.Engine.stats(), from the same counters."""
        return {
            "events": self.events,
            "rules": {
                rule.id: rule_report(
                    {name: values[r] for name, values in self.counters.items()},
                    dict(self.sent_by_channel[r]),
                    r in self.paused,
                    rule.shadow,
                )
                for r, rule in enumerate(self.ruleset.rules)
            },
        }
