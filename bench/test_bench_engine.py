"""pytest-benchmark suite: the engine's hot paths on a pre-generated workload.

Kept out of the default test run (pyproject's testpaths is `tests`); run it as

    python -m pytest bench                          # measure
    python -m pytest bench --benchmark-disable -q   # just check that it runs

Workload: 1,000,000 synthetic events (engine.synth) over 100,000 subscribers in
Arrow batches of 65,536, through the 10 rules of engine/data/bench_rules.toml.
Each round processes the whole workload with fresh state, so one round's time
divided into WORKLOAD_EVENTS is events per second (`extra_info` carries it).
"""

from __future__ import annotations

import importlib.resources

import pytest

from engine import Engine, parse_rules, validate_events
from engine._fast.kernel import Kernel
from engine.compiler import compile_program
from engine.synth import TrafficGenerator

pytest.importorskip("pytest_benchmark")

WORKLOAD_EVENTS = 1_000_000
WORKLOAD_SUBSCRIBERS = 100_000
BATCH_SIZE = 65_536
ROUNDS = 5


@pytest.fixture(scope="module")
def ruleset():
    text = importlib.resources.files("engine").joinpath("data", "bench_rules.toml").read_text(encoding="utf-8")
    return parse_rules(text, source="engine/data/bench_rules.toml")


@pytest.fixture(scope="module")
def batches():
    return list(TrafficGenerator(WORKLOAD_SUBSCRIBERS, seed=0).batches(WORKLOAD_EVENTS, BATCH_SIZE))


@pytest.fixture(scope="module")
def validated(batches):
    return [validate_events(b) for b in batches]


def _record_rate(benchmark) -> None:
    benchmark.extra_info["events"] = WORKLOAD_EVENTS
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        benchmark.extra_info["events_per_second"] = WORKLOAD_EVENTS / stats.stats.median


def test_engine_process(benchmark, ruleset, batches):
    def run(engine):
        for batch in batches:
            engine.process(batch)
        return engine

    engine = benchmark.pedantic(run, setup=lambda: ((Engine(ruleset),), {}), rounds=ROUNDS, iterations=1)
    _record_rate(benchmark)
    stats = engine.stats()
    assert stats["events"] == WORKLOAD_EVENTS
    assert stats["instructions"] > 0
    assert all(rule["sent"] > 0 for rule in stats["rules"].values()), stats["rules"]


def test_kernel_alone(benchmark, ruleset, validated):
    program = compile_program(ruleset)

    def run(kernel):
        produced = 0
        for cols in validated:
            rows = kernel.process(cols.columns, cols.n)[0]
            produced += len(rows)
        return produced

    produced = benchmark.pedantic(run, setup=lambda: ((Kernel(program, 1 << 16),), {}), rounds=ROUNDS, iterations=1)
    _record_rate(benchmark)
    assert produced > 0


def test_validate_events(benchmark, batches):
    def run():
        return sum(validate_events(batch).n for batch in batches)

    assert benchmark.pedantic(run, rounds=ROUNDS * 4, iterations=1) == WORKLOAD_EVENTS
    _record_rate(benchmark)
