"""The channel interface: how an instruction reaches a subscriber (SPEC section 7).

A channel delivers one instruction at a time to a real system (an SMS gateway, an MMS centre, a portal,
a CRM).  Kairos never calls a channel on the engine's hot path: the daemon writes instructions to a
durable outbox and a delivery worker hands due ones to `deliver`, with retries, backoff and rate limits
(adapters/channels/outbox.py).  Third parties register a subclass under the `kairos.channels` entry-point
group; `[channels.NAME] type = "..."` in kairos.toml picks it by that entry point's name.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

# Outcomes a channel may report (SPEC section 6).
OUTCOMES = ("delivered", "failed", "accepted", "declined", "considering", "opt_out")

# (instruction id, outcome, time in ms since the epoch) -> None; thread-safe, never blocks for long.
FeedbackSink = Callable[[str, str, int], None]


@dataclass(frozen=True)
class Instruction:
    """One instruction row (SPEC section 5).  `id` is the idempotency key end to end."""

    id: str
    ts: int
    msisdn: int
    rule: str
    channel: str
    template: str
    priority: int
    holdout: bool
    not_before: int
    params: dict[str, str] = field(default_factory=dict)


class DeliveryError(Exception):
    """Base of what `Channel.deliver` raises; `reason` is short text for logs, metrics and the outbox."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Retry(DeliveryError):
    """The peer is down or busy: try again later (after `after` seconds when the peer said so)."""

    def __init__(self, reason: str, after: float | None = None):
        super().__init__(reason)
        self.after = after


class Rejected(DeliveryError):
    """The peer refused this instruction for good (bad number, template error): park it, never retry."""


class Channel(abc.ABC):
    # The entry-point name that selects this class in `[channels.NAME] type = ...`.
    kind: ClassVar[str]
    # The config name of this instance (what rules' `channels` lists name).
    name: str

    @classmethod
    @abc.abstractmethod
    def from_config(cls, name: str, options: dict[str, Any]) -> Channel:
        """A channel named `name` from its config table without `type`; unknown keys are errors."""

    def start(self, feedback: FeedbackSink) -> None:  # noqa: B027 -- channels that receive nothing need no start
        """Start receivers (delivery reports, replies, HTTP APIs) that report outcomes through `feedback`."""

    @abc.abstractmethod
    def deliver(self, instruction: Instruction) -> None:
        """Hand one instruction to the peer; return when the peer has accepted it.

        Raise `Retry` or `Rejected`.  Must be idempotent by `instruction.id`: the outbox may deliver the
        same instruction again after a crash, and the peer must not reach the subscriber twice.
        """

    def close(self) -> None:  # noqa: B027 -- channels holding nothing need no close
        """Stop receivers and release connections; idempotent."""

    def forget(self, msisdns: list[int]) -> int:
        """Erase what the channel keeps of these subscribers (offers, say); returns how many records went.

        `kairos forget` calls it on every configured channel.  A channel that keeps nothing per subscriber
        needs not override it.
        """
        return 0

    def stats(self) -> dict[str, int]:
        """Counters since the channel was made, for metrics."""
        return {}
