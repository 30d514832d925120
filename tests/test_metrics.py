"""Metrics exposition parsed back, and the HTTP server driven with real requests."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from engine.metrics import (
    CONTENT_TYPE,
    LATENCY_BUCKETS,
    Histogram,
    MetricsServer,
    Registry,
    counter,
    gauge,
    histogram,
)

# ---------------------------------------------------------------------------
# A parser for the text format 0.0.4, written from the format's description, not from the renderer.

_SAMPLE = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], text)


def parse_exposition(text: str) -> dict:
    """{name: {"type", "help", "samples": {(sample name, frozenset(labels)): value}}}."""
    assert text.endswith("\n")
    families: dict = {}
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"{name} described twice"
            current = families[name] = {"help": _unescape(help_text), "samples": {}}
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert current is families[name], "TYPE must follow its HELP"
            current["type"] = kind
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            labels, rest = {}, match.group("labels") or ""
            while rest:
                label = _LABEL.match(rest)
                assert label, f"bad labels in {line!r}"
                labels[label.group(1)] = _unescape(label.group(2))
                rest = rest[label.end() :]
            name = match.group("name")
            assert name.startswith(next(reversed(families))), f"{name} outside its family"
            current["samples"][(name, frozenset(labels.items()))] = float(match.group("value"))
    return families


# ---------------------------------------------------------------------------
# Exposition


def test_counters_and_gauges_with_labels_and_escaping():
    registry = Registry()
    nasty = 'a\\b "quoted"\nnext line 北京'
    registry.register(
        lambda: [
            counter("kairos_events", "Events taken.\nAll feeds, C:\\ path.", 12345678901234),
            counter(
                "kairos_rule_sent_total", "Instructions sent by rule.", [({"rule": "r1"}, 3), ({"rule": nasty}, 0)]
            ),
            gauge("kairos_subscribers", "Subscribers with state.", np.int64(42)),
            gauge(
                "kairos_lag_seconds", "Event-time lag.", [({"feed": "switch"}, 0.25), ({"feed": "sig"}, float("inf"))]
            ),
        ]
    )
    text = registry.render()
    parsed = parse_exposition(text)
    assert parsed["kairos_events_total"] == {
        "help": "Events taken.\nAll feeds, C:\\ path.",
        "type": "counter",
        "samples": {("kairos_events_total", frozenset()): 12345678901234.0},
    }
    assert "kairos_events_total 12345678901234\n" in text  # integers stay exact, no float rounding
    assert parsed["kairos_rule_sent_total"]["type"] == "counter"
    assert parsed["kairos_rule_sent_total"]["samples"] == {
        ("kairos_rule_sent_total", frozenset({("rule", "r1")})): 3.0,
        ("kairos_rule_sent_total", frozenset({("rule", nasty)})): 0.0,
    }
    assert parsed["kairos_subscribers"]["samples"] == {("kairos_subscribers", frozenset()): 42.0}
    assert parsed["kairos_lag_seconds"]["type"] == "gauge"
    assert parsed["kairos_lag_seconds"]["samples"][("kairos_lag_seconds", frozenset({("feed", "sig")}))] == float("inf")
    assert 'feed="sig"} +Inf' in text
    # The escaped value sits on one line: no raw newline inside a sample.
    assert len(text.splitlines()) == 4 * 2 + 1 + 2 + 1 + 2


def test_histogram_buckets_sum_and_count():
    hist = Histogram([0.01, 0.1, 1.0])
    hist.observe(0.01)  # on a bound: counted in that bucket (le is <=)
    hist.observe(0.5)
    hist.observe_many(np.array([0.001, 0.05, 0.1, 2.0, 30.0, np.nan]))
    by_channel = Histogram([0.01, 0.1, 1.0])
    by_channel.observe_many(np.array([[0.2, 0.3]]))
    registry = Registry()
    registry.register(lambda: [histogram("kairos_batch_seconds", "Batch time.", hist)])
    registry.register(lambda: [histogram("kairos_send_seconds", "Send time.", [({"channel": "sms"}, by_channel)])])
    parsed = parse_exposition(registry.render())

    family = parsed["kairos_batch_seconds"]
    assert family["type"] == "histogram"
    buckets = {dict(labels)["le"]: v for (name, labels), v in family["samples"].items() if name.endswith("_bucket")}
    assert buckets == {"0.01": 2, "0.1": 4, "1.0": 5, "+Inf": 7}
    assert family["samples"][("kairos_batch_seconds_count", frozenset())] == 7
    assert family["samples"][("kairos_batch_seconds_sum", frozenset())] == pytest.approx(32.661)

    labelled = parsed["kairos_send_seconds"]["samples"]
    assert labelled[("kairos_send_seconds_bucket", frozenset({("channel", "sms"), ("le", "0.1")}))] == 0
    assert labelled[("kairos_send_seconds_bucket", frozenset({("channel", "sms"), ("le", "1.0")}))] == 2
    assert labelled[("kairos_send_seconds_count", frozenset({("channel", "sms")}))] == 2


def test_histogram_many_equals_one_by_one():
    values = np.random.default_rng(7).lognormal(-5, 2, 10_000)
    together, one_by_one = Histogram(), Histogram()
    together.observe_many(values)
    for value in values:
        one_by_one.observe(float(value))
    assert np.array_equal(together.snapshot()[0], one_by_one.snapshot()[0])
    assert together.snapshot()[1] == pytest.approx(one_by_one.snapshot()[1])
    assert together.snapshot()[0][-1] == 10_000
    assert len(together.bounds) == len(LATENCY_BUCKETS)


def test_histogram_is_consistent_under_concurrent_observation():
    hist = Histogram([1.0])
    values = np.full(1000, 0.5)
    workers = [threading.Thread(target=lambda: [hist.observe_many(values) for _ in range(50)]) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    counts, total = hist.snapshot()
    assert counts.tolist() == [200_000, 200_000] and total == 100_000.0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: counter("2fast", "", 1), "metric name '2fast'"),
        (lambda: gauge("g", "", [({"bad-label": "x"}, 1)]), "label name 'bad-label'"),
        (lambda: gauge("g", "", [({"__reserved": "x"}, 1)]), "label name '__reserved'"),
        (lambda: histogram("h", "", [({"le": "1"}, Histogram())]), "label name 'le'"),
        (lambda: Histogram([1.0, 1.0]), "strictly increasing"),
        (lambda: Histogram([]), "strictly increasing"),
    ],
)
def test_bad_metric_definitions_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_duplicate_families_fail_the_scrape():
    registry = Registry()
    registry.register(lambda: [gauge("x", "", 1)])
    second = registry.register(lambda: [gauge("x", "", 2)])
    with pytest.raises(ValueError, match="'x' is collected twice"):
        registry.render()
    registry.unregister(second)
    assert registry.render() == "# HELP x \n# TYPE x gauge\nx 1\n"
    assert Registry().render() == ""


# ---------------------------------------------------------------------------
# HTTP


def request(server: MetricsServer, method: str, path: str, *, token: str | None = None, body: bytes | None = None):
    """(status, headers, body) of one real HTTP request."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read()


class Switch:
    """A health or readiness state the test flips."""

    def __init__(self, ok: bool = True, reason: str = "ok"):
        self.ok, self.reason = ok, reason

    def __call__(self) -> tuple[bool, str]:
        return self.ok, self.reason


@pytest.fixture
def served():
    registry = Registry()
    registry.register(lambda: [counter("kairos_events", "Events taken.", 7)])
    health, ready = Switch(), Switch(False, "restoring checkpoint")
    reloads = []

    def reload():
        reloads.append(1)
        return (len(reloads) == 1, "rules reloaded" if len(reloads) == 1 else "rules.toml line 3: unknown kind")

    def broken():
        raise RuntimeError("boom")

    server = MetricsServer("127.0.0.1", 0, registry, health=health, ready=ready,
                           control={"reload": reload, "broken": broken})  # fmt: skip
    with server:
        yield server, health, ready, reloads


def test_port_zero_and_metrics(served):
    server = served[0]
    assert server.port != 0
    status, headers, body = request(server, "GET", "/metrics?name[]=x")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE
    assert parse_exposition(body.decode())["kairos_events_total"]["samples"] == {
        ("kairos_events_total", frozenset()): 7.0
    }
    assert request(server, "GET", "/nothing")[0] == 404
    assert request(server, "POST", "/metrics", body=b"")[0] == 405


def test_health_and_readiness_states(served):
    server, health, ready, _ = served
    assert request(server, "GET", "/healthz")[::2] == (200, b"ok\n")
    assert request(server, "GET", "/readyz")[::2] == (503, b"restoring checkpoint\n")
    ready.ok = True
    assert request(server, "GET", "/readyz")[::2] == (200, b"ok\n")
    health.ok, health.reason = False, "kernel stalled for 30 s"
    assert request(server, "GET", "/healthz")[::2] == (503, b"kernel stalled for 30 s\n")


def test_control_without_token_on_loopback(served):
    server, _, _, reloads = served
    status, headers, body = request(server, "POST", "/control/reload", body=b"")
    assert (status, json.loads(body)) == (200, {"ok": True, "message": "rules reloaded"})
    assert headers["Content-Type"] == "application/json"
    status, _, body = request(server, "POST", "/control/reload", body=b"")
    assert (status, json.loads(body)) == (400, {"ok": False, "message": "rules.toml line 3: unknown kind"})
    assert len(reloads) == 2
    assert request(server, "POST", "/control/shutdown", body=b"")[0] == 404
    assert request(server, "GET", "/control/reload")[0] == 405
    assert len(reloads) == 2


def test_failures_in_handlers_do_not_stop_the_server(served):
    server, health, _, _ = served
    status, _, body = request(server, "POST", "/control/broken", body=b"")
    assert status == 500 and json.loads(body) == {"ok": False, "message": "broken failed: RuntimeError: boom"}

    def failing_check():
        raise OSError("disk gone")

    server.health = failing_check
    assert request(server, "GET", "/healthz")[::2] == (503, b"check failed: OSError: disk gone\n")
    server.registry.register(lambda: 1 / 0)
    assert request(server, "GET", "/metrics")[::2] == (500, b"internal error: ZeroDivisionError\n")
    server.health = health
    assert request(server, "GET", "/healthz")[0] == 200


def test_request_body_size_is_limited(served):
    server, _, _, reloads = served
    assert request(server, "POST", "/control/reload", body=b"x" * (server.max_body + 1))[0] == 413
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.putrequest("POST", "/control/reload")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        with connection.getresponse() as response:
            assert response.status == 411
    finally:
        connection.close()
    assert reloads == []


def test_control_with_token():
    calls = []
    server = MetricsServer("127.0.0.1", 0, Registry(), token="s3cret-token",
                           control={"reload": lambda: (calls.append(1) or True, "done")})  # fmt: skip
    with server:
        assert request(server, "POST", "/control/reload", body=b"")[0] == 401
        status, headers, _ = request(server, "POST", "/control/reload", token="wrong", body=b"")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        # Unknown actions are not revealed without the token.
        assert request(server, "POST", "/control/nope", token="wrong", body=b"")[0] == 401
        assert request(server, "POST", "/control/nope", token="s3cret-token", body=b"")[0] == 404
        assert calls == []
        status, _, body = request(server, "POST", "/control/reload", token="s3cret-token", body=b"")
        assert (status, json.loads(body)) == (200, {"ok": True, "message": "done"})
        assert calls == [1]
        # Reading needs no token.
        assert request(server, "GET", "/metrics")[0] == 200
        assert request(server, "GET", "/healthz")[0] == 200


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_beyond_loopback_requires_a_token():
    for host in ("0.0.0.0", "", "::", "10.0.0.1"):
        with pytest.raises(ValueError, match="requires a token"):
            MetricsServer(host, 0, Registry())
    with pytest.raises(ValueError, match="must not be empty"):
        MetricsServer("127.0.0.1", 0, Registry(), token="")
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    server = MetricsServer(address, 0, Registry(), token="t0ken", control={"reload": lambda: (True, "done")})
    with server:
        url = f"http://{address}:{server.port}/control/reload"
        req = urllib.request.Request(url, data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=5)
        refused.value.close()
        assert refused.value.code == 401
        req.add_header("Authorization", "Bearer t0ken")
        with urllib.request.urlopen(req, timeout=5) as response:
            assert response.status == 200


def test_start_stop():
    server = MetricsServer("localhost", 0, Registry())
    server.start()
    with pytest.raises(RuntimeError, match="already started"):
        server.start()
    port = server.port
    busy = MetricsServer("127.0.0.1", port, Registry())
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
        busy.start()
    server.stop()
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
