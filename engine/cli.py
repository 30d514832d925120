"""The `kairos` command line (SPEC section 7).

    kairos demo [--subscribers N] [--events N] [--batch-size N] [--seed N] [--rules PATH] [--deliver N]
    kairos check RULES
    kairos test RULES CASES...
    kairos run -c kairos.toml
    kairos replay CAPTURE... --to ENDPOINT --input NAME --sender ID [--acks URL] [--rows N]
    kairos forget -c kairos.toml MSISDN... [--by NAME]
    kairos outbox -c kairos.toml list|retry|purge [filters]
    kairos deadletters -c kairos.toml list|replay|purge [filters]
    kairos --version

`main(argv)` returns the exit status instead of exiting, so tests call it
directly: 0 success, 2 bad input (a rules file that does not compile, a bad
option); `kairos test` exits 1 when a case fails.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pyarrow as pa

from engine import admin
from engine._version import __version__
from engine.admin import positive_int
from engine.engine import Engine
from engine.explain import (
    describe_active,
    describe_audience,
    describe_condition,
    describe_filter,
    describe_profile_fields,
    rule_warnings,
)
from engine.rules import RulesError, RuleSet, format_duration, load_rules, parse_rules
from engine.schema import KINDS
from engine.synth import TrafficGenerator

DEMO_RULES = "demo_rules.toml"
IDLE_TAIL_MS = 3 * 3_600_000  # event time the demo lets pass after its last event

EXIT_OK = 0
EXIT_USAGE = 2

def describe_policy(policy) -> list[str]:
    """The contact policy of a rules file in words (docs/policy.md)."""
    caps = []
    if policy.daily_cap:
        caps.append(f"{policy.daily_cap} per day")
    if policy.monthly_cap:
        caps.append(f"{policy.monthly_cap} per month")
    lines = [
        f"policy: pushes on {', '.join(policy.active_channels)}: "
        + (" and ".join(caps) + " per subscriber" if caps else "no frequency cap"),
    ]
    if policy.quiet_hours is not None:
        start, end = policy.quiet_hours
        lines.append(f"policy: quiet hours {start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d} "
                     f"local: pushes due then wait (not_before)")
    if tuple(policy.contact_days) != (1, 2, 3, 4, 5, 6, 7):
        names = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
        lines.append(f"policy: contact days {', '.join(names[d - 1] for d in policy.contact_days)}")
    rest = format_duration(policy.decline_cooldown)
    lines.append(f"policy: a decline rests the rule {rest} unless it says otherwise")
    return lines


def _packaged_rules(name: str) -> RuleSet:
    text = importlib.resources.files("engine").joinpath("data", name).read_text(encoding="utf-8")
    return parse_rules(text, source=f"engine/data/{name} (packaged)")


def _table(headers: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Rows of text aligned under headers; columns in `right` are right-aligned (numbers)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


# ---------------------------------------------------------------------------
# kairos demo


def _sample_instructions(table: pa.Table, rule_ids: list[str], k: int = 5) -> list[dict]:
    """Up to k instructions: the first of each rule in file order, then the earliest others."""
    rules = table.column("rule").to_pylist()
    chosen: list[int] = []
    for rule_id in rule_ids:
        if rule_id in rules and len(chosen) < k:
            chosen.append(rules.index(rule_id))
    for i in range(len(rules)):
        if len(chosen) >= k:
            break
        if i not in chosen:
            chosen.append(i)
    return table.take(sorted(chosen)).to_pylist() if chosen else []


def run_demo(args: argparse.Namespace) -> int:
    ruleset = load_rules(args.rules) if args.rules else _packaged_rules(DEMO_RULES)
    tz = ZoneInfo(ruleset.policy.timezone)
    out = sys.stdout
    print(f"Kairos demo: {len(ruleset.rules)} rules from {ruleset.source}", file=out)
    print(f"Generating {args.events:,} synthetic events from {args.subscribers:,} subscribers "
          f"(seed {args.seed}) ...", file=out, flush=True)
    started = time.perf_counter()
    generator = TrafficGenerator(args.subscribers, seed=args.seed)
    batches = list(generator.batches(args.events, args.batch_size))
    generated = time.perf_counter() - started
    if batches:
        first_ts = batches[0].column("ts")[0].as_py()
        last_ts = batches[-1].column("ts")[-1].as_py()
        print(f"  {args.events:,} events in {len(batches):,} batches in {generated:.2f} s; event time "
              f"{_local(first_ts, tz)} to {_local(last_ts, tz)} ({tz.key})", file=out)

    engine = Engine(ruleset)
    outputs = []
    print("Processing ...", file=out, flush=True)
    started = time.perf_counter()
    for batch in batches:
        outputs.append(engine.process(batch))
    elapsed = time.perf_counter() - started
    # As the daemon's idle clock would: event time moves on after the last event, so that timers
    # (absence rules) still pending then fire.
    pending_timers_fire_by = engine.watermark + IDLE_TAIL_MS
    outputs.append(engine.advance(pending_timers_fire_by))
    stats = engine.stats()
    instructions = pa.concat_tables(outputs) if outputs else None

    rate = stats["events"] / elapsed if elapsed > 0 else float("inf")
    print(file=out)
    summary = [
        ("events", f"{stats['events']:,}"),
        ("batches", f"{stats['batches']:,} of up to {args.batch_size:,}"),
        ("wall time", f"{elapsed:.3f} s (Engine.process only)"),
        ("throughput", f"{rate:,.0f} events/s"),
        ("subscribers with state", f"{stats['subscribers']:,}"),
        ("state memory", _mib(stats["state_bytes"])),
        ("instructions", f"{stats['instructions']:,}"),
    ]
    width = max(len(k) for k, _ in summary)
    for key, value in summary:
        print(f"  {key.ljust(width)}  {value}", file=out)

    print("\nPer rule", file=out)
    per_rule = [stats["rules"][rule.id] for rule in ruleset.rules]
    # Stop reasons (docs/policy.md) that stopped something, in policy order; the others would be columns of zeros.
    reasons = [reason for reason in per_rule[0]["stopped"] if any(c["stopped"][reason] for c in per_rule)]
    rows = []
    totals = [0] * (3 + len(reasons))
    for rule, c in zip(ruleset.rules, per_rule, strict=True):
        values = [c["matched"], c["sent"], c["holdout"], *(c["stopped"][reason] for reason in reasons)]
        if not rule.shadow:
            totals = [a + b for a, b in zip(totals, values, strict=True)]
        rows.append([f"{rule.id} (shadow)" if rule.shadow else rule.id, str(rule.priority),
                     *(f"{v:,}" for v in values)])
    rows.append(["total (live rules)", "", *(f"{v:,}" for v in totals)])
    headers = ["rule", "priority", "matched", "sent", "holdout", *reasons]
    for line in _table(headers, rows, right=frozenset(range(1, len(headers)))):
        print(f"  {line}", file=out)
    print("  (sent: instructions to deliver; holdout: the control group; the other columns are matches that the "
          "contact policy stopped, by reason: docs/policy.md)", file=out)
    if any(rule.shadow for rule in ruleset.rules):
        print("  (shadow: what the rule would have sent and how the policy would have stopped it; it sends "
              "nothing)", file=out)
    print(f"  (after the last event, event time moved on {IDLE_TAIL_MS // 3_600_000} h, as the daemon's idle clock "
          "would, so that pending timers fired)", file=out)
    silent = [rule.id for rule in ruleset.rules if stats["rules"][rule.id]["sent"] == 0]
    if silent:
        print(f"  (no instruction from: {', '.join(silent)})", file=out)

    print("\nSample instructions", file=out)
    samples = _sample_instructions(instructions, [r.id for r in ruleset.rules]) if instructions else []
    if not samples:
        print("  (none)", file=out)
    else:
        rows = [
            [
                s["id"],
                _local(s["ts"], tz),
                str(s["msisdn"]),
                s["rule"],
                s["channel"],
                " ".join(f"{k}={v}" for k, v in s["params"]) or "-",
            ]
            for s in samples
        ]
        for line in _table(["id", "ts", "msisdn", "rule", "channel", "params"], rows):
            print(f"  {line}", file=out)

    # Imported here: the channels pull in the outbox, HTTP servers and SQLite, which check does not need.
    from engine.demo_channels import run_channels

    run_channels(engine, instructions, args.deliver, out, _table)
    return EXIT_OK


def _local(ts_ms: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# kairos check


def run_check(args: argparse.Namespace) -> int:
    ruleset = load_rules(args.rules)
    out = sys.stdout
    policy = ruleset.policy
    print(f"{ruleset.source}: {len(ruleset.rules)} rules, {len(ruleset.sets)} sets, "
          f"timezone {policy.timezone}, default cooldown {format_duration(policy.cooldown)}", file=out)
    for line in describe_policy(policy):
        print(f"  {line}", file=out)
    for name, values in ruleset.sets.items():
        if name in ruleset.set_files:
            print(f"  set {name} = {len(values):,} values from {ruleset.set_files[name]}", file=out)
        else:
            print(f"  set {name} = [{', '.join(str(v) for v in values)}]", file=out)
    n_warnings = 0
    for rule in ruleset.rules:
        fields = [
            ("on", ", ".join(KINDS[k] for k in rule.on)),
            ("where", rule.where_text.strip() or "(none)"),
            ("filter", describe_filter(rule.where)),
            ("condition", describe_condition(rule)),
            ("active", describe_active(rule.active, policy.timezone)),
            ("channels", ", ".join(rule.channels)),
            ("cooldown", format_duration(rule.cooldown) if rule.cooldown else "none"),
            ("priority", str(rule.priority)),
            ("template", rule.template),
            ("params", ", ".join(rule.params) or "(none)"),
        ]
        profile_fields = describe_profile_fields(rule)
        if profile_fields is not None:
            fields.insert(3, ("profile", profile_fields))
        if rule.audience is not None:
            fields.insert(fields.index(("channels", ", ".join(rule.channels))), ("audience",
                                                                                describe_audience(rule.audience)))
        if rule.holdout:
            fields.append(("holdout", f"{rule.holdout:.0%} of subscribers, recorded and never delivered"))
        if rule.decline_cooldown != policy.decline_cooldown:
            fields.append(("declined", f"rests {format_duration(rule.decline_cooldown)} after a decline"))
        if rule.max_per_hour:
            fields.append(("guardrail", f"paused after more than {rule.max_per_hour:,} instructions within an hour"))
        if rule.goal is not None:
            goal_where = f" where {rule.goal.where_text.strip()}" if rule.goal.where_text.strip() else ""
            fields.append(("goal", f"{', '.join(KINDS[k] for k in rule.goal.on)}{goal_where} "
                                   f"within {format_duration(rule.goal.within)} of the instruction"))
        if rule.shadow:
            fields.append(("shadow", "runs on live traffic and counts what it would send; sends nothing"))
        fields.extend(("warning", warning) for warning in rule_warnings(rule, ruleset))
        n_warnings += sum(key == "warning" for key, _ in fields)
        print(f"\n{rule.id}", file=out)
        for key, value in fields:
            print(f"  {key:<10} {value}", file=out)
    print(f"\nOK, {n_warnings} warning{'s' if n_warnings > 1 else ''}" if n_warnings else "\nOK", file=out)
    return EXIT_OK


# ---------------------------------------------------------------------------
# kairos test


def run_rule_tests(args: argparse.Namespace) -> int:
    from engine.rule_tests import run_tests

    return run_tests(args.rules, args.cases)


# ---------------------------------------------------------------------------
# kairos run


def run_daemon(args: argparse.Namespace) -> int:
    # Imported here: the daemon pulls in ZeroMQ and the adapters, which demo and check do not need.
    import zmq

    from engine.config import load_config
    from engine.daemon import Daemon
    from engine.logs import configure

    if args.check:
        return check_daemon_config(args.config)
    try:
        config = load_config(args.config)
        configure(config.log_level)
        daemon = Daemon(config)
    except (ValueError, OSError, zmq.ZMQError) as exc:
        # A config, rules, field map or output that cannot be used, or an endpoint or port in use:
        # refuse to start, saying which.
        print(f"kairos run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return daemon.run()


def check_daemon_config(path: str) -> int:
    """`kairos run --check`: validate config, rules, profiles, channels and state without binding anything."""
    from engine.config import load_config
    from engine.daemon import preflight

    try:
        lines = preflight(load_config(path))
    except (ValueError, OSError) as exc:
        print(f"kairos run --check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for line in lines:
        print(line)
    print("OK: the daemon would start with this config")
    return EXIT_OK


# ---------------------------------------------------------------------------
# kairos replay


def run_replay(args: argparse.Namespace) -> int:
    from engine.replay import replay_to_daemon

    try:
        counts = replay_to_daemon(args.captures, args.to, args.acks, args.input, args.sender, rows=args.rows,
                                  window=args.window, rate=args.rate)
    except (OSError, TimeoutError, pa.ArrowInvalid) as exc:
        print(f"kairos replay: {exc}", file=sys.stderr)
        return 1
    print(f"sent {counts['messages']:,} messages ({counts['skipped']:,} already acknowledged, skipped; "
          f"{counts['resent']:,} resent); every one acknowledged by the daemon")
    return EXIT_OK


# ---------------------------------------------------------------------------
# kairos forget


def run_forget(args: argparse.Namespace) -> int:
    """Ask the running daemon of a config to erase subscribers (POST /control/forget)."""
    import getpass
    import http.client

    import orjson

    from engine.config import load_config

    try:
        config = load_config(args.config)
    except ValueError as exc:
        print(f"kairos forget: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if config.metrics_host is None:
        print(f"kairos forget: {args.config}: metrics.listen is off: the daemon has no control endpoint",
              file=sys.stderr)
        return EXIT_USAGE
    token = config.metrics_token or os.environ.get("KAIROS_TOKEN")
    body = orjson.dumps({"msisdns": args.msisdns, "by": args.by or getpass.getuser()})
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    host = "127.0.0.1" if config.metrics_host in ("0.0.0.0", "::") else config.metrics_host
    connection = http.client.HTTPConnection(host, config.metrics_port, timeout=600)
    try:
        connection.request("POST", "/control/forget", body=body, headers=headers)
        response = connection.getresponse()
        answer = orjson.loads(response.read())
    except (OSError, http.client.HTTPException, orjson.JSONDecodeError) as exc:
        print(f"kairos forget: no daemon answers on {host}:{config.metrics_port}: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if not answer.get("ok"):
        print(f"kairos forget: {answer.get('message')}", file=sys.stderr)
        return 1
    print(f"erased {len(args.msisdns)} subscriber(s): {answer['message']}")
    return EXIT_OK


# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kairos", description="Kairos: real-time event engine for telecom marketing."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run synthetic traffic through the sample rules and show what happened",
        description="Generate synthetic traffic, run it through the engine in process, deliver the instructions "
        "through an outbox to in-process portal, crm and file channels, answer offers over HTTP on loopback so that "
        "the feedback reaches the engine, and print a summary. Needs no configuration.",
    )
    demo.add_argument("--subscribers", type=positive_int, default=100_000, help="default: %(default)s")
    demo.add_argument("--events", type=positive_int, default=2_000_000, help="default: %(default)s")
    demo.add_argument("--batch-size", type=positive_int, default=65_536, help="default: %(default)s")
    demo.add_argument("--seed", type=int, default=0, help="traffic seed (default: %(default)s)")
    demo.add_argument("--rules", metavar="PATH", help="rules file (default: the packaged demo_rules.toml)")
    demo.add_argument("--deliver", type=positive_int, default=5_000, metavar="N",
                      help="instructions of each channel handed to the in-process channels (default: %(default)s)")
    demo.set_defaults(run=run_demo)

    check = commands.add_parser(
        "check",
        help="validate a rules file and show what each rule does",
        description="Parse and check a rules file; print each rule, or the error (exit status 2).",
    )
    check.add_argument("rules", metavar="RULES", help="rules file (TOML)")
    check.set_defaults(run=run_check)

    test = commands.add_parser(
        "test",
        help="run case files (events in, instructions expected) against a rules file",
        description="Run each [[case]] of the case files in a fresh engine over the rules file: its events, "
        "feedback and advances, step by step; compare the instructions (and stops) with those it expects. Prints "
        "ok or a diff per case; exit status 0 when all pass, 1 when any fails, 2 for a case file that cannot be "
        "used (docs/rules.md, Testing a campaign).",
    )
    test.add_argument("rules", metavar="RULES", help="rules file (TOML)")
    test.add_argument("cases", nargs="+", metavar="CASES", help="case files (TOML) or directories of them")
    test.set_defaults(run=run_rule_tests)

    run = commands.add_parser(
        "run",
        help="run the daemon: ZeroMQ feeds in, instructions to the outputs, metrics over HTTP",
        description="Run Kairos as a long-lived process configured by one file (docs/daemon.md). "
        "SIGHUP reloads the rules; SIGTERM drains and exits 0.",
    )
    run.add_argument("-c", "--config", metavar="PATH", required=True, help="daemon configuration (kairos.toml)")
    run.add_argument("--check", action="store_true",
                     help="validate the config, rules, profiles, channels and checkpoint, bind nothing, and exit")
    run.set_defaults(run=run_daemon)

    replay = commands.add_parser(
        "replay",
        help="send captured events (Arrow IPC files) to a daemon, resuming after what it acknowledged",
        description="Replay Arrow IPC captures to a running daemon's input over ZeroMQ PUSH, with sequence "
        "headers, keeping every message until the daemon acknowledges it durable (GET /acks) and resending what a "
        "crash lost. Run again after a stop, it resumes where the daemon's acknowledgements say. The input should "
        "have sequence = \"exact\" (docs/daemon.md, Durability).",
    )
    replay.add_argument("captures", nargs="+", metavar="CAPTURE", help="Arrow IPC files or streams, in order")
    replay.add_argument("--to", required=True, metavar="ENDPOINT", help="the daemon input's ZeroMQ endpoint")
    replay.add_argument("--input", required=True, metavar="NAME", help="the input's name in the daemon's config")
    replay.add_argument("--sender", required=True, type=int, metavar="ID", help="this sender's id (uint64)")
    replay.add_argument("--acks", default="http://127.0.0.1:9464/acks", metavar="URL",
                        help="the daemon's acknowledgements (default: %(default)s)")
    replay.add_argument("--rows", type=positive_int, default=65_536, help="rows per message (default: %(default)s)")
    replay.add_argument("--window", type=positive_int, default=64,
                        help="messages outstanding before waiting for acknowledgements (default: %(default)s)")
    replay.add_argument("--rate", type=float, default=None, metavar="EVENTS_PER_S",
                        help="pace the sending (default: as fast as the daemon takes it)")
    replay.set_defaults(run=run_replay)

    forget = commands.add_parser(
        "forget",
        help="erase subscribers from a running daemon: state, checkpoints, journal, outbox, offers",
        description="Ask the daemon of a config to erase subscribers from its live state, its checkpoints (a new "
        "one is written and the older ones deleted), its journal (segments kept for audit are rewritten without "
        "their rows), its outbox and its channels' offer stores; state_dir/erasures.jsonl records who, when and "
        "how many rows, never the numbers. The token comes from the config or KAIROS_TOKEN.",
    )
    forget.add_argument("-c", "--config", metavar="PATH", required=True, help="the daemon's configuration")
    forget.add_argument("msisdns", nargs="+", type=positive_int, metavar="MSISDN", help="subscriber numbers")
    forget.add_argument("--by", metavar="NAME", help="who asks, for the record (default: the user name)")
    forget.set_defaults(run=run_forget)

    admin.add_outbox_arguments(commands.add_parser(
        "outbox", help="list, retry or purge outbox instructions (safe while the daemon runs)",
        description="Look at the outbox of a config's type = \"outbox\" output: list instructions by channel, "
        "rule, status, reason and age; put parked ones back to pending (retry); delete finished ones (purge)."))
    admin.add_deadletters_arguments(commands.add_parser(
        "deadletters", help="list, replay or purge dead letters (safe while the daemon runs)",
        description="Look at a config's dead-letter files: count by input and reason (list), send what now "
        "decodes back to the daemon (replay), delete old files (purge)."))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"kairos {__version__}")
        return EXIT_OK
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except RulesError as exc:
        print(f"kairos {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # Output piped into something that stopped reading (`kairos check x | head`):
        # not an error of ours.  Point stdout at devnull so the exit flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
