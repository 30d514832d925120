"""Channel benchmark: instructions per second into the mms, portal and crm channels, and API latency.

    python bench/bench_channels.py                                  # SQLite store, readable report
    python bench/bench_channels.py --dsn postgresql://u@127.0.0.1:5432/db --json out.json
    python bench/bench_channels.py --instructions 20000 --lookups 5000

Measured in this one process, one caller thread (what one delivery worker or one portal connection gets):

  portal deliver   PortalChannel.deliver, one instruction at a time (one INSERT and commit each), over
                   --subscribers subscribers; then the same instructions again (redeliveries: no new row).
  portal lookup    GET /subscribers/{msisdn}/offers over one keep-alive HTTP connection: p50, p99.
  portal response  POST .../offers/{id}/response (record, report, mark reported).
  crm claim        POST .../next-best-action/{id}/claim.
  mms deliver      MmsChannel.deliver to a loopback HTTP server that answers SubmitRsp 1000 at once (no
                   MMS centre installs here): the cost of building, sending and judging one MM7 submission.

With --dsn the portal and crm store is that PostgreSQL database (its tables are created if missing and the
rows this run adds are left there); without it a SQLite file in a temporary directory.  Wall time by
time.perf_counter.  The outbox in front of the channels is measured by its own benchmark.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
import uuid
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from adapters.channels.base import Instruction
from adapters.channels.crm import CrmChannel
from adapters.channels.mms import MmsChannel
from adapters.channels.portal import PortalChannel

BASE_MSISDN = 8613800000000


def instructions(n: int, subscribers: int, run: str, now: int) -> list[Instruction]:
    return [
        Instruction(id=f"{run}-{i}", ts=now, msisdn=BASE_MSISDN + i % subscribers, rule="bench", channel="c",
                    template="plain", priority=i % 7, holdout=False, not_before=now,
                    params={"name": "李雷", "offer": str(i)})
        for i in range(n)
    ]


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
    }


def timed_requests(address: tuple[str, int], requests: list[tuple[str, str, bytes | None]]) -> list[float]:
    """Latency of each request over one keep-alive connection."""
    connection = HTTPConnection(*address, timeout=30)
    samples = []
    try:
        for method, path, body in requests:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            started = time.perf_counter()
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            samples.append(time.perf_counter() - started)
            if response.status >= 300:
                raise SystemExit(f"{method} {path} answered {response.status}")
    finally:
        connection.close()
    return samples


def bench_offers(store: dict[str, str], args: argparse.Namespace) -> dict[str, object]:
    run = uuid.uuid4().hex[:8]
    now = time.time_ns() // 1_000_000
    results: dict[str, object] = {}
    portal = PortalChannel.from_config("bench_portal", {**store, "listen": "127.0.0.1:0"})
    portal.start(lambda offer_id, outcome, ts: None)
    try:
        batch = instructions(args.instructions, args.subscribers, run, now)
        started = time.perf_counter()
        for instruction in batch:
            portal.deliver(instruction)
        results["portal_deliver_per_s"] = rate(len(batch), time.perf_counter() - started)
        started = time.perf_counter()
        for instruction in batch:
            portal.deliver(instruction)
        results["portal_redeliver_per_s"] = rate(len(batch), time.perf_counter() - started)
        lookups = [("GET", f"/subscribers/{BASE_MSISDN + i % args.subscribers}/offers", None)
                   for i in range(args.lookups)]
        results["portal_lookup"] = percentiles(timed_requests(portal.address, lookups))
        answers = [("POST", f"/subscribers/{i.msisdn}/offers/{i.id}/response",
                    json.dumps({"response_id": f"r-{i.id}", "outcome": "declined"}).encode())
                   for i in batch[: args.lookups]]
        samples = timed_requests(portal.address, answers)
        results["portal_response"] = percentiles(samples)
        results["portal_response_per_s"] = rate(len(samples), sum(samples))
    finally:
        portal.close()

    crm = CrmChannel.from_config("bench_crm", {**store, "listen": "127.0.0.1:0"})
    crm.start(lambda offer_id, outcome, ts: None)
    try:
        batch = instructions(args.lookups, args.subscribers, run + "c", now)
        for instruction in batch:
            crm.deliver(instruction)
        claims = [("POST", f"/subscribers/{i.msisdn}/next-best-action/{i.id}/claim",
                   json.dumps({"agent": "desk-1"}).encode()) for i in batch]
        results["crm_claim"] = percentiles(timed_requests(crm.address, claims))
    finally:
        crm.close()
    return results


class _InstantMmsc(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self) -> None:  # noqa: N802 -- http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        body = (b'<?xml version="1.0"?><env:Envelope xmlns:env="http://schemas.xmlsoap.org/soap/envelope/">'
                b"<env:Body><SubmitRsp><Status><StatusCode>1000</StatusCode></Status></SubmitRsp></env:Body>"
                b"</env:Envelope>")
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def bench_mms(args: argparse.Namespace) -> dict[str, object]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _InstantMmsc)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        mms = MmsChannel.from_config("bench_mms", {
            "url": f"http://127.0.0.1:{server.server_address[1]}/mm7", "vaspid": "v", "vasid": "v",
            "sender": "10658000", "templates": {"plain": "{name}：第 {offer} 号优惠"},
        })
        batch = instructions(args.mms, args.subscribers, "mms", 0)
        started = time.perf_counter()
        for instruction in batch:
            mms.deliver(instruction)
        return {"mms_deliver_per_s": rate(len(batch), time.perf_counter() - started)}
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="postgresql:// URL for the portal and crm store (default: SQLite in tmp)")
    parser.add_argument("--instructions", type=int, default=5000)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--mms", type=int, default=1000, help="instructions through the mms channel")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = {"dsn": args.dsn} if args.dsn else {"path": str(Path(tmp) / "offers.sqlite")}
        results: dict[str, object] = {"store": "postgresql" if args.dsn else "sqlite"}
        results.update(bench_offers(store, args))
    results.update(bench_mms(args))
    results["python"] = sys.version.split()[0]
    results["machine"] = platform.machine()

    print(f"store: {results['store']}  ({args.instructions} instructions over {args.subscribers} subscribers)")
    for key, value in results.items():
        if isinstance(value, float):
            print(f"  {key:28s} {value:12,.0f}")
        elif isinstance(value, dict):
            print(f"  {key:28s} p50 {value['p50_us']:8,.0f} µs   p99 {value['p99_us']:8,.0f} µs")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
