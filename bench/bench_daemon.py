"""End-to-end benchmark of `kairos run`: a feeder process, ZeroMQ, the daemon, an output.

    python bench/bench_daemon.py                   # all three measurements
    python bench/bench_daemon.py --only arrow --events 20000000 --repeat 5 --json

This script is the feeder.  It starts the real daemon as a subprocess (its
own config in a temporary directory), sends pre-encoded messages of
`--batch-size` events over a PUSH socket, and reads the daemon's /metrics.

- throughput, Arrow IPC and msgpack: events/s from the first send until the
  daemon has processed the last event (kairos_events_total), sending as fast
  as the PUSH socket lets us (it blocks at the high-water mark, so the rate
  is the daemon's).  Baselines in the same run: the daemon's work without
  sockets (decode each message, Engine.process, in this process), and the
  same messages pushed to a bare PULL socket in another process that only
  receives them.
- latency at a fixed offered rate (default 1,000,000 events/s): each message
  is stamped with the wall clock (every event's ts is the send time in ms)
  and the daemon hands instructions to a ZeroMQ output read by this process;
  latency = receive time - instruction ts, so it spans send, transport,
  batching, the engine and the hand-off.  Reported as p50/p99 over all
  instructions of the run, in milliseconds.

Feeder and daemon share the machine: on a 2-core VM they compete for it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pyarrow as pa
import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from adapters.wire import make_decoder  # noqa: E402
from engine import Engine  # noqa: E402
from engine.daemon import tune_allocator  # noqa: E402
from engine.schema import EVENT_COLUMNS  # noqa: E402
from engine.synth import TrafficGenerator  # noqa: E402

RULES = REPO / "engine" / "data" / "bench_rules.toml"


def arrow_message(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def msgpack_message(batch: pa.RecordBatch) -> bytes:
    columns = [batch.column(name).to_numpy().tolist() for name in EVENT_COLUMNS]
    return msgpack.packb(list(map(list, zip(*columns, strict=True))))


class Daemon:
    """The daemon under test, in a subprocess with its own config."""

    def __init__(self, directory: Path, input_format: str, output: str, linger: str = "5ms",
                 journal: str | None = None):
        self.endpoint = f"ipc://{directory}/feed"
        self.output_endpoint = f"ipc://{directory}/instructions"
        outputs = {
            "file": '[outputs.file]\ntype = "file"\npath = "out"\nformat = "arrow"\n',
            "zmq": f'[outputs.downstream]\ntype = "zmq"\nendpoint = "{self.output_endpoint}"\nsndhwm = 100000\n',
        }[output]
        # With a journal: state_dir, the journal synced per `journal`, and no checkpoint during the run (only the
        # one at shutdown), so that the figure is the journal's cost alone.
        durability = (f'state_dir = "state"\n[journal]\nfsync = "{journal}"\n[checkpoint]\nevery = "1h"\n'
                      if journal else "")
        config = directory / "kairos.toml"
        config.write_text(f"""
[engine]
rules = "{RULES}"
initial_subscribers = 2_097_152
{durability}
[batching]
max_events = 65536
linger = "{linger}"
[metrics]
listen = "127.0.0.1:0"
[deadletter]
path = "dead"
[log]
level = "info"
[inputs.feed]
endpoint = "{self.endpoint}"
format = "{input_format}"
{outputs}
""", encoding="utf-8")
        self.log = open(directory / "daemon.log", "w+b")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL, stderr=self.log, cwd=directory, env=env,
        )
        self.url = None
        deadline = time.monotonic() + 60
        while self.url is None:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"daemon did not start: {(directory / 'daemon.log').read_text()}")
            time.sleep(0.05)
            self.url = self._metrics_address(directory / "daemon.log")

    @staticmethod
    def _metrics_address(log: Path) -> str | None:
        for line in log.read_bytes().splitlines():
            entry = json.loads(line) if line.startswith(b"{") else {}
            if entry.get("msg") == "started":
                return f"http://{entry['metrics']}"
        return None

    def events(self) -> int:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("kairos_events_total "):
                    return int(float(line.split()[1]))
        return 0

    def wait_events(self, total: int, timeout: float = 300.0) -> float:
        deadline = time.monotonic() + timeout
        while (n := self.events()) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon processed {n} of {total} events")
            time.sleep(0.02)  # each scrape costs the daemon a little: not too often
        return time.perf_counter()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)
        self.log.close()


def _bare_receiver(endpoint: str, messages: int, ready) -> None:
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.bind(endpoint)
    ready.set()
    for _ in range(messages):
        socket.recv(copy=False)
    socket.close()
    context.term()


def raw_transfer_rate(messages: list[bytes], events: int, directory: Path) -> float:
    """Events/s pushing the same messages to a process that only receives them."""
    endpoint = f"ipc://{directory}/bare"
    ready = multiprocessing.Event()
    receiver = multiprocessing.Process(target=_bare_receiver, args=(endpoint, len(messages), ready))
    receiver.start()
    ready.wait(30)
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.connect(endpoint)
    start = time.perf_counter()
    for message in messages:
        socket.send(message, copy=False)
    receiver.join()
    elapsed = time.perf_counter() - start
    socket.close()
    context.term()
    return events / elapsed


def in_process_rate(fmt: str, messages: list[bytes], events: int) -> float:
    """Events/s of the daemon's work without sockets: decode each message, run it through an Engine."""
    decoder = make_decoder(fmt)
    warm = Engine.from_files(RULES, initial_subscribers=2_097_152)  # the first Engine of a process is slower
    warm.process(decoder.decode(messages[0]).batch)
    engine = Engine.from_files(RULES, initial_subscribers=2_097_152)
    start = time.perf_counter()
    for message in messages:
        engine.process(decoder.decode(message).batch)
    return events / (time.perf_counter() - start)


def daemon_rate(fmt: str, messages: list[bytes], events: int, directory: Path, journal: str | None) -> float:
    """End-to-end events/s of one fresh daemon fed `messages` over PUSH."""
    daemon = Daemon(directory, fmt, "file", journal=journal)
    try:
        context = zmq.Context()
        socket = context.socket(zmq.PUSH)
        socket.connect(daemon.endpoint)
        start = time.perf_counter()
        for message in messages:
            socket.send(message, copy=False)
        end = daemon.wait_events(events)
        socket.close()
        context.term()
    finally:
        daemon.stop()
    return events / (end - start)


def throughput(fmt: str, batches: list[pa.RecordBatch], directory: Path, repeat: int,
               journal: str | None = None) -> dict:
    """Median over `repeat` runs, each with a fresh daemon, of end-to-end events/s, with the bare baseline.

    With `journal` (an fsync policy), each run also feeds a daemon that journals, right after the one that
    does not, and the median of their ratios is reported.
    """
    encode = arrow_message if fmt == "arrow" else msgpack_message
    messages = [encode(b) for b in batches]
    events = sum(b.num_rows for b in batches)
    rates, baselines, in_process, journaled = [], [], [], []
    for run in range(repeat):
        in_process.append(in_process_rate(fmt, messages, events))
        run_directory = directory / str(run)
        run_directory.mkdir(parents=True)
        baselines.append(raw_transfer_rate(messages, events, run_directory))
        rates.append(daemon_rate(fmt, messages, events, run_directory, None))
        if journal:
            (run_directory / "journaled").mkdir()
            journaled.append(daemon_rate(fmt, messages, events, run_directory / "journaled", journal))
    rate, baseline = float(np.median(rates)), float(np.median(baselines))
    extra = {}
    if journal:
        extra = {"journal_fsync": journal, "journal_events_per_s": float(np.median(journaled)),
                 "journal_runs_events_per_s": journaled,
                 "journal_ratio": float(np.median([j / r for j, r in zip(journaled, rates, strict=True)]))}
    return {**extra, "format": fmt, "events": events, "events_per_s": rate, "runs_events_per_s": rates,
            "in_process_events_per_s": float(np.median(in_process)),
            "bare_transfer_events_per_s": baseline, "share_of_bare_transfer": rate / baseline,
            "message_bytes": int(np.median([len(m) for m in messages]))}


def _latency_receiver(endpoint: str, stop, ready, results) -> None:
    """Receive instructions; latency = arrival wall time - instruction ts (the stamped send time)."""
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.connect(endpoint)
    ready.set()
    latencies = []
    while not stop.is_set() or socket.poll(500):
        if socket.poll(100):
            message = socket.recv()
            now_ms = time.time() * 1000
            ts = pa.ipc.open_stream(message).read_all().column("ts").to_numpy()
            latencies.append(np.stack([ts.astype(np.float64), now_ms - ts]))
    socket.close()
    context.term()
    results.put(np.concatenate(latencies, axis=1) if latencies else np.zeros((2, 0)))


def latency(batches: list[pa.RecordBatch], rate: float, seconds: float, batch_size: int, directory: Path) -> dict:
    directory.mkdir(parents=True)
    daemon = Daemon(directory, "arrow", "zmq")
    stop, ready, results = multiprocessing.Event(), multiprocessing.Event(), multiprocessing.Queue()
    receiver = multiprocessing.Process(target=_latency_receiver,
                                       args=(daemon.output_endpoint, stop, ready, results))
    receiver.start()
    ready.wait(30)
    context = zmq.Context()
    try:
        socket = context.socket(zmq.PUSH)
        socket.connect(daemon.endpoint)
        interval = batch_size / rate
        n_messages = int(seconds * rate / batch_size)
        start = time.perf_counter()
        sent = 0
        late = 0
        for i in range(n_messages):
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            elif delay < -interval:
                late += 1
            batch = batches[i % len(batches)]
            now_ms = int(time.time() * 1000)
            stamped = batch.set_column(0, "ts", pa.array(np.full(batch.num_rows, now_ms, np.int64)))
            socket.send(arrow_message(stamped), copy=False)
            sent += batch.num_rows
        achieved = sent / (time.perf_counter() - start)
        daemon.wait_events(sent)
        stop.set()
        sent_ms, lat = results.get(timeout=60)
        seconds_in = (sent_ms - sent_ms.min()) / 1000 if sent_ms.size else sent_ms
        p99_by_second = [float(np.percentile(lat[(seconds_in >= k) & (seconds_in < k + 1)], 99))
                         for k in range(int(seconds)) if ((seconds_in >= k) & (seconds_in < k + 1)).any()]
        with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as reply:
            batch_buckets = [line for line in reply.read().decode().splitlines()
                             if line.startswith("kairos_batch_latency_seconds_bucket")]
        receiver.join()
        socket.close()
    finally:
        daemon.stop()
        context.term()
    return {"offered_events_per_s": rate, "achieved_events_per_s": achieved, "events": sent,
            "instructions": int(lat.size), "late_sends": late,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p90_ms": float(np.percentile(lat, 90)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "max_ms": float(lat.max()) if lat.size else None,
            "p99_ms_by_second": p99_by_second,
            "daemon_batch_latency_buckets": batch_buckets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="events per throughput run")
    parser.add_argument("--msgpack-events", type=int, default=2_000_000, help="events for the msgpack run")
    parser.add_argument("--batch-size", type=int, default=65_536)
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=1_000_000, help="offered events/s for the latency run")
    parser.add_argument("--latency-batch", type=int, default=1_000, help="events per message in the latency run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs per format (median reported)")
    parser.add_argument("--only", choices=["arrow", "msgpack", "latency"])
    parser.add_argument("--journal", metavar="FSYNC", help="also run the Arrow throughput with a journaling daemon "
                        "(state_dir, [journal] fsync = FSYNC: batch, 100ms, off), alternating with one that does not")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()
    tune_allocator()  # as the daemon does, so that the in-process baseline is the same work

    generator = TrafficGenerator(args.subscribers, seed=1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        if args.only in (None, "arrow"):
            batches = list(generator.batches(args.events, args.batch_size))
            results["arrow"] = throughput("arrow", batches, directory / "arrow", args.repeat, args.journal)
        if args.only in (None, "msgpack"):
            batches = list(generator.batches(args.msgpack_events, args.batch_size))
            results["msgpack"] = throughput("msgpack", batches, directory / "msgpack", args.repeat)
        if args.only in (None, "latency"):
            # Fresh traffic for the whole run: repeated events would hit cooldowns and leave no instructions.
            batches = list(generator.batches(int(args.rate * args.seconds), args.latency_batch))
            results["latency"] = latency(batches, args.rate, args.seconds, args.latency_batch, directory / "lat")
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for fmt in ("arrow", "msgpack"):
        if fmt in results:
            r = results[fmt]
            runs = ", ".join(f"{x / 1e6:.2f}" for x in r["runs_events_per_s"])
            print(f"{fmt:8s} {r['events_per_s'] / 1e6:6.2f} M events/s end to end, median of [{runs}]; "
                  f"the same decode + Engine in one process without sockets "
                  f"{r['in_process_events_per_s'] / 1e6:.2f} M/s; a bare PULL receiver "
                  f"{r['bare_transfer_events_per_s'] / 1e6:.1f} M/s ({r['events']:,} events, "
                  f"{r['message_bytes']:,} B messages)")
            if "journal_ratio" in r:
                print(f"{'':8s} {r['journal_events_per_s'] / 1e6:6.2f} M events/s with the journal (fsync "
                      f"{r['journal_fsync']}): {r['journal_ratio']:.2f}x the daemon without it, median of rounds")
    if "latency" in results:
        r = results["latency"]
        print(f"latency  at {r['achieved_events_per_s'] / 1e6:.2f} M events/s offered "
              f"({r['instructions']:,} instructions, {r['late_sends']} sends late): p50 {r['p50_ms']:.1f} ms, "
              f"p90 {r['p90_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
              f"max {r['max_ms']:.1f} ms")


if __name__ == "__main__":
    main()
