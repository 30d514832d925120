"""The sms channel against a real Kannel (bearerbox, smsbox, fakesmsc started by `kannel_gateway`).

Instructions go through the outbox and its worker to Kannel's sendsms; the fake SMSC prints what
it got; Kannel's delivery reports and the replies injected into the fake SMSC come back through the
channel's receiver as feedback.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter

import pyarrow as pa
import pytest
from channel_testing import hex_id, instruction_table, wait_until
from kannel import PASSWORD, USERNAME, Kannel, kannel_gateway  # noqa: F401 -- kannel_gateway is a fixture
from test_daemon import DaemonProcess, Sockets, arrow_message, config_text

from adapters.channels import make_channel
from adapters.channels.base import Instruction, Rejected, Retry
from adapters.channels.outbox import DeliveryPolicy, DeliveryWorker, Outbox
from adapters.channels.sms import SmsChannel, TemplateError, Templates, normalise_msisdn, sendsms_text

TEMPLATES = {
    "welcome": "Hello {name}, reply YES for 1GB at {price}.",
    "roaming": "{name}，欢迎来到香港！回复YES订购流量包",
}
SENDER = "10086"


class Feedback:
    """The FeedbackSink the daemon would give: collects reports from the channel's threads."""

    def __init__(self):
        self.reports: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

    def __call__(self, instruction_id: str, outcome: str, ts: int) -> None:
        with self._lock:
            self.reports.append((instruction_id, outcome, ts))

    def outcomes(self, instruction_id: str) -> list[str]:
        with self._lock:
            return [o for i, o, _ in self.reports if i == instruction_id]


def sms_options(gateway: Kannel, **extra) -> dict:
    return {
        "type": "sms", "url": gateway.sendsms_url, "username": USERNAME, "password": PASSWORD,
        "from": SENDER, "templates": TEMPLATES, "listen": f"127.0.0.1:{gateway.ports.mo}", "receipt_hold": 2.0,
        **extra,
    }  # fmt: skip


class Delivery:
    """An outbox, an sms channel on the test's Kannel, and the worker between them."""

    def __init__(self, tmp_path, gateway: Kannel, policy: DeliveryPolicy | None = None, **options):
        self.outbox = Outbox(tmp_path / "outbox.db")
        self.channel = make_channel("sms", sms_options(gateway, **options))
        self.feedback = Feedback()
        self.worker = DeliveryWorker(tmp_path / "outbox.db", {"sms": (
            self.channel, policy or DeliveryPolicy(concurrency=2, backoff_initial=0.05, backoff_max=0.3))}, seed=5)
        self.worker.start(lambda name: self.feedback)

    def send(self, table) -> None:
        self.outbox.enqueue(table)
        self.worker.wake()

    def close(self) -> None:
        self.worker.stop()
        self.outbox.close()


@pytest.fixture
def delivery(tmp_path, kannel_gateway):  # noqa: F811 -- the fixture imported above
    made: list[Delivery] = []

    def make(**options) -> Delivery:
        made.append(Delivery(tmp_path, kannel_gateway, **options))
        return made[-1]

    yield make
    for d in made:
        d.close()


def received_by(gateway: Kannel, msisdn: int) -> list[tuple[str, str, str, str]]:
    return [m for m in gateway.received() if m[1] == str(msisdn)]


def test_instruction_reaches_the_smsc_and_its_delivery_report_comes_back(kannel_gateway, delivery):  # noqa: F811
    d = delivery()
    msisdn = 8613900000001
    d.send(instruction_table([hex_id(101)], msisdn=msisdn, params={"name": "Li", "price": "10"}))
    (message,) = wait_until(lambda: received_by(kannel_gateway, msisdn))
    assert message == (SENDER, str(msisdn), "text", "Hello Li, reply YES for 1GB at 10.")
    # fakesmsc reports 8 (accepted by the SMSC), then 1 (delivered): only the outcome is reported.
    wait_until(lambda: d.feedback.outcomes(hex_id(101)) == ["delivered"])
    assert d.outbox.row(hex_id(101))["status"] == "delivered"
    wait_until(lambda: d.channel.stats()["receipts_intermediate"] >= 1)
    stats = d.channel.stats()
    assert stats["sent"] == 1 and stats["receipts_delivered"] == 1


def test_chinese_text_arrives_intact_as_ucs2(kannel_gateway, delivery):  # noqa: F811
    d = delivery()
    msisdn = 8613900000002
    d.send(instruction_table([hex_id(102)], msisdn=msisdn, template="roaming", params={"name": "王先生"}))
    ((_, _, coding, text),) = wait_until(lambda: received_by(kannel_gateway, msisdn))
    assert coding == "ucs-2"
    assert urllib.parse.unquote_to_bytes(text).decode("utf-16-be") == "王先生，欢迎来到香港！回复YES订购流量包"


def test_replies_become_feedback_for_the_latest_instruction_to_that_number(kannel_gateway, delivery):  # noqa: F811
    d = delivery()
    first, second = 8613900000003, 8613900000004
    d.send(instruction_table([hex_id(103)], msisdn=first, params={"name": "A", "price": "1"}))
    d.send(instruction_table([hex_id(104)], msisdn=second, params={"name": "B", "price": "1"}))
    wait_until(lambda: received_by(kannel_gateway, first) and received_by(kannel_gateway, second))
    wait_until(lambda: d.outbox.row(hex_id(104))["status"] == "delivered")
    kannel_gateway.inject(f"+{second}", SENDER, "yes")
    wait_until(lambda: "accepted" in d.feedback.outcomes(hex_id(104)))
    kannel_gateway.inject(str(first), SENDER, "TD")
    wait_until(lambda: "opt_out" in d.feedback.outcomes(hex_id(103)))
    kannel_gateway.inject("8613900009999", SENDER, "YES")  # no instruction to this number
    wait_until(lambda: d.channel.stats()["replies_unmatched"] == 1)
    assert "accepted" not in d.feedback.outcomes(hex_id(103))
    assert d.feedback.outcomes(hex_id(104)).count("accepted") == 1
    kannel_gateway.inject(str(second), SENDER, "Hello?")  # not a reply the channel knows
    wait_until(lambda: d.channel.stats()["replies_other"] == 1)
    assert sorted(d.feedback.outcomes(hex_id(104))) == ["accepted", "delivered"]


def test_a_replayed_instruction_is_not_sent_twice(kannel_gateway, delivery):  # noqa: F811
    d = delivery()
    msisdn = 8613900000005
    table = instruction_table([hex_id(105)], msisdn=msisdn, params={"name": "C", "price": "2"})
    d.send(table)
    wait_until(lambda: d.outbox.row(hex_id(105))["status"] == "delivered")
    d.send(table)  # the replay: the outbox already has the id
    instruction = Instruction(id=hex_id(105), ts=1, msisdn=msisdn, rule="r1", channel="sms", template="welcome",
                              priority=0, holdout=False, not_before=1, params={"name": "C", "price": "2"})
    d.channel.deliver(instruction)  # a redelivery after a crash: the channel remembers the id
    wait_until(lambda: d.feedback.outcomes(hex_id(105)) == ["delivered"])
    assert len(received_by(kannel_gateway, msisdn)) == 1
    assert d.channel.stats()["duplicates"] == 1


def test_a_receipt_before_the_send_completes_is_held_and_matched(kannel_gateway, delivery):  # noqa: F811
    d = delivery()
    early = f"http://127.0.0.1:{kannel_gateway.ports.mo}/dlr?id={hex_id(106)}&type=1"
    with urllib.request.urlopen(early, timeout=5) as reply:
        assert reply.status == 200
    assert d.channel.stats()["receipts_held"] == 1 and d.feedback.outcomes(hex_id(106)) == []
    d.send(instruction_table([hex_id(106)], msisdn=8613900000006, params={"name": "D", "price": "3"}))
    wait_until(lambda: d.feedback.outcomes(hex_id(106)) == ["delivered"])
    wait_until(lambda: d.channel.stats()["receipts_delivered"] == 2)  # Kannel's own report came too
    assert d.feedback.outcomes(hex_id(106)) == ["delivered"]
    assert d.channel.stats()["receipts_unmatched"] == 0
    # One for an id never sent here is reported once its hold is over, not dropped.
    unknown = f"http://127.0.0.1:{kannel_gateway.ports.mo}/dlr?id={hex_id(999)}&type=16"
    urllib.request.urlopen(unknown, timeout=5).close()
    wait_until(lambda: d.feedback.outcomes(hex_id(999)) == ["failed"], timeout=5)
    assert d.channel.stats()["receipts_unmatched"] == 1


def test_a_template_that_does_not_render_is_parked(kannel_gateway, delivery):  # noqa: F811
    d = delivery()
    d.send(instruction_table([hex_id(107)], msisdn=8613900000007, params={"name": "E"}))
    wait_until(lambda: d.outbox.row(hex_id(107))["status"] == "parked")
    assert d.outbox.row(hex_id(107))["reason"] == (
        "rejected: template 'welcome' needs param(s) 'price'; the instruction has 'name'")
    assert not received_by(kannel_gateway, 8613900000007)


def test_kannel_down_then_back_delivers_every_queued_instruction_exactly_once(kannel_gateway, delivery):  # noqa: F811
    d = delivery(policy=DeliveryPolicy(concurrency=2, max_attempts=100, backoff_initial=0.1, backoff_max=0.5))
    kannel_gateway.stop()
    try:
        numbers = [8613900000100 + k for k in range(8)]
        for k, msisdn in enumerate(numbers):
            d.send(instruction_table([hex_id(200 + k)], msisdn=msisdn, params={"name": "F", "price": "4"}))
        wait_until(lambda: d.worker.stats()["sms"]["retries"] >= 8)
        row = d.outbox.row(hex_id(200))
        assert row["status"] in ("pending", "in-flight") and "sendsms unreachable" in (row["reason"] or "")
    finally:
        kannel_gateway.start()
    wait_until(lambda: all(d.outbox.row(hex_id(200 + k))["status"] == "delivered" for k in range(8)), timeout=30)
    wait_until(lambda: all(d.feedback.outcomes(hex_id(200 + k)) == ["delivered"] for k in range(8)), timeout=30)
    wait_until(lambda: all(received_by(kannel_gateway, n) for n in numbers))
    time.sleep(1.0)  # time for a duplicate, were there one, to reach the SMSC too
    counts = Counter(m[1] for m in kannel_gateway.received())
    assert [counts[str(n)] for n in numbers] == [1] * 8


def test_queued_by_kannel_while_the_smsc_is_away_counts_as_handed_over(kannel_gateway, delivery):  # noqa: F811
    d = delivery()
    msisdn = 8613900000008
    kannel_gateway.stop_smsc()
    try:
        d.send(instruction_table([hex_id(108)], msisdn=msisdn, params={"name": "G", "price": "5"}))
        wait_until(lambda: d.outbox.row(hex_id(108))["status"] == "delivered")  # "3: Queued for later delivery"
        assert d.channel.stats()["queued"] == 1 and d.outbox.row(hex_id(108))["attempts"] == 1
    finally:
        kannel_gateway.start_smsc()
    wait_until(lambda: received_by(kannel_gateway, msisdn), timeout=30)
    wait_until(lambda: d.feedback.outcomes(hex_id(108)) == ["delivered"], timeout=30)
    assert len(received_by(kannel_gateway, msisdn)) == 1


# -- without Kannel --------------------------------------------------------------------


def test_templates_refuse_bad_text_and_name_the_missing_param():
    with pytest.raises(ValueError, match="template 'x' is not valid"):
        Templates("sms", {"x": "Hello {name"})
    with pytest.raises(ValueError, match="fields are param names"):
        Templates("sms", {"x": "Hello {0}"})
    templates = Templates("sms", TEMPLATES)
    assert templates.render("welcome", {"name": "Li", "price": "5", "extra": "x"}).startswith("Hello Li")
    with pytest.raises(TemplateError, match="no template 'other' in channel 'sms'"):
        templates.render("other", {})
    with pytest.raises(TemplateError, match=r"needs param\(s\) 'price'"):
        templates.render("welcome", {"name": "Li"})


def test_text_encoding_and_numbers():
    assert sendsms_text("Hi") == {"text": "Hi", "charset": "UTF-8"}
    assert sendsms_text("你好") == {"text": "你好".encode("utf-16-be"), "coding": "2", "charset": "UTF-16BE"}
    assert normalise_msisdn("+8613800138000") == normalise_msisdn("008613800138000") == 8613800138000
    assert normalise_msisdn("abc") is None and normalise_msisdn("") is None


def test_config_is_checked_and_a_remote_receiver_needs_a_token(tmp_path):
    base = {"type": "sms", "url": "http://127.0.0.1:1/cgi-bin/sendsms", "username": "u", "password": "p",
            "from": "1", "templates": {"t": "x"}}
    assert isinstance(make_channel("sms", base), SmsChannel)
    with pytest.raises(ValueError, match="channel 'sms': key 'token' is required when listen"):
        make_channel("sms", {**base, "listen": "0.0.0.0:8080"})
    with pytest.raises(ValueError, match=r"channel 'sms': unknown key\(s\) 'dlr'"):
        make_channel("sms", {**base, "dlr": 1})
    with pytest.raises(ValueError, match="channel 'sms': key 'templates' is required"):
        make_channel("sms", {k: v for k, v in base.items() if k != "templates"})
    with pytest.raises(ValueError, match="'MAYBE' maps to 'perhaps'"):
        make_channel("sms", {**base, "replies": {"MAYBE": "perhaps"}})
    with pytest.raises(ValueError, match="key 'url' must be an http"):
        make_channel("sms", {**base, "url": "127.0.0.1:13013"})


def test_receiver_requires_its_token_and_down_gateway_is_retry():
    channel = SmsChannel("sms", url="http://127.0.0.1:9/cgi-bin/sendsms", username="u", password="p", sender="1",
                         templates={"t": "x {name}"}, token="s3cret", timeout=2.0)
    feedback = Feedback()
    channel.start(feedback)
    try:
        base = f"http://127.0.0.1:{channel.port}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/dlr?id={hex_id(1)}&type=1", timeout=5)
        assert refused.value.code == 403
        refused.value.close()
        urllib.request.urlopen(f"{base}/dlr?id={hex_id(1)}&type=1&token=s3cret", timeout=5).close()
        assert channel.stats()["receipts_held"] == 1
        instruction = Instruction(id=hex_id(2), ts=1, msisdn=8613800000000, rule="r", channel="sms", template="t",
                                  priority=0, holdout=False, not_before=1, params={"name": "x"})
        assert "token%3Ds3cret" in channel.request_url(instruction)
        with pytest.raises(Retry, match="sendsms unreachable"):
            channel.deliver(instruction)
        with pytest.raises(Rejected, match="needs param"):
            channel.deliver(Instruction(**{**instruction.__dict__, "params": {}}))
    finally:
        channel.close()
    assert feedback.outcomes(hex_id(1)) == ["delivered"]  # held receipts are reported at close, not dropped


# -- in the daemon ----------------------------------------------------------------------

HOTLINE = """
[[rule]]
id = "hotline"
on = "call_out"
where = "peer == 12122"
channels = ["sms"]
template = "hotline_offer"
params = ["peer"]
cooldown = "0s"
"""


def test_daemon_killed_while_kannel_is_down_delivers_everything_once_after_both_return(
        tmp_path, batch, kannel_gateway):  # noqa: F811
    config = config_text(tmp_path, f'[inputs.switch]\nendpoint = "ipc://{tmp_path}/switch"\n',
                         '[outputs.box]\ntype = "outbox"\npath = "outbox.db"\n') + f"""
[channels.sms]
type = "sms"
backoff_initial = "100ms"
backoff_max = "500ms"
max_attempts = 1000
max_age = "36500d"
url = "{kannel_gateway.sendsms_url}"
username = "{USERNAME}"
password = "{PASSWORD}"
from = "{SENDER}"
listen = "127.0.0.1:{kannel_gateway.ports.mo}"

[channels.sms.templates]
hotline_offer = "您拨打了{{peer}}，回复YES开通车主服务"
"""
    numbers = [8613900000300 + k for k in range(5)]
    kannel_gateway.stop()
    try:
        daemon = DaemonProcess(tmp_path, config, HOTLINE)
        sockets = Sockets()
        try:
            feeder = sockets.push(f"ipc://{tmp_path}/switch")
            for k, msisdn in enumerate(numbers):
                feeder.send(arrow_message(pa.RecordBatch.from_pydict(
                    batch([{"ts": 1_000 + k, "msisdn": msisdn, "kind": 0, "peer": 12122}]))))
            daemon.wait_for_metric("kairos_channel_retries_total", 5, channel="sms")
            daemon.process.kill()  # a crash: no drain, rows left pending or in flight
            daemon.process.wait()
        finally:
            daemon.stop()
            sockets.close()
        box = Outbox(tmp_path / "outbox.db")
        assert sum(n for (c, s), n in box.counts().items() if s in ("pending", "in-flight")) == 5
        box.close()
    finally:
        kannel_gateway.start()
    daemon = DaemonProcess(tmp_path, config, HOTLINE)
    try:
        daemon.wait_for_metric("kairos_channel_delivered_total", 5, channel="sms")
        # Delivery reports come back, for instructions the restarted engine does not hold (no state_dir):
        # reported, and counted as unknown ids.
        daemon.wait_for_metric("kairos_channel_feedback_reports_total", 5, channel="sms", result="unknown")
        assert daemon.stop() == 0
    finally:
        daemon.stop()
    wait_until(lambda: all(received_by(kannel_gateway, n) for n in numbers))
    time.sleep(1.0)
    counts = Counter(m[1] for m in kannel_gateway.received())
    assert [counts[str(n)] for n in numbers] == [1] * 5
    ((_, _, coding, text),) = received_by(kannel_gateway, numbers[0])
    assert coding == "ucs-2"
    assert urllib.parse.unquote_to_bytes(text).decode("utf-16-be") == "您拨打了12122，回复YES开通车主服务"
