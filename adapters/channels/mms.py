"""mms: MM7 SubmitReq to an MMS centre (3GPP TS 23.140, SOAP 1.1 over HTTP).

One instruction is one HTTP POST whose body is ``multipart/related``: the SOAP envelope is the `start`
part, and the message content is a second part that ``<Content href="cid:...">`` in the SubmitReq points
to.  The content is a ``text/plain; charset=utf-8`` part rendered from the instruction's template and
params, or, when the template has an image in `images`, a ``multipart/mixed`` holding that text and the
image.  The SOAP header's ``TransactionID`` (``mustUnderstand="1"``) is the instruction id, the
idempotency key: a retried submission carries the same TransactionID, for the MMS centre to recognise.

The answer decides what `deliver` does (MM7 status codes, TS 23.140 annex):

- SubmitRsp with a 1xxx StatusCode (1000 success, 1100 partial success): delivered to the MMS centre.
- 2xxx (client errors) and 4xxx (service errors: bad identification, validation error, service denied):
  `Rejected`, never retried; except 4006 "service unavailable", which is `Retry`.
- 3xxx (server errors), a SOAP fault whose faultcode is Server and carries no status code, HTTP 5xx
  without a SOAP answer, HTTP 429, timeouts and connection errors: `Retry` (after Retry-After if given).

Submissions go over kept-alive connections, one per delivery in flight
(adapters/channels/http_client.py); a redirect is not followed (it is an HTTP status without an MM7 one).

A SubmitRsp means the MMS centre took the message, not that it reached the handset.  With `listen` set,
`start` opens an endpoint for the MMS centre's delivery reports (DeliveryReportReq), which come back as
delivered/failed feedback (adapters/channels/mm7_reports.py).  Config keys: docs/channels.md.
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import string
import xml.etree.ElementTree as ET
from email import policy
from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from pathlib import Path
from typing import Any

from adapters.channels.base import Channel, FeedbackSink, Instruction, Rejected, Retry
from adapters.channels.counters import Counters
from adapters.channels.http_client import PooledHttp, RequestFailed
from adapters.channels.mm7_reports import DeliveryReportServer, MessageLog, now_ms
from adapters.channels.options import ChannelOptions
from engine.exposure import is_loopback_host

log = logging.getLogger(__name__)

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
MM7_REL6 = "http://www.3gpp.org/ftp/Specs/archive/23_series/23.140/schema/REL-6-MM7-1-4"
ENVELOPE_CID = "envelope@kairos"
CONTENT_CID = "content@kairos"
ET.register_namespace("env", SOAP_ENV)
ET.register_namespace("mm7", MM7_REL6)
MAX_ANSWER = 1 << 20  # bytes read from the MMS centre's answer


class MmsChannel(Channel):
    kind = "mms"

    def __init__(self, name: str, *, url: str, vaspid: str, vasid: str, sender: str, templates: dict[str, str],
                 service_code: str | None = None, subject: str | None = None,
                 images: dict[str, Path] | None = None, username: str | None = None, password: str | None = None,
                 namespace: str = MM7_REL6, mm7_version: str = "6.8.0", timeout: float = 10.0,
                 listen: tuple[str, int] | None = None, token: str | None = None, messages_path: str | None = None,
                 report_hold_ms: int = 60_000):
        if listen is not None and not is_loopback_host(listen[0]) and not token:
            raise ValueError(f"channel {name!r}: listen {listen[0]!r} is beyond loopback; set a token "
                             "(SPEC section 9)")
        self.name = name
        self.url = url
        self.vaspid = vaspid
        self.vasid = vasid
        self.sender = sender
        self.service_code = service_code
        self.subject = subject
        self.templates = dict(templates)
        self.images = {key: (path.read_bytes(), _image_type(name, key, path)) for key, path in (images or {}).items()}
        self.namespace = namespace
        self.mm7_version = mm7_version
        self.timeout = timeout
        try:
            self._http = PooledHttp(url, timeout)
        except ValueError as exc:
            raise ValueError(f"channel {name!r}: key 'url' {exc}") from None
        self._authorization = None
        if username is not None:
            credentials = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self._authorization = f"Basic {credentials}"
        self.counts = Counters()
        self.listen = listen
        self.token = token
        self.report_hold_ms = report_hold_ms
        # MessageID -> instruction id, kept only when delivery reports are received
        self._messages = None if listen is None else MessageLog(messages_path or f"var/{name}-messages.sqlite")
        self._reports: DeliveryReportServer | None = None

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> MmsChannel:
        o = ChannelOptions(name, options)
        url = o.string("url")
        if not url.startswith(("http://", "https://")):
            raise o.error("url", f"must be an http:// or https:// URL, not {url!r}")
        templates = o.strings("templates")
        if not templates:
            raise o.error("templates", "must name at least one template")
        images = {key: Path(value) for key, value in o.strings("images", {}).items()}
        for key, path in images.items():
            if key not in templates:
                raise o.error("images", f"names template {key!r}, which 'templates' lacks")
            if not path.is_file():
                raise o.error("images", f"file {str(path)!r} for template {key!r} does not exist")
        for key, text in templates.items():
            try:
                list(string.Formatter().parse(text))
            except ValueError as exc:
                raise o.error("templates", f"template {key!r}: {exc}") from None
        username = o.string("username", None) if "username" in options else None
        password = o.string("password", None) if "password" in options else None
        channel = cls(
            name, url=url, vaspid=o.string("vaspid"), vasid=o.string("vasid"), sender=o.string("sender"),
            templates=templates,
            service_code=o.string("service_code", None) if "service_code" in options else None,
            subject=o.string("subject", None) if "subject" in options else None,
            images=images, username=username, password=password,
            namespace=o.string("namespace", MM7_REL6), mm7_version=o.string("mm7_version", "6.8.0"),
            timeout=o.seconds("timeout", 10.0),
            listen=o.listen("listen", "") if "listen" in options else None,
            token=o.string("token", None) if "token" in options else None,
            messages_path=o.string("messages_path", None) if "messages_path" in options else None,
            report_hold_ms=o.duration_ms("report_hold", "1m"),
        )
        try:
            o.finish()
        except ValueError:
            channel.close()
            raise
        return channel

    # -- delivery reports --------------------------------------------------------------------------------------

    def start(self, feedback: FeedbackSink) -> None:
        if self.listen is None:
            return
        if self._reports is not None:
            raise RuntimeError(f"channel {self.name!r} is already started")
        assert self._messages is not None
        try:
            self._reports = DeliveryReportServer(
                self.name, self.listen, self._messages, feedback, self.counts, token=self.token,
                hold_ms=self.report_hold_ms, mm7_namespace=self.namespace, mm7_version=self.mm7_version)
        except OSError as exc:
            raise OSError(exc.errno, f"channel {self.name!r}: cannot listen on {self.listen[0]}:{self.listen[1]}: "
                                     f"{exc.strerror}") from exc
        log.info("channel %s: delivery reports on http://%s:%d", self.name, *self._reports.address)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the delivery-report endpoint listens on, once started."""
        if self._reports is None:
            raise RuntimeError(f"channel {self.name!r} receives no delivery reports (not started or no listen)")
        return self._reports.address

    def close(self) -> None:
        self._http.close()
        reports, self._reports = self._reports, None
        if reports is not None:
            reports.close()
        messages, self._messages = self._messages, None
        if messages is not None:
            messages.close()

    # -- building the request ----------------------------------------------------------------------------------

    def render(self, instruction: Instruction) -> str:
        """The instruction's template filled with its params; `Rejected` when either is missing."""
        text = self.templates.get(instruction.template)
        if text is None:
            raise Rejected(f"no mms template {instruction.template!r}")
        return _fill(instruction, text)

    def envelope(self, instruction: Instruction) -> bytes:
        """The SOAP envelope with the SubmitReq for `instruction`."""
        ns = self.namespace

        def mm7(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
            element = ET.SubElement(parent, f"{{{ns}}}{tag}", attrs)
            element.text = text
            return element

        envelope = ET.Element(f"{{{SOAP_ENV}}}Envelope")
        header = ET.SubElement(envelope, f"{{{SOAP_ENV}}}Header")
        mm7(header, "TransactionID", instruction.id, **{f"{{{SOAP_ENV}}}mustUnderstand": "1"})
        body = ET.SubElement(envelope, f"{{{SOAP_ENV}}}Body")
        submit = mm7(body, "SubmitReq")
        mm7(submit, "MM7Version", self.mm7_version)
        sender = mm7(submit, "SenderIdentification")
        mm7(sender, "VASPID", self.vaspid)
        mm7(sender, "VASID", self.vasid)
        mm7(mm7(sender, "SenderAddress"), "ShortCode", self.sender)
        mm7(mm7(mm7(submit, "Recipients"), "To"), "Number", f"+{instruction.msisdn}")
        if self.service_code is not None:
            mm7(submit, "ServiceCode", self.service_code)
        if self.subject is not None:
            mm7(submit, "Subject", _fill(instruction, self.subject))
        mm7(submit, "Content", href=f"cid:{CONTENT_CID}", allowAdaptations="true")
        return ET.tostring(envelope, encoding="utf-8", xml_declaration=True)

    def request(self, instruction: Instruction) -> tuple[str, bytes]:
        """(Content-Type header, body) of the HTTP POST for `instruction`."""
        envelope = _part("xml", self.envelope(instruction).decode(), ENVELOPE_CID)
        text = _part("plain", self.render(instruction), None)
        image = self.images.get(instruction.template)
        if image is None:
            content = text
        else:
            data, (maintype, subtype) = image
            content = MIMEMultipart("mixed", policy=policy.HTTP)
            del content["MIME-Version"]
            # base64 lines of 76 characters (RFC 2045); HTTP's policy sets no line length
            picture = EmailMessage(policy=policy.HTTP.clone(max_line_length=76))
            picture.set_content(data, maintype=maintype, subtype=subtype, cid=f"<image@{instruction.template}>",
                                filename=f"{instruction.template}.{subtype}")
            del picture["MIME-Version"]
            content.attach(text)
            content.attach(picture)
        content["Content-ID"] = f"<{CONTENT_CID}>"
        root = MIMEMultipart("related", policy=policy.HTTP, type="text/xml", start=f"<{ENVELOPE_CID}>")
        root.attach(envelope)
        root.attach(content)
        raw = root.as_bytes()
        _, _, body = raw.partition(b"\r\n\r\n")
        return root["Content-Type"], body

    # -- delivering --------------------------------------------------------------------------------------------

    def deliver(self, instruction: Instruction) -> None:
        if instruction.holdout:
            self.counts.add("holdout")
            return
        try:
            content_type, body = self.request(instruction)
        except Rejected:
            self.counts.add("rejected")
            raise
        headers = {"Content-Type": content_type, "SOAPAction": '""'}
        if self._authorization is not None:
            headers["Authorization"] = self._authorization
        try:
            response = self._http.request("POST", self.url, body=body, headers=headers, limit=MAX_ANSWER)
        except RequestFailed as exc:  # timeouts, refused, reset and closed connections
            self.counts.add("retries")
            raise Retry(f"MMS centre unreachable: {exc.reason}") from exc
        status, answer = response.status, response.body
        retry_after = None if 200 <= status < 300 else _seconds(response.headers.get("Retry-After"))
        try:
            self._judge(status, answer, retry_after)
        except Retry:
            self.counts.add("retries")
            raise
        except Rejected:
            self.counts.add("rejected")
            raise
        self.counts.add("submitted")
        message_id = _mm7_field(answer, "MessageID")
        if self._messages is not None and message_id:
            try:
                self._messages.remember(message_id, instruction.id, now_ms())
            except Exception:  # noqa: BLE001 -- the MMS centre has the message: retrying would send it twice
                log.exception("channel %s: MessageID %s of %s not recorded; its delivery report will not match",
                              self.name, message_id, instruction.id)
                self.counts.add("message_ids_lost")
                return
            if self._reports is not None:
                self._reports.submitted(message_id)

    def _judge(self, status: int, answer: bytes, retry_after: float | None) -> None:
        """Return when the MMS centre took the message; else raise `Retry` or `Rejected`."""
        code, text, fault = _mm7_status(answer)
        if code is not None:
            reason = f"MM7 status {code}{': ' + text if text else ''} (HTTP {status})"
            if 1000 <= code < 2000:
                if status >= 300:
                    raise Retry(f"{reason} with a failing HTTP status", retry_after)
                return
            if 3000 <= code < 4000 or code == 4006:
                raise Retry(reason, retry_after)
            raise Rejected(reason)
        if status == 429 or status >= 500:
            if fault is not None and fault.lower().endswith("client"):
                raise Rejected(f"SOAP fault {fault}{': ' + text if text else ''} (HTTP {status})")
            raise Retry(f"MMS centre answered HTTP {status}{': ' + text if text else ''}", retry_after)
        raise Rejected(f"MMS centre answered HTTP {status} without an MM7 status")

    def stats(self) -> dict[str, int]:
        return self.counts.snapshot()


def _fill(instruction: Instruction, text: str) -> str:
    """`text` with {name} replaced by the instruction's params; `Rejected` when one is missing."""
    try:
        return text.format_map(instruction.params)
    except KeyError as exc:
        raise Rejected(f"template {instruction.template!r} needs param {exc.args[0]!r}") from None
    except (ValueError, IndexError, AttributeError) as exc:
        raise Rejected(f"template {instruction.template!r}: {exc}") from None


def _part(subtype: str, text: str, cid: str | None) -> EmailMessage:
    part = EmailMessage(policy=policy.HTTP)
    # 8bit: the MMS centre gets the UTF-8 text as is (Chinese included), not base64
    part.set_content(text, subtype=subtype, charset="utf-8", cte="8bit")
    del part["MIME-Version"]
    if cid is not None:
        part["Content-ID"] = f"<{cid}>"
    return part


def _mm7_status(answer: bytes) -> tuple[int | None, str | None, str | None]:
    """(StatusCode, StatusText or faultstring, SOAP faultcode) found in an MM7 answer; Nones if absent."""
    try:
        root = ET.fromstring(answer)
    except ET.ParseError:
        return None, None, None
    code = text = fault = None
    for element in root.iter():
        tag = element.tag.rpartition("}")[2]
        if tag == "StatusCode" and code is None and (element.text or "").strip().isdigit():
            code = int(element.text.strip())
        elif tag == "StatusText" and text is None:
            text = (element.text or "").strip()
        elif tag == "faultcode":
            fault = (element.text or "").strip()
        elif tag == "faultstring" and text is None:
            text = (element.text or "").strip()
    return code, text, fault


def _mm7_field(answer: bytes, name: str) -> str | None:
    """The text of the first element called `name` (any namespace) in an MM7 answer."""
    try:
        root = ET.fromstring(answer)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rpartition("}")[2] == name:
            return (element.text or "").strip() or None
    return None


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _image_type(channel: str, template: str, path: Path) -> tuple[str, str]:
    guessed, _ = mimetypes.guess_type(path.name)
    if guessed is None or not guessed.startswith("image/"):
        raise ValueError(f"channel {channel!r}: image {str(path)!r} for template {template!r} is not an image type")
    maintype, _, subtype = guessed.partition("/")
    return maintype, subtype


