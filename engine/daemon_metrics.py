"""What `kairos run` shows on /metrics: its metric families, read at scrape time from the daemon's counters.

Called on the metrics server's threads.  The loop owns the counters; these
functions only read them (dict() copies a dict the loop may grow in one step
under the GIL).  docs/daemon.md, "Metrics and health", lists every family.
"""

from __future__ import annotations

import platform
import sqlite3
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from engine._version import __version__
from engine.metrics import MetricFamily, counter, gauge, histogram

if TYPE_CHECKING:
    from engine.daemon import Daemon


def metric_families(daemon: Daemon) -> list[MetricFamily]:
    """Every family /metrics shows for `daemon` (docs/daemon.md lists them), read from its counters."""
    stats = daemon.engine_stats
    rules = stats["rules"]
    feeds = daemon.inputs
    return [
        build_info(),
        counter("kairos_input_messages", "Messages received per input.",
                [({"input": f.name}, f.counters.messages) for f in feeds]),
        counter("kairos_input_bytes", "Payload bytes received per input.",
                [({"input": f.name}, f.counters.bytes) for f in feeds]),
        counter("kairos_input_events", "Valid events decoded per input.",
                [({"input": name}, n) for name, n in daemon.events_in.items()]),
        counter("kairos_dead_letters", "Messages or rows refused, per input and reason (see the dead-letter file).",
                [({"input": name, "reason": reason}, n) for (name, reason), n in daemon.rejected.items()]),
        counter("kairos_input_sequence_gaps", "Jumps forward in a sender's sequence numbers, per input.",
                [({"input": f.name}, f.counters.gaps) for f in feeds]),
        counter("kairos_input_sequence_missing", "Messages lost before arrival, from sequence gaps, per input.",
                [({"input": f.name}, f.counters.missing) for f in feeds]),
        counter("kairos_input_sequence_regressions", "Sequence numbers that went back or repeated, per input.",
                [({"input": f.name}, f.counters.regressions) for f in feeds]),
        counter("kairos_input_duplicates", "Messages dropped as resends of ones already taken "
                "(sequence = \"exact\"), per input.",
                [({"input": f.name}, f.counters.duplicates) for f in feeds]),
        counter("kairos_input_out_of_order", "Messages dropped for arriving past a gap, until the sender "
                "resends the missing ones (sequence = \"exact\"), per input.",
                [({"input": f.name}, f.counters.out_of_order) for f in feeds]),
        counter("kairos_input_junk_frames", "Frames before a payload that are neither a topic nor a sequence "
                "header (dead-lettered as extra_frames), per input.",
                [({"input": f.name}, f.counters.junk_frames) for f in feeds]),
        counter("kairos_input_connections", "Peers connected, per input.",
                [({"input": f.name}, f.counters.connections) for f in feeds]),
        counter("kairos_input_disconnections",
                "Peers gone, per input; ZeroMQ also cuts a peer off for a message over max_message_bytes.",
                [({"input": f.name}, f.counters.disconnections) for f in feeds]),
        gauge("kairos_input_rcvhwm", "Messages ZeroMQ queues per peer of an input, as derived from "
              "[ingest] memory (at most the configured rcvhwm).",
              [({"input": f.name}, f.rcvhwm) for f in feeds]),
        gauge("kairos_ingest_memory_bytes", "The [ingest] memory budget the inputs' queues are derived from.",
              daemon.ingest.memory),
        counter("kairos_feedback_reports", "Feedback reports per input: applied, unknown id, invalid outcome.",
                [({"input": name, "result": result}, n) for (name, result), n in daemon.feedback_results.items()]),
        counter("kairos_events", "Events processed by the engine.", daemon.events_processed),
        counter("kairos_batches", "Batches processed by the engine.", daemon.batches_processed),
        counter("kairos_instructions", "Instructions handed to the outputs, per rule and channel.",
                # dict() copies in one step under the GIL; the loop adds keys while this thread reads
                [({"rule": r, "channel": c}, n) for (r, c), n in dict(daemon.instructions_by_rule_channel).items()]),
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
                [({"output": q.output.name}, q.output.stats().get("instructions", 0)) for q in daemon.outputs]),
        gauge("kairos_output_waiting_instructions", "Instructions waiting for an output that pushed back.",
              [({"output": q.output.name}, q.waiting_instructions) for q in daemon.outputs]),
        counter("kairos_output_backpressure", "Times an output refused a table for now.",
                [({"output": q.output.name}, q.backpressured) for q in daemon.outputs]),
        *_channels(daemon),
        histogram("kairos_batch_latency_seconds",
                  "From the arrival of a batch's first message to its instructions' hand-off.",
                  daemon.batch_latency),
        gauge("kairos_subscribers", "Subscribers with state.", stats["subscribers"]),
        gauge("kairos_state_bytes", "Bytes held for subscriber state.", stats["state_bytes"]),
        gauge("kairos_event_time_watermark_ms", "Event time reached: largest ts seen or advanced to.",
              daemon.engine.watermark),
        counter("kairos_idle_advances", "Times event time moved on the wall clock for want of events.",
                daemon.idle_advances),
        counter("kairos_rules_reloads", "Rules reloads, per result.",
                [({"result": result}, n) for result, n in daemon.reloads.items()]),
        *_durability(daemon),
    ]

def build_info() -> MetricFamily:
    """`kairos_build_info`: 1, labelled with the versions running (a dashboard joins it to tell releases apart)."""
    return gauge("kairos_build_info", "Always 1; the labels are the versions of Kairos, Python, pyarrow and numpy.",
                 [({"version": __version__, "python": platform.python_version(), "pyarrow": pa.__version__,
                    "numpy": np.__version__}, 1)])


def _durability(daemon: Daemon) -> list[MetricFamily]:
    families = []
    journal = daemon.journal
    if journal is not None:
        families += [
            gauge("kairos_journal_position", "Position of the newest journal entry.", journal.next_position - 1),
            gauge("kairos_journal_durable_position", "Newest journal position made durable (per fsync policy).",
                  journal.durable_position),
            counter("kairos_journal_bytes", "Bytes appended to the journal.", journal.bytes_written),
            counter("kairos_journal_syncs", "fdatasync calls on the journal.", journal.syncs),
            gauge("kairos_journal_torn_bytes", "Bytes cut from a torn journal tail at the last start.",
                  journal.torn_bytes),
            counter("kairos_recovery_replayed_entries", "Journal entries replayed at the last start.",
                    daemon.replayed["entries"]),
            counter("kairos_recovery_suppressed_instructions",
                    "Replayed instructions the outbox already held, not sent again, at the last start.",
                    daemon.replayed["suppressed_instructions"]),
        ]
    checkpointer = daemon.checkpointer
    if checkpointer is not None:
        last = checkpointer.last
        families += [
            counter("kairos_checkpoints", "Checkpoints written, per result.",
                    [({"result": "ok"}, checkpointer.completed), ({"result": "failed"}, checkpointer.failed)]),
            gauge("kairos_checkpoint_position", "Journal position the newest checkpoint covers.",
                  checkpointer.last_position),
            gauge("kairos_checkpoint_pause_seconds", "The loop's pause for the newest checkpoint "
                  "(flush the outputs, copy the state).", last.pause_s if last else 0.0),
            gauge("kairos_checkpoint_write_seconds", "The writer thread's time for the newest checkpoint.",
                  last.write_s if last else 0.0),
            gauge("kairos_checkpoint_bytes", "Size of the newest checkpoint.", last.bytes if last else 0),
        ]
    return families

def _channels(daemon: Daemon) -> list[MetricFamily]:
    delivery = daemon.delivery  # the loop sets it to None when it stops the worker at shutdown
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
                [({"channel": c, "result": r}, n) for (c, r), n in dict(daemon.channel_feedback_results).items()]),
        counter("kairos_channel_stat", "Each channel's own counters (its stats(): replies_unmatched, empty_answers, "
                "store_errors, reports_..., a plug-in's), per channel and stat.",
                [({"channel": c, "stat": stat}, n) for c, own in _channel_stats(delivery).items()
                 for stat, n in sorted(own.items())]),
    ]


def _channel_stats(delivery) -> dict[str, dict[str, int | float]]:
    """Channel name -> its own `stats()`, apart from the delivery worker's counters; numbers only."""
    return {name: {str(stat): n for stat, n in channel.stats().items() if isinstance(n, int | float)}
            for name, (channel, _) in delivery.channels.items()}


def _mode(rule_stats: dict) -> str:
    return "shadow" if rule_stats["shadow"] else "live"
