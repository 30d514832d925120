"""Instruction rows (SPEC section 5), built column-wise from the kernel's output.

The kernel says which (row, rule) pairs became instructions, and which absence
timers fired; this module turns both into the one Arrow table users see per
batch.  engine/_fast/table.pyx writes every buffer of that table (ids,
columns, the params map with its values as decimal text) in one compiled pass
that also merges the fired timers into place; what is left here is a constant
number of Arrow calls per batch, whatever its instructions and rules.

Instruction ids are a 128-bit hash of the rule id and every field of the
triggering event, written as 32 hex digits.  They do not depend on batch
boundaries or arrival position, so a replay or a recovery gives the same ids
and a channel can drop duplicates.  `instruction_id` is the scalar statement
of the same hash, used by the reference implementation and the tests; the
compiled pass computes it for a whole batch.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from engine._fast.table import TableBuilder
from engine.rules import RuleSet
from engine.schema import COLUMN_INDEX, EVENT_COLUMNS, INSTRUCTION_SCHEMA, EventColumns

_M64 = (1 << 64) - 1
# Mirrored by ID_GOLDEN and ID_SECOND_SEED in engine/_fast/table.pyx.
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


class Instructions(NamedTuple):
    """A batch's instruction table, with the columns the feedback memory keeps as numpy arrays."""

    table: pa.Table
    rules: np.ndarray  # int32 rule index of each row
    msisdn: np.ndarray
    ts: np.ndarray
    holdout: np.ndarray


def _strings(offsets: np.ndarray, data: np.ndarray) -> pa.StringArray:
    return pa.StringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(data))


class InstructionBuilder:
    """Per-rule constants of a rule set, ready to turn kernel output into a table."""

    def __init__(self, ruleset: RuleSet):
        rules = ruleset.rules
        self._table = TableBuilder(
            np.array([rule_seed(r.id) for r in rules], np.uint64),
            np.array([r.priority for r in rules], np.int32),
            [[COLUMN_INDEX[p] for p in r.params] for r in rules],
            [r.id for r in rules],
            [r.template for r in rules],
            list(ruleset.channels),
            list(EVENT_COLUMNS),
        )

    def build(self, events: EventColumns, output: tuple[np.ndarray, ...], fired: tuple[np.ndarray, ...]
              ) -> Instructions:
        """Instructions of a batch: `output` is Kernel.process's for `events`, `fired` Kernel.take_fired's after it.

        A fired timer's instruction goes before those of the batch row it
        fired before (engine.Engine.process), in firing order.
        """
        b = self._table.build(events.columns, events.n, output, fired)
        params = pa.MapArray.from_arrays(
            pa.array(b["params_offsets"]),
            _strings(b["key_offsets"], b["key_data"]),
            _strings(b["value_offsets"], b["value_data"]),
        )
        table = pa.Table.from_arrays(
            [
                _strings(b["id_offsets"], b["id_data"]),
                pa.array(b["ts"]),
                pa.array(b["msisdn"]),
                _strings(b["rule_offsets"], b["rule_data"]),
                _strings(b["channel_offsets"], b["channel_data"]),
                _strings(b["template_offsets"], b["template_data"]),
                pa.array(b["priority"]),
                pa.array(b["holdout"]),
                pa.array(b["not_before"]),
                params,
            ],
            schema=INSTRUCTION_SCHEMA,
        )
        return Instructions(table, b["rule"], b["msisdn"], b["ts"], b["holdout"])
