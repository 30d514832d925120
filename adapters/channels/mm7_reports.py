"""MM7 delivery reports: the MMS centre tells which submitted messages reached the handset.

The MMS centre posts ``DeliveryReportReq`` (3GPP TS 23.140) to the VASP with the ``MessageID`` it gave in
``SubmitRsp`` and an ``MMStatus``.  `MessageLog` remembers MessageID -> instruction id (SQLite, so reports
for messages submitted before a restart still find their instruction); `DeliveryReportServer` answers
``DeliveryReportRsp`` and reports the final status as feedback, once per message:

- ``Retrieved``, ``Forwarded``: delivered;
- ``Rejected``, ``Expired``, ``Unrecognised``, ``DeliveryConditionNotMet``: failed;
- ``Deferred``, ``Indeterminate``: not final, no feedback.

A report can arrive before the SubmitRsp that names its MessageID has been recorded (the MMS centre sends
both at once): such a report is held for `hold_ms` and settled when the MessageID is recorded, not dropped.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import sqlite3
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from adapters.channels.base import FeedbackSink
from adapters.channels.counters import Counters

log = logging.getLogger(__name__)

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
MAX_REPORT = 256 * 1024  # bytes; a report is well under 2 KiB
FINAL_STATUSES = {
    "retrieved": "delivered",
    "forwarded": "delivered",
    "rejected": "failed",
    "expired": "failed",
    "unrecognised": "failed",
    "deliveryconditionnotmet": "failed",
}
INTERIM_STATUSES = {"deferred", "indeterminate"}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class MessageLog:
    """MessageID -> instruction id of submitted messages, and whether their final status was reported."""

    def __init__(self, path: str):
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, timeout=5, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS mm7_messages (message_id TEXT PRIMARY KEY, instruction_id TEXT NOT NULL, "
            "submitted BIGINT NOT NULL, outcome TEXT)"
        )
        self._conn.commit()
        self._lock = threading.Lock()

    def remember(self, message_id: str, instruction_id: str, ts: int) -> None:
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO mm7_messages (message_id, instruction_id, submitted) VALUES (?, ?, ?) "
                "ON CONFLICT (message_id) DO NOTHING",
                (message_id, instruction_id, ts),
            )

    def instruction(self, message_id: str) -> str | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT instruction_id FROM mm7_messages WHERE message_id = ?", (message_id,)).fetchone()
        return None if row is None else row[0]

    def settle(self, message_id: str, outcome: str) -> bool:
        """Record the final outcome unless one was recorded before; whether this call recorded it."""
        with self._lock, self._conn:
            return self._conn.execute(
                "UPDATE mm7_messages SET outcome = ? WHERE message_id = ? AND outcome IS NULL", (outcome, message_id)
            ).rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class DeliveryReportServer:
    """The HTTP endpoint the MMS centre posts DeliveryReportReq to; see the module docstring."""

    def __init__(self, name: str, listen: tuple[str, int], messages: MessageLog, feedback: FeedbackSink,
                 counts: Counters, *, token: str | None, hold_ms: int, mm7_namespace: str, mm7_version: str,
                 clock: Callable[[], int] = now_ms):
        self.name = name
        self.messages = messages
        self.feedback = feedback
        self.counts = counts
        self.token = token
        self.hold_ms = hold_ms
        self.namespace = mm7_namespace
        self.mm7_version = mm7_version
        self.clock = clock
        # MessageID -> (outcome, report time, held until) of final reports that came before their MessageID
        self._held: dict[str, tuple[str, int, int]] = {}
        self._held_lock = threading.Lock()
        self._server = ThreadingHTTPServer(listen, _ReportHandler)
        self._server.daemon_threads = True
        self._server.reports = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"kairos-{name}-reports", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        with self._held_lock:
            if self._held:
                log.warning("channel %s: %d delivery report(s) for unknown messages dropped at close",
                            self.name, len(self._held))

    def submitted(self, message_id: str) -> None:
        """A MessageID was just recorded: settle a report held for it."""
        with self._held_lock:
            held = self._held.pop(message_id, None)
        if held is not None:
            self._settle(message_id, held[0], held[1])

    def receive(self, message_id: str, status: str, ts: int) -> None:
        """One DeliveryReportReq's MessageID, MMStatus and time."""
        key = status.replace("_", "").lower()
        if key in INTERIM_STATUSES:
            self.counts.add("reports_interim")
            return
        outcome = FINAL_STATUSES.get(key)
        if outcome is None:
            self.counts.add("reports_unknown_status")
            log.warning("channel %s: delivery report with unknown MMStatus %r for %s", self.name, status, message_id)
            return
        if self.messages.instruction(message_id) is None:
            now = self.clock()
            with self._held_lock:
                self._expire_held(now)
                self._held.setdefault(message_id, (outcome, ts, now + self.hold_ms))
            self.counts.add("reports_held")
            # the SubmitRsp may have been recorded meanwhile
            if self.messages.instruction(message_id) is not None:
                self.submitted(message_id)
            return
        self._settle(message_id, outcome, ts)

    def _settle(self, message_id: str, outcome: str, ts: int) -> None:
        instruction_id = self.messages.instruction(message_id)
        if instruction_id is None or not self.messages.settle(message_id, outcome):
            self.counts.add("reports_repeated")
            return
        self.feedback(instruction_id, outcome, ts)
        self.counts.add(f"reports_{outcome}")

    def _expire_held(self, now: int) -> None:
        for message_id in [m for m, (_, _, until) in self._held.items() if until <= now]:
            del self._held[message_id]
            self.counts.add("reports_unmatched")
            log.warning("channel %s: delivery report for unknown MessageID %s dropped after holding it",
                        self.name, message_id)

    def answer(self, transaction_id: str, code: int, text: str, *, fault: str | None = None) -> bytes:
        """DeliveryReportRsp, or a SOAP fault carrying RSErrorRsp when `fault` ("Client" or "Server")."""
        ns = self.namespace
        envelope = ET.Element(f"{{{SOAP_ENV}}}Envelope")
        header = ET.SubElement(envelope, f"{{{SOAP_ENV}}}Header")
        tid = ET.SubElement(header, f"{{{ns}}}TransactionID", {f"{{{SOAP_ENV}}}mustUnderstand": "1"})
        tid.text = transaction_id
        body = ET.SubElement(envelope, f"{{{SOAP_ENV}}}Body")
        parent = body
        if fault is not None:
            parent = ET.SubElement(body, f"{{{SOAP_ENV}}}Fault")
            ET.SubElement(parent, "faultcode").text = f"env:{fault}"
            ET.SubElement(parent, "faultstring").text = text
            parent = ET.SubElement(parent, "detail")
        rsp = ET.SubElement(parent, f"{{{ns}}}{'RSErrorRsp' if fault else 'DeliveryReportRsp'}")
        ET.SubElement(rsp, f"{{{ns}}}MM7Version").text = self.mm7_version
        status = ET.SubElement(rsp, f"{{{ns}}}Status")
        ET.SubElement(status, f"{{{ns}}}StatusCode").text = str(code)
        ET.SubElement(status, f"{{{ns}}}StatusText").text = text
        return ET.tostring(envelope, encoding="utf-8", xml_declaration=True)


class _BadReport(Exception):
    def __init__(self, code: int, text: str, transaction_id: str = ""):
        super().__init__(text)
        self.code = code
        self.text = text
        self.transaction_id = transaction_id


def parse_report(content_type: str, body: bytes) -> tuple[str, str, str, str | None]:
    """(TransactionID, MessageID, MMStatus, Date or None) of a DeliveryReportReq, plain or multipart."""
    xml = body
    if content_type.lower().startswith("multipart/"):
        message = BytesParser(policy=policy.default).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        start = str(message.get_param("start") or "").strip("<>")
        parts = list(message.iter_parts())
        named = [p for p in parts if str(p["Content-ID"] or "").strip("<>") == start]
        chosen = (named or parts or [None])[0]
        if chosen is None:
            raise _BadReport(4004, "empty multipart body")
        xml = chosen.get_payload(decode=True)
    try:
        envelope = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise _BadReport(4004, f"not XML: {exc}") from None
    if envelope.tag != f"{{{SOAP_ENV}}}Envelope":
        raise _BadReport(4004, "not a SOAP 1.1 envelope")
    fields: dict[str, str] = {}
    request = None
    for element in envelope.iter():
        tag = element.tag.rpartition("}")[2]
        fields.setdefault(tag, (element.text or "").strip())
        if tag.endswith("Req") and request is None:
            request = tag
    transaction_id = fields.get("TransactionID", "")
    if request != "DeliveryReportReq":
        raise _BadReport(4003, f"unsupported operation {request or 'none'}", transaction_id)
    if not fields.get("MessageID") or not fields.get("MMStatus"):
        raise _BadReport(4004, "DeliveryReportReq needs MessageID and MMStatus", transaction_id)
    return transaction_id, fields["MessageID"], fields["MMStatus"], fields.get("Date")


def report_time(date: str | None, default: int) -> int:
    """The report's Date (xs:dateTime) in ms since the epoch, else `default`."""
    if not date:
        return default
    try:
        moment = datetime.fromisoformat(date)
    except ValueError:
        return default
    if moment.tzinfo is None:
        return default
    return int(moment.timestamp() * 1000)


class _ReportHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kairos"
    sys_version = ""
    timeout = 10
    disable_nagle_algorithm = True

    def do_POST(self) -> None:  # noqa: N802 -- http.server's naming
        reports: DeliveryReportServer = self.server.reports  # type: ignore[attr-defined]
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REPORT:
            self.close_connection = True
            self._reply(413 if length > MAX_REPORT else 411, b"")
            return
        body = self.rfile.read(length)
        if not self._authorised(reports):
            self._reply(401, b"", {"WWW-Authenticate": "Bearer"})
            return
        try:
            transaction_id, message_id, status, date = parse_report(self.headers.get("Content-Type", ""), body)
            reports.receive(message_id, status, report_time(date, reports.clock()))
        except _BadReport as bad:
            reports.counts.add("reports_refused")
            self._reply(500, reports.answer(bad.transaction_id, bad.code, bad.text, fault="Client"))
            return
        except Exception:
            log.exception("channel %s: delivery report failed", reports.name)
            self._reply(500, reports.answer("", 3000, "server error", fault="Server"))
            return
        self._reply(200, reports.answer(transaction_id, 1000, "Success"))

    def _authorised(self, reports: DeliveryReportServer) -> bool:
        """A configured token is required as a bearer token, or as the password of basic authentication."""
        if reports.token is None:
            return True
        scheme, _, credentials = self.headers.get("Authorization", "").partition(" ")
        given = credentials.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.encode(), reports.token.encode())

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if body:
            self.send_header("Content-Type", "text/xml; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
