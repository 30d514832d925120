"""kairos.toml: defaults, paths, and refusals that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, load_config, parse_config

MINIMAL = """
[engine]
rules = "rules.toml"

[inputs.switch]
endpoint = "tcp://127.0.0.1:5555"

[outputs.file]
type = "file"
path = "out"
"""


def test_minimal_config_gets_documented_defaults(tmp_path):
    config = parse_config(MINIMAL, "k.toml", tmp_path)
    assert config.rules == tmp_path / "rules.toml"
    (switch,) = config.inputs
    assert (switch.name, switch.socket, switch.bind, switch.format, switch.role) == (
        "switch", "pull", True, "arrow", "events")
    assert switch.rcvhwm == 1000 and switch.max_message_bytes == 16 << 20
    assert config.max_batch_events == 65_536 and config.linger_ms == 5 and config.idle_advance_ms == 1_000
    assert (config.metrics_host, config.metrics_port) == ("127.0.0.1", 9464)
    assert config.deadletter_dir == tmp_path / "deadletter"
    assert config.outputs == {"file": {"type": "file", "path": str(tmp_path / "out")}}
    assert config.state_dir is None and config.timezone is None


def test_the_example_config_in_the_repository_parses():
    example = Path(__file__).resolve().parent.parent / "examples" / "kairos.toml"
    config = load_config(example)
    assert config.rules.exists()
    assert {i.format for i in config.inputs} == {"arrow", "msgpack", "ndjson"}
    assert config.state_dir is not None


def test_paths_resolve_against_the_config_directory(tmp_path):
    path = tmp_path / "etc" / "kairos.toml"
    path.parent.mkdir()
    path.write_text(MINIMAL + '\n[deadletter]\npath = "/var/spool/dead"\n', encoding="utf-8")
    config = load_config(path)
    assert config.rules == tmp_path / "etc" / "rules.toml"
    assert config.deadletter_dir == Path("/var/spool/dead")


def test_all_sections(tmp_path):
    text = MINIMAL + """
[batching]
max_events = 1000
linger = "20ms"
idle_advance = "2s"

[metrics]
listen = "127.0.0.1:0"
token = "s3cret"

[log]
level = "debug"

[inputs.signalling]
endpoint = "ipc:///tmp/kairos-sig"
socket = "sub"
bind = false
format = "msgpack"
subscribe = ["loc"]
columns = ["ts", "msisdn", "kind", "cell", "mcc"]
fields = { ts = { from = "time", scale = 1000 } }
"""
    config = parse_config(text, "k.toml", tmp_path)
    assert (config.max_batch_events, config.linger_ms, config.idle_advance_ms) == (1000, 20, 2000)
    assert (config.metrics_port, config.metrics_token, config.log_level) == (0, "s3cret", "debug")
    sig = config.inputs[1]
    assert (sig.socket, sig.bind, sig.format, sig.subscribe) == ("sub", False, "msgpack", ("loc",))
    assert sig.columns == ("ts", "msisdn", "kind", "cell", "mcc")
    assert sig.fields == {"ts": {"from": "time", "scale": 1000}}


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        (("[inputs.switch]", "[inputs.switch]\nformt = \"arrow\""), "inputs.switch.formt", "unknown key"),
        (("[inputs.switch]", "[inputs.switch]\nformat = \"xml\""), "inputs.switch.format", "is not one of"),
        (("[inputs.switch]", "[inputs.switch]\nrcvhwm = 0"), "inputs.switch.rcvhwm", "at least 1"),
        (("[inputs.switch]", "[inputs.switch]\nbind = 1"), "inputs.switch.bind", "true or false"),
        (("[inputs.switch]", "[inputs.switch]\nsubscribe = [\"a\"]"), "inputs.switch.subscribe", "only a sub"),
        (("127.0.0.1:5555", "0.0.0.0:5555"), "inputs.switch.endpoint", "allow_remote"),
        (("rules = \"rules.toml\"", ""), "engine.rules", "required"),
        (("[engine]", "[engine]\nrulez = 1"), "engine.rulez", "unknown key"),
        (("[outputs.file]\ntype = \"file\"", "[outputs.file]"), "outputs.file.type", "required"),
        (("[engine]", "[batching]\nlinger = \"5 minutes\"\n[engine]"), "batching.linger", "duration"),
        (("[engine]", "[metrics]\nlisten = \"9464\"\n[engine]"), "metrics.listen", "HOST:PORT"),
        (("[engine]", "[speed]\nfast = true\n[engine]"), "speed", "unknown key"),
        (("[inputs.switch]", "[inputs.switch]\nrole = \"feedback\"\nfields = { ts = \"t\" }"),
         "inputs.switch.fields", "a feedback input"),
    ],
)
def test_refusals_name_the_file_and_key(tmp_path, change, key, reason):
    text = MINIMAL.replace(*change, 1)
    with pytest.raises(ConfigError) as err:
        parse_config(text, "site/kairos.toml", tmp_path)
    assert err.value.key == key
    assert reason in err.value.reason
    assert str(err.value).startswith(f"site/kairos.toml: {key}: ")


def test_inputs_and_outputs_are_required_and_endpoints_unique(tmp_path):
    no_output = MINIMAL.split("[outputs.file]")[0]
    with pytest.raises(ConfigError, match="at least one output"):
        parse_config(no_output, "k.toml", tmp_path)
    only_feedback = MINIMAL.replace('endpoint = "tcp', 'role = "feedback"\nendpoint = "tcp')
    with pytest.raises(ConfigError, match="role = \"events\""):
        parse_config(only_feedback, "k.toml", tmp_path)
    twice = MINIMAL + '\n[inputs.again]\nendpoint = "tcp://127.0.0.1:5555"\n'
    with pytest.raises(ConfigError, match="share an endpoint"):
        parse_config(twice, "k.toml", tmp_path)


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[engine", "k.toml", tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_connecting_to_a_remote_feeder_needs_no_permission(tmp_path):
    text = MINIMAL.replace("127.0.0.1:5555", "10.1.2.3:5555")
    text = text.replace("[inputs.switch]", "[inputs.switch]\nbind = false")
    assert parse_config(text, "k.toml", tmp_path).inputs[0].endpoint == "tcp://10.1.2.3:5555"


def test_remote_endpoint_needs_allow_remote(tmp_path):
    text = MINIMAL.replace("127.0.0.1:5555", "0.0.0.0:5555").replace(
        "[inputs.switch]", "[inputs.switch]\nallow_remote = true")
    assert parse_config(text, "k.toml", tmp_path).inputs[0].allow_remote


WITH_CHANNEL = MINIMAL.replace('[outputs.file]\ntype = "file"\npath = "out"',
                               '[outputs.box]\ntype = "outbox"\npath = "o.db"') + """
[channels.sms]
type = "file"
"""


def test_channel_retries_end_by_max_age_by_default_with_no_attempt_cap(tmp_path):
    sms = parse_config(WITH_CHANNEL, "k.toml", tmp_path).channels["sms"]
    assert (sms.max_age_ms, sms.max_attempts) == (86_400_000, 0)
    sms = parse_config(WITH_CHANNEL + 'max_age = "6h"\nmax_attempts = 25\n', "k.toml", tmp_path).channels["sms"]
    assert (sms.max_age_ms, sms.max_attempts) == (6 * 3_600_000, 25)
    assert "max_age" not in sms.options and "max_attempts" not in sms.options  # the worker's keys, not the channel's


@pytest.mark.parametrize(("extra", "reason"), [
    ('max_age = "0s"\n', "longer than 0ms"),
    ('max_age = "a while"\n', "duration"),
    ("max_age = 3600\n", "expected a string"),
    ("max_attempts = -1\n", "0 (no limit) or more"),
])  # fmt: skip
def test_channel_max_age_and_max_attempts_refusals_name_the_key(tmp_path, extra, reason):
    with pytest.raises(ConfigError) as err:
        parse_config(WITH_CHANNEL + extra, "k.toml", tmp_path)
    assert err.value.key == f"channels.sms.{extra.split(' =')[0]}"
    assert reason in err.value.reason
