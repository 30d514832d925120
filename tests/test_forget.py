"""Engine.forget(msisdns): erasure leaves nothing of a subscriber in the engine or in a later checkpoint.

The differential property: an engine that processes S, forgets X, then
processes T gives every other subscriber exactly what an engine that never
saw X's events in S gives them on T, and gives X on T exactly what an
engine that only ever saw X's events of T gives X.  Guardrails
(`max_per_hour`) couple subscribers and are left out of these rules on
purpose.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import KIND_CODES, Engine
from engine.erasure import CAPS_PER_SUB, as_msisdns, forget_state

RULES = """
[policy]
daily_cap = 25
decline_cooldown = "900ms"

[[rule]]
id = "hotline"
on = "call_out"
where = "peer in [12122, 96122]"
count = { at_least = 2, within = "1s" }
channels = ["sms", "crm"]
params = ["peer"]
priority = 30
cooldown = "400ms"
holdout = 0.3
goal = { on = "order", where = "code == 2001", within = "1s" }

[[rule]]
id = "roaming"
on = ["location", "call_out"]
where = "mcc in [454, 455]"
first = { within = "2s" }
channels = ["sms"]
params = ["mcc"]
priority = 50

[[rule]]
id = "handset"
on = "device"
changed = { column = "imei" }
channels = ["sms", "portal"]
params = ["imei"]
priority = 40
cooldown = "300ms"

[[rule]]
id = "heavy_data"
on = "data"
sum = { column = "volume", at_least = 250, within = "1s", resolution = "50ms" }
channels = ["sms"]
priority = 20
goal = { on = "order", within = "800ms" }

[[rule]]
id = "traveller"
on = "location"
distinct = { column = "cell", at_least = 3, within = "1s" }
channels = ["sms", "crm"]
priority = 25
cooldown = "200ms"

[[rule]]
id = "roaming_call"
on = "call_out"
after = { rule = "roaming", within = "500ms" }
channels = ["crm"]
priority = 45

[[rule]]
id = "low_balance"
on = "balance"
where = "balance < 500"
absence = { on = "recharge", where = "amount > 0", within = "300ms" }
params = ["balance"]
channels = ["sms"]
priority = 35

[[rule]]
id = "prepaid_sms"
on = "sms_out"
audience = "profile.segment == 'prepaid'"
channels = ["sms", "portal"]
priority = 10
cooldown = "150ms"
"""

BASE_TS = 1_700_000_000_000
# Twelve-digit numbers drawn once: their int64 bytes and decimal text are unlikely to turn up by chance.
POPULATION = np.random.default_rng(20240611).integers(10**11, 10**12, 30).astype(np.int64)
KINDS = np.array([KIND_CODES[k] for k in (
    "call_out", "location", "device", "data", "balance", "recharge", "sms_out", "order")], np.uint8)
KIND_WEIGHTS = np.array([0.25, 0.15, 0.08, 0.15, 0.1, 0.07, 0.12, 0.08])
OUTCOMES = np.array([None, "delivered", "accepted", "declined", "opt_out"], object)
OUTCOME_WEIGHTS = np.array([0.6, 0.15, 0.1, 0.12, 0.03])


def stream(seed: int, n: int = 3000) -> dict[str, np.ndarray]:
    """Seeded events in event-time order over POPULATION, with the values the rules look for."""
    rng = np.random.default_rng(seed)
    return {
        "ts": BASE_TS + np.cumsum(rng.integers(0, 3, n)).astype(np.int64),
        "msisdn": rng.choice(POPULATION, n),
        "kind": rng.choice(KINDS, n, p=KIND_WEIGHTS),
        "peer": rng.choice(np.array([0, 12122, 96122, 7], np.int64), n),
        "volume": rng.choice(np.array([0, 50, 100], np.int64), n),
        "amount": rng.choice(np.array([0, 100], np.int64), n),
        "balance": rng.choice(np.array([100, 800], np.int64), n),
        "cell": rng.choice(np.array([0, 11, 12, 13, 14], np.int64), n),
        "mcc": rng.choice(np.array([460, 454, 455, 0], np.uint16), n),
        "imei": rng.choice(np.array([0, 1, 2, 3], np.int64), n),
        "code": rng.choice(np.array([0, 2001, 2002], np.int32), n),
    }


def rows(events: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in events.items()}


def profiles(without: tuple[int, ...] | np.ndarray = ()) -> pa.Table:
    """Every other subscriber prepaid; a column that spells the msisdn out as text, as a real profile would."""
    table = pa.table({
        "msisdn": POPULATION,
        "segment": ["prepaid" if k % 2 else "postpaid" for k in range(len(POPULATION))],
        "email": [f"{m}@mail.example" for m in POPULATION.tolist()],
    })
    return table.filter(pa.array(~np.isin(POPULATION, without)))


def of(table: pa.Table, msisdns: np.ndarray, keep: bool) -> pa.Table:
    """The rows of `table` whose msisdn is (keep) or is not (not keep) in msisdns."""
    inside = pc.is_in(table.column("msisdn"), value_set=pa.array(msisdns, pa.int64()))
    return table.filter(inside if keep else pc.invert(inside))


def as_multiset(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda row: (row["id"], row["ts"], row["rule"]))


def additive_figures(engine: Engine) -> dict[tuple, int]:
    """The per-rule figures that add up over subscribers (rates do not; feedback counts are not per subscriber)."""
    out = {}
    for rule, figures in engine.stats()["rules"].items():
        for name in ("matched", "sent", "holdout", "cap_draw"):
            out[rule, name] = figures[name]
        for group in ("sent_by_channel", "stopped", "goal"):
            for name, value in figures[group].items():
                out[rule, group, name] = value
    return out


def minus(a: dict, b: dict) -> dict:
    return {k: a[k] - b.get(k, 0) for k in a}


def give_feedback(engine: Engine, issued: pa.Table, seed: int, ts: int) -> tuple[list[str], list[str]]:
    """Random outcomes for some of `issued` (opt-outs, acceptances, declines for anyone); the ids and outcomes."""
    rng = np.random.default_rng(seed)
    outcomes = rng.choice(OUTCOMES, issued.num_rows, p=OUTCOME_WEIGHTS)
    chosen = [k for k, o in enumerate(outcomes) if o is not None]
    ids = [issued.column("id")[k].as_py() for k in chosen]
    said = [str(outcomes[k]) for k in chosen]
    if ids:
        engine.feedback(ids, said, ts)
    return ids, said


# ---------------------------------------------------------------------------
# The differential property.


def run_scenario(seed: int, cut: float, forgotten: np.ndarray) -> dict:
    """A forgets X between S and T; B never saw X's events of S; C saw only X's events of T.

    B and C are given the profiles less X's, which is what A holds once it
    has forgotten X.  Every engine has its event time moved to the cut
    (advance) before the feedback and to well past T's end afterwards, so
    that timers fire at the same watermarks in all three.
    """
    events = stream(seed)
    n = len(events["ts"])
    split = int(cut * n)
    s_rows, t_rows = np.arange(n) < split, np.arange(n) >= split
    of_x = np.isin(events["msisdn"], forgotten)
    t_cut = int(events["ts"][split - 1]) if split else BASE_TS
    t_end = int(events["ts"][-1]) + 10_000

    a = Engine.from_text(RULES, profiles=profiles())
    b = Engine.from_text(RULES, profiles=profiles(without=forgotten))
    c = Engine.from_text(RULES, profiles=profiles(without=forgotten))

    a_s = pa.concat_tables([a.process(rows(events, s_rows)), a.advance(t_cut)])
    b_s = pa.concat_tables([b.process(rows(events, s_rows & ~of_x)), b.advance(t_cut)])
    c.advance(t_cut)
    # Subscribers do not see each other: the others got the same instructions in S from A and B.
    assert sorted(of(a_s, forgotten, keep=False).column("id").to_pylist()) == sorted(b_s.column("id").to_pylist())

    ids, said = give_feedback(a, a_s, seed, t_cut)
    if ids:
        b.feedback(ids, said, t_cut)  # X's ids are unknown to B
    x_in_state = int(np.isin(a._kernel.export_state()["msisdn"], forgotten).sum())
    x_issued = of(a_s, forgotten, keep=True).num_rows
    x_ids = set(of(a_s, forgotten, keep=True).column("id").to_pylist())
    x_feedback = [o for i, o in zip(ids, said, strict=True) if i in x_ids]

    before = {"a": additive_figures(a), "b": additive_figures(b)}
    counts = a.forget(forgotten)
    assert counts == {"subscribers": x_in_state, "profiles": int(np.isin(POPULATION, forgotten).sum()),
                      "issued": x_issued}
    assert additive_figures(a) == before["a"]  # counters are aggregates: forget leaves them

    a_t = pa.concat_tables([a.process(rows(events, t_rows)), a.advance(t_end)])
    b_t = pa.concat_tables([b.process(rows(events, t_rows)), b.advance(t_end)])
    c_t = pa.concat_tables([c.process(rows(events, t_rows & of_x)), c.advance(t_end)])

    # B saw X's events of T too, never those of S: after the erasure A is B, instruction for instruction.
    assert a_t.equals(b_t)
    assert as_multiset(of(a_t, forgotten, keep=True)) == as_multiset(c_t)
    # Stops, goal conversions and sends over T: the same, so no block, cap or goal window of X's survived.
    assert minus(additive_figures(a), before["a"]) == minus(additive_figures(b), before["b"])
    return {"c_t": c_t, "x_feedback": x_feedback, "x_issued": x_issued, "events": events, "t_rows": t_rows,
            "t_cut": t_cut, "t_end": t_end, "ids": ids, "said": said}


@given(seed=st.integers(0, 2**32 - 1), cut=st.floats(0.05, 0.95),
       picks=st.lists(st.integers(0, len(POPULATION) - 1), min_size=1, max_size=4, unique=True),
       unknown=st.booleans())
def test_forgotten_subscribers_start_afresh_and_the_others_do_not_notice(seed, cut, picks, unknown):
    forgotten = POPULATION[picks]
    if unknown:
        forgotten = np.append(forgotten, 999_999_999_999)
    run_scenario(seed, cut, forgotten)


@pytest.mark.parametrize("seed", range(4))
def test_the_property_has_teeth(seed):
    """The scenarios exercise what forget must erase, and without the erasure X's T would differ."""
    forgotten = POPULATION[:5]
    result = run_scenario(seed, 0.6, forgotten)
    assert result["x_issued"] > 10 and result["c_t"].num_rows > 10
    assert {"accepted", "declined"} <= set(result["x_feedback"])
    assert set(result["c_t"].column("rule").to_pylist()) >= {"hotline", "low_balance", "handset", "traveller"}
    # An engine that keeps X's history and feedback gives X something else on T.
    events, t_rows, t_cut = result["events"], result["t_rows"], result["t_cut"]
    kept = Engine.from_text(RULES, profiles=profiles())
    kept.process(rows(events, ~t_rows))
    kept.advance(t_cut)
    kept.feedback(result["ids"], result["said"], t_cut)
    kept_t = pa.concat_tables([kept.process(rows(events, t_rows)), kept.advance(result["t_end"])])
    assert as_multiset(of(kept_t, forgotten, keep=True)) != as_multiset(result["c_t"])


def test_a_pending_timer_of_a_forgotten_subscriber_never_fires(batch):
    x, y = int(POPULATION[0]), int(POPULATION[1])
    low = [{"ts": BASE_TS, "msisdn": m, "kind": KIND_CODES["balance"], "balance": 100} for m in (x, y)]
    control = Engine.from_text(RULES)
    control.process(batch(low))
    assert sorted(control.advance(BASE_TS + 300).column("msisdn").to_pylist()) == sorted([x, y])

    eng = Engine.from_text(RULES)
    eng.process(batch(low))
    clock = eng._kernel.max_ts
    assert eng.forget([x]) == {"subscribers": 1, "profiles": 0, "issued": 0}
    assert eng._kernel.max_ts == clock  # the new kernel goes on from the old one's event time
    assert eng.advance(BASE_TS + 300).column("msisdn").to_pylist() == [y]
    assert eng.advance(BASE_TS + 10_000).num_rows == 0


def test_opt_out_and_acceptance_go_with_the_subscriber(batch):
    x, y = int(POPULATION[0]), int(POPULATION[1])
    device = [{"ts": BASE_TS, "msisdn": m, "kind": KIND_CODES["device"], "imei": 1} for m in (x, y)]
    device += [{"ts": BASE_TS + 1, "msisdn": m, "kind": KIND_CODES["device"], "imei": 2} for m in (x, y)]
    eng = Engine.from_text(RULES)
    out = eng.process(batch(device))
    assert out.column("msisdn").to_pylist() == [x, y]
    ids = out.column("id").to_pylist()
    assert eng.feedback(ids, ["opt_out", "accepted"], BASE_TS + 2)["applied"] == 2
    assert eng.forget(np.array([x])) == {"subscribers": 1, "profiles": 0, "issued": 1}
    # Feedback to X's earlier instruction no longer reaches anyone.
    assert eng.feedback(ids[:1], "opt_out", BASE_TS + 3) == {"applied": 0, "unknown": 1, "invalid": 0}
    again = [{"ts": BASE_TS + 1000 + k, "msisdn": m, "kind": KIND_CODES["device"], "imei": 1 + k % 2}
             for k in range(2) for m in (x, y)]
    out = eng.process(batch(again))
    assert out.column("msisdn").to_pylist() == [x]  # y is still suppressed; x is new, its second imei fires
    assert eng.stats()["rules"]["handset"]["stopped"]["suppressed"] == 2  # y, both imei changes


# ---------------------------------------------------------------------------
# forget_state against a per-subscriber reading of the state.


def by_subscriber(state: dict[str, np.ndarray]) -> dict[int, dict]:
    """Every piece of state keyed by msisdn instead of dense id (a plain loop: the statement, not the code)."""
    width = state["width"]
    stateful = np.flatnonzero(width > 0)
    n_rules = len(width)
    out = {int(m): {"rows": {}, "blocks": {}, "caps": {}, "goals": []} for m in state["msisdn"]}
    msisdn = state["msisdn"].tolist()
    for d, m in enumerate(msisdn):
        for k, r in enumerate(stateful):
            slot = int(state["slots"][d, k])
            if slot >= 0:
                out[m]["rows"][int(r)] = tuple(state[f"state.{r}"][slot * width[r]:(slot + 1) * width[r]].tolist())
    for key, value in zip(state["blocks.key"].tolist(), state["blocks.value"].tolist(), strict=True):
        out[msisdn[key // (n_rules + 1) - 1]]["blocks"][key % (n_rules + 1)] = value
    for key, value in zip(state["caps.key"].tolist(), state["caps.value"].tolist(), strict=True):
        out[msisdn[key // CAPS_PER_SUB - 1]]["caps"][key % CAPS_PER_SUB] = value
    for key, ts, flags in state["goal_records"].tolist():
        out[msisdn[key // (n_rules + 1) - 1]]["goals"].append((key % (n_rules + 1), ts, flags))
    return out


def busy_engine(seed: int) -> Engine:
    events = stream(seed)
    eng = Engine.from_text(RULES, profiles=profiles())
    issued = eng.process(rows(events, np.arange(len(events["ts"])) < 2500))
    give_feedback(eng, issued, seed, int(events["ts"][2499]))
    return eng


@pytest.mark.parametrize("seed", range(3))
def test_forget_state_removes_exactly_the_subscribers(seed):
    state = busy_engine(seed)._kernel.export_state()
    assert len(state["blocks.key"]) and len(state["caps.key"]) and len(state["goal_records"])
    forgotten = np.random.default_rng(seed).choice(state["msisdn"], 7, replace=False)
    after = forget_state(state, np.append(forgotten, 123))
    expected = {m: v for m, v in by_subscriber(state).items() if m not in set(forgotten.tolist())}
    assert by_subscriber(after) == expected
    assert after["msisdn"].tolist() == [m for m in state["msisdn"].tolist() if m in expected]
    for name in ("width", "matched", "emitted", "guard", "paused", "policy_clock", "goal_clock", "sent_channel"):
        assert np.array_equal(after[name], state[name])
    # Rows go with their subscriber: the pools shrink by the forgotten subscribers' rows and keep no hole.
    of_forgotten = state["slots"][np.isin(state["msisdn"], forgotten)]
    for k, r in enumerate(np.flatnonzero(state["width"] > 0)):
        owned = int((of_forgotten[:, k] >= 0).sum())
        assert len(after[f"state.{r}"]) == len(state[f"state.{r}"]) - owned * state["width"][r]


def test_forget_state_of_everyone_and_of_no_one():
    state = busy_engine(5)._kernel.export_state()
    empty = forget_state(state, state["msisdn"])
    assert len(empty["msisdn"]) == 0 and empty["slots"].shape == (0, state["slots"].shape[1])
    assert all(len(empty[k]) == 0 for k in empty if k.startswith("state.") or k in ("blocks.key", "caps.key"))
    assert empty["goal_records"].shape == (0, 3)
    same = forget_state(state, [1, 2, 3])
    assert same.keys() == state.keys() and all(np.array_equal(same[k], state[k]) for k in state)


def test_msisdns_are_integers():
    assert as_msisdns(5).tolist() == [5]
    assert as_msisdns([]).dtype == np.int64
    assert as_msisdns(pa.array([7, 3, 7], pa.int64())).tolist() == [3, 7]
    with pytest.raises(TypeError):
        as_msisdns([1.5])


# ---------------------------------------------------------------------------
# Nothing left: in memory, in a checkpoint; unknown msisdns; restore.


def traces(directory: pathlib.Path, msisdn: int) -> list[str]:
    """Files of a checkpoint holding the msisdn as int64 little-endian bytes or as decimal text."""
    needles = (np.int64(msisdn).tobytes(), str(msisdn).encode())
    return [path.name for path in sorted(directory.rglob("*")) if path.is_file()
            and any(needle in path.read_bytes() for needle in needles)]


def test_a_checkpoint_after_forget_holds_no_trace(tmp_path):
    eng = busy_engine(1)
    state = eng._kernel.export_state()
    forgotten = [int(m) for m in state["msisdn"][:4]]
    survivor = int(state["msisdn"][5])
    eng.checkpoint(tmp_path / "before")
    for m in forgotten:  # the search finds them when they are there: state, profile and issued memory
        assert {"state.npz", "profiles.arrow", "issued.arrow"} <= set(traces(tmp_path / "before", m))
    counts = eng.forget(forgotten)
    assert counts["subscribers"] == 4 and counts["profiles"] == 4 and counts["issued"] > 0
    eng.checkpoint(tmp_path / "after")
    for m in forgotten:
        assert traces(tmp_path / "after", m) == []
        assert eng.profiles.get(m) == {}
    assert {"state.npz", "profiles.arrow"} <= set(traces(tmp_path / "after", survivor))
    assert eng.stats()["subscribers"] == len(state["msisdn"]) - 4
    assert eng.stats()["profiles"] == len(POPULATION) - 4


def test_forgetting_unknown_subscribers_changes_nothing(tmp_path):
    events = stream(9)
    first, rest = np.arange(len(events["ts"])) < 1500, np.arange(len(events["ts"])) >= 1500
    a, b = Engine.from_text(RULES, profiles=profiles()), Engine.from_text(RULES, profiles=profiles())
    for eng in (a, b):
        give_feedback(eng, eng.process(rows(events, first)), 9, int(events["ts"][1499]))
    before = a._kernel.export_state()
    assert a.forget([999_999_999_999, 1]) == {"subscribers": 0, "profiles": 0, "issued": 0}
    assert a.forget([]) == {"subscribers": 0, "profiles": 0, "issued": 0}
    after = a._kernel.export_state()
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert a.process(rows(events, rest)).equals(b.process(rows(events, rest)))
    stats = [{k: v for k, v in e.stats().items() if k != "state_bytes"} for e in (a, b)]
    assert stats[0] == stats[1]


def test_forget_then_checkpoint_then_restore_continues_exactly(tmp_path):
    events = stream(4)
    n = len(events["ts"])
    first, rest = np.arange(n) < 2000, np.arange(n) >= 2000
    eng = Engine.from_text(RULES, profiles=profiles())
    give_feedback(eng, eng.process(rows(events, first)), 4, int(events["ts"][1999]))
    forgotten = POPULATION[3:9]
    eng.forget(forgotten)
    eng.checkpoint(tmp_path / "state")
    restored = Engine.restore(tmp_path / "state")
    assert not np.isin(restored._kernel.export_state()["msisdn"], forgotten).any()
    assert restored.process(rows(events, rest)).equals(eng.process(rows(events, rest)))
    assert restored.advance(BASE_TS + 10**6).equals(eng.advance(BASE_TS + 10**6))
    stats = [{k: v for k, v in e.stats().items() if k != "state_bytes"} for e in (eng, restored)]
    assert stats[0] == stats[1]
