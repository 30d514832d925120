"""A real Kannel SMS gateway for the tests: bearerbox, smsbox and the fake SMSC, on loopback.

`kannel` (a session-scoped fixture, see conftest.py) installs Debian's `kannel` and `kannel-extras`
when the binaries are missing (CI runs as root), writes a config into a temporary directory, starts
bearerbox, then fakesmsc (its stdin a fifo kept open, so mobile-originated lines can be injected), then
smsbox, each on a free loopback port, and waits until the gateway answers.  Messages the SMSC
receives are read back from fakesmsc's output ("Got message N: FROM TO TYPE TEXT").
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

BEARERBOX = "/usr/sbin/bearerbox"
SMSBOX = "/usr/sbin/smsbox"
FAKESMSC = "/usr/lib/kannel/test/fakesmsc"
START_SECONDS = 30.0

USERNAME = "kairos"
PASSWORD = "sendsecret"
ADMIN_PASSWORD = "adminsecret"

_GOT_MESSAGE = re.compile(r"Got message \d+: <(.*)>$")


def ensure_installed() -> None:
    """Install Kannel from Debian's packages when a binary is missing; quick when it is there."""
    if all(os.access(p, os.X_OK) for p in (BEARERBOX, SMSBOX, FAKESMSC)):
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError("Kannel is missing and there is no apt-get to install it (Debian: kannel kannel-extras)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "kannel", "kannel-extras"]
    if subprocess.run(command, env=env, capture_output=True).returncode != 0:
        # The package lists may be missing or stale on a fresh machine: refresh them once and try again.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(command, env=env, capture_output=True, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = START_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass(frozen=True)
class Ports:
    admin: int
    smsbox: int  # bearerbox <- smsbox
    smsc: int  # bearerbox <- fakesmsc
    sendsms: int  # smsbox's HTTP sendsms
    mo: int  # where smsbox forwards mobile-originated messages (get-url): the sms channel's receiver


class Kannel:
    """One Kannel installation's processes, started and stopped by the tests."""

    def __init__(self, directory: Path, mo_path: str = "/mo"):
        ensure_installed()
        self.directory = directory
        self.ports = Ports(free_port(), free_port(), free_port(), free_port(), free_port())
        self.config = directory / "kannel.conf"
        self.config.write_text(self._config_text(mo_path), encoding="utf-8")
        (directory / "store").mkdir(exist_ok=True)
        self.fifo = directory / "fakesmsc.in"
        os.mkfifo(self.fifo)
        self.bearerbox: subprocess.Popen | None = None
        self.smsbox: subprocess.Popen | None = None
        self.fakesmsc: subprocess.Popen | None = None
        self._fifo_writer: int | None = None
        self._outputs: list[Path] = []
        self._logs: list = []

    @property
    def sendsms_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.sendsms}/cgi-bin/sendsms"

    def _config_text(self, mo_path: str) -> str:
        d, p = self.directory, self.ports
        get_url = f"http://127.0.0.1:{p.mo}{mo_path}?from=%p&to=%P&text=%a"
        return f"""
group = core
admin-port = {p.admin}
admin-interface = 127.0.0.1
admin-password = {ADMIN_PASSWORD}
status-password = {ADMIN_PASSWORD}
admin-allow-ip = "127.0.0.1"
smsbox-port = {p.smsbox}
box-allow-ip = "127.0.0.1"
box-deny-ip = "*.*.*.*"
log-file = "{d}/bearerbox.log"
log-level = 0
dlr-storage = internal
store-type = file
store-location = "{d}/store/kannel.store"

group = smsc
smsc = fake
smsc-id = fake
port = {p.smsc}
connect-allow-ip = "127.0.0.1"

group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {p.smsbox}
sendsms-port = {p.sendsms}
sendsms-interface = 127.0.0.1
log-file = "{d}/smsbox.log"
log-level = 0

group = sendsms-user
username = {USERNAME}
password = {PASSWORD}
max-messages = 10

group = sms-service
keyword = default
catch-all = true
max-messages = 0
get-url = "{get_url}"
"""

    # -- processes ----------------------------------------------------------------

    def start(self) -> None:
        """bearerbox, fakesmsc, smsbox; returns once sendsms answers and the SMSC is connected."""
        log = open(self.directory / "bearerbox.out", "ab")  # noqa: SIM115 -- closed in stop()
        self._logs.append(log)
        self.bearerbox = subprocess.Popen([BEARERBOX, str(self.config)], stdout=log, stderr=log,
                                          start_new_session=True)
        wait_for_port(self.ports.admin)
        wait_for_port(self.ports.smsbox)
        wait_for_port(self.ports.smsc)
        self._start_fakesmsc()
        log = open(self.directory / "smsbox.out", "ab")  # noqa: SIM115 -- closed in stop()
        self._logs.append(log)
        self.smsbox = subprocess.Popen([SMSBOX, str(self.config)], stdout=log, stderr=log, start_new_session=True)
        wait_for_port(self.ports.sendsms)
        self._wait_for_status()

    def _start_fakesmsc(self) -> None:
        output = self.directory / f"fakesmsc-{len(self._outputs)}.out"
        self._outputs.append(output)
        log = open(output, "wb")  # noqa: SIM115 -- closed in stop()
        self._logs.append(log)
        # Opened read-write so that opening does not wait for a reader; kept open so fakesmsc never sees EOF.
        stdin = os.open(self.fifo, os.O_RDWR)
        try:
            self.fakesmsc = subprocess.Popen([FAKESMSC, "-H", "127.0.0.1", "-r", str(self.ports.smsc)],
                                             stdin=stdin, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        finally:
            os.close(stdin)
        self._fifo_writer = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)

    def _wait_for_status(self) -> None:
        """Until status.txt shows an smsbox connected and the fake SMSC online."""
        deadline = time.monotonic() + START_SECONDS
        text = ""
        while time.monotonic() < deadline:
            try:
                text = self.status()
            except OSError:
                text = ""
            if re.search(r"^\s+smsbox:", text, re.M) and re.search(r"^\s+fake\[fake\].*\(online", text, re.M):
                return
            time.sleep(0.1)
        raise RuntimeError(f"Kannel did not come up; status:\n{text}")

    def status(self) -> str:
        url = f"http://127.0.0.1:{self.ports.admin}/status.txt?password={ADMIN_PASSWORD}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.read().decode()

    def stop(self) -> None:
        """SIGINT to bearerbox (it tells smsbox to exit), then fakesmsc; everything waited for."""
        for name in ("bearerbox", "smsbox", "fakesmsc"):
            process = getattr(self, name)
            if process is None:
                continue
            if process.poll() is None:
                process.send_signal(signal.SIGINT if name == "bearerbox" else signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            setattr(self, name, None)
        if self._fifo_writer is not None:
            os.close(self._fifo_writer)
            self._fifo_writer = None
        for log in self._logs:
            log.close()
        self._logs.clear()

    def stop_smsc(self) -> None:
        """Only the fake SMSC goes away: bearerbox and smsbox stay up and queue what they are given."""
        self.fakesmsc.terminate()
        self.fakesmsc.wait(15)
        self.fakesmsc = None
        os.close(self._fifo_writer)
        self._fifo_writer = None
        deadline = time.monotonic() + START_SECONDS
        while re.search(r"^\s+fake\[fake\].*\(online", self.status(), re.M):
            if time.monotonic() > deadline:
                raise RuntimeError("bearerbox still shows the fake SMSC online")
            time.sleep(0.1)

    def start_smsc(self) -> None:
        self._start_fakesmsc()
        self._wait_for_status()

    # -- traffic ------------------------------------------------------------------

    def inject(self, sender: str, receiver: str, text: str) -> None:
        """A mobile-originated SMS from `sender`, as the fake SMSC's interactive mode reads it."""
        line = f"{sender} {receiver} text {text}\n".encode()
        os.write(self._fifo_writer, line)

    def received(self) -> list[tuple[str, str, str, str]]:
        """(from, to, type, text) of every message the SMSC got, across fakesmsc restarts."""
        got = []
        for output in self._outputs:
            if not output.exists():
                continue
            for line in output.read_text(encoding="utf-8", errors="replace").splitlines():
                match = _GOT_MESSAGE.search(line)
                if match:
                    sender, receiver, kind, text = (match.group(1).split(" ", 3) + [""])[:4]
                    got.append((sender, receiver, kind, text))
        return got

    def sendsms(self, **params: str) -> tuple[int, str]:
        """A raw sendsms request (for checking the gateway itself)."""
        query = urllib.parse.urlencode({"username": USERNAME, "password": PASSWORD, **params})
        try:
            with urllib.request.urlopen(f"{self.sendsms_url}?{query}", timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as err:
            body = err.read().decode()
            err.close()
            return err.code, body


@pytest.fixture(scope="session")
def kannel_gateway(tmp_path_factory) -> Kannel:
    """A running Kannel for the whole session; tests that stop it start it again."""
    gateway = Kannel(tmp_path_factory.mktemp("kannel"))
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop()
