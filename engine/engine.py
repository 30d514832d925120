"""The embedding API: `Engine` (SPEC section 7).

An Engine is one kernel over one set of subscribers.  Several Engines, each
fed the msisdns that `shard_of` gives it, make a sharded deployment: nothing
in an Engine is global.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine._fast.kernel import Kernel
from engine.checkpoint import CheckpointError, Snapshot
from engine.checkpoint import read as read_checkpoint
from engine.checkpoint import write as write_checkpoint
from engine.compiler import compile_program
from engine.erasure import as_msisdns, forget_state
from engine.feedback import DEFAULT_MAX_AGE, DEFAULT_MAX_ENTRIES, IssuedInstructions
from engine.instructions import InstructionBuilder
from engine.policy import FOREVER, OUTCOME_CODES, OUTCOMES, rule_report
from engine.profiles import ProfileStore
from engine.rules import Absence, Rule, RuleSet, load_rules, parse_rules
from engine.schema import (
    EVENT_COLUMNS,
    MAX_TS,
    MIN_TS,
    TS_RANGE,
    UNKNOWN_COLUMNS,
    EventColumns,
    validate_events,
)
from engine.storage import fsync_path

log = logging.getLogger("kairos.engine")

_KERNEL_COUNTERS = (
    "matched", "emitted", "holdout", "stopped_paused", "stopped_opt_out", "stopped_suppressed",
    "stopped_decline_cooldown", "stopped_cooldown", "stopped_arbitrated", "stopped_no_channel", "stopped_capped",
    "goal_treated", "goal_holdout", "cap_draw",
)
# An empty batch and the kernel's output for it: what advance() joins its fired timers to.
_NO_EVENTS = EventColumns(0, (None,) * len(EVENT_COLUMNS))
_NO_OUTPUT = (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64),
              np.zeros(0, np.bool_))
# Subscribers the kernel's first allocation holds; it doubles as needed.
DEFAULT_INITIAL_SUBSCRIBERS = 1 << 16


class Engine:
    """Rules, subscriber state and counters; `process` turns events into instructions.

    Not thread-safe: one Engine is driven by one thread at a time (the kernel
    releases the GIL, so Engines of different shards run in parallel).
    """

    def __init__(
        self,
        ruleset: RuleSet,
        *,
        profiles: str | os.PathLike | pa.Table | ProfileStore | None = None,
        initial_subscribers: int = DEFAULT_INITIAL_SUBSCRIBERS,
        issued_max_entries: int = DEFAULT_MAX_ENTRIES,
        issued_max_age: int = DEFAULT_MAX_AGE,
        lateness: int = 0,
        unknown_columns: str = "refuse",
    ):
        """`lateness` (ms) is how far the timer watermark trails the largest event ts seen (SPEC section 8).

        `unknown_columns`: "refuse" (a batch with a column SPEC section 2 does not name raises BatchError
        naming it, so that a misspelt `durration` is not read as 0) or "ignore" (extra fields pass).
        """
        if unknown_columns not in UNKNOWN_COLUMNS:
            raise ValueError(f"unknown_columns must be one of {', '.join(UNKNOWN_COLUMNS)}, not {unknown_columns!r}")
        self._unknown_columns = unknown_columns
        self.ruleset = ruleset
        self._initial_subscribers = initial_subscribers
        self._lateness = int(lateness)
        program = compile_program(ruleset)
        self._attributes = program["attributes"]
        self._kernel = Kernel(program, initial_subscribers, self._lateness)
        self._builder = InstructionBuilder(ruleset)
        self._channel_codes = {name: code for code, name in enumerate(ruleset.channels)}
        self._events = 0
        self._batches = 0
        self._instructions = 0
        # Event-time watermark: the largest ts seen or advanced to; never moves back.
        self._watermark = -1
        n = len(ruleset.rules)
        self._issued = IssuedInstructions(issued_max_entries, issued_max_age)
        self._outcomes = np.zeros((n, len(OUTCOMES)), np.int64)
        self._feedback = {"applied": 0, "unknown": 0, "invalid": 0}
        self._pauses = 0
        self._decline = np.array([rule.decline_cooldown for rule in ruleset.rules], np.int64)
        self._guarded = any(rule.max_per_hour for rule in ruleset.rules)
        self._paused = np.zeros(self._kernel.n_rules, np.uint8)
        self.profiles = ProfileStore.empty()
        if profiles is not None:
            self.load_profiles(profiles)

    @classmethod
    def from_files(cls, rules: str | os.PathLike, profiles: str | os.PathLike | None = None, **options) -> Engine:
        """An Engine over the rules file at `rules` (TOML, docs/rules.md) and optional profiles (engine.profiles)."""
        return cls(load_rules(rules), profiles=profiles, **options)

    def load_profiles(self, source: str | os.PathLike | pa.Table | ProfileStore) -> None:
        """Replace the subscriber profiles (Parquet, Arrow IPC or CSV file, or an Arrow table).

        Takes effect for every event processed after the call (policy columns,
        `where` and `audience` tests on profile fields); condition state is
        untouched.  A table that cannot be used (a field the rules test holds
        floats, say) raises engine.ProfileError and leaves the current
        profiles in place.
        """
        store = ProfileStore.load(source)
        _set_profiles(self._kernel, store, self.ruleset, store.attribute_matrix(self._attributes))
        self.profiles = store

    @classmethod
    def from_text(cls, text: str, source: str = "<string>", **options) -> Engine:
        """An Engine over rules given as TOML text."""
        return cls(parse_rules(text, source), **options)

    def process(self, batch) -> pa.Table:
        """Match one batch of events; return its instructions (SPEC section 5).

        `batch` is an Arrow RecordBatch or Table, or a dict of numpy arrays,
        with the columns of SPEC section 2.  A batch that fails validation
        raises engine.BatchError and changes no state.  Events are processed
        in row order; instructions come out in the order of their events.
        """
        events = validate_events(batch, unknown_columns=self._unknown_columns)
        # Read while validation has left the column in cache; the kernel's state traffic evicts it.
        newest = int(events["ts"].max()) if events.n else -1
        output = self._kernel.process(events.columns, events.n)
        self._watermark = max(self._watermark, newest)
        self._events += events.n
        self._batches += 1
        return self._issue(events, output)

    def _issue(self, events: EventColumns, output: tuple[np.ndarray, ...]) -> pa.Table:
        """The instructions of kernel output for `events` and of the timers fired meanwhile; remember them all.

        A timer that fired before event row k goes before the instructions
        of row k, in firing order.
        """
        instructions = self._builder.build(events, output, self._kernel.take_fired())
        table = instructions.table
        self._instructions += table.num_rows
        if table.num_rows:
            self._issued.add(table.column("id"), instructions.rules, instructions.msisdn, instructions.ts,
                             instructions.holdout)
        if self._guarded:
            self._note_pauses()
        return table

    def _note_pauses(self) -> None:
        paused = self._kernel.paused_rules()
        for r in np.flatnonzero(paused > self._paused):
            rule = self.ruleset.rules[r]
            self._pauses += 1
            log.warning("rule %r paused: more than %d instructions within an hour (guardrail max_per_hour); "
                        "Engine.resume(%r) lifts the pause", rule.id, rule.max_per_hour, rule.id)
        self._paused = paused

    def resume(self, rule_id: str) -> None:
        """Lift the guardrail pause of a rule; its count of instructions in the last hour starts from zero."""
        ids = [rule.id for rule in self.ruleset.rules]
        if rule_id not in ids:
            raise KeyError(f"no rule {rule_id!r}")
        self._kernel.resume(ids.index(rule_id))
        self._paused = self._kernel.paused_rules()

    def forget(self, msisdns) -> dict[str, int]:
        """Erase subscribers: nothing of them stays in the engine, nor in a checkpoint written after this.

        Their kernel state goes (index entry, condition rows and so pending
        absence timers, opt-outs, suppressions, decline cooldowns, caps, open
        goal windows: engine.erasure), with their profile row and the
        instructions remembered for feedback (feedback to those now counts as
        unknown).  One who comes back is a new subscriber.  Counters per rule
        stay: they are aggregates.  Checkpoints already on disk are not
        touched.  msisdns the engine does not know are ignored, so every shard
        can be asked.  The state moves as whole arrays into a new kernel, as
        in reload_rules, only when some subscriber had state.

        Returns {"subscribers": found in the kernel, "profiles": rows dropped, "issued": instructions dropped}.
        """
        gone = as_msisdns(msisdns)
        state = forget_state(self._kernel.export_state(), gone)
        found = self._kernel.n_subs - len(state["msisdn"])
        store, profiles = self.profiles.without(gone)
        if found:
            kernel = Kernel(compile_program(self.ruleset), max(self._kernel.n_subs, self._initial_subscribers),
                            self._lateness)
            kernel.import_state(state)
            kernel.set_clock(self._kernel.max_ts)
            self._kernel = kernel
        if found or profiles:
            _set_profiles(self._kernel, store, self.ruleset, store.attribute_matrix(self._attributes))
            self.profiles = store
        return {"subscribers": found, "profiles": profiles, "issued": self._issued.drop_subscribers(gone)}

    def feedback(self, ids: str | Sequence[str] | pa.Array, outcomes: str | Sequence[str] | pa.Array,
                 ts: int | Sequence[int] | np.ndarray) -> dict[str, int]:
        """Apply channel feedback (SPEC section 6): one report, or a batch of equal-length columns.

        `outcomes` are delivered, failed, accepted, declined, considering or
        opt_out; `ts` the time of each report (ms, event time), or one time
        for all.  accepted suppresses the rule for the subscriber for good,
        declined for the rule's decline cooldown from `ts`, opt_out stops
        all marketing to the subscriber; every outcome is counted per rule.
        Feedback affects only events processed after this call.  An id not
        in memory (engine.feedback) is counted as unknown, an outcome name
        not in the list as invalid: neither is fatal, and the rest applies.
        Returns the counts of applied, unknown and invalid reports.
        """
        ids = [ids] if isinstance(ids, str) else _pylist(ids)
        outcomes = [outcomes] * len(ids) if isinstance(outcomes, str) else _pylist(outcomes)
        times = [int(ts)] * len(ids) if np.ndim(ts) == 0 else [int(t) for t in _pylist(ts)]
        if not len(ids) == len(outcomes) == len(times):
            raise ValueError("feedback: ids, outcomes and ts differ in length")
        result = {"applied": 0, "unknown": 0, "invalid": 0}
        block_msisdn, block_rule, block_until = [], [], []
        found, fields = self._issued.lookup(ids)
        for k, (outcome, t) in enumerate(zip(outcomes, times, strict=True)):
            code = OUTCOME_CODES.get(outcome)
            if code is None:
                result["invalid"] += 1
                continue
            if not found[k]:
                result["unknown"] += 1
                continue
            rule, msisdn = int(fields["rule"][k]), int(fields["msisdn"][k])
            result["applied"] += 1
            self._outcomes[rule, code] += 1
            if outcome == "accepted":
                block_msisdn.append(msisdn), block_rule.append(rule), block_until.append(FOREVER)
            elif outcome == "declined" and self._decline[rule] > 0:
                block_msisdn.append(msisdn), block_rule.append(rule), block_until.append(t + int(self._decline[rule]))
            elif outcome == "opt_out":
                block_msisdn.append(msisdn), block_rule.append(-1), block_until.append(FOREVER)
        if block_msisdn:
            self._kernel.block(np.array(block_msisdn, np.int64), np.array(block_rule, np.int32),
                               np.array(block_until, np.int64))
        for key, value in result.items():
            self._feedback[key] += value
        return result

    @property
    def watermark(self) -> int:
        """Largest event time (ms) seen in a batch or given to `advance`; -1 before any."""
        return self._watermark

    def advance(self, ts: int) -> pa.Table:
        """Move event time to `ts` without events, as an event with that ts would.

        Returns the instructions of `absence` timers that fall due: those due
        at or before ts - lateness (SPEC section 8), in firing order.  The
        watermark moves forward and never back.  `ts` must lie in the event
        time range, engine.schema.MIN_TS..MAX_TS (ValueError otherwise, and
        nothing changes): a caller that adds idle time clamps to MAX_TS.
        """
        ts = int(ts)
        if not MIN_TS <= ts <= MAX_TS:
            raise ValueError(f"advance: ts {ts} is outside the event time range {TS_RANGE}")
        self._watermark = max(self._watermark, ts)
        self._kernel.advance(ts)
        return self._issue(_NO_EVENTS, _NO_OUTPUT)

    def reload_rules(self, rules: str | os.PathLike | RuleSet,
                     profiles: str | os.PathLike | pa.Table | ProfileStore | None = None) -> dict[str, list[str]]:
        """Swap in new rules while keeping subscribers and the state of unchanged rules.

        `rules` is a path or a parsed RuleSet.  A path is read again with its
        set files.  `profiles`, when given, replaces the profiles in the same
        step (as load_profiles would), checked against the new rules.  A file
        that does not compile raises RulesError before anything changes, and
        rules testing a profile field the profiles (the new ones, else those
        loaded) hold in a type they cannot test raise ProfileError: either way
        the old rules and profiles keep running.

        A rule keeps its condition state (windows, last values) and cooldown
        history when a rule of the same id has the same kinds, filter (set
        contents included) and condition; a rule whose definition changed
        starts fresh (its where and audience included).  Template, channels, priority, params, cooldown length
        and policy keys may change without losing that state.  What a
        subscriber said about a rule stays with its id whatever changed:
        acceptance, decline cooldowns, open goal windows (while the rule has
        a goal), feedback to its earlier instructions, its guardrail count.
        Opt-outs, caps, profiles and counters carry over.  The state moves as
        whole arrays into a new kernel: 0.6 s for 800,000 subscribers (bench/bench_engine.py).

        Returns the rule ids by fate: {"kept": [...], "fresh": [...], "removed": [...]}.
        """
        new_set = rules if isinstance(rules, RuleSet) else load_rules(rules)
        old_rules, new_rules = self.ruleset.rules, new_set.rules
        program = compile_program(new_set)
        store = self.profiles if profiles is None else ProfileStore.load(profiles)
        attrs = store.attribute_matrix(program["attributes"])  # refuses before anything changes
        # Presized as the old one was (or to the subscribers it holds), so a reload adds no growth pauses.
        new_kernel = Kernel(program, max(self._kernel.n_subs, self._initial_subscribers), self._lateness)
        # The kernel numbers the file's rules, then one goal filter per rule with a goal (engine.compiler).
        # source[r]: the old kernel index of new kernel rule r (a rule or goal of the same id), -1 for none;
        # target: the reverse, with one more slot for "every rule" (opt-out) in the blocks map.
        old_keys = _kernel_rule_keys(self.ruleset)
        new_keys = _kernel_rule_keys(new_set)
        n_old, n_new = len(old_keys), len(new_keys)
        old_position = {key: r for r, key in enumerate(old_keys)}
        source = np.array([old_position.get(key, -1) for key in new_keys], np.int64)
        kept = source >= 0
        target = np.full(n_old + 1, -1, np.int64)
        target[source[kept]] = np.flatnonzero(kept)
        target[n_old] = n_new

        old = self._kernel.export_state()
        new_width = new_kernel.export_state()["width"]
        old_stateful = np.cumsum(old["width"] > 0) - 1
        new_stateful = np.cumsum(new_width > 0) - 1
        n_subs = len(old["msisdn"])
        state = {
            "msisdn": old["msisdn"],
            "width": new_width,
            "slots": np.full((n_subs, int((new_width > 0).sum())), -1, np.int32),
            "caps.key": old["caps.key"], "caps.value": old["caps.value"],
            "policy_clock": old["policy_clock"], "goal_clock": old["goal_clock"],
        }
        for name in [*(k for k in self._kernel.counters() if k != "sent_channel"), "paused"]:
            state[name] = np.zeros(n_new, old[name].dtype)
            state[name][kept] = old[name][source[kept]]
        state["sent_channel"] = np.zeros((n_new, len(new_set.channels)), np.int64)
        for c, channel in enumerate(new_set.channels):
            if channel in self.ruleset.channels:
                state["sent_channel"][kept, c] = old["sent_channel"][source[kept], self.ruleset.channels.index(channel)]

        fate: dict[str, list[str]] = {"kept": [], "fresh": [], "removed": []}
        for r in range(n_new):
            same = bool(kept[r]) and (r >= len(new_rules) or _same_definition(old_rules[source[r]], new_rules[r]))
            if new_width[r]:
                if same and old["width"][source[r]] == new_width[r]:
                    state["slots"][:, new_stateful[r]] = old["slots"][:, old_stateful[source[r]]]
                    state[f"state.{r}"] = old[f"state.{source[r]}"]
                else:
                    same = False
                    state[f"state.{r}"] = np.zeros(0, np.int64)
            if r < len(new_rules):
                fate["kept" if same else "fresh"].append(new_rules[r].id)
        new_ids = {rule.id for rule in new_rules}
        fate["removed"] = [rule.id for rule in old_rules if rule.id not in new_ids]

        # Maps keyed by (subscriber, rule) as (sub + 1) * (kernel rules + 1) + rule: renumber the rule part.
        def renumber(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            sub_part, rule_part = np.divmod(keys, n_old + 1)
            renumbered = target[rule_part]
            return sub_part * (n_new + 1) + renumbered, renumbered >= 0

        keys, keep = renumber(old["blocks.key"])
        state["blocks.key"], state["blocks.value"] = keys[keep], old["blocks.value"][keep]
        records = old["goal_records"]
        keys, keep = renumber(records[:, 0])
        has_goal = np.array([r < len(new_rules) and new_rules[r].goal is not None for r in range(n_new + 1)])
        keep &= has_goal[keys % (n_new + 1)]  # a rule that lost its goal drops its open goal windows
        state["goal_records"] = np.column_stack([keys, records[:, 1:]])[keep]
        # Guardrail: instruction times of the last hour per rule, oldest first; a lowered max_per_hour keeps the
        # newest, none without a guardrail.
        limit = [rule.max_per_hour for rule in new_rules] + [0] * (n_new - len(new_rules))
        times: dict[int, list[int]] = {}
        for old_rule, t in old["guard"].tolist():
            r = int(target[old_rule])
            if r >= 0 and limit[r]:
                times.setdefault(r, []).append(t)
        state["guard"] = np.array([(r, t) for r, ts in times.items() for t in ts[-limit[r]:]], np.int64).reshape(-1, 2)

        # A rule switched between shadow and live keeps its state; its figures start again, so that
        # what it would have sent and what it sent are never added up.
        switched = np.array([bool(kept[r]) and r < len(new_rules) and old_rules[source[r]].shadow != new_rules[r].shadow
                             for r in range(n_new)], bool)
        for name in [*(k for k in self._kernel.counters()), "paused"]:
            state[name][switched] = 0
        new_kernel.import_state(state)
        new_kernel.set_clock(self._kernel.max_ts)
        _set_profiles(new_kernel, store, new_set, attrs)
        # Feedback counts and issued instructions are numbered by the file's rules only.
        n_rules = len(new_rules)
        outcomes = np.zeros((n_rules, len(OUTCOMES)), np.int64)
        outcomes[kept[:n_rules]] = self._outcomes[source[:n_rules][kept[:n_rules]]]
        self._issued.renumber_rules(target[:len(old_rules)])

        self.ruleset = new_set
        self.profiles = store
        self._attributes = program["attributes"]
        self._kernel = new_kernel
        self._builder = InstructionBuilder(new_set)
        self._channel_codes = {name: code for code, name in enumerate(new_set.channels)}
        self._outcomes = outcomes
        self._decline = np.array([rule.decline_cooldown for rule in new_rules], np.int64)
        self._guarded = any(rule.max_per_hour for rule in new_rules)
        self._paused = new_kernel.paused_rules()
        return fate

    def stats(self) -> dict:
        """Totals and per-rule figures: matches, instructions, stops by reason, feedback, goals, rates.

        docs/policy.md explains every figure.
        """
        counters = self._kernel.counters()
        paused = self._kernel.paused_rules()
        rules = {}
        for r, rule in enumerate(self.ruleset.rules):
            c = {name: int(counters[name][r]) for name in _KERNEL_COUNTERS}
            c.update({outcome: int(self._outcomes[r, code]) for code, outcome in enumerate(OUTCOMES)})
            by_channel = {ch: int(counters["sent_channel"][r, self._channel_codes[ch]]) for ch in rule.channels}
            rules[rule.id] = rule_report(c, by_channel, bool(paused[r]), rule.shadow)
        return {
            "events": self._events,
            "batches": self._batches,
            "instructions": self._instructions,
            "subscribers": self._kernel.n_subs,
            "state_bytes": self._kernel.memory_bytes(),
            "profiles": len(self.profiles),
            "feedback": dict(self._feedback),
            "issued_in_memory": len(self._issued),
            "guardrail_pauses": self._pauses,
            "rules": rules,
        }

    def snapshot(self) -> Snapshot:
        """Rules, subscriber state and counters copied out of the engine (engine.checkpoint.Snapshot).

        Whole-array copies (no per-subscriber loop): the engine may go on
        at once while another thread writes the snapshot with
        `engine.checkpoint.write`.
        """
        arrays = {**self._kernel.export_state(), "outcomes": self._outcomes.copy(), "paused_seen": self._paused.copy()}
        meta = {
            "rules_source": self.ruleset.source,
            # Values of the sets read from files: a restore does not read those files again.
            "set_values": {name: list(self.ruleset.sets[name]) for name in self.ruleset.set_files},
            "profiles_source": self.profiles.source,
            "events": self._events,
            "batches": self._batches,
            "instructions": self._instructions,
            "feedback": dict(self._feedback),
            "guardrail_pauses": self._pauses,
            "watermark": self._watermark,
            "timer_clock": self._kernel.max_ts,
            "issued_max_entries": self._issued.max_entries,
            "issued_max_age": self._issued.max_age,
            "issued": dict(self._issued.state),
        }
        return Snapshot(arrays, self.ruleset.text, {"profiles": self.profiles.table, "issued": self._issued.to_table()},
                        meta)

    def checkpoint(self, directory: str | os.PathLike) -> None:
        """Write rules, subscriber state and counters to `directory`, atomically (engine/checkpoint.py).

        The state goes out as whole arrays (no per-subscriber loop), with a
        CRC-32C of every file.  The new checkpoint is written complete beside
        its final name (`NAME.partial`, meta.json last, everything fsynced),
        then renamed into place, the old one moving aside to `NAME.old` for
        the instant between the two renames.  Whenever a crash strikes,
        `restore(directory)` finds the new checkpoint or the old one.
        """
        final = Path(directory)
        staging, previous = _staging(final), _previous(final)
        shutil.rmtree(staging, ignore_errors=True)
        write_checkpoint(self.snapshot(), staging)
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
            final.rename(previous)
        staging.rename(final)
        fsync_path(final.parent)
        shutil.rmtree(previous, ignore_errors=True)

    @classmethod
    def restore(cls, directory: str | os.PathLike, **options) -> Engine:
        """An Engine that continues exactly where `checkpoint(directory)` left off.

        If a crash struck between checkpoint()'s two renames, the complete new
        checkpoint (`NAME.partial`) or else the old one (`NAME.old`) is used.
        A torn or corrupt checkpoint, or one of a format this version does not
        read, raises engine.checkpoint.CheckpointError naming what is wrong.
        """
        directory = _complete_checkpoint(Path(directory))
        meta, state, text, tables = read_checkpoint(directory)
        options.setdefault("issued_max_entries", meta["issued_max_entries"])
        options.setdefault("issued_max_age", meta["issued_max_age"])
        ruleset = parse_rules(text, meta["rules_source"], set_values=meta.get("set_values", {}))
        engine = cls(ruleset, **options)
        engine.load_profiles(ProfileStore(tables["profiles"], meta["profiles_source"]))
        try:
            engine._kernel.import_state(state)
            engine._outcomes[:] = state["outcomes"]
            engine._paused = state["paused_seen"].astype(np.uint8)
        except KeyError as exc:
            raise CheckpointError(f"{directory}: checkpoint state lacks array {exc.args[0]!r}") from None
        engine._issued.load(tables["issued"], meta["issued"]["added"], meta["issued"]["newest"])
        engine._events = meta["events"]
        engine._batches = meta["batches"]
        engine._instructions = meta["instructions"]
        engine._feedback = dict(meta["feedback"])
        engine._pauses = meta["guardrail_pauses"]
        engine._watermark = meta["watermark"]
        engine._kernel.set_clock(meta.get("timer_clock", meta["watermark"]))
        return engine


def _kernel_rule_keys(ruleset: RuleSet) -> list[tuple[str, str]]:
    """What each kernel rule is, in kernel order: the file's rules, then their goal filters (engine.compiler)."""
    return [("rule", rule.id) for rule in ruleset.rules] + [
        ("goal", rule.id) for rule in ruleset.rules if rule.goal is not None] + [
        ("cancel", rule.id) for rule in ruleset.rules if isinstance(rule.condition, Absence)]


def _same_definition(old: Rule, new: Rule) -> bool:
    """Whether a rule's state means the same under `new` as under `old`.

    A changed audience counts as a change.  A pending absence timer keeps
    the start event's params, so for an absence rule the params are part of
    its definition.
    """
    def definition(rule: Rule) -> tuple:
        kept_params = rule.params if isinstance(rule.condition, Absence) else ()
        return rule.on, rule.where, rule.condition, rule.audience, kept_params

    return definition(old) == definition(new)


def _set_profiles(kernel: Kernel, store: ProfileStore, ruleset: RuleSet, attrs: np.ndarray) -> None:
    """Hand a profile store to a kernel: its policy columns and the attribute matrix of the kernel's rules."""
    arrays = store.policy_arrays(ruleset.channels)
    kernel.set_profiles(arrays["msisdn"], arrays["allowed"], arrays["flags"], arrays["days"], attrs)


def _pylist(values) -> list:
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values.to_pylist()
    if isinstance(values, np.ndarray):
        return values.tolist()
    return list(values)


def _staging(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def _previous(final: Path) -> Path:
    return final.with_name(final.name + ".old")


def _complete_checkpoint(final: Path) -> Path:
    """The directory restore() reads: the checkpoint, or what a crash mid-rename left."""
    if final.exists():
        return final
    staging = _staging(final)
    if (staging / "meta.json").exists():  # written last: the staged checkpoint is whole
        return staging
    if _previous(final).exists():
        return _previous(final)
    raise FileNotFoundError(f"no checkpoint at {final}")


