"""docs/campaigns.md is true: each worked campaign, run through the engine, gives exactly the instructions shown.

The page has, per campaign, a `toml` block of rules, then an `events` block (one event a line: local date and
time, msisdn, kind, column=value pairs; or `advance DATE TIME`) and an `instructions` block (local time, msisdn,
rule, channel, param=value pairs, optionally not_before=DATE TIME).  The page's first `toml` block is the policy
every campaign shares.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from engine import KIND_CODES, Engine

PAGE = Path(__file__).resolve().parent.parent / "docs" / "campaigns.md"
ZONE = ZoneInfo("Asia/Shanghai")
BLOCK = re.compile(r"```(toml|events|instructions)\n(.*?)```", re.S)


def local_ms(day: str, clock: str) -> int:
    return int(datetime.fromisoformat(f"{day}T{clock}").replace(tzinfo=ZONE).timestamp() * 1000)


def campaigns() -> list[tuple[str, str, str, str]]:
    """(title, rules text, events block, instructions block) per campaign on the page."""
    text = PAGE.read_text(encoding="utf-8")
    blocks = [(m.group(1), m.group(2), text[:m.start()]) for m in BLOCK.finditer(text)]
    policy = blocks[0][1]
    found = []
    for k in range(1, len(blocks) - 2):
        (kind, rules, before), (events_kind, events, _), (out_kind, out, _) = blocks[k:k + 3]
        if (kind, events_kind, out_kind) == ("toml", "events", "instructions"):
            title = re.findall(r"^## (.*)$", before, re.M)[-1]
            found.append((title, policy + rules, events, out))
    return found


def run(rules: str, events: str) -> list[dict]:
    engine = Engine.from_text(rules)
    rows = []
    for line in events.strip().splitlines():
        fields = line.split()
        if fields[0] == "advance":
            rows.extend(engine.advance(local_ms(fields[1], fields[2])).to_pylist())
            continue
        day, clock, msisdn, kind, *pairs = fields
        batch = {"ts": np.array([local_ms(day, clock)]), "msisdn": np.array([int(msisdn)]),
                 "kind": np.array([KIND_CODES[kind]], np.uint8)}
        for pair in pairs:
            name, value = pair.split("=")
            batch[name] = np.array([int(value)])
        rows.extend(engine.process(batch).to_pylist())
    return rows


def expected(block: str) -> list[tuple]:
    rows = []
    for line in block.strip().splitlines():
        day, clock, msisdn, rule, channel, *pairs = line.split()
        ts = local_ms(day, clock)
        params, not_before = {}, ts
        rest = iter(pairs)
        for pair in rest:
            name, value = pair.split("=")
            if name == "not_before":
                not_before = local_ms(value, next(rest))
            else:
                params[name] = value
        rows.append((ts, int(msisdn), rule, channel, not_before, params))
    return rows


CAMPAIGNS = campaigns()


def test_the_page_has_a_campaign_per_condition():
    rules = "".join(rules for _, rules, _, _ in CAMPAIGNS)
    for condition in ("first", "after", "count", "changed", "absence", "sum", "distinct"):
        assert re.search(rf"^{condition} = ", rules, re.M), condition


@pytest.mark.parametrize(("title", "rules", "events", "instructions"), CAMPAIGNS, ids=[c[0] for c in CAMPAIGNS])
def test_worked_campaign(title, rules, events, instructions):
    got = [(r["ts"], r["msisdn"], r["rule"], r["channel"], r["not_before"], dict(r["params"]))
           for r in run(rules, events)]
    assert got == expected(instructions)
