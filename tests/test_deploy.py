"""deploy/: the systemd unit, the alert rules and the dashboard, checked with the real tools and a real daemon.

- The unit is checked with `systemd-analyze verify` (systemd's own parser: unknown keys,
  bad values, missing executables).  The unit names /opt/kairos/.venv/bin/kairos, which
  does not exist on a build machine, so a copy pointing at this checkout's `kairos` is
  verified; every other line is the shipped one.
- The alert rules are checked with `promtool check rules`; promtool comes from Debian's
  `prometheus` package, installed with apt-get when missing (like tests/kannel.py).
- Every metric the alerts and the dashboard name must be one a running daemon exports:
  a daemon with a state_dir (journal and checkpoint metrics), an outbox and a file
  channel (outbox and channel metrics) is started and /metrics scraped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_daemon import DaemonProcess, config_text

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "kairos.service"
ALERTS = DEPLOY / "prometheus" / "kairos-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "kairos-dashboard.json"
INSTALLED_KAIROS = "/opt/kairos/.venv/bin/kairos"

# Series Prometheus makes itself, not the daemon.
PROMETHEUS_OWN = {"up"}
_METRIC = re.compile(r"\bkairos_[a-zA-Z0-9_:]*")

HOTLINE = """
[[rule]]
id = "hotline"
on = "call_out"
where = "peer == 12122"
channels = ["sms"]
template = "t"
cooldown = "0s"
"""


def ensure_tool(tool: str, package: str) -> str:
    """A tool's path, installing the Debian package that ships it when it is missing."""
    found = shutil.which(tool)
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.fail(f"{tool} is missing and there is no apt-get to install it (Debian: {package})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    if subprocess.run(command, env=env, capture_output=True).returncode != 0:
        # The package lists may be missing or stale on a fresh machine: refresh them once and try again.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(command, env=env, capture_output=True, check=True)
    found = shutil.which(tool)
    if not found:
        pytest.fail(f"Debian's {package} package installed no {tool}")
    return found


def ensure_promtool() -> str:
    return ensure_tool("promtool", "prometheus")


def alert_rules() -> list[dict]:
    """Each alert's name, expr, severity and annotation keys, read from the rules file.

    No YAML library is a dependency of Kairos: this reads the plain block layout the file uses
    (`- alert:`, `expr:` inline or as a `|` block, `severity:`, annotation keys); promtool
    parses the file for real in test_alert_rules_pass_promtool.
    """
    rules: list[dict] = []
    lines = ALERTS.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        indent = len(lines[i]) - len(lines[i].lstrip())
        if stripped.startswith("- alert:"):
            rules.append({"alert": stripped.split(":", 1)[1].strip(), "annotations": set()})
        elif rules and stripped.startswith("expr:"):
            value = stripped.split(":", 1)[1].strip()
            if value == "|":
                block = []
                while i + 1 < len(lines) and (not lines[i + 1].strip()
                                              or len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent):
                    i += 1
                    block.append(lines[i].strip())
                value = "\n".join(block)
            rules[-1]["expr"] = value
        elif rules and stripped.startswith("severity:"):
            rules[-1]["severity"] = stripped.split(":", 1)[1].strip()
        elif rules and re.match(r"(summary|description):\s*\S", stripped):
            rules[-1]["annotations"].add(stripped.split(":", 1)[0])
        i += 1
    return rules


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            expressions.append(query["query"] if isinstance(query, dict) else query)
    return expressions


def metric_names(expression: str) -> set[str]:
    names = set(_METRIC.findall(expression))
    names |= {name for name in PROMETHEUS_OWN if re.search(rf"\b{name}\b\s*[{{\[=<>!]", expression)}
    return names


# ---------------------------------------------------------------------------
# systemd


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = ensure_tool("systemd-analyze", "systemd")
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(INSTALLED_KAIROS) == 2  # ExecStartPre and ExecStart
    kairos = shutil.which("kairos", path=str(ROOT / ".venv" / "bin")) or shutil.which("kairos")
    assert kairos, "no kairos executable to point the unit's ExecStart at"
    unit = tmp_path / "kairos.service"
    unit.write_text(text.replace(INSTALLED_KAIROS, kairos), encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    # verify only warns about an unknown key or a bad value ("..., ignoring") and exits 0: any line
    # about this unit is a failure.
    about_unit = [line for line in output.splitlines() if "kairos.service" in line]
    assert result.returncode == 0 and not about_unit, output


def test_unit_runs_the_daemon_as_the_deployment_says():
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    assert keys["ExecStart"] == [f"{INSTALLED_KAIROS} run -c /etc/kairos/kairos.toml"]
    assert keys["ExecStartPre"] == [f"{INSTALLED_KAIROS} run --check -c /etc/kairos/kairos.toml"]
    assert keys["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert keys["KillSignal"] == ["SIGTERM"]
    assert keys["Restart"] == ["on-failure"]
    assert keys["User"] == ["kairos"]
    assert keys["StateDirectory"] == ["kairos"]
    assert keys["NoNewPrivileges"] == ["yes"] and keys["ProtectSystem"] == ["strict"]
    assert keys["PrivateTmp"] == ["yes"]
    assert set(keys["ReadWritePaths"][0].split()) >= {"/var/lib/kairos", "/var/log/kairos"}
    assert int(keys["LimitNOFILE"][0]) >= 4096
    # shutdown_timeout (8 s by default) of draining, then the final checkpoint, before SIGKILL.
    assert int(keys["TimeoutStopSec"][0]) >= 30


# ---------------------------------------------------------------------------
# Prometheus


def test_alert_rules_pass_promtool():
    result = subprocess.run([ensure_promtool(), "check", "rules", str(ALERTS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_cover_what_an_operator_must_hear_of():
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert len(names) == len(rules)
    assert len(rules) == len(re.findall(r"^\s*- alert:", ALERTS.read_text(encoding="utf-8"), re.M)) >= 10
    used = set().union(*(metric_names(rule["expr"]) for rule in rules))
    assert {"up", "kairos_events_total", "kairos_input_messages_total", "kairos_dead_letters_total",
            "kairos_input_sequence_missing_total", "kairos_outbox_instructions", "kairos_channel_parked_total",
            "kairos_checkpoints_total", "kairos_checkpoint_position", "kairos_journal_position",
            "kairos_journal_torn_bytes", "kairos_output_backpressure_total", "kairos_rule_paused"} <= used
    for rule in rules:
        assert rule.get("severity") in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"] == {"summary", "description"}, rule["alert"]


# ---------------------------------------------------------------------------
# Every metric named is one the daemon exports


def exported_series(exposition: str) -> set[str]:
    """The series names an exposition can hold: each family's, with the suffixes its type adds."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            # A counter's TYPE name already ends in _total (text format 0.0.4 as engine/metrics.py writes it).
            names |= {f"{name}{s}" for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def scrape(tmp_path_factory):
    """/metrics of a daemon with durable state, an outbox and a file channel."""
    directory = tmp_path_factory.mktemp("deploy-daemon")
    config = config_text(
        directory, f'[inputs.switch]\nendpoint = "ipc://{directory}/switch"\n',
        outputs='[outputs.box]\ntype = "outbox"\npath = "outbox.db"\n\n'
                '[channels.sms]\ntype = "file"\npath = "sent.jsonl"\n',
        extra='state_dir = "state"\n')
    daemon = DaemonProcess(directory, config, HOTLINE)
    try:
        status, text = daemon.get("/metrics")
        assert status == 200
    finally:
        assert daemon.stop() == 0
    return text


def test_scrape_holds_the_families_the_deployment_relies_on(scrape):
    exported = exported_series(scrape)
    for family in ("kairos_journal_position", "kairos_checkpoint_position", "kairos_outbox_instructions",
                   "kairos_channel_parked_total", "kairos_batch_latency_seconds_bucket", "kairos_rule_paused"):
        assert family in exported, family


def test_alerts_name_only_metrics_the_daemon_exports(scrape):
    exported = exported_series(scrape) | PROMETHEUS_OWN
    unknown = {rule["alert"]: sorted(metric_names(rule["expr"]) - exported) for rule in alert_rules()}
    assert not {alert: names for alert, names in unknown.items() if names}
    assert all(metric_names(rule["expr"]) for rule in alert_rules())


def test_dashboard_names_only_metrics_the_daemon_exports(scrape):
    exported = exported_series(scrape)
    expressions = dashboard_expressions()
    assert len(expressions) > 20
    unknown = {expr: sorted(metric_names(expr) - exported) for expr in expressions}
    assert not {expr: names for expr, names in unknown.items() if names}
    assert all(metric_names(expr) for expr in expressions)


def test_dashboard_is_importable_with_a_prometheus_input():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]


def test_scrape_passes_promtool_check_metrics(scrape):
    """promtool's exposition parser must accept the scrape; its lint findings are reported, not failed on.

    A parse error (a line Prometheus could not ingest) fails: promtool prints "error while
    linting" and exits 1.  Lint findings exit 3 and are naming advice (today one:
    `kairos_event_time_watermark_ms` "should not contain abbreviated units") about names
    that docs/daemon.md documents and dashboards and alerts already use: renaming a metric
    breaks them, so they are printed, not failed on.
    """
    result = subprocess.run([ensure_promtool(), "check", "metrics"], input=scrape,
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    print(output)
    assert "error while linting" not in output, output
    assert result.returncode in (0, 3), output
