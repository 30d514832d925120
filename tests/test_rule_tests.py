"""`kairos test`: the shipped example cases pass, a wrong expectation fails with a diff naming the field,
a malformed case file is refused naming the file, the case and the key."""

# ruff: noqa: E501  (case files are TOML, whose inline tables are one line each)

import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEMO_RULES = str(ROOT / "engine" / "data" / "demo_rules.toml")
EXAMPLES = ROOT / "examples" / "cases"

CAR_OWNER_CASE = """
[[case]]
name = "three hotline calls"
steps = [
  { event = { ts = "2026-12-01T09:00:00+08:00", msisdn = 8613800000003, kind = "call_out", peer = 12122, duration = 120 } },
  { event = { ts = "2026-12-02T09:00:00+08:00", msisdn = 8613800000003, kind = "call_out", peer = 12122, duration = 60 } },
  { event = { ts = 1796346000000, msisdn = 8613800000003, kind = "call_out", peer = 96122, duration = 60 } },
]
expect = [
  { rule = "car_owner_services", msisdn = 8613800000003, channel = "CHANNEL", ts = "2026-12-04T09:00:00+08:00", params = { peer = 96122 } },
]
"""


def write(tmp_path: Path, text: str, name: str = "cases.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_shipped_examples_pass(capsys):
    assert main(["test", DEMO_RULES, str(EXAMPLES)]) == 0
    out = capsys.readouterr().out
    files = sorted(EXAMPLES.glob("*.toml"))
    assert len(files) >= 2
    assert "FAIL" not in out
    assert out.count("\nok    ") + out.startswith("ok    ") >= 6
    assert "passed" in out.splitlines()[-1] and "failed" not in out.splitlines()[-1]


def test_a_case_file_given_by_name_and_int_ms_times(tmp_path, capsys):
    path = write(tmp_path, CAR_OWNER_CASE.replace("CHANNEL", "sms"))
    assert main(["test", DEMO_RULES, str(path)]) == 0
    assert "ok    " in capsys.readouterr().out


def test_a_wrong_expectation_fails_with_a_diff_naming_the_field(tmp_path, capsys):
    path = write(tmp_path, CAR_OWNER_CASE.replace("CHANNEL", "crm"))
    assert main(["test", DEMO_RULES, str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  " in out and "three hotline calls" in out
    assert "instruction 1: channel: expected crm, got sms" in out
    assert "expected  car_owner_services  8613800000003  crm  2026-12-04T09:00:00+08:00" in out
    assert "got       car_owner_services  8613800000003  sms  2026-12-04T09:00:00+08:00" in out
    assert "1 failed" in out.splitlines()[-1]


def test_missing_and_unexpected_instructions_and_stops_are_reported(tmp_path, capsys):
    text = CAR_OWNER_CASE.replace("CHANNEL", "sms").replace("params = { peer = 96122 } },", """params = { peer = 12122 } },
  { rule = "car_owner_services", msisdn = 8613800000003, channel = "sms", ts = "2026-12-05T09:00:00+08:00" },""")
    text += 'expect_stops = { car_owner_services = { cooldown = 2 } }\n'
    assert main(["test", DEMO_RULES, str(write(tmp_path, text))]) == 1
    out = capsys.readouterr().out
    assert "params.peer: expected 12122, got 96122" in out
    assert "instruction 2: missing" in out and "(nothing)" in out
    assert "stops car_owner_services.cooldown: expected 2, got 0" in out


def test_an_unexpected_instruction_is_reported(tmp_path, capsys):
    text = CAR_OWNER_CASE.split("expect = [")[0] + "expect = []\n"
    assert main(["test", DEMO_RULES, str(write(tmp_path, text))]) == 1
    out = capsys.readouterr().out
    assert "instruction 1: not expected" in out and "got       car_owner_services" in out


def test_feedback_by_instruction_position(tmp_path, capsys):
    later = "".join(
        f'  {{ event = {{ ts = "2027-01-{day}T09:00:00+08:00", msisdn = 8613800000003, kind = "call_out", '
        f'peer = 12122, duration = 60 }} }},\n' for day in (10, 11, 12))
    text = CAR_OWNER_CASE.replace("CHANNEL", "sms").replace(
        "]\nexpect = [", '  { feedback = { instruction = 1, outcome = "accepted" } },\n' + later + "]\nexpect = [", 1)
    text += "expect_stops = { car_owner_services = { suppressed = 0 } }\n"
    assert main(["test", DEMO_RULES, str(write(tmp_path, text))]) == 1
    out = capsys.readouterr().out
    # Accepted: past the cooldown, the next three calls match and are suppressed, so nothing more is sent.
    assert "stops car_owner_services.suppressed: expected 0, got 1" in out
    assert "instruction 2" not in out


@pytest.mark.parametrize("change, key, words", [
    (("duration = 120", "durration = 120"), "steps[0].event.durration", "did you mean 'duration'"),
    (('kind = "call_out"', 'kind = "call_ot"'), "steps[0].event.kind", "did you mean 'call_out'"),
    (('channel = "CHANNEL"', 'chanel = "sms"'), "expect[0].chanel", "unknown key"),
    (('rule = "car_owner_services"', 'rule = "car_owner_service"'), "expect[0].rule", "no rule"),
    (('ts = "2026-12-04T09:00:00+08:00"', 'ts = "4 December"'), "expect[0].ts", "not an ISO-8601 time"),
    (('name = "three hotline calls"', 'name = "three hotline calls"\nprofiles = [{ msisdn = 1, opt_outt = true }]'),
     "profiles[0].opt_outt", "did you mean 'opt_out'"),
    (("steps = [", 'expect_stops = { car_owner_services = { cooldwon = 1 } }\nsteps = ['),
     "expect_stops.car_owner_services.cooldwon", "did you mean 'cooldown'"),
    (("steps = [", 'step = []\nsteps = ['), "step", "unknown key"),
    (("steps = [\n", 'steps = [\n  { feedback = { instruction = 3, outcome = "accepted" } },\n'),
     "steps[0].feedback.instruction", "outside"),
    (("steps = [\n", 'steps = [\n  { feedback = { instruction = 1, outcome = "acepted" } },\n'),
     "steps[0].feedback.outcome", "did you mean 'accepted'"),
    (("steps = [\n", 'steps = [\n  { advanse = 1796346000000 },\n'), "steps[0].advanse", "did you mean 'advance'"),
])
def test_a_malformed_case_file_is_refused_naming_file_case_and_key(tmp_path, capsys, change, key, words):
    text = CAR_OWNER_CASE.replace(*change, 1).replace("CHANNEL", "sms")
    assert change[1] in text
    path = write(tmp_path, text, "bad.toml")
    assert main(["test", DEMO_RULES, str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran
    err = captured.err
    assert str(path) in err and "case 1 'three hotline calls'" in err and key in err and words in err, err


def test_unreadable_case_files_exit_2(tmp_path, capsys):
    assert main(["test", DEMO_RULES, str(tmp_path / "nothing.toml")]) == 2
    assert "nothing.toml: no such file or directory" in capsys.readouterr().err
    path = write(tmp_path, "[[case]\nname = 1\n", "broken.toml")
    assert main(["test", DEMO_RULES, str(path)]) == 2
    assert "broken.toml: not valid TOML" in capsys.readouterr().err
    path = write(tmp_path, "[[case]]\nname = \"x\"\nexpect = []\n", "nosteps.toml")
    assert main(["test", DEMO_RULES, str(path)]) == 2
    err = capsys.readouterr().err
    assert "nosteps.toml: case 1 'x': missing key 'steps'" in err
    path = write(tmp_path, "[[case]]\nsteps = []\nexpect = []\n", "noname.toml")
    assert main(["test", DEMO_RULES, str(path)]) == 2
    assert "noname.toml: case 1: missing key 'name'" in capsys.readouterr().err


def test_through_the_console_script(tmp_path):
    good = subprocess.run([sys.executable, "-m", "engine.cli", "test", DEMO_RULES, str(EXAMPLES)],
                          capture_output=True, text=True, cwd=ROOT)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "passed" in good.stdout and "FAIL" not in good.stdout
    bad = write(tmp_path, CAR_OWNER_CASE.replace("CHANNEL", "portal"))
    failing = subprocess.run([sys.executable, "-m", "engine.cli", "test", DEMO_RULES, str(bad)],
                             capture_output=True, text=True, cwd=ROOT)
    assert failing.returncode == 1
    assert "channel: expected portal, got sms" in failing.stdout
