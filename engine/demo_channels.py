"""`kairos demo`, the delivery half: the demo's instructions through the outbox to channels, and back.

The demo's instructions go into a real outbox (SQLite) and a `DeliveryWorker` delivers them to channels
running in this process: portal and crm with SQLite offer stores and their HTTP APIs on loopback, every
other channel name (sms, ...) to a JSON-lines file whose channel reports each instruction `delivered`,
as a gateway's delivery reports would.  Then the closed loop is acted out over real HTTP: the portal asks
for a subscriber's offers and posts `accepted`; agents ask the CRM for a next-best-action, claim it and
post `considering`, then `declined`.  What the channels report is applied to the engine with
`Engine.feedback` on the caller's thread, as the daemon's loop does (docs/channels.md).  Everything lives
in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from adapters.channels import make_channel
from adapters.channels.base import Channel, FeedbackSink
from adapters.channels.offer_api import OfferChannel
from adapters.channels.outbox import DeliveryPolicy, DeliveryWorker, Outbox, OutboxOutput
from engine.engine import Engine

DELIVERY_TIMEOUT = 30.0  # seconds the demo waits for the outbox to deliver what is due
POLL_SECONDS = 0.02
HTTP_TIMEOUT = 10.0
# Seconds the portal and crm APIs wait for their store: longer than their default, so that a busy shared disk
# does not turn the demo's answers into empty lists or 503s.
API_TIMEOUT = 2.0
PORTAL_RESPONSE = "portal-login-1"  # the portal's own id for the subscriber's answer
AGENTS = ("hall-3-desk-2", "call-centre-7")
OFFER_TTL_DAYS = 7  # the channels' default offer_ttl
FEEDBACK_COLUMNS = ("delivered", "accepted", "declined", "considering")

# (headers, rows, right-aligned columns) -> aligned lines: the CLI's table layout
TextTable = Callable[[list[str], list[list[str]], frozenset[int]], list[str]]


class _FeedbackQueue:
    """Outcomes the channels report from their threads, applied to the engine on the demo's thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.reports: deque[tuple[str, str, int]] = deque()
        self.results: dict[str, int] = {"applied": 0, "unknown": 0, "invalid": 0}

    def sink(self, channel: str) -> FeedbackSink:
        def report(id: str, outcome: str, ts: int) -> None:
            self.reports.append((id, outcome, ts))  # deque.append is atomic: any thread may call
        return report

    def apply(self) -> int:
        """Apply every report waiting, in the order they came; returns how many."""
        taken = []
        while self.reports:
            taken.append(self.reports.popleft())
        if taken:
            result = self.engine.feedback([r[0] for r in taken], [r[1] for r in taken], [r[2] for r in taken])
            for key, n in result.items():
                self.results[key] += n
        return len(taken)


def _make_channels(names: list[str], directory: Path, offer_ttl_days: int) -> dict[str, tuple[Channel, DeliveryPolicy]]:
    """portal and crm as themselves; any other channel name as a JSON-lines file that reports `delivered`."""
    channels: dict[str, tuple[Channel, DeliveryPolicy]] = {}
    try:
        for name in names:
            if name in ("portal", "crm"):
                table = {"type": name, "path": str(directory / f"{name}.sqlite"), "listen": "127.0.0.1:0",
                         "offer_ttl": f"{offer_ttl_days}d", "timeout": API_TIMEOUT}
            else:
                table = {"type": "file", "path": str(directory / f"{name}.jsonl"), "report": "delivered"}
            channels[name] = (make_channel(name, table), DeliveryPolicy())
    except BaseException:
        for channel, _ in channels.values():
            channel.close()
        raise
    return channels


def _subset(instructions: pa.Table, names: list[str], per_channel: int) -> pa.Table:
    """The first `per_channel` instructions of each channel, in the engine's order."""
    parts = [instructions.filter(pc.equal(instructions.column("channel"), name)).slice(0, per_channel)
             for name in names]
    return pa.concat_tables(parts)


def _settled(box: Outbox, names: list[str]) -> dict[str, bool]:
    """Per channel: nothing in flight and nothing pending that is due (a deferred row waits for its not_before)."""
    counts = box.counts()
    now = time.time() * 1000
    settled = {}
    for name in names:
        due = box.next_due(name)
        settled[name] = not counts.get((name, "in-flight")) and (due is None or due > now)
    return settled


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, Any]:
    """One request to a channel's API on loopback: the status and the JSON answer (None when empty)."""
    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
        err.close()
    return status, orjson.loads(raw) if raw else None


class _Unexpected(Exception):
    """An answer of a channel's API that the closed loop did not expect (the store slower than the API's timeout)."""


def _expect(answer: tuple[int, Any], *statuses: int) -> Any:
    """The JSON body of an answer with one of `statuses`; `_Unexpected` otherwise."""
    status, body = answer
    if status not in statuses:
        raise _Unexpected(f"{status} {orjson.dumps(body).decode()}")
    return body


def _base_url(channel: Channel) -> str:
    assert isinstance(channel, OfferChannel)
    host, port = channel.address
    return f"http://{host}:{port}"


def _first_offered(handed: pa.Table, channel: str) -> int | None:
    """The msisdn of the channel's first instruction that is presented now (not holdout, not deferred), or None."""
    rows = handed.filter(pc.and_(pc.and_(pc.equal(handed.column("channel"), channel),
                                         pc.invert(handed.column("holdout"))),
                                 pc.less_equal(handed.column("not_before"), int(time.time() * 1000))))
    return rows.column("msisdn")[0].as_py() if rows.num_rows else None


def _portal_loop(channel: Channel, msisdn: int, say: Callable[[str], None]) -> int:
    """The portal at the subscriber's login: their pending offers, and the subscriber accepts the first.
    Returns how many responses were recorded."""
    base = f"{_base_url(channel)}/subscribers/{msisdn}"
    offers = _expect(_http("GET", f"{base}/offers"), 200)
    say(f"portal  GET  {base}/offers -> 200, {len(offers)} pending offer(s)")
    if not offers:
        return 0
    offer = offers[0]
    say(f"          first: {offer['rule']} (template {offer['template']}, id {offer['id']})")
    answer = _expect(_http("POST", f"{base}/offers/{offer['id']}/response",
                           {"response_id": PORTAL_RESPONSE, "outcome": "accepted"}), 200)
    say(f"portal  POST .../offers/{offer['id']}/response accepted -> 200, offer {answer['offer']['status']}")
    return int(answer["recorded"])


def _crm_loop(channel: Channel, msisdn: int, say: Callable[[str], None]) -> int:
    """Two agents and one subscriber: a claim, a refused claim, `considering`, then `declined` at the next call.
    Returns how many outcomes were recorded."""
    base = f"{_base_url(channel)}/subscribers/{msisdn}/next-best-action"
    first, second = AGENTS
    offer = _expect(_http("GET", f"{base}?agent={first}"), 200, 204)
    say(f"crm     GET  {base}?agent={first} -> " + (f"200, {offer['rule']} (id {offer['id']})" if offer else "204"))
    if offer is None:
        return 0
    action = f"{base}/{offer['id']}"
    claimed = _expect(_http("POST", f"{action}/claim", {"agent": first}), 200)
    say(f"crm     POST .../claim by {first} -> 200, {claimed['status']}")
    refused = _expect(_http("POST", f"{action}/claim", {"agent": second}), 409)
    say(f"crm     POST .../claim by {second} -> 409, {refused['error']} by {refused.get('claimed_by')}")
    answer = _expect(_http("POST", f"{action}/outcome",
                           {"response_id": f"{first}-1", "outcome": "considering", "agent": first}), 200)
    say(f"crm     POST .../outcome considering by {first} -> 200, offer {answer['offer']['status']}")
    recorded = int(answer["recorded"])
    # The subscriber calls again: the offer is open for any agent.
    again = _expect(_http("GET", f"{base}?agent={second}"), 200)
    same = "the same offer" if again["id"] == offer["id"] else "another offer"
    say(f"crm     GET  ...?agent={second} -> 200, {same}, {again['status']}")
    _expect(_http("POST", f"{base}/{again['id']}/claim", {"agent": second}), 200)
    answer = _expect(_http("POST", f"{base}/{again['id']}/outcome",
                           {"response_id": f"{second}-1", "outcome": "declined", "agent": second}), 200)
    say(f"crm     POST .../claim and .../outcome declined by {second} -> 200, offer {answer['offer']['status']}")
    return recorded + int(answer["recorded"])


def _closed_loop(channels: dict[str, tuple[Channel, DeliveryPolicy]], handed: pa.Table, feedback: _FeedbackQueue,
                 say: Callable[[str], None]) -> None:
    """The portal and an agent answer an offer each over HTTP; their feedback is applied to the engine."""
    recorded = 0
    for name, loop in (("portal", _portal_loop), ("crm", _crm_loop)):
        msisdn = _first_offered(handed, name) if name in channels else None
        if msisdn is None:
            say(f"{name}: no offer delivered to act on")
            continue
        try:
            recorded += loop(channels[name][0], msisdn, say)
        except _Unexpected as exc:
            say(f"{name}: the API answered {exc}; the closed loop stops here")
    # The offer APIs report a response before answering the POST, unless the store was slower than the
    # API's timeout: then the report follows shortly.
    expected = sum(feedback.results.values()) + recorded
    settle = time.perf_counter() + 5.0
    while True:
        feedback.apply()
        if sum(feedback.results.values()) >= expected or time.perf_counter() > settle:
            return
        time.sleep(POLL_SECONDS)


def _feedback_counts(engine: Engine, rules: list[str]) -> dict[str, dict[str, int]]:
    stats = engine.stats()["rules"]
    return {rule: {o: stats[rule]["feedback"][o] for o in FEEDBACK_COLUMNS} for rule in rules}


def run_channels(engine: Engine, instructions: pa.Table | None, per_channel: int, out: IO[str],
                 table: TextTable) -> None:
    """Deliver up to `per_channel` instructions of each channel in process, act out the closed loop, and
    print what happened."""

    def say(line: str) -> None:
        print(f"  {line}", file=out, flush=True)

    print("\nChannels", file=out)
    if instructions is None or not instructions.num_rows:
        say("(no instructions to deliver)")
        return
    names = sorted(set(instructions.column("channel").to_pylist()))
    handed = _subset(instructions, names, per_channel)
    if handed.num_rows < instructions.num_rows:
        say(f"(a subset: the first {per_channel:,} instructions of each channel, {handed.num_rows:,} of "
            f"{instructions.num_rows:,}; --deliver sets how many)")
    feedback = _FeedbackQueue(engine)
    rules = [rule.id for rule in engine.ruleset.rules if not rule.shadow]
    # Offers expire OFFER_TTL_DAYS after their not_before, on the wall clock; the demo's event time is a fixed
    # stretch of synthetic days, most likely in the past, so its offers get that long from today instead.
    earliest = pc.min(handed.column("not_before")).as_py()
    gap_days = max(0, -(-(int(time.time() * 1000) - earliest) // 86_400_000))
    if gap_days:
        say(f"(the demo's event time is {gap_days} day(s) before today: offers are kept {OFFER_TTL_DAYS} days "
            f"from today rather than from their not_before, so the portal and crm still present them)")
    with tempfile.TemporaryDirectory(prefix="kairos-demo-") as directory, contextlib.ExitStack() as stack:
        path = Path(directory)
        channels = _make_channels(names, path, OFFER_TTL_DAYS + gap_days)
        kinds = {name: type(channel).kind for name, (channel, _) in channels.items()}
        say(f"outbox and channels in {directory} (removed at the end): "
            + ", ".join(f"{name} -> {kinds[name]}" for name in names))
        try:
            worker = DeliveryWorker(path / "outbox.db", channels, seed=0)
        except BaseException:
            for channel, _ in channels.values():
                channel.close()
            raise
        worker.start(feedback.sink)  # closes the channels itself when it fails
        stack.callback(worker.stop)
        output = stack.enter_context(contextlib.closing(OutboxOutput("delivery", path / "outbox.db")))
        output.on_enqueue = worker.wake
        box = stack.enter_context(contextlib.closing(Outbox(path / "outbox.db")))
        started = time.perf_counter()
        output.send(handed)
        output.flush()
        finished: dict[str, float] = {}
        deadline = started + DELIVERY_TIMEOUT
        while len(finished) < len(names) and time.perf_counter() < deadline:
            feedback.apply()
            for name, done in _settled(box, names).items():
                if done and name not in finished:
                    finished[name] = time.perf_counter() - started
            time.sleep(POLL_SECONDS)
        feedback.apply()
        counts = box.counts()
        late = [name for name in names if name not in finished]
        rows = []
        for name in names:
            n = {status: counts.get((name, status), 0)
                 for status in ("delivered", "parked", "holdout", "pending", "in-flight")}
            seconds = finished.get(name)
            rate = f"{n['delivered'] / seconds:,.0f}" if seconds and n["delivered"] else "-"
            rows.append([name, kinds[name], f"{sum(n.values()):,}", f"{n['delivered']:,}", f"{n['parked']:,}",
                         f"{n['holdout']:,}", f"{n['pending'] + n['in-flight']:,}",
                         f"{seconds:.2f}" if seconds is not None else "-", rate])
        headers = ["channel", "type", "instructions", "delivered", "parked", "holdout", "waiting", "seconds",
                   "instructions/s"]
        for line in table(headers, rows, frozenset(range(2, len(headers)))):
            say(line)
        say("(seconds: from handing the instructions to the outbox until the channel had delivered all that "
            "was due; holdout: the control group, recorded and never delivered; waiting: not delivered yet)")
        if late:
            say(f"delivery did not finish within {DELIVERY_TIMEOUT:g} s for {', '.join(late)}: the table shows "
                f"where it stood (each portal or crm offer waits for its commit to disk, slow on a busy disk)")
        waiting_not_due = [name for name in finished if counts.get((name, "pending"))]
        if waiting_not_due:
            say(f"(waiting rows of {', '.join(waiting_not_due)} are due later: their not_before (quiet hours) "
                f"or their retry is still to come)")

        before = _feedback_counts(engine, rules)
        print("\nClosed loop over HTTP on loopback", file=out)
        _closed_loop(channels, handed, feedback, say)
        after = _feedback_counts(engine, rules)

    results = feedback.results
    print("\nFeedback in the engine", file=out)
    say(f"reports from the channels applied with Engine.feedback: {results['applied']:,} applied, "
        f"{results['unknown']:,} unknown id, {results['invalid']:,} invalid outcome")
    shown = [rule for rule in rules if any(after[rule].values())]
    rows = []
    for rule in shown:
        cells = [f"{before[rule][o]:,} -> {after[rule][o]:,}" if before[rule][o] != after[rule][o]
                 else f"{after[rule][o]:,}" for o in FEEDBACK_COLUMNS]
        rows.append([rule, *cells])
    for line in table(["rule", *FEEDBACK_COLUMNS], rows, frozenset(range(1, len(FEEDBACK_COLUMNS) + 1))):
        say(line)
    say('(engine.stats()["rules"][rule]["feedback"]; "a -> b": before and after the closed loop above; delivered: '
        "the file channels' reports)")
