"""Kairos throughput benchmark: the standard workload through the engine, the kernel and the reference.

    python bench/bench_engine.py                       # standard workload, readable report
    python bench/bench_engine.py --json out.json       # the same, plus machine-readable results
    python bench/bench_engine.py --events 1000000 --subscribers 100000 --repeat 5

Standard workload: 1,000,000 subscribers with Zipf-skewed activity
(engine.synth), the 10 rules of engine/data/bench_rules.toml, 10,000,000
events in Arrow record batches of 65,536.  All batches are generated before
any timing starts.  Measured in this one process:

  engine     Engine.process over every batch, a fresh Engine per repeat
             (median, min and max over --repeat runs; per-batch latency).
  kernel     the compiled kernel alone over the same batches: validation done
             beforehand, then Kernel(compile_program(rules)).process(columns, n);
             the difference to `engine` is validation plus building the
             instruction table.
  reference  engine.reference.ReferenceEngine (plain Python, the semantics the
             kernel is held to) over the first --reference-events events: the
             baseline of the speed-up.  The Engine's instructions on the same
             events are compared with the reference's, so a fast wrong kernel
             does not go unnoticed.

Engine and kernel runs alternate (engine, kernel, engine, ...) after an
untimed warm-up on two batches, so that neither side always meets a colder
process.

Times are time.perf_counter wall time.  See bench/README.md.
"""

from __future__ import annotations

import os

# Kairos makes no BLAS call; OpenBLAS worker threads would only compete with
# the shard threads for the cores.  Must be set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import importlib.metadata
import importlib.resources
import json
import platform
import statistics
import sys
import threading
import time

import numpy as np
import pyarrow as pa

from engine import Engine, shard_of, validate_events
from engine._fast.kernel import Kernel
from engine.compiler import compile_program
from engine.engine import DEFAULT_INITIAL_SUBSCRIBERS
from engine.reference import ReferenceEngine
from engine.rules import RuleSet, load_rules, parse_rules
from engine.synth import TrafficGenerator


def _version() -> str | None:
    try:
        return importlib.metadata.version("kairos")
    except importlib.metadata.PackageNotFoundError:
        return None


def bench_rules(path: str | None) -> RuleSet:
    if path:
        return load_rules(path)
    text = importlib.resources.files("engine").joinpath("data", "bench_rules.toml").read_text(encoding="utf-8")
    return parse_rules(text, source="engine/data/bench_rules.toml")


def head(batches: list[pa.RecordBatch], n: int) -> list[pa.RecordBatch]:
    """The batches holding the first n events (the last one sliced)."""
    out, left = [], n
    for batch in batches:
        if left <= 0:
            break
        out.append(batch.slice(0, min(left, batch.num_rows)))
        left -= batch.num_rows
    return out


def run_engine(ruleset: RuleSet, batches: list[pa.RecordBatch]) -> tuple[float, list[float], Engine]:
    eng = Engine(ruleset)
    latencies = []
    clock = time.perf_counter
    started = clock()
    for batch in batches:
        t0 = clock()
        eng.process(batch)
        latencies.append(clock() - t0)
    return clock() - started, latencies, eng


def run_kernel(program: dict, validated: list) -> tuple[float, int]:
    kernel = Kernel(program, DEFAULT_INITIAL_SUBSCRIBERS)
    produced = 0
    clock = time.perf_counter
    started = clock()
    for cols in validated:
        rows = kernel.process(cols.columns, cols.n)[0]
        produced += len(rows) + len(kernel.take_fired()[0])  # event matches, then timers that fired
    return clock() - started, produced


def partition(batches: list[pa.RecordBatch], n_shards: int) -> list[list[pa.RecordBatch]]:
    """Each batch split by engine.shard_of, as an ingest adapter feeding n shards would."""
    parts: list[list[pa.RecordBatch]] = [[] for _ in range(n_shards)]
    for batch in batches:
        shard = shard_of(batch.column("msisdn").to_numpy(), n_shards)
        for s in range(n_shards):
            parts[s].append(batch.filter(pa.array(shard == s)))
    return parts


def run_shards(ruleset: RuleSet, parts: list[list[pa.RecordBatch]]) -> tuple[float, set[str]]:
    """One Engine per shard, each on its own thread; returns (seconds, instruction ids)."""
    engines = [Engine(ruleset) for _ in parts]
    outputs: list[list[pa.Table]] = [[] for _ in parts]

    def work(s: int) -> None:
        for batch in parts[s]:
            outputs[s].append(engines[s].process(batch))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(len(parts))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ids = {i for tables in outputs for table in tables for i in table.column("id").to_pylist()}
    return elapsed, ids


def summary(rates: list[float]) -> dict:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": rates}


def fmt_rate(rate: float) -> str:
    return f"{rate / 1e6:8.2f} M/s" if rate >= 1e5 else f"{rate / 1e3:8.1f} k/s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--batch-size", type=int, default=65_536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-events", type=int, default=200_000,
                        help="events for the plain-Python reference (0 to skip); default %(default)s")
    parser.add_argument("--repeat", type=int, default=3, help="runs of engine and kernel; default %(default)s")
    parser.add_argument("--rules", metavar="PATH", help="rules file (default: the packaged bench_rules.toml)")
    parser.add_argument("--shards", type=int, default=min(2, os.cpu_count() or 1),
                        help="also run this many shard Engines on as many threads (0 skips); default %(default)s")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if min(args.subscribers, args.events, args.batch_size, args.repeat) < 1 or args.reference_events < 0:
        parser.error("sizes and --repeat must be positive")

    ruleset = bench_rules(args.rules)
    clock = time.perf_counter
    say = print

    say("Kairos benchmark")
    machine = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
    }
    say(f"  machine    {machine['platform']}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"numpy {machine['numpy']}, pyarrow {machine['pyarrow']}")
    say(f"  rules      {ruleset.source} ({len(ruleset.rules)} rules)")

    # -- workload, generated before anything is timed -------------------------------
    t0 = clock()
    generator = TrafficGenerator(args.subscribers, seed=args.seed)
    population_s = clock() - t0
    t0 = clock()
    batches = list(generator.batches(args.events, args.batch_size))
    generation_s = clock() - t0
    n_events = sum(b.num_rows for b in batches)
    nbytes = sum(b.nbytes for b in batches)
    say(f"  workload   {n_events:,} events in {len(batches):,} batches of {args.batch_size:,}, "
        f"{args.subscribers:,} subscribers (Zipf s={generator.zipf_exponent}), seed {args.seed}, "
        f"{nbytes / 2**20:,.0f} MiB")
    say(f"  generation {fmt_rate(n_events / generation_s)}  ({generation_s:.2f} s; population {population_s:.2f} s)")

    t0 = clock()
    validated = [validate_events(b) for b in batches]
    validation_s = clock() - t0
    say(f"  validation {fmt_rate(n_events / validation_s)}  ({validation_s:.3f} s, validate_events alone)")
    program = compile_program(ruleset)

    # Warm-up, untimed: first-use costs (imports, Arrow kernels, allocator) off the first run.
    warm = Engine(ruleset)
    for batch, cols in zip(batches[:2], validated[:2], strict=True):
        warm.process(batch)
        Kernel(program, DEFAULT_INITIAL_SUBSCRIBERS).process(cols.columns, cols.n)
    del warm

    # -- engine and kernel, interleaved so neither always runs on a colder machine -----
    say(f"\nEngine.process and the kernel alone, {args.repeat} runs each, interleaved ...")
    engine_rates, kernel_rates, latencies = [], [], []
    last_engine, kernel_out = None, 0
    for run in range(args.repeat):
        elapsed, lat, last_engine = run_engine(ruleset, batches)
        engine_rates.append(n_events / elapsed)
        latencies.extend(lat[i] for i, b in enumerate(batches) if b.num_rows == args.batch_size)
        say(f"  run {run + 1}  engine {elapsed:7.3f} s {fmt_rate(engine_rates[-1])}", end="", flush=True)
        elapsed, kernel_out = run_kernel(program, validated)
        kernel_rates.append(n_events / elapsed)
        say(f"   kernel {elapsed:7.3f} s {fmt_rate(kernel_rates[-1])}")
    stats = last_engine.stats()
    # The pause a rules reload costs a running engine with the whole workload's state: the same rules, so every
    # rule keeps its state and all of it moves.
    start = time.perf_counter()
    last_engine.reload_rules(ruleset)
    reload_s = time.perf_counter() - start
    del validated

    # -- shards on threads: the kernel releases the GIL --------------------------------
    sharded = None
    if args.shards > 1:
        say(f"\n{args.shards} shard Engines on {args.shards} threads ({os.cpu_count()} CPUs) ...")
        parts = partition(batches, args.shards)
        single = Engine(ruleset)
        single_ids = {i for b in batches for i in single.process(b).column("id").to_pylist()}
        shard_rates = []
        for run in range(args.repeat):
            elapsed, ids = run_shards(ruleset, parts)
            shard_rates.append(n_events / elapsed)
            say(f"  run {run + 1}  {elapsed:7.3f} s {fmt_rate(shard_rates[-1])}")
        sharded = {"shards": args.shards, **summary(shard_rates), "same_instructions": ids == single_ids}
        say(f"  instructions of the shards together vs one Engine: "
            f"{'identical' if sharded['same_instructions'] else 'DIFFERENT'}")
        del parts

    # -- reference -------------------------------------------------------------------
    reference = None
    if args.reference_events:
        ref_batches = head(batches, args.reference_events)
        ref_events = sum(b.num_rows for b in ref_batches)
        say(f"Reference (plain Python), first {ref_events:,} events ...")
        ref = ReferenceEngine(ruleset)
        t0 = clock()
        ref_tables = [ref.process(b) for b in ref_batches]
        ref_s = clock() - t0
        check = Engine(ruleset)
        t0 = clock()
        eng_tables = [check.process(b) for b in ref_batches]
        slice_s = clock() - t0
        ref_ids = pa.concat_tables(ref_tables).column("id").to_pylist()
        eng_ids = pa.concat_tables(eng_tables).column("id").to_pylist()
        agree = ref_ids == eng_ids and ref.stats()["rules"] == check.stats()["rules"]
        reference = {
            "events": ref_events,
            "seconds": ref_s,
            "events_per_second": ref_events / ref_s,
            "instructions": len(ref_ids),
            "engine_agrees": agree,
            "engine_events_per_second_same_events": ref_events / slice_s,
        }
        say(f"  {ref_s:7.3f} s  {fmt_rate(reference['events_per_second'])}  "
            f"({len(ref_ids):,} instructions; Engine on the same events: "
            f"{'identical' if agree else 'DIFFERENT'})")

    # -- report ----------------------------------------------------------------------
    engine_s, kernel_s = summary(engine_rates), summary(kernel_rates)
    lat_ms = np.array(latencies) * 1e3
    p50, p99 = (float(np.percentile(lat_ms, q)) for q in (50, 99)) if len(lat_ms) else (float("nan"),) * 2
    say("\nResults (events per second; median of runs, [min - max])")
    say(f"  engine     {fmt_rate(engine_s['median'])}   [{fmt_rate(engine_s['min']).strip()} - "
        f"{fmt_rate(engine_s['max']).strip()}]   Engine.process")
    say(f"  kernel     {fmt_rate(kernel_s['median'])}   [{fmt_rate(kernel_s['min']).strip()} - "
        f"{fmt_rate(kernel_s['max']).strip()}]   Kernel.process, validation excluded")
    ratios = {"kernel_over_engine": kernel_s["median"] / engine_s["median"]}
    if reference:
        say(f"  reference  {fmt_rate(reference['events_per_second'])}   "
            f"plain Python, {reference['events']:,} events")
        ratios["engine_over_reference"] = engine_s["median"] / reference["events_per_second"]
        ratios["engine_over_reference_same_events"] = (
            reference["engine_events_per_second_same_events"] / reference["events_per_second"]
        )
        say(f"  engine / reference  {ratios['engine_over_reference']:,.0f}x  (engine on the full workload)")
        say(f"  engine / reference  {ratios['engine_over_reference_same_events']:,.0f}x  (both on the same "
            f"{reference['events']:,} events, one Engine run: "
            f"{fmt_rate(reference['engine_events_per_second_same_events']).strip()})")
    if sharded:
        ratios["shards_over_engine"] = sharded["median"] / engine_s["median"]
        say(f"  shards     {fmt_rate(sharded['median'])}   [{fmt_rate(sharded['min']).strip()} - "
            f"{fmt_rate(sharded['max']).strip()}]   {sharded['shards']} Engines on {sharded['shards']} threads, "
            f"{ratios['shards_over_engine']:.2f}x one Engine")
    say(f"  kernel / engine     {ratios['kernel_over_engine']:.2f}x  "
        f"(validation and instruction building are {1 - 1 / ratios['kernel_over_engine']:.0%} of Engine.process)")
    say(f"  latency    Engine.process per batch of {args.batch_size:,}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    say(f"  output     {stats['instructions']:,} instructions ({stats['instructions'] / n_events:.2%} of events; "
        f"kernel alone: {kernel_out:,}), {stats['subscribers']:,} subscribers with state, "
        f"state {stats['state_bytes'] / 2**20:,.1f} MiB")
    say(f"  reload     Engine.reload_rules with that state: {reload_s * 1000:,.0f} ms pause")
    say("\n  rule                    matched       sent    holdout   cooldown  arbitrated     capped")
    for rule_id, c in stats["rules"].items():
        say(f"  {rule_id:<20} {c['matched']:>10,} {c['sent']:>10,} {c['holdout']:>10,} "
            f"{c['stopped']['cooldown']:>10,} {c['stopped']['arbitrated']:>11,} {c['stopped']['capped']:>10,}")

    if args.json:
        result = {
            "benchmark": "kairos.bench_engine",
            "kairos": _version(),
            "machine": machine,
            "workload": {
                "subscribers": args.subscribers,
                "events": n_events,
                "batch_size": args.batch_size,
                "batches": len(batches),
                "seed": args.seed,
                "zipf_exponent": generator.zipf_exponent,
                "rules": ruleset.source,
                "repeat": args.repeat,
            },
            "generation_events_per_second": n_events / generation_s,
            "validation_events_per_second": n_events / validation_s,
            "engine": {**engine_s, "latency_ms": {"p50": p50, "p99": p99}},
            "kernel": kernel_s,
            "shards": sharded,
            "reference": reference,
            "ratios": ratios,
            "instructions": stats["instructions"],
            "subscribers_with_state": stats["subscribers"],
            "state_bytes": stats["state_bytes"],
            "reload_seconds": reload_s,
            "rules": stats["rules"],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        say(f"\nJSON written to {args.json}")
    if reference and not reference["engine_agrees"]:
        print("error: Engine and reference disagree on the reference slice", file=sys.stderr)
        return 1
    if sharded and not sharded["same_instructions"]:
        print("error: the shards together produced other instructions than one Engine", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
