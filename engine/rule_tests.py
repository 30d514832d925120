"""Rule tests: `kairos test RULES CASES...` (docs/rules.md, "Testing a campaign").

A case file is TOML holding one or more `[[case]]` tables.  Each case names
its subscribers' profiles, a list of steps (events, feedback, moving event
time on) and the instructions the rules should make of them, in order:

    [[case]]
    name = "three hotline calls make a car owner"
    steps = [   # (an inline table is one line in TOML; split here to fit)
      { event = { ts = "2026-12-01T09:00:00+08:00", msisdn = 8613800000003, kind = "call_out",
                  peer = 12122, duration = 40 } },
      { advance = "2026-12-02T00:00:00+08:00" },
    ]
    expect = [
      { rule = "car_owner_services", msisdn = 8613800000003, channel = "sms", ts = "2026-12-01T09:00:00+08:00" },
    ]
    expect_stops = { car_owner_services = { cooldown = 1 } }

`load_cases` reads and checks a file (CaseError names the file, the case and
the key: unknown keys are refused, so a misspelt one is never ignored),
`run_case` runs one case in a fresh Engine and compares, `run_tests` is the
command: it prints `ok` or a diff per case and a summary, and returns the exit
status (0 all pass, 1 any fails, 2 a case file that cannot be used).
"""

from __future__ import annotations

import difflib
import sys
import tomllib
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pyarrow as pa

from engine.compiler import profile_attributes
from engine.engine import Engine
from engine.policy import OUTCOMES, STOP_REASONS
from engine.profiles import POLICY_COLUMNS, ProfileError
from engine.rules import RuleSet, load_rules
from engine.schema import COLUMN_DTYPES, EVENT_COLUMNS, KIND_CODES, KINDS, MAX_TS, MIN_TS, TS_RANGE

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_CASES = 2

CASE_KEYS = ("name", "timezone", "profiles", "steps", "expect", "expect_stops")
STEP_KEYS = ("event", "feedback", "advance")
FEEDBACK_KEYS = ("instruction", "id", "outcome", "ts")
EXPECT_KEYS = ("rule", "msisdn", "channel", "ts", "not_before", "holdout", "params")
EVENT_FIELDS = tuple(c for c in EVENT_COLUMNS if c not in ("ts", "msisdn", "kind"))


class CaseError(ValueError):
    """A case file that cannot be used: names the file, the case (name or index) and the key."""

    def __init__(self, path: str, case: str | None, key: str | None, reason: str):
        self.path, self.case, self.key, self.reason = path, case, key, reason
        where = [path] + ([case] if case else []) + ([key] if key else [])
        super().__init__(": ".join(where) + ": " + reason)


@dataclass(frozen=True)
class Expected:
    rule: str
    msisdn: int
    channel: str
    ts: int
    not_before: int | None = None
    holdout: bool | None = None
    params: dict[str, str] | None = None


@dataclass(frozen=True)
class Step:
    kind: str  # "event", "feedback" or "advance"
    key: str  # where it is in the file, for messages: steps[3]
    event: dict[str, int] | None = None
    ts: int | None = None
    instruction: int | None = None  # feedback: 1-based position in `expect`
    id: str | None = None
    outcome: str | None = None


@dataclass
class Case:
    path: str
    index: int  # 1-based position in its file
    name: str
    zone: ZoneInfo
    profiles: list[dict[str, Any]]
    steps: list[Step]
    expect: list[Expected]
    expect_stops: dict[str, dict[str, int]]

    @property
    def label(self) -> str:
        return f"case {self.index} {self.name!r}"


@dataclass
class CaseResult:
    case: Case
    got: list[dict]
    stops: dict[str, dict[str, int]]
    diff: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.diff


# ---------------------------------------------------------------------------
# reading case files


def _near(word: str, choices) -> str:
    near = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


class _Reader:
    """Checks one case's values; every error names the file, the case and the key."""

    def __init__(self, path: str, case: str, zone: ZoneInfo):
        self.path, self.case, self.zone = path, case, zone

    def fail(self, key: str | None, reason: str) -> CaseError:
        return CaseError(self.path, self.case, key, reason)

    def table(self, key: str, value, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, not {_show(value)}")
        for name in value:
            if name not in allowed:
                raise self.fail(f"{key}.{name}" if key else name,
                                f"unknown key{_near(name, allowed)} (keys: {', '.join(allowed)})")
        for name in required:
            if name not in value:
                raise self.fail(key or None, f"missing key {name!r}")
        return value

    def integer(self, key: str, value, low: int | None = None, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, not {_show(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.fail(key, f"{value} is outside {low}..{high}")
        return value

    def text(self, key: str, value) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {_show(value)}")
        return value

    def msisdn(self, key: str, value) -> int:
        return self.integer(key, value, 1, 2**63 - 1)

    def time(self, key: str, value) -> int:
        """ms since the epoch from an int, an ISO-8601 string or a TOML datetime (no offset: the case's zone)."""
        if isinstance(value, bool):
            raise self.fail(key, f"must be a time (ISO-8601 such as \"2026-12-01T09:00:00+08:00\", or ms), "
                                 f"not {_show(value)}")
        if isinstance(value, int):
            ms = value
        else:
            if isinstance(value, str):
                try:
                    value = datetime.fromisoformat(value)
                except ValueError:
                    raise self.fail(key, f"not an ISO-8601 time: {value!r} (write "
                                         f"\"2026-12-01T09:00:00+08:00\", or ms since the epoch)") from None
            elif isinstance(value, date) and not isinstance(value, datetime):
                raise self.fail(key, f"a date without a time of day: {value}")
            if not isinstance(value, datetime):
                raise self.fail(key, f"must be a time (ISO-8601 or ms), not {_show(value)}")
            if value.tzinfo is None:
                value = value.replace(tzinfo=self.zone)
            ms = round(value.timestamp() * 1000)
        if not MIN_TS <= ms <= MAX_TS:
            raise self.fail(key, f"{ms} is outside the event time range {TS_RANGE}")
        return ms


def _show(value) -> str:
    return f"{type(value).__name__} {value!r}"


def load_cases(path: str | Path, ruleset: RuleSet) -> list[Case]:
    """Read and check the cases of one file against the rules they test."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise CaseError(source, None, None, f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CaseError(source, None, None, f"not valid TOML: {exc}") from None
    for key in document:
        if key != "case":
            raise CaseError(source, None, key, f"unknown key{_near(key, ['case'])} (a case file holds [[case]] "
                                               "tables)")
    tables = document.get("case")
    if not isinstance(tables, list) or not tables:
        raise CaseError(source, None, "case", "no [[case]] table")
    rule_ids = [rule.id for rule in ruleset.rules]
    profile_fields = sorted({attribute[1] for attribute in profile_attributes(ruleset)})
    cases = []
    names: set[str] = set()
    for index, table in enumerate(tables, start=1):
        label = f"case {index}"
        if isinstance(table, dict) and isinstance(table.get("name"), str):
            label = f"case {index} {table['name']!r}"
        case = _read_case(source, index, label, table, ruleset, rule_ids, profile_fields)
        if case.name in names:
            raise CaseError(source, label, "name", "another case of this file has this name")
        names.add(case.name)
        cases.append(case)
    return cases


def _read_case(source: str, index: int, label: str, table, ruleset: RuleSet, rule_ids: list[str],
               profile_fields: list[str]) -> Case:
    r = _Reader(source, label, ZoneInfo(ruleset.policy.timezone))
    r.table("", table, CASE_KEYS, required=("name", "steps", "expect"))
    name = r.text("name", table["name"])
    if "timezone" in table:
        try:
            r.zone = ZoneInfo(r.text("timezone", table["timezone"]))
        except (ZoneInfoNotFoundError, ValueError):
            raise r.fail("timezone", f"unknown time zone {table['timezone']!r} (an IANA name such as "
                                     "\"Asia/Shanghai\")") from None

    profiles = []
    raw_profiles = table.get("profiles", [])
    if not isinstance(raw_profiles, list):
        raise r.fail("profiles", f"must be a list of tables, not {_show(raw_profiles)}")
    allowed = ("msisdn", *POLICY_COLUMNS, *(f for f in profile_fields if f not in POLICY_COLUMNS))
    seen: set[int] = set()
    for k, profile in enumerate(raw_profiles):
        key = f"profiles[{k}]"
        if not isinstance(profile, dict):
            raise r.fail(key, f"must be a table, not {_show(profile)}")
        for name_ in profile:
            if name_ not in allowed:
                tested = ", ".join(profile_fields) or "none"
                raise r.fail(f"{key}.{name_}", f"unknown profile field{_near(name_, allowed)}: neither a policy "
                                               f"column ({', '.join(POLICY_COLUMNS)}) nor a field the rules test "
                                               f"({tested})")
        if "msisdn" not in profile:
            raise r.fail(key, "missing key 'msisdn'")
        msisdn = r.msisdn(f"{key}.msisdn", profile["msisdn"])
        if msisdn in seen:
            raise r.fail(f"{key}.msisdn", f"a second profile for {msisdn}")
        seen.add(msisdn)
        profiles.append(dict(profile))

    expect_raw = table["expect"]
    if not isinstance(expect_raw, list):
        raise r.fail("expect", f"must be a list of tables (expect = [] for none), not {_show(expect_raw)}")
    expect = []
    for k, item in enumerate(expect_raw):
        key = f"expect[{k}]"
        r.table(key, item, EXPECT_KEYS, required=("rule", "msisdn", "channel", "ts"))
        rule = r.text(f"{key}.rule", item["rule"])
        if rule not in rule_ids:
            raise r.fail(f"{key}.rule", f"no rule {rule!r} in {ruleset.source}{_near(rule, rule_ids)}")
        params = item.get("params")
        if params is not None:
            if not isinstance(params, dict):
                raise r.fail(f"{key}.params", f"must be a table, not {_show(params)}")
            params = {p: str(r.integer(f"{key}.params.{p}", v) if not isinstance(v, str) else v)
                      for p, v in params.items()}
        holdout = item.get("holdout")
        if holdout is not None and not isinstance(holdout, bool):
            raise r.fail(f"{key}.holdout", f"must be true or false, not {_show(holdout)}")
        expect.append(Expected(
            rule=rule,
            msisdn=r.msisdn(f"{key}.msisdn", item["msisdn"]),
            channel=r.text(f"{key}.channel", item["channel"]),
            ts=r.time(f"{key}.ts", item["ts"]),
            not_before=r.time(f"{key}.not_before", item["not_before"]) if "not_before" in item else None,
            holdout=holdout,
            params=params,
        ))

    steps_raw = table["steps"]
    if not isinstance(steps_raw, list):
        raise r.fail("steps", f"must be a list, not {_show(steps_raw)}")
    steps = []
    for k, item in enumerate(steps_raw):
        key = f"steps[{k}]"
        r.table(key, item, STEP_KEYS)
        if len(item) != 1:
            raise r.fail(key, "a step is one of { event = {...} }, { feedback = {...} } or { advance = TIME }")
        (kind, value), = item.items()
        key = f"{key}.{kind}"
        if kind == "advance":
            steps.append(Step("advance", key, ts=r.time(key, value)))
        elif kind == "event":
            steps.append(Step("event", key, event=_read_event(r, key, value)))
        else:
            r.table(key, value, FEEDBACK_KEYS, required=("outcome",))
            if ("instruction" in value) == ("id" in value):
                raise r.fail(key, "give one of 'instruction' (the position of an earlier instruction in "
                                  "expect, from 1) or 'id'")
            outcome = r.text(f"{key}.outcome", value["outcome"])
            if outcome not in OUTCOMES:
                raise r.fail(f"{key}.outcome", f"unknown outcome {outcome!r}{_near(outcome, OUTCOMES)} "
                                               f"(outcomes: {', '.join(OUTCOMES)})")
            position = None
            if "instruction" in value:
                position = r.integer(f"{key}.instruction", value["instruction"], 1, max(len(expect), 1))
                if not expect:
                    raise r.fail(f"{key}.instruction", "expect lists no instruction")
            steps.append(Step("feedback", key, instruction=position,
                              id=r.text(f"{key}.id", value["id"]) if "id" in value else None, outcome=outcome,
                              ts=r.time(f"{key}.ts", value["ts"]) if "ts" in value else None))

    stops_raw = table.get("expect_stops", {})
    r.table("expect_stops", stops_raw, tuple(rule_ids))
    stops = {}
    for rule, reasons in stops_raw.items():
        key = f"expect_stops.{rule}"
        r.table(key, reasons, STOP_REASONS)
        stops[rule] = {reason: r.integer(f"{key}.{reason}", n, 0) for reason, n in reasons.items()}

    return Case(source, index, name, r.zone, profiles, steps, expect, stops)


def _read_event(r: _Reader, key: str, value) -> dict[str, int]:
    allowed = ("ts", "msisdn", "kind", *EVENT_FIELDS)
    r.table(key, value, allowed, required=("ts", "msisdn", "kind"))
    kind = r.text(f"{key}.kind", value["kind"])
    if kind not in KIND_CODES:
        raise r.fail(f"{key}.kind", f"unknown kind {kind!r}{_near(kind, KINDS)} (kinds: {', '.join(KINDS)})")
    event = {"ts": r.time(f"{key}.ts", value["ts"]), "msisdn": r.msisdn(f"{key}.msisdn", value["msisdn"]),
             "kind": KIND_CODES[kind]}
    for name in EVENT_FIELDS:
        if name in value:
            info = np.iinfo(COLUMN_DTYPES[name])
            event[name] = r.integer(f"{key}.{name}", value[name], int(info.min), int(info.max))
    return event


def case_files(paths: list[str]) -> list[Path]:
    """The case files named: files as given, directories' *.toml files (below them too), sorted."""
    files = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.toml") if p.is_file())
            if not found:
                raise CaseError(text, None, None, "a directory with no case file (*.toml)")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise CaseError(text, None, None, "no such file or directory")
    return files


# ---------------------------------------------------------------------------
# running and comparing


def run_case(ruleset: RuleSet, case: Case) -> CaseResult:
    """Run one case in a fresh Engine and compare what came out with what it expects."""
    try:
        engine = Engine(ruleset, profiles=_profile_table(case.profiles) if case.profiles else None)
    except (ProfileError, pa.ArrowException) as exc:
        raise CaseError(case.path, case.label, "profiles", str(exc)) from None
    got: list[dict] = []
    notes: list[str] = []
    for step in case.steps:
        if step.kind == "event":
            batch = {name: np.array([v], COLUMN_DTYPES[name]) for name, v in step.event.items()}
            try:
                got.extend(engine.process(batch).to_pylist())
            except ValueError as exc:
                raise CaseError(case.path, case.label, step.key, str(exc)) from None
        elif step.kind == "advance":
            got.extend(engine.advance(step.ts).to_pylist())
        else:
            if step.id is not None:
                instruction_id = step.id
            elif step.instruction <= len(got):
                instruction_id = got[step.instruction - 1]["id"]
            else:
                notes.append(f"{step.key}: feedback on instruction {step.instruction}, but only {len(got)} "
                             f"instruction{'s' if len(got) != 1 else ''} had come by then: not sent")
                continue
            ts = step.ts if step.ts is not None else max(engine.watermark, 0)
            answer = engine.feedback(instruction_id, step.outcome, ts)
            if answer["unknown"]:
                notes.append(f"{step.key}: the engine knows no instruction {instruction_id!r}")
    stats = engine.stats()["rules"]
    stops = {rule: {reason: stats[rule]["stopped"][reason] for reason in reasons}
             for rule, reasons in case.expect_stops.items()}
    result = CaseResult(case, got, stops)
    result.diff = notes + _diff(case, got, stops)
    return result


def _profile_table(profiles: list[dict[str, Any]]) -> pa.Table:
    names = list(dict.fromkeys(name for profile in profiles for name in profile))
    return pa.table({name: [profile.get(name) for profile in profiles] for name in names})


def _params(instruction: dict) -> dict[str, str]:
    params = instruction["params"]
    return dict(params) if isinstance(params, list) else dict(params or {})


def _diff(case: Case, got: list[dict], stops: dict[str, dict[str, int]]) -> list[str]:
    zone = case.zone

    def when(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, zone).isoformat(timespec="milliseconds" if ms % 1000 else
                                                                 "seconds")

    def expected_line(e: Expected) -> str:
        parts = [e.rule, str(e.msisdn), e.channel, when(e.ts)]
        if e.not_before is not None:
            parts.append(f"not_before={when(e.not_before)}")
        if e.holdout is not None:
            parts.append(f"holdout={str(e.holdout).lower()}")
        parts.extend(f"{k}={v}" for k, v in (e.params or {}).items())
        return "  ".join(parts)

    def got_line(g: dict) -> str:
        parts = [g["rule"], str(g["msisdn"]), g["channel"], when(g["ts"])]
        if g["not_before"] != g["ts"]:
            parts.append(f"not_before={when(g['not_before'])}")
        if g["holdout"]:
            parts.append("holdout=true")
        parts.extend(f"{k}={v}" for k, v in _params(g).items())
        return "  ".join(parts)

    lines = []
    for k in range(max(len(case.expect), len(got))):
        n = k + 1
        if k >= len(got):
            lines += [f"instruction {n}: missing", f"    expected  {expected_line(case.expect[k])}",
                      "    got       (nothing)"]
            continue
        g = got[k]
        if k >= len(case.expect):
            lines += [f"instruction {n}: not expected", "    expected  (nothing)", f"    got       {got_line(g)}"]
            continue
        e = case.expect[k]
        fields = []
        for name, want, have, show in (
            ("rule", e.rule, g["rule"], str),
            ("msisdn", e.msisdn, g["msisdn"], str),
            ("channel", e.channel, g["channel"], str),
            ("ts", e.ts, g["ts"], when),
            ("not_before", e.not_before, g["not_before"], when),
            ("holdout", e.holdout, g["holdout"], lambda b: str(b).lower()),
        ):
            if want is not None and want != have:
                fields.append(f"{name}: expected {show(want)}, got {show(have)}")
        have_params = _params(g)
        for name, want in (e.params or {}).items():
            if have_params.get(name) != want:
                fields.append(f"params.{name}: expected {want}, got {have_params.get(name, '(absent)')}")
        if fields:
            lines += [f"instruction {n}: {'; '.join(fields)}", f"    expected  {expected_line(e)}",
                      f"    got       {got_line(g)}"]
    for rule, reasons in case.expect_stops.items():
        for reason, want in reasons.items():
            have = stops[rule][reason]
            if have != want:
                lines.append(f"stops {rule}.{reason}: expected {want}, got {have}")
    return lines


def run_tests(rules: str | Path, paths: list[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`kairos test`: every case of the files (or directories) in `paths` against the rules file `rules`.

    Raises engine.rules.RulesError for a rules file that does not load.  Every
    case file is read before anything runs: one that cannot be used is
    reported on `err` and nothing runs (exit status 2).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    ruleset = load_rules(rules)
    cases: list[Case] = []
    errors = []
    try:
        files = case_files(paths)
    except CaseError as exc:
        print(f"kairos test: {exc}", file=err)
        return EXIT_BAD_CASES
    for path in files:
        try:
            cases.extend(load_cases(path, ruleset))
        except CaseError as exc:
            errors.append(exc)
    for exc in errors:
        print(f"kairos test: {exc}", file=err)
    if errors:
        return EXIT_BAD_CASES
    failed = 0
    for case in cases:
        try:
            result = run_case(ruleset, case)
        except CaseError as exc:
            print(f"kairos test: {exc}", file=err)
            return EXIT_BAD_CASES
        where = f"{case.path}: {case.name}"
        if result.passed:
            print(f"ok    {where}", file=out)
        else:
            failed += 1
            print(f"FAIL  {where}", file=out)
            for line in result.diff:
                print(f"      {line}", file=out)
    passed = len(cases) - failed
    print(f"\n{len(cases)} case{'s' if len(cases) != 1 else ''} from {len(files)} file"
          f"{'s' if len(files) != 1 else ''} against {ruleset.source}: {passed} passed"
          + (f", {failed} failed" if failed else ""), file=out)
    return EXIT_FAILED if failed else EXIT_OK
