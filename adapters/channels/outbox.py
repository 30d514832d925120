"""The durable outbox between the engine and the channels, and the worker that delivers from it.

The daemon's `outbox` output (`OutboxOutput`) queues each table of instructions for a writer
thread that commits it into a SQLite database (tables that wait together in one transaction); the
daemon's loop waits neither for SQLite nor for a channel.  A `DeliveryWorker`, on threads of its
own, takes due rows per channel and hands them to `Channel.deliver`.

One row per instruction, keyed by the instruction id (SPEC section 5: deterministic, so a replay or a
recovery produces the same ids).  Writing is INSERT OR IGNORE: an id already in the outbox, whatever
became of it, is never enqueued again, so a replayed instruction is never delivered twice.

A row's `status`:

- ``pending``: waiting for its channel; not before `due_at` (ms since the epoch), which starts as
  the instruction's `not_before` and moves on with each retry;
- ``in-flight``: claimed by the worker, being delivered;
- ``delivered``: the peer accepted it (what became of it later comes back as feedback);
- ``parked``: given up, `reason` says why (the peer rejected it, its validity ended, or it ran out of
  attempts);
- ``holdout``: the control group (SPEC section 4): recorded, never delivered.

A crash leaves rows `in-flight`; the next worker to open the outbox sets them back to `pending`,
and delivers them again.  Channels are idempotent by instruction id, which makes that safe.

Retries: `Retry` from a channel waits a random time between 0 and
``min(backoff_max, backoff_initial * 2 ** (attempt - 1))`` ("full jitter", so retries from many rows
do not come back in step), or at least as long as the peer asked for.  Retries end by time, not by
count: an instruction is valid until its `not_before` plus the channel's `max_age`, so a peer that is
down for minutes or hours parks nothing.  A retry that would come at or after that moment parks the
row ``expired: ...`` with the last reason, and a row claimed after it is parked ``expired: ...``
without an attempt (old marketing is not sent late).  `max_attempts`, when set, also parks after that
many attempts.  `Rejected` parks at once.  Each channel has `concurrency` threads and, when `rate` is
set, a token bucket of `rate` messages per second (bursts of up to `burst`).

Delivered and holdout rows are deleted once older than the output's `keep`; that is also how long a
replayed id is recognised.  Parked rows stay until an operator retries or deletes them
(`kairos outbox`, docs/daemon.md, "Admin commands"; `Outbox.retry_parked`, `Outbox.delete_rows`).
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from adapters.channels.base import Channel, FeedbackSink, Instruction, Rejected, Retry
from adapters.outputs import Backpressure, Output, OutputOptions, _check_instructions
from engine.rules import parse_duration

log = logging.getLogger("kairos.outbox")

STATUSES = ("pending", "in-flight", "delivered", "parked", "holdout")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instructions (
    -- A rowid in enqueue order: the partial indexes below then grow at their end, where a random key (the
    -- id) would scatter every batch over their pages; measured, that tripled the cost of an insert.
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    channel TEXT NOT NULL,
    ts INTEGER NOT NULL,
    msisdn INTEGER NOT NULL,
    rule TEXT NOT NULL,
    template TEXT NOT NULL,
    priority INTEGER NOT NULL,
    holdout INTEGER NOT NULL,
    not_before INTEGER NOT NULL,
    params BLOB NOT NULL,            -- JSON object of strings, UTF-8
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at INTEGER NOT NULL,         -- ms since the epoch; a pending row waits until then
    reason TEXT,                     -- why the last attempt failed, or why the row is parked
    created_at INTEGER NOT NULL,     -- ms since the epoch
    updated_at INTEGER NOT NULL
);
-- Partial indexes: the worker and metrics look at pending rows, metrics at parked ones, the purge at finished ones.
CREATE INDEX IF NOT EXISTS instructions_due ON instructions (channel, due_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS instructions_parked ON instructions (channel) WHERE status = 'parked';
CREATE INDEX IF NOT EXISTS instructions_finished ON instructions (updated_at) WHERE status IN ('delivered', 'holdout');
-- journal_position: the journal position (engine/journal.py) of the newest entry whose instructions are written
-- here, set in the same transaction as them; a recovery replays the entries up to it without sending again.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_INSERT = """
INSERT OR IGNORE INTO instructions
    (id, channel, ts, msisdn, rule, template, priority, holdout, not_before, params, status, due_at, created_at,
     updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_COLUMNS = "id, channel, ts, msisdn, rule, template, priority, holdout, not_before, params, attempts"

# The reason of a row parked at claim because its validity ended (SQL over the row before the update); the
# same words as `_expired_reason` below, so an operator finds both kinds with reason LIKE 'expired:%'.
_EXPIRED_REASON = (
    "'expired: valid until ' || strftime('%Y-%m-%dT%H:%M:%SZ', (not_before + :max_age) / 1000, 'unixepoch') || "
    "CASE WHEN attempts = 0 THEN ', not attempted' "
    "ELSE ', after ' || attempts || CASE WHEN attempts = 1 THEN ' attempt' ELSE ' attempts' END "
    "|| COALESCE(': ' || reason, '') END"
)


def _expired_reason(valid_until_ms: int, attempts: int, last: str) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(valid_until_ms // 1000))
    return f"expired: valid until {stamp}, after {attempts} attempt{'' if attempts == 1 else 's'}: {last}"


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class RowFilter:
    """The rows an operator means (`kairos outbox`, docs/daemon.md): every condition given holds.

    Rows are taken least recently changed first, so `limit` keeps to the oldest."""

    channel: str | None = None
    rule: str | None = None
    statuses: tuple[str, ...] = ()  # any of these; empty: any status
    reason: str | None = None  # a substring of `reason`, whatever the case
    updated_before: int | None = None  # ms since the epoch: last changed before this
    updated_since: int | None = None  # ms since the epoch: last changed at or after this
    limit: int | None = None  # at most this many rows

    def __post_init__(self) -> None:
        unknown = [s for s in self.statuses if s not in STATUSES]
        if unknown:
            raise ValueError(f"unknown status {unknown[0]!r} ({', '.join(STATUSES)})")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition (for `WHERE`) and its parameters."""
        terms, params = ["1"], []
        for column, value in (("channel", self.channel), ("rule", self.rule)):
            if value is not None:
                terms.append(f"{column} = ?")
                params.append(value)
        if self.statuses:
            terms.append(f"status IN ({', '.join('?' * len(self.statuses))})")
            params.extend(self.statuses)
        if self.reason is not None:
            terms.append("instr(lower(reason), lower(?)) > 0")
            params.append(self.reason)
        if self.updated_before is not None:
            terms.append("updated_at < ?")
            params.append(self.updated_before)
        if self.updated_since is not None:
            terms.append("updated_at >= ?")
            params.append(self.updated_since)
        return " AND ".join(terms), params


def _past_validity(expired_upto: Mapping[str, int]) -> tuple[str, list[Any]]:
    """SQL true for a row whose validity has ended: `expired_upto[channel]` is now less the channel's max_age
    (the claim's test, `take`); a channel not named has no limit."""
    if not expired_upto:
        return "0", []
    terms, params = [], []
    for channel, upto in expired_upto.items():
        terms.append("(channel = ? AND not_before <= ?)")
        params.extend((channel, upto))
    return "(" + " OR ".join(terms) + ")", params


class Outbox:
    """One connection to an outbox database.  Thread-safe: calls are serialised by a lock.

    The daemon's output and the delivery worker each open their own; SQLite's WAL mode lets the
    worker read while the output writes, and `busy_timeout` makes one writer wait for the other.
    """

    def __init__(self, path: str | Path, *, fsync: bool = False, clock: Callable[[], int] = _now_ms):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        try:
            self._db.execute("PRAGMA journal_mode = WAL")
            # NORMAL: a commit survives a crash of the process (WAL); FULL syncs the WAL at every commit, so it
            # survives a power cut too, at the cost of an fsync per batch on the daemon's loop (bench/README.md).
            self._db.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing (the daemon) ------------------------------------------------

    def enqueue(self, table: pa.Table, position: int | None = None) -> int:
        """All rows of an instruction table in one transaction; returns how many ids were new.

        `position`, when given, is recorded as the journal position the outbox has reached, in the same
        transaction.
        """
        if not table.num_rows and position is None:
            return 0
        # orjson per row beats Arrow compute here: tables are a few hundred rows, and each compute call has a
        # fixed cost larger than that.
        params = [orjson.dumps(dict(p)) for p in table.column("params").to_pylist()]
        holdout = table.column("holdout").to_pylist()
        status = ["holdout" if h else "pending" for h in holdout]
        now = self._clock()
        rows = zip(
            table.column("id").to_pylist(), table.column("channel").to_pylist(), table.column("ts").to_pylist(),
            table.column("msisdn").to_pylist(), table.column("rule").to_pylist(),
            table.column("template").to_pylist(), table.column("priority").to_pylist(), holdout,
            table.column("not_before").to_pylist(), params, status,
            table.column("not_before").to_pylist(), [now] * table.num_rows, [now] * table.num_rows,
            strict=True,
        )  # fmt: skip
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_INSERT, rows)
                if position is not None:
                    self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('journal_position', ?)",
                                     (position,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._db.total_changes - before

    def journal_position(self) -> int:
        """The journal position of the newest entry whose instructions are in the outbox (0 for none)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'journal_position'").fetchone()
        return 0 if row is None else int(row[0])

    def forget(self, msisdns: list[int]) -> int:
        """Delete every row of these subscribers, whatever its status (erasure); returns how many."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                removed = sum(self._db.execute("DELETE FROM instructions WHERE msisdn = ?", (int(m),)).rowcount
                              for m in msisdns)
                # Another subscriber's instruction may carry the number as a param (the peer of a call): blanked.
                for m in msisdns:
                    text = str(int(m))
                    for seq, params in self._db.execute("SELECT seq, params FROM instructions WHERE instr(params, ?)",
                                                        (f'"{text}"'.encode(),)).fetchall():
                        values = {k: ("" if v == text else v) for k, v in orjson.loads(params).items()}
                        self._db.execute("UPDATE instructions SET params = ? WHERE seq = ?",
                                         (orjson.dumps(values), seq))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            # Deleted rows leave their bytes in free pages and the WAL until these run.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return removed

    # -- delivering (the worker) -----------------------------------------------

    def requeue_in_flight(self) -> int:
        """Rows a crash left in flight go back to pending, due now; returns how many."""
        with self._lock:
            return self._db.execute(
                "UPDATE instructions SET status = 'pending', due_at = ?, updated_at = ? WHERE status = 'in-flight'",
                (self._clock(), self._clock()),
            ).rowcount

    def claim(self, channel: str, limit: int) -> list[tuple[Instruction, int]]:
        """Up to `limit` due rows of `channel`, oldest due first, now in flight; with each its attempt number."""
        return self.take(channel, limit, None)[0]

    def take(self, channel: str, limit: int, max_age_ms: int | None) -> tuple[list[tuple[Instruction, int]],
                                                                            list[tuple[str, str]]]:
        """Up to `limit` due rows of `channel`, oldest due first: those still valid now in flight, each with
        its attempt number; those whose validity (`not_before + max_age_ms`) has ended parked ``expired``,
        not attempted, as (id, reason).  `max_age_ms` None: every row is valid.

        One statement judges and moves the same head of the due index: a backlog that expired while the
        worker was down is parked `limit` rows at a time without scanning past them, and no row judged
        expired can be handed out."""
        now = self._clock()
        # Valid while now < not_before + max_age, i.e. expired when not_before <= now - max_age; no limit is a
        # bound no row is below (not_before is ms since the epoch).
        expired_upto = -(1 << 63) if max_age_ms is None else now - max_age_ms
        with self._lock:
            rows = self._db.execute(
                f"UPDATE instructions SET "
                f"status = CASE WHEN not_before <= :upto THEN 'parked' ELSE 'in-flight' END, "
                f"attempts = attempts + (not_before > :upto), "
                f"reason = CASE WHEN not_before <= :upto THEN {_EXPIRED_REASON} ELSE reason END, "
                f"updated_at = :now "
                f"WHERE seq IN (SELECT seq FROM instructions WHERE status = 'pending' AND channel = :channel "
                f"AND due_at <= :now ORDER BY due_at LIMIT :limit) RETURNING status, reason, {_COLUMNS}",
                {"upto": expired_upto, "max_age": max_age_ms or 0, "now": now, "channel": channel, "limit": limit},
            ).fetchall()
        claimed = [
            (Instruction(id=r[2], channel=r[3], ts=r[4], msisdn=r[5], rule=r[6], template=r[7], priority=r[8],
                         holdout=bool(r[9]), not_before=r[10], params=orjson.loads(r[11])), r[12])
            for r in rows if r[0] == "in-flight"
        ]  # fmt: skip
        return claimed, [(r[2], r[1]) for r in rows if r[0] == "parked"]

    def next_due(self, channel: str) -> int | None:
        """When the earliest pending row of `channel` falls due (ms), or None when none is pending."""
        with self._lock:
            (due,) = self._db.execute(
                "SELECT MIN(due_at) FROM instructions WHERE status = 'pending' AND channel = ?", (channel,)
            ).fetchone()
        return due

    def mark_delivered(self, id: str) -> None:
        self._set(id, "delivered", None, None)

    def mark_retry(self, id: str, due_at: int, reason: str) -> None:
        self._set(id, "pending", due_at, reason)

    def mark_parked(self, id: str, reason: str) -> None:
        self._set(id, "parked", None, reason)

    def release(self, id: str) -> None:
        """An in-flight row never attempted (the worker is stopping) goes back as it was."""
        with self._lock:
            self._db.execute(
                "UPDATE instructions SET status = 'pending', attempts = attempts - 1 WHERE id = ? "
                "AND status = 'in-flight'", (id,),
            )

    def _set(self, id: str, status: str, due_at: int | None, reason: str | None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE instructions SET status = ?, due_at = COALESCE(?, due_at), reason = ?, updated_at = ? "
                "WHERE id = ?", (status, due_at, reason, self._clock(), id),
            )

    def purge(self, older_than_ms: int) -> int:
        """Delete delivered and holdout rows last changed before `older_than_ms`; returns how many."""
        with self._lock:
            return self._db.execute(
                "DELETE FROM instructions WHERE status IN ('delivered', 'holdout') AND updated_at < ?",
                (older_than_ms,),
            ).rowcount

    # -- looking -------------------------------------------------------------------

    def counts(self) -> dict[tuple[str, str], int]:
        """(channel, status) -> rows, every row read: for tests and operators, not for metrics."""
        with self._lock:
            rows = self._db.execute("SELECT channel, status, COUNT(*) FROM instructions GROUP BY channel, status")
            return {(channel, status): n for channel, status, n in rows}

    def waiting(self) -> dict[tuple[str, str], int]:
        """(channel, "pending" | "parked") -> rows, from their partial indexes: cheap however many
        delivered rows the outbox keeps."""
        with self._lock:
            return {
                (channel, status): n
                for status in ("pending", "parked")
                for channel, n in self._db.execute(
                    "SELECT channel, COUNT(*) FROM instructions WHERE status = ? GROUP BY channel", (status,))
            }

    def row(self, id: str) -> dict[str, Any] | None:
        """One row as a dict (for tests and operators), or None."""
        with self._lock:
            cursor = self._db.execute("SELECT * FROM instructions WHERE id = ?", (id,))
            found = cursor.fetchone()
            return None if found is None else dict(zip([d[0] for d in cursor.description], found, strict=True))

    # -- operating (`kairos outbox`, beside a running daemon) ----------------------------
    #
    # Every change is made CHUNK rows at a time, each chunk a statement of its own (its own transaction): the
    # daemon's writer and delivery threads never wait long for the lock (they wait up to the busy timeout).

    CHUNK = 500

    def find(self, rows: RowFilter) -> list[dict[str, Any]]:
        """The rows `rows` means, least recently changed first, as dicts (`params` a dict)."""
        where, params = rows.where()
        with self._lock:
            cursor = self._db.execute(f"SELECT * FROM instructions WHERE {where} ORDER BY updated_at, seq "
                                      f"LIMIT ?", [*params, -1 if rows.limit is None else rows.limit])
            names = [d[0] for d in cursor.description]
            found = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
        for r in found:
            r["params"] = orjson.loads(r["params"])
        return found

    def tally(self, rows: RowFilter) -> dict[str, int]:
        """status -> how many rows `rows` means (its limit aside)."""
        where, params = rows.where()
        with self._lock:
            return dict(self._db.execute(f"SELECT status, COUNT(*) FROM instructions WHERE {where} GROUP BY status",
                                         params).fetchall())

    def retryable(self, rows: RowFilter, expired_upto: Mapping[str, int]) -> tuple[int, int]:
        """Of the parked rows `rows` means: how many `retry_parked` would retry (its limit applied), and how
        many it leaves because their validity has ended (see `retry_parked`)."""
        where, params = rows.where()
        past, past_params = _past_validity(expired_upto)
        with self._lock:
            valid, expired = self._db.execute(
                f"SELECT COALESCE(SUM(NOT {past}), 0), COALESCE(SUM({past}), 0) FROM instructions "
                f"WHERE status = 'parked' AND {where}", [*past_params, *past_params, *params]).fetchone()
        return (valid if rows.limit is None else min(valid, rows.limit)), expired

    def retry_parked(self, rows: RowFilter, expired_upto: Mapping[str, int]) -> int:
        """The parked rows `rows` means go back to pending, due now, attempts 0; returns how many.

        Rows of other statuses are never touched.  Nor are rows past their validity: for a channel in
        `expired_upto` (now less its max_age, ms), a row with `not_before` at or before that would only be
        parked again as expired at its claim, so it stays parked.  `reason` keeps the last failure."""
        where, params = rows.where()
        past, past_params = _past_validity(expired_upto)
        done = 0
        while rows.limit is None or done < rows.limit:
            take = self.CHUNK if rows.limit is None else min(self.CHUNK, rows.limit - done)
            now = self._clock()
            with self._lock:
                changed = self._db.execute(
                    f"UPDATE instructions SET status = 'pending', due_at = ?, attempts = 0, updated_at = ? "
                    f"WHERE seq IN (SELECT seq FROM instructions WHERE status = 'parked' AND NOT {past} "
                    f"AND {where} ORDER BY updated_at, seq LIMIT ?)", [now, now, *past_params, *params, take],
                ).rowcount
            done += changed
            if changed < take:
                break
        return done

    def delete_rows(self, rows: RowFilter) -> dict[str, int]:
        """Delete the rows `rows` means; returns status -> rows deleted.  `rows.statuses` must be given: which
        statuses may go is the caller's decision (`kairos outbox purge` never deletes pending or in-flight rows
        unless forced)."""
        if not rows.statuses:
            raise ValueError("delete_rows: name the statuses to delete")
        where, params = rows.where()
        deleted: dict[str, int] = {}
        done = 0
        while rows.limit is None or done < rows.limit:
            take = self.CHUNK if rows.limit is None else min(self.CHUNK, rows.limit - done)
            with self._lock:
                gone = self._db.execute(
                    f"DELETE FROM instructions WHERE seq IN (SELECT seq FROM instructions WHERE {where} "
                    f"ORDER BY updated_at, seq LIMIT ?) RETURNING status", [*params, take]).fetchall()
            for (status,) in gone:
                deleted[status] = deleted.get(status, 0) + 1
            done += len(gone)
            if len(gone) < take:
                break
        return deleted


class OutboxOutput(Output):
    """Instructions into the outbox (``type = "outbox"``), written by a thread of the output's own.

    `send` checks the table and queues it: the daemon's loop never waits for SQLite.  The writer
    thread takes every table waiting and writes them in one transaction (one per table when the loop
    is not faster than the disk), so the daemon's cost per batch is a few microseconds, and SQLite's
    work (which releases the GIL) overlaps the kernel's.  `flush` returns once everything sent is
    committed; `close` flushes.  While `max_waiting` tables wait (the disk is slow, or the database is
    locked by something else), `send` raises `Backpressure` and the daemon stops reading the feeds.
    A write that fails (a locked database, a full disk) is retried, never dropped.

    The daemon starts a `DeliveryWorker` on this output's outbox for the `[channels.NAME]` tables of
    kairos.toml.
    """

    kind = "outbox"
    RETRY_SECONDS = 0.05  # first wait after a failed write; doubles up to a second
    FLUSH_SECONDS = 30.0  # longest flush() waits for a failing writer before it gives up and logs

    def __init__(self, name: str, path: str | Path, *, fsync: bool = False, keep_ms: int = 7 * 86_400_000,
                 max_waiting: int = 64):
        self.name = name
        self.path = Path(path)
        self.fsync = fsync
        self.keep_ms = keep_ms
        self.max_waiting = max_waiting
        self.outbox = Outbox(path, fsync=fsync)
        # Called after each write; the daemon points it at the worker's wake().
        self.on_enqueue: Callable[[], None] = lambda: None
        self._waiting: list[tuple[pa.Table, int | None]] = []  # tables sent, with their journal positions
        self._writing = False
        self._changed = threading.Condition()
        self._closed = False
        self._instructions = 0
        self._duplicates = 0
        self._batches = 0
        self._transactions = 0
        self._write_errors = 0
        self._writer = threading.Thread(target=self._write_forever, name=f"outbox-{name}", daemon=True)
        self._writer.start()

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> OutboxOutput:
        """Keys: `path` (the SQLite file, required), `fsync` (sync every commit, default false), `keep`
        (how long delivered and holdout rows, and so replay protection, are kept; default "7d"),
        `max_waiting` (tables queued for the writer before `send` pushes back, default 64)."""
        read = OutputOptions(name, options)
        path = read.string("path")
        fsync = read.boolean("fsync", False)
        keep = read.string("keep", "7d")
        max_waiting = read.integer("max_waiting", 64)
        read.finish()
        try:
            keep_ms = parse_duration(keep)
        except ValueError as exc:
            raise read.error("keep", str(exc)) from None
        return cls(name, path, fsync=fsync, keep_ms=keep_ms, max_waiting=max_waiting)

    def send(self, instructions: pa.Table, position: int | None = None) -> None:
        if self._closed:
            raise ValueError(f"output {self.name!r} is closed")
        _check_instructions(instructions)
        if not instructions.num_rows:
            return
        with self._changed:
            if len(self._waiting) >= self.max_waiting:
                raise Backpressure(f"output {self.name!r}: {len(self._waiting)} tables wait to be written to "
                                   f"{self.path}", self.RETRY_SECONDS)
            self._waiting.append((instructions, position))
            self._batches += 1
            self._changed.notify_all()

    def flush(self) -> None:
        """Wait until every table sent so far is committed (up to FLUSH_SECONDS while writes fail)."""
        deadline = time.monotonic() + self.FLUSH_SECONDS
        with self._changed:
            while self._waiting or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("outbox writes keep failing; instructions not yet written", extra={"fields": {
                        "output": self.name, "tables": len(self._waiting)}})
                    return
                self._changed.wait(left)

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._writer.join()
        self.outbox.close()

    def stats(self) -> dict[str, int]:
        """`instructions` newly enqueued, `duplicates` (ids already in the outbox, not enqueued again),
        `batches` (tables sent), `transactions` (writes), `write_errors` (writes retried)."""
        with self._changed:
            return {"instructions": self._instructions, "duplicates": self._duplicates, "batches": self._batches,
                    "transactions": self._transactions, "write_errors": self._write_errors}

    def _write_forever(self) -> None:
        wait = self.RETRY_SECONDS
        while True:
            with self._changed:
                while not self._waiting and not self._closed:
                    self._changed.wait()
                if not self._waiting:
                    return  # closed, and everything written
                tables = list(self._waiting)
                self._writing = True
            table = tables[0][0] if len(tables) == 1 else pa.concat_tables([t for t, _ in tables])
            positions = [p for _, p in tables if p is not None]
            try:
                new = self.outbox.enqueue(table, max(positions) if positions else None)
            except Exception:
                with self._changed:
                    self._write_errors += 1
                    self._writing = False
                    self._changed.notify_all()
                log.exception("outbox write failed; retrying", extra={"fields": {"output": self.name,
                                                                                  "instructions": table.num_rows}})
                time.sleep(wait)
                wait = min(wait * 2, 1.0)
                continue
            wait = self.RETRY_SECONDS
            with self._changed:
                del self._waiting[: len(tables)]
                self._instructions += new
                self._duplicates += table.num_rows - new
                self._transactions += 1
                self._writing = False
                self._changed.notify_all()
            self.on_enqueue()


# ---------------------------------------------------------------------------
# Delivery


@dataclass(frozen=True)
class DeliveryPolicy:
    """How the worker delivers to one channel (the delivery keys of `[channels.NAME]`)."""

    concurrency: int = 4  # deliveries in progress at once (threads)
    rate: float | None = None  # messages per second, None for no limit
    burst: int = 1  # tokens the bucket holds: messages that may go at once after a quiet spell
    max_attempts: int = 0  # then the row is parked; 0: no limit, retries end with max_age
    backoff_initial: float = 1.0  # seconds: the cap of the first retry's random wait
    backoff_max: float = 300.0  # seconds: the cap of any retry's random wait
    # Seconds an instruction stays valid after its not_before: no attempt is made from then on.  None: no
    # limit.  The daemon always passes [channels.NAME] max_age (default a day); None here keeps in-process
    # callers such as the demo, whose event time is synthetic days in the past, delivering.
    max_age: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 0:
            raise ValueError(f"max_attempts must be 0 (no limit) or more, got {self.max_attempts}")
        if self.max_age is not None and not self.max_age > 0:
            raise ValueError(f"max_age must be longer than 0 seconds, got {self.max_age}")

    @property
    def max_age_ms(self) -> int | None:
        return None if self.max_age is None else max(1, round(self.max_age * 1000))

    def backoff(self, attempt: int, after: float | None, rng: random.Random) -> float:
        """Seconds to wait before attempt `attempt + 1` (full jitter), at least `after` when the peer said so."""
        wait = rng.uniform(0.0, min(self.backoff_max, self.backoff_initial * 2.0 ** min(attempt - 1, 60)))
        return max(wait, after) if after is not None else wait


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `take` waits for one."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self, stopping: threading.Event) -> bool:
        """Wait for a token; False when `stopping` was set first."""
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
                self._at = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return True
                wait = (1.0 - self._tokens) / self.rate
            if stopping.wait(wait):
                return False


class ChannelCounters:
    """What the worker did for one channel; updated under the worker's lock."""

    def __init__(self) -> None:
        self.delivered = 0  # accepted by the peer
        self.retries = 0  # attempts that failed with Retry and were rescheduled
        self.parked = 0  # given up: rejected, expired, or out of attempts
        self.rejected = 0  # of those, refused by the peer for good
        self.expired = 0  # of those, past their validity (not_before + max_age): retried until then, or claimed late
        self.in_flight = 0  # deliveries in progress now

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class DeliveryWorker:
    """Delivers due outbox rows to their channels on threads of its own.

    Rows of a channel that is not configured stay pending (nothing is lost; a later start with that
    channel delivers them), and show up in `pending` counts.
    """

    CLAIM = 8  # rows a thread claims at once: fewer transactions, yet no thread hoards a channel's work
    POLL_SECONDS = 0.25  # longest an idle thread sleeps before looking again without being woken
    PURGE_SECONDS = 60.0  # how often finished rows past `keep` are deleted

    def __init__(
        self,
        path: str | Path,
        channels: dict[str, tuple[Channel, DeliveryPolicy]],
        *,
        keep_ms: int = 7 * 86_400_000,
        seed: int | None = None,
        clock: Callable[[], int] = _now_ms,
    ):
        self.path = Path(path)
        self.channels = channels
        self.keep_ms = keep_ms
        # ms since the epoch: what due times, validity and retries are measured against (tests move it on).
        self._clock = clock
        self.outbox = Outbox(path, fsync=False, clock=clock)
        # Metrics read on a connection of their own, so a scrape never waits for, or holds up, a delivery.
        self.metrics_outbox = Outbox(path, fsync=False, clock=clock)
        self.counters = {name: ChannelCounters() for name in channels}
        self.buckets = {
            name: TokenBucket(policy.rate, policy.burst) for name, (_, policy) in channels.items() if policy.rate
        }
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._woken = 0  # increases with every wake(), so a sleeping thread knows it missed none
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._purged_at = 0.0
        self.requeued = 0

    def start(self, feedback_for: Callable[[str], FeedbackSink]) -> None:
        """Start every channel's receivers (with its feedback sink) and the delivery threads."""
        self.requeued = self.outbox.requeue_in_flight()
        if self.requeued:
            log.warning("instructions in flight at the last stop are delivered again",
                        extra={"fields": {"instructions": self.requeued}})
        try:
            for name, (channel, _) in self.channels.items():
                channel.start(feedback_for(name))
        except BaseException:
            for channel, _ in self.channels.values():
                channel.close()
            self.outbox.close()
            self.metrics_outbox.close()
            raise
        for name, (_, policy) in self.channels.items():
            for k in range(policy.concurrency):
                thread = threading.Thread(target=self._serve, args=(name,), name=f"deliver-{name}-{k}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def wake(self) -> None:
        """New rows were enqueued: idle threads look now rather than at their next poll."""
        with self._wake:
            self._woken += 1
            self._wake.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Let deliveries in progress finish (up to `timeout`), stop the threads, close the channels."""
        self._stopping.set()
        self.wake()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for channel, _ in self.channels.values():
            try:
                channel.close()
            except Exception:
                log.exception("channel close failed", extra={"fields": {"channel": channel.name}})
        self.outbox.close()
        self.metrics_outbox.close()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per channel: the worker's counters and the channel's own."""
        with self._lock:
            return {
                name: {**self.counters[name].as_dict(), **self.channels[name][0].stats()} for name in self.channels
            }

    # -- the threads -------------------------------------------------------------

    def _serve(self, name: str) -> None:
        channel, policy = self.channels[name]
        bucket = self.buckets.get(name)
        # A rate-limited thread claims no more than it may send at once, so rows do not sit in flight
        # waiting for tokens.
        claim = self.CLAIM if bucket is None else max(1, min(self.CLAIM, policy.burst))
        max_age_ms = policy.max_age_ms
        while not self._stopping.is_set():
            with self._lock:
                woken = self._woken
            claimed, expired = self.outbox.take(name, claim, max_age_ms)
            if expired:
                self._expired_unattempted(name, expired)
            if not claimed:
                if not expired:  # rows past their validity took the claim: more may be due at once
                    self._maybe_purge()
                    self._idle(name, woken)
                continue
            for k, (instruction, attempt) in enumerate(claimed):
                if self._stopping.is_set() or (bucket is not None and not bucket.take(self._stopping)):
                    for unattempted, _ in claimed[k:]:
                        self.outbox.release(unattempted.id)
                    return
                self._attempt(name, channel, policy, instruction, attempt)

    def _idle(self, name: str, woken: int) -> None:
        due = self.outbox.next_due(name)
        wait = self.POLL_SECONDS
        if due is not None:
            wait = min(wait, max(0.0, (due - self._clock()) / 1000))
        with self._wake:
            if self._woken == woken and not self._stopping.is_set():
                self._wake.wait(wait)

    def _attempt(self, name: str, channel: Channel, policy: DeliveryPolicy, instruction: Instruction,
                 attempt: int) -> None:
        counters = self.counters[name]
        with self._lock:
            counters.in_flight += 1
        try:
            channel.deliver(instruction)
        except Rejected as exc:
            self._park(name, instruction, f"rejected: {exc.reason}", rejected=True)
        except Retry as exc:
            self._retry(name, policy, instruction, attempt, exc.reason, exc.after)
        except Exception as exc:
            # A defect in a channel: retried like a peer that is down, so a fix and a restart lose nothing.
            log.exception("channel failed unexpectedly", extra={"fields": {"channel": name, "id": instruction.id}})
            self._retry(name, policy, instruction, attempt, f"{type(exc).__name__}: {exc}", None)
        else:
            self.outbox.mark_delivered(instruction.id)
            with self._lock:
                counters.delivered += 1
        finally:
            with self._lock:
                counters.in_flight -= 1

    def _retry(self, name: str, policy: DeliveryPolicy, instruction: Instruction, attempt: int, reason: str,
               after: float | None) -> None:
        if policy.max_attempts and attempt >= policy.max_attempts:
            self._park(name, instruction, f"gave up after {attempt} attempts: {reason}")
            return
        with self._lock:
            wait = policy.backoff(attempt, after, self._rng)
        due_at = self._clock() + int(wait * 1000)
        max_age_ms = policy.max_age_ms
        if max_age_ms is not None and due_at >= instruction.not_before + max_age_ms:
            # The next attempt would come when the instruction is no longer worth sending: park it now rather
            # than hold it pending until a claim finds it expired.
            valid_until = instruction.not_before + max_age_ms
            self._park(name, instruction, _expired_reason(valid_until, attempt, reason), expired=True)
            return
        with self._lock:
            self.counters[name].retries += 1
        self.outbox.mark_retry(instruction.id, due_at, reason)

    def _park(self, name: str, instruction: Instruction, reason: str, *, rejected: bool = False,
              expired: bool = False) -> None:
        self.outbox.mark_parked(instruction.id, reason)
        log.warning("instruction parked", extra={"fields": {"channel": name, "id": instruction.id, "reason": reason}})
        with self._lock:
            self.counters[name].parked += 1
            self.counters[name].rejected += rejected
            self.counters[name].expired += expired

    def _expired_unattempted(self, name: str, expired: list[tuple[str, str]]) -> None:
        """Rows the claim found past their validity, already parked.  One log line per claim, not per row: after
        a long stop a backlog expires by the thousand."""
        log.warning("instructions expired before they were delivered", extra={"fields": {
            "channel": name, "instructions": len(expired), "ids": [i for i, _ in expired], "reason": expired[0][1]}})
        with self._lock:
            self.counters[name].parked += len(expired)
            self.counters[name].expired += len(expired)

    def _maybe_purge(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._purged_at < self.PURGE_SECONDS:
                return
            self._purged_at = now
        self.outbox.purge(self._clock() - self.keep_ms)
