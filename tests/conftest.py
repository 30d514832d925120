"""Shared test set-up: Hypothesis profiles, small event-batch helpers, and a real PostgreSQL.

The `postgresql` fixture runs a throwaway PostgreSQL cluster (Debian's `postgresql`
package, installed with apt-get when missing) on a free loopback port for the session;
`store_target` runs a test against a SQLite file and against a fresh database in it.

Hypothesis profiles (choose with HYPOTHESIS_PROFILE, default "ci"):

- ci: 200 examples per property, derandomized so that every run of the
  suite explores the same examples (no flaky CI), no deadline (the reference
  is slow by design), and the reproduction blob printed on failure.
- dev: 50 random examples, for a quick local loop.
- thorough: 2000 random examples, for a soak run
  (`HYPOTHESIS_PROFILE=thorough pytest tests/test_differential.py`).

A failure under a random profile prints `@reproduce_failure(...)` and the
seed; `pytest --hypothesis-seed=N` replays a run.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from engine import Engine, parse_rules
from engine.reference import ReferenceEngine
from engine.schema import COLUMN_DTYPES, REQUIRED_COLUMNS

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    print_blob=True,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def make_batch(rows: list[dict[str, int]], columns: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """A dict-of-numpy event batch from row dicts.

    Columns are the required ones plus every column any row names (or exactly
    `columns` when given); a row that does not name a present column reads 0.
    """
    if columns is None:
        names = set(REQUIRED_COLUMNS)
        for row in rows:
            names.update(row)
        columns = tuple(name for name in COLUMN_DTYPES if name in names)
    return {name: np.array([row.get(name, 0) for row in rows], dtype=COLUMN_DTYPES[name]) for name in columns}


@pytest.fixture
def batch():
    """make_batch, as a fixture for test modules."""
    return make_batch


@pytest.fixture(params=["kernel", "reference"])
def implementation(request):
    """A factory `rules_text -> engine`: the compiled Engine or the ReferenceEngine.

    Tests written against this fixture hold both implementations to the same
    assertions (process() and stats()["rules"] only: the common interface).
    """
    if request.param == "kernel":
        return lambda text: Engine.from_text(text)
    return lambda text: ReferenceEngine(parse_rules(text))


# ---------------------------------------------------------------------------------------------------------------
# A real PostgreSQL (Debian's `postgresql` package) for the offer store's tests.


class PostgresCluster:
    """A throwaway PostgreSQL cluster in a temporary directory, on a free loopback port.

    initdb refuses to run as root, so as root the server runs as the `postgres` user the package creates.
    """

    def __init__(self, root: Path):
        self.bin = _postgresql_bin()
        self.root = root
        self.data = root / "data"
        self.port = _free_port()
        self.user = "kairos"
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if as_user:
            shutil.chown(root, "postgres", "postgres")
        self._as_user = as_user
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--locale=C",
                  "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self._as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                                timeout=120)
        if result.returncode:
            raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.root / "server.log"), "-o", options, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its DSN."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return self.dsn(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgresql_bin() -> Path:
    """The newest installed PostgreSQL's bin directory, installing Debian's package first if needed."""

    def installed() -> list[Path]:
        return sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))

    if not installed():
        install = ["apt-get", "install", "-y", "-q", "postgresql"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(install, capture_output=True, env=env).returncode:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            result = subprocess.run(install, capture_output=True, text=True, env=env)
            if result.returncode:
                pytest.fail(f"PostgreSQL is needed and `apt-get install postgresql` failed:\n{result.stderr}")
    return installed()[-1].parent


@pytest.fixture(scope="session")
def postgresql():
    """A running PostgreSQL cluster for the whole session, stopped and removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="kairos-pg-"))
    try:
        cluster = PostgresCluster(root)
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


_databases = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request, tmp_path):
    """Where an offer store lives: a SQLite file, or a fresh database in the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "offers.sqlite")
    cluster = request.getfixturevalue("postgresql")
    return cluster.create_database(f"offers_{os.getpid()}_{next(_databases)}")
