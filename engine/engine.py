"""The embedding API: `Engine` (SPEC section 7).

An Engine is one kernel over one set of subscribers.  Several Engines, each
fed the msisdns that `shard_of` gives it, make a sharded deployment: nothing
in an Engine is global.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine._fast.kernel import Kernel
from engine.compiler import compile_program
from engine.instructions import InstructionBuilder
from engine.rules import Rule, RuleSet, load_rules, parse_rules
from engine.schema import INSTRUCTION_SCHEMA, validate_events

_CHECKPOINT_FORMAT = 1
# Subscribers the kernel's first allocation holds; it doubles as needed.
DEFAULT_INITIAL_SUBSCRIBERS = 1 << 16


class Engine:
    """Rules, subscriber state and counters; `process` turns events into instructions.

    Not thread-safe: one Engine is driven by one thread at a time (the kernel
    releases the GIL, so Engines of different shards run in parallel).
    """

    def __init__(self, ruleset: RuleSet, *, initial_subscribers: int = DEFAULT_INITIAL_SUBSCRIBERS):
        self.ruleset = ruleset
        self._kernel = Kernel(compile_program(ruleset), initial_subscribers)
        self._builder = InstructionBuilder(ruleset)
        self._events = 0
        self._batches = 0
        self._instructions = 0
        # Event-time watermark: the largest ts seen or advanced to; never moves back.
        self._watermark = -1

    @classmethod
    def from_files(cls, rules: str | os.PathLike, **options) -> Engine:
        """An Engine over the rules file at `rules` (TOML, docs/rules.md)."""
        return cls(load_rules(rules), **options)

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
        events = validate_events(batch)
        rows, rules = self._kernel.process(events.columns, events.n)
        if events.n:
            self._watermark = max(self._watermark, int(events["ts"].max()))
        self._events += events.n
        self._batches += 1
        self._instructions += len(rows)
        return self._builder.build(events, rows, rules)

    @property
    def watermark(self) -> int:
        """Largest event time (ms) seen in a batch or given to `advance`; -1 before any."""
        return self._watermark

    def advance(self, ts: int) -> pa.Table:
        """Move event time to `ts` without events, as an event with that ts would.

        Returns the instructions of timers that fall due (SPEC section 8).  No
        condition of the current rule language keeps timers, so the table is
        empty; the watermark moves forward and never back.
        """
        self._watermark = max(self._watermark, int(ts))
        return INSTRUCTION_SCHEMA.empty_table()

    def reload_rules(self, rules: str | os.PathLike | RuleSet) -> dict[str, list[str]]:
        """Swap in new rules while keeping subscribers and the state of unchanged rules.

        `rules` is a path or a parsed RuleSet.  A file that does not compile
        raises RulesError before anything changes: the old rules keep running.
        A rule keeps its state (condition and cooldown history) when a rule of
        the same id has the same kinds, filter (set contents included) and
        condition; a rule whose definition changed starts fresh.  Template,
        channels, priority, params and cooldown length may change without
        losing state.  Counters continue per rule id.  The state moves as whole
        arrays, a pause of about one checkpoint's copy.

        Returns the rule ids by fate: {"kept": [...], "fresh": [...], "removed": [...]}.
        """
        new_set = rules if isinstance(rules, RuleSet) else load_rules(rules)
        new_kernel = Kernel(compile_program(new_set), max(self._kernel.n_subs, DEFAULT_INITIAL_SUBSCRIBERS))
        old_state = self._kernel.export_state()
        new_width = new_kernel.export_state()["width"]
        old_index = {rule.id: r for r, rule in enumerate(self.ruleset.rules)}
        n_subs = len(old_state["msisdn"])
        old_stateful = np.cumsum(old_state["width"] > 0) - 1
        new_stateful = np.cumsum(new_width > 0) - 1
        state = {
            "msisdn": old_state["msisdn"],
            "width": new_width,
            "slots": np.full((n_subs, int((new_width > 0).sum())), -1, np.int32),
        }
        counter_names = [name for name in old_state if name not in ("msisdn", "width", "slots")
                         and not name.startswith("state.")]
        for name in counter_names:
            state[name] = np.zeros(len(new_set.rules), np.int64)
        fate: dict[str, list[str]] = {"kept": [], "fresh": [], "removed": []}
        for r, rule in enumerate(new_set.rules):
            old = old_index.get(rule.id)
            if old is None:
                fate["fresh"].append(rule.id)
                if new_width[r]:
                    state[f"state.{r}"] = np.zeros(0, np.int64)
                continue
            for name in counter_names:
                state[name][r] = old_state[name][old]
            if not new_width[r]:
                fate["kept" if _same_definition(self.ruleset.rules[old], rule) else "fresh"].append(rule.id)
                continue
            if _same_definition(self.ruleset.rules[old], rule) and old_state["width"][old] == new_width[r]:
                state["slots"][:, new_stateful[r]] = old_state["slots"][:, old_stateful[old]]
                state[f"state.{r}"] = old_state[f"state.{old}"]
                fate["kept"].append(rule.id)
            else:
                state[f"state.{r}"] = np.zeros(0, np.int64)
                fate["fresh"].append(rule.id)
        new_ids = {rule.id for rule in new_set.rules}
        fate["removed"] = [rule.id for rule in self.ruleset.rules if rule.id not in new_ids]
        new_kernel.import_state(state)
        self.ruleset = new_set
        self._kernel = new_kernel
        self._builder = InstructionBuilder(new_set)
        return fate

    def stats(self) -> dict:
        """Totals and per-rule counters: matched, sent, and stops by reason."""
        counters = self._kernel.counters()
        return {
            "events": self._events,
            "batches": self._batches,
            "instructions": self._instructions,
            "subscribers": self._kernel.n_subs,
            "state_bytes": self._kernel.memory_bytes(),
            "rules": {
                rule.id: {
                    "matched": int(counters["matched"][r]),
                    "sent": int(counters["emitted"][r]),
                    "stopped": {
                        "cooldown": int(counters["stopped_cooldown"][r]),
                        "arbitrated": int(counters["stopped_arbitrated"][r]),
                    },
                }
                for r, rule in enumerate(self.ruleset.rules)
            },
        }

    def checkpoint(self, directory: str | os.PathLike) -> None:
        """Write rules, subscriber state and counters to `directory`, atomically.

        The state goes out as whole arrays (no per-subscriber loop).  The new
        checkpoint is written complete beside its final name (`NAME.partial`,
        meta.json last, everything fsynced), then renamed into place, the old
        one moving aside to `NAME.old` for the instant between the two
        renames.  Whenever a crash strikes, `restore(directory)` finds the new
        checkpoint or the old one.
        """
        final = Path(directory)
        staging, previous = _staging(final), _previous(final)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with open(staging / "state.npz", "wb") as f:
            np.savez(f, **self._kernel.export_state())
        (staging / "rules.toml").write_text(self.ruleset.text, encoding="utf-8")
        meta = {
            "format": _CHECKPOINT_FORMAT,
            "rules_source": self.ruleset.source,
            "events": self._events,
            "batches": self._batches,
            "instructions": self._instructions,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        for name in ("state.npz", "rules.toml", "meta.json"):
            _fsync(staging / name)
        _fsync(staging)
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
            final.rename(previous)
        staging.rename(final)
        _fsync(final.parent)
        shutil.rmtree(previous, ignore_errors=True)

    @classmethod
    def restore(cls, directory: str | os.PathLike, **options) -> Engine:
        """An Engine that continues exactly where `checkpoint(directory)` left off.

        If a crash struck between checkpoint()'s two renames, the complete new
        checkpoint (`NAME.partial`) or else the old one (`NAME.old`) is used.
        """
        directory = _complete_checkpoint(Path(directory))
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{directory}: checkpoint format {meta.get('format')!r} is not {_CHECKPOINT_FORMAT}")
        text = (directory / "rules.toml").read_text(encoding="utf-8")
        engine = cls(parse_rules(text, meta["rules_source"]), **options)
        # np.load given a path leaks the file when the archive is damaged;
        # owning the file object closes it on every path.
        with open(directory / "state.npz", "rb") as f, np.load(f) as arrays:
            state = {name: arrays[name] for name in arrays.files}
        try:
            engine._kernel.import_state(state)
        except KeyError as exc:
            raise ValueError(f"{directory}: checkpoint state lacks array {exc.args[0]!r}") from None
        engine._events = meta["events"]
        engine._batches = meta["batches"]
        engine._instructions = meta["instructions"]
        return engine


def _same_definition(old: Rule, new: Rule) -> bool:
    """Whether a rule's state means the same under `new` as under `old`."""
    return (old.on, old.where, old.condition) == (new.on, new.where, new.condition)


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
