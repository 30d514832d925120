"""engine.feedback.IssuedInstructions: the bounded id -> instruction memory, held to a plain dict model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, note
from hypothesis import strategies as st

from engine.feedback import IssuedInstructions


def hex_id(value: int) -> str:
    return f"{value:032x}"


@given(
    batches=st.lists(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 50)), max_size=60), max_size=30),
    max_entries=st.integers(1, 200),
    max_age=st.integers(0, 60),
    probes=st.lists(st.integers(0, 45), max_size=20),
    run_size=st.sampled_from((1, 3, 17, 4096)),
    early=st.sets(st.integers(0, 29)),
)
def test_issued_memory_answers_like_a_dict_of_the_latest(batches, max_entries, max_age, probes, run_size, early):
    # Ids collide on purpose (a replayed event), with first halves equal too (value < 2**64).
    # Small runs merge many times; lookups between batches (`early`) flush what is pending.
    memory = IssuedInstructions(max_entries, max_age, run_size)
    model: list[tuple[str, int, int]] = []  # (id, seq, ts) in arrival order
    for b, batch in enumerate(batches):
        if b in early:
            memory.lookup([hex_id(1)])
        ids = [hex_id(v) if v % 3 else hex_id(v << 64 | v) for v, _ in batch]
        ts = np.array([t + b * 10 for _, t in batch], np.int64)
        rules = np.arange(len(batch), dtype=np.int32) + 100 * b
        memory.add(pa.array(ids, pa.string()), rules, np.full(len(batch), 7, np.int64), ts, np.zeros(len(batch), bool))
        model += [(i, len(model) + k, int(t)) for k, (i, t) in enumerate(zip(ids, ts.tolist(), strict=True))]
    note(f"model: {model}")
    newest = max((t for _, _, t in model), default=0)
    # Remembered: the latest max_entries, none older than max_age behind the newest.  The latest
    # remembered instruction of an id answers.
    alive = {i: (seq, t) for i, seq, t in model[-max_entries:] if t >= newest - max_age} if model else {}
    asked = [hex_id(v) for v in probes] + [hex_id(v << 64 | v) for v in probes] + ["nonsense", "z" * 32]
    found, fields = memory.lookup(asked)
    for k, i in enumerate(asked):
        assert found[k] == (i in alive), i
        if i in alive:
            seq, t = alive[i]
            assert fields["ts"][k] == t and fields["seq"][k] == seq
    assert len(memory) == len([1 for i, seq, t in model[-max_entries:] if t >= newest - max_age])
