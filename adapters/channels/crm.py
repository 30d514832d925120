"""crm: next-best-action hints for the call centre and the service hall, claimed by one agent at a time.

An agent's desktop asks ``GET /subscribers/{msisdn}/next-best-action[?agent=NAME]`` and gets the best
pending offer (200) or nothing (204).  Before presenting it the agent claims it with
``POST .../next-best-action/{id}/claim`` and ``{"agent": NAME}``: the claim is exclusive for `claim_lease`
(409 while another agent holds it), and a claimed offer is shown to no other agent meanwhile.  The
subscriber's answer is posted to ``POST .../next-best-action/{id}/outcome`` with
``{"response_id": "...", "outcome": "accepted" | "declined" | "considering", "agent": NAME}``; each
response id becomes feedback once.  "considering" keeps the offer open for a later answer.

The store is SQLite by default (`path`) and PostgreSQL in production (`dsn = "postgresql://..."`), the
same class and the same SQL.  Config keys and examples: docs/channels.md.
"""

from __future__ import annotations

import re
from typing import Any

from adapters.channels.offer_api import HttpError, OfferChannel, body_field, refusal
from adapters.channels.store import OfferStore

OUTCOMES = ("accepted", "declined", "considering")


def _agent(query: dict) -> str | None:
    agents = query.get("agent")
    return agents[0] if agents else None


def _next_best_action(channel: CrmChannel, msisdn: int, groups: tuple[str, ...], query: dict,
                      body: Any) -> tuple[int, Any]:
    offers = channel.ask(channel.store.pending, msisdn, channel.name, channel.clock(), agent=_agent(query), limit=1)
    channel.counts.add("lookups")
    return (200, offers[0].to_json()) if offers else (204, None)


def _claim(channel: CrmChannel, msisdn: int, groups: tuple[str, ...], query: dict, body: Any) -> tuple[int, Any]:
    agent = body_field(body, "agent")
    answer = channel.ask(channel.store.claim, groups[0], msisdn, channel.name, agent, channel.clock(),
                         channel.claim_lease_ms)
    if answer.result != "ok":
        channel.counts.add("claims_refused")
        raise refusal(answer)
    channel.counts.add("claims")
    return 200, answer.offer.to_json()


def _outcome(channel: CrmChannel, msisdn: int, groups: tuple[str, ...], query: dict, body: Any) -> tuple[int, Any]:
    agent = body.get("agent") if isinstance(body, dict) else None
    if agent is not None and (not isinstance(agent, str) or not agent):
        raise HttpError(400, "agent must be a non-empty string when given")
    return channel.answer_outcome(groups[0], msisdn, body, OUTCOMES, agent=agent)


class CrmChannel(OfferChannel):
    kind = "crm"
    default_listen = "127.0.0.1:8471"
    routes = (
        ("GET", re.compile(r"/next-best-action"), _next_best_action),
        ("POST", re.compile(r"/next-best-action/([^/]+)/claim"), _claim),
        ("POST", re.compile(r"/next-best-action/([^/]+)/outcome"), _outcome),
    )

    def __init__(self, name: str, store: OfferStore, *, claim_lease_ms: int, **kwargs: Any):
        super().__init__(name, store, **kwargs)
        self.claim_lease_ms = claim_lease_ms

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> CrmChannel:
        o, kwargs = cls._options(name, options)
        try:
            claim_lease_ms = o.duration_ms("claim_lease", "5m")
            o.finish()
            return cls(name, claim_lease_ms=claim_lease_ms, **kwargs)
        except BaseException:
            kwargs["store"].close()
            raise
