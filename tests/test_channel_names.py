"""Channel names in rules: `kairos check` warns about a name no channel type has, and the daemon refuses a rule
naming a channel its config lacks (at start, before any state is restored, and at a reload), unless told to warn."""

from __future__ import annotations

import logging
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

import engine.explain
from engine.cli import main
from engine.config import ConfigError, load_config
from engine.daemon import Daemon
from engine.explain import rule_warnings
from engine.rules import parse_rules


def rules(*channels: str, shadow: bool = False, rule_id: str = "promo") -> str:
    names = ", ".join(f'"{c}"' for c in channels)
    return (f'[[rule]]\nid = "{rule_id}"\non = "call_out"\nwhere = "peer == 12122"\nchannels = [{names}]\n'
            f'template = "t"\n' + ("shadow = true\n" if shadow else ""))


def warnings_of(*channels: str) -> list[str]:
    return rule_warnings(parse_rules(rules(*channels)).rules[0])


# ---------------------------------------------------------------------------
# kairos check


def test_a_channel_name_no_channel_type_has_is_warned_about():
    (warning,) = warnings_of("sms", "smss")
    assert warning.startswith("channel smss is neither a built-in channel (sms, mms, portal, crm, file, stdout) "
                              "nor an installed plug-in's")
    assert "[channels.smss]" in warning


def test_built_in_channels_are_not_warned_about():
    assert warnings_of("sms", "mms", "portal", "crm", "file", "stdout") == []


def test_a_registered_plug_in_is_not_warned_about(monkeypatch):
    points = [EntryPoint("pigeon", "pigeon_channel:PigeonChannel", "kairos.channels")]
    monkeypatch.setattr(engine.explain, "entry_points",
                        lambda group: points if group == "kairos.channels" else [])
    assert warnings_of("pigeon", "sms") == []
    assert len(warnings_of("raven")) == 1


def test_kairos_check_prints_the_warning_and_exits_0(tmp_path, capsys):
    path = tmp_path / "rules.toml"
    path.write_text(rules("smss"))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  warning    channel smss is neither a built-in channel" in out
    assert out.rstrip().endswith("OK, 1 warning")


# ---------------------------------------------------------------------------
# The daemon


def write_config(tmp_path, rules_text: str, *, engine: str = "", outbox: bool = True) -> object:
    (tmp_path / "rules.toml").write_text(rules_text, encoding="utf-8")
    outputs = ('[outputs.box]\ntype = "outbox"\npath = "outbox.db"\n\n[channels.sms]\ntype = "file"\n'
               'path = "sent.jsonl"\n\n[channels.portal]\ntype = "file"\npath = "portal.jsonl"\n') if outbox else (
        '[outputs.out]\ntype = "file"\npath = "out"\n')
    path = tmp_path / "kairos.toml"
    path.write_text(f"""
[engine]
rules = "rules.toml"
state_dir = "state"
initial_subscribers = 1024
{engine}

[metrics]
listen = "127.0.0.1:0"

[deadletter]
path = "dead"

[inputs.switch]
endpoint = "ipc://{tmp_path}/switch"

{outputs}
""", encoding="utf-8")
    return load_config(path)


@pytest.fixture
def no_restore(monkeypatch):
    """Fail a test whose daemon gets as far as loading (or restoring) the engine's state."""
    def refuse(self):
        raise AssertionError("the state was loaded before the channels were checked")
    monkeypatch.setattr(Daemon, "_load_engine", refuse)


def test_a_rule_naming_an_unconfigured_channel_refuses_the_start_before_any_state(tmp_path, no_restore):
    config = write_config(tmp_path, rules("sms") + rules("smss", "portal", "fax", rule_id="typo"))
    with pytest.raises(ConfigError) as caught:
        Daemon(config)
    error = caught.value
    assert error.source == str(tmp_path / "rules.toml") and error.key == "rule 'typo'"
    assert str(error).startswith(f"{tmp_path / 'rules.toml'}: rule 'typo': channel 'smss' is not configured: "
                                 f"{tmp_path / 'kairos.toml'} has no [channels.smss] (configured: sms, portal)")
    assert "also rule 'typo': channel 'fax'" in str(error)
    assert 'unconfigured_channels = "warn"' in str(error)


def test_kairos_run_refuses_it_with_exit_status_2(tmp_path):
    config = write_config(tmp_path, rules("smss"))
    result = subprocess.run([sys.executable, "-m", "engine.cli", "run", "-c", config.source],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"{tmp_path / 'rules.toml'}: rule 'promo': channel 'smss' is not configured" in result.stderr


def test_the_daemon_checks_names_only_when_there_is_an_outbox(tmp_path):
    config = write_config(tmp_path, rules("smss"), outbox=False)
    Daemon(config)._close()


def test_a_shadow_rule_sends_nothing_and_is_not_refused(tmp_path):
    config = write_config(tmp_path, rules("sms") + rules("smss", shadow=True, rule_id="forecast"))
    Daemon(config)._close()


def test_unconfigured_channels_warn_starts_and_logs_each_channel(tmp_path, caplog):
    config = write_config(tmp_path, rules("smss", "sms", "fax"), engine='unconfigured_channels = "warn"')
    assert config.unconfigured_channels == "warn"
    with caplog.at_level(logging.WARNING, logger="kairos.daemon"):
        Daemon(config)._close()
    found = [(r.fields["rule"], r.fields["channel"]) for r in caplog.records
             if r.getMessage().startswith("rule names a channel that is not configured")]
    assert found == [("promo", "smss"), ("promo", "fax")]


def test_unconfigured_channels_takes_refuse_or_warn(tmp_path):
    assert write_config(tmp_path, rules("sms")).unconfigured_channels == "refuse"
    with pytest.raises(ConfigError, match="'ignore' is not one of refuse, warn") as caught:
        write_config(tmp_path, rules("sms"), engine='unconfigured_channels = "ignore"')
    assert caught.value.key == "engine.unconfigured_channels"


def test_a_reload_naming_an_unconfigured_channel_is_refused(tmp_path):
    config = write_config(tmp_path, rules("sms"))
    daemon = Daemon(config)
    try:
        (tmp_path / "rules.toml").write_text(rules("sms", "smss"), encoding="utf-8")
        future = daemon.request_reload()
        daemon.turn()
        ok, message = future.result(timeout=10)
        assert not ok and "rule 'promo': channel 'smss' is not configured" in message
        assert daemon.reloads == {"ok": 0, "refused": 1}
        assert daemon.engine.ruleset.rules[0].channels == ("sms",)  # the old rules keep running
        (tmp_path / "rules.toml").write_text(rules("sms", "portal"), encoding="utf-8")
        future = daemon.request_reload()
        daemon.turn()
        assert future.result(timeout=10)[0] and daemon.reloads == {"ok": 1, "refused": 1}
    finally:
        daemon._close()
