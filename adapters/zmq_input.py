"""ZeroMQ feed sockets: receive messages and account for loss.

One `ZmqInput` per configured feed.  It owns a PULL or SUB socket, takes
whole messages off it without blocking, and checks per-sender sequence
numbers so that loss is counted whatever the socket type.

Framing.  The last frame of a ZeroMQ message is the payload (an Arrow IPC
stream, a msgpack array or NDJSON lines).  A feeder that wants loss
accounting puts a 20-byte sequence header frame right before the payload:
`SEQUENCE_HEADER.pack(b"KSEQ", sender, seq)` (little-endian: magic, sender id
as uint64, sequence number as uint64, starting anywhere and going up by one
per message).  Earlier frames, such as a PUB topic, are ignored.

Loss and backpressure (measured on this kind of machine, see docs/daemon.md):
a PULL socket lets at most `rcvhwm` messages wait, after which the sender's
PUSH blocks: nothing is lost, the feeder slows down.  A SUB socket drops
messages silently once `rcvhwm` are waiting; only sequence gaps show it.
Messages over `max_message_bytes` are refused by ZeroMQ itself, which closes
that sender's connection (ZMQ_MAXMSGSIZE), so memory stays bounded; the
socket monitor counts the disconnection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from engine.config import InputConfig

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
    senders: dict[int, int] = field(default_factory=dict)  # sender id -> last sequence number seen


@dataclass(frozen=True)
class SequenceEvent:
    """A gap or regression in one sender's sequence, for the daemon to log."""

    sender: int
    expected: int
    got: int


class ZmqInput:
    """One feed's socket.  Not thread-safe: the daemon's loop owns it."""

    def __init__(self, config: InputConfig, context: zmq.Context):
        self.config = config
        self.name = config.name
        self.counters = InputCounters()
        socket_type = zmq.PULL if config.socket == "pull" else zmq.SUB
        self.socket = context.socket(socket_type)
        try:
            self.socket.setsockopt(zmq.RCVHWM, config.rcvhwm)
            self.socket.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
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

    def receive(self, max_messages: int) -> tuple[list[memoryview], list[SequenceEvent]]:
        """Up to `max_messages` payloads waiting now (zero-copy, read-only), and sequence events.

        Never blocks: returns what the socket holds, possibly nothing.
        """
        payloads: list[memoryview] = []
        events: list[SequenceEvent] = []
        counters = self.counters
        for _ in range(max_messages):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            payload = frames[-1].buffer
            counters.messages += 1
            counters.bytes += len(payload)
            payloads.append(payload)
            if len(frames) >= 2:
                header = frames[-2].bytes
                if len(header) == SEQUENCE_HEADER.size and header[:4] == SEQUENCE_MAGIC:
                    _, sender, seq = SEQUENCE_HEADER.unpack(header)
                    event = self._check_sequence(sender, seq)
                    if event is not None:
                        events.append(event)
        return payloads, events

    def count_connections(self) -> None:
        """Take the socket monitor's connection events into the counters (never blocks)."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.counters.disconnections += 1
            else:
                self.counters.connections += 1

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
