"""The `file` and `stdout` channels: instructions as JSON lines, for demos and tests.

Each delivered instruction is one JSON object per line with the fields of SPEC section 5 (`params`
as an object of strings).  Neither talks to a subscriber; with `report = "delivered"` (or another
outcome) they also report that outcome for every instruction, so a demo closes the feedback loop.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import orjson

from adapters.channels.base import OUTCOMES, Channel, FeedbackSink, Instruction, Retry
from adapters.outputs import OutputOptions


def instruction_json(instruction: Instruction) -> bytes:
    """One instruction as a JSON object and a newline."""
    return orjson.dumps({
        "id": instruction.id, "ts": instruction.ts, "msisdn": instruction.msisdn, "rule": instruction.rule,
        "channel": instruction.channel, "template": instruction.template, "priority": instruction.priority,
        "holdout": instruction.holdout, "not_before": instruction.not_before, "params": instruction.params,
    }, option=orjson.OPT_APPEND_NEWLINE)


class _JsonLinesChannel(Channel):
    """What the two channels share: one stream of JSON lines, an optional outcome to report."""

    def __init__(self, name: str, report: str | None):
        if report is not None and report not in OUTCOMES:
            raise ValueError(f"channel {name!r}: key 'report' must be one of {', '.join(OUTCOMES)}, not {report!r}")
        self.name = name
        self.report = report
        self._feedback: FeedbackSink | None = None
        self._lock = threading.Lock()  # the delivery worker may call deliver from several threads
        self._written = 0
        self._duplicates = 0

    def start(self, feedback: FeedbackSink) -> None:
        self._feedback = feedback

    def _reported(self, instruction: Instruction) -> None:
        if self.report is not None and self._feedback is not None:
            self._feedback(instruction.id, self.report, int(time.time() * 1000))

    def stats(self) -> dict[str, int]:
        """`written` lines; `duplicates`: instructions already written, not written again."""
        return {"written": self._written, "duplicates": self._duplicates}


class FileChannel(_JsonLinesChannel):
    """Appends each instruction to one file (``type = "file"``).

    Idempotent by id: the ids already in the file are read when the channel is made, so an
    instruction that the outbox delivers again after a crash is not written twice.  A line is
    flushed to the operating system before `deliver` returns, and fsynced too with `fsync = true`.
    """

    kind = "file"

    def __init__(self, name: str, path: str | os.PathLike, *, fsync: bool = False, report: str | None = None):
        super().__init__(name, report)
        self.path = Path(path)
        self.fsync = fsync
        self._ids = self._ids_in_file()
        # Opened (and its directory made) at the first delivery: making the channel, as `kairos run --check`
        # does, writes nothing.
        self._file: IO[bytes] | None = None
        self._closed = False

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> FileChannel:
        """Keys: `path` (required), `fsync` (default false), `report` (an outcome to report, default none)."""
        read = OutputOptions(name, options, noun="channel")
        made = dict(
            path=read.string("path"),
            fsync=read.boolean("fsync", False),
            report=read.string("report") if "report" in options else None,
        )
        read.finish()
        return cls(name, **made)

    def _ids_in_file(self) -> set[str]:
        if not self.path.exists():
            return set()
        ids = set()
        with open(self.path, "rb") as file:
            for line in file:
                if line.endswith(b"\n"):  # a torn last line was never delivered
                    ids.add(orjson.loads(line)["id"])
        return ids

    def deliver(self, instruction: Instruction) -> None:
        with self._lock:
            if self._closed:
                raise Retry(f"channel {self.name!r} is closed")
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "ab")  # noqa: SIM115 -- closed in close()
            if instruction.id in self._ids:
                self._duplicates += 1
            else:
                self._file.write(instruction_json(instruction))
                self._file.flush()
                if self.fsync:
                    os.fsync(self._file.fileno())
                self._ids.add(instruction.id)
                self._written += 1
        self._reported(instruction)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None


class StdoutChannel(_JsonLinesChannel):
    """Prints each instruction on standard output (``type = "stdout"``); not idempotent across restarts."""

    kind = "stdout"

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> StdoutChannel:
        """Keys: `report` (an outcome to report for every instruction, default none)."""
        read = OutputOptions(name, options, noun="channel")
        report = read.string("report") if "report" in options else None
        read.finish()
        return cls(name, report)

    def deliver(self, instruction: Instruction) -> None:
        line = instruction_json(instruction)
        with self._lock:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
            self._written += 1
        self._reported(instruction)
