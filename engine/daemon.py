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

SIGTERM or SIGINT: stop accepting from the network, read what ZeroMQ already
queued, process it, hand every instruction to the outputs, write a checkpoint
to `state_dir` when one is configured, exit 0.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import signal
import sqlite3
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pyarrow as pa
import zmq

from adapters.channels import make_channel
from adapters.channels.base import FeedbackSink
from adapters.channels.outbox import DeliveryPolicy, DeliveryWorker, OutboxOutput
from adapters.deadletter import DeadLetterFile
from adapters.feedback import DecodedFeedback, FeedbackDecoder
from adapters.outputs import Backpressure, Output, make_output
from adapters.wire import REJECT_REASONS, FieldMap, Reject, make_decoder
from adapters.zmq_input import ZmqInput
from engine.config import ConfigError, DaemonConfig
from engine.engine import Engine
from engine.metrics import Histogram, MetricFamily, MetricsServer, Registry, counter, gauge, histogram
from engine.profiles import ProfileError, ProfileStore
from engine.rules import RulesError, RuleSet, load_rules
from engine.schema import COLUMN_DTYPES, BatchError

log = logging.getLogger("kairos.daemon")

POLL_MS = 50  # longest the loop sleeps in poll: bounds how late a signal, reload or timer is seen
RECEIVE_BURST = 64  # messages taken from one socket before looking at the others
DRAIN_SECONDS = 30.0  # on shutdown, how long a backpressured output is retried before giving up
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

    def add(self, batch: dict[str, np.ndarray], n: int, arrived: float) -> None:
        if not n:
            return
        if not self.parts:
            self.oldest = arrived
        self.parts.append((batch, n))
        self.n += n

    def take(self) -> tuple[dict[str, np.ndarray], int, float]:
        """The waiting rows as one batch (zero-copy when one message holds them all)."""
        parts, n, oldest = self.parts, self.n, self.oldest
        self.parts, self.n = [], 0
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
        self.waiting: deque[pa.Table] = deque()
        self.waiting_instructions = 0
        self.retry_at = 0.0
        self.backpressured = 0  # times the output refused a table

    def hand_off(self, table: pa.Table, now: float) -> None:
        self.waiting.append(table)
        self.waiting_instructions += table.num_rows
        self.retry(now)

    def retry(self, now: float) -> None:
        while self.waiting and now >= self.retry_at:
            table = self.waiting[0]
            try:
                self.output.send(table)
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
        self.engine = self._load_engine()
        self.context = zmq.Context()
        self.inputs: list[ZmqInput] = []
        self.outputs: list[OutputQueue] = []
        self.delivery: DeliveryWorker | None = None
        # (channel, id, outcome, ts) reported by channels on their own threads; the loop applies them.
        self.channel_feedback: deque[tuple[str, str, str, int]] = deque()
        self.channel_feedback_results = {(name, result): 0 for name in config.channels
                                         for result in ("applied", "unknown", "invalid")}
        self.metrics_server = None
        self.poller = zmq.Poller()
        self.deadletter = DeadLetterFile(config.deadletter_dir, config.deadletter_rotate_bytes, clock=wall)
        self.batcher = Batcher(config.max_batch_events)
        self.rejected = {(i.name, reason): 0 for i in config.inputs for reason in REJECT_REASONS}
        self.events_in = {i.name: 0 for i in config.inputs if i.role == "events"}
        self.feedback_results = {(i.name, result): 0 for i in config.inputs if i.role == "feedback"
                                 for result in ("applied", "unknown", "invalid")}
        self.events_processed = self.engine.stats()["events"]
        self.batches_processed = self.engine.stats()["batches"]
        self.instructions_out = 0
        self.idle_advances = 0
        self.reloads = {"ok": 0, "refused": 0}
        self.instructions_by_rule_channel: Counter[tuple[str, str]] = Counter()
        self.batch_latency = Histogram()
        self.engine_stats = self.engine.stats()  # refreshed by the loop; the metrics thread reads it
        self._stats_at = 0.0
        self._stopping = threading.Event()
        self._draining = False
        self._reloads: deque[Future] = deque()
        self._last_event_at = clock()
        self._watermark_at_last_event = self.engine.watermark
        self.heartbeat = clock()
        try:
            for input_config in config.inputs:
                self.inputs.append(ZmqInput(input_config, self.context))
                self.poller.register(self.inputs[-1].socket, zmq.POLLIN)
            self.decoders = {
                i.name: make_decoder(i.format, FieldMap.from_config(i.fields) if i.fields else None,
                                     columns=list(i.columns) if i.columns else None,
                                     max_message_bytes=i.max_message_bytes)
                for i in config.inputs if i.role == "events"
            }
            self.feedback_decoders = {
                i.name: FeedbackDecoder(i.format, i.max_message_bytes) for i in config.inputs if i.role == "feedback"
            }
            for name, table in config.outputs.items():
                self.outputs.append(OutputQueue(make_output(name, table)))
            if config.channels:
                self.delivery = self._start_delivery()
            if config.metrics_host is not None:
                # Started here, not in run(): a port in use is a refusal to start, like a bad config.
                registry = Registry()
                registry.register(self.metric_families)
                self.metrics_server = MetricsServer(
                    config.metrics_host, config.metrics_port, registry, health=self._health,
                    ready=lambda: (self.ready, "ok" if self.ready else "draining"),
                    control={"reload": lambda: self.request_reload().result(timeout=120)},
                    token=config.metrics_token,
                )
                self.metrics_server.start()
        except BaseException:
            self._close()
            raise

    # -- start-up -----------------------------------------------------------

    def _rules(self) -> RuleSet:
        ruleset = load_rules(self.config.rules)
        if self.config.timezone:
            ruleset = dataclasses.replace(
                ruleset, policy=dataclasses.replace(ruleset.policy, timezone=self.config.timezone)
            )
        return ruleset

    def _load_engine(self) -> Engine:
        ruleset = self._rules()
        state = self.config.state_dir
        if state is not None and any(p.exists() for p in (state, _sibling(state, ".partial"), _sibling(state, ".old"))):
            engine = Engine.restore(state, initial_subscribers=self.config.initial_subscribers,
                                    lateness=self.config.lateness_ms)
            fate = engine.reload_rules(ruleset)
            if self.config.profiles is not None:
                engine.load_profiles(self.config.profiles)  # the file may be newer than the checkpoint's copy
            log.info("state restored", extra={"fields": {"state_dir": str(state), "subscribers": engine.stats()[
                "subscribers"], **fate}})
            return engine
        return Engine(ruleset, profiles=self.config.profiles, initial_subscribers=self.config.initial_subscribers,
                      lateness=self.config.lateness_ms)

    def _start_delivery(self) -> DeliveryWorker:
        """The configured channels, and the worker that delivers to them from the outbox output."""
        (outbox,) = [q.output for q in self.outputs if isinstance(q.output, OutboxOutput)]
        channels = {}
        try:
            for name, channel_config in self.config.channels.items():
                try:
                    channel = make_channel(name, {"type": channel_config.type, **channel_config.options})
                except ValueError as exc:
                    raise ConfigError(self.config.source, f"channels.{name}", str(exc)) from None
                channels[name] = (channel, DeliveryPolicy(
                    concurrency=channel_config.concurrency, rate=channel_config.rate, burst=channel_config.burst,
                    max_attempts=channel_config.max_attempts,
                    backoff_initial=channel_config.backoff_initial_ms / 1000,
                    backoff_max=channel_config.backoff_max_ms / 1000,
                ))
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
        """Begin a clean shutdown (thread- and signal-safe)."""
        self._stopping.set()

    def request_reload(self) -> Future:
        """Ask the loop to reload the rules file; the future gets (ok, message)."""
        future: Future = Future()
        self._reloads.append(future)
        return future

    @property
    def ready(self) -> bool:
        return not self._draining and not self._stopping.is_set()

    # -- the loop -------------------------------------------------------------

    def run(self) -> int:
        """Serve until asked to stop; returns the exit status (0 after a clean drain)."""
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
        }})
        try:
            while not self._stopping.is_set():
                self.turn()
            self.drain()
        finally:
            self._close()
        log.info("stopped", extra={"fields": {"events": self.engine.stats()["events"],
                                              "instructions": self.instructions_out}})
        return 0

    def turn(self) -> None:
        """One turn of the loop: read, batch, process, advance, reload."""
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
        """Take a burst of messages from one feed into the batcher; returns messages taken."""
        payloads, sequence_events = feed.receive(RECEIVE_BURST)
        for event in sequence_events:
            kind = "sequence gap" if event.got > event.expected else "sequence regression"
            log.warning(kind, extra={"fields": {"input": feed.name, "sender": event.sender,
                                                "expected": event.expected, "got": event.got}})
        if feed.name in self.feedback_decoders:
            for payload in payloads:
                self._apply_feedback(feed.name, self.feedback_decoders[feed.name].decode(payload))
            return len(payloads)
        decoder = self.decoders[feed.name]
        for payload in payloads:
            decoded = decoder.decode(payload)
            if decoded.rejects:
                self._dead_letter(feed.name, decoded.rejects)
            if decoded.n:
                self.events_in[feed.name] += decoded.n
                self.batcher.add(decoded.batch, decoded.n, self.clock())
                self._last_event_at = self.clock()
                if self.batcher.n >= self.batcher.max_events and not self._backlogged():
                    self._process_batch()
        return len(payloads)

    def _apply_feedback(self, input_name: str, decoded: DecodedFeedback) -> None:
        """Channel outcomes: they affect only events processed after them, so the waiting batch goes first."""
        if decoded.rejects:
            self._dead_letter(input_name, decoded.rejects)
        if not decoded.n:
            return
        if self.batcher.n:
            self._process_batch()
        result = self.engine.feedback(decoded.ids, decoded.outcomes, decoded.ts)
        for outcome, n in result.items():
            key = (input_name, outcome)
            self.feedback_results[key] = self.feedback_results.get(key, 0) + n

    def _apply_channel_feedback(self) -> None:
        """Outcomes the channels reported since the last turn, in the order they came, after the waiting batch."""
        if not self.channel_feedback:
            return
        reports = []
        while self.channel_feedback:
            reports.append(self.channel_feedback.popleft())
        if self.batcher.n:
            self._process_batch()
        # One call per channel and run of its reports keeps the results per channel, and the order.
        start = 0
        for k in range(1, len(reports) + 1):
            if k == len(reports) or reports[k][0] != reports[start][0]:
                run = reports[start:k]
                result = self.engine.feedback([r[1] for r in run], [r[2] for r in run], [r[3] for r in run])
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
        batch, n, oldest = self.batcher.take()
        try:
            instructions = self.engine.process(batch)
        except BatchError as exc:
            # The decoders validate every row, so this is a defect; the batch is kept, not lost.
            log.error("batch refused by the engine", extra={"fields": {"error": str(exc), "events": n}})
            self._dead_letter("engine", [Reject("bad_value", str(exc), None, _batch_bytes(batch))])
            return
        self._watermark_at_last_event = self.engine.watermark
        self.events_processed += n
        self.batches_processed += 1
        self._emit(instructions)
        self.batch_latency.observe(self.clock() - oldest)

    def _emit(self, instructions: pa.Table) -> None:
        if not instructions.num_rows:
            return
        self.instructions_out += instructions.num_rows
        # A few hundred instructions per batch: a Counter beats Arrow's group_by and its fixed cost per call.
        self.instructions_by_rule_channel.update(
            zip(instructions.column("rule").to_pylist(), instructions.column("channel").to_pylist(), strict=True))
        now = self.clock()
        for queue in self.outputs:
            queue.hand_off(instructions, now)

    def _advance_if_idle(self, now: float) -> None:
        """After `idle_advance` without events, let event time follow the wall clock."""
        if self.batcher.n or self._watermark_at_last_event < 0 or self._backlogged():
            return  # events are waiting (here or, while backlogged, in the feeds' queues): not idle
        idle_ms = int((now - self._last_event_at) * 1000)
        if idle_ms < self.config.idle_advance_ms:
            return
        target = self._watermark_at_last_event + idle_ms
        if target > self.engine.watermark:
            self.idle_advances += 1
            self._emit(self.engine.advance(target))

    def _reload(self, future: Future) -> None:
        """Rules (and profiles, when configured) from their files; either refused leaves both as they were."""
        try:
            ruleset = self._rules()
            profiles = ProfileStore.load(self.config.profiles) if self.config.profiles is not None else None
        except (RulesError, ProfileError, OSError) as exc:
            self.reloads["refused"] += 1
            log.error("reload refused; the old rules and profiles keep running", extra={"fields": {"error": str(exc)}})
            future.set_result((False, str(exc)))
            return
        if self.batcher.n:
            self._process_batch()  # events that arrived before the reload run under the old rules
        try:
            # One step: the new rules are checked against the profiles they will run with.
            fate = self.engine.reload_rules(ruleset, profiles=profiles)
        except ProfileError as exc:  # a field the new rules test has a type they cannot test
            self.reloads["refused"] += 1
            log.error("reload refused; the old rules and profiles keep running", extra={"fields": {"error": str(exc)}})
            future.set_result((False, str(exc)))
            return
        self.reloads["ok"] += 1
        log.info("rules reloaded", extra={"fields": {
            "rules": str(self.config.rules), "profiles": len(self.engine.profiles), **fate}})
        future.set_result((True, f"kept {len(fate['kept'])}, fresh {len(fate['fresh'])}, "
                                 f"removed {len(fate['removed'])} rules"))

    # -- shutdown -------------------------------------------------------------

    def drain(self) -> None:
        """Stop accepting, process what was queued, hand everything off, checkpoint."""
        self._draining = True
        log.info("draining")
        for feed in self.inputs:
            feed.stop_accepting()
        for feed in self.inputs:
            while self._read(feed):
                pass
        if self.batcher.n:
            self._process_batch()
        deadline = self.clock() + DRAIN_SECONDS
        while any(q.waiting for q in self.outputs) and self.clock() < deadline:
            time.sleep(0.01)
            for queue in self.outputs:
                queue.retry(self.clock())
        for queue in self.outputs:
            if queue.waiting_instructions:
                log.error("output did not take every instruction before shutdown", extra={"fields": {
                    "output": queue.output.name, "instructions": queue.waiting_instructions}})
            queue.output.flush()
        while self._reloads:
            self._reloads.popleft().set_result((False, "shutting down"))
        if self.delivery is not None:
            # Deliveries in progress finish; what is still pending stays in the outbox for the next start.
            self.delivery.stop()
            self.delivery = None
            self._apply_channel_feedback()
        if self.config.state_dir is not None:
            self.engine.checkpoint(self.config.state_dir)
            log.info("checkpoint written", extra={"fields": {"state_dir": str(self.config.state_dir)}})
        self._refresh_stats(self.clock())

    # -- metrics and health (called on the metrics server's threads) ----------

    def _health(self) -> tuple[bool, str]:
        stalled = self.clock() - self.heartbeat
        if stalled > HEARTBEAT_SECONDS:
            return False, f"the loop has not turned for {stalled:.0f} s"
        return True, "ok"

    def metric_families(self) -> list[MetricFamily]:
        stats = self.engine_stats
        rules = stats["rules"]
        feeds = self.inputs
        return [
            counter("kairos_input_messages", "Messages received per input.",
                    [({"input": f.name}, f.counters.messages) for f in feeds]),
            counter("kairos_input_bytes", "Payload bytes received per input.",
                    [({"input": f.name}, f.counters.bytes) for f in feeds]),
            counter("kairos_input_events", "Valid events decoded per input.",
                    [({"input": name}, n) for name, n in self.events_in.items()]),
            counter("kairos_dead_letters", "Messages or rows refused, per input and reason (see the dead-letter file).",
                    [({"input": name, "reason": reason}, n) for (name, reason), n in self.rejected.items()]),
            counter("kairos_input_sequence_gaps", "Jumps forward in a sender's sequence numbers, per input.",
                    [({"input": f.name}, f.counters.gaps) for f in feeds]),
            counter("kairos_input_sequence_missing", "Messages lost before arrival, from sequence gaps, per input.",
                    [({"input": f.name}, f.counters.missing) for f in feeds]),
            counter("kairos_input_sequence_regressions", "Sequence numbers that went back or repeated, per input.",
                    [({"input": f.name}, f.counters.regressions) for f in feeds]),
            counter("kairos_input_connections", "Peers connected, per input.",
                    [({"input": f.name}, f.counters.connections) for f in feeds]),
            counter("kairos_input_disconnections",
                    "Peers gone, per input; ZeroMQ also cuts a peer off for a message over max_message_bytes.",
                    [({"input": f.name}, f.counters.disconnections) for f in feeds]),
            counter("kairos_feedback_reports", "Feedback reports per input: applied, unknown id, invalid outcome.",
                    [({"input": name, "result": result}, n) for (name, result), n in self.feedback_results.items()]),
            counter("kairos_events", "Events processed by the engine.", self.events_processed),
            counter("kairos_batches", "Batches processed by the engine.", self.batches_processed),
            counter("kairos_instructions", "Instructions handed to the outputs, per rule and channel.",
                    # dict() copies in one step under the GIL; the loop adds keys while this thread reads
                    [({"rule": r, "channel": c}, n) for (r, c), n in dict(self.instructions_by_rule_channel).items()]),
            counter("kairos_rule_matches", "Rule matches before contact policy, per rule.",
                    [({"rule": r}, s["matched"]) for r, s in rules.items()]),
            counter("kairos_policy_stops", "Matches stopped by contact policy, per rule and reason.",
                    [({"rule": r, "reason": reason}, n) for r, s in rules.items()
                     for reason, n in s["stopped"].items()]),
            counter("kairos_rule_sent", "Instructions to be delivered (treated), per rule and channel; "
                    "mode=\"shadow\": what a shadow rule would have sent.",
                    [({"rule": r, "channel": c, "mode": _mode(s)}, n) for r, s in rules.items()
                     for c, n in s["sent_by_channel"].items()]),
            counter("kairos_rule_holdout", "Instructions held out as the control group, per rule.",
                    [({"rule": r, "mode": _mode(s)}, s["holdout"]) for r, s in rules.items()]),
            counter("kairos_rule_cap_draw", "Instructions on active channels, each taking a daily and monthly "
                    "cap slot, per rule; a shadow rule's would have.",
                    [({"rule": r, "mode": _mode(s)}, s["cap_draw"]) for r, s in rules.items()]),
            counter("kairos_rule_feedback", "Channel outcomes per rule.",
                    [({"rule": r, "outcome": outcome}, n) for r, s in rules.items()
                     for outcome, n in s["feedback"].items()]),
            counter("kairos_rule_goal_conversions", "Goal events attributed to instructions, per rule and group.",
                    [({"rule": r, "group": group}, n) for r, s in rules.items() for group, n in s["goal"].items()]),
            gauge("kairos_rule_paused", "1 while a rule is paused by its guardrail (max_per_hour).",
                  [({"rule": r}, int(s["paused"])) for r, s in rules.items()]),
            counter("kairos_output_instructions", "Instructions each output took.",
                    [({"output": q.output.name}, q.output.stats().get("instructions", 0)) for q in self.outputs]),
            gauge("kairos_output_waiting_instructions", "Instructions waiting for an output that pushed back.",
                  [({"output": q.output.name}, q.waiting_instructions) for q in self.outputs]),
            counter("kairos_output_backpressure", "Times an output refused a table for now.",
                    [({"output": q.output.name}, q.backpressured) for q in self.outputs]),
            *self._channel_metric_families(),
            histogram("kairos_batch_latency_seconds",
                      "From the arrival of a batch's first message to its instructions' hand-off.",
                      self.batch_latency),
            gauge("kairos_subscribers", "Subscribers with state.", stats["subscribers"]),
            gauge("kairos_state_bytes", "Bytes held for subscriber state.", stats["state_bytes"]),
            gauge("kairos_event_time_watermark_ms", "Event time reached: largest ts seen or advanced to.",
                  self.engine.watermark),
            counter("kairos_idle_advances", "Times event time moved on the wall clock for want of events.",
                    self.idle_advances),
            counter("kairos_rules_reloads", "Rules reloads, per result.",
                    [({"result": result}, n) for result, n in self.reloads.items()]),
        ]

    def _channel_metric_families(self) -> list[MetricFamily]:
        delivery = self.delivery  # the loop sets it to None when it stops the worker at shutdown
        if delivery is None:
            return []
        stats = delivery.stats()
        try:
            rows = delivery.metrics_outbox.waiting()
        except sqlite3.Error:  # the worker stopped, and closed its connections, while this scrape ran
            rows = {}
        return [
            gauge("kairos_outbox_instructions", "Instructions pending or parked in the outbox, per channel.",
                  [({"channel": c, "status": s}, rows.get((c, s), 0))
                   for c in sorted({*stats, *(c for c, _ in rows)}) for s in ("pending", "parked")]),
            counter("kairos_channel_delivered", "Instructions each channel's peer accepted.",
                    [({"channel": c}, s["delivered"]) for c, s in stats.items()]),
            counter("kairos_channel_retries", "Delivery attempts that failed and were rescheduled, per channel.",
                    [({"channel": c}, s["retries"]) for c, s in stats.items()]),
            counter("kairos_channel_parked", "Instructions given up (rejected, or out of attempts), per channel.",
                    [({"channel": c}, s["parked"]) for c, s in stats.items()]),
            gauge("kairos_channel_in_flight", "Deliveries in progress, per channel.",
                  [({"channel": c}, s["in_flight"]) for c, s in stats.items()]),
            counter("kairos_channel_feedback_reports", "Outcomes reported by channels: applied, unknown id, invalid.",
                    [({"channel": c, "result": r}, n) for (c, r), n in dict(self.channel_feedback_results).items()]),
        ]

    def _close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if getattr(self, "delivery", None) is not None:
            self.delivery.stop()
        for queue in self.outputs:
            queue.output.close()
        for feed in self.inputs:
            feed.close()
        if getattr(self, "deadletter", None) is not None:
            self.deadletter.close()
        self.context.term()


def _mode(rule_stats: dict) -> str:
    return "shadow" if rule_stats["shadow"] else "live"


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _batch_bytes(batch: dict[str, np.ndarray]) -> bytes:
    sink = pa.BufferOutputStream()
    table = pa.table(batch)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
