"""`kairos replay` to a daemon: a capture's events, message by message, through the reference sender.

The messages are cut the same way on every run: the files' rows in order,
`rows` per message, so message k (sequence k + 1) is always the same rows.
That is what lets a replay that was stopped (or killed) start again where
the daemon's acknowledgements say, and lose and repeat nothing: the daemon
takes each sequence once (`sequence = "exact"`), and the sender resends what
a crash of the daemon lost in flight (adapters/sender.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.ipc as ipc

from adapters.sender import ResendingSender

log = logging.getLogger("kairos.replay")


def read_capture(path: str | os.PathLike) -> pa.Table:
    """An Arrow IPC file or stream as a table."""
    with pa.memory_map(str(path)) as source:
        try:
            return ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return ipc.open_stream(source).read_all()


def messages(paths: Sequence[str | os.PathLike], rows: int) -> Iterator[bytes]:
    """The captures' rows as Arrow IPC stream messages of `rows` rows each (the last one may hold fewer)."""
    pending: list[pa.Table] = []
    held = 0
    for path in paths:
        table = read_capture(path)
        offset = 0
        while offset < table.num_rows:
            take = min(rows - held, table.num_rows - offset)
            pending.append(table.slice(offset, take))
            held += take
            offset += take
            if held == rows:
                yield _stream(pa.concat_tables(pending))
                pending, held = [], 0
    if held:
        yield _stream(pa.concat_tables(pending))


def _stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    table = table.combine_chunks()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def replay_to_daemon(paths: Sequence[str | os.PathLike], endpoint: str, acks_url: str, input: str, sender: int,
                     *, rows: int = 65_536, window: int = 64, rate: float | None = None,
                     token: str | None = None) -> dict[str, int]:
    """Send the captures to a daemon, resuming after what it has acknowledged; returns counts.

    `rate` (events per second) paces the sending; None sends as fast as the daemon takes it.
    """
    client = ResendingSender(endpoint, acks_url, input, sender, window=window, token=token)
    try:
        first = client.resume()
        skipped = 0
        started = time.monotonic()
        for k, payload in enumerate(messages(paths, rows)):
            if k + 1 < first:
                skipped += 1
                continue
            if rate:
                wait = started + (client.sent + 1) * rows / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            client.send(payload)
        client.flush()
        return {"messages": client.sent, "skipped": skipped, "resent": client.resent, "resends": client.resends}
    finally:
        client.close()
