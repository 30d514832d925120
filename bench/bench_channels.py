"""Channel benchmark: instructions per second into the mms, portal and crm channels, and API latency.

    python bench/bench_channels.py                                  # SQLite store, readable report
    python bench/bench_channels.py --dsn postgresql://u@127.0.0.1:5432/db --json out.json
    python bench/bench_channels.py --instructions 20000 --lookups 5000
    python bench/bench_channels.py --sms 5000 --sms-repeat 3        # only sms, through a real Kannel

Measured in this one process, one caller thread (what one delivery worker or one portal connection gets):

  portal deliver   PortalChannel.deliver, one instruction at a time (one INSERT and commit each), over
                   --subscribers subscribers; then the same instructions again (redeliveries: no new row).
  portal lookup    GET /subscribers/{msisdn}/offers over one keep-alive HTTP connection: p50, p99.
  portal response  POST .../offers/{id}/response (record, report, mark reported).
  crm claim        POST .../next-best-action/{id}/claim.
  mms deliver      MmsChannel.deliver to a loopback HTTP server that answers SubmitRsp 1000 at once (no
                   MMS centre installs here): the cost of building, sending and judging one MM7 submission.

With --sms N, the sms channel through a real Kannel (bearerbox, smsbox, fakesmsc, started as the tests
start them: tests/kannel.py, which installs Debian's kannel when it is missing), only this part runs:

  sms deliver      SmsChannel.deliver from --sms-concurrency threads (what the outbox's `concurrency` is),
                   N instructions or --sms-seconds, whichever ends first; sendsms answers per second
                   (the median of --sms-repeat runs, the clients taking turns), and how busy Kannel's
                   processes and this one kept the CPUs.
                   Three clients in the same run: "pooled" (the channel: urllib3, kept-alive connections),
                   "urlopen" (the channel with urllib.request.urlopen, a connection per message, as it was
                   before; kept in this file only) and "raw" (a bare urllib3 pool sending the channel's
                   requests: what Kannel itself takes), each with each --sms-dlr-mask (0: no delivery
                   reports; 31: the channel's default, Kannel reports to the channel's receiver).
                   --kannel-nodelay starts Kannel with bench/kannel_nodelay.c preloaded (TCP_NODELAY on
                   Kannel's own links), to show what Nagle's algorithm there costs.

With --dsn the portal and crm store is that PostgreSQL database (its tables are created if missing and the
rows this run adds are left there); without it a SQLite file in a temporary directory.  Wall time by
time.perf_counter.  The outbox in front of the channels is measured by its own benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import urllib3

from adapters.channels.base import Instruction, Retry
from adapters.channels.crm import CrmChannel
from adapters.channels.mms import MmsChannel
from adapters.channels.portal import PortalChannel
from adapters.channels.sms import SmsChannel

BASE_MSISDN = 8613800000000
REPO = Path(__file__).resolve().parent.parent


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


class UrlopenSmsChannel(SmsChannel):
    """The sms channel with its sendsms request made as before keep-alive: `urllib.request.urlopen`, a new
    connection per message.  Only here, to compare in the same run."""

    def _get(self, url: str) -> str:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as reply:
                answer = reply.read(4096).decode("utf-8", "replace").strip()
        except urllib.error.HTTPError as err:
            body = err.read(4096).decode("utf-8", "replace").strip()
            err.close()
            raise Retry(f"sendsms answered HTTP {err.code}: {body}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise Retry(f"sendsms unreachable: {getattr(exc, 'reason', exc)}") from None
        if not answer.startswith(("0:", "3:")):
            raise Retry(f"sendsms answered {answer!r}")
        return answer


def nodelay_library(directory: str) -> str:
    """bench/kannel_nodelay.c compiled into `directory`; the path of the shared library."""
    library = str(Path(directory) / "kannel_nodelay.so")
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", library, str(REPO / "bench" / "kannel_nodelay.c"), "-ldl"],
                   check=True)
    return library


SMS_CLIENTS = ("pooled", "urlopen", "raw")


def sms_run(gateway, client: str, dlr_mask: int, concurrency: int, run: str, args: argparse.Namespace) -> dict:
    """One timed run: sendsms answers per second, and the delivery reports that came back."""
    from kannel import PASSWORD, USERNAME

    cls = UrlopenSmsChannel if client == "urlopen" else SmsChannel
    channel = cls("bench_sms", url=gateway.sendsms_url, username=USERNAME, password=PASSWORD, sender="10086",
                  templates={"plain": "Kairos bench {offer}"}, dlr_mask=dlr_mask)
    channel.start(lambda instruction_id, outcome, ts: None)
    raw = urllib3.HTTPConnectionPool("127.0.0.1", gateway.ports.sendsms, maxsize=concurrency, retries=False,
                                     timeout=10.0)
    batch = iter(instructions(args.sms, args.sms, run, 0))
    lock = threading.Lock()
    done = [0]
    failures: list[str] = []
    deadline = time.perf_counter() + args.sms_seconds

    def send() -> None:
        while time.perf_counter() < deadline:
            with lock:
                instruction = next(batch, None)
            if instruction is None:
                return
            try:
                if client == "raw":
                    url = channel.request_url(instruction)
                    answer = raw.request("GET", url[url.index("/cgi-bin/"):]).data
                    if not answer.startswith((b"0:", b"3:")):
                        raise Retry(f"sendsms answered {answer!r}")
                else:
                    channel.deliver(instruction)
            except Retry as exc:
                failures.append(exc.reason)
                return
            with lock:
                done[0] += 1

    before = gateway.status()
    processes = {"bearerbox": gateway.bearerbox.pid, "smsbox": gateway.smsbox.pid,
                 "fakesmsc": gateway.fakesmsc.pid, "bench": os.getpid()}
    cpu_before = {name: _cpu_seconds(pid) for name, pid in processes.items()}
    threads = [threading.Thread(target=send) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    cpu = {name: (_cpu_seconds(pid) - cpu_before[name]) / elapsed for name, pid in processes.items()}
    after = gateway.status()
    reports = 0
    if dlr_mask:  # wait for the reports (2 a message: 8, accepted by the SMSC, then 1, delivered) to stop coming
        seen, quiet_since = -1, time.monotonic()
        while time.monotonic() - quiet_since < 2.0 and reports < 2 * done[0]:
            stats = channel.stats()
            reports = stats["receipts_delivered"] + stats["receipts_intermediate"]
            if reports != seen:
                seen, quiet_since = reports, time.monotonic()
            time.sleep(0.1)
    channel.close()
    raw.close()
    if failures:
        raise SystemExit(f"sms {client} dlr_mask {dlr_mask} concurrency {concurrency}: {failures[0]}")
    return {"per_s": rate(done[0], elapsed), "sent": done[0], "seconds": elapsed, "reports": reports,
            "kannel_sent": _kannel_sent(after) - _kannel_sent(before), "cpu": cpu}


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process so far (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _kannel_sent(status: str) -> int:
    """Messages bearerbox has sent to the SMSC, from its status.txt ("SMS: received R (..), sent S (..)")."""
    match = re.search(r"^SMS: received \d+ \(\d+ queued\), sent (\d+)", status, re.M)
    return int(match.group(1)) if match else -1


def bench_sms(args: argparse.Namespace) -> dict[str, object]:
    sys.path.insert(0, str(REPO / "tests"))
    from kannel import Kannel

    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as directory:
        gateway = Kannel(Path(directory))
        if args.kannel_log_level is not None:
            text = re.sub(r"^log-level = \d+$", f"log-level = {args.kannel_log_level}", gateway.config.read_text(),
                          flags=re.M)
            gateway.config.write_text(text)
        preload = nodelay_library(directory) if args.kannel_nodelay else None
        saved = os.environ.get("LD_PRELOAD")
        if preload:
            os.environ["LD_PRELOAD"] = preload  # for Kannel's processes, started now
        try:
            gateway.start()
        finally:
            if preload and saved is None:
                del os.environ["LD_PRELOAD"]
            elif preload:
                os.environ["LD_PRELOAD"] = saved
        try:
            k = 0
            for dlr_mask in args.sms_dlr_mask:
                for concurrency in args.sms_concurrency:
                    runs: dict[str, list[dict]] = {client: [] for client in SMS_CLIENTS}
                    for _ in range(args.sms_repeat):  # the clients take turns, so that each sees the same load
                        for client in SMS_CLIENTS:
                            k += 1
                            runs[client].append(sms_run(gateway, client, dlr_mask, concurrency,
                                                        f"sms{k}-{uuid.uuid4().hex[:6]}", args))
                    for client in SMS_CLIENTS:
                        line = sorted(runs[client], key=lambda r: r["per_s"])[len(runs[client]) // 2]
                        rates = [r["per_s"] for r in runs[client]]
                        line = {**line, "min_per_s": min(rates), "max_per_s": max(rates)}
                        results[f"sms_{client}_dlr_mask_{dlr_mask}_concurrency_{concurrency}"] = line
                        spread = f" [{min(rates):,.0f}-{max(rates):,.0f}]" if len(rates) > 1 else ""
                        reports = f", {line['reports']:,} reports back" if dlr_mask else ""
                        cpu = " ".join(f"{name} {share:.2f}" for name, share in line["cpu"].items())
                        print(f"  sms {client:8s} dlr_mask {dlr_mask:2d} concurrency {concurrency:3d} "
                              f"{line['per_s']:10,.0f}/s{spread}  ({line['sent']:,} in {line['seconds']:.1f} s; "
                              f"Kannel sent {line['kannel_sent']:,} to the SMSC{reports}; CPUs busy: {cpu})",
                              flush=True)
        finally:
            gateway.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="postgresql:// URL for the portal and crm store (default: SQLite in tmp)")
    parser.add_argument("--instructions", type=int, default=5000)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--mms", type=int, default=1000, help="instructions through the mms channel")
    parser.add_argument("--sms", type=int, default=0,
                        help="instructions per run through a real Kannel (only the sms part runs)")
    parser.add_argument("--sms-concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sms-dlr-mask", type=int, nargs="+", default=[0, 31])
    parser.add_argument("--sms-seconds", type=float, default=10.0, help="longest a run sends")
    parser.add_argument("--sms-repeat", type=int, default=1, help="runs per line (the median is printed)")
    parser.add_argument("--kannel-log-level", type=int, help="Kannel's log-level (default: tests/kannel.py's, 0)")
    parser.add_argument("--kannel-nodelay", action="store_true",
                        help="start Kannel with bench/kannel_nodelay.c preloaded (needs cc)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    if args.sms:
        print(f"sms through Kannel (fake SMSC): {args.sms:,} instructions or {args.sms_seconds:g} s per run, "
              f"{os.cpu_count()} CPUs, Python {platform.python_version()}, urllib3 {urllib3.__version__}"
              f"{', Kannel with TCP_NODELAY' if args.kannel_nodelay else ''}")
        results = bench_sms(args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return

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
