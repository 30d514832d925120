"""Offers waiting for a subscriber, and the responses to them: the store behind the portal and crm channels.

One class over a DB-API connection: SQLite (a file, the default) or PostgreSQL (psycopg 3, production),
chosen by the target string.  Both run the same SQL text: only portable statements (``INSERT ... ON
CONFLICT DO NOTHING``, conditional ``UPDATE`` checked by its row count, no ``RETURNING``, no
``FOR UPDATE``), written with ``?`` placeholders that `_Dialect` turns into psycopg's ``%s``, the one
place the two differ.

Guarantees, in both databases:

- `put` is idempotent by the instruction id (the primary key): a retried or replayed delivery leaves one
  offer.
- `claim` is atomic: the claim is one conditional ``UPDATE``, so of two agents racing for an offer
  exactly one gets it; a claim lasts a lease and lapses by itself.
- `record_outcome` is idempotent by the response id (the primary key of ``responses``): the same
  response posted twice is one outcome, and the second post is told it is a repeat.  An outcome that
  the caller has reported as feedback is marked, so that after a crash between recording and
  reporting `unreported` hands it out again.

Any failure to reach the database (PostgreSQL down or restarting, SQLite locked past its busy timeout)
is raised as `StoreUnavailable`; the connection is dropped and the next call connects again.

Thread-safe: calls are serialised on one connection.  Times are milliseconds since the epoch.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# Offers in these states may still be presented and answered.
OPEN_STATUSES = ("pending", "claimed", "considering")
# Outcomes a subscriber's response may carry, and the status each leaves the offer in.
RESPONSE_OUTCOMES = ("accepted", "declined", "considering")
STATUSES = (*OPEN_STATUSES, "accepted", "declined", "expired")

_SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS offers (
        id TEXT PRIMARY KEY,
        msisdn BIGINT NOT NULL,
        rule TEXT NOT NULL,
        channel TEXT NOT NULL,
        template TEXT NOT NULL,
        params TEXT NOT NULL,
        priority INTEGER NOT NULL,
        created BIGINT NOT NULL,
        not_before BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ({", ".join(f"'{s}'" for s in STATUSES)})),
        claimed_by TEXT,
        claimed_until BIGINT,
        response_id TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS offers_msisdn_status ON offers (msisdn, status)",
    "CREATE INDEX IF NOT EXISTS offers_status_expires ON offers (status, expires_at)",
    """CREATE TABLE IF NOT EXISTS responses (
        id TEXT PRIMARY KEY,
        offer_id TEXT NOT NULL REFERENCES offers (id),
        outcome TEXT NOT NULL,
        agent TEXT,
        ts BIGINT NOT NULL,
        reported INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS responses_unreported ON responses (reported)",
)

_OFFER_COLUMNS = (
    "id, msisdn, rule, channel, template, params, priority, created, not_before, expires_at, "
    "status, claimed_by, claimed_until, response_id"
)
_OPEN = "status IN ('pending', 'claimed', 'considering')"
# Open, and not held by an agent other than the caller (a lapsed claim holds nothing).
_FREE = "(status <> 'claimed' OR claimed_until <= ? OR claimed_by = ?)"


@dataclass(frozen=True)
class Offer:
    """One offer: an instruction waiting for the subscriber's answer."""

    id: str  # the instruction id
    msisdn: int
    rule: str
    channel: str  # the config name of the channel that delivered it
    template: str
    params: dict[str, str]
    priority: int  # higher is presented first
    created: int  # when the channel stored it
    not_before: int  # not presented before this
    expires_at: int  # not presented from this moment on
    status: str = "pending"
    claimed_by: str | None = None  # the agent holding the claim, while status is "claimed"
    claimed_until: int | None = None  # the claim lapses at this moment
    response_id: str | None = None  # the response that set the status last

    def to_json(self) -> dict[str, Any]:
        """The offer as the portal and crm APIs show it."""
        return {
            "id": self.id,
            "msisdn": self.msisdn,
            "rule": self.rule,
            "template": self.template,
            "params": self.params,
            "priority": self.priority,
            "not_before": self.not_before,
            "expires_at": self.expires_at,
            "status": self.status,
            "claimed_by": self.claimed_by,
            "claimed_until": self.claimed_until,
        }

    @classmethod
    def _from_row(cls, row: tuple) -> Offer:
        values = list(row)
        values[5] = json.loads(values[5])
        return cls(*values)


@dataclass(frozen=True)
class Answer:
    """What became of a claim or an outcome.

    `result` is one of:
    ``ok`` (done; for an outcome, recorded now and to be reported), ``repeat`` (the same response id with
    the same offer and outcome was recorded before: nothing to report), ``unknown`` (no such offer for this
    subscriber), ``expired``, ``closed`` (the offer was already accepted or declined), ``held`` (another
    agent holds the claim), ``conflict`` (the response id was used before for another offer or outcome).
    """

    result: str
    offer: Offer | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class StoreUnavailable(Exception):
    """The database could not be reached or did not answer; nothing was changed."""


class _Dialect:
    """What differs between the two databases: how to connect, the placeholder, the error classes."""

    placeholder: ClassVar[str]

    def connect(self) -> Any:
        raise NotImplementedError

    def errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions that mean "the database is unreachable", as opposed to a bug in a statement."""
        raise NotImplementedError


class _SQLite(_Dialect):
    placeholder = "?"

    def __init__(self, path: str, timeout: float):
        self.path = path
        self.timeout = timeout

    def connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.timeout, check_same_thread=False)
        # WAL: readers (the portal's lookups) do not wait for the delivery writer, nor it for them.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.OperationalError,)


class _PostgreSQL(_Dialect):
    placeholder = "%s"

    def __init__(self, dsn: str, timeout: float):
        try:
            import psycopg
        except ImportError:
            raise ValueError(
                "a postgresql:// store needs psycopg 3: pip install 'psycopg[binary]'"
            ) from None
        self.psycopg = psycopg
        self.dsn = dsn
        self.timeout = timeout

    def connect(self) -> Any:
        seconds = max(1, round(self.timeout))
        # statement_timeout: a stuck query ends with an error instead of holding the store's lock.
        return self.psycopg.connect(
            self.dsn, connect_timeout=seconds, options=f"-c statement_timeout={seconds * 1000}"
        )

    def errors(self) -> tuple[type[BaseException], ...]:
        return (self.psycopg.OperationalError, self.psycopg.InterfaceError)


def is_postgresql(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


class OfferStore:
    """Offers and responses in SQLite (`target` a file path) or PostgreSQL (`target` a postgresql:// URL).

    `timeout` bounds connecting, waiting for a lock and each statement, in seconds.
    """

    def __init__(self, target: str, *, timeout: float = 5.0):
        self.target = target
        self._dialect: _Dialect = _PostgreSQL(target, timeout) if is_postgresql(target) else _SQLite(target, timeout)
        self._errors = self._dialect.errors()
        self._sql: dict[str, str] = {}
        self._conn: Any = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def kind(self) -> str:
        return "postgresql" if isinstance(self._dialect, _PostgreSQL) else "sqlite"

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _text(self, sql: str) -> str:
        """`sql` with the dialect's placeholder (the statements hold no literal '?' or '%')."""
        text = self._sql.get(sql)
        if text is None:
            text = self._sql[sql] = sql.replace("?", self._dialect.placeholder)
        return text

    def _transaction(self, work: Callable[[Callable[..., Any]], Any]) -> Any:
        """Run `work(execute)` in one transaction: commit, or roll back when it returns a `_Rollback`.

        `execute(sql, *params)` runs a statement and returns its cursor.  Unreachable database ->
        `StoreUnavailable` (connection dropped); any other error rolls back and propagates.
        """
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the offer store is closed")
            try:
                if self._conn is None:
                    self._conn = self._dialect.connect()
                    self._create_schema()
                conn = self._conn
                cursor = conn.cursor()

                def execute(sql: str, *params: Any) -> Any:
                    cursor.execute(self._text(sql), params)
                    return cursor

                try:
                    result = work(execute)
                    if isinstance(result, _Rollback):
                        conn.rollback()
                        return result.value
                    conn.commit()
                    return result
                except BaseException:
                    try:
                        conn.rollback()
                    except self._errors:
                        pass
                    raise
                finally:
                    cursor.close()
            except self._errors as exc:
                self._drop()
                raise StoreUnavailable(f"{self.kind} offer store unavailable: {exc}".strip()) from exc

    def _create_schema(self) -> None:
        cursor = self._conn.cursor()
        try:
            for statement in _SCHEMA:
                cursor.execute(statement)
            self._conn.commit()
        finally:
            cursor.close()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 -- a broken connection may fail to close; it is gone either way
                pass

    def close(self) -> None:
        """Release the connection; later calls raise `StoreUnavailable`.  Idempotent."""
        with self._lock:
            self._closed = True
            self._drop()

    # -- operations --------------------------------------------------------------------------------------------

    def put(self, offer: Offer) -> bool:
        """Store `offer` unless an offer with its id exists; whether it was new."""

        def work(execute):
            return execute(
                f"INSERT INTO offers ({_OFFER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING",
                offer.id, offer.msisdn, offer.rule, offer.channel, offer.template,
                json.dumps(offer.params, ensure_ascii=False, sort_keys=True), offer.priority, offer.created,
                offer.not_before, offer.expires_at, offer.status, offer.claimed_by, offer.claimed_until,
                offer.response_id,
            ).rowcount == 1

        return self._transaction(work)

    def get(self, offer_id: str) -> Offer | None:
        def work(execute):
            row = execute(f"SELECT {_OFFER_COLUMNS} FROM offers WHERE id = ?", offer_id).fetchone()
            return None if row is None else Offer._from_row(row)

        return self._transaction(work)

    def pending(self, msisdn: int, channel: str, now: int, *, agent: str | None = None,
                limit: int = 100) -> list[Offer]:
        """Open offers for `msisdn` from `channel` that may be presented at `now`, highest priority first.

        Offers claimed by an agent are left out while the claim lasts, except to that `agent`.
        """

        def work(execute):
            rows = execute(
                f"SELECT {_OFFER_COLUMNS} FROM offers WHERE msisdn = ? AND {_OPEN} AND channel = ? "
                f"AND not_before <= ? AND expires_at > ? AND {_FREE} "
                "ORDER BY priority DESC, not_before, id LIMIT ?",
                msisdn, channel, now, now, now, agent, limit,
            ).fetchall()
            return [Offer._from_row(row) for row in rows]

        return self._transaction(work)

    def claim(self, offer_id: str, msisdn: int, channel: str, agent: str, now: int, lease_ms: int) -> Answer:
        """Give `agent` the offer for `lease_ms` (or extend its claim): ok, unknown, expired, closed or held."""

        def work(execute):
            changed = execute(
                "UPDATE offers SET status = 'claimed', claimed_by = ?, claimed_until = ? "
                f"WHERE id = ? AND msisdn = ? AND channel = ? AND {_OPEN} AND not_before <= ? AND expires_at > ? "
                f"AND {_FREE}",
                agent, now + lease_ms, offer_id, msisdn, channel, now, now, now, agent,
            ).rowcount
            if changed == 1:
                return Answer("ok", self._offer(execute, offer_id))
            return _Rollback(self._why_not(execute, offer_id, msisdn, channel, now))

        return self._transaction(work)

    def record_outcome(self, offer_id: str, msisdn: int, channel: str, response_id: str, outcome: str,
                       now: int, *, agent: str | None = None) -> Answer:
        """Record a response: ok (new: report it, then `mark_reported`), repeat, unknown, expired, closed,
        held or conflict.  An outcome releases any claim."""
        if outcome not in RESPONSE_OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(RESPONSE_OUTCOMES)}, not {outcome!r}")

        def work(execute):
            if self._offer(execute, offer_id, msisdn, channel) is None:
                return _Rollback(self._repeat_or(execute, response_id, offer_id, outcome, Answer("unknown")))
            added = execute(
                "INSERT INTO responses (id, offer_id, outcome, agent, ts) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING",
                response_id, offer_id, outcome, agent, now,
            ).rowcount
            if added != 1:
                return _Rollback(self._repeat_or(execute, response_id, offer_id, outcome, None))
            changed = execute(
                "UPDATE offers SET status = ?, response_id = ?, claimed_by = NULL, claimed_until = NULL "
                f"WHERE id = ? AND {_OPEN} AND expires_at > ? AND {_FREE}",
                outcome, response_id, offer_id, now, now, agent,
            ).rowcount
            if changed == 1:
                return Answer("ok", self._offer(execute, offer_id))
            return _Rollback(self._why_not(execute, offer_id, msisdn, channel, now))

        return self._transaction(work)

    def mark_reported(self, response_id: str) -> None:
        """The response's outcome has been handed to feedback."""
        self._transaction(lambda execute: execute("UPDATE responses SET reported = 1 WHERE id = ?", response_id))

    def unreported(self, channel: str, *, before: int | None = None) -> list[tuple[str, str, int, str]]:
        """(offer id, outcome, ts, response id) of responses to `channel`'s offers recorded (before `before`)
        and not yet marked reported, oldest first."""

        def work(execute):
            return [tuple(row) for row in execute(
                "SELECT r.offer_id, r.outcome, r.ts, r.id FROM responses r JOIN offers o ON o.id = r.offer_id "
                "WHERE r.reported = 0 AND o.channel = ? AND r.ts < ? ORDER BY r.ts, r.id",
                channel, (1 << 62) if before is None else before,
            ).fetchall()]

        return self._transaction(work)

    def expire(self, now: int) -> int:
        """Mark open offers whose time is up as expired; how many."""
        return self._transaction(lambda execute: execute(
            f"UPDATE offers SET status = 'expired', claimed_by = NULL, claimed_until = NULL "
            f"WHERE {_OPEN} AND expires_at <= ?",
            now,
        ).rowcount)

    def forget(self, msisdns: list[int]) -> int:
        """Delete every offer of these subscribers and its responses (erasure); how many offers."""

        def work(execute):
            removed = 0
            for msisdn in msisdns:
                execute("DELETE FROM responses WHERE offer_id IN (SELECT id FROM offers WHERE msisdn = ?)", int(msisdn))
                removed += execute("DELETE FROM offers WHERE msisdn = ?", int(msisdn)).rowcount
                # Another subscriber's offer may carry the number as a param (the peer of a call): blanked.
                text = str(int(msisdn))
                for offer_id, params in execute("SELECT id, params FROM offers WHERE params LIKE ?",
                                                f'%"{text}"%').fetchall():
                    values = {k: ("" if v == text else v) for k, v in json.loads(params).items()}
                    execute("UPDATE offers SET params = ? WHERE id = ?", json.dumps(values), offer_id)
            return removed

        removed = self._transaction(work)
        if self.kind == "sqlite":
            # Deleted rows stay in free pages (and the WAL) until these run.
            with self._lock:
                if self._conn is not None:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    self._conn.execute("VACUUM")
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed

    def count(self, channel: str | None = None) -> int:
        """How many offers are stored (all channels when `channel` is None)."""

        def work(execute):
            if channel is None:
                return execute("SELECT COUNT(*) FROM offers").fetchone()[0]
            return execute("SELECT COUNT(*) FROM offers WHERE channel = ?", channel).fetchone()[0]

        return self._transaction(work)

    # -- inside a transaction ----------------------------------------------------------------------------------

    @staticmethod
    def _offer(execute, offer_id: str, msisdn: int | None = None, channel: str | None = None) -> Offer | None:
        row = execute(f"SELECT {_OFFER_COLUMNS} FROM offers WHERE id = ?", offer_id).fetchone()
        if row is None:
            return None
        offer = Offer._from_row(row)
        if msisdn is not None and (offer.msisdn != msisdn or offer.channel != channel):
            return None
        return offer

    def _why_not(self, execute, offer_id: str, msisdn: int, channel: str, now: int) -> Answer:
        """Why a claim or an outcome could not change the offer."""
        offer = self._offer(execute, offer_id, msisdn, channel)
        if offer is None or offer.not_before > now:
            return Answer("unknown")
        if offer.status in ("accepted", "declined"):
            return Answer("closed", offer)
        if offer.status == "expired" or offer.expires_at <= now:
            return Answer("expired", offer)
        return Answer("held", offer, {"claimed_by": offer.claimed_by, "claimed_until": offer.claimed_until})

    def _repeat_or(self, execute, response_id: str, offer_id: str, outcome: str, otherwise: Answer | None) -> Answer:
        """`repeat` when `response_id` was recorded for the same offer and outcome, else `otherwise`
        (`conflict` when None or when the response id was recorded for something else)."""
        row = execute("SELECT offer_id, outcome FROM responses WHERE id = ?", response_id).fetchone()
        if row is None:
            return otherwise if otherwise is not None else Answer("conflict")
        if tuple(row) == (offer_id, outcome):
            return Answer("repeat", self._offer(execute, offer_id))
        return Answer("conflict", None, {"offer_id": row[0], "outcome": row[1]})


@dataclass(frozen=True)
class _Rollback:
    """A transaction's answer that changes nothing: roll back, then return `value`."""

    value: Any
