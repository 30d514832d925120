"""Making what was written durable: fsync of a file or a directory, by path.

One place for the checkpoint files, the journal's segments, the engine's
checkpoint renames and the dead-letter rewrites: a rename is durable only
once its directory is synced, and a file only once it is.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory given by path (a directory: its entries, such as a rename into it)."""
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
