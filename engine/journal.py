"""The input journal: what the daemon accepted, made durable before the engine sees it (SPEC section 10).

Every operation that changes an Engine is appended here, in the order the
engine will see it, before it is applied: the events of each accepted
message (the columns the decoder produced, with the input and the sender's
sequence number), feedback reports, moves of event time without events
(`advance`, which the daemon does on the wall clock when a feed is idle),
and rules reloads.  Replaying the entries after a checkpoint into the
restored engine puts it in exactly the state it had: the engine is
deterministic, and its instruction ids depend only on the rule and the
triggering event, so replayed instructions carry the ids the outbox already
holds.

Each entry has a position (LSN): 1, 2, 3, ... with no gaps, for ever.

Files.  A directory of segments named by the position of their first entry,
`00000000000000000001.journal`, each at most about `segment_bytes`; a new
one is started once the current one is that big.  A segment is a 16-byte
file header (`KJOURNAL`, format as uint16, 6 bytes reserved) and records:

    offset  size  field
    0       4     magic b"KREC"
    4       1     kind: 1 events, 2 feedback, 3 advance, 4 reload
    5       3     reserved, zero
    8       8     position (uint64, little-endian like every field)
    16      4     payload length in bytes (uint32)
    20      4     CRC-32C of bytes 0-19 and of the payload
    24      ...   payload

Payloads: events and feedback are one Arrow IPC stream (a schema and one
record batch) whose schema metadata carries the entry's fields (events:
`input`, and `sender`, `seq` when the message had a sequence header;
feedback: `source`, e.g. `input:outcomes` or `channel:sms`, with columns id,
outcome, ts); advance is the int64 ts; reload is a JSON object (rules text,
its source, the values of sets read from files, the profiles path).

Durability (`fsync`): "batch" syncs before every batch the engine
processes (group commit: every message of the batch with one fdatasync);
an interval ("100ms") syncs at most that often, so a power cut may lose
that much while a crash of the process (kill -9) loses nothing the OS has;
"off" never syncs.  `durable_sequences` are the sender sequences that are
durable in that sense: what the daemon acknowledges.

Damage.  A crash mid-append leaves a torn last record: on opening, the last
segment is read through, and a record that is short or fails its CRC ends
it (the file is cut back there, and the log says how many bytes went).  A
damaged record anywhere else ends replay there, with an error in the log.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from engine.rules import parse_duration
from engine.storage import fsync_path

log = logging.getLogger("kairos.journal")

FORMAT = 1
FILE_HEADER = struct.Struct("<8sH6x")
FILE_MAGIC = b"KJOURNAL"
RECORD_HEADER = struct.Struct("<4sB3xQII")
RECORD_MAGIC = b"KREC"
SUFFIX = ".journal"

EVENTS, FEEDBACK, ADVANCE, RELOAD = 1, 2, 3, 4
KINDS = {EVENTS: "events", FEEDBACK: "feedback", ADVANCE: "advance", RELOAD: "reload"}
_ADVANCE = struct.Struct("<q")


class JournalError(ValueError):
    """A journal that cannot be used as it is (a damaged file header, a segment of an unknown format)."""


@dataclass
class Entry:
    """One journal entry, decoded."""

    position: int
    kind: int
    columns: dict[str, np.ndarray] | None = None  # events: the batch; feedback: id, outcome, ts
    n: int = 0  # rows
    input: str | None = None  # events: the input it came from
    sender: int | None = None  # events: the sender id and sequence number, when the message carried them
    seq: int | None = None
    source: str | None = None  # feedback: where the reports came from
    ts: int | None = None  # advance: the event time moved to
    reload: dict | None = None  # reload: rules_text, rules_source, set_values, profiles


def _segment_name(first: int) -> str:
    return f"{first:020d}{SUFFIX}"


def parse_fsync(value: str) -> float | None:
    """"batch" -> 0.0 (sync before every batch), "off" -> None, a duration ("100ms") -> seconds."""
    if value == "batch":
        return 0.0
    if value == "off":
        return None
    ms = parse_duration(value)
    if ms <= 0:
        raise ValueError("an fsync interval must be longer than 0ms (or say \"batch\")")
    return ms / 1000


def _ipc(table: pa.Table | pa.RecordBatch) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    return sink.getvalue()


def encode_events(columns: dict[str, np.ndarray], input: str, sender: int | None,
                  seq: int | None) -> list[pa.Buffer]:
    """An events payload as its two IPC messages (schema, record batch), written one after the other.

    `RecordBatch.serialize` sizes its buffer once; a stream writer growing a
    BufferOutputStream took three times as long (0.55 against 0.18 ms for
    65,536 events), and the columns are copied only once, into that buffer.
    """
    metadata = {"input": input}
    if sender is not None:
        metadata.update(sender=str(sender), seq=str(seq))
    names = list(columns)
    batch = pa.RecordBatch.from_arrays([pa.array(columns[name]) for name in names], names=names)
    batch = batch.replace_schema_metadata(metadata)
    return [batch.schema.serialize(), batch.serialize()]


def encode_feedback(ids: list[str], outcomes: list[str], ts: list[int], source: str) -> pa.Buffer:
    batch = pa.RecordBatch.from_arrays(
        [pa.array(ids, pa.string()), pa.array(outcomes, pa.string()), pa.array(ts, pa.int64())],
        names=["id", "outcome", "ts"])
    return _ipc(batch.replace_schema_metadata({"source": source}))


def decode(kind: int, position: int, payload: memoryview | bytes) -> Entry:
    if kind not in KINDS:  # before the payload is parsed as what it is not (a newer version's kind, say)
        raise JournalError(f"journal record {position}: unknown kind {kind}")
    if kind == ADVANCE:
        (ts,) = _ADVANCE.unpack(payload)
        return Entry(position, kind, ts=ts)
    if kind == RELOAD:
        return Entry(position, kind, reload=json.loads(bytes(payload)))
    table = ipc.open_stream(pa.py_buffer(payload)).read_all()
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if kind == EVENTS:
        columns = {name: table.column(name).to_numpy() for name in table.column_names}
        sender = int(metadata["sender"]) if "sender" in metadata else None
        seq = int(metadata["seq"]) if "seq" in metadata else None
        return Entry(position, kind, columns=columns, n=table.num_rows, input=metadata.get("input"),
                     sender=sender, seq=seq)
    if kind == FEEDBACK:
        columns = {"id": table.column("id").to_pylist(), "outcome": table.column("outcome").to_pylist(),
                   "ts": table.column("ts").to_pylist()}
        return Entry(position, kind, columns=columns, n=table.num_rows, source=metadata.get("source"))
    raise JournalError(f"journal record {position}: unknown kind {kind}")


def _records(data: memoryview, path: Path) -> tuple[list[tuple[int, int, memoryview]], int]:
    """The whole records of a segment, as (kind, position, payload), up to the first bad one, and the offset
    where they end (the file's length when every record is whole)."""
    if len(data) < FILE_HEADER.size:
        return [], 0
    magic, version = FILE_HEADER.unpack_from(data, 0)
    if magic != FILE_MAGIC:
        raise JournalError(f"{path}: not a journal segment")
    if version != FORMAT:
        raise JournalError(f"{path}: journal format {version} is not {FORMAT}; this version of Kairos cannot read it")
    records = []
    offset = FILE_HEADER.size
    while offset + RECORD_HEADER.size <= len(data):
        magic, kind, position, length, crc = RECORD_HEADER.unpack_from(data, offset)
        end = offset + RECORD_HEADER.size + length
        if magic != RECORD_MAGIC or end > len(data):
            break
        payload = data[offset + RECORD_HEADER.size:end]
        if crc32c.crc32c(payload, crc32c.crc32c(data[offset:offset + 20])) != crc:
            break
        records.append((kind, position, payload))
        offset = end
    return records, offset


def _record_header(kind: int, position: int, parts: list) -> tuple[bytes, int]:
    """A record's header for a payload given in parts (its CRC covers the header's first 20 bytes and the
    payload), and the payload's length."""
    length = sum(part.size if isinstance(part, pa.Buffer) else len(part) for part in parts)
    header = RECORD_HEADER.pack(RECORD_MAGIC, kind, position, length, 0)
    crc = crc32c.crc32c(header[:20])
    for part in parts:
        crc = crc32c.crc32c(part, crc)
    return header[:20] + struct.pack("<I", crc), length


class Journal:
    """Appends entries to the segments of one directory; reads them back from a position.  Not thread-safe."""

    def __init__(self, directory: str | os.PathLike, *, fsync: float | None = 0.0, segment_bytes: int = 64 << 20,
                 retain_seconds: float = 0.0, clock=time.monotonic, wall=time.time):
        self.directory = Path(directory)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.retain_seconds = retain_seconds
        self._clock = clock
        self._wall = wall
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._segment: Path | None = None
        self._size = 0
        self.next_position = 1
        self.durable_position = 0  # entries up to here are as durable as the fsync policy makes them
        self._synced_at = clock()
        # (input, sender) -> sequence: written, and durable; what the daemon acknowledges is the second.
        self._written_sequences: dict[tuple[str, int], int] = {}
        self.durable_sequences: dict[tuple[str, int], int] = {}
        self.syncs = 0
        self.bytes_written = 0
        self.torn_bytes = 0  # cut from a torn tail when the journal was opened
        self._open()

    # -- opening ----------------------------------------------------------------------

    def segments(self) -> list[tuple[int, Path]]:
        """(first position, path) of every segment, oldest first."""
        found = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            stem = path.name[: -len(SUFFIX)]
            if stem.isdigit():
                found.append((int(stem), path))
        return sorted(found)

    def _open(self) -> None:
        segments = self.segments()
        if not segments:
            self._start_segment(1)
            return
        first, path = segments[-1]
        data = memoryview(path.read_bytes())
        if len(data) < FILE_HEADER.size:  # a crash between creating the segment and writing its header
            self.torn_bytes = len(data)
            with open(path, "wb") as f:
                f.write(FILE_HEADER.pack(FILE_MAGIC, FORMAT))
                os.fsync(f.fileno())
            data = memoryview(FILE_HEADER.pack(FILE_MAGIC, FORMAT))
        records, good = _records(data, path)
        last = records[-1][1] if records else first - 1
        if good < len(data):
            self.torn_bytes = len(data) - good
            log.warning("journal tail torn by a crash; cut back to the last whole record", extra={"fields": {
                "segment": str(path), "bytes_dropped": self.torn_bytes, "last_position": last}})
            with open(path, "r+b") as f:
                f.truncate(max(good, FILE_HEADER.size))
                if good < FILE_HEADER.size:
                    f.seek(0)
                    f.write(FILE_HEADER.pack(FILE_MAGIC, FORMAT))
                os.fsync(f.fileno())
        self.next_position = last + 1
        self.durable_position = last
        self._segment = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._size = max(good, FILE_HEADER.size)

    def _start_segment(self, first: int) -> None:
        path = self.directory / _segment_name(first)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        os.write(fd, FILE_HEADER.pack(FILE_MAGIC, FORMAT))
        os.fsync(fd)
        fsync_path(self.directory)
        self._fd, self._segment, self._size = fd, path, FILE_HEADER.size

    # -- appending ----------------------------------------------------------------------

    def append(self, kind: int, payload: bytes | pa.Buffer | list[pa.Buffer]) -> int:
        """Append one record (its payload given whole or in parts); returns its position.

        Written to the OS at once (one writev); synced per the policy.
        """
        if self._size >= self.segment_bytes:
            self._rotate()
        position = self.next_position
        parts = payload if isinstance(payload, list) else [payload]
        header, length = _record_header(kind, position, parts)
        written = os.writev(self._fd, [header, *parts])
        if written != len(header) + length:  # a full disk, say: never leave half a record behind
            os.ftruncate(self._fd, self._size)
            raise OSError(f"journal {self._segment}: short write ({written} of {len(header) + length} bytes)")
        self._size += written
        self.bytes_written += written
        self.next_position += 1
        if self.fsync is None:
            self.durable_position = position
        return position

    def append_events(self, columns: dict[str, np.ndarray], input: str, sender: int | None = None,
                      seq: int | None = None) -> int:
        position = self.append(EVENTS, encode_events(columns, input, sender, seq))
        if sender is not None:
            self._written_sequences[(input, sender)] = seq
            if self.fsync is None:
                self.durable_sequences[(input, sender)] = seq
        return position

    def append_feedback(self, ids: list[str], outcomes: list[str], ts: list[int], source: str) -> int:
        return self.append(FEEDBACK, encode_feedback(ids, outcomes, ts, source))

    def append_advance(self, ts: int) -> int:
        return self.append(ADVANCE, _ADVANCE.pack(ts))

    def append_reload(self, reload: dict) -> int:
        return self.append(RELOAD, json.dumps(reload).encode())

    def commit(self) -> None:
        """Called before the engine applies what was appended: syncs when the policy says so."""
        if self.fsync is None or self.durable_position == self.next_position - 1:
            return
        if self.fsync == 0.0 or self._clock() - self._synced_at >= self.fsync:
            self.sync()

    def tick(self) -> None:
        """Called every turn of the loop: an interval policy syncs what waits once the interval has passed."""
        if self.fsync and self.durable_position < self.next_position - 1 and \
                self._clock() - self._synced_at >= self.fsync:
            self.sync()

    def sync(self) -> None:
        """Make everything appended durable now (fdatasync), unless the policy is "off"."""
        if self._fd is not None and self.durable_position < self.next_position - 1:
            os.fdatasync(self._fd)
            self.syncs += 1
        self._synced_at = self._clock()
        self.durable_position = self.next_position - 1
        self.durable_sequences.update(self._written_sequences)

    def _rotate(self) -> None:
        self.sync()
        os.close(self._fd)
        self._start_segment(self.next_position)

    def continue_after(self, position: int) -> None:
        """Number the next entry after `position` when the journal ends before it.

        A checkpoint covers `position`, so the journal held it once; if it ends
        earlier now (a tail lost to a power cut with fsync "off", a damaged last
        segment cut back), new entries must not take positions the checkpoint
        claims to cover, or a later replay would skip them.  They go to a new
        segment named after `position` + 1, and replay after `position` reads it.
        """
        if self.next_position > position + 1:
            return
        log.error("journal ends before the checkpoint's position; continuing after it", extra={"fields": {
            "journal_ends": self.next_position - 1, "checkpoint": position}})
        self.sync()
        os.close(self._fd)
        self.next_position = position + 1
        self.durable_position = position
        self._start_segment(self.next_position)

    def restore_sequences(self, sequences: dict[tuple[str, int], int]) -> None:
        """Sender sequences known durable at start (a checkpoint's and the replayed journal's)."""
        self._written_sequences.update(sequences)
        self.durable_sequences.update(sequences)

    # -- reading ------------------------------------------------------------------------

    def entries(self, after: int = 0) -> Iterator[Entry]:
        """The entries with a position above `after`, in order; a damaged record ends them (logged)."""
        segments = self.segments()
        for k, (first, path) in enumerate(segments):
            following = segments[k + 1][0] if k + 1 < len(segments) else None
            if following is not None and following - 1 <= after:
                continue  # every entry of this segment is at or below `after`
            data = memoryview(path.read_bytes())
            records, end = _records(data, path)
            expected = first
            for kind, position, payload in records:
                if position != expected:
                    log.error("journal out of order; replay stops here", extra={"fields": {
                        "segment": str(path), "expected": expected, "found": position}})
                    return
                expected += 1
                if position > after:
                    yield decode(kind, position, payload)
            if end < len(data) and following is not None:
                log.error("journal record damaged; replay stops here (the entries after it are lost)",
                          extra={"fields": {"segment": str(path), "offset": end, "position": expected}})
                return
            if following is not None and following != expected:
                log.error("journal segments do not follow on; replay stops here", extra={"fields": {
                    "segment": str(path), "expected": expected, "next_segment": following}})
                return

    def first_position(self) -> int:
        """The position of the oldest entry kept (the next one when none is kept)."""
        segments = self.segments()
        return segments[0][0] if segments else self.next_position

    # -- releasing ------------------------------------------------------------------------

    def release(self, covered: int) -> int:
        """Delete segments whose every entry is at or below `covered` and older than the retention; returns how many.

        The segment being written is never deleted.
        """
        segments = self.segments()
        now = self._wall()
        removed = 0
        for (_, path), (following, _) in zip(segments, segments[1:], strict=False):
            if following - 1 > covered:
                break
            if self.retain_seconds and now - path.stat().st_mtime < self.retain_seconds:
                continue
            path.unlink()
            removed += 1
        if removed:
            fsync_path(self.directory)
        return removed

    def mask(self, msisdns: np.ndarray) -> int:
        """Erasure in the closed segments kept (for audit): rows of these subscribers go, and a `peer` equal to
        one of them reads 0.  Each segment is rewritten beside itself, synced and renamed over it; positions
        stay.  Returns the rows removed.  Call `rotate()` first, so that every entry is in a closed segment.
        """
        removed = 0
        current = self._segment
        for _, path in self.segments():
            if path == current:
                continue
            data = memoryview(path.read_bytes())
            records, _ = _records(data, path)
            out = [FILE_HEADER.pack(FILE_MAGIC, FORMAT)]
            changed = False
            for kind, position, payload in records:
                if kind == EVENTS:
                    entry = decode(kind, position, payload)
                    if entry.n:
                        keep = ~np.isin(entry.columns["msisdn"], msisdns)
                        peer = entry.columns.get("peer")
                        if not keep.all() or (peer is not None and np.isin(peer, msisdns).any()):
                            columns = {name: np.asarray(values)[keep].copy() for name, values in entry.columns.items()}
                            if "peer" in columns:
                                columns["peer"][np.isin(columns["peer"], msisdns)] = 0
                            removed += int((~keep).sum())
                            payload = b"".join(part.to_pybytes() for part in
                                               encode_events(columns, entry.input, entry.sender, entry.seq))
                            changed = True
                out += [_record_header(kind, position, [payload])[0], bytes(payload)]
            if not changed:
                continue
            staging = path.with_name(path.name + ".partial")
            with open(staging, "wb") as f:
                for chunk in out:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            staging.rename(path)
        fsync_path(self.directory)
        return removed

    def rotate(self) -> None:
        """Start a new segment now (erasure rewrites only closed segments)."""
        if self._size > FILE_HEADER.size:
            self._rotate()

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None
