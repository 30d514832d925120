"""Erasing subscribers from a kernel's state: the data-protection right to be forgotten.

`forget_state` takes what `Kernel.export_state()` returns and gives back
the same state without some subscribers, ready for `Kernel.import_state`
on a fresh kernel of the same rules (`Engine.forget` does the rest: the
profile table and the issued-instruction memory).  Whole-array numpy work:
no Python loop over subscribers, only over stateful rules and maps.

What is personal in the state, and where it sits (engine/_fast/kernel.pyx):

- the dense index: `msisdn[d]` is subscriber d's number;
- `slots[d, k]`: d's row in stateful rule k's pool (`state.{r}`, `width[r]`
  words a row, one owner per row), -1 for none; absence timers are these
  rows (the heap is rebuilt from them on import), so dropping the rows
  drops the pending timers;
- the policy maps, keyed by dense id: `blocks.key` and `goal_records[:, 0]`
  as (d + 1) * (n_rules + 1) + rule (n_rules counts the goal and cancel
  filters, i.e. len(width); rule n_rules is "every rule", the opt-out),
  `caps.key` as (d + 1) << 21 | period bits.

What stays: the per-rule counters, the guardrail rings (instruction times of
the last hour per rule, no subscriber in them), the pauses and the clocks.
Aggregates, not personal data.
"""

from __future__ import annotations

import numpy as np

# Per-subscriber key spans of the kernel's maps (kernel.pyx: caps_key, block, goal_issue).
CAPS_PER_SUB = 1 << 21


def as_msisdns(msisdns) -> np.ndarray:
    """The msisdns to forget as a sorted, unique int64 array (one number, a sequence, numpy or Arrow)."""
    array = np.asarray(msisdns).ravel()
    if not array.size:
        return np.zeros(0, np.int64)
    if array.dtype.kind not in "iu":
        raise TypeError(f"msisdns must be integers, not {array.dtype}")
    return np.unique(array.astype(np.int64))


def forget_state(state: dict[str, np.ndarray], msisdns) -> dict[str, np.ndarray]:
    """`state` (Kernel.export_state) less every trace of the subscribers `msisdns`.

    Invariants of the result, for import into a fresh kernel of the same rules:

    - `msisdn` keeps the other subscribers in their order; dense id d becomes
      d less the number of removed subscribers before it, everywhere it
      appears (slots' rows, the three maps' keys);
    - each `state.{r}` keeps its other rows in their order, so a removed
      row's successors move up and the surviving slots are renumbered to
      match; a kept row's words are unchanged (absence timers keep their
      start and params);
    - map entries of the removed subscribers are gone, the others keep their
      values, and goal records keep their chain order (import_state
      re-links chains in record order);
    - everything else (counters, width, guardrail, clocks) is the same
      object as in `state`.

    msisdns the state does not hold are ignored; when it holds none of
    them the result equals `state` array for array.
    """
    gone_msisdns = as_msisdns(msisdns)
    msisdn = np.asarray(state["msisdn"], np.int64)
    gone = np.isin(msisdn, gone_msisdns)
    out = dict(state)
    if not gone.any():
        return out
    keep = ~gone
    # Dense id -> its new id, -1 for a removed subscriber.
    new_id = np.where(keep, np.cumsum(keep) - 1, -1)
    out["msisdn"] = msisdn[keep]

    width = np.asarray(state["width"])
    slots = np.asarray(state["slots"])
    new_slots = slots[keep]  # fancy indexing: a copy, safe to renumber in place
    # Column k of `slots` is the k-th rule with width > 0 (the kernel's stateful_index).
    for k, r in enumerate(np.flatnonzero(width > 0)):
        w = int(width[r])
        rows = np.asarray(state[f"state.{r}"]).reshape(-1, w)
        owned = slots[gone, k]
        row_kept = np.ones(len(rows), bool)
        row_kept[owned[owned >= 0]] = False
        row_index = np.cumsum(row_kept) - 1
        column = new_slots[:, k]
        has_row = column >= 0
        column[has_row] = row_index[column[has_row]]
        out[f"state.{r}"] = rows[row_kept].ravel()
    out["slots"] = new_slots

    per_rule = len(width) + 1
    out["blocks.key"], kept = _renumber(state["blocks.key"], per_rule, new_id)
    out["blocks.value"] = np.asarray(state["blocks.value"])[kept]
    out["caps.key"], kept = _renumber(state["caps.key"], CAPS_PER_SUB, new_id)
    out["caps.value"] = np.asarray(state["caps.value"])[kept]
    records = np.asarray(state["goal_records"], np.int64).reshape(-1, 3)
    keys, kept = _renumber(records[:, 0], per_rule, new_id)
    out["goal_records"] = np.column_stack([keys, records[kept, 1:]]).astype(np.int64).reshape(-1, 3)
    return out


def _renumber(keys: np.ndarray, per_sub: int, new_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys (d + 1) * per_sub + part with d renumbered by new_id; and which keys were kept (new_id >= 0)."""
    keys = np.asarray(keys, np.int64)
    sub, part = np.divmod(keys, per_sub)
    moved = new_id[sub - 1]
    kept = moved >= 0
    return (moved[kept] + 1) * per_sub + part[kept], kept
