"""portal: offers the self-service portal shows a subscriber at login, and the answers it posts back.

The portal asks ``GET /subscribers/{msisdn}/offers`` and gets the pending offers as a JSON list, highest
priority first.  The lookup answers within `timeout` seconds whatever the store does: when the store is
slow or down the answer is an empty list (200), so a login never waits on Kairos.  The portal posts the
subscriber's answer to ``POST /subscribers/{msisdn}/offers/{id}/response`` with
``{"response_id": "...", "outcome": "accepted" | "declined"}``; each response id becomes feedback once.
Offers expire `offer_ttl` after their `not_before`.  Config keys and examples: docs/channels.md.
"""

from __future__ import annotations

import re
from typing import Any

from adapters.channels.offer_api import OfferChannel
from adapters.channels.store import StoreUnavailable

OUTCOMES = ("accepted", "declined")


def _offers(channel: OfferChannel, msisdn: int, groups: tuple[str, ...], query: dict, body: Any) -> tuple[int, Any]:
    try:
        offers = channel.ask(channel.store.pending, msisdn, channel.name, channel.clock())
    except StoreUnavailable:
        channel.counts.add("empty_answers")
        return 200, []
    channel.counts.add("lookups")
    return 200, [offer.to_json() for offer in offers]


def _response(channel: OfferChannel, msisdn: int, groups: tuple[str, ...], query: dict,
              body: Any) -> tuple[int, Any]:
    return channel.answer_outcome(groups[0], msisdn, body, OUTCOMES)


class PortalChannel(OfferChannel):
    kind = "portal"
    default_listen = "127.0.0.1:8470"
    routes = (
        ("GET", re.compile(r"/offers"), _offers),
        ("POST", re.compile(r"/offers/([^/]+)/response"), _response),
    )

    @classmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> PortalChannel:
        o, kwargs = cls._options(name, options)
        try:
            o.finish()
            return cls(name, **kwargs)
        except BaseException:
            kwargs["store"].close()
            raise
