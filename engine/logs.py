"""Structured logs: one JSON object per line on stderr.

    {"at": "2026-11-22T13:05:07.123Z", "level": "warning", "logger": "kairos.daemon",
     "msg": "sequence gap", "input": "switch", "sender": 3, "expected": 41, "got": 45}

Fields beyond the message go in `extra={"fields": {...}}`, so log shippers
index them without parsing prose.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str = "info", stream=None) -> None:
    """Send the `kairos` loggers to `stream` (stderr) as JSON lines at `level`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("kairos")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
