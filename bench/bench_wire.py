"""Wire decoding benchmark: adapters.wire decoders on messages of the standard event mix.

    python bench/bench_wire.py                 # readable report
    python bench/bench_wire.py --json out.json # the same, plus machine-readable results
    python bench/bench_wire.py --messages 8 --repeat 7

Workload: --messages messages of --rows events each (default 4 x 65,536) from
engine.synth.TrafficGenerator (all 12 columns, every row valid), encoded
before any timing starts as:

  arrow          one Arrow IPC stream message per batch
  msgpack        an array of arrays (positional records, 12 fields)
  msgpack-maps   an array of maps (field name -> value)
  ndjson         one JSON object per line

Each format's decoder (adapters.wire.make_decoder) decodes every message; the
rate is events over the wall time of one pass, reported as the median (and
min, max) of --repeat passes after one untimed pass.  Decoding includes
validation (engine.schema.validate_rows) and the cast to canonical dtypes: the
output is what Engine.process takes.

Baseline, in the same run: stock msgpack.unpackb of the array-of-arrays
messages into Python lists, then numpy.array(rows, int64) and one cast per
column, without validation.

Times are time.perf_counter wall time.
"""

from __future__ import annotations

import os

# Nothing here uses BLAS; keep OpenBLAS threads off the shared cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import importlib.metadata
import json
import platform
import statistics
import sys
import time

import msgpack
import numpy as np
import orjson
import pyarrow as pa

from adapters.wire import make_decoder
from engine.schema import COLUMN_DTYPES, EVENT_COLUMNS
from engine.synth import TrafficGenerator


def _version() -> str | None:
    try:
        return importlib.metadata.version("kairos")
    except importlib.metadata.PackageNotFoundError:
        return None


def encode(batches: list[pa.RecordBatch]) -> dict[str, list[bytes]]:
    messages: dict[str, list[bytes]] = {"arrow": [], "msgpack": [], "msgpack-maps": [], "ndjson": []}
    for batch in batches:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        messages["arrow"].append(sink.getvalue().to_pybytes())
        rows = batch.to_pylist()
        messages["msgpack"].append(msgpack.packb([list(row.values()) for row in rows]))
        messages["msgpack-maps"].append(msgpack.packb(rows))
        messages["ndjson"].append(b"\n".join(orjson.dumps(row) for row in rows) + b"\n")
    return messages


def stock_msgpack(message: bytes) -> dict[str, np.ndarray]:
    """The baseline: msgpack-python and numpy, no validation."""
    table = np.array(msgpack.unpackb(message), dtype=np.int64)
    return {name: table[:, i].astype(COLUMN_DTYPES[name]) for i, name in enumerate(EVENT_COLUMNS)}


def timed_pass(decode, messages: list[bytes]) -> float:
    clock = time.perf_counter
    started = clock()
    for message in messages:
        decode(message)
    return clock() - started


def summary(rates: list[float]) -> dict:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": rates}


def fmt_rate(rate: float) -> str:
    return f"{rate / 1e6:8.2f} M/s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4)
    parser.add_argument("--rows", type=int, default=65_536, help="events per message; default %(default)s")
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=5, help="timed passes per format; default %(default)s")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if min(args.messages, args.rows, args.subscribers, args.repeat) < 1:
        parser.error("sizes and --repeat must be positive")

    say = print
    machine = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "orjson": orjson.__version__,
    }
    say("Kairos wire decoding benchmark")
    say(f"  machine    {machine['platform']}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"numpy {machine['numpy']}, pyarrow {machine['pyarrow']}, msgpack {machine['msgpack']}, "
        f"orjson {machine['orjson']}")
    batches = list(TrafficGenerator(args.subscribers, seed=args.seed).batches(args.messages * args.rows, args.rows))
    n_events = sum(b.num_rows for b in batches)
    messages = encode(batches)
    say(f"  workload   {args.messages} messages x {args.rows:,} events ({n_events:,} events, 12 columns), "
        f"seed {args.seed}")

    decoders = {name: make_decoder(name.split("-")[0]) for name in messages}
    for name, decoder in decoders.items():  # correctness, and the untimed pass
        for message, batch in zip(messages[name], batches, strict=True):
            decoded = decoder.decode(message)
            if decoded.rejects or decoded.n != batch.num_rows or not all(
                np.array_equal(decoded.batch[c], batch.column(c).to_numpy()) for c in batch.schema.names
            ):
                print(f"error: {name} decoder does not reproduce the events", file=sys.stderr)
                return 1
    for message in messages["msgpack"]:
        stock_msgpack(message)

    say(f"\nDecoding, {args.repeat} passes each (events per second, median [min - max]) ...")
    results: dict[str, dict] = {}
    runs = {name: [] for name in (*messages, "stock-msgpack")}
    for _ in range(args.repeat):  # formats interleaved, so that none always meets a colder process
        for name, decoder in decoders.items():
            runs[name].append(n_events / timed_pass(decoder.decode, messages[name]))
        runs["stock-msgpack"].append(n_events / timed_pass(stock_msgpack, messages["msgpack"]))
    for name, rates in runs.items():
        source = messages["msgpack" if name == "stock-msgpack" else name]
        s = summary(rates)
        per_message_us = args.rows / s["median"] * 1e6
        results[name] = {
            **s,
            "us_per_message": per_message_us,
            "bytes_per_event": sum(map(len, source)) / n_events,
        }
        label = ("msgpack.unpackb + numpy (baseline)" if name == "stock-msgpack"
                 else f"make_decoder({name.split('-')[0]!r})")
        say(f"  {name:<14} {fmt_rate(s['median'])}   [{fmt_rate(s['min']).strip()} - {fmt_rate(s['max']).strip()}]"
            f"   {per_message_us:9.1f} us/message   {results[name]['bytes_per_event']:5.1f} B/event   {label}")
    ratios = {
        "msgpack_over_stock": results["msgpack"]["median"] / results["stock-msgpack"]["median"],
        "msgpack_maps_over_stock": results["msgpack-maps"]["median"] / results["stock-msgpack"]["median"],
    }
    say(f"  msgpack decoder / stock msgpack.unpackb + numpy: {ratios['msgpack_over_stock']:.1f}x (arrays), "
        f"{ratios['msgpack_maps_over_stock']:.1f}x (maps against the arrays baseline)")

    if args.json:
        result = {
            "benchmark": "kairos.bench_wire",
            "kairos": _version(),
            "machine": machine,
            "workload": {
                "messages": args.messages,
                "rows_per_message": args.rows,
                "events": n_events,
                "subscribers": args.subscribers,
                "seed": args.seed,
                "repeat": args.repeat,
            },
            "formats": results,
            "ratios": ratios,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        say(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
