"""The daemon's durable state: its checkpoints on a schedule, written off the loop, and what a restart loads.

`state_dir` holds

    checkpoints/<position>/   checkpoints (engine/checkpoint.py), named by the journal position they cover
    journal/                  the input journal (engine/journal.py), unless [journal] path puts it elsewhere
    erasures.jsonl            what `kairos forget` removed: when, who, how many rows (never the numbers)

A checkpoint covers a journal position P when the engine's state is that of
every entry up to P applied, and every instruction of those entries has been
taken by every output (the outbox has committed them).  The loop copies the
state out of the engine (`Engine.snapshot`: whole-array copies, the pause
the loop sees), then a thread of its own serialises, checksums, fsyncs and
renames it while the loop goes on; once it is in place the journal segments
that no kept checkpoint needs are released.

The copy, not fork(): a fork of a process with ZeroMQ's I/O threads, the
metrics server and the outbox writer running can inherit a lock held by one
of them, and the child would hang on its first allocation behind it; a
copy costs memory bandwidth (the state once more, briefly) and is safe.
bench/bench_checkpoint.py measures the pause and the write.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import orjson

from engine.checkpoint import CheckpointStore, Snapshot, StoredCheckpoint

log = logging.getLogger("kairos.daemon")

DAEMON_FILE = "daemon.json"
DAEMON_FORMAT = 1


@dataclass
class DaemonState:
    """What a daemon checkpoint holds besides the engine: the journal position it covers, and the last
    sequence taken from each (input, sender), so that resends are recognised and gaps counted across a restart."""

    position: int = 0
    sequences: dict[tuple[str, int], int] | None = None

    def encode(self) -> bytes:
        return orjson.dumps({
            "format": DAEMON_FORMAT,
            "position": self.position,
            "sequences": [[name, sender, seq] for (name, sender), seq in sorted((self.sequences or {}).items())],
        })

    @classmethod
    def decode(cls, data: bytes | None, where: Path) -> DaemonState:
        if data is None:
            return cls(0, {})
        doc = orjson.loads(data)
        if doc.get("format") != DAEMON_FORMAT:
            raise ValueError(f"{where}: {DAEMON_FILE} format {doc.get('format')!r} is not {DAEMON_FORMAT}")
        return cls(int(doc["position"]), {(name, int(sender)): int(seq) for name, sender, seq in doc["sequences"]})


@dataclass(frozen=True)
class CheckpointResult:
    position: int
    pause_s: float  # the loop's part: flushing the outputs and copying the state
    write_s: float  # the writer thread's part: serialise, checksum, fsync, rename
    bytes: int


class Checkpointer:
    """Schedules daemon checkpoints and writes them on a thread of its own, one at a time."""

    def __init__(self, store: CheckpointStore, every_ms: int, every_events: int, clock=time.monotonic):
        self.store = store
        self.every_s = every_ms / 1000
        self.every_events = every_events
        self.clock = clock
        self.last_at = clock()
        self.last_events = 0
        self.last_position = -1
        self.requested: list[Future] = []  # POST /control/checkpoint: answered once the checkpoint is in place
        self.forced = False  # a reload or a recovery asks for one as soon as the outputs allow
        self._writing: tuple[threading.Thread, Future, float] | None = None
        self.completed = 0
        self.failed = 0
        self.last: CheckpointResult | None = None

    @property
    def writing(self) -> bool:
        return self._writing is not None

    def due(self, events: int) -> bool:
        if self.requested or self.forced:
            return True
        if self.every_s and self.clock() - self.last_at >= self.every_s:
            return True
        return bool(self.every_events) and events - self.last_events >= self.every_events

    def start(self, snapshot: Snapshot, state: DaemonState, events: int, pause_s: float) -> None:
        """Write `snapshot` (already copied out of the engine) on the writer thread."""
        snapshot.extra[DAEMON_FILE] = state.encode()
        future: Future = Future()
        waiting, self.requested = self.requested, []
        self.forced = False
        self.last_at = self.clock()
        self.last_events = events

        def write() -> None:
            started = time.perf_counter()
            try:
                size = self.store.write(snapshot, state.position)
            except BaseException as exc:  # a full disk, say: the daemon goes on, the journal keeps everything
                future.set_exception(exc)
                return
            future.set_result(CheckpointResult(state.position, pause_s, time.perf_counter() - started, size))

        thread = threading.Thread(target=write, name="kairos-checkpoint", daemon=True)
        thread.start()
        self._writing = (thread, future, pause_s)
        for request in waiting:
            future.add_done_callback(lambda f, request=request: _answer(request, f))

    def poll(self, wait: bool = False) -> CheckpointResult | None:
        """The result of the write in progress once it has finished (None while it runs, or when none runs)."""
        if self._writing is None:
            return None
        thread, future, _ = self._writing
        if wait:
            thread.join()
        elif thread.is_alive():
            return None
        self._writing = None
        try:
            result = future.result()
        except Exception as exc:
            self.failed += 1
            log.error("checkpoint failed; the journal keeps everything since the last one",
                      extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}})
            return None
        self.completed += 1
        self.last = result
        self.last_position = result.position
        log.info("checkpoint written", extra={"fields": {
            "state_dir": str(self.store.directory.parent), "position": result.position,
            "pause_ms": round(result.pause_s * 1000, 1), "write_ms": round(result.write_s * 1000, 1),
            "bytes": result.bytes}})
        return result


def _answer(request: Future, done: Future) -> None:
    if done.exception() is not None:
        request.set_result((False, f"checkpoint failed: {done.exception()}"))
    else:
        result = done.result()
        request.set_result((True, f"checkpoint at journal position {result.position} ({result.bytes} bytes, "
                                  f"pause {result.pause_s * 1000:.0f} ms)"))


def newest_checkpoint(store: CheckpointStore, legacy: Path) -> tuple[Path | None, DaemonState]:
    """Where a restart loads from: the newest good checkpoint of the store, else one written by a daemon
    before the store existed (state_dir itself, or what its rename left), else nothing."""
    found: StoredCheckpoint | None = store.newest_good()
    if found is not None:
        return found.path, DaemonState.decode(found.extra(DAEMON_FILE), found.path)
    for candidate in (legacy, legacy.with_name(legacy.name + ".partial"), legacy.with_name(legacy.name + ".old")):
        if (candidate / "meta.json").exists():
            log.warning("loading a checkpoint of the layout before the journal; the next one goes to "
                        "state_dir/checkpoints", extra={"fields": {"checkpoint": str(candidate)}})
            return legacy, DaemonState(0, {})
    return None, DaemonState(0, {})
