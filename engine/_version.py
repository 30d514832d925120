"""The version of Kairos: the installed distribution's, else the one in pyproject.toml beside the sources.

Imports nothing of Kairos, so that any module (the metrics server, the command line) can name the
version without importing the engine.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

DISTRIBUTION = "kairos"
UNKNOWN = "0+unknown"


def read_version() -> str:
    """The version of the installed `kairos` distribution; from a source tree that is not installed, the
    `[project] version` of its pyproject.toml; failing both, "0+unknown"."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return UNKNOWN


__version__ = read_version()
