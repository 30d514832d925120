"""Channels in the daemon: `[channels.NAME]` in kairos.toml, the outbox output, feedback from channels."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import orjson
import pyarrow as pa
import pytest
from channel_testing import wait_until
from kannel import free_port
from test_daemon import DaemonProcess, Sockets, arrow_message, config_text

from adapters.channels.outbox import Outbox
from engine.config import ConfigError, parse_config

HOTLINE = """
[[rule]]
id = "hotline"
on = "call_out"
where = "peer == 12122"
channels = ["sms"]
template = "t"
cooldown = "0s"
"""

MINIMAL = """
[engine]
rules = "rules.toml"

[inputs.switch]
endpoint = "tcp://127.0.0.1:5555"

[outputs.box]
type = "outbox"
path = "outbox.db"
"""


def test_channel_tables_parse_with_delivery_keys_and_channel_options(tmp_path):
    config = parse_config(MINIMAL + """
[channels.sms]
type = "file"
path = "sent.jsonl"
concurrency = 2
rate = 12.5
burst = 5
max_attempts = 3
backoff_initial = "200ms"
backoff_max = "1m"
report = "delivered"

[channels.note]
type = "stdout"
""", "k.toml", tmp_path)
    sms, note = config.channels["sms"], config.channels["note"]
    assert (sms.type, sms.concurrency, sms.rate, sms.burst, sms.max_attempts) == ("file", 2, 12.5, 5, 3)
    assert (sms.backoff_initial_ms, sms.backoff_max_ms) == (200, 60_000)
    assert sms.options == {"path": str(tmp_path / "sent.jsonl"), "report": "delivered"}
    assert (note.concurrency, note.rate, note.max_attempts, note.options) == (4, None, 0, {})


@pytest.mark.parametrize(("extra", "key", "reason"), [
    ('[channels.sms]\npath = "x"\n', "channels.sms.type", "required"),
    ('[channels.sms]\ntype = "file"\nrate = 0\n', "channels.sms.rate", "positive"),
    ('[channels.sms]\ntype = "file"\nconcurrency = 0\n', "channels.sms.concurrency", "at least 1"),
    ('[channels.sms]\ntype = "file"\nbackoff_initial = "5s"\nbackoff_max = "1s"\n', "channels.sms.backoff_max",
     "at least backoff_initial"),
    ('[channels.sms]\ntype = "file"\nmax_attempts = true\n', "channels.sms.max_attempts", "integer"),
    ('[channels]\nsms = 3\n', "channels.sms", "expected a table"),
])  # fmt: skip
def test_channel_tables_refused_with_file_and_key(tmp_path, extra, key, reason):
    with pytest.raises(ConfigError, match=reason) as caught:
        parse_config(MINIMAL + extra, "k.toml", tmp_path)
    assert caught.value.source == "k.toml" and caught.value.key == key


def test_channels_and_the_outbox_come_together(tmp_path):
    with pytest.raises(ConfigError, match="delivers nothing") as caught:
        parse_config(MINIMAL, "k.toml", tmp_path)
    assert caught.value.key == "outputs.box"
    no_outbox = MINIMAL.replace('type = "outbox"', 'type = "file"') + '[channels.sms]\ntype = "file"\n'
    with pytest.raises(ConfigError, match="add an output with type") as caught:
        parse_config(no_outbox, "k.toml", tmp_path)
    assert caught.value.key == "channels"


def test_unknown_channel_type_and_unknown_channel_key_refuse_to_start(tmp_path):
    (tmp_path / "rules.toml").write_text(HOTLINE, encoding="utf-8")
    for channel, expected in (('type = "pigeon"', "unknown channel type 'pigeon'; known types:"),
                              ('type = "file"\npath = "x"\ncolour = "red"', "unknown key(s) 'colour'")):
        config = tmp_path / "kairos.toml"
        config.write_text(config_text(tmp_path, f'[inputs.switch]\nendpoint = "ipc://{tmp_path}/switch"\n',
                                      '[outputs.box]\ntype = "outbox"\npath = "outbox.db"\n')
                          + f"[channels.sms]\n{channel}\n", encoding="utf-8")
        result = subprocess.run([sys.executable, "-m", "engine.cli", "run", "-c", str(config)],
                                capture_output=True, text=True, timeout=60, env={**os.environ})
        assert result.returncode == 2, result.stderr
        assert "kairos.toml: channels.sms:" in result.stderr and expected in result.stderr


def daemon_with_file_channel(tmp_path, report: str = "accepted") -> DaemonProcess:
    inputs = f'[inputs.switch]\nendpoint = "ipc://{tmp_path}/switch"\n'
    outputs = '[outputs.box]\ntype = "outbox"\npath = "outbox.db"\n'
    # The events are dated 1970 (ts 1_000): a long max_age keeps their instructions valid (default: a day).
    channels = (f'[channels.sms]\ntype = "file"\npath = "sent.jsonl"\nreport = "{report}"\nrate = 100\n'
                'max_age = "36500d"\n')
    return DaemonProcess(tmp_path, config_text(tmp_path, inputs, outputs) + channels, HOTLINE)


def sent(tmp_path) -> list[dict]:
    path = tmp_path / "sent.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def test_instructions_reach_the_channel_and_its_feedback_reaches_the_engine(tmp_path, batch):
    sockets = Sockets()
    daemon = daemon_with_file_channel(tmp_path)
    try:
        feeder = sockets.push(f"ipc://{tmp_path}/switch")

        def call(ts: int, msisdn: int = 8613800000001) -> None:
            feeder.send(arrow_message(pa.RecordBatch.from_pydict(
                batch([{"ts": ts, "msisdn": msisdn, "kind": 0, "peer": 12122}]))))

        call(1_000)
        (first,) = wait_until(lambda: sent(tmp_path))
        assert first["msisdn"] == 8613800000001 and first["rule"] == "hotline" and first["channel"] == "sms"
        # The file channel reports "accepted"; on the loop thread it suppresses the rule for the subscriber.
        daemon.wait_for_metric("kairos_channel_feedback_reports_total", 1, channel="sms", result="applied")
        daemon.wait_for_metric("kairos_rule_feedback_total", 1, rule="hotline", outcome="accepted")
        call(2_000)
        daemon.wait_for_metric("kairos_policy_stops_total", 1, rule="hotline", reason="suppressed")
        call(3_000, msisdn=8613800000002)
        wait_until(lambda: len(sent(tmp_path)) == 2)
        daemon.wait_for_metric("kairos_channel_delivered_total", 2, channel="sms")
        for status in ("pending", "parked"):
            assert f'kairos_outbox_instructions{{channel="sms",status="{status}"}} 0' in daemon.get("/metrics")[1]
        assert daemon.stop() == 0
    finally:
        daemon.stop()
        sockets.close()
    assert [r["msisdn"] for r in sent(tmp_path)] == [8613800000001, 8613800000002]

    # A replay of the same events after a restart without state: same ids, nothing sent twice.
    daemon = daemon_with_file_channel(tmp_path)
    sockets = Sockets()
    try:
        feeder = sockets.push(f"ipc://{tmp_path}/switch")
        for ts, msisdn in ((1_000, 8613800000001), (3_000, 8613800000002)):
            feeder.send(arrow_message(pa.RecordBatch.from_pydict(
                batch([{"ts": ts, "msisdn": msisdn, "kind": 0, "peer": 12122}]))))
        daemon.wait_for_metric("kairos_instructions_total", 2, rule="hotline", channel="sms")
        time.sleep(0.5)
        assert daemon.stop() == 0
    finally:
        daemon.stop()
        sockets.close()
    assert len(sent(tmp_path)) == 2
    box = Outbox(tmp_path / "outbox.db")
    assert box.counts() == {("sms", "delivered"): 2}
    box.close()


# ---------------------------------------------------------------------------------------------------------------
# portal and crm in the daemon: offers over HTTP, answers back to the engine


OFFER_RULES = """
[[rule]]
id = "roaming_offer"
on = "call_out"
where = "peer == 12122"
channels = ["portal"]
template = "roam_pack"
params = ["peer"]
cooldown = "0s"

[[rule]]
id = "card_offer"
on = "call_out"
where = "peer == 95555"
channels = ["crm"]
template = "card"
cooldown = "0s"
"""

SUBSCRIBER, CALLER = 8613800000001, 8613900000002


def http_json(method: str, url: str, body: dict | None = None) -> tuple[int, object]:
    """One request to a channel's API: the status and the JSON answer (None when empty)."""
    request = urllib.request.Request(url, method=method, data=None if body is None else orjson.dumps(body),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
        err.close()
    return status, orjson.loads(raw) if raw else None


def test_portal_and_crm_answers_reach_the_engine_in_the_daemon(tmp_path, batch):
    portal_port, crm_port = free_port(), free_port()
    inputs = f'[inputs.switch]\nendpoint = "ipc://{tmp_path}/switch"\n'
    outputs = '[outputs.delivery]\ntype = "outbox"\npath = "outbox.db"\n'
    channels = (f'[channels.portal]\ntype = "portal"\npath = "portal.sqlite"\nlisten = "127.0.0.1:{portal_port}"\n\n'
                f'[channels.crm]\ntype = "crm"\npath = "crm.sqlite"\nlisten = "127.0.0.1:{crm_port}"\n')
    sockets = Sockets()
    daemon = DaemonProcess(tmp_path, config_text(tmp_path, inputs, outputs) + channels, OFFER_RULES)
    portal = f"http://127.0.0.1:{portal_port}/subscribers/{SUBSCRIBER}"
    crm = f"http://127.0.0.1:{crm_port}/subscribers/{CALLER}/next-best-action"
    try:
        assert daemon.started["channels"] == {"portal": "portal", "crm": "crm"}
        feeder = sockets.push(f"ipc://{tmp_path}/switch")
        # Event time is now: offers are presented from their not_before, on the wall clock, and expire after it.
        now = int(time.time() * 1000)

        def call(ts: int, msisdn: int, peer: int) -> None:
            feeder.send(arrow_message(pa.RecordBatch.from_pydict(
                batch([{"ts": ts, "msisdn": msisdn, "kind": 0, "peer": peer}]))))

        # The portal at login: the offer the rule made, then the subscriber accepts it.
        call(now, SUBSCRIBER, 12122)
        (offer,) = wait_until(lambda: http_json("GET", f"{portal}/offers")[1])
        assert (offer["rule"], offer["template"], offer["params"]) == ("roaming_offer", "roam_pack", {"peer": "12122"})
        answer = {"response_id": "web-1", "outcome": "accepted"}
        status, body = http_json("POST", f"{portal}/offers/{offer['id']}/response", answer)
        assert (status, body["recorded"], body["offer"]["status"]) == (200, True, "accepted")
        # A retry of the same response changes nothing and gives no second feedback.
        status, body = http_json("POST", f"{portal}/offers/{offer['id']}/response", answer)
        assert (status, body["repeat"]) == (200, True)
        daemon.wait_for_metric("kairos_channel_feedback_reports_total", 1, channel="portal", result="applied")
        daemon.wait_for_metric("kairos_rule_feedback_total", 1, rule="roaming_offer", outcome="accepted")
        # The engine now suppresses the rule for the subscriber: the next matching call makes no offer.
        call(now + 1_000, SUBSCRIBER, 12122)
        daemon.wait_for_metric("kairos_policy_stops_total", 1, rule="roaming_offer", reason="suppressed")
        assert daemon.metric("kairos_instructions_total", rule="roaming_offer", channel="portal") == 1
        assert http_json("GET", f"{portal}/offers") == (200, [])

        # The CRM: an agent claims the next-best-action, another is refused, the subscriber will think about it.
        call(now + 2_000, CALLER, 95555)
        status, action = wait_until(lambda: (lambda a: a if a[0] == 200 else None)(
            http_json("GET", f"{crm}?agent=hall-3")))
        assert action["rule"] == "card_offer"
        claim = f"{crm}/{action['id']}/claim"
        status, body = http_json("POST", claim, {"agent": "hall-3"})
        assert (status, body["status"], body["claimed_by"]) == (200, "claimed", "hall-3")
        status, body = http_json("POST", claim, {"agent": "call-7"})
        assert (status, body["error"], body["claimed_by"]) == (409, "held", "hall-3")
        status, body = http_json("POST", f"{crm}/{action['id']}/outcome",
                                 {"response_id": "hall-3-1", "outcome": "considering", "agent": "hall-3"})
        assert (status, body["offer"]["status"]) == (200, "considering")
        daemon.wait_for_metric("kairos_rule_feedback_total", 1, rule="card_offer", outcome="considering")
        # At the next contact another agent presents the same offer; the subscriber declines.
        status, again = http_json("GET", f"{crm}?agent=call-7")
        assert (status, again["id"], again["status"]) == (200, action["id"], "considering")
        assert http_json("POST", claim, {"agent": "call-7"})[0] == 200
        status, body = http_json("POST", f"{crm}/{action['id']}/outcome",
                                 {"response_id": "call-7-1", "outcome": "declined", "agent": "call-7"})
        assert (status, body["offer"]["status"]) == (200, "declined")
        daemon.wait_for_metric("kairos_rule_feedback_total", 1, rule="card_offer", outcome="declined")
        daemon.wait_for_metric("kairos_channel_feedback_reports_total", 2, channel="crm", result="applied")
        # The rule rests for its decline cooldown: the next matching call makes no new action.
        call(now + 3_000, CALLER, 95555)
        daemon.wait_for_metric("kairos_policy_stops_total", 1, rule="card_offer", reason="decline_cooldown")
        assert daemon.metric("kairos_instructions_total", rule="card_offer", channel="crm") == 1
        assert http_json("GET", f"{crm}?agent=call-7") == (204, None)

        for name in ("portal", "crm"):
            assert daemon.metric("kairos_channel_delivered_total", channel=name) == 1
            assert daemon.metric("kairos_channel_feedback_reports_total", channel=name, result="unknown") == 0
        assert daemon.metric("kairos_rule_feedback_total", rule="roaming_offer", outcome="accepted") == 1
        assert daemon.stop() == 0
    finally:
        daemon.stop()
        sockets.close()


def test_a_bad_channel_is_refused_before_any_state_is_restored(tmp_path, batch):
    """A channel config that cannot be used refuses the start before the checkpoint is loaded (or the journal
    replayed), so a typo costs no restore time and leaves the state as it was."""
    inputs = f'[inputs.switch]\nendpoint = "ipc://{tmp_path}/switch"\n'
    outputs = '[outputs.box]\ntype = "outbox"\npath = "outbox.db"\n'
    good = (config_text(tmp_path, inputs, outputs, extra='state_dir = "state"')
            + '[channels.sms]\ntype = "file"\npath = "sent.jsonl"\nmax_age = "36500d"\n')
    first = DaemonProcess(tmp_path, good, HOTLINE)
    assert first.stop() == 0
    assert list((tmp_path / "state" / "checkpoints").glob("*/meta.json"))
    (tmp_path / "kairos.toml").write_text(good.replace('type = "file"', 'type = "pagr"'), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "engine.cli", "run", "-c", str(tmp_path / "kairos.toml")],
                            capture_output=True, text=True, timeout=60, env={**os.environ})
    assert result.returncode == 2
    assert "channels.sms" in result.stderr and "pagr" in result.stderr
    assert "state restored" not in result.stderr


def test_every_channels_own_counters_reach_metrics(tmp_path, monkeypatch):
    """Each channel's `stats()` (replies_unmatched, empty_answers, a plug-in's own counters) is on /metrics as
    kairos_channel_stat_total{channel, stat}; values that are not numbers are left out."""
    from test_metrics import parse_exposition

    from engine.daemon import Daemon

    (tmp_path / "rules.toml").write_text(HOTLINE, encoding="utf-8")
    config = parse_config(config_text(tmp_path, f'[inputs.switch]\nendpoint = "ipc://{tmp_path}/switch"\n',
                                      '[outputs.box]\ntype = "outbox"\npath = "outbox.db"\n')
                          + '[channels.sms]\ntype = "file"\npath = "sent.jsonl"\n'
                          + '[channels.note]\ntype = "stdout"\n', str(tmp_path / "kairos.toml"), tmp_path)
    daemon = Daemon(config)
    try:
        sms = daemon.delivery.channels["sms"][0]
        monkeypatch.setattr(sms, "stats", lambda: {"replies_unmatched": 3, "pigeons_lost": 2, "mood": "fine"})
        server = daemon.metrics_server
        with urllib.request.urlopen(f"http://{server.host}:{server.port}/metrics", timeout=10) as reply:
            families = parse_exposition(reply.read().decode())
        family = families["kairos_channel_stat_total"]
        assert family["type"] == "counter"
        samples = {dict(labels)["channel"] + "/" + dict(labels)["stat"]: value
                   for (_, labels), value in family["samples"].items()}
        assert samples == {"sms/pigeons_lost": 2, "sms/replies_unmatched": 3, "note/written": 0,
                           "note/duplicates": 0}
        # the delivery worker's counters stay in their own families
        assert ("kairos_channel_delivered_total", frozenset({("channel", "sms")})) in \
            families["kairos_channel_delivered_total"]["samples"]
    finally:
        daemon._close()


def test_run_check_validates_everything_and_binds_or_writes_nothing(tmp_path):
    inputs = f'[inputs.switch]\nendpoint = "ipc://{tmp_path}/switch"\n'
    outputs = '[outputs.box]\ntype = "outbox"\npath = "outbox.db"\n'
    good = (config_text(tmp_path, inputs, outputs, extra='state_dir = "state"')
            + '[channels.sms]\ntype = "file"\npath = "sent.jsonl"\n')
    (tmp_path / "rules.toml").write_text(HOTLINE, encoding="utf-8")
    config = tmp_path / "kairos.toml"
    before = sorted(p.name for p in tmp_path.iterdir())

    def check() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "engine.cli", "run", "--check", "-c", str(config)],
                              capture_output=True, text=True, timeout=60, env={**os.environ})

    config.write_text(good, encoding="utf-8")
    result = check()
    assert result.returncode == 0, result.stderr
    assert "OK: the daemon would start" in result.stdout and "channels.sms: type file" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "kairos.toml"])  # nothing made
    for broken, rules, expected in (
            (good.replace('type = "file"', 'type = "pagr"'), HOTLINE, "channels.sms"),
            (good, HOTLINE.replace('channels = ["sms"]', 'channels = ["smss"]'), "'smss' is not configured"),
            (good + '[outputs.other]\ntype = "fil"\npath = "out"\n', HOTLINE, "outputs.other.type")):
        config.write_text(broken, encoding="utf-8")
        (tmp_path / "rules.toml").write_text(rules, encoding="utf-8")
        result = check()
        assert result.returncode == 2 and expected in result.stderr, result.stderr
