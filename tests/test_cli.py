"""The kairos command line: demo on the embedded default, check on good and bad files."""

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
