"""Contact policy vocabulary shared by the kernel's Engine and the reference.

The policy itself (SPEC section 4) runs in the kernel's decide phase
(engine/_fast/kernel.pyx) and, plainly, in engine/reference.py; docs/policy.md
describes it for operators.  This module holds what both must agree on: the
stop reasons and feedback outcomes and their order, the holdout hash, and the
layout of the per-rule figures in `stats()`.
"""

from __future__ import annotations

import hashlib

# Why a match did not become an instruction, in the order policy checks them.
# `paused` is the guardrail (a rule over its max_per_hour), checked before
# anything else once a rule is paused; `decline_cooldown` is step 2's rest
# after `declined`, counted apart from `suppressed` (accepted, for good).
STOP_REASONS = (
    "paused", "opt_out", "suppressed", "decline_cooldown", "cooldown", "arbitrated", "no_channel", "capped",
)
# Feedback outcomes (SPEC section 6); the position is the outcome code.
OUTCOMES = ("delivered", "failed", "accepted", "declined", "considering", "opt_out")
OUTCOME_CODES = {name: code for code, name in enumerate(OUTCOMES)}
# Block value of an accepted offer: the rule never again for that subscriber.
FOREVER = 2**63 - 1
HOUR_MS = 3_600_000

_M64 = (1 << 64) - 1
# Keeps holdout membership independent of instruction ids, which share rule_seed.
HOLDOUT_SALT = 0x2545F4914F6CDD1D


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def holdout_seed(rule_id: str) -> int:
    """64-bit seed of a rule's holdout hash, from its id alone."""
    return int.from_bytes(hashlib.blake2b(b"holdout:" + rule_id.encode(), digest_size=8).digest(), "little")


def holdout_threshold(fraction: float) -> int:
    """Subscribers whose 53-bit holdout hash is below this are the control group."""
    return int(fraction * 2**53)


def holdout_hash(msisdn: int, seed: int) -> int:
    """53-bit hash of (msisdn, rule): the same subscriber is always in or out of a rule's control group."""
    return _mix64((msisdn ^ seed ^ HOLDOUT_SALT) & _M64) >> 11


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def rule_report(counters: dict[str, int], sent_by_channel: dict[str, int], paused: bool, shadow: bool) -> dict:
    """One rule's entry of stats()["rules"], from its raw counters.

    `counters` has matched, emitted (instructions, holdout included), holdout,
    cap_draw, stopped_<reason> for each STOP_REASON, each OUTCOME, goal_treated
    and goal_holdout.  Rates are None when their denominator is 0.  For a
    shadow rule, sent, holdout, sent_by_channel and cap_draw are what it would
    have sent: it sends nothing.
    """
    holdout = counters["holdout"]
    sent = counters["emitted"] - holdout
    delivered = counters["delivered"]
    treated_rate = _rate(counters["goal_treated"], sent)
    holdout_rate = _rate(counters["goal_holdout"], holdout)
    return {
        "matched": counters["matched"],
        "sent": sent,
        "holdout": holdout,
        "sent_by_channel": sent_by_channel,
        "stopped": {reason: counters[f"stopped_{reason}"] for reason in STOP_REASONS},
        "feedback": {outcome: counters[outcome] for outcome in OUTCOMES},
        "goal": {"treated": counters["goal_treated"], "holdout": counters["goal_holdout"]},
        "rates": {
            "delivery": _rate(delivered, sent),
            "acceptance": _rate(counters["accepted"], delivered),
            "decline": _rate(counters["declined"], delivered),
            "conversion": treated_rate,
            "holdout_conversion": holdout_rate,
            "uplift": None if treated_rate is None or holdout_rate is None else treated_rate - holdout_rate,
        },
        "paused": paused,
        "shadow": shadow,
        "cap_draw": counters["cap_draw"],
    }
