"""What the portal and crm channels share: offers in an `OfferStore`, served over a small HTTP API.

`deliver` stores the instruction as an offer (idempotent by its id, so a retry or a replay leaves one
offer); the subscriber's answer comes back over HTTP and is reported through `feedback` once per
response id.  A store that is down makes `deliver` raise `Retry` (the outbox tries again later) and the
HTTP API answer within its timeout instead of hanging the caller.

The API binds to loopback unless configured otherwise; bound beyond loopback it needs a token, and every
write (POST) must then carry ``Authorization: Bearer TOKEN`` (SPEC section 9).  A configured token is
checked wherever the API is bound.

Holdout instructions (the control group) are never presented: `deliver` accepts them and stores nothing.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

from adapters.channels.base import Channel, FeedbackSink, Instruction, Retry
from adapters.channels.counters import Counters
from adapters.channels.options import ChannelOptions
from adapters.channels.store import RESPONSE_OUTCOMES, Answer, Offer, OfferStore, StoreUnavailable
from engine.exposure import is_loopback_host

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # bytes; a response post is a few dozen
MAX_MSISDN = (1 << 63) - 1  # msisdn is int64 (SPEC section 5)
# HTTP status for each store answer that changed nothing.
_REFUSALS = {"unknown": 404, "expired": 410, "closed": 409, "held": 409, "conflict": 409}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class HttpError(Exception):
    """An HTTP answer other than success: status and a JSON body."""

    def __init__(self, status: int, error: str, /, **detail: Any):
        super().__init__(error)
        self.status = status
        self.body = {"error": error, **detail}


# (channel, msisdn, path groups, query, JSON body or None) -> (status, JSON-able body or None)
Route = Callable[["OfferChannel", int, tuple[str, ...], dict[str, list[str]], Any], tuple[int, Any]]


class OfferChannel(Channel):
    """A channel that leaves offers for the subscriber to answer; subclasses declare `routes`.

    Config keys shared by both (see docs/channels.md): `path` (SQLite file) or `dsn`
    (postgresql://...), `listen`, `token`, `offer_ttl`, `timeout`, `expire_every`.
    """

    # (method, path pattern after /subscribers/{msisdn}, handler), tried in order.
    routes: ClassVar[tuple[tuple[str, re.Pattern[str], Route], ...]]
    default_listen: ClassVar[str]

    def __init__(self, name: str, store: OfferStore, *, listen: tuple[str, int], token: str | None,
                 offer_ttl_ms: int, timeout: float, expire_every_ms: int,
                 clock: Callable[[], int] = now_ms):
        host = listen[0]
        if not is_loopback_host(host) and not token:
            raise ValueError(f"channel {name!r}: listen {host!r} is beyond loopback; set a token (SPEC section 9)")
        self.name = name
        self.store = store
        self.listen = listen
        self.token = token
        self.offer_ttl_ms = offer_ttl_ms
        self.timeout = timeout
        self.expire_every_ms = expire_every_ms
        self.clock = clock
        self.counts = Counters()
        self._feedback: FeedbackSink | None = None
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"kairos-{name}-store")
        self._closed = False

    @classmethod
    def _options(cls, name: str, options: dict[str, Any]) -> tuple[ChannelOptions, dict[str, Any]]:
        """The shared keys read from `options`; the reader, for subclasses' own keys and `finish()`."""
        o = ChannelOptions(name, options)
        dsn = o.string("dsn", None) if "dsn" in options else None
        path = o.string("path", None) if "path" in options else None
        if dsn is not None and path is not None:
            raise o.error("dsn", "and 'path' are exclusive: dsn for PostgreSQL, path for a SQLite file")
        if dsn is not None and not dsn.startswith(("postgresql://", "postgres://")):
            # not echoed: a DSN may hold a password
            raise o.error("dsn", "must be a postgresql:// URL (postgresql://user@host:port/db); the value is not shown")
        timeout = o.seconds("timeout", 0.5)
        kwargs = {
            "listen": o.listen("listen", cls.default_listen),
            "token": o.string("token", None) if "token" in options else None,
            "offer_ttl_ms": o.duration_ms("offer_ttl", "7d"),
            "timeout": timeout,
            "expire_every_ms": o.duration_ms("expire_every", "1m"),
        }
        target = dsn or path or f"var/{name}.sqlite"
        kwargs["store"] = OfferStore(target, timeout=max(timeout, 1.0))
        return o, kwargs

    # -- delivery ----------------------------------------------------------------------------------------------

    def deliver(self, instruction: Instruction) -> None:
        if instruction.holdout:
            self.counts.add("holdout")
            return
        offer = Offer(
            id=instruction.id, msisdn=instruction.msisdn, rule=instruction.rule, channel=self.name,
            template=instruction.template, params=dict(instruction.params), priority=instruction.priority,
            created=self.clock(), not_before=instruction.not_before,
            expires_at=instruction.not_before + self.offer_ttl_ms,
        )
        try:
            new = self.store.put(offer)
        except StoreUnavailable as exc:
            self.counts.add("store_errors")
            raise Retry(str(exc)) from exc
        self.counts.add("offers" if new else "offer_repeats")

    # -- receiving ---------------------------------------------------------------------------------------------

    def start(self, feedback: FeedbackSink) -> None:
        if self._server is not None:
            raise RuntimeError(f"channel {self.name!r} is already started")
        self._feedback = feedback
        try:
            server = ThreadingHTTPServer(self.listen, _Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"channel {self.name!r}: cannot listen on {self.listen[0]}:{self.listen[1]}: "
                                     f"{exc.strerror}") from exc
        server.daemon_threads = True
        server.channel = self  # type: ignore[attr-defined]
        self._server = server
        started = self.clock()
        threads = [
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                             name=f"kairos-{self.name}-http", daemon=True),
            threading.Thread(target=self._maintain, args=(started,), name=f"kairos-{self.name}-expiry", daemon=True),
        ]
        for t in threads:
            t.start()
        self._threads = threads
        log.info("channel %s listening on http://%s:%d", self.name, *self.address)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the API listens on, once started (port 0 in the config picks a free one)."""
        if self._server is None:
            raise RuntimeError(f"channel {self.name!r} is not started")
        return self._server.server_address[:2]

    def _maintain(self, started: int) -> None:
        """Expire offers now and then; report outcomes a previous run recorded but did not report."""
        replayed = False
        while True:
            try:
                if not replayed:
                    for offer_id, outcome, ts, response_id in self.store.unreported(self.name, before=started):
                        self._report(offer_id, outcome, ts, response_id)
                    replayed = True
                expired = self.store.expire(self.clock())
                self.counts.add("expired", expired)
            except StoreUnavailable as exc:
                log.warning("channel %s: %s", self.name, exc)
            if self._stopping.wait(self.expire_every_ms / 1000):
                return

    def _report(self, offer_id: str, outcome: str, ts: int, response_id: str) -> None:
        assert self._feedback is not None
        try:
            self._feedback(offer_id, outcome, ts)
        except Exception:
            # left unreported: the next start reports it again; the poster's answer is recorded either way
            log.exception("channel %s: feedback for response %s failed", self.name, response_id)
            self.counts.add("feedback_errors")
            return
        self.counts.add("feedback")
        try:
            self.store.mark_reported(response_id)
        except StoreUnavailable as exc:
            # reported again after a restart: feedback is at least once across crashes, once per run
            log.warning("channel %s: response %s reported but not marked: %s", self.name, response_id, exc)

    def ask(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`call(*args)` on the store, within `timeout` seconds or `StoreUnavailable`: the API never hangs."""
        future = self._pool.submit(call, *args, **kwargs)
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            future.cancel()
            self.counts.add("store_timeouts")
            raise StoreUnavailable(f"the offer store did not answer within {self.timeout} s") from None
        except StoreUnavailable:
            self.counts.add("store_errors")
            raise

    def answer_outcome(self, offer_id: str, msisdn: int, body: Any, outcomes: tuple[str, ...],
                       agent: str | None = None) -> tuple[int, Any]:
        """Record a response posted over HTTP and report it once: the HTTP answer."""
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        response_id, outcome = body.get("response_id"), body.get("outcome")
        if not isinstance(response_id, str) or not response_id or len(response_id) > 200:
            raise HttpError(400, "response_id must be a non-empty string of at most 200 characters")
        if outcome not in outcomes:
            raise HttpError(400, f"outcome must be one of {', '.join(outcomes)}", outcome=outcome)
        answer = self.ask(self._record, offer_id, msisdn, response_id, outcome, agent)
        if answer.result == "ok":
            return 200, {"recorded": True, "offer": answer.offer.to_json()}
        if answer.result == "repeat":
            self.counts.add("outcome_repeats")
            return 200, {"recorded": False, "repeat": True, "offer": answer.offer.to_json()}
        raise refusal(answer)

    def _record(self, offer_id: str, msisdn: int, response_id: str, outcome: str, agent: str | None) -> Answer:
        """Record a response and report it when it is new, as one piece of work: should the HTTP answer time
        out, the work still finishes, so a recorded response is never left unreported."""
        now = self.clock()
        answer = self.store.record_outcome(offer_id, msisdn, self.name, response_id, outcome, now, agent=agent)
        if answer.result == "ok":
            self.counts.add("outcomes")
            self._report(offer_id, outcome, now, response_id)
        return answer

    # -- the end -----------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    def forget(self, msisdns: list[int]) -> int:
        """Erase the offers of these subscribers, and their answers, from the offer store."""
        return self.store.forget(msisdns)

    def stats(self) -> dict[str, int]:
        return self.counts.snapshot()


def refusal(answer: Answer) -> HttpError:
    """The HTTP error for a store answer that changed nothing."""
    detail = dict(answer.detail)
    if answer.offer is not None:
        detail["status"] = answer.offer.status
    return HttpError(_REFUSALS[answer.result], answer.result, **detail)


def body_field(body: Any, key: str) -> str:
    """A required non-empty string field of a JSON object body."""
    value = body.get(key) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value or len(value) > 200:
        raise HttpError(400, f"{key} must be a non-empty string of at most 200 characters")
    return value


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, "bad_json", detail=str(exc)) from None


_SUBSCRIBER = re.compile(r"/subscribers/(\d{1,19})(/.*)")


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1: a portal's connection pool reuses connections; every answer states its length
    protocol_version = "HTTP/1.1"
    server_version = "kairos"
    sys_version = ""
    timeout = 10  # seconds a client may take to send a request, or keep an idle connection open
    # headers and body go out in separate writes; with Nagle's algorithm and the client's delayed ACK
    # each answer on a kept-alive connection would wait about 40 ms
    disable_nagle_algorithm = True

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        channel: OfferChannel = self.server.channel  # type: ignore[attr-defined]
        self._body_read = method != "POST" and not self.headers.get("Content-Length", "0").strip("0 ")
        try:
            status, body = self._route(channel, method)
        except HttpError as exc:
            status, body = exc.status, exc.body
        except StoreUnavailable as exc:
            status, body = 503, {"error": "store_unavailable", "detail": str(exc)}
        except Exception:
            log.exception("channel %s: %s %s failed", channel.name, method, self.path)
            status, body = 500, {"error": "internal"}
        if not self._body_read:
            # an unread body would be taken for the next request on this connection
            self.close_connection = True
        self._send(status, body)

    def _route(self, channel: OfferChannel, method: str) -> tuple[int, Any]:
        url = urlsplit(self.path)
        match = _SUBSCRIBER.fullmatch(url.path)
        if match is None:
            raise HttpError(404, "not_found")
        msisdn, rest = int(match.group(1)), match.group(2)
        if msisdn > MAX_MSISDN:
            raise HttpError(404, "not_found")
        allowed = []
        for route_method, pattern, handler in channel.routes:
            m = pattern.fullmatch(rest)
            if m is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            body = None
            if method == "POST":
                # read before refusing, so that the client is not cut off mid-request
                raw = self._read_body()
                self._authorise(channel)
                body = _parse_json(raw)
            groups = tuple(unquote(g) for g in m.groups())
            return handler(channel, msisdn, groups, parse_qs(url.query), body)
        if allowed:
            raise HttpError(405, "method_not_allowed", allowed=allowed)
        raise HttpError(404, "not_found")

    def _authorise(self, channel: OfferChannel) -> None:
        if channel.token is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), channel.token.encode()):
            raise HttpError(401, "unauthorized")

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise HttpError(411, "length_required") from None
        if not 0 <= length <= MAX_BODY:
            raise HttpError(413, "body_too_large", limit=MAX_BODY)
        raw = self.rfile.read(length)
        self._body_read = True
        return raw

    def _send(self, status: int, body: Any) -> None:
        data = b"" if body is None else json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if status == 503:
            self.send_header("Retry-After", "1")
        if self.close_connection:
            self.send_header("Connection", "close")
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        if status != 204:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


__all__ = ["RESPONSE_OUTCOMES", "HttpError", "OfferChannel", "body_field", "now_ms", "refusal"]
