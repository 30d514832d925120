"""The offer store holds the same guarantees in SQLite and in a real PostgreSQL, with the same SQL."""

from __future__ import annotations

import threading

import pytest

from adapters.channels.store import Offer, OfferStore, StoreUnavailable

NOW = 1_700_000_000_000
DAY = 86_400_000


def offer(id: str, msisdn: int = 8613800000001, *, priority: int = 0, not_before: int = NOW,
          expires_at: int = NOW + DAY, channel: str = "portal", **params: str) -> Offer:
    return Offer(id=id, msisdn=msisdn, rule="r1", channel=channel, template="t1", params=params,
                 priority=priority, created=NOW, not_before=not_before, expires_at=expires_at)


@pytest.fixture
def store(store_target):
    s = OfferStore(store_target)
    yield s
    s.close()


def test_put_is_idempotent_by_id(store):
    assert store.put(offer("a", name="李雷"))
    assert not store.put(offer("a", priority=9))
    assert store.count() == 1
    stored = store.get("a")
    assert stored.params == {"name": "李雷"} and stored.priority == 0 and stored.status == "pending"


def test_pending_filters_and_orders(store):
    store.put(offer("low", priority=1))
    store.put(offer("high", priority=5))
    store.put(offer("later", priority=9, not_before=NOW + 1000))
    store.put(offer("gone", priority=9, expires_at=NOW))
    store.put(offer("other-subscriber", msisdn=8613800000002, priority=9))
    store.put(offer("other-channel", priority=9, channel="crm"))
    assert [o.id for o in store.pending(8613800000001, "portal", NOW)] == ["high", "low"]
    assert [o.id for o in store.pending(8613800000001, "portal", NOW + 1000)] == ["later", "high", "low"]
    assert [o.id for o in store.pending(8613800000001, "portal", NOW, limit=1)] == ["high"]
    assert store.pending(8613800000009, "portal", NOW) == []


def test_expire_marks_only_open_offers_past_their_time(store):
    store.put(offer("old", expires_at=NOW + 10))
    store.put(offer("new", expires_at=NOW + DAY))
    store.put(offer("answered", expires_at=NOW + 10))
    assert store.record_outcome("answered", 8613800000001, "portal", "resp-1", "accepted", NOW).result == "ok"
    assert store.expire(NOW + 10) == 1
    assert store.get("old").status == "expired"
    assert store.get("new").status == "pending"
    assert store.get("answered").status == "accepted"
    assert store.expire(NOW + 10) == 0


def test_claim_is_exclusive_until_the_lease_lapses(store):
    store.put(offer("a"))
    msisdn = 8613800000001
    assert store.claim("a", msisdn, "portal", "alice", NOW, 60_000).result == "ok"
    held = store.claim("a", msisdn, "portal", "bob", NOW + 1, 60_000)
    assert held.result == "held" and held.detail["claimed_by"] == "alice"
    # the holder renews; others do not see the offer while it is held, the holder does
    assert store.claim("a", msisdn, "portal", "alice", NOW + 2, 60_000).offer.claimed_until == NOW + 60_002
    assert store.pending(msisdn, "portal", NOW + 3) == []
    assert [o.id for o in store.pending(msisdn, "portal", NOW + 3, agent="alice")] == ["a"]
    # the lease lapses: anyone may claim again
    assert store.claim("a", msisdn, "portal", "bob", NOW + 60_002, 60_000).result == "ok"
    assert store.get("a").claimed_by == "bob"
    assert store.claim("missing", msisdn, "portal", "bob", NOW, 60_000).result == "unknown"
    assert store.claim("a", 8613800000009, "portal", "bob", NOW, 60_000).result == "unknown"


def test_claim_race_has_one_winner(store_target):
    """Eight agents, each with its own connection, claim the same offer at once: exactly one gets it."""
    stores = [OfferStore(store_target) for _ in range(8)]
    try:
        stores[0].put(offer("contested"))
        for s in stores:
            s.count()  # connected before the start line
        barrier = threading.Barrier(len(stores))
        results: dict[str, str] = {}

        def agent(i: int) -> None:
            barrier.wait()
            results[f"agent{i}"] = stores[i].claim("contested", 8613800000001, "portal", f"agent{i}", NOW,
                                                   60_000).result

        threads = [threading.Thread(target=agent, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [name for name, result in results.items() if result == "ok"]
        assert len(winners) == 1, results
        assert sorted(results.values()) == ["held"] * 7 + ["ok"]
        assert stores[0].get("contested").claimed_by == winners[0]
    finally:
        for s in stores:
            s.close()


def test_outcome_is_idempotent_by_response_id(store):
    store.put(offer("a"))
    msisdn = 8613800000001
    first = store.record_outcome("a", msisdn, "portal", "resp-1", "accepted", NOW)
    assert first.result == "ok" and first.offer.status == "accepted" and first.offer.response_id == "resp-1"
    assert store.record_outcome("a", msisdn, "portal", "resp-1", "accepted", NOW + 5).result == "repeat"
    # the same response id cannot say something else, and a new response cannot reopen a closed offer
    assert store.record_outcome("a", msisdn, "portal", "resp-1", "declined", NOW).result == "conflict"
    assert store.record_outcome("a", msisdn, "portal", "resp-2", "declined", NOW).result == "closed"
    assert store.get("a").status == "accepted"
    assert store.unreported("portal") == [("a", "accepted", NOW, "resp-1")]
    store.mark_reported("resp-1")
    assert store.unreported("portal") == []


def test_outcome_rules(store):
    msisdn = 8613800000001
    store.put(offer("a"))
    store.put(offer("short", expires_at=NOW + 10))
    # considering keeps the offer open; a later answer closes it
    assert store.record_outcome("a", msisdn, "portal", "r1", "considering", NOW).offer.status == "considering"
    assert [o.id for o in store.pending(msisdn, "portal", NOW)] == ["a", "short"]
    assert store.record_outcome("a", msisdn, "portal", "r2", "declined", NOW).offer.status == "declined"
    assert store.record_outcome("short", msisdn, "portal", "r3", "accepted", NOW + 10).result == "expired"
    assert store.record_outcome("nope", msisdn, "portal", "r4", "accepted", NOW).result == "unknown"
    assert store.record_outcome("short", 8613800000009, "portal", "r5", "accepted", NOW).result == "unknown"
    with pytest.raises(ValueError, match="outcome must be one of"):
        store.record_outcome("short", msisdn, "portal", "r6", "delivered", NOW)
    # refused responses leave nothing behind
    assert [r[3] for r in store.unreported("portal")] == ["r1", "r2"]


def test_outcome_respects_another_agents_claim(store):
    msisdn = 8613800000001
    store.put(offer("a", channel="crm"))
    store.claim("a", msisdn, "crm", "alice", NOW, 60_000)
    assert store.record_outcome("a", msisdn, "crm", "r1", "accepted", NOW, agent="bob").result == "held"
    answer = store.record_outcome("a", msisdn, "crm", "r2", "considering", NOW, agent="alice")
    assert answer.result == "ok" and answer.offer.claimed_by is None  # an outcome releases the claim
    assert store.record_outcome("a", msisdn, "crm", "r3", "accepted", NOW, agent="bob").result == "ok"


def test_a_closed_store_refuses(store_target):
    s = OfferStore(store_target)
    s.put(offer("a"))
    s.close()
    s.close()
    with pytest.raises(StoreUnavailable):
        s.get("a")


def test_unreachable_postgresql_is_store_unavailable():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = OfferStore(f"postgresql://kairos@127.0.0.1:{port}/none", timeout=1)
    with pytest.raises(StoreUnavailable, match="postgresql offer store unavailable"):
        s.put(offer("a"))
    s.close()
