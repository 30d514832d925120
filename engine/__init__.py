"""Kairos: a real-time event engine for telecom marketing.

    from engine import Engine
    eng = Engine.from_files("rules.toml", profiles="profiles.parquet")
    instructions = eng.process(batch)     # pyarrow.Table, SPEC section 5
    eng.feedback(ids, outcomes, ts)       # channel outcomes, SPEC section 6

The compiled kernel is required: importing this package fails loudly if the
extension is not built, rather than falling back to slow Python.
"""

from __future__ import annotations

import os

from engine._fast.kernel import shard_of
from engine._version import __version__
from engine.engine import Engine
from engine.profiles import ProfileError, ProfileStore
from engine.rules import RulesError, RuleSet, load_rules, parse_rules
from engine.schema import (
    EVENT_COLUMNS,
    EVENT_SCHEMA,
    INSTRUCTION_SCHEMA,
    KIND_CODES,
    KINDS,
    BatchError,
    validate_events,
)

__all__ = [
    "EVENT_COLUMNS",
    "EVENT_SCHEMA",
    "INSTRUCTION_SCHEMA",
    "KINDS",
    "KIND_CODES",
    "BatchError",
    "Engine",
    "ProfileError",
    "ProfileStore",
    "RuleSet",
    "RulesError",
    "__version__",
    "get_include",
    "load_rules",
    "parse_rules",
    "shard_of",
    "validate_events",
]


def get_include() -> str:
    """Directory to add to a Cython include path to `cimport engine._fast.kernel`."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
