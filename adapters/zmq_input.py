"""ZeroMQ feed sockets: receive messages and account for loss.

One `ZmqInput` per configured feed.  It owns a PULL or SUB socket, takes
whole messages off it without blocking, and checks per-sender sequence
numbers so that loss is counted whatever the socket type.

Framing.  The last frame of a ZeroMQ message is the payload (an Arrow IPC
stream, a msgpack array or NDJSON lines).  A feeder that wants loss
accounting puts a 20-byte sequence header frame right before the payload:
`SEQUENCE_HEADER.pack(b"KSEQ", sender, seq)` (little-endian: magic, sender id
as uint64, sequence number as uint64, starting anywhere and going up by one
per message).  On a SUB socket the first of several frames may be the PUB
topic.  Any other frame before the payload is junk: the payload is still
read, and the junk frame is counted and handed back for the dead-letter file.

Sequence modes (`sequence` in the input's config):

- "count" (default): every message is taken; a jump forward counts a gap and
  the messages missing, a step back or a repeat counts a regression.
- "exact": each sender's messages are taken once and in order, for senders
  that keep what they sent and resend it (adapters/sender.py): a message at
  or below the sender's last accepted sequence is a duplicate and dropped; one
  past a gap is dropped too, until the sender resends the missing ones.  The
  daemon acknowledges the last durable sequence per sender (GET /acks).

Loss and backpressure (measured on this kind of machine, see docs/daemon.md):
a socket lets at most `rcvhwm` messages wait per connected peer, and ZeroMQ
reads one more from each peer's connection; then it stops reading that
connection.  A PULL socket's sender then blocks in its PUSH: nothing is lost,
the feeder slows down.  A SUB socket's publisher drops what it cannot send,
in its own process and silently: only sequence gaps show it here.
Sizes: a message over `max_message_bytes` but within twice that reaches
Kairos and is dead-lettered as `too_large` (its first bytes kept).  ZeroMQ
itself refuses one over twice the limit (ZMQ_MAXMSGSIZE) and closes that
sender's connection, so memory stays bounded; the socket monitor counts the
disconnection, and nothing of the message reaches Kairos to dead-letter.

Memory: the daemon gives each input a share of `[ingest] memory`
(engine.config.plan_ingest) and the rcvhwm that keeps its queue, and the one
message being read, within it at messages of twice `max_message_bytes`.
When more peers connect, the rcvhwm of every connection is lowered so that
all of them together still fit (never below 1).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from engine.config import HARD_LIMIT_FACTOR, InputConfig

log = logging.getLogger("kairos.input")

SEQUENCE_HEADER = struct.Struct("<4sQQ")
SEQUENCE_MAGIC = b"KSEQ"


def sequence_header(sender: int, seq: int) -> bytes:
    """The frame a feeder sends before a payload to have its sequence checked."""
    return SEQUENCE_HEADER.pack(SEQUENCE_MAGIC, sender, seq)


@dataclass
class InputCounters:
    """What one feed delivered and what it lost; all monotonic."""

    messages: int = 0
    bytes: int = 0
    sequenced: int = 0  # messages that carried a sequence header
    gaps: int = 0  # times a sender's sequence jumped forward
    missing: int = 0  # messages skipped over by those jumps: lost before they reached us
    regressions: int = 0  # a sender's sequence went back or repeated (restart, duplicate, reorder)
    connections: int = 0  # peers connected or accepted, ever
    disconnections: int = 0  # peers gone, among them those cut off for a message over max_message_bytes
    duplicates: int = 0  # "exact": resent messages already taken, dropped
    out_of_order: int = 0  # "exact": messages past a gap, dropped until the sender resends the missing ones
    junk_frames: int = 0  # frames before the payload that are neither a topic nor a sequence header
    senders: dict[int, int] = field(default_factory=dict)  # sender id -> last sequence number taken


@dataclass(frozen=True)
class Received:
    """One message taken: its payload (zero-copy, read-only), its sender and sequence when it carried a
    header, and any junk frames that came before it."""

    payload: memoryview
    sender: int | None = None
    seq: int | None = None
    junk: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class SequenceEvent:
    """A gap or regression in one sender's sequence, for the daemon to log."""

    sender: int
    expected: int
    got: int


class ZmqInput:
    """One feed's socket.  Not thread-safe: the daemon's loop owns it."""

    def __init__(self, config: InputConfig, context: zmq.Context, rcvhwm: int | None = None,
                 share: int | None = None):
        """`rcvhwm`: the high-water mark for one peer (default: the configured one); `share`: the bytes this
        input's queues may hold, by which the high-water mark is lowered when more peers connect (None: not)."""
        self.config = config
        self.name = config.name
        self.counters = InputCounters()
        self.hard_limit = HARD_LIMIT_FACTOR * config.max_message_bytes  # the largest message ZeroMQ lets in
        self.share = share
        self.base_rcvhwm = rcvhwm if rcvhwm is not None else config.rcvhwm
        self.rcvhwm = self.base_rcvhwm  # now, for every connection: lowered while several peers are connected
        self.peers = 0
        self.over_share = False  # more peers than even an rcvhwm of 1 keeps within the share
        socket_type = zmq.PULL if config.socket == "pull" else zmq.SUB
        self.socket = context.socket(socket_type)
        try:
            self.socket.setsockopt(zmq.RCVHWM, self.rcvhwm)
            self.socket.setsockopt(zmq.MAXMSGSIZE, self.hard_limit)
            self.socket.setsockopt(zmq.LINGER, 0)
            if socket_type == zmq.SUB:
                for topic in config.subscribe:
                    self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
            # ZeroMQ drops a connection that sends a message over MAXMSGSIZE without a word to either side;
            # its socket monitor is the only place that shows it.  Made before bind/connect so no event is missed.
            self.monitor = self.socket.get_monitor_socket(
                zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            if config.bind:
                self.socket.bind(config.endpoint)
                # tcp://127.0.0.1:0 binds an ephemeral port; keep the real one for logs and tests
                self.endpoint = self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
            else:
                self.socket.connect(config.endpoint)
                self.endpoint = config.endpoint
        except zmq.ZMQError:
            if hasattr(self, "monitor"):
                self.socket.disable_monitor()
                self.monitor.close(0)
            self.socket.close(0)
            raise

    def receive(self, max_messages: int, max_bytes: int | None = None) -> tuple[list[Received], list[SequenceEvent]]:
        """Up to `max_messages` messages waiting now, and sequence events (gaps, regressions) to log.

        Never blocks: returns what the socket holds, possibly nothing.  With
        `max_bytes`, takes no more once the messages taken hold that many bytes
        (the last one may pass it).  In "exact" mode, duplicates and messages
        past a gap are counted and left out.
        """
        taken: list[Received] = []
        events: list[SequenceEvent] = []
        counters = self.counters
        exact = self.config.sequence == "exact"
        topic_allowed = self.config.socket == "sub"
        held = 0
        for _ in range(max_messages):
            if max_bytes is not None and held >= max_bytes:
                break
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            payload = frames[-1].buffer
            held += sum(len(frame) for frame in frames)
            counters.messages += 1
            counters.bytes += len(payload)
            sender = seq = None
            before = frames[:-1]
            if before:
                header = before[-1].bytes
                if len(header) == SEQUENCE_HEADER.size and header[:4] == SEQUENCE_MAGIC:
                    _, sender, seq = SEQUENCE_HEADER.unpack(header)
                    before = before[:-1]
            if topic_allowed and before:
                before = before[1:]
            junk = tuple(frame.bytes for frame in before)
            counters.junk_frames += len(junk)
            if sender is not None:
                if exact:
                    if not self._take_exactly(sender, seq):
                        continue
                else:
                    event = self._check_sequence(sender, seq)
                    if event is not None:
                        events.append(event)
            taken.append(Received(payload, sender, seq, junk))
        return taken, events

    def _take_exactly(self, sender: int, seq: int) -> bool:
        """Whether an "exact" input takes message `seq` of `sender` (the next one, or a sender's first)."""
        counters = self.counters
        counters.sequenced += 1
        last = counters.senders.get(sender)
        if last is not None and seq <= last:
            counters.duplicates += 1
            return False
        if last is not None and seq > last + 1:
            counters.out_of_order += 1
            return False
        counters.senders[sender] = seq
        return True

    def count_connections(self) -> None:
        """Take the socket monitor's connection events into the counters, and the high-water mark to the
        peers connected now (never blocks)."""
        changed = False
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            changed = True
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.counters.disconnections += 1
            else:
                self.counters.connections += 1
        if changed:
            self.peers = max(0, self.counters.connections - self.counters.disconnections)
            self._fit_rcvhwm()

    def _fit_rcvhwm(self) -> None:
        """Each peer's connection has a queue of its own: with p peers, each may hold share / p."""
        if self.share is None:
            return
        peers = max(1, self.peers)
        fits = self.share // (peers * self.hard_limit) - 1  # less the message ZeroMQ reads from each
        rcvhwm = max(1, min(self.base_rcvhwm, fits))
        if fits < 1 and not self.over_share:
            log.warning("input queues may hold more than their share of ingest memory: too many peers", extra={
                "fields": {"input": self.name, "peers": peers, "share": self.share,
                           "holds": peers * 2 * self.hard_limit}})
        self.over_share = fits < 1
        if rcvhwm != self.rcvhwm:
            # ZeroMQ (4.2 and later) applies a changed RCVHWM to the connections already made, too.
            self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
            self.rcvhwm = rcvhwm

    def _check_sequence(self, sender: int, seq: int) -> SequenceEvent | None:
        counters = self.counters
        counters.sequenced += 1
        last = counters.senders.get(sender)
        counters.senders[sender] = seq
        if last is None or seq == last + 1:
            return None
        if seq > last + 1:
            counters.gaps += 1
            counters.missing += seq - last - 1
        else:
            counters.regressions += 1
        return SequenceEvent(sender, last + 1, seq)

    def stop_accepting(self) -> None:
        """Stop taking new messages from the network; what ZeroMQ already queued stays readable."""
        try:
            if self.config.bind:
                self.socket.unbind(self.endpoint)
            else:
                self.socket.disconnect(self.endpoint)
        except zmq.ZMQError:
            pass  # already gone: nothing more can arrive either way

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(0)
        self.socket.close(0)
