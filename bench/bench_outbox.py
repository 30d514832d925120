"""The outbox: what writing a batch costs the daemon's loop, and instructions/s delivered from it.

    python bench/bench_outbox.py                 # defaults: 1,000,000 events, 20,000 deliveries
    python bench/bench_outbox.py --repeat 5 --json result.json

Instructions are real: the standard bench rules (engine/data/bench_rules.toml) run over seeded
synthetic traffic, batches of `--batch-size` events, and every batch's instruction table is kept.

- enqueue: `OutboxOutput.send` of each batch's instruction table into a fresh outbox.  "send" is
  what the daemon's loop pays per batch (the table is checked and queued); "commit" is the time
  until the output's writer thread has committed it (one SQLite transaction), measured by a `flush`
  after every send, so batches are never coalesced here.  With `fsync = false` (the default) and
  `fsync = true`; per batch p50/p99 and per instruction, beside `Engine.process` of the same batches.
  Then the writer's sustained rate: every batch sent back to back (4 rounds, fresh ids), so waiting
  tables share transactions; instructions/s until all are committed.
- delivery: `--deliveries` instructions enqueued, then a `DeliveryWorker` delivers them to the
  `file` channel (JSON lines); instructions/s from the worker's start until the outbox holds no
  pending row, median of `--repeat` runs, for each `--concurrency`.
- with `--sms N`: N instructions delivered to the `sms` channel through a real Kannel (bearerbox,
  smsbox and the fake SMSC, started as the tests start them: tests/kannel.py, which installs
  Debian's kannel when it is missing); instructions/s until Kannel has accepted them all, and
  until the fake SMSC has printed them all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from adapters.channels.files import FileChannel  # noqa: E402
from adapters.channels.outbox import DeliveryPolicy, DeliveryWorker, Outbox, OutboxOutput  # noqa: E402
from engine import Engine  # noqa: E402
from engine.synth import TrafficGenerator  # noqa: E402

RULES = REPO / "engine" / "data" / "bench_rules.toml"


def instruction_batches(events: int, subscribers: int, batch_size: int,
                        seed: int) -> tuple[list[pa.Table], list[float]]:
    """Each batch's instructions, and how long Engine.process took for it (seconds)."""
    engine = Engine.from_files(RULES)
    tables, times = [], []
    for batch in TrafficGenerator(subscribers, seed=seed).batches(events, batch_size):
        started = time.perf_counter()
        table = engine.process(batch)
        times.append(time.perf_counter() - started)
        tables.append(table)
    return tables, times


def time_enqueue(tables: list[pa.Table], fsync: bool) -> tuple[list[float], list[float]]:
    """Per batch: what `send` costs the daemon's loop, and how long the writer thread takes to commit it."""
    with tempfile.TemporaryDirectory() as directory:
        output = OutboxOutput("bench", Path(directory) / "outbox.db", fsync=fsync)
        sends, writes = [], []
        try:
            for table in tables:
                started = time.perf_counter()
                output.send(table)
                sent = time.perf_counter()
                output.flush()
                sends.append(sent - started)
                writes.append(time.perf_counter() - started)
        finally:
            output.close()
    return sends, writes


def time_sustained(tables: list[pa.Table], rounds: int) -> float:
    """Instructions/s the writer commits when the loop sends batches back to back (tables coalesce)."""
    with tempfile.TemporaryDirectory() as directory:
        output = OutboxOutput("bench", Path(directory) / "outbox.db", max_waiting=1 << 30)
        try:
            started = time.perf_counter()
            for round_ in range(rounds):
                for table in tables:
                    ids = pa.array([f"{round_:08x}{value[8:]}" for value in table.column("id").to_pylist()])
                    output.send(table.set_column(0, table.schema.field("id"), ids))
            output.flush()
            elapsed = time.perf_counter() - started
            written = output.stats()["instructions"]
        finally:
            output.close()
    return written / elapsed


def relabelled(tables: list[pa.Table], n: int) -> pa.Table:
    """`n` instructions for one channel named "bench", ids made unique, holdouts made deliverable."""
    table = pa.concat_tables(tables)
    while table.num_rows < n:
        table = pa.concat_tables([table, table])
    table = table.slice(0, n)
    ids = pa.array([f"{k:032x}" for k in range(n)])
    now = int(time.time() * 1000)
    for name, values in (("id", ids), ("channel", pa.array(["bench"] * n)), ("holdout", pa.array([False] * n)),
                         ("not_before", pa.array([now] * n, pa.int64()))):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, table.schema.field(index), values)
    return table


def time_delivery(table: pa.Table, concurrency: int) -> float:
    """Instructions/s from the worker's start until nothing is pending or in flight."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "outbox.db"
        outbox = Outbox(path, fsync=False)
        outbox.enqueue(table)
        channel = FileChannel("bench", Path(directory) / "sent.jsonl")
        worker = DeliveryWorker(path, {"bench": (channel, DeliveryPolicy(concurrency=concurrency))})
        started = time.perf_counter()
        worker.start(lambda name: lambda *report: None)
        try:
            while outbox.counts().get(("bench", "delivered"), 0) < table.num_rows:
                time.sleep(0.01)
            elapsed = time.perf_counter() - started
        finally:
            worker.stop()
            outbox.close()
        lines = (Path(directory) / "sent.jsonl").read_bytes().count(b"\n")
        if lines != table.num_rows:
            raise SystemExit(f"the file channel wrote {lines} lines for {table.num_rows} instructions")
    return table.num_rows / elapsed


def time_sms(table: pa.Table, concurrency: int) -> tuple[float, float]:
    """Instructions/s accepted by Kannel's sendsms, and received by the fake SMSC."""
    sys.path.insert(0, str(REPO / "tests"))
    from kannel import PASSWORD, USERNAME, Kannel

    from adapters.channels.sms import SmsChannel

    with tempfile.TemporaryDirectory() as directory:
        gateway = Kannel(Path(directory))
        gateway.start()
        try:
            path = Path(directory) / "outbox.db"
            outbox = Outbox(path)
            outbox.enqueue(table)
            templates = {t: "Kairos bench {id}" for t in set(table.column("template").to_pylist())}
            channel = SmsChannel("bench", url=gateway.sendsms_url, username=USERNAME, password=PASSWORD,
                                 sender="10086", templates=templates, listen=f"127.0.0.1:{gateway.ports.mo}")
            worker = DeliveryWorker(path, {"bench": (channel, DeliveryPolicy(concurrency=concurrency))})
            started = time.perf_counter()
            worker.start(lambda name: lambda *report: None)
            try:
                while outbox.counts().get(("bench", "delivered"), 0) < table.num_rows:
                    time.sleep(0.01)
                accepted = time.perf_counter() - started
                while len(gateway.received()) < table.num_rows:
                    time.sleep(0.05)
                received = time.perf_counter() - started
            finally:
                worker.stop()
                outbox.close()
        finally:
            gateway.stop()
    return table.num_rows / accepted, table.num_rows / received


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=65_536)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--deliveries", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sms", type=int, default=0, help="instructions to deliver through a real Kannel")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"Python {platform.python_version()}, pyarrow {pa.__version__}")
    tables, engine_times = instruction_batches(args.events, args.subscribers, args.batch_size, args.seed)
    per_batch = [t.num_rows for t in tables]
    total = sum(per_batch)
    print(f"workload: {args.events:,} events, {args.subscribers:,} subscribers, {len(tables)} batches of "
          f"{args.batch_size:,}; {total:,} instructions (median {statistics.median(per_batch):,.0f} per batch)")
    results: dict = {"events": args.events, "batches": len(tables), "instructions": total}
    engine_p50 = statistics.median(engine_times)
    print(f"engine.process  per batch p50 {engine_p50 * 1e3:8.2f} ms")
    results["engine_process_ms_p50"] = engine_p50 * 1e3
    for fsync in (False, True):
        runs = [time_enqueue(tables, fsync) for _ in range(args.repeat)]
        label = f"fsync={'true ' if fsync else 'false'}"
        for k, what in ((0, "send (the loop)  "), (1, "commit (writer)  ")):
            p50 = statistics.median(statistics.median(r[k]) for r in runs)
            p99 = statistics.median(percentile(r[k], 99) for r in runs)
            per_instruction = statistics.median(sum(r[k]) / total for r in runs)
            print(f"outbox {what} {label} per batch p50 {p50 * 1e3:8.3f} ms, p99 {p99 * 1e3:8.3f} ms, "
                  f"{per_instruction * 1e6:6.2f} us per instruction, {p50 / engine_p50:6.1%} of engine.process p50")
            results[f"outbox_{what.split()[0]}_fsync_{str(fsync).lower()}"] = {
                "batch_ms_p50": p50 * 1e3, "batch_ms_p99": p99 * 1e3, "us_per_instruction": per_instruction * 1e6}
    rates = [time_sustained(tables, 4) for _ in range(args.repeat)]
    print(f"outbox writer, batches back to back: {statistics.median(rates):10,.0f} instructions/s committed "
          f"(median of {args.repeat})")
    results["outbox_writer_sustained_per_second"] = statistics.median(rates)
    table = relabelled(tables, args.deliveries)
    for concurrency in args.concurrency:
        rates = [time_delivery(table, concurrency) for _ in range(args.repeat)]
        rate = statistics.median(rates)
        print(f"delivery to the file channel, concurrency {concurrency}: {rate:10,.0f} instructions/s "
              f"(median of {args.repeat}; min {min(rates):,.0f}, max {max(rates):,.0f})")
        results[f"delivery_file_concurrency_{concurrency}"] = {"median": rate, "min": min(rates), "max": max(rates)}
    if args.sms:
        # Each text carries its id, as a param, so that every message differs.
        sms_table = relabelled(tables, args.sms)
        ids = sms_table.column("id").to_pylist()
        index = sms_table.schema.get_field_index("params")
        sms_table = sms_table.set_column(index, sms_table.schema.field(index),
                                         pa.array([[("id", i)] for i in ids], sms_table.schema.field(index).type))
        for concurrency in args.concurrency:
            accepted, received = time_sms(sms_table, concurrency)
            print(f"delivery to the sms channel (Kannel, fake SMSC), concurrency {concurrency}: "
                  f"{accepted:8,.0f} instructions/s accepted by sendsms, {received:8,.0f}/s received by the SMSC")
            results[f"delivery_sms_concurrency_{concurrency}"] = {"accepted": accepted, "received": received}
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
