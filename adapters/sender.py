"""The reference sender: a feeder that loses nothing across a crash of the daemon, or of itself.

What the daemon has accepted (journaled) survives its crash; what is still
in the sender's ZeroMQ queue or in the socket buffers at that moment does
not.  Closing that gap is the sender's part (SPEC section 10), and this is
how:

- every message goes out over PUSH as two frames, the sequence header
  (`adapters.zmq_input.sequence_header`) and the payload, with the sequence
  going up by one per message, to an input configured `sequence = "exact"`,
  which takes each sender's messages once and in order;
- the sender keeps every message the daemon has not acknowledged yet (at
  most `window`: `send` waits when that many are outstanding) and reads the
  daemon's acknowledgements, `GET /acks` on its metrics address: per input
  and sender, the last sequence number that is durable in the journal, and
  the daemon's `instance`, which changes with every start;
- when the instance changes (the daemon restarted), or the acknowledgement
  has not moved for `resend_after` seconds while messages are outstanding
  (they were dropped: past a gap, or lost with a connection), it sends every
  unacknowledged message again, in order.  The daemon drops the copies it
  already has (counted in `kairos_input_duplicates_total`);
- a sender that itself restarts asks `resume()` for the last acknowledged
  sequence and starts after it; a source that can be read again from a
  position (a capture file, `kairos replay`) then loses nothing either.

One connection to the daemon's HTTP server is kept open and reused
(`http.client`, keep-alive), not one per acknowledgement read.
"""

from __future__ import annotations

import http.client
import logging
import time
from collections import deque
from urllib.parse import urlsplit

import orjson
import zmq

from adapters.zmq_input import sequence_header

log = logging.getLogger("kairos.sender")


class AcksUnavailable(ConnectionError):
    """The daemon's acknowledgements cannot be read now (it is down, or starting)."""


class AckReader:
    """Reads `GET /acks` from a daemon over one kept-alive HTTP connection."""

    def __init__(self, url: str, timeout: float = 2.0, token: str | None = None):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"acknowledgements URL {url!r} is not http://HOST:PORT/acks")
        self.host, self.port, self.path = parts.hostname, parts.port or 80, parts.path or "/acks"
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._connection: http.client.HTTPConnection | None = None

    def read(self) -> dict:
        for attempt in (1, 2):  # a kept-alive connection the server closed fails once; a fresh one then works
            if self._connection is None:
                self._connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._connection.request("GET", self.path, headers=self.headers)
                response = self._connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 2:
                    raise AcksUnavailable(f"{self.host}:{self.port}{self.path}: {exc}") from None
                continue
            if response.status != 200:
                raise AcksUnavailable(f"{self.host}:{self.port}{self.path}: HTTP {response.status}")
            return orjson.loads(body)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class ResendingSender:
    """Sends payloads with sequence headers to one daemon input and resends what it has not acknowledged.

    Not thread-safe.  `sender` is this feeder's id (uint64), unique among the
    feeders of the input; `input` the name of the daemon's input (its
    `[inputs.NAME]`), under which the daemon reports this sender's acks.
    """

    def __init__(self, endpoint: str, acks_url: str, input: str, sender: int, *, window: int = 256,
                 resend_after: float = 2.0, poll_every: float = 0.05, context: zmq.Context | None = None,
                 token: str | None = None, clock=time.monotonic):
        self.endpoint = endpoint
        self.input = input
        self.sender = sender
        self.window = window
        self.resend_after = resend_after
        self.poll_every = poll_every
        self.clock = clock
        self.acks = AckReader(acks_url, token=token)
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.next_seq = 1
        self.acked = 0  # highest sequence the daemon has acknowledged
        self.unacked: deque[tuple[int, bytes]] = deque()  # (seq, payload), oldest first
        self.instance: str | None = None
        self._progress_at = clock()
        self._polled_at = 0.0
        self.sent = 0
        self.resent = 0
        self.resends = 0  # times everything outstanding was sent again

    # -- acknowledgements --------------------------------------------------------------

    def _read_acks(self) -> dict | None:
        try:
            return self.acks.read()
        except AcksUnavailable:
            return None

    def resume(self, timeout: float = 60.0) -> int:
        """Wait for the daemon and return the sequence to send next: one past its last acknowledged one."""
        deadline = self.clock() + timeout
        while (acks := self._read_acks()) is None:
            if self.clock() > deadline:
                raise TimeoutError(f"no acknowledgements from {self.acks.host}:{self.acks.port} in {timeout} s")
            time.sleep(0.1)
        if not acks.get("journal"):
            log.warning("the daemon runs without a journal: what it accepted does not survive its crash")
        self.instance = acks["instance"]
        self.acked = int(acks["inputs"].get(self.input, {}).get(str(self.sender), 0))
        self.next_seq = self.acked + 1
        return self.next_seq

    def poll(self) -> None:
        """Read the acknowledgements: forget what they cover, resend everything outstanding when needed."""
        self._polled_at = self.clock()
        acks = self._read_acks()
        if acks is None:
            return  # the daemon is down: keep everything, ask again later
        restarted = self.instance is not None and acks["instance"] != self.instance
        self.instance = acks["instance"]
        acked = int(acks["inputs"].get(self.input, {}).get(str(self.sender), 0))
        if acked > self.acked:
            self.acked = acked
            self._progress_at = self.clock()
        while self.unacked and self.unacked[0][0] <= self.acked:
            self.unacked.popleft()
        stalled = self.unacked and self.clock() - self._progress_at >= self.resend_after
        if self.unacked and (restarted or stalled):
            log.info("resending what the daemon has not acknowledged", extra={"fields": {
                "sender": self.sender, "from": self.unacked[0][0], "messages": len(self.unacked),
                "why": "daemon restarted" if restarted else "acknowledgement stalled"}})
            self.resends += 1
            self._progress_at = self.clock()
            for seq, payload in list(self.unacked):
                self._push(seq, payload)
                self.resent += 1

    # -- sending -------------------------------------------------------------------------

    def _push(self, seq: int, payload: bytes) -> None:
        """Hand one message to ZeroMQ, waiting (and reading acks meanwhile) while its queue is full."""
        frames = [sequence_header(self.sender, seq), payload]
        while True:
            try:
                self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                time.sleep(0.005)

    def send(self, payload: bytes) -> int:
        """Send one message; returns its sequence number.  Waits while `window` messages are unacknowledged."""
        while len(self.unacked) >= self.window:
            self.poll()
            if len(self.unacked) >= self.window:
                time.sleep(self.poll_every)
        seq = self.next_seq
        self.next_seq += 1
        self.unacked.append((seq, payload))
        self._push(seq, payload)
        self.sent += 1
        if self.clock() - self._polled_at >= self.poll_every:
            self.poll()
        return seq

    def flush(self, timeout: float = 300.0) -> None:
        """Wait until the daemon has acknowledged everything sent (resending as needed)."""
        deadline = self.clock() + timeout
        while self.unacked:
            if self.clock() > deadline:
                raise TimeoutError(f"{len(self.unacked)} messages from sequence {self.unacked[0][0]} are not "
                                   f"acknowledged after {timeout} s")
            time.sleep(self.poll_every)
            self.poll()

    def close(self) -> None:
        self.acks.close()
        self.socket.close(0)
        if self._own_context:
            self.context.term()
