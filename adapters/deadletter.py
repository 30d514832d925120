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

Retention: at each rotation (the first write of a start included) the oldest
files go, by last modification, while any is older than `keep_ms` or all of
them together hold more than `keep_bytes`; the file being written never does.

The writer holds an exclusive `flock` on the file it writes, so `kairos
deadletters` (engine/admin.py) can tell that file from the closed ones: it
rewrites or deletes only files whose lock it takes (`locked`), and leaves the
one a running daemon writes.
"""

from __future__ import annotations

import base64
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import msgpack
import orjson
import pyarrow as pa

from engine.storage import fsync_path

log = logging.getLogger("kairos.deadletter")

PATTERN = "deadletter-*.jsonl"
DEFAULT_KEEP_BYTES = 1 << 30
DEFAULT_KEEP_MS = 30 * 86_400_000


def dead_letter_files(directory: str | os.PathLike) -> list[tuple[Path, os.stat_result]]:
    """The dead-letter files of a directory with their stat, oldest (last modified) first."""
    found = []
    for path in Path(directory).glob(PATTERN):
        try:
            found.append((path, path.stat()))
        except FileNotFoundError:  # deleted meanwhile
            continue
    return sorted(found, key=lambda item: (item[1].st_mtime_ns, item[0].name))


@contextmanager
def locked(path: Path) -> Iterator[bool]:
    """Hold `path`'s lock for the block: yields False when a writer holds it (the file a daemon writes now),
    or the file is gone; True when this process may rewrite or delete it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        # Still the file of that name (not replaced or deleted while the lock was taken)?
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        yield same
    finally:
        os.close(fd)


def entries(path: Path) -> Iterator[tuple[int, dict | None]]:
    """(line number from 1, entry) for each complete line of a dead-letter file; the entry is None for a
    line that is not a JSON object.  A last line without its newline (being written) is left out."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                entry = None
            yield number, entry if isinstance(entry, dict) else None


def record_bytes(entry: dict) -> bytes:
    """The refused bytes of an entry (`record` as UTF-8, or `record_b64`)."""
    if "record_b64" in entry:
        return base64.b64decode(entry["record_b64"])
    return str(entry.get("record", "")).encode("utf-8")


# Why a dead letter cannot be sent again as it is, whatever the config now says.
_NOT_A_MESSAGE = {
    "too_large": "too_large: the record keeps only the message's first bytes",
    "extra_frames": "extra_frames: the record is a frame sent before a payload that was decoded",
}


def as_message(entry: dict, format: str) -> tuple[bytes | None, str]:
    """The message in `format` that carries a dead letter's record again, or None and why it cannot
    (`kairos deadletters replay`).

    A whole message's record is that message; a row's record is the ndjson line itself, or the row as JSON
    (msgpack, Arrow: adapters/wire.py), encoded back into a message of one record.  Not a message: the first
    bytes of one too large, a frame sent before a payload, and what msgpack could not read of a message (the
    bytes after its array, or the rest from a record that could not be read)."""
    reason = entry.get("reason")
    if reason in _NOT_A_MESSAGE:
        return None, _NOT_A_MESSAGE[reason]
    try:
        record = record_bytes(entry)
    except ValueError:  # record_b64 that is not base64
        return None, "the record cannot be read"
    if entry.get("row") is None:
        if reason == "undecodable" and not str(entry.get("detail", "")).startswith(f"{format} message: "):
            return None, "undecodable: the record is the bytes after a message's array, not a message"
        return record, ""
    if format == "ndjson":
        return record + b"\n", ""
    if format == "msgpack" and reason == "undecodable":
        return None, "undecodable: the record is the rest of a message, from a record that could not be read"
    try:
        value = orjson.loads(record)
    except orjson.JSONDecodeError:
        return None, "the row's record is not JSON"
    if format == "msgpack":
        try:
            return msgpack.packb([value]), ""
        except (TypeError, ValueError, OverflowError) as exc:
            return None, f"the row's record does not make a msgpack record: {exc}"
    if not isinstance(value, dict):
        return None, "the row's record is not a JSON object"
    try:
        table = pa.Table.from_pylist([value])
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        return None, f"the row's record does not make an Arrow table: {exc}"
    return sink.getvalue().to_pybytes(), ""


def remove_lines(path: Path, numbers: set[int]) -> None:
    """Rewrite a dead-letter file without the lines numbered `numbers` (from 1), keeping its modification
    time; delete it when nothing is left.  The caller holds the file's lock (`locked`)."""
    stat = path.stat()
    with open(path, "rb") as f:
        kept = [line for number, line in enumerate(f, 1) if number not in numbers]
    if not kept:
        path.unlink()
        return
    temporary = path.with_name(f".{path.name}.tmp")  # outside PATTERN: never taken for a dead-letter file
    with open(temporary, "wb") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.utime(temporary, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(temporary, path)
    fsync_path(path.parent)


class DeadLetterFile:
    """Appends refused input to rotating JSON-lines files, and deletes old ones (`keep_bytes`, `keep_ms`)."""

    def __init__(self, directory: str | os.PathLike, rotate_bytes: int = 64 << 20, clock=time.time, *,
                 keep_bytes: int = DEFAULT_KEEP_BYTES, keep_ms: int = DEFAULT_KEEP_MS):
        if keep_bytes < 1 or keep_ms < 1:
            raise ValueError(f"keep_bytes and keep_ms must be positive, got {keep_bytes} and {keep_ms}")
        self.directory = Path(directory)
        self.rotate_bytes = rotate_bytes
        self.keep_bytes = keep_bytes
        self.keep_ms = keep_ms
        self.clock = clock
        self.written = 0  # records written since start
        self.deleted_files = 0  # files retention deleted since start
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

    @property
    def path(self) -> Path | None:
        """The file being written, None before the first write."""
        return None if self._file is None else Path(self._file.name)

    def _rotate(self) -> None:
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.fromtimestamp(self.clock(), UTC).strftime("%Y%m%dT%H%M%S")
        while True:
            self._sequence += 1
            path = self.directory / f"deadletter-{stamp}-{self._sequence}.jsonl"
            file = open(path, "ab")  # noqa: SIM115 - kept open across writes, closed by close()
            # A file of this name that is locked (another writer's, or one `kairos deadletters` rewrites now),
            # or was replaced or deleted before the lock was taken: the next name, rather than wait.
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.path.samestat(os.fstat(file.fileno()), os.stat(path)):
                    break
            except (BlockingIOError, FileNotFoundError):
                pass
            file.close()
        self._file = file
        self._size = self._file.tell()
        self._apply_retention()

    def _apply_retention(self) -> None:
        """Delete the oldest files while one is older than keep_ms or all hold more than keep_bytes."""
        files = dead_letter_files(self.directory)
        total = sum(stat.st_size for _, stat in files)
        oldest_kept_ns = (self.clock() * 1000 - self.keep_ms) * 1_000_000
        deleted, freed = 0, 0
        for path, stat in files:
            if stat.st_mtime_ns >= oldest_kept_ns and total <= self.keep_bytes:
                break
            if path == self.path:
                continue
            with locked(path) as ours:
                if not ours:  # another writer's (a second daemon on this directory), or gone
                    continue
                path.unlink()
            total -= stat.st_size
            deleted += 1
            freed += stat.st_size
        if deleted:
            self.deleted_files += deleted
            log.info("old dead-letter files deleted", extra={"fields": {
                "files": deleted, "bytes": freed, "keep_bytes": self.keep_bytes, "keep_ms": self.keep_ms}})

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
