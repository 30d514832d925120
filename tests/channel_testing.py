"""What the channel tests share: instruction tables, and a channel whose peer fails on demand."""

from __future__ import annotations

import threading
import time
from typing import Any

import pyarrow as pa

from adapters.channels.base import Channel, Instruction, Rejected, Retry
from engine.schema import INSTRUCTION_SCHEMA


def instruction_table(ids: list[str], *, channel: str = "sms", msisdn: int = 8613800138000, template: str = "welcome",
                      params: dict[str, str] | None = None, holdout: list[bool] | None = None,
                      not_before: list[int] | None = None, ts: int | None = None) -> pa.Table:
    """Instructions with the given ids, otherwise alike."""
    n = len(ids)
    ts = int(time.time() * 1000) if ts is None else ts
    return pa.table({
        "id": ids, "ts": [ts] * n, "msisdn": [msisdn + k for k in range(n)], "rule": ["r1"] * n,
        "channel": [channel] * n, "template": [template] * n, "priority": [0] * n,
        "holdout": holdout or [False] * n, "not_before": not_before or [ts] * n,
        "params": [list((params or {"name": "Li"}).items())] * n,
    }, schema=INSTRUCTION_SCHEMA)  # fmt: skip


def hex_id(k: int) -> str:
    """An instruction id as the engine makes them: 32 hex digits."""
    return f"{k:032x}"


class ScriptedChannel(Channel):
    """A peer that answers each id as scripted: a list of "retry", "reject" or "ok" answers, in order.

    Ids with no script left are accepted.  Records every attempt and the time it came.
    """

    kind = "scripted"

    def __init__(self, name: str, script: dict[str, list[str]] | None = None, delay: float = 0.0):
        self.name = name
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.delay = delay
        self.attempts: list[tuple[str, float]] = []
        self.delivered: list[str] = []
        self.concurrent = 0
        self.most_concurrent = 0
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> ScriptedChannel:
        return cls(name)

    def deliver(self, instruction: Instruction) -> None:
        with self._lock:
            self.attempts.append((instruction.id, time.monotonic()))
            answer = self.script.get(instruction.id, ["ok"]).pop(0) if self.script.get(instruction.id) else "ok"
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            if self.delay:
                time.sleep(self.delay)
            if answer == "retry":
                raise Retry("peer busy")
            if answer == "reject":
                raise Rejected("no such subscriber")
            with self._lock:
                self.delivered.append(instruction.id)
        finally:
            with self._lock:
                self.concurrent -= 1


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll `predicate` until it returns something true; its value, or AssertionError at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {getattr(predicate, '__name__', predicate)}")
