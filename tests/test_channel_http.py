"""The sms and mms channels' HTTP client: kept-alive connections, and the same Retry/Rejected mapping.

The peer is a real `http.server` on loopback speaking HTTP/1.1 that counts the TCP connections it
accepts and closes: Kannel's sendsms for the sms channel, an MM7 endpoint answering SubmitRsp for the
mms channel.  It can close every connection after its answer (without saying so), as a server that
drops idle keep-alive connections does, answer slowly, or answer with any status.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.parse
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from channel_testing import hex_id, instruction_table, wait_until

from adapters.channels.base import Channel, Instruction, Rejected, Retry
from adapters.channels.mms import MmsChannel
from adapters.channels.outbox import DeliveryPolicy, DeliveryWorker, Outbox
from adapters.channels.sms import SmsChannel

SUBMIT_RSP = (
    '<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="http://schemas.xmlsoap.org/soap/envelope/">'
    "<env:Body><SubmitRsp><MM7Version>6.8.0</MM7Version><Status><StatusCode>1000</StatusCode>"
    "<StatusText>Success</StatusText></Status><MessageID>m-{id}</MessageID></SubmitRsp></env:Body></env:Envelope>"
)


class Peer(ThreadingHTTPServer):
    """HTTP/1.1 on loopback; counts accepted and closed connections and the instruction ids it was sent."""

    daemon_threads = True

    def __init__(self, kind: str):
        super().__init__(("127.0.0.1", 0), _PeerHandler)
        self.kind = kind  # "sms": sendsms answers; "mms": SubmitRsp
        self.lock = threading.Lock()
        self.accepted = 0
        self.closed = 0
        self.ids: Counter[str] = Counter()  # instruction ids in the requests answered
        self.close_after_answer = False  # close each connection after its answer, without "Connection: close"
        self.delay = 0.0  # seconds before answering
        self.status = 200
        self.body: bytes | None = None  # None: the usual success answer
        self.headers: dict[str, str] = {}

    @property
    def url(self) -> str:
        path = "/cgi-bin/sendsms" if self.kind == "sms" else "/mm7"
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def get_request(self):
        request = super().get_request()
        with self.lock:
            self.accepted += 1
        return request

    def shutdown_request(self, request) -> None:
        super().shutdown_request(request)
        with self.lock:
            self.closed += 1

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up on a slow answer: nothing to report

    def open_connections(self) -> int:
        with self.lock:
            return self.accepted - self.closed


class _PeerHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 -- the http.server interface
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        dlr_url = query.get("dlr-url", [""])[0]
        self._answer(urllib.parse.parse_qs(urllib.parse.urlsplit(dlr_url).query).get("id", [""])[0])

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        match = re.search(rb"TransactionID[^>]*>([^<]+)<", body)
        self._answer(match.group(1).decode() if match else "")

    def _answer(self, instruction_id: str) -> None:
        peer: Peer = self.server  # type: ignore[assignment]
        if peer.delay:
            time.sleep(peer.delay)
        with peer.lock:
            peer.ids[instruction_id] += 1
        body = peer.body
        if body is None:
            body = b"0: Accepted for delivery" if peer.kind == "sms" else SUBMIT_RSP.format(id=instruction_id).encode()
        self.send_response(peer.status)
        self.send_header("Content-Type", "text/plain" if peer.kind == "sms" else "text/xml")
        for name, value in peer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if peer.close_after_answer:
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:
        pass


@contextmanager
def running(kind: str):
    server = Peer(kind)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(params=["sms", "mms"])
def peer(request):
    with running(request.param) as server:
        yield server


def make_channel(peer: Peer, timeout: float = 5.0, start: bool = True) -> Channel:
    """A channel on `peer`, started unless the outbox's worker will start it."""
    templates = {"welcome": "Hello {name}"}
    if peer.kind == "sms":
        channel = SmsChannel("sms", url=peer.url, username="u", password="p", sender="10086", templates=templates,
                             timeout=timeout)
        if start:
            channel.start(lambda instruction_id, outcome, ts: None)
        return channel
    return MmsChannel("mms", url=peer.url, vaspid="v", vasid="v", sender="10658000", templates=templates,
                      timeout=timeout)


def instruction(k: int, kind: str) -> Instruction:
    return Instruction(id=hex_id(k), ts=1, msisdn=8613800000000 + k, rule="r1", channel=kind, template="welcome",
                       priority=0, holdout=False, not_before=1, params={"name": "Li"})


def deliver_from_threads(channel: Channel, kind: str, n: int, concurrency: int) -> None:
    pending = iter(range(n))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                k = next(pending, None)
            if k is None:
                return
            try:
                channel.deliver(instruction(1000 + k, kind))
            except BaseException as exc:  # noqa: BLE001 -- reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.parametrize("concurrency", [1, 4])
def test_deliveries_reuse_connections_as_many_as_are_in_flight(peer, concurrency):
    channel = make_channel(peer)
    try:
        deliver_from_threads(channel, peer.kind, 60, concurrency)
        assert sum(peer.ids.values()) == 60
        assert 1 <= peer.accepted <= concurrency  # not 60: one connection per delivery thread at most
        assert peer.open_connections() == peer.accepted  # kept open for the next delivery
    finally:
        channel.close()
    wait_until(lambda: peer.open_connections() == 0)  # close() closes them
    channel.close()  # idempotent


def test_a_connection_the_peer_closed_between_requests_is_reopened_without_a_retry(peer):
    peer.close_after_answer = True
    channel = make_channel(peer)
    try:
        for k in range(10):
            channel.deliver(instruction(k, peer.kind))  # raises nothing: the closed connection is noticed and reopened
            wait_until(lambda: peer.open_connections() == 0)  # the peer has closed it before the next delivery
        assert peer.accepted == 10 and sum(peer.ids.values()) == 10
    finally:
        channel.close()


def test_a_peer_closing_keep_alive_connections_parks_nothing_and_sends_each_once(peer, tmp_path):
    """Through the outbox: a request that meets a connection closing under it is `Retry`, then delivered."""
    peer.close_after_answer = True
    channel = make_channel(peer, start=False)
    outbox = Outbox(tmp_path / "outbox.db")
    worker = DeliveryWorker(tmp_path / "outbox.db", {peer.kind: (
        channel, DeliveryPolicy(concurrency=2, backoff_initial=0.01, backoff_max=0.05))}, seed=3)
    worker.start(lambda name: lambda *report: None)
    ids = [hex_id(500 + k) for k in range(80)]
    try:
        outbox.enqueue(instruction_table(ids, channel=peer.kind, params={"name": "Li"}))
        worker.wake()
        wait_until(lambda: outbox.counts().get((peer.kind, "delivered"), 0) == len(ids), timeout=30)
        assert outbox.counts().get((peer.kind, "parked"), 0) == 0
    finally:
        worker.stop()
        outbox.close()
    # A request the peer never read is retried; one it answered is not sent again.
    assert sorted(peer.ids) == sorted(ids) and set(peer.ids.values()) == {1}
    assert peer.accepted >= len(ids)  # every answer closed its connection: each delivery opened a new one


def test_a_slow_peer_is_retry_and_the_next_delivery_gets_a_fresh_connection(peer):
    channel = make_channel(peer, timeout=0.3)
    try:
        peer.delay = 1.0
        with pytest.raises(Retry, match="unreachable: timed out"):
            channel.deliver(instruction(1, peer.kind))
        peer.delay = 0.0
        channel.deliver(instruction(2, peer.kind))
        assert peer.accepted == 2  # the connection that timed out was not reused
    finally:
        channel.close()


def test_after_close_a_delivery_is_retry(peer):
    channel = make_channel(peer)
    channel.deliver(instruction(1, peer.kind))
    channel.close()
    with pytest.raises(Retry, match="unreachable"):
        channel.deliver(instruction(2, peer.kind))


def test_an_answer_longer_than_what_is_read_is_judged_as_before_and_its_connection_dropped(peer):
    channel = make_channel(peer)
    try:
        if peer.kind == "sms":  # the first 4096 bytes are read, as before: an acceptance
            peer.body = b"0: Accepted for delivery" + b" " * 10_000
            channel.deliver(instruction(1, "sms"))
        else:  # the first MiB is read, as before: not XML, so no MM7 status
            peer.body = SUBMIT_RSP.format(id="x").replace("<env:Body>", f"<!--{'x' * (2 << 20)}--><env:Body>").encode()
            with pytest.raises(Rejected, match="HTTP 200 without an MM7 status"):
                channel.deliver(instruction(1, "mms"))
        peer.body = None
        channel.deliver(instruction(2, peer.kind))
        assert peer.accepted == 2  # the rest of the long answer was not read: its connection was not reused
    finally:
        channel.close()


# -- the mapping of answers, unchanged ---------------------------------------------------------------------


@pytest.mark.parametrize(("status", "body", "outcome"), [
    (202, b"0: Accepted for delivery", None),
    (202, b"3: Queued for later delivery", None),
    (200, b"Not routable. Do not try again.", "sendsms answered 'Not routable. Do not try again.'"),
    (403, b"Authorization failed for sendsms", "sendsms answered HTTP 403: Authorization failed for sendsms"),
    (503, b"", "sendsms answered HTTP 503: "),
    (302, b"elsewhere", "sendsms answered HTTP 302: elsewhere"),  # a redirect is not followed
])  # fmt: skip
def test_sms_answers_map_as_before(status, body, outcome):
    with running("sms") as peer:
        peer.status, peer.body = status, body
        peer.headers = {"Location": "http://127.0.0.1:9/"} if status == 302 else {}
        channel = make_channel(peer)
        try:
            for k in (1, 2):  # twice: the answer left the connection usable
                if outcome is None:
                    channel.deliver(instruction(k, "sms"))
                else:
                    with pytest.raises(Retry) as caught:
                        channel.deliver(instruction(k, "sms"))
                    assert caught.value.reason == outcome
            if outcome is None:
                assert channel.stats()["queued" if body.startswith(b"3:") else "sent"] == 2
        finally:
            channel.close()
        assert peer.accepted == 1


@pytest.mark.parametrize(("status", "body", "headers", "expected"), [
    (503, b"busy", {"Retry-After": "7"}, (Retry, 7.0)),
    (500, b"", {}, (Retry, None)),
    (429, b"", {}, (Retry, None)),
    (404, b"not here", {}, (Rejected, None)),
    (302, b"", {"Location": "http://127.0.0.1:9/"}, (Rejected, None)),  # a redirect is not followed
    (200, None, {"Retry-After": "7"}, (None, None)),  # a 2xx Retry-After means nothing
])  # fmt: skip
def test_mms_answers_map_as_before(status, body, headers, expected):
    with running("mms") as peer:
        peer.status, peer.body, peer.headers = status, body, headers
        channel = make_channel(peer)
        try:
            error, after = expected
            for k in (1, 2):  # twice: the answer left the connection usable
                if error is None:
                    channel.deliver(instruction(k, "mms"))
                else:
                    with pytest.raises(error) as caught:
                        channel.deliver(instruction(k, "mms"))
                    assert type(caught.value) is error
                    assert getattr(caught.value, "after", None) == after
        finally:
            channel.close()
        assert peer.accepted == 1
