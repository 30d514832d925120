"""What each rule of the full-language workload costs the kernel, one rule at a time.

    python bench/bench_rule_costs.py                    # 2,000,000 events, 1,000,000 subscribers, 3 rounds
    python bench/bench_rule_costs.py --events 5000000 --rounds 5

engine/data/bench_rules_full.toml is the ten standard rules (bench_rules.toml)
plus ten that use the rest of the rule language.  This times the compiled
kernel alone (validation done beforehand) over the same batches with: the
standard rules; all twenty; and the standard rules plus each added rule on its
own (an `after` rule with the rule it follows, which is a standard one).
Configurations alternate within each round, so a noisy neighbour hits them all
alike; the report gives the median per configuration and the difference to the
standard rules in nanoseconds per event: the marginal cost of that rule on
this traffic.  See bench/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import importlib.resources
import re
import statistics
import time

from engine import parse_rules, validate_events
from engine._fast.kernel import Kernel
from engine.compiler import compile_program
from engine.synth import TrafficGenerator

# The first rule bench_rules_full.toml adds to the standard ten.
FIRST_ADDED = "# Heavy callers for the 388 plan"


def configurations() -> dict[str, str]:
    full = importlib.resources.files("engine").joinpath("data", "bench_rules_full.toml").read_text(encoding="utf-8")
    standard, added = full.split(FIRST_ADDED)
    blocks = [block for block in (FIRST_ADDED + added).split("\n\n") if block.strip()]
    found = {"standard (10 rules)": standard, "all 20 rules": full}
    for block in blocks:
        rule_id = re.search(r'^id = "([\w.-]+)"', block, re.M).group(1)
        found[f"+ {rule_id}"] = standard + "\n" + block
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    batches = [validate_events(b) for b in TrafficGenerator(args.subscribers, seed=0).batches(args.events, 65_536)]
    n = sum(b.n for b in batches)
    programs = {name: compile_program(parse_rules(text)) for name, text in configurations().items()}
    print(f"{n:,} events, {args.subscribers:,} subscribers, {args.rounds} rounds; kernel alone, median per "
          f"configuration", flush=True)
    times: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(args.rounds):
        for name, program in programs.items():
            kernel = Kernel(program, 1 << 20)
            started = time.perf_counter()
            for b in batches:
                kernel.process(b.columns, b.n)
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["standard (10 rules)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<28} {n / median / 1e6:6.2f} M events/s  {1e9 * (median - base) / n:+7.1f} ns/event")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
