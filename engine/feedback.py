"""What the engine remembers of its instructions, to apply channel feedback.

`IssuedInstructions` maps an instruction id back to (rule, msisdn, ts,
holdout) so that channel feedback (SPEC section 6), which names only the id,
reaches the right rule and subscriber.  The memory is bounded: it answers for
the latest `max_entries` instructions, none older than `max_age` behind the
newest instruction's ts; feedback for an id no longer (or never) held is
counted as unknown and changes nothing.  It is columnar: an id is kept as the
two 64-bit hashes its hex digits spell (no Python object per instruction), in
a few sorted runs (class docstring).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

DEFAULT_MAX_ENTRIES = 10_000_000
DEFAULT_MAX_AGE = 30 * 86_400_000  # ms of event time

ID_BYTES = 32  # instruction ids are 32 hex digits (engine.instructions): two 64-bit hashes
ISSUED_SCHEMA = pa.schema(
    [("id", pa.string()), ("rule", pa.int32()), ("msisdn", pa.int64()), ("ts", pa.int64()),
     ("holdout", pa.bool_()), ("seq", pa.int64())]
)
_FIELDS = {"h1": np.uint64, "h2": np.uint64, "rule": np.int32, "msisdn": np.int64, "ts": np.int64,
           "holdout": np.bool_, "seq": np.int64}
# ASCII -> hex digit value; 255 marks a byte that is no hex digit.
_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint8)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def _empty() -> dict[str, np.ndarray]:
    return {name: np.zeros(0, dtype) for name, dtype in _FIELDS.items()}


def id_hashes(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h1, h2, valid) of ids given as 32-byte ASCII strings (dtype S32): the hex digits as two uint64."""
    digits = _HEX[data.view(np.uint8).reshape(len(data), ID_BYTES)]
    valid = (digits != 255).all(axis=1)
    packed = ((digits[:, 0::2] << 4) | (digits[:, 1::2] & 15)).astype(np.uint8)
    halves = packed.view(">u8").reshape(len(data), 2).astype(np.uint64)
    return halves[:, 0].copy(), halves[:, 1].copy(), valid


# The two hex digits of every byte value as one uint16 (the digits' bytes in memory order), so that a byte
# becomes its digits in one lookup: 27 ms for a million ids, where a (256, 2) table took 200.
_HEX_PAIRS = np.frombuffer(b"".join(f"{b:02x}".encode() for b in range(256)), np.uint16)


def hex_ids(h1: np.ndarray, h2: np.ndarray) -> pa.StringArray:
    """The ids `f"{h1:016x}{h2:016x}"` as an Arrow string array, built over whole arrays.

    A checkpoint writes every remembered id; formatting them one by one in
    Python took 0.65 us each, 40% of the checkpoint's pause at a million
    subscribers (bench/README.md section 11).
    """
    n = len(h1)
    # Big-endian bytes of each hash, then two digits per byte: n x 16 bytes -> n x 32 digits.
    raw = np.empty((n, 2), ">u8")
    raw[:, 0], raw[:, 1] = h1, h2
    digits = _HEX_PAIRS[raw.view(np.uint8).reshape(-1)].view(np.uint8)
    offsets = np.arange(0, ID_BYTES * n + 1, ID_BYTES, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(digits))


class IssuedInstructions:
    """id -> (rule index, msisdn, ts, holdout) of the latest instructions, bounded by count and age.

    Sorted runs, newest last, each sorted by the id's first hash (ties in
    arrival order); a run is merged into the one before it while that one is
    at most twice its size, so there are O(log n) runs, each entry is copied
    O(log n) times, and a lookup is one binary search per run.  Batches wait
    until `run_size` instructions make a run, so a batch costs a list
    append.  Forgotten entries are never answered, and dropped when their
    run is merged.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_age: int = DEFAULT_MAX_AGE,
                 run_size: int = 65536):
        if max_entries < 1 or max_age < 0 or run_size < 1:
            raise ValueError("max_entries and run_size must be positive and max_age non-negative")
        self.max_entries = max_entries
        self.max_age = max_age
        self.run_size = run_size
        self._runs: list[dict[str, np.ndarray]] = []
        self._pending: list[tuple] = []
        self._pending_size = 0
        self._added = 0  # instructions ever added: entry seq < _added - max_entries is forgotten
        self._newest = -(2**63)

    def __len__(self) -> int:
        self._flush()
        return sum(int(np.count_nonzero(self._valid(run))) for run in self._runs)

    def _valid(self, run: dict[str, np.ndarray]) -> np.ndarray:
        return (run["seq"] >= self._added - self.max_entries) & (run["ts"] >= self._newest - self.max_age)

    def add(self, ids: pa.Array | pa.ChunkedArray, rules: np.ndarray, msisdn: np.ndarray, ts: np.ndarray,
            holdout: np.ndarray) -> None:
        """One batch's instructions; `ids` is the instruction table's id column (32 ASCII bytes each)."""
        n = len(ids)
        if not n:
            return
        array = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        self._pending.append((array, rules, msisdn, ts, holdout))
        self._added += n
        self._pending_size += n
        if self._pending_size >= self.run_size:
            self._flush()

    def _flush(self) -> None:
        """Make a run of the pending batches, then merge runs of similar size."""
        if not self._pending:
            return
        ids = [np.frombuffer(a.buffers()[2], dtype=f"S{ID_BYTES}", count=len(a), offset=a.offset * ID_BYTES)
               for a, *_ in self._pending]
        h1, h2, _ = id_hashes(np.concatenate(ids))
        run = {"h1": h1, "h2": h2, "seq": np.arange(self._added - len(h1), self._added, dtype=np.int64)}
        for k, name in enumerate(("rule", "msisdn", "ts", "holdout"), start=1):
            run[name] = np.concatenate([batch[k] for batch in self._pending]).astype(_FIELDS[name], copy=False)
        self._newest = max(self._newest, int(run["ts"].max()))
        self._pending, self._pending_size = [], 0
        self._runs.append(self._sorted(run))
        while len(self._runs) > 1 and len(self._runs[-2]["h1"]) <= 2 * len(self._runs[-1]["h1"]):
            newer = self._runs.pop()
            older = self._runs.pop()
            self._runs.append(self._sorted({name: np.concatenate([older[name], newer[name]]) for name in _FIELDS}))
        self._runs = [run for run in self._runs if len(run["h1"])]

    def _sorted(self, run: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = self._valid(run)
        order = np.argsort(run["h1"][keep], kind="stable")  # arrival order within equal first hashes
        return {name: values[keep][order] for name, values in run.items()}

    def renumber_rules(self, new_index: np.ndarray) -> None:
        """Rules were reloaded: entry rule r becomes new_index[r]; entries whose rule is gone (-1) are dropped.

        Their feedback then counts as unknown, as for an instruction never issued.
        """
        self._flush()
        runs = []
        for run in self._runs:
            rule = new_index[run["rule"]]
            keep = rule >= 0  # filtering keeps each run sorted
            run = {name: values[keep] for name, values in run.items()}
            run["rule"] = rule[keep].astype(_FIELDS["rule"])
            runs.append(run)
        self._runs = [run for run in runs if len(run["h1"])]

    def drop_subscribers(self, msisdns: np.ndarray) -> int:
        """Remove every entry whose msisdn is in `msisdns` (erasure); return how many of them were answerable.

        Entries already past the count or age bound go too (they are still
        stored until their run is merged), but only answerable ones are
        counted, so len() drops by exactly the returned number.  Filtering
        keeps each run sorted; the others' seq and the bounds do not move.
        """
        self._flush()
        msisdns = np.asarray(msisdns, np.int64)
        removed = 0
        runs = []
        for run in self._runs:
            gone = np.isin(run["msisdn"], msisdns)
            if gone.any():
                removed += int(np.count_nonzero(gone & self._valid(run)))
                run = {name: values[~gone] for name, values in run.items()}
            runs.append(run)
        self._runs = [run for run in runs if len(run["h1"])]
        return removed

    def lookup(self, ids: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(found, fields): for each id whether it is held, and its rule, msisdn, ts, holdout where it is."""
        self._flush()
        keys = np.array([i.encode() if isinstance(i, str) and len(i) == ID_BYTES and i.isascii() else b"-" * ID_BYTES
                         for i in ids], dtype=f"S{ID_BYTES}")
        n = len(keys)
        h1, h2, well_formed = id_hashes(keys) if n else (np.zeros(0, np.uint64),) * 2 + (np.zeros(0, bool),)
        found = np.zeros(n, np.bool_)
        fields = {name: np.zeros(n, dtype) for name, dtype in _FIELDS.items()}
        for run in reversed(self._runs):  # newest first: a replayed id answers with its latest instruction
            lo = np.searchsorted(run["h1"], h1, side="left")
            hi = np.searchsorted(run["h1"], h1, side="right")
            valid = self._valid(run)
            for k in np.flatnonzero(well_formed & ~found & (hi > lo)):
                for j in range(hi[k] - 1, lo[k] - 1, -1):
                    if run["h2"][j] == h2[k] and valid[j]:
                        found[k] = True
                        for name in fields:
                            fields[name][k] = run[name][j]
                        break
        return found, fields

    def to_table(self) -> pa.Table:
        self._flush()
        runs = self._runs or [{name: np.zeros(0, dtype) for name, dtype in _FIELDS.items()}]
        main = {name: np.concatenate([run[name] for run in runs]) for name in _FIELDS}
        keep = self._valid(main)
        main = {name: values[keep] for name, values in main.items()}
        columns = [pa.array(main[name], pa.from_numpy_dtype(np.dtype(_FIELDS[name])))
                   for name in ("rule", "msisdn", "ts", "holdout", "seq")]
        return pa.Table.from_arrays([hex_ids(main["h1"], main["h2"]), *columns], schema=ISSUED_SCHEMA)

    def load(self, table: pa.Table, added: int, newest: int) -> None:
        table = table.cast(ISSUED_SCHEMA)
        ids = np.array(table.column("id").to_pylist(), dtype=f"S{ID_BYTES}")
        h1, h2, _ = id_hashes(ids) if len(ids) else (np.zeros(0, np.uint64),) * 2 + (None,)
        run = {"h1": h1, "h2": h2}
        for name in ("rule", "msisdn", "ts", "holdout", "seq"):
            run[name] = table.column(name).to_numpy().astype(_FIELDS[name])
        self._pending, self._pending_size = [], 0
        self._added, self._newest = added, newest
        order = np.argsort(run["seq"], kind="stable")  # runs hold arrival order within equal hashes
        self._runs = [self._sorted({name: values[order] for name, values in run.items()})] if len(h1) else []

    @property
    def state(self) -> dict[str, int]:
        """What a checkpoint needs besides the table."""
        self._flush()
        return {"added": self._added, "newest": self._newest}
