"""portal and crm channels: real HTTP over loopback, offers in SQLite and in a real PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection

import pytest

from adapters.channels.base import Instruction, Retry
from adapters.channels.crm import CrmChannel
from adapters.channels.portal import PortalChannel
from adapters.channels.store import OfferStore

NOW = 1_700_000_000_000
HOUR = 3_600_000
MSISDN = 8613800000001


def instruction(id: str, *, msisdn: int = MSISDN, priority: int = 0, not_before: int = NOW, holdout: bool = False,
                **params: str) -> Instruction:
    return Instruction(id=id, ts=NOW, msisdn=msisdn, rule="r1", channel="x", template="t1", priority=priority,
                       holdout=holdout, not_before=not_before, params=params)


def store_key(target: str) -> dict[str, str]:
    return {"dsn": target} if target.startswith("postgresql://") else {"path": target}


class Feedback:
    """A feedback sink that remembers what it was told."""

    def __init__(self):
        self.calls: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, offer_id: str, outcome: str, ts: int) -> None:
        with self.lock:
            self.calls.append((offer_id, outcome, ts))


class Clock:
    def __init__(self, now: int = NOW):
        self.now = now

    def __call__(self) -> int:
        return self.now


def http(method: str, url: str, body: object = None, *, token: str | None = None,
         raw: bytes | None = None) -> tuple[int, object]:
    """(status, parsed JSON body or None) of one real HTTP request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            status, payload = error.code, error.read()
    return status, (json.loads(payload) if payload else None)


def started(cls, target: str, feedback: Feedback | None = None, **options):
    channel = cls.from_config(cls.kind, {**store_key(target), "listen": "127.0.0.1:0", **options})
    channel.clock = Clock()
    channel.start(feedback if feedback is not None else Feedback())
    return channel


def base_url(channel) -> str:
    host, port = channel.address
    return f"http://{host}:{port}/subscribers"


@pytest.fixture
def portal(store_target):
    feedback = Feedback()
    channel = started(PortalChannel, store_target, feedback, offer_ttl="2h")
    channel.feedback_calls = feedback.calls
    yield channel
    channel.close()


@pytest.fixture
def crm(store_target):
    feedback = Feedback()
    channel = started(CrmChannel, store_target, feedback, claim_lease="5m")
    channel.feedback_calls = feedback.calls
    yield channel
    channel.close()


# -- portal ----------------------------------------------------------------------------------------------------


def test_portal_lists_pending_offers_best_first(portal):
    portal.deliver(instruction("low", priority=1, name="李雷"))
    portal.deliver(instruction("high", priority=7))
    portal.deliver(instruction("high", priority=7))  # a retried delivery
    portal.deliver(instruction("later", priority=9, not_before=NOW + HOUR))
    portal.deliver(instruction("control", priority=9, holdout=True))
    portal.deliver(instruction("someone-else", msisdn=8613800000002))
    status, offers = http("GET", f"{base_url(portal)}/{MSISDN}/offers")
    assert status == 200
    assert [o["id"] for o in offers] == ["high", "low"]
    assert offers[1]["params"] == {"name": "李雷"} and offers[1]["expires_at"] == NOW + 2 * HOUR
    portal.clock.now = NOW + HOUR
    assert [o["id"] for o in http("GET", f"{base_url(portal)}/{MSISDN}/offers")[1]] == ["later", "high", "low"]
    # offers expire offer_ttl after not_before
    portal.clock.now = NOW + 2 * HOUR
    assert [o["id"] for o in http("GET", f"{base_url(portal)}/{MSISDN}/offers")[1]] == ["later"]
    assert http("GET", f"{base_url(portal)}/8613800000009/offers") == (200, [])
    assert portal.stats()["offers"] == 4 and portal.stats()["offer_repeats"] == 1 and portal.stats()["holdout"] == 1


def test_portal_response_becomes_feedback_once(portal):
    portal.deliver(instruction("a"))
    portal.deliver(instruction("b"))
    url = f"{base_url(portal)}/{MSISDN}/offers"
    status, body = http("POST", f"{url}/a/response", {"response_id": "web-1", "outcome": "accepted"})
    assert status == 200 and body["recorded"] is True and body["offer"]["status"] == "accepted"
    status, body = http("POST", f"{url}/a/response", {"response_id": "web-1", "outcome": "accepted"})
    assert status == 200 and body["recorded"] is False and body["repeat"] is True
    assert http("POST", f"{url}/a/response", {"response_id": "web-2", "outcome": "declined"})[0] == 409
    assert http("POST", f"{url}/a/response", {"response_id": "web-1", "outcome": "declined"})[0] == 409
    assert http("POST", f"{url}/b/response", {"response_id": "web-3", "outcome": "declined"})[0] == 200
    assert portal.feedback_calls == [("a", "accepted", NOW), ("b", "declined", NOW)]
    assert [o["id"] for o in http("GET", url)[1]] == []


def test_portal_refuses_bad_requests(portal):
    portal.deliver(instruction("a", not_before=NOW))
    url = f"{base_url(portal)}/{MSISDN}/offers"
    assert http("POST", f"{url}/a/response", {"response_id": "r", "outcome": "considering"})[0] == 400
    assert http("POST", f"{url}/a/response", {"outcome": "accepted"})[0] == 400
    assert http("POST", f"{url}/a/response", raw=b"{not json")[0] == 400
    assert http("POST", f"{url}/a/response", raw=b"x" * 70_000)[0] == 413
    assert http("POST", f"{url}/nope/response", {"response_id": "r", "outcome": "accepted"})[0] == 404
    assert http("POST", f"{base_url(portal)}/8613800000009/offers/a/response",
                {"response_id": "r", "outcome": "accepted"})[0] == 404
    assert http("POST", url, {})[1] == {"error": "method_not_allowed", "allowed": ["GET"]}
    assert http("GET", f"{base_url(portal)}/abc/offers")[0] == 404
    assert http("GET", f"http://{portal.address[0]}:{portal.address[1]}/")[0] == 404
    portal.clock.now = NOW + 2 * HOUR
    status, body = http("POST", f"{url}/a/response", {"response_id": "r", "outcome": "accepted"})
    assert (status, body["error"]) == (410, "expired")
    assert portal.feedback_calls == []
    # the API still answers after all that
    assert http("GET", url) == (200, [])


def test_portal_answers_empty_when_the_store_is_slow(store_target):
    """A store that does not answer within `timeout` gives the portal an empty list, not a hung login."""
    portal = started(PortalChannel, store_target, timeout=0.3)
    try:
        portal.deliver(instruction("a"))
        url = f"{base_url(portal)}/{MSISDN}/offers"
        assert [o["id"] for o in http("GET", url)[1]] == ["a"]
        if store_target.startswith("postgresql://"):
            import psycopg

            blocker = psycopg.connect(store_target)
            blocker.execute("LOCK TABLE offers IN ACCESS EXCLUSIVE MODE")
            release = blocker.close
        else:
            portal.store._lock.acquire()
            release = portal.store._lock.release
        try:
            started_at = time.monotonic()
            assert http("GET", url) == (200, [])
            assert time.monotonic() - started_at < 1.5
        finally:
            release()
        assert portal.stats()["empty_answers"] == 1
        # the store answers again once it is free (the abandoned lookup may still be finishing)
        deadline = time.monotonic() + 5
        while [o["id"] for o in http("GET", url)[1]] != ["a"]:
            assert time.monotonic() < deadline, "the store did not come back"
            time.sleep(0.05)
    finally:
        portal.close()


def test_expired_offers_are_marked_by_the_channel(store_target):
    portal = started(PortalChannel, store_target, offer_ttl="1h", expire_every="50ms")
    try:
        portal.deliver(instruction("a"))
        portal.clock.now = NOW + HOUR
        deadline = time.monotonic() + 5
        while portal.store.get("a").status != "expired":
            assert time.monotonic() < deadline, "the offer was not expired"
            time.sleep(0.05)
    finally:
        portal.close()


def test_responses_recorded_but_not_reported_are_reported_at_start(store_target):
    """A crash between recording a response and reporting it: the next start reports it, once."""
    store = OfferStore(store_target)
    portal = PortalChannel.from_config("portal", {**store_key(store_target), "listen": "127.0.0.1:0"})
    portal.clock = Clock()
    portal.deliver(instruction("a"))
    assert store.record_outcome("a", MSISDN, "portal", "web-9", "accepted", NOW - 5).result == "ok"
    store.close()
    feedback = Feedback()
    portal.start(feedback)
    try:
        deadline = time.monotonic() + 5
        while not feedback.calls:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert feedback.calls == [("a", "accepted", NOW - 5)]
        assert portal.store.unreported("portal") == []
    finally:
        portal.close()


def test_writes_beyond_loopback_need_the_token(tmp_path):
    path = str(tmp_path / "o.sqlite")
    with pytest.raises(ValueError, match="beyond loopback; set a token"):
        PortalChannel.from_config("portal", {"path": path, "listen": "0.0.0.0:0"})
    portal = PortalChannel.from_config("portal", {"path": path, "listen": "0.0.0.0:0", "token": "s3cret"})
    portal.clock = Clock()
    feedback = Feedback()
    portal.start(feedback)
    try:
        portal.deliver(instruction("a"))
        url = f"http://127.0.0.1:{portal.address[1]}/subscribers/{MSISDN}/offers"
        answer = {"response_id": "r1", "outcome": "accepted"}
        assert http("GET", url)[0] == 200  # reads are open
        assert http("POST", f"{url}/a/response", answer)[0] == 401
        assert http("POST", f"{url}/a/response", answer, token="wrong")[0] == 401
        assert http("POST", f"{url}/a/response", answer, token="s3cret")[0] == 200
        assert [c[:2] for c in feedback.calls] == [("a", "accepted")]
    finally:
        portal.close()


def test_config_errors_name_the_channel_and_key(tmp_path):
    path = str(tmp_path / "o.sqlite")
    with pytest.raises(ValueError, match=r"channel 'p': unknown key\(s\) 'colour'"):
        PortalChannel.from_config("p", {"path": path, "colour": "red"})
    with pytest.raises(ValueError, match="channel 'p': key 'offer_ttl'"):
        PortalChannel.from_config("p", {"path": path, "offer_ttl": "soon"})
    with pytest.raises(ValueError, match="exclusive"):
        PortalChannel.from_config("p", {"path": path, "dsn": "postgresql://x@127.0.0.1/db"})
    with pytest.raises(ValueError, match="postgresql:// URL"):
        CrmChannel.from_config("c", {"dsn": "mysql://x"})
    with pytest.raises(ValueError, match="channel 'c': key 'claim_lease'"):
        CrmChannel.from_config("c", {"path": path, "claim_lease": 5})
    with pytest.raises(ValueError, match="HOST:PORT"):
        CrmChannel.from_config("c", {"path": path, "listen": "8080"})


# -- crm -------------------------------------------------------------------------------------------------------


def test_crm_next_best_action(crm):
    url = f"{base_url(crm)}/{MSISDN}/next-best-action"
    assert http("GET", url) == (204, None)
    crm.deliver(instruction("a", priority=1))
    crm.deliver(instruction("b", priority=3, offer="10GB"))
    status, body = http("GET", url)
    assert status == 200 and body["id"] == "b" and body["params"] == {"offer": "10GB"}


def test_crm_claim_race_between_two_agents(crm):
    crm.deliver(instruction("a"))
    url = f"{base_url(crm)}/{MSISDN}/next-best-action"
    barrier = threading.Barrier(2)
    answers: dict[str, tuple[int, object]] = {}

    def agent(name: str) -> None:
        barrier.wait()
        answers[name] = http("POST", f"{url}/a/claim", {"agent": name})

    threads = [threading.Thread(target=agent, args=(name,)) for name in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(status for status, _ in answers.values())
    assert statuses == [200, 409], answers
    winner = next(name for name, (status, _) in answers.items() if status == 200)
    loser = "bob" if winner == "alice" else "alice"
    assert answers[winner][1]["claimed_by"] == winner
    assert answers[loser][1] == {"error": "held", "claimed_by": winner, "claimed_until": NOW + 300_000,
                                 "status": "claimed"}
    # while the claim holds, the offer is the winner's alone
    assert http("GET", f"{url}?agent={loser}") == (204, None)
    assert http("GET", f"{url}?agent={winner}")[1]["id"] == "a"
    # the claim lapses after claim_lease
    crm.clock.now = NOW + 300_000
    assert http("POST", f"{url}/a/claim", {"agent": loser})[0] == 200


def test_crm_outcomes(crm):
    crm.deliver(instruction("a"))
    url = f"{base_url(crm)}/{MSISDN}/next-best-action"
    assert http("POST", f"{url}/a/claim", {"agent": "alice"})[0] == 200
    assert http("POST", f"{url}/a/claim", {})[0] == 400
    held = http("POST", f"{url}/a/outcome", {"response_id": "c1", "outcome": "accepted", "agent": "bob"})
    assert held[0] == 409 and held[1]["error"] == "held"
    considering = {"response_id": "c2", "outcome": "considering", "agent": "alice"}
    assert http("POST", f"{url}/a/outcome", considering)[0] == 200
    assert http("POST", f"{url}/a/outcome", considering)[1]["repeat"] is True
    # considering keeps the offer open (and released) for the next contact
    assert http("GET", f"{url}?agent=bob")[1]["status"] == "considering"
    accepted = {"response_id": "c3", "outcome": "accepted", "agent": "bob"}
    assert http("POST", f"{url}/a/outcome", accepted)[0] == 200
    assert http("POST", f"{url}/a/outcome", accepted)[0] == 200
    assert http("POST", f"{url}/a/outcome", {"response_id": "c4", "outcome": "opt_out"})[0] == 400
    assert crm.feedback_calls == [("a", "considering", NOW), ("a", "accepted", NOW)]
    assert http("GET", url) == (204, None)
    assert crm.stats()["outcomes"] == 2 and crm.stats()["outcome_repeats"] == 2


def test_postgresql_restart_loses_and_duplicates_nothing(postgresql):
    """PostgreSQL stops and starts while offers are being delivered: deliver raises Retry meanwhile (the
    outbox tries again later), the API stays responsive, and afterwards every offer is there exactly once."""
    dsn = postgresql.create_database("restart")
    crm = started(CrmChannel, dsn, timeout=0.3)
    instructions = [instruction(f"i{n}", priority=n % 5) for n in range(300)]
    retries = 0
    done: list[str] = []
    stop_at = threading.Event()

    def deliver_all() -> None:
        nonlocal retries
        queue = list(instructions)
        while queue:
            current = queue.pop(0)
            try:
                crm.deliver(current)
                done.append(current.id)
            except Retry:
                retries += 1
                queue.append(current)
                time.sleep(0.02)
            if len(done) == 100:
                stop_at.set()

    worker = threading.Thread(target=deliver_all)
    try:
        worker.start()
        assert stop_at.wait(30)
        postgresql.stop()
        try:
            url = f"{base_url(crm)}/{MSISDN}/next-best-action"
            started_at = time.monotonic()
            assert http("GET", url)[0] == 503  # the desktop is told at once, not left waiting
            assert time.monotonic() - started_at < 2
            time.sleep(0.5)
        finally:
            postgresql.start()
        worker.join(60)
        assert not worker.is_alive()
        # the outbox may hand an instruction over again after an ambiguous failure: still one offer
        for again in instructions[:50]:
            crm.deliver(again)
        assert retries > 0
        assert sorted(done) == sorted(i.id for i in instructions)
        assert crm.store.count("crm") == 300
        assert {o.id for o in crm.store.pending(MSISDN, "crm", NOW, limit=1000)} == {i.id for i in instructions}
    finally:
        crm.close()


def test_channels_are_found_by_entry_point():
    from importlib.metadata import entry_points

    from adapters.channels.base import Channel

    found = {e.name: e.load() for e in entry_points(group="kairos.channels") if e.name in ("mms", "portal", "crm")}
    assert set(found) == {"mms", "portal", "crm"}
    for name, cls in found.items():
        assert issubclass(cls, Channel) and cls.kind == name


def test_portal_keeps_connections_alive(portal):
    """A portal's connection pool reuses one connection; a refused oversized body closes it."""
    portal.deliver(instruction("a"))
    host, port = portal.address
    connection = HTTPConnection(host, port, timeout=10)
    try:
        for _ in range(3):
            connection.request("GET", f"/subscribers/{MSISDN}/offers")
            response = connection.getresponse()
            assert response.status == 200 and [o["id"] for o in json.loads(response.read())] == ["a"]
        connection.request("POST", f"/subscribers/{MSISDN}/offers/a/response", body=b"{}" + b" " * 70_000)
        response = connection.getresponse()
        assert response.status == 413 and response.getheader("Connection") == "close"
        response.read()
    finally:
        connection.close()
    assert http("GET", f"{base_url(portal)}/99999999999999999999/offers")[0] == 404
    assert http("GET", f"{base_url(portal)}/9223372036854775808/offers")[0] == 404


def test_failing_feedback_is_reported_at_the_next_start(store_target):
    """A feedback sink that fails leaves the response recorded and unreported; the next start reports it."""

    def broken(offer_id: str, outcome: str, ts: int) -> None:
        raise RuntimeError("feedback queue gone")

    portal = started(PortalChannel, store_target, broken)
    try:
        portal.deliver(instruction("a"))
        answer = http("POST", f"{base_url(portal)}/{MSISDN}/offers/a/response",
                      {"response_id": "web-1", "outcome": "declined"})
        assert answer[0] == 200 and answer[1]["recorded"] is True
        assert portal.stats()["feedback_errors"] == 1
    finally:
        portal.close()
    feedback = Feedback()
    again = PortalChannel.from_config("portal", {**store_key(store_target), "listen": "127.0.0.1:0"})
    again.clock = Clock(NOW + 1)
    again.start(feedback)
    try:
        deadline = time.monotonic() + 5
        while not feedback.calls:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert feedback.calls == [("a", "declined", NOW)]
    finally:
        again.close()


def test_an_answer_that_times_out_is_still_recorded_and_reported_once(store_target):
    """The store is busy past the API's timeout: the poster gets 503, the response is recorded and reported
    when the store frees up, and the poster's retry is a repeat, not a second outcome."""
    feedback = Feedback()
    portal = started(PortalChannel, store_target, feedback, timeout=0.2)
    try:
        portal.deliver(instruction("a"))
        url = f"{base_url(portal)}/{MSISDN}/offers/a/response"
        answer = {"response_id": "web-1", "outcome": "accepted"}
        portal.store._lock.acquire()
        try:
            assert http("POST", url, answer)[0] == 503
        finally:
            portal.store._lock.release()
        deadline = time.monotonic() + 5
        while not feedback.calls:
            assert time.monotonic() < deadline, "the recorded response was not reported"
            time.sleep(0.02)
        status, body = http("POST", url, answer)
        assert status == 200 and body["repeat"] is True
        assert feedback.calls == [("a", "accepted", NOW)]
    finally:
        portal.close()
