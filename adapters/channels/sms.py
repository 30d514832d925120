"""The `sms` channel: Kannel's HTTP `sendsms`, delivery reports and replies back (SPEC sections 6, 7).

Sending: one HTTP GET to a Kannel smsbox's `/cgi-bin/sendsms` per instruction, with the text
rendered from the instruction's template and params.  Text that is all ASCII goes as is (Kannel
maps it to the GSM alphabet); any other text (Chinese, say) goes as UCS-2: `coding=2`,
`charset=UTF-16BE` and the UTF-16BE bytes of the text, percent-encoded.  Kannel answers
"0: Accepted for delivery" or, with no SMSC connected, "3: Queued for later delivery": both mean
the gateway has the message (with a store configured it survives a gateway restart).  An HTTP error,
any other answer, a refused connection or a timeout is `Retry`; a template that does not render is
`Rejected`.  Requests go over kept-alive connections, one per delivery in flight
(adapters/channels/http_client.py); a redirect is not followed.

Receiving, on a small HTTP server of the channel's own (`listen`, loopback by default; SPEC section 9
wants a `token` as soon as it listens beyond loopback, and then every request must carry it):

- ``GET /dlr?id=ID&type=%d``: the `dlr-url` sent with every message (`dlr-mask=31`), so Kannel calls
  it once per report with the instruction id in it.  Type 1 is reported as ``delivered``, 2 and 16
  as ``failed``; 4 (buffered) and 8 (accepted by the SMSC) are intermediate and only counted.
- ``GET /mo?from=%p&to=%P&text=%a``: point an sms-service's `get-url` here.  A reply from a
  subscriber is matched to the latest instruction this channel delivered to that number within
  `reply_window` (a bounded map, `recent_subscribers` numbers, least recently sent dropped first):
  "YES" (also "Y", "是") becomes ``accepted``, "NO" ("N", "否") ``declined``, "STOP" ("TD", "T",
  "退订", as Chinese operators ask) ``opt_out``.  `replies` replaces that table.  Other text, and
  replies from numbers with no recent instruction, are counted and not reported: feedback is by
  instruction id, and such a reply names none.

A report can race the `sendsms` answer that says the message was accepted (with a fast SMSC the
report comes first).  A receipt for an id this channel has not finished sending is held for up to
`receipt_hold` seconds and released once the send completes; one still unmatched then is reported
all the same (the id may have been sent before a restart; the engine judges ids it does not know).
Each (id, outcome) is reported once.

Idempotency: Kannel has no idempotency key, so the channel remembers the last `RECENT_IDS` ids it
has handed over and does not send one twice.  Across a crash, the one message whose
`sendsms` answer came back but was not yet recorded in the outbox is sent again; nothing else is.
"""

from __future__ import annotations

import hmac
import logging
import string
import threading
import time
import urllib.parse
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from adapters.channels.base import OUTCOMES, Channel, FeedbackSink, Instruction, Rejected, Retry
from adapters.channels.http_client import PooledHttp, RequestFailed
from adapters.outputs import OutputOptions
from engine.exposure import is_loopback_host
from engine.rules import parse_duration

log = logging.getLogger("kairos.channels.sms")

# Kannel's delivery report types (dlr-mask bits) and what each means for the subscriber.
REPORT_OUTCOMES = {1: "delivered", 2: "failed", 16: "failed"}
INTERMEDIATE_REPORTS = (4, 8)  # buffered by the SMSC, accepted by the SMSC: the outcome is still to come
DEFAULT_REPLIES = {
    "YES": "accepted", "Y": "accepted", "是": "accepted",
    "NO": "declined", "N": "declined", "否": "declined",
    "STOP": "opt_out", "TD": "opt_out", "T": "opt_out", "退订": "opt_out",
}  # fmt: skip
SWEEP_SECONDS = 0.2  # how often held receipts are looked at
# Ids remembered against sending twice and reporting twice: a few minutes of a gateway's contracted
# throughput, which covers a redelivery after a timeout or a restart of the worker; about 20 MB.
RECENT_IDS = 100_000


class TemplateError(ValueError):
    """A template that cannot be rendered with an instruction's params."""


class Templates:
    """SMS texts by template name, `str.format` syntax over the instruction's params."""

    def __init__(self, channel: str, texts: dict[str, str]):
        self.channel = channel
        self.texts = dict(texts)
        self.fields: dict[str, set[str]] = {}
        for name, text in self.texts.items():
            if not isinstance(text, str) or not text:
                raise ValueError(f"channel {channel!r}: template {name!r} must be a non-empty string")
            try:
                self.fields[name] = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            except ValueError as exc:
                raise ValueError(f"channel {channel!r}: template {name!r} is not valid: {exc}") from None
            if any(not f.isidentifier() for f in self.fields[name]):
                raise ValueError(f"channel {channel!r}: template {name!r}: fields are param names, such as {{name}}")

    def render(self, name: str, params: dict[str, str]) -> str:
        text = self.texts.get(name)
        if text is None:
            known = ", ".join(map(repr, sorted(self.texts))) or "none"
            raise TemplateError(f"no template {name!r} in channel {self.channel!r} (it has {known})")
        missing = sorted(self.fields[name] - params.keys())
        if missing:
            raise TemplateError(f"template {name!r} needs param(s) {', '.join(map(repr, missing))}; "
                                f"the instruction has {', '.join(map(repr, sorted(params))) or 'none'}")
        return text.format_map(params)


def sendsms_text(text: str) -> dict[str, str | bytes]:
    """The text parameters of a sendsms request: ASCII as it is, anything else as UCS-2 (UTF-16BE)."""
    if text.isascii():
        return {"text": text, "charset": "UTF-8"}
    return {"text": text.encode("utf-16-be"), "coding": "2", "charset": "UTF-16BE"}


def normalise_msisdn(number: str) -> int | None:
    """A subscriber number as Kannel reports it ("+8613800138000", "008613800138000") as an msisdn."""
    number = number.strip()
    if number.startswith("+"):
        number = number[1:]
    elif number.startswith("00"):
        number = number[2:]
    return int(number) if number.isdigit() and 0 < len(number) <= 18 else None


class SmsChannel(Channel):
    """Instructions as SMS through a Kannel smsbox (``type = "sms"``).  See the module docstring."""

    kind = "sms"

    def __init__(
        self,
        name: str,
        *,
        url: str,
        username: str,
        password: str,
        sender: str,
        templates: dict[str, str],
        listen: str = "127.0.0.1:0",
        token: str | None = None,
        public_url: str | None = None,
        dlr_mask: int = 31,
        timeout: float = 10.0,
        reply_window_ms: int = 86_400_000,
        recent_subscribers: int = 200_000,
        replies: dict[str, str] | None = None,
        receipt_hold: float = 10.0,
    ):
        self.name = name
        self.url = url
        self.username = username
        self.password = password
        self.sender = sender
        self.templates = Templates(name, templates)
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"channel {name!r}: key 'listen' must be HOST:PORT, not {listen!r}")
        self.host, self.port = host.strip("[]") or "127.0.0.1", int(port)
        if token is None and not is_loopback_host(self.host):
            raise ValueError(f"channel {name!r}: key 'token' is required when listen ({listen!r}) is beyond "
                             "loopback (SPEC section 9)")
        self.token = token
        self.public_url = public_url.rstrip("/") if public_url else None
        self.dlr_mask = dlr_mask
        self.timeout = timeout
        self.reply_window_ms = reply_window_ms
        self.recent_subscribers = recent_subscribers
        replies = DEFAULT_REPLIES if replies is None else replies
        for word, outcome in replies.items():
            if outcome not in OUTCOMES:
                raise ValueError(f"channel {name!r}: key 'replies': {word!r} maps to {outcome!r}, not one of "
                                 f"{', '.join(OUTCOMES)}")
        self.replies = {_reply_key(word): outcome for word, outcome in replies.items()}
        self.receipt_hold = receipt_hold
        try:
            self._http = PooledHttp(url, timeout)
        except ValueError as exc:
            raise ValueError(f"channel {name!r}: key 'url' {exc}") from None
        self._lock = threading.Lock()
        self._sent: OrderedDict[str, None] = OrderedDict()  # ids Kannel accepted, oldest first
        self._latest: OrderedDict[int, tuple[str, int]] = OrderedDict()  # msisdn -> (id, ms), least recent first
        self._reported: OrderedDict[tuple[str, str], None] = OrderedDict()  # (id, outcome) already reported
        self._held: list[tuple[float, str, str, int]] = []  # (hold until, id, outcome, ms)
        self._feedback: FeedbackSink | None = None
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._counts = dict.fromkeys((
            "sent", "queued", "duplicates", "receipts_delivered", "receipts_failed", "receipts_intermediate",
            "receipts_held", "receipts_unmatched", "replies", "replies_reported", "replies_unmatched",
            "replies_other", "bad_requests",
        ), 0)  # fmt: skip

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> SmsChannel:
        """Keys: `url` (sendsms URL, required), `username`, `password`, `from` (sender, required),
        `templates` (table: name -> text, required), `listen` (receiver HOST:PORT, default
        "127.0.0.1:0"), `token`, `public_url` (how Kannel reaches the receiver, default from `listen`),
        `dlr_mask` (default 31), `timeout` (seconds, default 10), `reply_window` (default "24h"),
        `recent_subscribers` (default 200000), `replies` (table: word -> outcome), `receipt_hold`
        (seconds, default 10)."""
        read = OutputOptions(name, options, noun="channel")
        made: dict[str, Any] = dict(
            url=read.string("url"),
            username=read.string("username"),
            password=read.string("password"),
            sender=read.string("from"),
            templates=read.table("templates"),
            listen=read.string("listen", "127.0.0.1:0"),
            token=read.string("token") if "token" in options else None,
            public_url=read.string("public_url") if "public_url" in options else None,
            dlr_mask=read.integer("dlr_mask", 31),
            timeout=read.seconds("timeout", 10.0),
            recent_subscribers=read.integer("recent_subscribers", 200_000),
            replies=read.table("replies") if "replies" in options else None,
            receipt_hold=read.seconds("receipt_hold", 10.0),
        )
        window = read.string("reply_window", "24h")
        read.finish()
        try:
            made["reply_window_ms"] = parse_duration(window)
        except ValueError as exc:
            raise read.error("reply_window", str(exc)) from None
        if not made["url"].startswith(("http://", "https://")):
            raise read.error("url", f"must be an http:// or https:// URL, not {made['url']!r}")
        return cls(name, **made)

    # -- receiving ----------------------------------------------------------------

    def start(self, feedback: FeedbackSink) -> None:
        """Bind the receiver and start serving reports and replies."""
        self._feedback = feedback
        channel = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 -- the http.server interface
                status, body = channel._handle(self.path)
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # Kannel calls once per report: too many lines for the log, counted instead

        try:
            self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as exc:
            raise OSError(f"channel {self.name!r}: cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        if self.public_url is None:
            self.public_url = f"http://{self.host}:{self.port}"
        for target, label in ((self._server.serve_forever, "receiver"), (self._sweep, "receipts")):
            thread = threading.Thread(target=target, name=f"sms-{self.name}-{label}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("sms receiver listening", extra={"fields": {"channel": self.name, "url": self.public_url}})

    def _handle(self, path: str) -> tuple[int, str]:
        parsed = urllib.parse.urlsplit(path)
        query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
        if self.token is not None and not hmac.compare_digest(query.get("token", ""), self.token):
            self._count("bad_requests")
            return 403, "token required"
        if parsed.path == "/dlr":
            return self._receipt(query)
        if parsed.path == "/mo":
            return self._reply(query)
        self._count("bad_requests")
        return 404, "unknown path"

    def _receipt(self, query: dict[str, str]) -> tuple[int, str]:
        instruction_id, kind = query.get("id", ""), query.get("type", "")
        if not instruction_id or not kind.isdigit():
            self._count("bad_requests")
            return 400, "id and type are required"
        report_type = int(kind)
        outcome = REPORT_OUTCOMES.get(report_type)
        if outcome is None:
            self._count("receipts_intermediate" if report_type in INTERMEDIATE_REPORTS else "bad_requests")
            return 200, "ok"
        now = _now_ms()
        with self._lock:
            self._counts[f"receipts_{outcome}"] += 1
            if instruction_id not in self._sent:
                self._counts["receipts_held"] += 1
                self._held.append((time.monotonic() + self.receipt_hold, instruction_id, outcome, now))
                return 200, "ok"
        self._report(instruction_id, outcome, now)
        return 200, "ok"

    def _reply(self, query: dict[str, str]) -> tuple[int, str]:
        msisdn = normalise_msisdn(query.get("from", ""))
        if msisdn is None:
            self._count("bad_requests")
            return 400, "from must be a subscriber number"
        outcome = self.replies.get(_reply_key(query.get("text", "")))
        now = _now_ms()
        with self._lock:
            self._counts["replies"] += 1
            if outcome is None:
                self._counts["replies_other"] += 1
                return 200, ""
            latest = self._latest.get(msisdn)
            if latest is None or now - latest[1] > self.reply_window_ms:
                self._counts["replies_unmatched"] += 1
                return 200, ""
            self._counts["replies_reported"] += 1
        self._report(latest[0], outcome, now)
        # An empty answer: smsbox sends the get-url's answer back to the subscriber as an SMS otherwise.
        return 200, ""

    def _report(self, instruction_id: str, outcome: str, ts: int) -> None:
        with self._lock:
            key = (instruction_id, outcome)
            if key in self._reported:
                return
            self._reported[key] = None
            _bound(self._reported, RECENT_IDS)
        if self._feedback is not None:
            self._feedback(instruction_id, outcome, ts)

    def _sweep(self) -> None:
        while not self._stopping.wait(SWEEP_SECONDS):
            self._release_held(time.monotonic())

    def _release_held(self, now: float) -> None:
        """Report held receipts whose id has been sent since, or whose hold is over."""
        with self._lock:
            due = [h for h in self._held if h[1] in self._sent or h[0] <= now]
            if not due:
                return
            self._held = [h for h in self._held if not (h[1] in self._sent or h[0] <= now)]
            self._counts["receipts_unmatched"] += sum(h[1] not in self._sent for h in due)
        for _, instruction_id, outcome, ts in due:
            self._report(instruction_id, outcome, ts)

    # -- sending ---------------------------------------------------------------

    def request_url(self, instruction: Instruction) -> str:
        """The sendsms URL for one instruction; raises TemplateError when its text cannot be rendered."""
        text = self.templates.render(instruction.template, instruction.params)
        dlr = {"id": instruction.id, "type": "%d"}
        if self.token is not None:
            dlr["token"] = self.token
        dlr_url = f"{self.public_url}/dlr?" + urllib.parse.urlencode(dlr, safe="%")
        query = {
            "username": self.username, "password": self.password, "from": self.sender,
            "to": str(instruction.msisdn), **sendsms_text(text),
            "dlr-mask": str(self.dlr_mask), "dlr-url": dlr_url,
        }  # fmt: skip
        return f"{self.url}?{urllib.parse.urlencode(query)}"

    def deliver(self, instruction: Instruction) -> None:
        if self.public_url is None:
            raise Retry(f"channel {self.name!r} is not started")
        try:
            url = self.request_url(instruction)
        except TemplateError as exc:
            raise Rejected(str(exc)) from None
        with self._lock:
            if instruction.id in self._sent:
                self._counts["duplicates"] += 1
                return
        answer = self._get(url)
        with self._lock:
            self._counts["queued" if answer.startswith("3:") else "sent"] += 1
            self._sent[instruction.id] = None
            _bound(self._sent, RECENT_IDS)
            self._latest.pop(instruction.msisdn, None)
            self._latest[instruction.msisdn] = (instruction.id, _now_ms())
            _bound(self._latest, self.recent_subscribers)
        self._release_held(time.monotonic())

    def _get(self, url: str) -> str:
        """Kannel's answer to one sendsms request; `Retry` unless it says accepted or queued."""
        try:
            reply = self._http.request("GET", url, limit=4096)
        except RequestFailed as exc:
            raise Retry(f"sendsms unreachable: {exc.reason}") from None
        answer = reply.body.decode("utf-8", "replace").strip()
        if not 200 <= reply.status < 300:
            raise Retry(f"sendsms answered HTTP {reply.status}: {answer}")
        if not answer.startswith(("0:", "3:")):
            raise Retry(f"sendsms answered {answer!r}")
        return answer

    def close(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()
        self._http.close()
        self._release_held(float("inf"))  # held receipts are reported, not dropped

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "receipts_waiting": len(self._held)}

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1


def _reply_key(text: str) -> str:
    return text.strip().strip(".!。！").upper()


def _bound(mapping: OrderedDict, size: int) -> None:
    while len(mapping) > size:
        mapping.popitem(last=False)


def _now_ms() -> int:
    return int(time.time() * 1000)
