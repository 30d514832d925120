"""Shared test set-up: Hypothesis profiles and small event-batch helpers.

Hypothesis profiles (choose with HYPOTHESIS_PROFILE, default "ci"):

- ci: 200 examples per property, derandomized so that every run of the
  suite explores the same examples (no flaky CI), no deadline (the reference
  is slow by design), and the reproduction blob printed on failure.
- dev: 50 random examples, for a quick local loop.
- thorough: 2000 random examples, for a soak run
  (`HYPOTHESIS_PROFILE=thorough pytest tests/test_differential.py`).

A failure under a random profile prints `@reproduce_failure(...)` and the
seed; `pytest --hypothesis-seed=N` replays a run.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from engine import Engine, parse_rules
from engine.reference import ReferenceEngine
from engine.schema import COLUMN_DTYPES, REQUIRED_COLUMNS

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    print_blob=True,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def make_batch(rows: list[dict[str, int]], columns: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """A dict-of-numpy event batch from row dicts.

    Columns are the required ones plus every column any row names (or exactly
    `columns` when given); a row that does not name a present column reads 0.
    """
    if columns is None:
        names = set(REQUIRED_COLUMNS)
        for row in rows:
            names.update(row)
        columns = tuple(name for name in COLUMN_DTYPES if name in names)
    return {name: np.array([row.get(name, 0) for row in rows], dtype=COLUMN_DTYPES[name]) for name in columns}


@pytest.fixture
def batch():
    """make_batch, as a fixture for test modules."""
    return make_batch


@pytest.fixture(params=["kernel", "reference"])
def implementation(request):
    """A factory `rules_text -> engine`: the compiled Engine or the ReferenceEngine.

    Tests written against this fixture hold both implementations to the same
    assertions (process() and stats()["rules"] only: the common interface).
    """
    if request.param == "kernel":
        return lambda text: Engine.from_text(text)
    return lambda text: ReferenceEngine(parse_rules(text))
