"""`kairos outbox` and `kairos deadletters`: an operator's look at, and hand on, what the daemon keeps.

    kairos outbox -c kairos.toml list|retry|purge [--channel C] [--rule R] [--status S] [--reason TEXT]
                                                  [--older-than D] [--newer-than D] [--limit N]
    kairos deadletters -c kairos.toml list|replay|purge [--input NAME] [--reason R] [--older-than D] ...

Both read the daemon's config for where things are (the `type = "outbox"`
output's `path`, `[deadletter] path`) and are safe while the daemon runs
(docs/daemon.md, "Admin commands"):

- the outbox is opened like the daemon's own connections (SQLite WAL, a busy
  timeout), and changed a chunk of rows per transaction (`Outbox.CHUNK`), so
  the daemon's writer and delivery threads wait milliseconds, not the whole
  command;
- a dead-letter file is rewritten or deleted only under its lock, which the
  daemon holds on the file it writes (adapters/deadletter.py): that file is
  left alone.

`deadletters replay` re-encodes each refused record as a message in its
input's wire format, decodes it with the input's decoder as the config now
describes it (a field map fixed since, say), and pushes those that decode
with nothing refused to the input's endpoint over ZeroMQ PUSH, as a feeder
would: the running daemon takes them like any message. Those records leave
the dead-letter files; the others stay.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from engine.rules import format_duration, parse_duration

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

PURGED_BY_DEFAULT = ("delivered", "holdout", "parked")  # finished, or given up: never pending or in-flight
LIST_LIMIT = 50


class AdminError(Exception):
    """What the command says on stderr before it exits with `status`."""

    def __init__(self, message: str, status: int = EXIT_USAGE):
        super().__init__(message)
        self.status = status


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (underscores allowed, as in 1_000)."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _now_ms() -> int:
    return int(time.time() * 1000)


def _n(count: int, noun: str, plural: str | None = None) -> str:
    """ "1 row", "2 rows", "1,000 rows" """
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _table(headers: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()) -> list[str]:
    from engine.cli import _table  # the command line's tables; imported late, as the command line imports this

    return _table(headers, rows, right)


def _config(args: argparse.Namespace):
    from engine.config import load_config

    if getattr(args, "config", None) is None:
        raise AdminError("-c/--config is required: the daemon's configuration (kairos.toml)")
    try:
        return load_config(args.config)
    except ValueError as exc:
        raise AdminError(str(exc)) from None


def _run(command: str, body, args: argparse.Namespace) -> int:
    try:
        return body(args)
    except AdminError as exc:
        print(f"kairos {command} {args.action}: {exc}", file=sys.stderr)
        return exc.status


# ---------------------------------------------------------------------------
# Parsers (engine/cli.py adds them)


def _config_option(parser: argparse.ArgumentParser, default: Any = None) -> None:
    parser.add_argument("-c", "--config", metavar="PATH", default=default,
                        help="the daemon's configuration (kairos.toml)")


def add_outbox_arguments(parser: argparse.ArgumentParser) -> None:
    """`kairos outbox`: its actions and filters."""
    _config_option(parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    helps = {
        "list": "show the matching instructions (a table, or JSON lines with --json)",
        "retry": "put matching parked instructions back to pending, due now, attempts 0",
        "purge": "delete matching delivered, holdout and parked instructions",
    }
    for name, text in helps.items():
        action = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _config_option(action, argparse.SUPPRESS)  # -c before or after the action
        action.add_argument("--channel", help="only this channel")
        action.add_argument("--rule", help="only this rule's instructions")
        action.add_argument("--status", action="append", metavar="STATUS",
                            help="only this status: pending, in-flight, delivered, parked or holdout (repeat for "
                                 "several)")
        action.add_argument("--reason", metavar="TEXT", help="only rows whose reason contains TEXT (any case)")
        action.add_argument("--older-than", type=_duration, metavar="DURATION",
                            help="only rows last changed longer ago than this (e.g. 2h, 7d)")
        action.add_argument("--newer-than", type=_duration, metavar="DURATION",
                            help="only rows last changed within this")
        action.add_argument("--limit", type=positive_int, metavar="N",
                            help="at most N rows, least recently changed first"
                                 + (f" (default {LIST_LIMIT})" if name == "list" else " (default: all)"))
        if name == "list":
            action.add_argument("--json", action="store_true", help="one JSON object per row")
        else:
            action.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
        if name == "purge":
            action.add_argument("--force", action="store_true",
                                help="allow --status pending and --status in-flight: instructions not yet delivered")
    parser.set_defaults(run=lambda args: _run("outbox", run_outbox, args))


def add_deadletters_arguments(parser: argparse.ArgumentParser) -> None:
    """`kairos deadletters`: its actions and filters."""
    _config_option(parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="count dead letters by input and reason (each one with --verbose)",
                                 description="Count the dead letters by input and reason, with the oldest and "
                                 "newest of each; --verbose shows each one, --json prints them as JSON lines.")
    replay = actions.add_parser("replay", help="send the dead letters that now decode back to the daemon",
                                description="Decode each dead letter again with its input's decoder as the config "
                                "now describes it, push those that decode to the input's endpoint (ZeroMQ PUSH; "
                                "the input must be a PULL that binds) and remove them from the dead-letter files. "
                                "Records that still fail stay. Restart the daemon after fixing its config first: "
                                "it decodes with the config it started with.")
    purge = actions.add_parser("purge", help="delete dead-letter files last written longer ago than --older-than",
                               description="Delete the dead-letter files last written longer ago than "
                               "--older-than (every record in them is older); the file the daemon writes stays.")
    for action in (listing, replay):
        _config_option(action, argparse.SUPPRESS)
        action.add_argument("--input", help="only this input's dead letters")
        action.add_argument("--reason", help="only this reason (undecodable, missing_field, bad_value, ...)")
        action.add_argument("--older-than", type=_duration, metavar="DURATION",
                            help="only dead letters written longer ago than this (e.g. 2h, 7d)")
        action.add_argument("--newer-than", type=_duration, metavar="DURATION",
                            help="only dead letters written within this")
    listing.add_argument("--verbose", "-v", action="store_true", help="show each dead letter too")
    listing.add_argument("--json", action="store_true", help="each dead letter as a JSON line, with file and line")
    replay.add_argument("--to", metavar="ENDPOINT",
                        help="push here instead of the --input's endpoint (e.g. when it binds port 0)")
    replay.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="longest to wait for the daemon to take a message (default: %(default)s)")
    replay.add_argument("--dry-run", action="store_true", help="decode and count, send and remove nothing")
    _config_option(purge, argparse.SUPPRESS)
    purge.add_argument("--older-than", type=_duration, metavar="DURATION", required=True,
                       help="delete files last written longer ago than this (e.g. 30d)")
    purge.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    parser.set_defaults(run=lambda args: _run("deadletters", run_deadletters, args))


# ---------------------------------------------------------------------------
# kairos outbox


def outbox_path(config) -> Path:
    """The SQLite file of the config's `type = "outbox"` output."""
    for name, table in config.outputs.items():
        if table["type"] == "outbox":
            if not isinstance(table.get("path"), str) or not table["path"]:
                raise AdminError(f"{config.source}: outputs.{name}.path: required: the outbox's SQLite file")
            return Path(table["path"])
    raise AdminError(f"{config.source}: no output has type = \"outbox\": there is no outbox to look at")


def run_outbox(args: argparse.Namespace) -> int:
    import sqlite3

    from adapters.channels.outbox import Outbox, RowFilter

    config = _config(args)
    path = outbox_path(config)
    now = _now_ms()
    try:
        rows = RowFilter(
            channel=args.channel, rule=args.rule, statuses=tuple(dict.fromkeys(args.status or ())),
            reason=args.reason, updated_before=None if args.older_than is None else now - args.older_than,
            updated_since=None if args.newer_than is None else now - args.newer_than, limit=args.limit,
        )
    except ValueError as exc:  # an unknown --status
        raise AdminError(f"--status: {exc}") from None
    if not path.is_file():
        raise AdminError(f"no outbox at {path}: the daemon makes it at its first start", EXIT_FAILED)
    try:
        outbox = Outbox(path)
    except sqlite3.Error as exc:
        raise AdminError(f"{path}: {exc}", EXIT_FAILED) from None
    try:
        if args.action == "list":
            return _outbox_list(outbox, rows, args)
        if args.action == "retry":
            return _outbox_retry(outbox, rows, args, config, now)
        return _outbox_purge(outbox, rows, args)
    except sqlite3.Error as exc:  # the database locked beyond the busy timeout, a damaged file
        raise AdminError(f"{path}: {exc}", EXIT_FAILED) from None
    finally:
        outbox.close()


def _counts(tally: dict[str, int]) -> str:
    from adapters.channels.outbox import STATUSES

    return ", ".join(f"{status} {tally[status]:,}" for status in STATUSES if tally.get(status))


def _outbox_list(outbox, rows, args: argparse.Namespace) -> int:
    if rows.limit is None:
        rows = replace(rows, limit=LIST_LIMIT)
    found = outbox.find(rows)
    if args.json:
        for row in found:
            sys.stdout.buffer.write(orjson.dumps({**row, "holdout": bool(row["holdout"])}) + b"\n")
        sys.stdout.flush()
        return EXIT_OK
    tally = outbox.tally(rows)
    matching = sum(tally.values())
    table = [[_iso(r["updated_at"]), r["id"], r["channel"], r["rule"], str(r["msisdn"]), r["status"],
              str(r["attempts"]), _iso(r["due_at"]), r["reason"] or ""] for r in found]
    for line in _table(["updated", "id", "channel", "rule", "msisdn", "status", "attempts", "due", "reason"], table,
                       right=frozenset({4, 6})):
        print(line)
    shown = f"{len(found):,} of {_n(matching, 'matching row')}" + (f" ({_counts(tally)})" if matching else "")
    if len(found) < matching:
        shown += f"; the {len(found):,} least recently changed shown (--limit)"
    print(shown)
    return EXIT_OK


def _outbox_retry(outbox, rows, args: argparse.Namespace, config, now: int) -> int:
    others = [s for s in rows.statuses if s != "parked"]
    if others:
        raise AdminError(f"only parked rows are retried; --status {others[0]} is not parked (a pending row is "
                         "delivered when due, a delivered one was accepted by its peer)")
    everything = outbox.tally(replace(rows, statuses=(), limit=None))
    parked = replace(rows, statuses=("parked",))
    # As the delivery worker judges at its claim: a row is valid until its not_before plus its channel's max_age.
    expired_upto = {name: now - channel.max_age_ms for name, channel in config.channels.items()}
    if args.dry_run:
        retried, expired = outbox.retryable(parked, expired_upto)
        print(f"would retry {_n(retried, 'parked row')} (pending, due now, attempts 0); nothing changed (--dry-run)")
    else:
        retried = outbox.retry_parked(parked, expired_upto)
        _, expired = outbox.retryable(parked, expired_upto)
        print(f"retried {_n(retried, 'parked row')}: pending, due now, attempts 0")
    not_parked = {s: n for s, n in everything.items() if s != "parked"}
    if not_parked and not rows.statuses:
        print(f"left {_n(sum(not_parked.values()), 'matching row')} that are not parked ({_counts(not_parked)}): "
              "retry moves parked rows only")
    if expired:
        print(f"left {_n(expired, 'parked row')} past their validity (not_before + their channel's max_age): the "
              "worker would park them again as expired; raise [channels.NAME] max_age to send them late")
    more = everything.get("parked", 0) - expired - retried
    if rows.limit is not None and more > 0:
        print(f"left {_n(more, 'more matching parked row')} (--limit {rows.limit:,})")
    return EXIT_OK


def _outbox_purge(outbox, rows, args: argparse.Namespace) -> int:
    statuses = rows.statuses or PURGED_BY_DEFAULT
    unfinished = [s for s in statuses if s in ("pending", "in-flight")]
    if unfinished and not args.force:
        raise AdminError(f"--status {unfinished[0]}: those are instructions still to be delivered; purge deletes "
                         "them only with --force")
    everything = outbox.tally(replace(rows, statuses=(), limit=None))
    chosen = replace(rows, statuses=statuses)
    if args.dry_run:
        tally = outbox.tally(replace(chosen, limit=None))
        total = sum(tally.values())
        if rows.limit is not None and total > rows.limit:
            print(f"would delete {rows.limit:,} of {_n(total, 'matching row')} ({_counts(tally)}), the least recently "
                  "changed; nothing changed (--dry-run)")
        else:
            print(f"would delete {_n(total, 'row')}" + (f" ({_counts(tally)})" if total else "")
                  + "; nothing changed (--dry-run)")
    else:
        deleted = outbox.delete_rows(chosen)
        total = sum(deleted.values())
        print(f"deleted {_n(total, 'row')}" + (f" ({_counts(deleted)})" if total else ""))
    left = {s: n for s, n in everything.items() if s not in statuses}
    if left and not rows.statuses:
        print(f"left {_n(sum(left.values()), 'matching row')} of other statuses ({_counts(left)})"
              + ("; pending and in-flight rows go only with --status and --force"
                 if {"pending", "in-flight"} & set(left) else ""))
    return EXIT_OK


# ---------------------------------------------------------------------------
# kairos deadletters


def _at_ms(entry: dict, fallback_ms: int) -> int:
    try:
        return int(datetime.fromisoformat(entry["at"]).timestamp() * 1000)
    except (KeyError, TypeError, ValueError):
        return fallback_ms


class _Selection:
    """The dead letters the filters of list and replay mean."""

    def __init__(self, args: argparse.Namespace, now: int):
        self.input = args.input
        self.reason = args.reason
        self.before = None if args.older_than is None else now - args.older_than
        self.since = None if args.newer_than is None else now - args.newer_than

    def __call__(self, entry: dict, at: int) -> bool:
        return ((self.input is None or entry.get("input") == self.input)
                and (self.reason is None or entry.get("reason") == self.reason)
                and (self.before is None or at < self.before) and (self.since is None or at >= self.since))


def _selected(directory: Path, selection: _Selection):
    """(path, line, entry, at ms) for every dead letter the selection means, oldest file first; and the number of
    lines that are not JSON objects."""
    from adapters.deadletter import dead_letter_files, entries

    found, unreadable = [], 0
    for path, stat in dead_letter_files(directory):
        try:
            for number, entry in entries(path):
                if entry is None:
                    unreadable += 1
                    continue
                at = _at_ms(entry, stat.st_mtime_ns // 1_000_000)
                if selection(entry, at):
                    found.append((path, number, entry, at))
        except FileNotFoundError:  # deleted meanwhile (retention, another purge)
            continue
    return found, unreadable


def run_deadletters(args: argparse.Namespace) -> int:
    config = _config(args)
    directory = config.deadletter_dir
    if args.action == "list":
        return _deadletters_list(directory, args)
    if args.action == "replay":
        return _deadletters_replay(directory, config, args)
    return _deadletters_purge(directory, args)


def _deadletters_list(directory: Path, args: argparse.Namespace) -> int:
    from adapters.deadletter import dead_letter_files
    from engine.config import format_size

    found, unreadable = _selected(directory, _Selection(args, _now_ms()))
    if args.json:
        for path, number, entry, _ in found:
            sys.stdout.buffer.write(orjson.dumps({"file": str(path), "line": number, **entry}) + b"\n")
        sys.stdout.flush()
        return EXIT_OK
    files = dead_letter_files(directory)
    print(f"{directory}: {_n(len(files), 'dead-letter file')}, {format_size(sum(s.st_size for _, s in files))}")
    groups: dict[tuple[str, str], list[int]] = {}
    for _, _, entry, at in found:
        group = groups.setdefault((str(entry.get("input")), str(entry.get("reason"))), [0, at, at])
        group[0] += 1
        group[1], group[2] = min(group[1], at), max(group[2], at)
    if not groups:
        print("no dead letters" + (" match" if any(vars(args).get(k) is not None for k in (
            "input", "reason", "older_than", "newer_than")) else ""))
    else:
        rows = [[name, reason, f"{n:,}", _iso(first), _iso(last)]
                for (name, reason), (n, first, last) in sorted(groups.items())]
        for line in _table(["input", "reason", "count", "oldest", "newest"], rows, right=frozenset({2})):
            print(line)
    if unreadable:
        print(f"({unreadable:,} lines are not JSON objects)")
    if args.verbose and found:
        print()
        rows = [[_iso(at), str(entry.get("input")), str(entry.get("reason")),
                 "-" if entry.get("row") is None else str(entry["row"]), f"{path.name}:{number}",
                 _shorten(str(entry.get("detail", "")), 120)] for path, number, entry, at in found]
        for line in _table(["at", "input", "reason", "row", "where", "detail"], rows):
            print(line)
    return EXIT_OK


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _push_endpoint(endpoint: str) -> str:
    """Where a feeder connects to reach an input that binds `endpoint`."""
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return endpoint
    host, _, port = rest.rpartition(":")
    if port == "0":
        raise AdminError(f"{endpoint} binds a port chosen at start: give the daemon's with --to")
    host = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host, host)
    return f"tcp://{host}:{port}"


def _deadletters_replay(directory: Path, config, args: argparse.Namespace) -> int:
    from adapters.deadletter import as_message, locked, remove_lines
    from adapters.wire import FieldMap, make_decoder

    if args.to is not None and args.input is None:
        raise AdminError("--to is one input's endpoint: name the input with --input")
    inputs = {i.name: i for i in config.inputs if i.role == "events"}
    decoders = {}
    for name, i in inputs.items():  # as the daemon makes them
        try:
            decoders[name] = make_decoder(i.format, FieldMap.from_config(i.fields) if i.fields else None,
                                          columns=list(i.columns) if i.columns else None,
                                          max_message_bytes=i.max_message_bytes)
        except ValueError as exc:
            raise AdminError(f"{config.source}: inputs.{name}: {exc}") from None
    found, _ = _selected(directory, _Selection(args, _now_ms()))
    left: dict[str, int] = {}  # why -> dead letters that stay

    def stays(why: str) -> None:
        left[why] = left.get(why, 0) + 1

    ready: dict[Path, list[tuple[int, str, bytes, int]]] = {}  # file -> (line, input, message, events)
    for path, number, entry, _ in found:
        name = entry.get("input")
        if name not in inputs:
            role = next((i.role for i in config.inputs if i.name == name), None)
            stays(f"input {name!r} carries feedback: replay sends events" if role == "feedback" else
                  f"no events input {name!r} in {config.source}")
            continue
        message, why = as_message(entry, inputs[name].format)
        if message is None:
            stays(why)
            continue
        decoded = decoders[name].decode(message)
        if decoded.rejects or not decoded.n:
            reason = decoded.rejects[0].reason if decoded.rejects else "no rows"
            stays(f"still refused by the decoder of input {name!r}: {reason}")
            continue
        ready.setdefault(path, []).append((number, name, message, decoded.n))
    endpoints = {}
    for name in sorted({name for records in ready.values() for _, name, _, _ in records}):
        i = inputs[name]
        if args.to is not None:
            endpoints[name] = args.to
        elif i.socket != "pull" or not i.bind:
            endpoints[name] = None
        else:
            endpoints[name] = _push_endpoint(i.endpoint)
    with ExitStack() as stack:
        sendable: dict[Path, list[tuple[int, str, bytes, int]]] = {}
        for path, records in ready.items():
            kept = []
            for record in records:
                if endpoints[record[1]] is None:
                    socket = inputs[record[1]].socket
                    stays(f"input {record[1]!r} is not a PULL socket that binds ({socket}, "
                          f"{'binds' if inputs[record[1]].bind else 'connects'}): nothing to push to")
                else:
                    kept.append(record)
            if not kept:
                continue
            if not stack.enter_context(locked(path)):
                for _ in kept:
                    stays(f"in {path.name}, the file the daemon writes now: replay it once the file has rotated "
                          "or the daemon has restarted")
                continue
            sendable[path] = kept
        records = [(path, record) for path, kept in sendable.items() for record in kept]
        if args.dry_run:
            _say_replayed(records, endpoints, "would send")
            _say_left(left)
            return EXIT_OK
        sent, failure = _push(records, endpoints, args.timeout)
        done: dict[Path, set[int]] = {}
        for path, (number, *_rest) in records[:sent]:
            done.setdefault(path, set()).add(number)
        for path, numbers in done.items():
            remove_lines(path, numbers)
    _say_replayed(records[:sent], endpoints, "sent")
    if failure:
        left[f"not sent: {failure}"] = len(records) - sent
    _say_left(left)
    return EXIT_FAILED if failure else EXIT_OK


def _push(records, endpoints: dict[str, str | None], timeout: float) -> tuple[int, str | None]:
    """Push each record's message to its input's endpoint, in order; returns how many were handed to the daemon
    and, when one was not, why.  Returns once ZeroMQ has passed them on (or `timeout` has gone by)."""
    import zmq

    context = zmq.Context()
    sockets = {}
    sent, failure = 0, None
    try:
        for name, endpoint in endpoints.items():
            if endpoint is None:
                continue
            socket = context.socket(zmq.PUSH)
            socket.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a daemon connected: none there, the send waits
            socket.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
            socket.setsockopt(zmq.LINGER, int(timeout * 1000))  # what is queued at close still goes, up to this
            if endpoint.startswith("tcp://["):
                socket.setsockopt(zmq.IPV6, 1)
            try:
                socket.connect(endpoint)
            except zmq.ZMQError as exc:
                socket.close(0)
                raise AdminError(f"input {name!r}: cannot connect to {endpoint}: {exc}") from None
            sockets[name] = socket
        for _, (_, name, message, _) in records:
            try:
                sockets[name].send(message, copy=False)
            except zmq.Again:
                failure = f"no daemon took a message at {endpoints[name]} within {timeout:g} s"
                break
            sent += 1
    finally:
        for socket in sockets.values():
            socket.close()
        context.term()  # waits for the queued messages to leave (LINGER)
    return sent, failure


def _say_replayed(records, endpoints: dict[str, str | None], verb: str) -> None:
    per_input: dict[str, list[int]] = {}
    for _, (_, name, _, events) in records:
        counts = per_input.setdefault(name, [0, 0])
        counts[0] += 1
        counts[1] += events
    if not per_input:
        print(f"{verb} nothing: no dead letter decodes now and can be pushed")
    for name, (n, events) in sorted(per_input.items()):
        removed = "; removed from the dead-letter files" if verb == "sent" else ""
        print(f"{verb} {_n(n, 'dead letter')} ({_n(events, 'event')}) to input {name!r} at {endpoints[name]}{removed}")


def _say_left(left: dict[str, int]) -> None:
    for why, n in sorted(left.items(), key=lambda item: -item[1]):
        print(f"left {n:,}: {why}")


def _deadletters_purge(directory: Path, args: argparse.Namespace) -> int:
    from adapters.deadletter import dead_letter_files, locked
    from engine.config import format_size

    cutoff_ns = (_now_ms() - args.older_than) * 1_000_000
    deleted, freed, busy, kept = 0, 0, 0, 0
    for path, stat in dead_letter_files(directory):
        if stat.st_mtime_ns >= cutoff_ns:
            kept += 1
            continue
        if args.dry_run:
            deleted += 1
            freed += stat.st_size
            continue
        with locked(path) as ours:
            if not ours:
                busy += 1
                continue
            path.unlink()
        deleted += 1
        freed += stat.st_size
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {_n(deleted, 'dead-letter file')} ({format_size(freed)}) last written over "
          f"{format_duration(args.older_than)} ago; {kept:,} newer kept"
          + (f"; {busy:,} being written, kept" if busy else "") + (" (--dry-run)" if args.dry_run else ""))
    return EXIT_OK
