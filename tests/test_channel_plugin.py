"""A third-party channel: a package built here, installed with pip, used by the daemon by name.

Nothing in Kairos names the plug-in: it registers itself in the `kairos.channels` entry-point group,
and the config says `type = "pigeon"`.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import orjson
import pyarrow as pa
import pytest
from channel_testing import wait_until
from test_daemon import DaemonProcess, Sockets, arrow_message, config_text

from adapters.channels import channel_kinds

PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "kairos-pigeon-channel"
version = "0.1.0"

[project.entry-points."kairos.channels"]
pigeon = "kairos_pigeon_channel:PigeonChannel"

[tool.setuptools]
packages = ["kairos_pigeon_channel"]
"""

PLUGIN_MODULE = '''
"""A channel that sends instructions by pigeon: one JSON line per instruction in `loft`."""

import json
import threading
import time

from adapters.channels.base import Channel


class PigeonChannel(Channel):
    kind = "pigeon"

    def __init__(self, name, loft):
        self.name = name
        self.loft = loft
        self.lock = threading.Lock()
        self.feedback = None

    @classmethod
    def from_config(cls, name, options):
        options = dict(options)
        loft = options.pop("loft")
        if options:
            raise ValueError(f"channel {name!r}: unknown key(s) {sorted(options)}")
        return cls(name, loft)

    def start(self, feedback):
        self.feedback = feedback

    def deliver(self, instruction):
        with self.lock, open(self.loft, "a", encoding="utf-8") as loft:
            loft.write(json.dumps({"id": instruction.id, "msisdn": instruction.msisdn, "by": "pigeon"}) + "\\n")
        self.feedback(instruction.id, "delivered", int(time.time() * 1000))
'''

RULES = """
[[rule]]
id = "hotline"
on = "call_out"
where = "peer == 12122"
channels = ["carrier"]
template = "t"
cooldown = "0s"
"""


@pytest.fixture(scope="module")
def pigeon_installed(tmp_path_factory):
    source = tmp_path_factory.mktemp("pigeon")
    (source / "pyproject.toml").write_text(PLUGIN_PYPROJECT, encoding="utf-8")
    (source / "kairos_pigeon_channel").mkdir()
    (source / "kairos_pigeon_channel" / "__init__.py").write_text(textwrap.dedent(PLUGIN_MODULE), encoding="utf-8")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # No build isolation and no index: the test's venv has setuptools, and needs no network.
    subprocess.run([*pip, "install", "--no-build-isolation", "--no-deps", "--no-index", str(source)], check=True,
                   capture_output=True, timeout=300)
    try:
        yield
    finally:
        subprocess.run([*pip, "uninstall", "-y", "kairos-pigeon-channel"], check=True, capture_output=True,
                       timeout=300)


def test_an_installed_plugin_channel_receives_instructions_from_the_daemon(tmp_path, batch, pigeon_installed):
    assert channel_kinds()["pigeon"] == "kairos_pigeon_channel:PigeonChannel"
    loft = tmp_path / "loft.jsonl"
    inputs = f'[inputs.switch]\nendpoint = "ipc://{tmp_path}/switch"\n'
    outputs = '[outputs.box]\ntype = "outbox"\npath = "outbox.db"\n'
    # The events are dated 1970 (ts 1_000): a long max_age keeps their instructions valid (default: a day).
    channels = f'[channels.carrier]\ntype = "pigeon"\nloft = "{loft}"\nmax_age = "36500d"\n'
    daemon = DaemonProcess(tmp_path, config_text(tmp_path, inputs, outputs) + channels, RULES)
    sockets = Sockets()
    try:
        assert daemon.started["channels"] == {"carrier": "pigeon"}
        feeder = sockets.push(f"ipc://{tmp_path}/switch")
        for ts, msisdn in ((1_000, 8613800000001), (2_000, 8613800000002)):
            feeder.send(arrow_message(pa.RecordBatch.from_pydict(
                batch([{"ts": ts, "msisdn": msisdn, "kind": 0, "peer": 12122}]))))
        wait_until(lambda: loft.exists() and len(loft.read_bytes().splitlines()) == 2, timeout=30)
        daemon.wait_for_metric("kairos_channel_feedback_reports_total", 2, channel="carrier", result="applied")
        assert daemon.stop() == 0
    finally:
        daemon.stop()
        sockets.close()
    lines = [orjson.loads(line) for line in loft.read_bytes().splitlines()]
    assert sorted((line["msisdn"], line["by"]) for line in lines) == [
        (8613800000001, "pigeon"), (8613800000002, "pigeon")]
