"""The kairos command line: demo on the embedded default, check on good and bad files."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from engine.cli import main

BAD_RULES = """
[[rule]]
id = "typo"
on = "call_out"
where = "duraton > 5"
channels = ["sms"]
"""


def test_demo_runs_on_the_embedded_default_and_reports_every_rule(capsys):
    assert main(["demo", "--subscribers", "5000", "--events", "300000", "--batch-size", "50000"]) == 0
    out = capsys.readouterr().out
    assert "300,000" in out and "events/s" in out
    for rule in ("roaming_pack_hk_macau", "car_owner_services", "new_handset_data_plan",
                 "low_balance_recharge", "bank_caller_card_offer"):
        assert rule in out
    assert "Sample instructions" in out and "(none)" not in out
    assert "holdout" in out and "capped" in out  # the demo campaigns run under the contact policy


def _demo_table(out: str, first_header: str) -> dict[str, dict[str, str]]:
    """The rows of the demo's last table whose header starts with `first_header`, keyed by the first cell."""
    lines = out.splitlines()
    start = max(k for k, line in enumerate(lines) if line.split() and line.split()[0] == first_header)
    headers = lines[start].split()
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("  ") or line.startswith("  ("):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = dict(zip(headers, cells, strict=True))
    return rows


def _number(cell: str) -> int:
    """A cell of the demo's tables: "1,234", or "a -> b" for a change (b)."""
    return int(cell.rpartition("->")[2].strip().replace(",", ""))


def test_demo_delivers_through_portal_and_crm_and_applies_their_feedback(capsys):
    assert main(["demo", "--subscribers", "5000", "--events", "300000", "--batch-size", "50000"]) == 0
    out = capsys.readouterr().out
    assert "Per rule" in out and "Sample instructions" in out  # the engine's half is still there, before
    channels = _demo_table(out, "channel")
    assert {"portal", "crm", "sms"} <= set(channels)
    assert (channels["portal"]["type"], channels["crm"]["type"], channels["sms"]["type"]) == ("portal", "crm", "file")
    for name in ("portal", "crm", "sms"):
        row = channels[name]
        assert _number(row["delivered"]) > 0 and _number(row["parked"]) == 0 and _number(row["waiting"]) == 0
        assert _number(row["delivered"]) + _number(row["holdout"]) == _number(row["instructions"])
        assert float(row["instructions/s"].replace(",", "")) > 0
    assert _number(channels["sms"]["holdout"]) > 0  # low_balance_recharge's control group is recorded, not sent

    # The closed loop over HTTP: answers as the APIs give them.
    assert re.search(r"portal  GET  http://127\.0\.0\.1:\d+/subscribers/\d+/offers -> 200, [1-9]\d* pending", out)
    assert "response accepted -> 200, offer accepted" in out
    assert "409, held by hall-3-desk-2" in out
    assert "outcome considering by hall-3-desk-2 -> 200, offer considering" in out
    assert "outcome declined by call-centre-7 -> 200, offer declined" in out

    applied = re.search(r"Engine\.feedback: ([\d,]+) applied, 0 unknown id, 0 invalid outcome", out)
    assert applied and _number(applied.group(1)) > 0
    feedback = _demo_table(out, "rule")  # the last table that starts with "rule": the engine's feedback counts
    portal_rule, crm_rule = feedback["roaming_call_pack"], feedback["bank_caller_card_offer"]
    assert portal_rule["accepted"] == "0 -> 1"
    assert (crm_rule["considering"], crm_rule["declined"]) == ("0 -> 1", "0 -> 1")
    assert sum(_number(row["delivered"]) for row in feedback.values()) == _number(channels["sms"]["delivered"])

    # Everything lived in a temporary directory that is gone.
    directory = re.search(r"outbox and channels in (\S+) \(removed at the end\)", out).group(1)
    assert directory and not Path(directory).exists()


def test_demo_delivers_a_subset_when_asked(capsys):
    assert main(["demo", "--subscribers", "5000", "--events", "300000", "--batch-size", "50000",
                 "--deliver", "3"]) == 0
    out = capsys.readouterr().out
    assert "(a subset: the first 3 instructions of each channel" in out
    channels = _demo_table(out, "channel")
    assert all(_number(row["instructions"]) == 3 for row in channels.values())
    assert _number(channels["portal"]["delivered"]) == 3


def test_check_explains_a_good_file(capsys):
    assert main(["check", "engine/data/bench_rules.toml"]) == 0
    out = capsys.readouterr().out
    assert "count: at least 3 within 30d" in out
    assert "policy: pushes on sms, mms: 1 per day and 4 per month per subscriber" in out
    assert "policy: quiet hours 21:00-08:00 local" in out
    assert "holdout    10% of subscribers" in out
    assert "guardrail  paused after more than 100,000 instructions within an hour" in out
    assert "goal       recharge within 1d of the instruction" in out
    assert out.rstrip().endswith("OK")


def test_check_refuses_a_bad_file_naming_file_rule_and_text(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_RULES)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'typo'" in err and "duraton > 5" in err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "kairos"
    command = [str(script)] if script.exists() else [shutil.which("kairos") or "kairos"]
    result = subprocess.run([*command, "check", "engine/data/demo_rules.toml"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "roaming_pack_hk_macau" in result.stdout
