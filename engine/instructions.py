"""Instruction rows (SPEC section 5), built column-wise from the kernel's output.

The kernel says which (row, rule) pairs became instructions; this module turns
them into the Arrow table users see, with numpy and Arrow operations over all
instructions of a batch at once (a Python loop per rule, never per row).

Instruction ids are a 128-bit hash of the rule id and every field of the
triggering event, written as 32 hex digits.  They do not depend on batch
boundaries or arrival position, so a replay or a recovery gives the same ids
and a channel can drop duplicates.  `instruction_id` is the scalar statement
of the same hash, used by the reference implementation and the tests; the
kernel module's `instruction_ids` computes it for a whole batch.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from engine._fast.kernel import instruction_ids
from engine.rules import RuleSet
from engine.schema import COLUMN_INDEX, EVENT_COLUMNS, INSTRUCTION_SCHEMA, EventColumns

_M64 = (1 << 64) - 1
# Mirrored by ID_GOLDEN and ID_SECOND_SEED in engine/_fast/kernel.pyx.
_GOLDEN = 0x9E3779B97F4A7C15
_SECOND_SEED = 0x5851F42D4C957F2D


def rule_seed(rule_id: str) -> int:
    """64-bit seed of a rule's instruction ids, from its id alone."""
    return int.from_bytes(hashlib.blake2b(rule_id.encode(), digest_size=8).digest(), "little")


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def instruction_id(seed: int, event: tuple[int, ...]) -> str:
    """Id of the instruction a rule (by seed) makes of one event (EVENT_COLUMNS order)."""
    h1, h2 = seed, _mix64(seed ^ _SECOND_SEED)
    for value in event:
        v = value & _M64
        h1 = _mix64((h1 + _GOLDEN + v) & _M64)
        h2 = _mix64((h2 + _GOLDEN + v) & _M64)
    return f"{h1:016x}{h2:016x}"


def _ids(events: EventColumns, rows: np.ndarray, seeds: np.ndarray) -> pa.StringArray:
    n = len(rows)
    data = instruction_ids(events.columns, rows, seeds)
    offsets = np.arange(n + 1, dtype=np.int32) * 32
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


class InstructionBuilder:
    """Per-rule constants of a rule set, ready to turn kernel output into a table."""

    def __init__(self, ruleset: RuleSet):
        rules = ruleset.rules
        self.rule_ids = pa.array([r.id for r in rules], pa.string())
        self.channels = pa.array(ruleset.channels, pa.string())  # by channel code
        self.templates = pa.array([r.template for r in rules], pa.string())
        self.priorities = np.array([r.priority for r in rules], np.int32)
        self.seeds = np.array([rule_seed(r.id) for r in rules], np.uint64)
        self.params = [tuple(COLUMN_INDEX[p] for p in r.params) for r in rules]
        self.param_names = [r.params for r in rules]
        self.n_params = np.array([len(p) for p in self.params], np.int32)

    def build(self, events: EventColumns, rows: np.ndarray, rules: np.ndarray, channels: np.ndarray,
              not_before: np.ndarray, holdout: np.ndarray) -> pa.Table:
        """Instructions for kernel output: event rows, rule indices, channel codes, not_before, holdout."""
        ts = events["ts"][rows]
        msisdn = events["msisdn"][rows]
        return pa.Table.from_arrays(
            [
                _ids(events, rows, self.seeds[rules]),
                pa.array(ts, pa.int64()),
                pa.array(msisdn, pa.int64()),
                self.rule_ids.take(rules),
                self.channels.take(channels),
                self.templates.take(rules),
                pa.array(self.priorities[rules], pa.int32()),
                pa.array(holdout, pa.bool_()),
                pa.array(not_before, pa.int64()),
                self._params(events, rows, rules),
            ],
            schema=INSTRUCTION_SCHEMA,
        )

    def _params(self, events: EventColumns, rows: np.ndarray, rules: np.ndarray) -> pa.MapArray:
        counts = self.n_params[rules]
        offsets = np.zeros(len(rows) + 1, np.int32)
        np.cumsum(counts, out=offsets[1:])
        total = int(offsets[-1])
        key_index = np.empty(total, np.int32)
        values = np.empty(total, np.int64)
        for r in np.unique(rules):
            which = np.flatnonzero(rules == r)
            for position, column in enumerate(self.params[r]):
                slots = offsets[which] + position
                key_index[slots] = column
                source = events.columns[column]
                values[slots] = 0 if source is None else source[rows[which]]
        keys = pa.array(EVENT_COLUMNS, pa.string()).take(pa.array(key_index))
        items = pa.array(values, pa.int64()).cast(pa.string())
        return pa.MapArray.from_arrays(pa.array(offsets), keys, items)
