"""Counters a channel keeps for `stats()`, bumped from the delivery worker and the HTTP threads at once."""

from __future__ import annotations

import threading
from collections import Counter


class Counters:
    """Named counts, safe to add to from several threads."""

    def __init__(self):
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {name: n for name, n in self._counts.items() if n}

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._counts[name]
