"""What the engine remembers of its instructions, to learn from what follows them.

`IssuedInstructions` maps an instruction id back to (rule, msisdn, ts,
holdout) so that channel feedback (SPEC section 6), which names only the id,
reaches the right rule and subscriber.  The memory is bounded: at most
`max_entries` instructions, none older than `max_age` behind the newest
instruction's ts; feedback for an id no longer (or never) held is counted as
unknown and changes nothing.

`GoalTracker` attributes goal events (a rule's `goal`, seen in the normal
feed) to the instructions before them: the earliest open instruction of the
rule for the subscriber with ts in [ts_goal - within, ts_goal), once,
treated and holdout alike.  It holds the instructions of rules with a goal
until their window has passed.

Both work per instruction and per goal event, never per event of the feed,
so their Python loops run over the (small) stream of instructions.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyarrow as pa

DEFAULT_MAX_ENTRIES = 10_000_000
DEFAULT_MAX_AGE = 30 * 86_400_000  # ms of event time

ISSUED_SCHEMA = pa.schema(
    [("id", pa.string()), ("rule", pa.int32()), ("msisdn", pa.int64()), ("ts", pa.int64()), ("holdout", pa.bool_())]
)


class IssuedInstructions:
    """id -> (rule index, msisdn, ts, holdout), oldest first, bounded by count and age."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_age: int = DEFAULT_MAX_AGE):
        if max_entries < 1 or max_age < 0:
            raise ValueError("max_entries must be positive and max_age non-negative")
        self.max_entries = max_entries
        self.max_age = max_age
        self._entries: OrderedDict[str, tuple[int, int, int, bool]] = OrderedDict()
        self._newest = -(2**63)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, ids: list[str], rules: np.ndarray, msisdn: np.ndarray, ts: np.ndarray, holdout: np.ndarray) -> None:
        if not ids:
            return
        self._entries.update(
            zip(ids, zip(rules.tolist(), msisdn.tolist(), ts.tolist(), holdout.tolist(), strict=True), strict=True)
        )
        self._newest = max(self._newest, int(ts.max()))
        entries, horizon = self._entries, self._newest - self.max_age
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        while entries and next(iter(entries.values()))[2] < horizon:
            entries.popitem(last=False)

    def get(self, instruction_id: str) -> tuple[int, int, int, bool] | None:
        return self._entries.get(instruction_id)

    def to_table(self) -> pa.Table:
        ids = list(self._entries)
        values = list(self._entries.values())
        columns = list(zip(*values, strict=True)) if values else [[], [], [], []]
        return pa.Table.from_arrays([pa.array(ids, pa.string()), *map(pa.array, columns)], schema=ISSUED_SCHEMA) \
            if values else ISSUED_SCHEMA.empty_table()

    def load(self, table: pa.Table) -> None:
        table = table.cast(ISSUED_SCHEMA)
        self._entries = OrderedDict(
            zip(
                table.column("id").to_pylist(),
                zip(*(table.column(c).to_pylist() for c in ("rule", "msisdn", "ts", "holdout")), strict=True),
                strict=True,
            )
        )
        if len(table):
            self._newest = int(pa.compute.max(table.column("ts")).as_py())


class GoalTracker:
    """Open instructions of rules with a goal, and the conversions they have had."""

    def __init__(self, within: dict[int, int], n_rules: int):
        self.within = within  # rule index -> goal window, ms
        self.has_goal = np.zeros(n_rules, np.bool_)
        self.has_goal[list(within)] = True
        self.open: dict[tuple[int, int], list[list[int]]] = {}  # (rule, msisdn) -> [[ts, holdout, converted]]
        self.tracked = np.zeros(0, np.int64)  # msisdns with open instructions (sorted; may hold closed ones)
        self.conversions = np.zeros((n_rules, 2), np.int64)  # [:, 0] treated, [:, 1] holdout
        self._size_at_prune = 1024

    def observe(self, rows: np.ndarray, rules: np.ndarray, msisdn: np.ndarray, ts: np.ndarray, holdout: np.ndarray,
                goal_rows: np.ndarray, goal_rules: np.ndarray, event_msisdn: np.ndarray, event_ts: np.ndarray) -> None:
        """One batch: its instructions (kernel order) and its goal matches, taken together in row order."""
        if not self.within:
            return
        mine = np.flatnonzero(self.has_goal[rules])
        if len(mine):
            self.tracked = np.union1d(self.tracked, msisdn[mine])
        if len(goal_rows) and len(self.tracked):
            # Only goal events of subscribers with open instructions reach the Python loop.
            goal_msisdn = event_msisdn[goal_rows]
            at = np.minimum(np.searchsorted(self.tracked, goal_msisdn), len(self.tracked) - 1)
            keep = self.tracked[at] == goal_msisdn
            goal_rows, goal_rules = goal_rows[keep], goal_rules[keep]
        else:
            goal_rows = goal_rows[:0]
        if not len(mine) and not len(goal_rows):
            return
        # Row order; at one row an instruction (ts equal) can never be converted by that row's goal event.
        steps = sorted(
            [(int(rows[k]), 0, int(k)) for k in mine]
            + [(int(g), 1, int(r)) for g, r in zip(goal_rows, goal_rules, strict=True)]
        )
        for row, is_goal, which in steps:
            if not is_goal:
                self.open.setdefault((int(rules[which]), int(msisdn[which])), []).append(
                    [int(ts[which]), int(holdout[which]), 0])
                continue
            t = int(event_ts[row])
            for entry in self.open.get((which, int(event_msisdn[row])), ()):
                if not entry[2] and entry[0] < t <= entry[0] + self.within[which]:
                    entry[2] = 1
                    self.conversions[which, entry[1]] += 1
                    break
        if len(self.open) > 2 * self._size_at_prune and len(event_ts):
            self.prune(int(event_ts.max()))

    def prune(self, now: int) -> None:
        """Forget instructions whose window ended before `now` or that have converted."""
        for key in list(self.open):
            left = [e for e in self.open[key] if not e[2] and e[0] + self.within[key[0]] >= now]
            if left:
                self.open[key] = left
            else:
                del self.open[key]
        self.tracked = np.unique(np.fromiter((m for _, m in self.open), np.int64, len(self.open)))
        self._size_at_prune = max(len(self.open), 1024)

    def to_table(self) -> pa.Table:
        rows = [(rule, m, *entry) for (rule, m), entries in self.open.items() for entry in entries]
        names = ("rule", "msisdn", "ts", "holdout", "converted")
        columns = list(zip(*rows, strict=True)) if rows else [[]] * 5
        return pa.table({name: pa.array(col, pa.int64()) for name, col in zip(names, columns, strict=True)})

    def load(self, table: pa.Table, conversions: np.ndarray) -> None:
        self.open = {}
        for rule, m, t, h, c in zip(*(table.column(n).to_pylist() for n in table.column_names), strict=True):
            self.open.setdefault((rule, m), []).append([t, h, c])
        self.tracked = np.unique(np.fromiter((m for _, m in self.open), np.int64, len(self.open)))
        self.conversions = np.array(conversions, np.int64).reshape(self.conversions.shape)
