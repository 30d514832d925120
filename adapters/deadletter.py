"""The dead-letter file: input that could not be used, kept with the reason.

A message that cannot be decoded, or a row that fails validation, is never
fatal and never silently dropped: it is written here, one JSON object per
line, and counted by input and reason in the metrics.  Fields:

    {"at": "2026-11-22T13:05:07.123Z",   wall-clock time it was refused
     "input": "switch",                  the configured input name
     "reason": "msisdn",                 a code from adapters.wire.REJECT_REASONS
     "detail": "msisdn -5 is not > 0",   for a person to read
     "row": 17,                          row inside the message; null for a whole message
     "record": "...",                    the refused bytes as text when they are UTF-8,
     "record_b64": "..."}                otherwise base64 (Arrow and msgpack payloads)

Files are `deadletter-<UTC time>-<n>.jsonl` in the configured directory and
rotate by size; the file being written is flushed after every message so a
crash loses nothing already refused.
"""

from __future__ import annotations

import base64
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson


class DeadLetterFile:
    """Appends refused input to rotating JSON-lines files."""

    def __init__(self, directory: str | os.PathLike, rotate_bytes: int = 64 << 20, clock=time.time):
        self.directory = Path(directory)
        self.rotate_bytes = rotate_bytes
        self.clock = clock
        self.written = 0  # records written since start
        self._file = None
        self._size = 0
        self._sequence = 0

    def write(self, input_name: str, rejects) -> None:
        """Append one line per reject (adapters.wire.Reject) and flush."""
        if not rejects:
            return
        at = datetime.fromtimestamp(self.clock(), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        lines = []
        for reject in rejects:
            entry = {"at": at, "input": input_name, "reason": reject.reason, "detail": reject.detail,
                     "row": reject.row}
            record = bytes(reject.record)
            try:
                entry["record"] = record.decode("utf-8")
            except UnicodeDecodeError:
                entry["record_b64"] = base64.b64encode(record).decode("ascii")
            lines.append(orjson.dumps(entry) + b"\n")
        data = b"".join(lines)
        if self._file is None or self._size + len(data) > self.rotate_bytes and self._size:
            self._rotate()
        self._file.write(data)
        self._file.flush()
        self._size += len(data)
        self.written += len(rejects)

    def _rotate(self) -> None:
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.fromtimestamp(self.clock(), UTC).strftime("%Y%m%dT%H%M%S")
        self._sequence += 1
        path = self.directory / f"deadletter-{stamp}-{self._sequence}.jsonl"
        self._file = open(path, "ab")  # noqa: SIM115 - kept open across writes, closed by close()
        self._size = self._file.tell()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
