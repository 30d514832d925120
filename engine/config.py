"""The daemon's configuration file, `kairos.toml` (SPEC section 7).

One file names everything `kairos run` needs: the rules, the state
directory, the inputs (ZeroMQ feeds), the outputs, batching, metrics and the
dead-letter directory.  `docs/daemon.md` documents every key and
`examples/kairos.toml` is an annotated example.  Relative paths are relative
to the directory of the config file, so a config and its rules travel
together.

Parsing only: nothing here opens a socket or a file other than the config
itself.  Every error names the file, the key and the reason, and unknown keys
are errors (a misspelt key must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from engine.exposure import is_loopback_endpoint
from engine.journal import parse_fsync
from engine.rules import parse_duration

FORMATS = ("arrow", "msgpack", "ndjson")
SEQUENCE_MODES = ("count", "exact")
SOCKET_TYPES = ("pull", "sub")
ROLES = ("events", "feedback")
LOG_LEVELS = ("debug", "info", "warning", "error")
UNCONFIGURED_CHANNELS = ("refuse", "warn")  # a rule naming a channel with no [channels.NAME] (docs/daemon.md)
# Keys that hold secrets, in [metrics] and in every [channels.NAME] table (plug-ins' included): each may be given
# as itself, as KEY_env (an environment variable's name) or as KEY_file (a file's path); read_secret resolves them.
SECRET_KEYS = ("password", "token", "dsn")

# Frames ZeroMQ accepts before cutting the sender off, as a multiple of max_message_bytes: messages between the
# two limits reach Kairos, so that they can be dead-lettered rather than vanish with the connection.
HARD_LIMIT_FACTOR = 2
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
DEFAULT_INGEST_MEMORY = 256 << 20
_SIZE_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


class ConfigError(ValueError):
    """A config file that cannot be used: names the file, the key and the reason."""

    def __init__(self, source: str, key: str | None, reason: str):
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")


class Secret(str):
    """A secret read from the config (a password, a token, a DSN).

    A `str` like any other, except that its repr never shows it: an error or a log line that formats one with
    !r, and the repr of a config holding one, say '<secret>'.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<secret>'"


def read_secret(source: str, prefix: str, table: dict, name: str, base: Path,
                warnings: list | None = None) -> tuple[Secret | None, list[str]]:
    """The secret under key `name` of `table`, and the keys it came from (to mark them read).

    The secret is given as `name` itself, as `name_env` (the name of an environment variable holding it) or as
    `name_file` (the path of a file holding it, relative to the config file; a trailing newline is not part of
    it), exactly one of them.  A variable that is not set, a file that cannot be read and an empty secret are
    refused, naming the file and the key; no error says what the secret is.  A file that the group or others may
    read is used, and a warning about it is added to `warnings`.
    """
    given = [key for key in (name, f"{name}_env", f"{name}_file") if key in table]
    if not given:
        return None, []
    if len(given) > 1:
        raise ConfigError(source, f"{prefix}.{given[1]}",
                          f"give one of {name}, {name}_env and {name}_file, not {' and '.join(given)}")
    (key,) = given
    value = table[key]
    if key == name:
        if not isinstance(value, str):
            raise ConfigError(source, f"{prefix}.{key}", f"expected a string, got {type(value).__name__}")
        return Secret(value), given
    if not isinstance(value, str) or not value:
        what = "the name of an environment variable" if key.endswith("_env") else "the path of a file"
        raise ConfigError(source, f"{prefix}.{key}", f"expected {what} holding {name}, got {value!r}")
    if key.endswith("_env"):
        secret = os.environ.get(value)
        if secret is None:
            raise ConfigError(source, f"{prefix}.{key}", f"environment variable {value} is not set")
        if not secret:
            raise ConfigError(source, f"{prefix}.{key}", f"environment variable {value} is empty")
        return Secret(secret), given
    path = (base / value).resolve()
    try:
        mode = path.stat().st_mode
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(source, f"{prefix}.{key}", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, f"{prefix}.{key}", f"{path} is not UTF-8 text") from None
    if not secret:
        raise ConfigError(source, f"{prefix}.{key}", f"{path} is empty")
    if mode & (stat.S_IRGRP | stat.S_IROTH) and warnings is not None:
        warnings.append(("secret file readable by others", {
            "config": source, "key": f"{prefix}.{key}", "path": str(path), "mode": f"{stat.S_IMODE(mode):04o}",
            "fix": f"chmod 600 {path}"}))
    return Secret(secret), given


@dataclass(frozen=True)
class InputConfig:
    """One ZeroMQ feed: where it listens, what it carries and how it is decoded."""

    name: str
    endpoint: str  # ZeroMQ endpoint, e.g. "tcp://127.0.0.1:5555" or "ipc:///run/kairos/switch"
    socket: str = "pull"  # "pull": lossless, the sender blocks at the high-water mark; "sub": drops when full
    bind: bool = True  # bind the endpoint (feeders connect) or connect to a feeder that binds
    format: str = "arrow"  # wire format: arrow | msgpack | ndjson
    role: str = "events"  # "events" for switch and signalling feeds, "feedback" for channel outcomes
    rcvhwm: int = 1000  # messages queued in the socket before backpressure (pull) or drops (sub)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # larger ones are dead-lettered, over twice this refused
    subscribe: tuple[str, ...] = ("",)  # sub only: topic prefixes; "" is everything
    columns: tuple[str, ...] | None = None  # msgpack arrays of arrays: the field order (default SPEC order)
    fields: dict = field(default_factory=dict)  # field map (rename, scale, constant, value map)
    allow_remote: bool = False  # a non-loopback endpoint must be allowed explicitly (SPEC section 9)
    # Sequence headers: "count" accepts every message and counts gaps and regressions; "exact" takes each
    # sender's messages once and in order (duplicates and messages past a gap are dropped: the sender resends).
    sequence: str = "count"


@dataclass(frozen=True)
class ChannelConfig:
    """One `[channels.NAME]` table: the channel type, how the outbox delivers to it, its own options.

    The channel's own options are checked by the channel class when the daemon makes it
    (`adapters.channels.make_channel`); here only the keys every channel shares.
    """

    name: str
    type: str  # an entry point name in the `kairos.channels` group (docs/channels.md)
    options: dict = field(default_factory=dict)  # the rest of the table, for the channel's from_config
    concurrency: int = 4  # deliveries in progress at once
    rate: float | None = None  # messages per second (a token bucket); None: unlimited
    burst: int = 1  # messages that may go at once after a quiet spell
    max_attempts: int = 0  # attempts before an instruction is parked; 0: no limit, max_age alone ends retries
    backoff_initial_ms: int = 1_000  # cap of the first retry's random wait (full jitter)
    backoff_max_ms: int = 300_000  # cap of every retry's random wait
    max_age_ms: int = 86_400_000  # an instruction is valid until its not_before plus this; then parked expired


@dataclass(frozen=True)
class JournalConfig:
    """`[journal]`: the input journal (engine/journal.py); on whenever `state_dir` is set, unless disabled."""

    enabled: bool = True
    path: Path | None = None  # default: state_dir/journal
    fsync: str = "batch"  # "batch", an interval such as "100ms", or "off"
    segment_bytes: int = 64 << 20
    retain_ms: int = 0  # keep segments a checkpoint covers this long (audit); 0: delete them at once


@dataclass(frozen=True)
class CheckpointConfig:
    """`[checkpoint]`: when the daemon checkpoints (besides SIGTERM, POST /control/checkpoint and reloads)."""

    every_ms: int = 60_000  # 0: not on a timer
    every_events: int = 0  # 0: not by event count
    keep: int = 2  # checkpoints kept: a damaged newest one falls back to the one before


@dataclass(frozen=True)
class IngestPlan:
    """How `[ingest] memory` bounds what the feeds hold (docs/daemon.md, "Loss and backpressure").

    Every message is counted at the most ZeroMQ lets in, HARD_LIMIT_FACTOR x
    max_message_bytes (its input's "hard limit").  The daemon keeps room for
    twice the largest hard limit: it takes messages from the feeds while those
    it holds unprocessed are under `hold_bytes` (one hard limit), so the last
    one taken leaves it under twice that.  Each input is given room for one
    queued message and the one ZeroMQ is reading (two hard limits), and what
    is left is split equally between the inputs; an input's rcvhwm is its
    share in hard limits less the one being read, never more than configured.
    """

    memory: int
    hold_bytes: int  # the daemon takes messages while those it holds unprocessed are fewer bytes than this
    shares: dict[str, int]  # input -> bytes for its ZeroMQ queue and the message ZeroMQ is reading into it
    rcvhwm: dict[str, int]  # input -> the RCVHWM that keeps its queue within its share (one peer)
    hard_limits: dict[str, int]  # input -> the largest message ZeroMQ lets in


def plan_ingest(memory: int, inputs: tuple[InputConfig, ...]) -> IngestPlan:
    """The shares and rcvhwm that keep the inputs within `memory`; ValueError when even one message cannot fit."""
    hard = {i.name: HARD_LIMIT_FACTOR * i.max_message_bytes for i in inputs}
    largest = max(hard.values(), default=0)
    least = 2 * largest + sum(2 * h for h in hard.values())
    if memory < least:
        raise ValueError(
            f"{format_size(memory)} cannot hold one message per input: at least {format_size(least)} "
            f"({least} bytes) is needed: room for two messages of {HARD_LIMIT_FACTOR} x max_message_bytes per "
            "input (one queued, one being read) and two of the largest for what the daemon holds unprocessed; "
            "raise it or lower max_message_bytes")
    extra = (memory - least) // max(len(hard), 1)
    shares = {name: 2 * h + extra for name, h in hard.items()}
    rcvhwm = {i.name: max(1, min(i.rcvhwm, shares[i.name] // hard[i.name] - 1)) for i in inputs}
    return IngestPlan(memory, largest, shares, rcvhwm, hard)


def parse_size(value: int | str) -> int:
    """Bytes from an integer or a string such as "256MiB" (KiB, MiB, GiB); ValueError for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*(KiB|MiB|GiB)\s*", value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a size: an integer of bytes, or a string such as \"256MiB\" "
                         "(units KiB, MiB, GiB)")
    return int(match[1]) * _SIZE_UNITS[match[2]]


def format_size(n: int) -> str:
    """`n` bytes for a person: in GiB, MiB or KiB, with at most one decimal."""
    for unit in ("GiB", "MiB", "KiB"):
        if n >= _SIZE_UNITS[unit]:
            return f"{n / _SIZE_UNITS[unit]:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


@dataclass(frozen=True)
class DaemonConfig:
    """Everything `kairos run` needs, with defaults filled in and paths made absolute."""

    source: str
    rules: Path
    inputs: tuple[InputConfig, ...]
    outputs: dict[str, dict]  # name -> the [outputs.NAME] table, "type" included
    profiles: Path | None = None
    state_dir: Path | None = None  # checkpoint written on shutdown and restored at start
    timezone: str | None = None  # overrides the rules file's [policy] timezone when set
    initial_subscribers: int = 1 << 20
    lateness_ms: int = 0  # how far the absence-timer watermark trails the largest event ts seen
    max_batch_events: int = 65_536  # coalesce messages up to this many events ...
    linger_ms: int = 5  # ... or until the oldest waiting event has waited this long
    idle_advance_ms: int = 1_000  # after this long with no events, event time follows the wall clock
    max_waiting_instructions: int = 1_000_000  # per output; while one has this many waiting, feeds are not read
    metrics_host: str | None = "127.0.0.1"  # None: no HTTP server
    metrics_port: int = 9464
    metrics_token: str | None = field(default=None, repr=False)
    deadletter_dir: Path = Path("deadletter")
    deadletter_rotate_bytes: int = 64 << 20
    deadletter_keep_bytes: int = 1 << 30  # retention: the files together hold at most this (oldest deleted first)
    deadletter_keep_ms: int = 30 * 86_400_000  # retention: files last written longer ago are deleted
    log_level: str = "info"
    channels: dict[str, ChannelConfig] = field(default_factory=dict)  # delivered from the outbox output
    journal: JournalConfig = field(default_factory=JournalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    shutdown_ms: int = 8_000  # SIGTERM: longest the drain waits for outputs that push back (well inside systemd's 90 s)
    ingest_memory: int = DEFAULT_INGEST_MEMORY  # the most the feeds' messages may hold, queued or unprocessed
    # A rule naming a channel no [channels.NAME] configures, while an outbox is: "refuse" the start (or reload),
    # or "warn" and let its instructions wait in the outbox.
    unconfigured_channels: str = "refuse"
    # (message, fields) the daemon logs as warnings at start: things in the config that work but should not be so.
    warnings: tuple[tuple[str, dict], ...] = ()

    @property
    def ingest(self) -> IngestPlan:
        return plan_ingest(self.ingest_memory, self.inputs)

    @property
    def journaled(self) -> bool:
        return self.state_dir is not None and self.journal.enabled

    @property
    def journal_dir(self) -> Path | None:
        if not self.journaled:
            return None
        return self.journal.path if self.journal.path is not None else self.state_dir / "journal"


class _Table:
    """One TOML table being read: tracks which keys were used so leftovers are refused."""

    def __init__(self, source: str, prefix: str, table: object):
        if not isinstance(table, dict):
            raise ConfigError(source, prefix, f"must be a table, not {type(table).__name__}")
        self.source, self.prefix, self.table = source, prefix, table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def get(self, name: str, kind: type | tuple[type, ...], default=None):
        self.used.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        # bool is an int in Python; a flag given where a number belongs is a mistake
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.error(name, f"expected {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise self.error(name, f"expected {_kind_name(kind)}, got {value!r}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise self.error(name, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def positive(self, name: str, default: int) -> int:
        value = self.get(name, int, default)
        if value < 1:
            raise self.error(name, f"must be at least 1, got {value}")
        return value

    def duration_ms(self, name: str, default: int) -> int:
        value = self.get(name, str, None)
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.error(name, str(exc)) from None

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", str: "a string", bool: "true or false", dict: "a table", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _input(source: str, name: str, table: object) -> InputConfig:
    t = _Table(source, f"inputs.{name}", table)
    endpoint = t.get("endpoint", str)
    if endpoint is None:
        raise t.error("endpoint", "required (e.g. \"tcp://127.0.0.1:5555\")")
    allow_remote = t.get("allow_remote", bool, False)
    bind = t.get("bind", bool, True)
    # SPEC section 9 is about listening: connecting out to a feeder elsewhere needs no permission.
    if bind and not allow_remote and not is_loopback_endpoint(endpoint):
        raise t.error("endpoint", f"{endpoint!r} is not a loopback address; set allow_remote = true to listen beyond "
                      "this machine")
    socket = t.choice("socket", SOCKET_TYPES, "pull")
    subscribe = t.get("subscribe", list, [""])
    if socket != "sub" and "subscribe" in t.table:
        raise t.error("subscribe", "only a sub socket subscribes")
    if not all(isinstance(s, str) for s in subscribe):
        raise t.error("subscribe", "must be a list of strings")
    role = t.choice("role", ROLES, "events")
    for key in ("columns", "fields"):
        if role == "feedback" and key in t.table:
            raise t.error(key, "a feedback input carries id, outcome and ts as they are (docs/daemon.md)")
    columns = t.get("columns", list, None)
    if columns is not None and not all(isinstance(c, str) for c in columns):
        raise t.error("columns", "must be a list of field names")
    fields = t.get("fields", dict, {})
    config = InputConfig(
        name=name,
        endpoint=endpoint,
        socket=socket,
        bind=bind,
        format=t.choice("format", FORMATS, "arrow"),
        role=role,
        rcvhwm=t.positive("rcvhwm", 1000),
        max_message_bytes=t.positive("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
        subscribe=tuple(subscribe),
        columns=tuple(columns) if columns is not None else None,
        fields=fields,
        allow_remote=allow_remote,
        sequence=t.choice("sequence", SEQUENCE_MODES, "count"),
    )
    t.done()
    return config


# Channel options that name files: relative to the config file, like every path in it.
_CHANNEL_PATH_KEYS = ("path", "messages_path")


def _channel(source: str, name: str, table: object, base: Path, warnings: list | None = None) -> ChannelConfig:
    t = _Table(source, f"channels.{name}", table)
    kind = t.get("type", str)
    if not kind:
        raise t.error("type", "required: the channel type (sms, file, stdout, or a plug-in's name; docs/channels.md)")
    rate = t.get("rate", (int, float), None)
    if rate is not None and not 0 < rate < float("inf"):
        raise t.error("rate", f"must be a positive number of messages per second, got {rate}")
    config = ChannelConfig(
        name=name,
        type=kind,
        concurrency=t.positive("concurrency", 4),
        rate=None if rate is None else float(rate),
        burst=t.positive("burst", 1),
        max_attempts=t.get("max_attempts", int, 0),
        backoff_initial_ms=t.duration_ms("backoff_initial", 1_000),
        backoff_max_ms=t.duration_ms("backoff_max", 300_000),
        max_age_ms=t.duration_ms("max_age", 86_400_000),
    )
    if config.max_attempts < 0:
        raise t.error("max_attempts", f"must be 0 (no limit) or more, got {config.max_attempts}")
    if config.backoff_initial_ms < 1 or config.backoff_max_ms < config.backoff_initial_ms:
        raise t.error("backoff_max", "must be at least backoff_initial, and both longer than 0ms")
    if config.max_age_ms < 1:
        raise t.error("max_age", "must be longer than 0ms: an instruction that is never valid is never sent")
    options = {key: value for key, value in t.table.items() if key not in t.used}
    for key in SECRET_KEYS:  # the channel sees KEY however it was given
        secret, given = read_secret(source, t.prefix, options, key, base, warnings)
        for form in given:
            del options[form]
        if secret is not None:
            options[key] = secret
    for key in _CHANNEL_PATH_KEYS:
        if isinstance(options.get(key), str) and options[key]:
            options[key] = str((base / options[key]).resolve())  # relative to the config file
    return dataclasses.replace(config, options=options)


def _listen(t: _Table, default: str) -> tuple[str | None, int]:
    listen = t.get("listen", str, default)
    if listen == "":
        return None, 0
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise t.error("listen", f"{listen!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_config(text: str, source: str = "<string>", base: Path | None = None) -> DaemonConfig:
    """A DaemonConfig from TOML text; relative paths resolve against `base` (default: cwd)."""
    base = Path.cwd() if base is None else base
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, None, f"not valid TOML: {exc}") from None
    top = _Table(source, "", doc)

    def path(t: _Table, name: str, default: str | None) -> Path | None:
        value = t.get(name, str, default)
        if value is None:
            return None
        if not value:
            raise t.error(name, "must not be empty")
        return (base / value).resolve()

    eng = _Table(source, "engine", top.get("engine", dict, {}))
    rules = path(eng, "rules", None)
    if rules is None:
        raise eng.error("rules", "required: the rules file (TOML, docs/rules.md)")
    profiles = path(eng, "profiles", None)
    state_dir = path(eng, "state_dir", None)
    timezone = eng.get("timezone", str, None)
    initial_subscribers = eng.positive("initial_subscribers", 1 << 20)
    lateness_ms = eng.duration_ms("lateness", 0)
    eng_shutdown_ms = eng.duration_ms("shutdown_timeout", 8_000)
    unconfigured_channels = eng.choice("unconfigured_channels", UNCONFIGURED_CHANNELS, "refuse")
    eng.done()
    warnings: list[tuple[str, dict]] = []

    batching = _Table(source, "batching", top.get("batching", dict, {}))
    max_batch_events = batching.positive("max_events", 65_536)
    linger_ms = batching.duration_ms("linger", 5)
    idle_advance_ms = batching.duration_ms("idle_advance", 1_000)
    if idle_advance_ms < 1:
        raise batching.error("idle_advance", "must be longer than 0ms")
    max_waiting_instructions = batching.positive("max_waiting_instructions", 1_000_000)
    batching.done()

    metrics = _Table(source, "metrics", top.get("metrics", dict, {}))
    metrics_host, metrics_port = _listen(metrics, "127.0.0.1:9464")
    metrics_token, given = read_secret(source, "metrics", metrics.table, "token", base, warnings)
    metrics.used.update(given)
    metrics_token = metrics_token or None
    metrics.done()

    deadletter = _Table(source, "deadletter", top.get("deadletter", dict, {}))
    deadletter_dir = path(deadletter, "path", "deadletter")
    deadletter_rotate = deadletter.positive("rotate_bytes", 64 << 20)
    try:
        deadletter_keep_bytes = parse_size(deadletter.get("keep_bytes", (int, str), 1 << 30))
    except ValueError as exc:
        raise deadletter.error("keep_bytes", str(exc)) from None
    if deadletter_keep_bytes < deadletter_rotate:
        raise deadletter.error("keep_bytes", f"{deadletter_keep_bytes} bytes cannot hold one file of rotate_bytes "
                               f"({deadletter_rotate}); raise it or lower rotate_bytes")
    deadletter_keep_ms = deadletter.duration_ms("keep", 30 * 86_400_000)
    if deadletter_keep_ms < 1:
        raise deadletter.error("keep", "must be longer than 0ms")
    deadletter.done()

    journal_table = _Table(source, "journal", top.get("journal", dict, {}))
    fsync = journal_table.get("fsync", str, "batch")
    try:
        parse_fsync(fsync)
    except ValueError as exc:
        raise journal_table.error("fsync", f"{fsync!r}: {exc}; use \"batch\", an interval such as \"100ms\", "
                                  "or \"off\"") from None
    journal = JournalConfig(
        enabled=journal_table.get("enabled", bool, True),
        path=path(journal_table, "path", None),
        fsync=fsync,
        segment_bytes=journal_table.positive("segment_bytes", 64 << 20),
        retain_ms=journal_table.duration_ms("retain", 0),
    )
    journal_table.done()
    if state_dir is None and "journal" in doc and journal.enabled:
        raise ConfigError(source, "journal", "the journal lives beside the checkpoints: set engine.state_dir")

    checkpoint_table = _Table(source, "checkpoint", top.get("checkpoint", dict, {}))
    checkpoint = CheckpointConfig(
        every_ms=checkpoint_table.duration_ms("every", 60_000),
        every_events=checkpoint_table.get("every_events", int, 0),
        keep=checkpoint_table.positive("keep", 2),
    )
    if checkpoint.every_events < 0:
        raise checkpoint_table.error("every_events", "must be 0 (off) or more")
    checkpoint_table.done()
    if state_dir is None and "checkpoint" in doc:
        raise ConfigError(source, "checkpoint", "checkpoints are written to engine.state_dir: set it")
    shutdown_ms = eng_shutdown_ms

    ingest = _Table(source, "ingest", top.get("ingest", dict, {}))
    ingest_memory = ingest.get("memory", (int, str), DEFAULT_INGEST_MEMORY)
    try:
        ingest_memory = parse_size(ingest_memory)
    except ValueError as exc:
        raise ingest.error("memory", str(exc)) from None
    if ingest_memory < 1:
        raise ingest.error("memory", f"must be at least 1 byte, got {ingest_memory}")
    ingest.done()

    log = _Table(source, "log", top.get("log", dict, {}))
    log_level = log.choice("level", LOG_LEVELS, "info")
    log.done()

    inputs_table = _Table(source, "inputs", top.get("inputs", dict, {}))
    inputs = tuple(_input(source, name, inputs_table.get(name, dict)) for name in inputs_table.table)
    if not any(i.role == "events" for i in inputs):
        raise ConfigError(source, "inputs", "at least one input with role = \"events\" is required")
    endpoints = [i.endpoint for i in inputs]
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(source, "inputs", "two inputs share an endpoint")
    try:
        plan_ingest(ingest_memory, inputs)
    except ValueError as exc:
        raise ConfigError(source, "ingest.memory", str(exc)) from None

    outputs_table = _Table(source, "outputs", top.get("outputs", dict, {}))
    outputs = {}
    for name in outputs_table.table:
        table = outputs_table.get(name, dict)
        if not isinstance(table.get("type"), str):
            raise ConfigError(source, f"outputs.{name}.type", "required: the output type (file, zmq, outbox)")
        if isinstance(table.get("path"), str) and table["path"]:
            table = {**table, "path": str((base / table["path"]).resolve())}  # relative to the config file
        outputs[name] = table
    if not outputs:
        raise ConfigError(source, "outputs", "at least one output is required, or instructions go nowhere")

    channels_table = _Table(source, "channels", top.get("channels", dict, {}))
    channels = {name: _channel(source, name, channels_table.get(name, dict), base, warnings)
                for name in channels_table.table}
    outboxes = [name for name, table in outputs.items() if table["type"] == "outbox"]
    if len(outboxes) > 1:
        raise ConfigError(source, f"outputs.{outboxes[1]}", "only one output may be an outbox")
    if channels and not outboxes:
        raise ConfigError(source, "channels", "channels deliver from an outbox: add an output with type = \"outbox\"")
    if outboxes and not channels:
        raise ConfigError(source, f"outputs.{outboxes[0]}",
                          "an outbox with no [channels.NAME] delivers nothing; configure a channel")
    top.done()

    return DaemonConfig(
        source=source,
        rules=rules,
        inputs=inputs,
        outputs=outputs,
        profiles=profiles,
        state_dir=state_dir,
        timezone=timezone,
        initial_subscribers=initial_subscribers,
        lateness_ms=lateness_ms,
        max_batch_events=max_batch_events,
        linger_ms=linger_ms,
        idle_advance_ms=idle_advance_ms,
        max_waiting_instructions=max_waiting_instructions,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        metrics_token=metrics_token,
        deadletter_dir=deadletter_dir,
        deadletter_rotate_bytes=deadletter_rotate,
        deadletter_keep_bytes=deadletter_keep_bytes,
        deadletter_keep_ms=deadletter_keep_ms,
        log_level=log_level,
        channels=channels,
        journal=journal,
        checkpoint=checkpoint,
        shutdown_ms=shutdown_ms,
        ingest_memory=ingest_memory,
        unconfigured_channels=unconfigured_channels,
        warnings=tuple(warnings),
    )


def load_config(path: str | Path) -> DaemonConfig:
    """Read and check a config file; raises ConfigError naming the file and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc.strerror}") from None
    return parse_config(text, str(path), path.resolve().parent)
