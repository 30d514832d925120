"""Secrets in kairos.toml: KEY, KEY_env or KEY_file for every secret key, refusals that name the key and never
the secret, and no secret in the daemon's log."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from test_daemon import DaemonProcess, config_text

from adapters.channels import make_channel
from engine.config import SECRET_KEYS, ConfigError, Secret, parse_config

SECRET = "s3cr3t-Zq9"

MINIMAL = """
[engine]
rules = "rules.toml"

[inputs.switch]
endpoint = "tcp://127.0.0.1:5555"

[outputs.box]
type = "outbox"
path = "outbox.db"
"""

SMS = """
[channels.sms]
type = "sms"
url = "http://127.0.0.1:13013/cgi-bin/sendsms"
username = "kairos"
from = "10086"
templates = { t = "hello" }
"""


def parse(tmp_path, extra: str = "", channel: str = SMS):
    return parse_config(MINIMAL + extra + channel, "k.toml", tmp_path)


def secret_file(tmp_path, name: str = "pw", text: str = SECRET + "\n", mode: int = 0o600):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_the_secret_keys_are_the_ones_the_channels_and_metrics_read():
    assert set(SECRET_KEYS) == {"password", "token", "dsn"}


@pytest.mark.parametrize("form", ["plain", "env", "file"])
def test_a_channel_secret_given_three_ways_reaches_the_channel_the_same(tmp_path, monkeypatch, form):
    monkeypatch.setenv("KAIROS_TEST_SMS_PASSWORD", SECRET)
    secret_file(tmp_path)
    line = {"plain": f'password = "{SECRET}"', "env": 'password_env = "KAIROS_TEST_SMS_PASSWORD"',
            "file": 'password_file = "pw"'}[form]
    config = parse(tmp_path, channel=SMS + line + "\n")
    options = config.channels["sms"].options
    assert options["password"] == SECRET and isinstance(options["password"], Secret)
    assert not {"password_env", "password_file"} & set(options)
    assert config.warnings == ()
    channel = make_channel("sms", {"type": "sms", **options})
    try:
        assert channel.password == SECRET
    finally:
        channel.close()


def test_the_metrics_token_given_three_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("KAIROS_TEST_TOKEN", SECRET)
    secret_file(tmp_path, "token", SECRET + "\r\n")
    for line in (f'token = "{SECRET}"', 'token_env = "KAIROS_TEST_TOKEN"', 'token_file = "token"'):
        config = parse(tmp_path, f"\n[metrics]\n{line}\n", SMS + 'password = "x"\n')
        assert config.metrics_token == SECRET, line
    assert parse(tmp_path, "\n[metrics]\ntoken = \"\"\n", SMS + 'password = "x"\n').metrics_token is None


def test_a_file_is_relative_to_the_config_and_only_its_trailing_newline_goes(tmp_path):
    (tmp_path / "secrets").mkdir()
    secret_file(tmp_path / "secrets", "db", "postgresql://k:pa ss@db/kairos\n\n")
    config = parse(tmp_path, channel='[channels.crm]\ntype = "crm"\ndsn_file = "secrets/db"\n')
    assert config.channels["crm"].options["dsn"] == "postgresql://k:pa ss@db/kairos"


@pytest.mark.parametrize(("line", "key", "reason"), [
    ('password_env = "KAIROS_TEST_UNSET_VARIABLE"', "channels.sms.password_env",
     "environment variable KAIROS_TEST_UNSET_VARIABLE is not set"),
    ('password_env = "KAIROS_TEST_EMPTY"', "channels.sms.password_env",
     "environment variable KAIROS_TEST_EMPTY is empty"),
    ('password_file = "missing"', "channels.sms.password_file", "cannot read .*missing: No such file"),
    ('password_file = "."', "channels.sms.password_file", "cannot read"),
    ('password_file = "empty"', "channels.sms.password_file", "empty is empty"),
    ('password_env = ""', "channels.sms.password_env", "the name of an environment variable"),
    ('password_file = 3', "channels.sms.password_file", "the path of a file"),
    ('password = "a"\npassword_env = "X"', "channels.sms.password_env",
     "one of password, password_env and password_file, not password and password_env"),
    ('password_env = "X"\npassword_file = "Y"', "channels.sms.password_file", "not password_env and password_file"),
])  # fmt: skip
def test_refusals_name_the_file_and_the_key(tmp_path, monkeypatch, line, key, reason):
    monkeypatch.delenv("KAIROS_TEST_UNSET_VARIABLE", raising=False)
    monkeypatch.setenv("KAIROS_TEST_EMPTY", "")
    secret_file(tmp_path, "empty", "\n")
    with pytest.raises(ConfigError, match=reason) as caught:
        parse(tmp_path, channel=SMS + line + "\n")
    assert caught.value.source == "k.toml" and caught.value.key == key


def test_a_metrics_token_refusal_names_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("KAIROS_TEST_UNSET_VARIABLE", raising=False)
    with pytest.raises(ConfigError, match="is not set") as caught:
        parse(tmp_path, '\n[metrics]\ntoken_env = "KAIROS_TEST_UNSET_VARIABLE"\n', SMS + 'password = "x"\n')
    assert caught.value.key == "metrics.token_env"
    with pytest.raises(ConfigError, match="unknown key") as caught:
        parse(tmp_path, '\n[metrics]\ntoken_path = "x"\n', SMS + 'password = "x"\n')
    assert caught.value.key == "metrics.token_path"


def test_a_refused_secret_is_not_echoed(tmp_path):
    # A secret of the wrong type: the error says so without the value.
    with pytest.raises(ConfigError) as caught:
        parse(tmp_path, channel=SMS + "password = 982451653\n")
    assert caught.value.key == "channels.sms.password" and "982451653" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse(tmp_path, "\n[metrics]\ntoken = 982451653\n", SMS + 'password = "x"\n')
    assert caught.value.key == "metrics.token" and "982451653" not in str(caught.value)
    # A DSN the channel refuses (it may hold a password): the channel's error does not repeat it.
    config = parse(tmp_path, channel=f'[channels.crm]\ntype = "crm"\ndsn = "mysql://k:{SECRET}@db/kairos"\n')
    with pytest.raises(ValueError, match="postgresql://") as refused:
        make_channel("crm", {"type": "crm", **config.channels["crm"].options})
    assert SECRET not in str(refused.value)


def test_a_secret_never_shows_in_a_repr(tmp_path, monkeypatch):
    monkeypatch.setenv("KAIROS_TEST_TOKEN", SECRET)
    config = parse(tmp_path, '\n[metrics]\ntoken_env = "KAIROS_TEST_TOKEN"\n', SMS + f'password = "{SECRET}"\n')
    assert SECRET not in repr(config) and SECRET not in repr(config.channels["sms"])
    assert repr(Secret(SECRET)) == "'<secret>'" and f"{Secret(SECRET)!r}" == "'<secret>'"
    assert str(Secret(SECRET)) == SECRET and Secret(SECRET) == SECRET


def test_a_secret_file_others_may_read_is_used_with_a_warning(tmp_path):
    secret_file(tmp_path, mode=0o644)
    config = parse(tmp_path, channel=SMS + 'password_file = "pw"\n')
    assert config.channels["sms"].options["password"] == SECRET
    ((message, fields),) = config.warnings
    assert message == "secret file readable by others"
    assert fields["key"] == "channels.sms.password_file" and fields["mode"] == "0644"
    assert fields["path"] == str(tmp_path / "pw") and SECRET not in repr(config.warnings)


def test_every_built_in_channel_takes_its_secrets_from_files(tmp_path):
    for name in ("mms_pw", "mms_token", "portal_token"):
        secret_file(tmp_path, name)
    mms = """
type = "mms"
url = "http://127.0.0.1:9/mm7"
vaspid = "v"
vasid = "s"
sender = "10658000"
templates = { t = "hello" }
"""
    config = parse(tmp_path, channel=f"""
[channels.mms]{mms}username = "kairos"
password_file = "mms_pw"

[channels.mms_reports]{mms}token_file = "mms_token"

[channels.portal]
type = "portal"
path = "portal.sqlite"
token_file = "portal_token"
listen = "127.0.0.1:0"
""")
    made = [make_channel(name, {"type": c.type, **c.options}) for name, c in config.channels.items()]
    try:
        mms_auth, mms_reports, portal = made
        assert mms_auth._authorization == "Basic " + base64.b64encode(f"kairos:{SECRET}".encode()).decode()
        assert mms_reports.token == SECRET and portal.token == SECRET
    finally:
        for channel in made:
            channel.close()


RULES = """
[[rule]]
id = "hotline"
on = "call_out"
where = "peer == 12122"
channels = ["sms"]
template = "t"
"""


def daemon_config(tmp_path, metrics: str, sms: str) -> str:
    text = config_text(tmp_path, f'[inputs.switch]\nendpoint = "ipc://{tmp_path}/switch"\n',
                       '[outputs.box]\ntype = "outbox"\npath = "outbox.db"\n')
    text = text.replace('[metrics]\nlisten = "127.0.0.1:0"\n', f'[metrics]\nlisten = "127.0.0.1:0"\n{metrics}\n')
    return text + f"""
[channels.sms]
type = "sms"
url = "http://127.0.0.1:9/cgi-bin/sendsms"
username = "kairos"
from = "10086"
token_env = "KAIROS_TEST_SMS_TOKEN"
{sms}

[channels.sms.templates]
t = "hello"
"""


def test_the_daemon_logs_no_secret_and_warns_about_a_readable_file(tmp_path, monkeypatch):
    metrics_token, sms_token = SECRET + "-metrics", SECRET + "-receiver"
    monkeypatch.setenv("KAIROS_TEST_METRICS_TOKEN", metrics_token)
    monkeypatch.setenv("KAIROS_TEST_SMS_TOKEN", sms_token)
    secret_file(tmp_path, "kannel.pw", mode=0o640)
    daemon = DaemonProcess(tmp_path, daemon_config(tmp_path, 'token_env = "KAIROS_TEST_METRICS_TOKEN"',
                                                   'password_file = "kannel.pw"'), RULES)
    try:
        assert daemon.started["channels"] == {"sms": "sms"}
        (warning,) = [e for e in daemon.logs() if e["msg"] == "secret file readable by others"]
        assert warning["level"] == "warning" and warning["key"] == "channels.sms.password_file"
        assert warning["mode"] == "0640"
    finally:
        assert daemon.stop() == 0
    text = daemon.log_path.read_text()
    for secret in (SECRET, metrics_token, sms_token):
        assert secret not in text


def test_the_daemon_refuses_a_missing_secret_naming_the_key_and_not_starting(tmp_path):
    (tmp_path / "rules.toml").write_text(RULES, encoding="utf-8")
    config = tmp_path / "kairos.toml"
    config.write_text(daemon_config(tmp_path, "", 'password_file = "nowhere/kannel.pw"'), encoding="utf-8")
    env = {**os.environ, "KAIROS_TEST_SMS_TOKEN": SECRET}
    result = subprocess.run([sys.executable, "-m", "engine.cli", "run", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    assert f"{config}: channels.sms.password_file: cannot read {tmp_path}/nowhere/kannel.pw" in result.stderr
    assert SECRET not in result.stderr
