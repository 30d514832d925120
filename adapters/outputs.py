"""Where instructions go when they leave the engine: the `Output` interface, files and ZeroMQ.

An output takes tables of instructions (`engine.schema.INSTRUCTION_SCHEMA`,
SPEC section 5) from the daemon, one table per call to `send`.  Channel
adapters (SMS, MMS, portal, CRM) implement the same interface; the two built
here serve tests, demos and downstream systems that read files or a socket.

Contract of every output:

- `send(table)` takes the whole table or nothing.  It never blocks for long;
  an output that cannot take more now raises `Backpressure`, having taken
  none of the table, and the caller decides whether to retry, spool or drop.
- `flush()` makes everything sent so far durable or visible (what that means
  is the output's to say); `close()` flushes and releases, and may be called
  more than once.
- Outputs are driven by one thread; they are not thread-safe.
- `from_config(name, options)` builds an output from its TOML table
  (`[outputs.NAME]` without its `type`) and refuses unknown keys and bad
  values with a `ValueError` naming the output and the key.

Both built-in outputs write instructions in one of two formats:

- ``arrow``: an Arrow IPC stream (schema, record batches, end-of-stream
  marker), the columnar form the engine produced, read with
  `pyarrow.ipc.open_stream`.
- ``jsonl``: one JSON object per instruction and line, the fields of SPEC
  section 5 with `params` as an object of strings.  The text is built column
  by column with Arrow compute functions, not row by row.
"""

from __future__ import annotations

import abc
import io
import logging
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zmq

from engine.exposure import is_loopback_endpoint
from engine.schema import INSTRUCTION_SCHEMA

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("arrow", "jsonl")


class Backpressure(Exception):
    """An output cannot take more instructions now; none of the table was taken.

    `retry_after` is the output's guess, in seconds, of when trying again may
    succeed.
    """

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class Output(abc.ABC):
    """A destination for instruction tables.  See the module docstring for the contract."""

    # The `type` that selects this class in an `[outputs.NAME]` table.
    kind: ClassVar[str]
    # The config name of this instance, for logs, metrics and errors.
    name: str

    @classmethod
    @abc.abstractmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> Output:
        """An output named `name` from its config table without `type`."""

    @abc.abstractmethod
    def send(self, instructions: pa.Table, position: int | None = None) -> None:
        """Hand off one table of instructions, or raise `Backpressure` having taken none.

        `position` is the journal position (engine/journal.py) of the last
        entry whose instructions the table holds, when the daemon journals:
        an output that remembers how far it got (the outbox) stores it with
        the instructions, so a recovery knows what it already has.
        """

    def flush(self) -> None:  # noqa: B027 -- outputs with nothing buffered need no flush
        """Make everything sent so far durable or visible."""

    def close(self) -> None:  # noqa: B027 -- outputs holding nothing need no close
        """Flush and release everything the output holds; idempotent."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters since the output was made, for metrics."""

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class OutputOptions:
    """Reads an output's config table, naming the output and the key in every error.

    Each accessor removes its key; `finish()` refuses any key left over, so
    that a misspelt option is an error and not a silently used default.
    """

    _REQUIRED: ClassVar[object] = object()

    def __init__(self, output: str, options: dict[str, Any], *, noun: str = "output"):
        self.output = output
        self.noun = noun  # what is being configured: "output", or "channel" for adapters.channels
        self._left = dict(options)

    def error(self, key: str, message: str) -> ValueError:
        return ValueError(f"{self.noun} {self.output!r}: key {key!r} {message}")

    def _take(self, key: str, default: Any) -> Any:
        if key in self._left:
            return self._left.pop(key)
        if default is self._REQUIRED:
            raise self.error(key, "is required")
        return default

    def string(self, key: str, default: Any = _REQUIRED) -> str:
        value = self._take(key, default)
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, not {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _REQUIRED) -> str:
        value = self._take(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value

    def boolean(self, key: str, default: Any = _REQUIRED) -> bool:
        value = self._take(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def integer(self, key: str, default: Any = _REQUIRED, *, minimum: int = 1) -> int:
        value = self._take(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}, not {value!r}")
        return value

    def seconds(self, key: str, default: Any = _REQUIRED) -> float:
        value = self._take(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
            raise self.error(key, f"must be a positive number of seconds, not {value!r}")
        return float(value)

    def number(self, key: str, default: Any = _REQUIRED) -> float:
        value = self._take(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
            raise self.error(key, f"must be a positive number, not {value!r}")
        return float(value)

    def table(self, key: str, default: Any = _REQUIRED) -> dict[str, Any]:
        value = self._take(key, default)
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table, not {value!r}")
        return value

    def finish(self) -> None:
        if self._left:
            keys = ", ".join(map(repr, sorted(self._left)))
            raise ValueError(f"{self.noun} {self.output!r}: unknown key(s) {keys}")


def _check_instructions(table: pa.Table) -> None:
    if not isinstance(table, pa.Table):
        raise TypeError(f"instructions are a pyarrow Table, not {type(table).__name__}")
    if not table.schema.equals(INSTRUCTION_SCHEMA, check_metadata=False):
        raise ValueError(
            f"instructions must have INSTRUCTION_SCHEMA (SPEC section 5);\ngot:\n{table.schema}\n"
            f"expected:\n{INSTRUCTION_SCHEMA}"
        )
    for field, column in zip(table.schema, table.columns, strict=True):
        if column.null_count:
            raise ValueError(f"instructions: column {field.name!r} holds {column.null_count} null(s)")


def arrow_stream(table: pa.Table) -> pa.Buffer:
    """`table` as one complete Arrow IPC stream: schema, batches, end-of-stream marker."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, INSTRUCTION_SCHEMA) as writer:
        writer.write_table(table)
    return sink.getvalue()


_CONTROL_CHARACTERS = re.compile("[\\x00-\\x1f]")
_SHORT_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _json_strings(strings: pa.Array) -> pa.Array:
    """Each string as a JSON string literal (quoted, escaped); nulls stay null.

    Non-ASCII text is kept as UTF-8, as JSON allows.  Escaping a control
    character takes one pass over the column per character, so when any is
    present only the distinct values are escaped: text with newlines is
    templates and the like, which repeat.
    """
    if pc.any(pc.match_substring_regex(strings, _CONTROL_CHARACTERS.pattern)).as_py():
        encoded = pc.dictionary_encode(strings)
        distinct = encoded.dictionary
        distinct = pc.replace_substring(distinct, "\\", "\\\\")
        distinct = pc.replace_substring(distinct, '"', '\\"')
        for code in range(0x20):
            character = chr(code)
            distinct = pc.replace_substring(distinct, character, _SHORT_ESCAPES.get(character, f"\\u{code:04x}"))
        escaped = pc.take(distinct, encoded.indices)
    else:
        escaped = pc.replace_substring(pc.replace_substring(strings, "\\", "\\\\"), '"', '\\"')
    return pc.binary_join_element_wise('"', escaped, '"', "")


def _json_params(params: pa.MapArray) -> pa.Array:
    """Each map as the members of a JSON object, without the braces."""
    # A sliced MapArray keeps its children whole and its offsets unshifted:
    # encode only the entries of the slice, not the whole children each time.
    offsets = params.offsets
    start, end = offsets[0].as_py(), offsets[-1].as_py()
    keys, items = params.keys.slice(start, end - start), params.items.slice(start, end - start)
    members = pc.binary_join_element_wise(_json_strings(keys), pc.fill_null(_json_strings(items), "null"), ":")
    return pc.binary_join(pa.ListArray.from_arrays(pc.subtract(offsets, start), members), ",")


def _string_data(strings: pa.Array) -> memoryview:
    """The concatenated bytes of a string array, without copying."""
    _, offsets, data = strings.buffers()
    bounds = np.frombuffer(offsets, np.int32, len(strings) + 1, strings.offset * 4)
    return memoryview(data)[bounds[0] : bounds[-1]]


def jsonl_chunks(table: pa.Table) -> list[memoryview]:
    """`table` as newline-terminated JSON objects, one per instruction; one buffer per record batch."""
    chunks = []
    for batch in table.to_batches():
        if not batch.num_rows:
            continue
        column = batch.column
        lines = pc.binary_join_element_wise(
            '{"id":', _json_strings(column("id")),
            ',"ts":', pc.cast(column("ts"), pa.string()),
            ',"msisdn":', pc.cast(column("msisdn"), pa.string()),
            ',"rule":', _json_strings(column("rule")),
            ',"channel":', _json_strings(column("channel")),
            ',"template":', _json_strings(column("template")),
            ',"priority":', pc.cast(column("priority"), pa.string()),
            ',"holdout":', pc.if_else(column("holdout"), "true", "false"),
            ',"not_before":', pc.cast(column("not_before"), pa.string()),
            ',"params":{', _json_params(column("params")), "}}\n",
            "",
        )  # fmt: skip
        chunks.append(_string_data(lines))
    return chunks


# ---------------------------------------------------------------------------
# Files


_OUTPUT_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_EXTENSIONS = {"arrow": ".arrows", "jsonl": ".jsonl"}
_FORMAT_OF_EXTENSION = {extension: fmt for fmt, extension in _EXTENSIONS.items()}
PARTIAL_SUFFIX = ".partial"
# A stream file is these messages end to end, byte for byte what
# pyarrow.ipc.new_stream writes: schema, record batches, end-of-stream marker.
_ARROW_SCHEMA_MESSAGE = INSTRUCTION_SCHEMA.serialize()
_ARROW_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileOutput(Output):
    """Instructions into rotating files in one directory (``type = "file"``).

    Files are named ``NAME-YYYYMMDDTHHMMSSZ-SEQUENCE.arrows`` (or ``.jsonl``):
    the UTC time the file was opened and a sequence number that increases by
    one per file across restarts; order files by the sequence number.

    The file being written carries a further ``.partial`` suffix.  Finishing a
    file (rotation or close) completes it (the Arrow end-of-stream marker),
    fsyncs it, and renames it to its final name, so a file without
    ``.partial`` is complete and never changes again; a reader takes those
    and ignores ``.partial`` ones.

    A file is opened at the first instruction after the previous one was
    finished, so quiet periods leave no empty files.  It is finished once it
    holds `rotate_bytes` or more, or, at the next `send` or `flush`, once it
    has been open `rotate_seconds`.  `flush()` fsyncs the open file.

    A send that fails part way (a full disk) is cut back off the file, so the
    file holds whole tables only; the error propagates and the table counts
    as not taken.

    A ``.partial`` file of this output left by a crash is finished when the
    output is made: cut back to its last complete record batch (Arrow) or
    line (JSONL), then renamed like any other; one with no complete
    instruction is removed.  Everything flushed before a crash is thus kept.
    """

    kind = "file"

    def __init__(
        self,
        name: str,
        path: str | os.PathLike,
        *,
        format: str = "arrow",
        rotate_bytes: int = 256 << 20,
        rotate_seconds: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ):
        if not _OUTPUT_NAME.fullmatch(name):
            raise ValueError(f"output {name!r}: a file output's name may hold only letters, digits, '_', '.', '-'")
        if format not in FORMATS:
            raise ValueError(f"output {name!r}: format must be one of {FORMATS}, not {format!r}")
        if rotate_bytes < 1 or not rotate_seconds > 0:
            raise ValueError(f"output {name!r}: rotate_bytes and rotate_seconds must be positive")
        self.name = name
        self.directory = Path(path)
        self.format = format
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self._clock = clock
        self._pattern = re.compile(
            re.escape(name) + r"-\d{8}T\d{6}Z-(\d+)(\.arrows|\.jsonl)(" + re.escape(PARTIAL_SUFFIX) + ")?"
        )
        self._file: io.FileIO | None = None  # the open .partial file, or None between files
        self._partial: Path | None = None
        self._size = 0  # bytes in the open file
        self._opened_at = 0.0
        self._closed = False
        self._instructions = 0
        self._batches = 0
        self._bytes = 0
        self._files = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sequence = self._recover() + 1

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> FileOutput:
        """Keys: `path` (directory, required), `format` ("arrow" | "jsonl", default "arrow"),
        `rotate_bytes` (default 256 MiB), `rotate_seconds` (default 3600)."""
        read = OutputOptions(name, options)
        made = dict(
            path=read.string("path"),
            format=read.choice("format", FORMATS, "arrow"),
            rotate_bytes=read.integer("rotate_bytes", 256 << 20),
            rotate_seconds=read.seconds("rotate_seconds", 3600.0),
        )
        read.finish()
        return cls(name, **made)

    def finished_files(self) -> list[Path]:
        """This output's finished files in the directory, oldest first."""
        found = []
        for entry in self.directory.iterdir():
            match = self._pattern.fullmatch(entry.name)
            if match and not match.group(3):
                found.append((int(match.group(1)), entry))
        return [entry for _, entry in sorted(found)]

    def send(self, instructions: pa.Table, position: int | None = None) -> None:
        if self._closed:
            raise ValueError(f"output {self.name!r} is closed")
        _check_instructions(instructions)
        if not instructions.num_rows:
            return
        if self.format == "arrow":
            chunks = [batch.serialize() for batch in instructions.to_batches() if batch.num_rows]
        else:
            chunks = jsonl_chunks(instructions)
        if self._file is not None and self._clock() - self._opened_at >= self.rotate_seconds:
            self._finish()
        if self._file is None:
            self._open()
        before = self._size
        try:
            for chunk in chunks:
                self._write(chunk)
        except BaseException:
            self._cut(before)
            raise
        self._instructions += instructions.num_rows
        self._batches += 1
        if self._size >= self.rotate_bytes:
            self._finish()

    def flush(self) -> None:
        if self._file is None:
            return
        if self._clock() - self._opened_at >= self.rotate_seconds:
            self._finish()
        else:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._finish()

    def stats(self) -> dict[str, int]:
        """`instructions` and `batches` taken, `bytes` written (file sizes), `files` finished."""
        return {
            "instructions": self._instructions,
            "batches": self._batches,
            "bytes": self._bytes,
            "files": self._files,
        }

    def _open(self) -> None:
        stamp = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y%m%dT%H%M%SZ")
        final = f"{self.name}-{stamp}-{self._sequence:06d}{_EXTENSIONS[self.format]}"
        self._partial = self.directory / (final + PARTIAL_SUFFIX)
        # Unbuffered: every byte handed to write() is in the file or the write
        # failed, so a failed send can be cut off exactly (see _cut).
        self._file = open(self._partial, "xb", buffering=0)
        self._size = 0
        self._opened_at = self._clock()
        self._sequence += 1
        if self.format == "arrow":
            self._write(_ARROW_SCHEMA_MESSAGE)

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = self._file.write(view)
            view = view[written:]
            self._size += written
            self._bytes += written

    def _cut(self, size: int) -> None:
        """Undo a send that failed part way (a full disk): cut the open file back to `size` bytes.

        The file then ends with the last table taken whole and goes on being
        written.  If even that fails, the file is left `.partial` for the next
        start to finish (see `_recover`) and the next send opens a new one.
        """
        self._bytes -= self._size - size
        try:
            os.ftruncate(self._file.fileno(), size)
            self._file.seek(size)  # or the next write leaves a hole of zeros where the cut was
            self._size = size
        except OSError:
            log.exception(
                "output %r: cannot cut %s back after a failed write; left for recovery", self.name, self._partial
            )
            file, self._file, self._partial = self._file, None, None
            file.close()

    def _finish(self) -> None:
        """Complete, fsync and rename the open file."""
        partial = self._partial
        try:
            if self.format == "arrow":
                self._write(_ARROW_END_OF_STREAM)
            os.fsync(self._file.fileno())
        finally:
            file, self._file, self._partial = self._file, None, None
            file.close()
        os.rename(partial, partial.with_suffix(""))
        _fsync_directory(self.directory)
        self._files += 1

    def _recover(self) -> int:
        """Finish this output's files left `.partial` by a crash; the highest sequence number in use."""
        highest = 0
        for entry in sorted(self.directory.iterdir()):
            match = self._pattern.fullmatch(entry.name)
            if not match:
                continue
            highest = max(highest, int(match.group(1)))
            if match.group(3):
                if _complete_prefix(entry, _FORMAT_OF_EXTENSION[match.group(2)]):
                    os.rename(entry, entry.with_suffix(""))
                    self._files += 1
                else:
                    entry.unlink()
        if highest:
            _fsync_directory(self.directory)
        return highest


def _complete_prefix(path: Path, fmt: str) -> bool:
    """Cut a file to its complete instructions and close it as finished; False when it holds none."""
    with open(path, "r+b") as file:
        data = file.read()
        if fmt == "jsonl":
            end = data.rfind(b"\n") + 1
            file.truncate(end)
            kept = end > 0
        else:
            end, kept = _arrow_complete_prefix(data)
            file.truncate(end)
            if kept:
                file.seek(end)
                file.write(_ARROW_END_OF_STREAM)
        file.flush()
        os.fsync(file.fileno())
    return kept


def _arrow_complete_prefix(data: bytes) -> tuple[int, bool]:
    """Byte length of the schema and whole, valid record batches at the start of a stream, and
    whether there is at least one batch."""
    source = pa.BufferReader(data)
    end, batches = 0, 0
    try:
        reader = pa.ipc.MessageReader.open_stream(source)
        schema = pa.ipc.read_schema(reader.read_next_message())
        end = source.tell()
        while True:
            message = reader.read_next_message()
            pa.ipc.read_record_batch(message, schema).validate(full=True)
            end = source.tell()
            batches += 1
    except StopIteration:
        # A stream that was finished before the crash ends with its marker: keep
        # the batches, the marker is written anew.
        pass
    except (pa.ArrowException, OSError):
        pass  # the torn tail of a write cut short
    return end, batches > 0


# ---------------------------------------------------------------------------
# ZeroMQ


# The retry hint given with Backpressure: a PUSH socket's queue drains as fast
# as its reader reads, so a short wait is the useful guess.
_ZMQ_RETRY_AFTER = 0.05


class ZmqOutput(Output):
    """Instructions on a ZeroMQ PUSH socket, one message per table (``type = "zmq"``).

    A message is one frame: the table as a complete Arrow IPC stream
    (``format = "arrow"``) or as JSON lines (``format = "jsonl"``).  PUSH
    spreads messages over the connected readers.

    When the socket's queue holds `sndhwm` messages, or when a bound socket
    has no reader connected at all, nothing is dropped: `send` raises
    `Backpressure` at once (``block = false``) or after waiting up to
    `send_timeout` seconds (``block = true``).  A connecting socket queues
    up to `sndhwm` messages for a reader that is not up yet.  `flush` does
    nothing: ZeroMQ sends in the background, and `close` gives queued
    messages up to `linger` seconds to go out.

    Binding beyond loopback (SPEC section 9) needs ``allow_remote = true``.
    """

    kind = "zmq"

    def __init__(
        self,
        name: str,
        endpoint: str,
        *,
        bind: bool = True,
        format: str = "arrow",
        sndhwm: int = 1000,
        block: bool = False,
        send_timeout: float = 5.0,
        linger: float = 1.0,
        allow_remote: bool = False,
        context: zmq.Context | None = None,
    ):
        if format not in FORMATS:
            raise ValueError(f"output {name!r}: format must be one of {FORMATS}, not {format!r}")
        if bind and not allow_remote and not is_loopback_endpoint(endpoint):
            raise ValueError(
                f"output {name!r}: endpoint {endpoint!r} binds beyond loopback; "
                "set allow_remote = true to allow it (SPEC section 9)"
            )
        self.name = name
        self.endpoint = endpoint
        self.format = format
        self.block = block
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUSH)
        try:
            self._socket.sndhwm = sndhwm
            self._socket.linger = round(linger * 1000)
            self._socket.sndtimeo = round(send_timeout * 1000) if block else 0
            if bind:
                self._socket.bind(endpoint)
                # The endpoint actually bound, e.g. with the port chosen for tcp://...:*
                self.endpoint = self._socket.last_endpoint.decode()
            else:
                self._socket.connect(endpoint)
        except zmq.ZMQError as error:
            self._socket.close(linger=0)
            raise ValueError(f"output {name!r}: cannot {'bind' if bind else 'connect'} {endpoint!r}: {error}") from None
        self._closed = False
        self._instructions = 0
        self._batches = 0
        self._bytes = 0
        self._backpressure = 0

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> ZmqOutput:
        """Keys: `endpoint` (required), `bind` (default true), `format` ("arrow" | "jsonl", default
        "arrow"), `sndhwm` (messages, default 1000), `block` (default false), `send_timeout` (seconds,
        default 5), `linger` (seconds, default 1), `allow_remote` (default false)."""
        read = OutputOptions(name, options)
        endpoint = read.string("endpoint")
        if "://" not in endpoint:
            raise read.error("endpoint", f"must be a ZeroMQ endpoint such as 'tcp://127.0.0.1:5560', not {endpoint!r}")
        made = dict(
            bind=read.boolean("bind", True),
            format=read.choice("format", FORMATS, "arrow"),
            sndhwm=read.integer("sndhwm", 1000),
            block=read.boolean("block", False),
            send_timeout=read.seconds("send_timeout", 5.0),
            linger=read.seconds("linger", 1.0),
            allow_remote=read.boolean("allow_remote", False),
        )
        read.finish()
        return cls(name, endpoint, **made)

    def send(self, instructions: pa.Table, position: int | None = None) -> None:
        if self._closed:
            raise ValueError(f"output {self.name!r} is closed")
        _check_instructions(instructions)
        if not instructions.num_rows:
            return
        if self.format == "arrow":
            frame = arrow_stream(instructions)
        else:
            frame = b"".join(jsonl_chunks(instructions))
        try:
            self._socket.send(frame, copy=False, flags=0 if self.block else zmq.NOBLOCK)
        except zmq.Again:
            self._backpressure += 1
            raise Backpressure(
                f"output {self.name!r}: {self.endpoint} has no reader ready (queue full or none connected)",
                _ZMQ_RETRY_AFTER,
            ) from None
        self._instructions += instructions.num_rows
        self._batches += 1
        self._bytes += len(frame)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._socket.close()

    def stats(self) -> dict[str, int]:
        """`instructions`, `batches` (messages) and `bytes` sent; `backpressure`: sends refused."""
        return {
            "instructions": self._instructions,
            "batches": self._batches,
            "bytes": self._bytes,
            "backpressure": self._backpressure,
        }


OUTPUT_TYPES: dict[str, type[Output]] = {cls.kind: cls for cls in (FileOutput, ZmqOutput)}


# More output types join by entry point, as channels do: the outbox (pyproject.toml) and any plug-in.  This module
# names none of them, so that the modules that build on it (the outbox among them) are not imported by it.
ENTRY_POINT_GROUP = "kairos.outputs"


def output_types() -> dict[str, type[Output]]:
    """Every output type by name: the two above and those registered in the `kairos.outputs` entry point group."""
    types: dict[str, type[Output]] = dict(OUTPUT_TYPES)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = point.load()
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"output type {point.name!r} is registered as {point.value} but cannot be loaded: "
                             f"{exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Output)):
            raise ValueError(f"output type {point.name!r}: {point.value} is not a subclass of "
                             "adapters.outputs.Output")
        known = types.get(point.name)
        if known is not None and known is not cls:
            raise ValueError(f"output type {point.name!r} is registered twice: {known.__module__}."
                             f"{known.__name__} and {point.value}; uninstall one of them")
        types[point.name] = cls
    return types


def make_output(name: str, table: dict[str, Any]) -> Output:
    """The output configured by `table` (an `[outputs.NAME]` table, with its `type`)."""
    options = dict(table)
    kind = options.pop("type", None)
    types = output_types()
    if kind not in types:
        known = ", ".join(map(repr, sorted(types)))
        raise ValueError(f"output {name!r}: key 'type' must be one of {known}, not {kind!r}")
    return types[kind].from_config(name, options)
