"""`kairos run`: the long-lived process beside the switch feed (SPEC section 7).

One thread runs the loop; the kernel releases the GIL while it works, and the
metrics server answers on a thread of its own from a snapshot the loop
refreshes.  Each turn of the loop:

1. polls the feed sockets (at most `POLL_MS` so signals and timers are seen),
2. takes waiting messages, decodes them (bad rows go to the dead-letter file,
   valid rows of the same message are kept) and coalesces the rows; a
   feedback message is applied after the rows that arrived before it,
3. runs a batch through the Engine once `max_events` rows wait or the oldest
   has waited `linger`, and hands the instructions to every output,
4. when no event has come for `idle_advance`, moves event time on at the
   wall clock's pace from the last event seen, so that timers fire without
   waiting for an unrelated event,
5. applies a pending reload of rules and profiles (SIGHUP or POST /control/reload).

Backpressure: an output that cannot take more raises Backpressure; its
instructions wait in a bounded queue and are retried.  While any output has
`max_waiting_instructions` waiting, the loop stops reading the feeds, so
PULL feeders block at their high-water mark instead of memory growing.

Durability (SPEC section 10, engine/journal.py, engine/durability.py): with
`state_dir` set, every accepted message, feedback report, idle advance and
reload is appended to the journal before the engine applies it (synced per
`[journal] fsync`), checkpoints are written on a schedule off the loop, and
a start loads the newest good checkpoint and replays the journal after it,
sending on only the instructions the outbox does not already hold.

SIGTERM or SIGINT: stop accepting from the network, read what ZeroMQ already
queued, process it, hand every instruction to the outputs (for at most
`shutdown_timeout`; a second signal cuts that short), write a checkpoint to
`state_dir` when one is configured and every instruction was handed over,
exit 0.  What an output did not take stays in the journal and is sent after
the next start; without a journal it is lost, and the exit status is 1.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import gc
import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future

import numpy as np
import orjson
import pyarrow as pa
import zmq

from adapters.channels import make_channel
from adapters.channels.base import FeedbackSink
from adapters.channels.outbox import DeliveryPolicy, DeliveryWorker, OutboxOutput
from adapters.deadletter import DeadLetterFile
from adapters.feedback import DecodedFeedback, FeedbackDecoder
from adapters.outputs import Backpressure, Output, make_output
from adapters.wire import REJECT_REASONS, FieldMap, Reject, make_decoder
from adapters.zmq_input import Received, ZmqInput
from engine import journal as journal_format
from engine.checkpoint import CheckpointStore
from engine.config import ConfigError, DaemonConfig
from engine.daemon_metrics import metric_families
from engine.durability import Checkpointer, DaemonState, newest_checkpoint
from engine.engine import Engine
from engine.journal import Journal, parse_fsync
from engine.metrics import Histogram, MetricsServer, Registry
from engine.profiles import ProfileError, ProfileStore
from engine.rules import RulesError, RuleSet, load_rules, parse_rules
from engine.schema import COLUMN_DTYPES, MAX_TS, BatchError

log = logging.getLogger("kairos.daemon")

POLL_MS = 50  # longest the loop sleeps in poll: bounds how late a signal, reload or timer is seen
RECEIVE_BURST = 64  # messages taken from one socket before looking at the others
HEARTBEAT_SECONDS = 10.0  # /healthz fails when the loop has not turned for this long
STATS_SECONDS = 0.25  # how stale the engine figures in /metrics may be


def tune_allocator() -> bool:
    """Keep large freed blocks for reuse instead of returning them to the system (glibc's malloc).

    Every batch allocates and frees columns of a few MiB (decoded messages,
    kernel scratch, instruction columns).  By default glibc serves blocks
    that size with a fresh mmap and unmaps them on free, so each batch
    faults its memory in and has it zeroed again.  Measured on the standard
    traffic, the msgpack decoder ran at 4.0 M events/s that way and at 7.1 M
    with this setting.  The cost: up to `M_TRIM_THRESHOLD` of freed memory
    stays with the process.  Returns whether the settings applied (glibc only).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 512 << 20))


class Batcher:
    """Coalesces decoded messages into one batch of canonical columns."""

    def __init__(self, max_events: int):
        self.max_events = max_events
        self.parts: list[tuple[dict[str, np.ndarray], int]] = []
        self.n = 0
        self.oldest = 0.0  # monotonic arrival time of the first waiting message
        self.position = 0  # journal position of the newest message added (0 without a journal)
        self.sequences: dict[tuple[str, int], int] = {}  # (input, sender) -> sequence of the messages waiting
        self.held_bytes = 0  # payload bytes of the messages taken since the last take (their rows may be views)

    def add(self, batch: dict[str, np.ndarray], n: int, arrived: float, position: int = 0,
            sender: tuple[str, int] | None = None, seq: int | None = None) -> None:
        """Add a decoded message's rows; a message without rows still moves the position and sequences."""
        self.position = max(self.position, position)
        if sender is not None:
            self.sequences[sender] = seq
        if not n:
            return
        if not self.parts:
            self.oldest = arrived
        self.parts.append((batch, n))
        self.n += n

    def take(self) -> tuple[dict[str, np.ndarray], int, float]:
        """The waiting rows as one batch (zero-copy when one message holds them all)."""
        parts, n, oldest = self.parts, self.n, self.oldest
        self.parts, self.n, self.held_bytes = [], 0, 0
        if not parts:
            return {}, 0, oldest
        if len(parts) == 1:
            return parts[0][0], n, oldest
        names = [name for name in COLUMN_DTYPES if any(name in batch for batch, _ in parts)]
        batch = {
            name: np.concatenate([b[name] if name in b else np.zeros(k, COLUMN_DTYPES[name]) for b, k in parts])
            for name in names
        }
        return batch, n, oldest


class OutputQueue:
    """One output and the instructions it could not take yet."""

    def __init__(self, output: Output):
        self.output = output
        self.waiting: deque[tuple[pa.Table, int | None]] = deque()  # tables with their journal positions
        self.waiting_instructions = 0
        self.retry_at = 0.0
        self.backpressured = 0  # times the output refused a table

    def hand_off(self, table: pa.Table, now: float, position: int | None = None) -> None:
        self.waiting.append((table, position))
        self.waiting_instructions += table.num_rows
        self.retry(now)

    def retry(self, now: float) -> None:
        while self.waiting and now >= self.retry_at:
            table, position = self.waiting[0]
            try:
                self.output.send(table, position)
            except Backpressure as exc:
                self.backpressured += 1
                self.retry_at = now + max(exc.retry_after, 0.001)
                return
            self.waiting.popleft()
            self.waiting_instructions -= table.num_rows


class Daemon:
    """The running daemon: feeds in, Engine, outputs out, metrics beside."""

    def __init__(self, config: DaemonConfig, *, clock=time.monotonic, wall=time.time):
        tune_allocator()
        self.config = config
        self.clock = clock
        self.wall = wall
        self.instance = f"{int(wall() * 1000):x}-{id(self) & 0xffff:04x}"  # tells a sender the daemon restarted
        self.context = zmq.Context()
        self.inputs: list[ZmqInput] = []
        self.outputs: list[OutputQueue] = []
        self.delivery: DeliveryWorker | None = None
        self.journal: Journal | None = None
        self._channels: dict = {}  # made at start, before the state is loaded; handed to the delivery worker
        self.checkpointer: Checkpointer | None = None
        # (channel, id, outcome, ts) reported by channels on their own threads; the loop applies them.
        self.channel_feedback: deque[tuple[str, str, str, int]] = deque()
        self.channel_feedback_results = {(name, result): 0 for name in config.channels
                                         for result in ("applied", "unknown", "invalid")}
        self.metrics_server = None
        self.poller = zmq.Poller()
        self.deadletter = None
        self.batcher = Batcher(config.max_batch_events)
        self.rejected = {(i.name, reason): 0 for i in config.inputs for reason in REJECT_REASONS}
        self.events_in = {i.name: 0 for i in config.inputs if i.role == "events"}
        self.feedback_results = {(i.name, result): 0 for i in config.inputs if i.role == "feedback"
                                 for result in ("applied", "unknown", "invalid")}
        self.instructions_out = 0
        self.idle_advances = 0
        self.reloads = {"ok": 0, "refused": 0}
        self.instructions_by_rule_channel: Counter[tuple[str, str]] = Counter()
        self.batch_latency = Histogram()
        self._stats_at = 0.0
        self._stopping = threading.Event()
        self._signals = 0  # SIGTERM/SIGINT received: a second one cuts the drain short
        self._draining = False
        self._reloads: deque[Future] = deque()
        self._forgets: deque[tuple[list[int], str, Future]] = deque()
        # Durability: the journal position applied to the engine, and the sender sequences of those entries
        # (what a checkpoint covers); replayed entries up to `_suppress_through` send nothing on.
        self.applied_position = 0
        self.applied_sequences: dict[tuple[str, int], int] = {}
        self._suppress_through = 0
        self.replayed = {"entries": 0, "events": 0, "suppressed_instructions": 0, "sent_instructions": 0}
        self.undelivered = 0  # instructions no output took at shutdown
        self.heartbeat = clock()
        try:
            self.deadletter = DeadLetterFile(config.deadletter_dir, config.deadletter_rotate_bytes, clock=wall,
                                             keep_bytes=config.deadletter_keep_bytes, keep_ms=config.deadletter_keep_ms)
            self.decoders = {
                i.name: make_decoder(i.format, FieldMap.from_config(i.fields) if i.fields else None,
                                     columns=list(i.columns) if i.columns else None,
                                     max_message_bytes=i.max_message_bytes)
                for i in config.inputs if i.role == "events"
            }
            self.feedback_decoders = {
                i.name: FeedbackDecoder(i.format, i.max_message_bytes) for i in config.inputs if i.role == "feedback"
            }
            for message, fields in config.warnings:  # what in the config works but should not be so
                log.warning(message, extra={"fields": fields})
            self._make_channels()
            self._check_rule_channels(self._rules())
            self.engine, restored = self._load_engine()
            self.events_processed = self.engine.stats()["events"]
            self.batches_processed = self.engine.stats()["batches"]
            self.engine_stats = self.engine.stats()  # refreshed by the loop; the metrics thread reads it
            for name, table in config.outputs.items():
                self.outputs.append(OutputQueue(make_output(name, table)))
            if config.channels:
                self.delivery = self._start_delivery()
            if self.journal is not None:
                self._replay()
            self._apply_current_rules(restored)
            self._last_event_at = clock()
            self._watermark_at_last_event = self.engine.watermark
            self.ingest = config.ingest
            for input_config in config.inputs:
                try:
                    self.inputs.append(ZmqInput(input_config, self.context,
                                                rcvhwm=self.ingest.rcvhwm[input_config.name],
                                                share=self.ingest.shares[input_config.name]))
                except zmq.ZMQError as exc:  # a port in use, say: the key tells the operator which line
                    raise ConfigError(config.source, f"inputs.{input_config.name}",
                                      f"{input_config.endpoint}: {exc.strerror}") from None
                self.inputs[-1].counters.senders.update(
                    {sender: seq for (name, sender), seq in self.applied_sequences.items()
                     if name == input_config.name})
                self.poller.register(self.inputs[-1].socket, zmq.POLLIN)
            log.info("ingest memory", extra={"fields": {
                "memory": self.ingest.memory, "hold_bytes": self.ingest.hold_bytes,
                "inputs": {feed.name: {"rcvhwm": feed.rcvhwm, "configured_rcvhwm": feed.config.rcvhwm,
                                       "share": feed.share, "max_message_bytes": feed.config.max_message_bytes}
                           for feed in self.inputs}}})
            if config.metrics_host is not None:
                # Started here, not in run(): a port in use is a refusal to start, like a bad config.
                registry = Registry()
                registry.register(lambda: metric_families(self))
                self.metrics_server = MetricsServer(
                    config.metrics_host, config.metrics_port, registry, health=self._health,
                    ready=lambda: (self.ready, "ok" if self.ready else "draining"),
                    control={"reload": lambda: self.request_reload().result(timeout=120),
                             "checkpoint": lambda: self.request_checkpoint().result(timeout=600),
                             "forget": lambda body: self.request_forget(body).result(timeout=600)},
                    reads={"acks": self.acks},
                    token=config.metrics_token,
                )
                self.metrics_server.start()
        except BaseException:
            self._close()
            raise

    # -- start-up -----------------------------------------------------------

    def _rules(self) -> RuleSet:
        return self._with_timezone(load_rules(self.config.rules))

    def _with_timezone(self, ruleset: RuleSet) -> RuleSet:
        if self.config.timezone:
            ruleset = dataclasses.replace(
                ruleset, policy=dataclasses.replace(ruleset.policy, timezone=self.config.timezone)
            )
        return ruleset

    def _load_engine(self) -> tuple[Engine, bool]:
        """The engine a start begins from: the newest good checkpoint's, else a fresh one; and whether restored."""
        options = {"initial_subscribers": self.config.initial_subscribers, "lateness": self.config.lateness_ms}
        state = self.config.state_dir
        if state is None:
            return Engine(self._rules(), profiles=self.config.profiles, **options), False
        store = CheckpointStore(state / "checkpoints", keep=self.config.checkpoint.keep)
        self.checkpointer = Checkpointer(store, self.config.checkpoint.every_ms, self.config.checkpoint.every_events,
                                         clock=self.clock)
        if self.config.journaled:
            journal = self.config.journal
            self.journal = Journal(self.config.journal_dir, fsync=parse_fsync(journal.fsync),
                                   segment_bytes=journal.segment_bytes, retain_seconds=journal.retain_ms / 1000)
        path, daemon_state = newest_checkpoint(store, state)
        if path is None:
            if self.journal is not None and self.journal.first_position() > 1:
                log.error("no checkpoint, and the journal does not start at its beginning: starting without the "
                          "state of the events before it", extra={"fields": {
                              "journal": str(self.config.journal_dir), "first": self.journal.first_position()}})
                self.applied_position = self.journal.first_position() - 1
            engine = Engine(self._rules(), profiles=self.config.profiles, **options)
            if self.journal is not None and self.journal.next_position == 1:
                self._journal_reload(engine.ruleset)  # a replay before the first checkpoint knows its rules
            return engine, False
        engine = Engine.restore(path, **options)
        if self.journal is not None:
            self.journal.continue_after(daemon_state.position)
        self.applied_position = daemon_state.position
        self.applied_sequences = dict(daemon_state.sequences)
        self.checkpointer.last_position = daemon_state.position
        log.info("state restored", extra={"fields": {
            "checkpoint": str(path), "position": daemon_state.position, "subscribers": engine.stats()["subscribers"]}})
        return engine, True

    def _apply_current_rules(self, restored: bool) -> None:
        """After a restore or a replay, the rules (and profiles) files as they are now, as a reload would."""
        ruleset = self._rules()
        if ruleset.text == self.engine.ruleset.text and not (restored and self.config.profiles is not None):
            return
        self._journal_reload(ruleset)
        fate = self.engine.reload_rules(ruleset, profiles=self.config.profiles)
        if self.checkpointer is not None:
            self.checkpointer.forced = True
        log.info("rules applied to the restored state", extra={"fields": {"rules": str(self.config.rules), **fate}})

    def _replay(self) -> None:
        """Apply the journal's entries after the loaded checkpoint, as the engine first saw them.

        Instructions of entries the outbox already holds (up to its recorded
        position) are dropped; those of later entries go to the outputs, as
        the crash stopped them from doing.
        """
        journal = self.journal
        outbox = next((q.output for q in self.outputs if isinstance(q.output, OutboxOutput)), None)
        self._suppress_through = outbox.outbox.journal_position() if outbox is not None else self.applied_position
        started = time.perf_counter()
        for entry in journal.entries(after=self.applied_position):
            self.replayed["entries"] += 1
            if entry.kind == journal_format.EVENTS:
                key = (entry.input, entry.sender) if entry.sender is not None else None
                self.batcher.add(entry.columns, entry.n, self.clock(), entry.position, key, entry.seq)
                self.replayed["events"] += entry.n
                if self.batcher.n >= self.batcher.max_events or entry.position == self._suppress_through:
                    self._process_batch()
                continue
            self._process_batch()
            if entry.kind == journal_format.FEEDBACK:
                self._feedback_to_engine(entry.columns["id"], entry.columns["outcome"], entry.columns["ts"])
            elif entry.kind == journal_format.ADVANCE:
                self._emit(self.engine.advance(entry.ts), entry.position)
            elif entry.kind == journal_format.RELOAD:
                self._apply_reload_entry(entry.reload)
            self.applied_position = entry.position
        self._process_batch()
        self._suppress_through = 0
        if self.replayed["entries"]:
            for queue in self.outputs:
                queue.retry(self.clock())
            seconds = round(time.perf_counter() - started, 3)
            log.info("journal replayed", extra={"fields": {**self.replayed, "position": self.applied_position,
                                                           "seconds": seconds}})
            if self.checkpointer is not None:
                self.checkpointer.forced = True
        journal.restore_sequences(self.applied_sequences)

    def _apply_reload_entry(self, reload: dict) -> None:
        ruleset = self._with_timezone(parse_rules(reload["rules_text"], reload["rules_source"],
                                                  set_values=reload.get("set_values", {})))
        profiles = reload.get("profiles")
        try:
            self.engine.reload_rules(ruleset, profiles=profiles)
        except (ProfileError, OSError) as exc:
            log.error("replayed reload: the profiles file cannot be read now; the rules are applied without it",
                      extra={"fields": {"profiles": profiles, "error": str(exc)}})
            self.engine.reload_rules(ruleset)

    def _journal_reload(self, ruleset: RuleSet) -> None:
        """Journal the rules about to be applied (a replay crossing this point applies them too)."""
        if self.journal is None:
            return
        self.applied_position = self.journal.append_reload({
            "rules_text": ruleset.text, "rules_source": ruleset.source,
            "set_values": {name: list(ruleset.sets[name]) for name in ruleset.set_files},
            "profiles": str(self.config.profiles) if self.config.profiles is not None else None,
        })
        self.journal.sync()

    def _make_channels(self) -> None:
        """Make (and so check) every configured channel, before any state is restored (see make_channels)."""
        self._channels = make_channels(self.config)

    def _check_rule_channels(self, ruleset: RuleSet) -> None:
        check_rule_channels(self.config, ruleset)

    def _close_unstarted_channels(self) -> None:
        for channel, _ in self._channels.values():
            channel.close()
        self._channels = {}

    def _start_delivery(self) -> DeliveryWorker:
        """The worker that delivers from the outbox output to the channels made at start."""
        (outbox,) = [q.output for q in self.outputs if isinstance(q.output, OutboxOutput)]
        channels, self._channels = self._channels, {}
        try:
            worker = DeliveryWorker(outbox.path, channels, keep_ms=outbox.keep_ms)
        except BaseException:
            for channel, _ in channels.values():
                channel.close()
            raise
        worker.start(self._feedback_sink)
        outbox.on_enqueue = worker.wake
        return worker

    def _feedback_sink(self, channel: str) -> FeedbackSink:
        def report(id: str, outcome: str, ts: int) -> None:
            self.channel_feedback.append((channel, id, outcome, ts))  # deque.append is atomic: any thread may call
        return report

    # -- control from other threads -----------------------------------------

    def request_stop(self) -> None:
        """Begin a clean shutdown (thread- and signal-safe); a second request cuts the drain short."""
        self._signals += 1
        self._stopping.set()

    def request_reload(self) -> Future:
        """Ask the loop to reload the rules file; the future gets (ok, message)."""
        future: Future = Future()
        self._reloads.append(future)
        return future

    def request_checkpoint(self) -> Future:
        """Ask the loop for a checkpoint now; the future gets (ok, message) once it is in place."""
        future: Future = Future()
        if self.checkpointer is None:
            future.set_result((False, "no engine.state_dir is configured: there is nowhere to checkpoint to"))
        else:
            self.checkpointer.requested.append(future)  # list.append is atomic: the loop takes it on its turn
        return future

    def request_forget(self, body: bytes) -> Future:
        """POST /control/forget with {"msisdns": [...], "by": "who asks"}: erase them (see `_forget`)."""
        future: Future = Future()
        try:
            request = orjson.loads(body or b"{}")
            msisdns = request["msisdns"]
            by = str(request.get("by") or "unknown")
            if not isinstance(msisdns, list) or not msisdns or not all(
                    isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in msisdns):
                raise ValueError
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            future.set_result((False, 'the body must be {"msisdns": [positive integers, ...], "by": "who asks"}'))
            return future
        self._forgets.append((msisdns, by, future))
        return future

    def acks(self) -> dict:
        """What GET /acks answers: per input and sender, the last sequence number that is durable.

        A sender that resends (adapters/sender.py) may forget everything up to
        it; `instance` changes with every start, so the sender knows to resend
        what it sent since.
        """
        durable = self.journal.durable_sequences if self.journal is not None else {}
        inputs: dict[str, dict[str, int]] = {i.name: {} for i in self.config.inputs}
        for (name, sender), seq in list(durable.items()):
            inputs.setdefault(name, {})[str(sender)] = seq
        return {"instance": self.instance, "journal": self.journal is not None, "inputs": inputs}

    @property
    def ready(self) -> bool:
        return not self._draining and not self._stopping.is_set()

    # -- the loop -------------------------------------------------------------

    def run(self) -> int:
        """Serve until asked to stop; returns the exit status (0 after a drain that lost nothing)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
            signal.signal(signal.SIGINT, lambda *_: self.request_stop())
            signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
        # Everything built so far (modules, rules, sockets) lives as long as the process.  Moving it out of the
        # collector's reach keeps full collections, which the per-batch Arrow objects trigger now and then, from
        # walking a few hundred thousand objects in the middle of a batch.
        gc.collect()
        gc.freeze()
        log.info("started", extra={"fields": {
            "inputs": {feed.name: feed.endpoint for feed in self.inputs},
            "metrics": f"{self.metrics_server.host}:{self.metrics_server.port}" if self.metrics_server else None,
            "outputs": [q.output.name for q in self.outputs],
            "channels": {name: c.type for name, c in self.config.channels.items()},
            "rules": str(self.config.rules), "rule_count": len(self.engine.ruleset.rules),
            "journal": str(self.config.journal_dir) if self.journal is not None else None,
            "position": self.applied_position,
        }})
        try:
            while not self._stopping.is_set():
                self.turn()
            self.drain()
        finally:
            self._close()
        lost = self.undelivered if self.journal is None else 0
        log.info("stopped", extra={"fields": {"events": self.engine.stats()["events"],
                                              "instructions": self.instructions_out, "undelivered": self.undelivered,
                                              "lost": lost}})
        return 1 if lost else 0

    def turn(self) -> None:
        """One turn of the loop: read, batch, process, advance, reload, checkpoint."""
        now = self.clock()
        self.heartbeat = now
        timeout = POLL_MS
        if self.batcher.n:
            timeout = max(0, min(timeout, int((self.batcher.oldest + self.config.linger_ms / 1000 - now) * 1000)))
        if self._backlogged():
            # Neither read nor process: events wait in ZeroMQ's queues (PULL feeders block at the high-water
            # mark) and in the batcher, not as instructions in memory.  Sleep until an output may take more.
            retry_at = min(q.retry_at for q in self.outputs if q.waiting)
            time.sleep(min(POLL_MS / 1000, max(retry_at - now, 0.001)))
        else:
            for socket, _ in self.poller.poll(timeout):
                self._read(self._input_of(socket))
            now = self.clock()
            if self.batcher.n and (self.batcher.n >= self.batcher.max_events
                                   or now - self.batcher.oldest >= self.config.linger_ms / 1000):
                self._process_batch()
        self._apply_channel_feedback()
        now = self.clock()
        self._advance_if_idle(now)
        for queue in self.outputs:
            queue.retry(now)
        for feed in self.inputs:
            feed.count_connections()
        while self._reloads:
            self._reload(self._reloads.popleft())
        while self._forgets:
            msisdns, by, future = self._forgets.popleft()
            future.set_result(self._forget(msisdns, by))
        if self.journal is not None:
            self.journal.tick()
        self._checkpoint_if_due()
        if now - self._stats_at >= STATS_SECONDS:
            self._refresh_stats(now)

    def _refresh_stats(self, now: float) -> None:
        self.engine_stats = self.engine.stats()
        self._stats_at = now

    def _input_of(self, socket) -> ZmqInput:
        for feed in self.inputs:
            if feed.socket is socket:
                return feed
        raise KeyError(socket)  # pragma: no cover - the poller holds only our sockets

    def _backlogged(self) -> bool:
        return any(q.waiting_instructions >= self.config.max_waiting_instructions for q in self.outputs)

    def _read(self, feed: ZmqInput) -> int:
        """Take a burst of messages from one feed into the batcher; returns messages taken.

        What the daemon holds of the feeds' messages, unprocessed, stays under twice `ingest.hold_bytes`
        (engine.config.IngestPlan): no burst starts at `hold_bytes` or more (the waiting batch runs first)
        and a burst ends there.
        """
        room = self.ingest.hold_bytes - self.batcher.held_bytes
        if room <= 0:
            if self._backlogged() and not self._draining:
                return 0  # the messages wait in ZeroMQ until the outputs take more
            self._process_batch()
            room = self.ingest.hold_bytes
        messages, sequence_events = feed.receive(RECEIVE_BURST, room)
        for event in sequence_events:
            kind = "sequence gap" if event.got > event.expected else "sequence regression"
            log.warning(kind, extra={"fields": {"input": feed.name, "sender": event.sender,
                                                "expected": event.expected, "got": event.got}})
        for message in messages:
            if message.junk:
                self._dead_letter(feed.name, [Reject("extra_frames", f"frame {k} of {len(message.junk) + 1} before "
                                                     "the payload is neither a topic nor a sequence header",
                                                     None, frame) for k, frame in enumerate(message.junk)])
        if feed.name in self.feedback_decoders:
            for message in messages:
                self._apply_feedback(feed.name, self.feedback_decoders[feed.name].decode(message.payload))
            return len(messages)
        decoder = self.decoders[feed.name]
        for message in messages:
            self.batcher.held_bytes += len(message.payload)  # the decoded columns may be views of it
            self._accept(feed.name, message, decoder.decode(message.payload))
        return len(messages)

    def _accept(self, input_name: str, message: Received, decoded) -> None:
        """A decoded message: dead letters out, journaled (when on) before its rows join the batcher."""
        if decoded.rejects:
            self._dead_letter(input_name, decoded.rejects)
        position = 0
        if self.journal is not None and (decoded.n or message.sender is not None):
            position = self.journal.append_events(decoded.batch if decoded.n else {}, input_name, message.sender,
                                                  message.seq)
        key = (input_name, message.sender) if message.sender is not None else None
        self.batcher.add(decoded.batch, decoded.n, self.clock(), position, key, message.seq)
        if decoded.n:
            self.events_in[input_name] += decoded.n
            self._last_event_at = self.clock()
            if self.batcher.n >= self.batcher.max_events and not self._backlogged():
                self._process_batch()

    def _apply_feedback(self, input_name: str, decoded: DecodedFeedback) -> None:
        """Channel outcomes: they affect only events processed after them, so the waiting batch goes first."""
        if decoded.rejects:
            self._dead_letter(input_name, decoded.rejects)
        if not decoded.n:
            return
        self._process_batch()
        if self.journal is not None:
            self.applied_position = self.journal.append_feedback(
                list(decoded.ids), list(decoded.outcomes), [int(t) for t in decoded.ts], f"input:{input_name}")
            self.journal.commit()
        result = self._feedback_to_engine(decoded.ids, decoded.outcomes, decoded.ts)
        for outcome, n in result.items():
            key = (input_name, outcome)
            self.feedback_results[key] = self.feedback_results.get(key, 0) + n

    def _feedback_to_engine(self, ids, outcomes, ts) -> dict[str, int]:
        return self.engine.feedback(ids, outcomes, ts)

    def _apply_channel_feedback(self) -> None:
        """Outcomes the channels reported since the last turn, in the order they came, after the waiting batch."""
        if not self.channel_feedback:
            return
        reports = []
        while self.channel_feedback:
            reports.append(self.channel_feedback.popleft())
        self._process_batch()
        # One call per channel and run of its reports keeps the results per channel, and the order.
        start = 0
        for k in range(1, len(reports) + 1):
            if k == len(reports) or reports[k][0] != reports[start][0]:
                run = reports[start:k]
                ids, outcomes, times = [r[1] for r in run], [r[2] for r in run], [int(r[3]) for r in run]
                if self.journal is not None:
                    self.applied_position = self.journal.append_feedback(ids, outcomes, times, f"channel:{run[0][0]}")
                    self.journal.commit()
                result = self._feedback_to_engine(ids, outcomes, times)
                for outcome, n in result.items():
                    key = (run[0][0], outcome)
                    self.channel_feedback_results[key] = self.channel_feedback_results.get(key, 0) + n
                start = k

    def _dead_letter(self, input_name: str, rejects: list[Reject]) -> None:
        for reject in rejects:
            key = (input_name, reject.reason)
            self.rejected[key] = self.rejected.get(key, 0) + 1
        self.deadletter.write(input_name, rejects)

    def _process_batch(self) -> None:
        """Run the waiting rows through the engine (once the journal holds them durably, per its policy)."""
        position, sequences = self.batcher.position, self.batcher.sequences
        if position <= self.applied_position and not self.batcher.n:
            return
        if self.journal is not None:
            self.journal.commit()
        batch, n, oldest = self.batcher.take()
        self.batcher.sequences = {}
        if n:
            try:
                instructions = self.engine.process(batch)
            except BatchError as exc:
                # The decoders validate every row, so this is a defect; the batch is kept, not lost.
                log.error("batch refused by the engine", extra={"fields": {"error": str(exc), "events": n}})
                self._dead_letter("engine", [Reject("bad_value", str(exc), None, _batch_bytes(batch))])
                instructions = None
        else:
            instructions = None
        self.applied_position = max(self.applied_position, position)
        self.applied_sequences.update(sequences)
        if instructions is None:
            return
        self._watermark_at_last_event = self.engine.watermark
        self.events_processed += n
        self.batches_processed += 1
        self._emit(instructions, position)
        self.batch_latency.observe(self.clock() - oldest)

    def _emit(self, instructions: pa.Table, position: int = 0) -> None:
        if not instructions.num_rows:
            return
        if position and position <= self._suppress_through:
            # A replayed entry whose instructions the outbox holds already: sending them again would repeat them.
            self.replayed["suppressed_instructions"] += instructions.num_rows
            return
        if self._suppress_through:
            self.replayed["sent_instructions"] += instructions.num_rows
        self.instructions_out += instructions.num_rows
        # A few hundred instructions per batch: a Counter beats Arrow's group_by and its fixed cost per call.
        self.instructions_by_rule_channel.update(
            zip(instructions.column("rule").to_pylist(), instructions.column("channel").to_pylist(), strict=True))
        now = self.clock()
        for queue in self.outputs:
            queue.hand_off(instructions, now, position or None)

    def _advance_if_idle(self, now: float) -> None:
        """After `idle_advance` without events, let event time follow the wall clock."""
        if self.batcher.n or self._watermark_at_last_event < 0 or self._backlogged():
            return  # events are waiting (here or, while backlogged, in the feeds' queues): not idle
        idle_ms = int((now - self._last_event_at) * 1000)
        if idle_ms < self.config.idle_advance_ms:
            return
        # Clamped: event time never leaves the accepted range, whatever the last event's ts was.
        target = min(self._watermark_at_last_event + idle_ms, MAX_TS)
        if target > self.engine.watermark:
            self.idle_advances += 1
            self._process_batch()  # a message without rows may have moved the position
            position = 0
            if self.journal is not None:
                position = self.applied_position = self.journal.append_advance(target)
                self.journal.commit()
            self._emit(self.engine.advance(target), position)

    def _reload(self, future: Future) -> None:
        """Rules (and profiles, when configured) from their files; either refused leaves both as they were."""
        try:
            ruleset = self._rules()
            self._check_rule_channels(ruleset)
            profiles = ProfileStore.load(self.config.profiles) if self.config.profiles is not None else None
        except (RulesError, ConfigError, ProfileError, OSError) as exc:
            self.reloads["refused"] += 1
            log.error("reload refused; the old rules and profiles keep running", extra={"fields": {"error": str(exc)}})
            future.set_result((False, str(exc)))
            return
        self._process_batch()  # events that arrived before the reload run under the old rules
        old_text = self.engine.ruleset.text
        try:
            # One step: the new rules are checked against the profiles they will run with.
            fate = self.engine.reload_rules(ruleset, profiles=profiles)
        except ProfileError as exc:  # a field the new rules test has a type they cannot test
            self.reloads["refused"] += 1
            log.error("reload refused; the old rules and profiles keep running", extra={"fields": {"error": str(exc)}})
            future.set_result((False, str(exc)))
            return
        if ruleset.text != old_text or profiles is not None:
            self._journal_reload(ruleset)
            if self.checkpointer is not None:
                self.checkpointer.forced = True  # a replay then rarely has to cross a reload
        self.reloads["ok"] += 1
        log.info("rules reloaded", extra={"fields": {
            "rules": str(self.config.rules), "profiles": len(self.engine.profiles), **fate}})
        future.set_result((True, f"kept {len(fate['kept'])}, fresh {len(fate['fresh'])}, "
                                 f"removed {len(fate['removed'])} rules"))

    def _forget(self, msisdns: list[int], by: str) -> tuple[bool, str]:
        """Erase subscribers from everything the daemon keeps (SPEC section 10); (ok, what was removed).

        In order: the events waiting are processed, the outputs drained (so
        the outbox holds every instruction there is), the engine forgets them
        (live state, profile, remembered instructions), the outbox and every
        channel delete their rows (pending instructions, offers), a checkpoint
        is written at once and every older one deleted, and the journal is
        rotated and released up to it, the segments kept for audit rewritten
        without their rows.  Then one line goes to erasures.jsonl: when, who,
        how many rows where, never the numbers themselves.  Instruction files
        an output wrote for downstream systems are theirs to erase.
        """
        self._process_batch()
        for queue in self.outputs:
            queue.retry(self.clock())
        if any(q.waiting for q in self.outputs):
            return False, "an output is holding instructions back; try again once it has taken them"
        for queue in self.outputs:
            queue.output.flush()
        gone = np.array(sorted(set(msisdns)), np.int64)
        removed = {f"engine_{k}": v for k, v in self.engine.forget(gone).items()}
        outbox = next((q.output for q in self.outputs if isinstance(q.output, OutboxOutput)), None)
        if outbox is not None:
            removed["outbox_rows"] = outbox.outbox.forget(gone.tolist())
        for name, (channel, _) in (self.delivery.channels.items() if self.delivery is not None else ()):
            removed[f"channel_{name}"] = channel.forget(gone.tolist())
        if self.checkpointer is not None:
            if not self.checkpoint_now(wait=True) or self.checkpointer.last_position != self.applied_position:
                return False, "erased from the live state, but the checkpoint after it failed: see the log; try again"
            self.checkpointer.store.remove_all_but(self.checkpointer.last_position)
        if self.journal is not None:
            self.journal.rotate()
            self.journal.release(self.applied_position)
            removed["journal_rows"] = self.journal.mask(gone)
        record = {"at": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"), "by": by,
                  "subscribers_asked": len(gone), **removed}
        if self.config.state_dir is not None:
            with open(self.config.state_dir / "erasures.jsonl", "ab") as f:
                f.write(orjson.dumps(record) + b"\n")
                f.flush()
                os.fsync(f.fileno())
        log.info("subscribers erased", extra={"fields": record})
        return True, ", ".join(f"{k} {v}" for k, v in removed.items())

    # -- checkpoints ------------------------------------------------------------

    def _checkpoint_if_due(self) -> None:
        checkpointer = self.checkpointer
        if checkpointer is None:
            return
        self._checkpoint_finished(checkpointer.poll())
        if checkpointer.writing or not checkpointer.due(self.events_processed):
            return
        if any(q.waiting for q in self.outputs):
            return  # an output has not taken everything yet: a checkpoint now would cover instructions it lacks
        self.checkpoint_now(wait=False)

    def checkpoint_now(self, wait: bool) -> bool:
        """Flush the outputs, copy the state and write it (on the writer thread; `wait` for it to finish).

        Returns False when an output still holds instructions back (no checkpoint is taken then).
        """
        checkpointer = self.checkpointer
        if checkpointer.writing:
            self._checkpoint_finished(checkpointer.poll(wait=True))
        started = time.perf_counter()
        for queue in self.outputs:
            queue.retry(self.clock())
        if any(q.waiting for q in self.outputs):
            return False
        for queue in self.outputs:
            queue.output.flush()  # the outbox commits what it was sent: the checkpoint may cover it
        if self.journal is not None:
            self.journal.sync()
        snapshot = self.engine.snapshot()
        state = DaemonState(self.applied_position, dict(self.applied_sequences))
        checkpointer.start(snapshot, state, self.events_processed, time.perf_counter() - started)
        if wait:
            self._checkpoint_finished(checkpointer.poll(wait=True))
        return True

    def _checkpoint_finished(self, result) -> None:
        """A checkpoint is in place: the journal segments no kept checkpoint needs can go."""
        if result is not None and self.journal is not None:
            self.journal.release(self.checkpointer.store.oldest_position())

    # -- shutdown -------------------------------------------------------------

    def drain(self) -> None:
        """Stop accepting, process what was queued, hand everything off (within the deadline), checkpoint."""
        self._draining = True
        log.info("draining")
        for feed in self.inputs:
            feed.stop_accepting()
        for feed in self.inputs:
            while self._read(feed):
                pass
        self._process_batch()
        deadline = self.clock() + self.config.shutdown_ms / 1000
        while any(q.waiting for q in self.outputs) and self.clock() < deadline and self._signals < 2:
            time.sleep(0.01)
            for queue in self.outputs:
                queue.retry(self.clock())
        for queue in self.outputs:
            if queue.waiting_instructions:
                self.undelivered += queue.waiting_instructions
                log.error("output did not take every instruction before shutdown", extra={"fields": {
                    "output": queue.output.name, "instructions": queue.waiting_instructions,
                    "kept": "in the journal: sent after the next start" if self.journal is not None else "no: lost"}})
            queue.output.flush()
        while self._reloads:
            self._reloads.popleft().set_result((False, "shutting down"))
        if self.delivery is not None:
            # Deliveries in progress finish; what is still pending stays in the outbox for the next start.
            self.delivery.stop(timeout=max(1.0, deadline - self.clock()) if self._signals < 2 else 1.0)
            self.delivery = None
            self._apply_channel_feedback()
        if self.checkpointer is not None and self.journal is None:
            for queue in self.outputs:  # no journal to keep them: counted as lost, and the state saved without them
                queue.waiting.clear()
                queue.waiting_instructions = 0
        if self.checkpointer is not None:
            if self.undelivered and self.journal is not None:
                # The journal after the last checkpoint holds what the outputs lack: a new one must not cover it.
                self._checkpoint_finished(self.checkpointer.poll(wait=True))
                log.warning("no checkpoint at shutdown: the next start replays the journal to send what is left")
            elif self.checkpoint_now(wait=True):
                log.info("checkpoint written at shutdown", extra={"fields": {"state_dir": str(self.config.state_dir)}})
        for future in self.checkpointer.requested if self.checkpointer is not None else []:
            future.set_result((False, "shutting down"))
        self._refresh_stats(self.clock())

    def _health(self) -> tuple[bool, str]:
        stalled = self.clock() - self.heartbeat
        if stalled > HEARTBEAT_SECONDS:
            return False, f"the loop has not turned for {stalled:.0f} s"
        return True, "ok"

    def _close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self._close_unstarted_channels()
        if self.checkpointer is not None and self.checkpointer.writing:
            self.checkpointer.poll(wait=True)
        if self.journal is not None:
            self.journal.close()
        if getattr(self, "delivery", None) is not None:
            self.delivery.stop()
        for queue in self.outputs:
            queue.output.close()
        for feed in self.inputs:
            feed.close()
        if getattr(self, "deadletter", None) is not None:
            self.deadletter.close()
        self.context.term()


def make_channels(config: DaemonConfig) -> dict:
    """Every configured channel, made (and so checked) but not started, with its delivery policy.

    A channel config that cannot be used raises ConfigError naming `channels.NAME`; the channels
    already made are closed.
    """
    channels = {}
    try:
        for name, channel_config in config.channels.items():
            try:
                channel = make_channel(name, {"type": channel_config.type, **channel_config.options})
            except ValueError as exc:
                raise ConfigError(config.source, f"channels.{name}", str(exc)) from None
            channels[name] = (channel, DeliveryPolicy(
                concurrency=channel_config.concurrency, rate=channel_config.rate, burst=channel_config.burst,
                max_attempts=channel_config.max_attempts,
                backoff_initial=channel_config.backoff_initial_ms / 1000,
                backoff_max=channel_config.backoff_max_ms / 1000,
                max_age=channel_config.max_age_ms / 1000,
            ))
    except BaseException:
        for channel, _ in channels.values():
            channel.close()
        raise
    return channels


def check_rule_channels(config: DaemonConfig, ruleset: RuleSet) -> None:
    """With an outbox, a (live) rule naming a channel no `[channels.NAME]` configures is refused, naming the
    rules file, the rule and the channel: its instructions would wait in the outbox for good.  With
    `[engine] unconfigured_channels = "warn"` each such channel is logged instead."""
    if not any(table["type"] == "outbox" for table in config.outputs.values()):
        return
    missing = [(rule.id, channel) for rule in ruleset.rules if not rule.shadow
               for channel in rule.channels if channel not in config.channels]
    configured = ", ".join(config.channels)
    if missing and config.unconfigured_channels == "warn":
        for rule_id, channel in missing:
            log.warning("rule names a channel that is not configured; its instructions wait in the outbox",
                        extra={"fields": {"rules": ruleset.source, "rule": rule_id, "channel": channel,
                                          "configured": configured}})
    elif missing:
        rule_id, channel = missing[0]
        also = "".join(f"; also rule {r!r}: channel {c!r}" for r, c in missing[1:])
        raise ConfigError(ruleset.source, f"rule {rule_id!r}", (
            f"channel {channel!r} is not configured: {config.source} has no [channels.{channel}] "
            f"(configured: {configured}), so its instructions would wait in the outbox for good{also}; "
            "configure the channel, correct the rule, or set [engine] unconfigured_channels = \"warn\""))


def preflight(config: DaemonConfig) -> list[str]:
    """What `kairos run --check` does: everything a start checks before it binds, and nothing it writes.

    The rules compile (with the config's time zone), the profiles load and suit the rules, every channel
    can be made and every rule's channels are configured, every input's decoder and field map can be
    made, every output type is known, and the newest checkpoint in `state_dir` verifies.  Returns a line
    per thing checked; raises ConfigError, RulesError, ProfileError or CheckpointError at the first that
    is not.  No socket is bound, no channel started, no file or directory made.
    """
    from adapters.outputs import output_types
    from engine.checkpoint import verify

    said = []
    ruleset = load_rules(config.rules)
    if config.timezone:
        ruleset = dataclasses.replace(ruleset, policy=dataclasses.replace(ruleset.policy, timezone=config.timezone))
    engine = Engine(ruleset, profiles=config.profiles, initial_subscribers=1024)
    profiles = f"; profiles: {config.profiles}: {len(engine.profiles):,} rows suit them" if config.profiles else ""
    said.append(f"rules: {config.rules}: {len(ruleset.rules)} rules compile{profiles}")
    for i in config.inputs:
        if i.role == "events":
            make_decoder(i.format, FieldMap.from_config(i.fields) if i.fields else None,
                         columns=list(i.columns) if i.columns else None, max_message_bytes=i.max_message_bytes)
        said.append(f"inputs.{i.name}: {i.endpoint} ({i.socket}, {i.format}, {i.role}, sequence {i.sequence})")
    types = output_types()
    for name, table in config.outputs.items():
        if table["type"] not in types:
            raise ConfigError(config.source, f"outputs.{name}.type",
                              f"{table['type']!r} is not one of {', '.join(sorted(types))}")
        said.append(f"outputs.{name}: type {table['type']}")
    channels = make_channels(config)
    try:
        check_rule_channels(config, ruleset)
    finally:
        for channel, _ in channels.values():
            channel.close()
    said += [f"channels.{name}: type {c.type}" for name, c in config.channels.items()]
    if config.state_dir is not None:
        directory = config.state_dir / "checkpoints"
        positions = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True) \
            if directory.is_dir() else []
        if positions:
            verify(directory / f"{positions[0]:020d}")
            said.append(f"state_dir: {config.state_dir}: {len(positions)} checkpoint(s), the newest "
                        f"(journal position {positions[0]}) verifies")
        else:
            said.append(f"state_dir: {config.state_dir}: no checkpoint yet")
    return said


def _batch_bytes(batch: dict[str, np.ndarray]) -> bytes:
    sink = pa.BufferOutputStream()
    table = pa.table(batch)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
