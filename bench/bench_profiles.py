"""What a profile test costs: the standard workload with and without one rule testing subscriber profiles.

    python bench/bench_profiles.py                  # 1,000,000 subscribers, 10,000,000 events, 3 runs each
    python bench/bench_profiles.py --events 2000000 --subscribers 200000 --repeat 5

Both sides run Engine.process over the same pre-generated batches of the
standard workload (engine.synth, bench/bench_engine.py), with the same
profiles loaded: `--coverage` of the subscribers (default 80%) have one, with
a segment, a plan, a value tier and tags.  `standard` runs the ten rules of
engine/data/bench_rules.toml; `profile` adds one rule whose `where` is two
profile tests alone, on the four most frequent kinds, so nearly every event
is looked up in the profile index in the filter phase: the dearest place a
profile test can sit.  `twin` isolates what the profile test itself costs:
the same rule with `where = "imei == 1"`, the batches' imei of those four
kinds (which no standard rule reads) having been set beforehand to whether
the subscriber's profile passes the two tests, so the twin passes exactly the
same events for the same subscribers and does the same condition work.  Runs
alternate (standard, twin, profile, standard, ...) after an untimed warm-up;
the report gives each side's median events/s and the ratios of the medians,
by wall time and by this process's CPU time (on a machine shared with other
work the CPU-time ratio is the steadier one).  Loading the profiles into an
Engine (attribute matrix and profile index) is timed once.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import importlib.resources
import statistics
import time

import numpy as np
import pyarrow as pa

from engine import KIND_CODES, Engine, parse_rules
from engine.profiles import ProfileStore
from engine.synth import TrafficGenerator

PROFILE_RULE = """
[[rule]]
id = "prepaid_high_value"
on = ["call_out", "call_in", "data", "sms_out"]
where = "profile.segment == 'prepaid' and profile.value_tier >= 4"
count = { at_least = 20, within = "1d" }
channels = ["sms"]
"""
TWIN_KINDS = ("call_out", "call_in", "data", "sms_out")


def with_twin_flags(batches: list[pa.RecordBatch], store: ProfileStore) -> list[pa.RecordBatch]:
    """The batches with imei = 1 where PROFILE_RULE's where holds, 0 elsewhere, on the rule's kinds."""
    segment = store.column("segment").to_numpy(zero_copy_only=False)
    tier = store.column("value_tier").fill_null(-1).to_numpy()
    passes = (segment == "prepaid") & (tier >= 4)
    kinds = np.array([KIND_CODES[k] for k in TWIN_KINDS])
    out = []
    for batch in batches:
        rows = store.rows(batch.column("msisdn").to_numpy())
        flag = np.where(rows >= 0, passes[np.maximum(rows, 0)], False).astype(np.int64)
        imei = batch.column("imei").to_numpy().copy()
        mine = np.isin(batch.column("kind").to_numpy(), kinds)
        imei[mine] = flag[mine]
        out.append(batch.set_column(batch.schema.get_field_index("imei"), "imei", pa.array(imei)))
    return out


def profiles_for(msisdns: np.ndarray, coverage: float, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    chosen = msisdns[rng.random(len(msisdns)) < coverage]
    n = len(chosen)
    tags = pa.array([[], ["car_owner"], ["vip"], ["car_owner", "vip"]], pa.list_(pa.string()))
    return pa.table({
        "msisdn": chosen,
        "segment": pa.array(np.array(["prepaid", "postpaid"], dtype=object)[rng.integers(0, 2, n)], pa.string()),
        "plan": pa.array(np.array([128, 388, 588])[rng.integers(0, 3, n)], pa.int64()),
        "value_tier": pa.array(rng.integers(0, 6, n), pa.int64(), mask=rng.random(n) < 0.05),
        "tags": tags.take(pa.array(rng.integers(0, 4, n))),
    })


def run(engine: Engine, batches: list[pa.RecordBatch]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to process every batch."""
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        engine.process(batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--batch-size", type=int, default=65_536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--coverage", type=float, default=0.8, help="share of subscribers with a profile")
    args = parser.parse_args(argv)

    text = importlib.resources.files("engine").joinpath("data", "bench_rules.toml").read_text(encoding="utf-8")
    standard = parse_rules(text, source="engine/data/bench_rules.toml")
    with_profile = parse_rules(text + PROFILE_RULE, source="bench_rules.toml + prepaid_high_value")
    twin = parse_rules(text + PROFILE_RULE.replace(
        "profile.segment == 'prepaid' and profile.value_tier >= 4", "imei == 1"), source="bench_rules.toml + twin")
    generator = TrafficGenerator(args.subscribers, seed=args.seed)
    batches = list(generator.batches(args.events, args.batch_size))
    n_events = sum(b.num_rows for b in batches)
    profiles = profiles_for(generator.msisdns, args.coverage, args.seed)
    batches = with_twin_flags(batches, ProfileStore(profiles))
    print(f"workload  {n_events:,} events, {args.subscribers:,} subscribers, {len(profiles):,} profiles, "
          f"{os.cpu_count()} CPUs")
    started = time.perf_counter()
    Engine(with_profile, profiles=profiles)
    print(f"profiles  loaded into an Engine with the profile rule in {time.perf_counter() - started:.2f} s")

    configurations = (("standard", standard), ("twin", twin), ("profile", with_profile))
    for _, ruleset in configurations:  # warm-up, untimed
        warm = Engine(ruleset, profiles=profiles)
        for batch in batches[:2]:
            warm.process(batch)
    rates: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    figures = {}
    for k in range(args.repeat):
        for name, ruleset in configurations:
            engine = Engine(ruleset, profiles=profiles)
            wall, cpu = run(engine, batches)
            rates["wall"].setdefault(name, []).append(n_events / wall)
            rates["cpu"].setdefault(name, []).append(n_events / cpu)
            print(f"run {k + 1}  {name:<9} {wall:7.3f} s {n_events / wall / 1e6:6.2f} M events/s   "
                  f"CPU {cpu:7.3f} s {n_events / cpu / 1e6:6.2f} M events/s", flush=True)
            if name != "standard":
                figures[name] = engine.stats()["rules"]["prepaid_high_value"]["matched"]
    for clock, by_name in rates.items():
        medians = {name: statistics.median(values) for name, values in by_name.items()}
        print(f"median {clock:<4} " + ", ".join(f"{name} {rate / 1e6:.2f} M/s" for name, rate in medians.items())
              + f"; profile / standard {medians['profile'] / medians['standard']:.3f}, profile / twin "
              f"{medians['profile'] / medians['twin']:.3f}, twin / standard "
              f"{medians['twin'] / medians['standard']:.3f}")
    print(f"matches of the added rule: profile {figures['profile']:,}, twin {figures['twin']:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
