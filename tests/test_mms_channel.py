"""mms channel: MM7 SubmitReq over real HTTP to a stand-in MMS centre.

No MMS centre installs on this machine (none is packaged for Debian 12 or on PyPI), so the MMSC here is a
real HTTP server on loopback, written in this test, that stands in for one: it parses the
multipart/related body with the standard library's MIME parser, checks the SOAP 1.1 envelope, that the
TransactionID header entry is mustUnderstand="1", that every Content href="cid:..." resolves to a body
part, validates the SubmitReq against a hand-written SUBSET of the MM7 Rel-6 schema (below), and answers
SubmitRsp with StatusCode 1000 or a SOAP fault as the test asks.
"""

from __future__ import annotations

import socket
import threading
import xml.etree.ElementTree as ET
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import xmlschema

from adapters.channels.base import Instruction, Rejected, Retry
from adapters.channels.mms import MM7_REL6, SOAP_ENV, MmsChannel

# A SUBSET of the 3GPP TS 23.140 Release 6 MM7 schema (REL-6-MM7-1-4), written by hand for this test: the
# official XSD is not reachable from here.  It covers TransactionID and SubmitReq with the optional
# elements kept in the order of the official schema, and leaves out everything Kairos does not send
# (ReplyCharging, ChargedParty, DRMContent, ...).  Passing it is not proof of conformance to the full schema.
MM7_SUBMIT_SUBSET_XSD = f"""<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" xmlns="{MM7_REL6}" targetNamespace="{MM7_REL6}"
           elementFormDefault="qualified" attributeFormDefault="unqualified">
  <xs:element name="TransactionID">
    <xs:complexType>
      <xs:simpleContent>
        <xs:extension base="xs:string">
          <xs:anyAttribute namespace="##other" processContents="lax"/>
        </xs:extension>
      </xs:simpleContent>
    </xs:complexType>
  </xs:element>
  <xs:element name="SubmitReq" type="SubmitReqType"/>
  <xs:complexType name="SubmitReqType">
    <xs:sequence>
      <xs:element name="MM7Version" type="versionType"/>
      <xs:element name="SenderIdentification" type="senderIDInformation"/>
      <xs:element name="Recipients" type="multiAddressType"/>
      <xs:element name="ServiceCode" type="xs:string" minOccurs="0"/>
      <xs:element name="LinkedID" type="xs:string" minOccurs="0"/>
      <xs:element name="MessageClass" type="messageClassType" minOccurs="0"/>
      <xs:element name="TimeStamp" type="xs:dateTime" minOccurs="0"/>
      <xs:element name="EarliestDeliveryTime" type="xs:string" minOccurs="0"/>
      <xs:element name="ExpiryDate" type="xs:string" minOccurs="0"/>
      <xs:element name="DeliveryReport" type="xs:boolean" minOccurs="0"/>
      <xs:element name="ReadReply" type="xs:boolean" minOccurs="0"/>
      <xs:element name="Priority" type="priorityType" minOccurs="0"/>
      <xs:element name="Subject" type="xs:string" minOccurs="0"/>
      <xs:element name="Content" type="contentReferenceType" minOccurs="0"/>
    </xs:sequence>
  </xs:complexType>
  <xs:simpleType name="versionType">
    <xs:restriction base="xs:string"><xs:pattern value="\\d+\\.\\d+\\.\\d+"/></xs:restriction>
  </xs:simpleType>
  <xs:complexType name="senderIDInformation">
    <xs:sequence>
      <xs:element name="VASPID" type="xs:string" minOccurs="0"/>
      <xs:element name="VASID" type="xs:string" minOccurs="0"/>
      <xs:element name="SenderAddress" type="addressType" minOccurs="0"/>
    </xs:sequence>
  </xs:complexType>
  <xs:complexType name="addressType">
    <xs:choice>
      <xs:element name="RFC2822Address" type="xs:string"/>
      <xs:element name="Number" type="numberType"/>
      <xs:element name="ShortCode" type="xs:string"/>
    </xs:choice>
  </xs:complexType>
  <xs:complexType name="multiAddressType">
    <xs:sequence>
      <xs:element name="To" type="recipientsType" minOccurs="0"/>
      <xs:element name="Cc" type="recipientsType" minOccurs="0"/>
      <xs:element name="Bcc" type="recipientsType" minOccurs="0"/>
    </xs:sequence>
  </xs:complexType>
  <xs:complexType name="recipientsType">
    <xs:choice maxOccurs="unbounded">
      <xs:element name="RFC2822Address" type="xs:string"/>
      <xs:element name="Number" type="numberType"/>
      <xs:element name="ShortCode" type="xs:string"/>
    </xs:choice>
  </xs:complexType>
  <xs:complexType name="numberType">
    <xs:simpleContent>
      <xs:extension base="xs:string">
        <xs:attribute name="displayOnly" type="xs:boolean" use="optional"/>
      </xs:extension>
    </xs:simpleContent>
  </xs:complexType>
  <xs:simpleType name="messageClassType">
    <xs:restriction base="xs:string">
      <xs:enumeration value="Personal"/><xs:enumeration value="Informational"/>
      <xs:enumeration value="Advertisement"/><xs:enumeration value="Auto"/>
    </xs:restriction>
  </xs:simpleType>
  <xs:simpleType name="priorityType">
    <xs:restriction base="xs:string">
      <xs:enumeration value="Normal"/><xs:enumeration value="High"/><xs:enumeration value="Low"/>
    </xs:restriction>
  </xs:simpleType>
  <xs:complexType name="contentReferenceType">
    <xs:attribute name="href" type="xs:anyURI" use="required"/>
    <xs:attribute name="allowAdaptations" type="xs:boolean" use="optional"/>
  </xs:complexType>
</xs:schema>
"""

SCHEMA = xmlschema.XMLSchema(MM7_SUBMIT_SUBSET_XSD)
MSISDN = 8613800000001


def _answer(transaction_id: str, body: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="{SOAP_ENV}" xmlns:mm7="{MM7_REL6}">'
        f'<env:Header><mm7:TransactionID env:mustUnderstand="1">{transaction_id}</mm7:TransactionID></env:Header>'
        f"<env:Body>{body}</env:Body></env:Envelope>"
    ).encode()


def submit_rsp(transaction_id: str, code: int = 1000) -> bytes:
    return _answer(transaction_id, (
        "<mm7:SubmitRsp><mm7:MM7Version>6.8.0</mm7:MM7Version><mm7:Status>"
        f"<mm7:StatusCode>{code}</mm7:StatusCode><mm7:StatusText>Success</mm7:StatusText></mm7:Status>"
        f"<mm7:MessageID>msg-{transaction_id}</mm7:MessageID></mm7:SubmitRsp>"
    ))


def fault(transaction_id: str, faultcode: str, code: int | None, text: str) -> bytes:
    detail = "" if code is None else (
        "<detail><mm7:RSErrorRsp><mm7:MM7Version>6.8.0</mm7:MM7Version><mm7:Status>"
        f"<mm7:StatusCode>{code}</mm7:StatusCode><mm7:StatusText>{text}</mm7:StatusText></mm7:Status>"
        "</mm7:RSErrorRsp></detail>"
    )
    return _answer(transaction_id, f"<env:Fault><faultcode>env:{faultcode}</faultcode>"
                                   f"<faultstring>{text}</faultstring>{detail}</env:Fault>")


class StandInMmsc(ThreadingHTTPServer):
    """Stands in for an MMS centre's MM7 endpoint (see the module docstring)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _MmscHandler)
        self.answer = "ok"  # ok | fault4004 | fault3000 | http500 | http503
        self.received: list[dict] = []  # one dict per valid SubmitReq: transaction_id, text, parts...
        self.errors: list[str] = []  # what made a request invalid
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/mm7"

    def inspect(self, content_type: str, body: bytes) -> dict:
        """Check one MM7 submission; what it carried.  Raises AssertionError naming what is wrong."""
        message = BytesParser(policy=policy.default).parsebytes(
            f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode() + body)
        assert message.get_content_type() == "multipart/related", message.get_content_type()
        assert message.get_param("type") == "text/xml", "multipart/related type must be text/xml"
        parts = {str(p["Content-ID"]).strip("<>"): p for p in message.walk() if p["Content-ID"]}
        start = str(message.get_param("start")).strip("<>")
        assert start in parts, f"start {start!r} is not a part"
        soap = parts[start]
        assert soap.get_content_type() == "text/xml"
        envelope = ET.fromstring(soap.get_content())
        assert envelope.tag == f"{{{SOAP_ENV}}}Envelope", envelope.tag
        transaction = envelope.find(f"{{{SOAP_ENV}}}Header/{{{MM7_REL6}}}TransactionID")
        assert transaction is not None, "no mm7:TransactionID in the SOAP header"
        assert transaction.get(f"{{{SOAP_ENV}}}mustUnderstand") == "1", "TransactionID must be mustUnderstand=1"
        SCHEMA.validate(ET.tostring(transaction).decode())
        submit = envelope.find(f"{{{SOAP_ENV}}}Body/{{{MM7_REL6}}}SubmitReq")
        assert submit is not None, "no mm7:SubmitReq in the SOAP body"
        SCHEMA.validate(ET.tostring(submit).decode())
        hrefs = [e.get("href") for e in envelope.iter() if e.get("href", "").startswith("cid:")]
        assert hrefs, "no Content href"
        for href in hrefs:
            assert href[4:] in parts, f"{href} resolves to no body part"
        content = parts[hrefs[0][4:]]
        texts = [p for p in content.walk() if p.get_content_type() == "text/plain"]
        images = [p for p in content.walk() if p.get_content_maintype() == "image"]
        return {
            "transaction_id": transaction.text,
            "recipient": submit.find(f"{{{MM7_REL6}}}Recipients/{{{MM7_REL6}}}To/{{{MM7_REL6}}}Number").text,
            "vaspid": submit.find(f"{{{MM7_REL6}}}SenderIdentification/{{{MM7_REL6}}}VASPID").text,
            "subject": getattr(submit.find(f"{{{MM7_REL6}}}Subject"), "text", None),
            "texts": [p.get_content().removesuffix("\r\n") for p in texts],  # MIME lines end in CRLF
            "text_charsets": [p.get_content_charset() for p in texts],
            "images": [p.get_content() for p in images],
        }


class _MmscHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 -- http.server's naming
        server: StandInMmsc = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            assert self.headers.get("SOAPAction") is not None, "SOAPAction header missing"
            seen = server.inspect(self.headers["Content-Type"], body)
        except (AssertionError, ET.ParseError, xmlschema.XMLSchemaValidationError) as exc:
            with server.lock:
                server.errors.append(str(exc))
            self._reply(500, fault("unknown", "Client", 4004, "Validation error"))
            return
        with server.lock:
            server.received.append(seen)
        tid = seen["transaction_id"]
        if server.answer == "ok":
            self._reply(200, submit_rsp(tid))
        elif server.answer == "fault4004":
            self._reply(500, fault(tid, "Client", 4004, "Validation error"))
        elif server.answer == "fault3000":
            self._reply(500, fault(tid, "Server", 3000, "Server error"))
        elif server.answer == "http503":
            self._reply(503, b"busy", retry_after="7")
        else:
            self._reply(500, b"")

    def _reply(self, status: int, body: bytes, retry_after: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/xml; charset=utf-8")
        if retry_after:
            self.send_header("Retry-After", retry_after)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture
def mmsc():
    server = StandInMmsc()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()
    assert server.errors == []


def channel(url: str, **options) -> MmsChannel:
    config = {
        "url": url, "vaspid": "kairos", "vasid": "campaigns", "sender": "10658000", "service_code": "MKT01",
        "templates": {"roam": "{name}，欢迎来到{country}！每日 {price} 元畅享流量。", "plain": "Hello {name}"},
        "timeout": 5,
        **options,
    }
    return MmsChannel.from_config("mms", config)


def instruction(id: str = "i-1", template: str = "roam", **params: str) -> Instruction:
    params = params or {"name": "李雷", "country": "日本", "price": "25"}
    return Instruction(id=id, ts=0, msisdn=MSISDN, rule="roaming", channel="mms", template=template, priority=0,
                       holdout=False, not_before=0, params=params)


def test_submit_succeeds_and_chinese_text_round_trips(mmsc):
    mms = channel(mmsc.url, subject="给{name}的流量包")
    mms.deliver(instruction("roam:8613800000001:42"))
    [seen] = mmsc.received
    assert seen["transaction_id"] == "roam:8613800000001:42"
    assert seen["recipient"] == "+8613800000001" and seen["vaspid"] == "kairos"
    assert seen["subject"] == "给李雷的流量包"
    assert seen["texts"] == ["李雷，欢迎来到日本！每日 25 元畅享流量。"]
    assert seen["text_charsets"] == ["utf-8"] and seen["images"] == []
    assert mms.stats() == {"submitted": 1}


def test_submit_with_an_image(mmsc, tmp_path):
    picture = tmp_path / "banner.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    mms = channel(mmsc.url, images={"roam": str(picture)})
    mms.deliver(instruction())
    [seen] = mmsc.received
    assert seen["images"] == [picture.read_bytes()]
    assert seen["texts"] == ["李雷，欢迎来到日本！每日 25 元畅享流量。"]


def test_a_retried_submission_carries_the_same_transaction_id(mmsc):
    mms = channel(mmsc.url)
    mmsc.answer = "http500"
    with pytest.raises(Retry):
        mms.deliver(instruction("same-id"))
    mmsc.answer = "ok"
    mms.deliver(instruction("same-id"))
    assert [s["transaction_id"] for s in mmsc.received] == ["same-id", "same-id"]


def test_client_fault_is_rejected(mmsc):
    mmsc.answer = "fault4004"
    with pytest.raises(Rejected, match="MM7 status 4004: Validation error") as caught:
        channel(mmsc.url).deliver(instruction())
    assert not isinstance(caught.value, Retry)


@pytest.mark.parametrize("answer", ["http500", "fault3000", "http503"])
def test_server_errors_are_retried(mmsc, answer):
    mmsc.answer = answer
    with pytest.raises(Retry) as caught:
        channel(mmsc.url).deliver(instruction())
    assert caught.value.after == (7.0 if answer == "http503" else None)


def test_closed_port_is_retried():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(Retry, match="MMS centre unreachable"):
        channel(f"http://127.0.0.1:{port}/mm7").deliver(instruction())


def test_template_problems_are_rejected_without_a_request(mmsc):
    mms = channel(mmsc.url)
    with pytest.raises(Rejected, match="no mms template 'nope'"):
        mms.deliver(instruction(template="nope"))
    with pytest.raises(Rejected, match="needs param 'name'"):
        mms.deliver(instruction(template="plain", other="x"))
    assert mmsc.received == []


def test_holdout_is_never_sent(mmsc):
    mms = channel(mmsc.url)
    mms.deliver(Instruction(id="h", ts=0, msisdn=MSISDN, rule="r", channel="mms", template="plain", priority=0,
                            holdout=True, not_before=0, params={"name": "x"}))
    assert mmsc.received == [] and mms.stats() == {"holdout": 1}


def test_the_schema_subset_has_teeth():
    """The stand-in would notice a SubmitReq without recipients or with elements out of order."""
    ns = MM7_REL6
    good = (f'<SubmitReq xmlns="{ns}"><MM7Version>6.8.0</MM7Version><SenderIdentification><VASPID>v</VASPID>'
            f'</SenderIdentification><Recipients><To><Number>+1</Number></To></Recipients>'
            f'<Content href="cid:c"/></SubmitReq>')
    assert SCHEMA.is_valid(good)
    assert not SCHEMA.is_valid(good.replace("<Recipients><To><Number>+1</Number></To></Recipients>", ""))
    assert not SCHEMA.is_valid(good.replace("<MM7Version>6.8.0</MM7Version>", "<MM7Version>six</MM7Version>"))
    assert not SCHEMA.is_valid(good.replace('<Content href="cid:c"/>', "<Content/>"))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="channel 'mms': key 'url' is required"):
        MmsChannel.from_config("mms", {"vaspid": "v", "vasid": "v", "sender": "1", "templates": {"a": "b"}})
    with pytest.raises(ValueError, match="names template 'other'"):
        channel("http://127.0.0.1:1/mm7", images={"other": str(tmp_path / "x.png")})
    with pytest.raises(ValueError, match="does not exist"):
        channel("http://127.0.0.1:1/mm7", images={"roam": str(tmp_path / "x.png")})
    with pytest.raises(ValueError, match="unknown key"):
        channel("http://127.0.0.1:1/mm7", colour="red")
    with pytest.raises(ValueError, match="key 'templates'"):
        channel("http://127.0.0.1:1/mm7", templates={"a": "{unclosed"})


# -- delivery reports: the stand-in MMS centre's DeliveryReportReq back to Kairos ------------------------------


def delivery_report(message_id: str, status: str, *, transaction_id: str = "mmsc-1",
                    date: str = "2026-11-22T10:00:00Z") -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="{SOAP_ENV}">'
        f'<env:Header><TransactionID xmlns="{MM7_REL6}" env:mustUnderstand="1">{transaction_id}</TransactionID>'
        f'</env:Header><env:Body><DeliveryReportReq xmlns="{MM7_REL6}"><MM7Version>6.8.0</MM7Version>'
        f"<MessageID>{message_id}</MessageID><Recipient><Number>+{MSISDN}</Number></Recipient>"
        f"<Sender><ShortCode>10658000</ShortCode></Sender><Date>{date}</Date><MMStatus>{status}</MMStatus>"
        "</DeliveryReportReq></env:Body></env:Envelope>"
    ).encode()


def post_report(mms: MmsChannel, body: bytes, *, token: str | None = None,
                content_type: str = "text/xml; charset=utf-8") -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    host, port = mms.address
    request = urllib.request.Request(f"http://{host}:{port}/mm7", data=body, method="POST",
                                     headers={"Content-Type": content_type, "SOAPAction": '""'})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


class Feedback(list):
    def __call__(self, instruction_id: str, outcome: str, ts: int) -> None:
        self.append((instruction_id, outcome, ts))


REPORT_TS = 1_795_341_600_000  # 2026-11-22T10:00:00Z


@pytest.fixture
def reporting(mmsc, tmp_path):
    feedback = Feedback()
    mms = channel(mmsc.url, listen="127.0.0.1:0", messages_path=str(tmp_path / "messages.sqlite"))
    mms.start(feedback)
    yield mms, feedback
    mms.close()


def test_delivery_reports_become_feedback_once(reporting):
    mms, feedback = reporting
    mms.deliver(instruction("i-1"))
    mms.deliver(instruction("i-2"))
    status, answer = post_report(mms, delivery_report("msg-i-1", "Retrieved", transaction_id="t-77"))
    assert status == 200
    rsp = ET.fromstring(answer)
    assert rsp.find(f".//{{{MM7_REL6}}}DeliveryReportRsp/{{{MM7_REL6}}}Status/{{{MM7_REL6}}}StatusCode").text == "1000"
    assert rsp.find(f"{{{SOAP_ENV}}}Header/{{{MM7_REL6}}}TransactionID").text == "t-77"
    assert post_report(mms, delivery_report("msg-i-1", "Retrieved"))[0] == 200  # the MMSC repeats itself
    assert post_report(mms, delivery_report("msg-i-2", "Deferred"))[0] == 200  # not final
    assert post_report(mms, delivery_report("msg-i-2", "Expired"))[0] == 200
    assert feedback == [("i-1", "delivered", REPORT_TS), ("i-2", "failed", REPORT_TS)]
    stats = mms.stats()
    assert stats["reports_delivered"] == 1 and stats["reports_failed"] == 1
    assert stats["reports_repeated"] == 1 and stats["reports_interim"] == 1


def test_a_report_before_its_submit_response_is_held_not_dropped(reporting):
    mms, feedback = reporting
    assert post_report(mms, delivery_report("msg-early", "Retrieved"))[0] == 200
    assert feedback == [] and mms.stats()["reports_held"] == 1
    mms.deliver(instruction("early"))
    assert feedback == [("early", "delivered", REPORT_TS)]


def test_reports_find_messages_submitted_before_a_restart(mmsc, tmp_path):
    path = str(tmp_path / "messages.sqlite")
    first = channel(mmsc.url, listen="127.0.0.1:0", messages_path=path)
    first.start(Feedback())
    first.deliver(instruction("before-restart"))
    first.close()
    feedback = Feedback()
    second = channel(mmsc.url, listen="127.0.0.1:0", messages_path=path)
    second.start(feedback)
    try:
        assert post_report(second, delivery_report("msg-before-restart", "Rejected"))[0] == 200
        assert feedback == [("before-restart", "failed", REPORT_TS)]
    finally:
        second.close()


def test_bad_reports_get_a_soap_fault(reporting):
    mms, feedback = reporting
    status, answer = post_report(mms, b"<not-xml")
    assert status == 500 and b"4004" in answer and b"Fault" in answer
    deliver_req = delivery_report("m", "Retrieved").replace(b"DeliveryReportReq", b"DeliverReq")
    status, answer = post_report(mms, deliver_req)
    assert status == 500 and b"4003" in answer
    # a multipart/related report (SOAP part as start) is read like a plain one
    mms.deliver(instruction("multi"))
    body = (b"--b\r\nContent-Type: text/xml\r\nContent-ID: <soap>\r\n\r\n"
            + delivery_report("msg-multi", "Retrieved") + b"\r\n--b--\r\n")
    content_type = 'multipart/related; boundary="b"; type="text/xml"; start="<soap>"'
    assert post_report(mms, body, content_type=content_type)[0] == 200
    assert feedback == [("multi", "delivered", REPORT_TS)]


def test_report_endpoint_beyond_loopback_needs_a_token(mmsc, tmp_path):
    path = str(tmp_path / "messages.sqlite")
    with pytest.raises(ValueError, match="beyond loopback; set a token"):
        channel(mmsc.url, listen="0.0.0.0:0", messages_path=path)
    feedback = Feedback()
    mms = channel(mmsc.url, listen="0.0.0.0:0", token="s3cret", messages_path=path)
    mms.start(feedback)
    try:
        mms.deliver(instruction("t"))
        report = delivery_report("msg-t", "Retrieved")
        assert post_report(mms, report)[0] == 401
        assert post_report(mms, report, token="wrong")[0] == 401
        assert post_report(mms, report, token="s3cret")[0] == 200
        assert feedback == [("t", "delivered", REPORT_TS)]
    finally:
        mms.close()


def test_basic_auth_credentials_do_not_replace_the_report_token():
    """With username and token both set, the delivery-report endpoint still wants the configured token, and
    the MMSC still gets the Basic credentials."""
    from adapters.channels.mms import MmsChannel

    channel = MmsChannel.from_config("mms", {
        "url": "http://127.0.0.1:9/mm7", "vaspid": "v", "vasid": "s", "sender": "10086",
        "templates": {"t": "hello"}, "username": "kairos", "password": "secret", "token": "report-token"})
    try:
        assert channel.token == "report-token"
        assert channel._authorization == "Basic " + __import__("base64").b64encode(b"kairos:secret").decode()
    finally:
        channel.close()
