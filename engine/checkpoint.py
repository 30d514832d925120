"""Checkpoint files: the on-disk format of an Engine's state, and a directory of numbered checkpoints.

One checkpoint is one directory:

    meta.json        format, counters, the files below with their sizes and CRC-32C, and its own checksum
    state.npz        the kernel's state arrays (Kernel.export_state), feedback counts, pauses seen
    rules.toml       the rules text in force
    profiles.arrow   the profiles (Arrow IPC file)
    issued.arrow     the instructions still answerable by feedback (Arrow IPC file)
    daemon.json      (daemon checkpoints only) journal position covered, sender sequences

Format 3 (this one) adds the checksums to format 2, which is still read
(without them, and said so in a log line).  A directory whose meta.json is
missing, unreadable, of an unknown format, or whose checksum or any file's
size or CRC-32C disagrees is refused with `CheckpointError` naming the
directory and what is wrong: a torn or corrupt checkpoint is detected, never
loaded.

Writing is atomic: every file is written and fsynced in a staging directory,
meta.json last, then the directory is fsynced and renamed into place and
its parent fsynced.  The state is copied out of the kernel first
(`Engine.snapshot`), so the slow part (serialising and syncing a few hundred
MiB) can run on another thread while the engine goes on.

`CheckpointStore` is the daemon's directory of checkpoints, one per journal
position (`00000000000000012345/`), the newest `keep` kept, so that a damaged
newest one falls back to the one before it (whose journal is kept too); the
damaged one is set aside as `<position>.damaged`, out of the count.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from engine.storage import fsync_path

log = logging.getLogger("kairos.checkpoint")

FORMAT = 3
OLDEST_READABLE = 2
_ENGINE_FILES = ("state.npz", "rules.toml", "profiles.arrow", "issued.arrow")
_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: torn, corrupt, or of a format this version does not read."""


@dataclass
class Snapshot:
    """An Engine's state copied out of it: what a checkpoint holds, before it is written.

    The arrays are the engine's own copies (nothing here changes when the
    engine goes on); the Arrow tables are immutable.
    """

    arrays: dict[str, np.ndarray]
    rules_text: str
    tables: dict[str, pa.Table]  # "profiles", "issued"
    meta: dict
    extra: dict[str, bytes] = field(default_factory=dict)  # more files, e.g. daemon.json


def file_crc(path: Path) -> int:
    """CRC-32C of a file's bytes (hardware-accelerated: about 25 GB/s here, so 400 MiB cost 16 ms)."""
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = crc32c.crc32c(chunk, value)
    return value


def _meta_checksum(meta: dict) -> int:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return crc32c.crc32c(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write(snapshot: Snapshot, directory: Path) -> int:
    """Write `snapshot` into the new directory `directory`, every file fsynced, meta.json last.

    Returns the bytes written.  The caller renames the directory into place.
    """
    directory.mkdir(parents=True)
    with open(directory / "state.npz", "wb") as f:
        np.savez(f, **snapshot.arrays)
    (directory / "rules.toml").write_text(snapshot.rules_text, encoding="utf-8")
    for name, table in snapshot.tables.items():
        with ipc.new_file(str(directory / f"{name}.arrow"), table.schema) as writer:
            writer.write_table(table)
    for name, data in snapshot.extra.items():
        (directory / name).write_bytes(data)
    names = [*_ENGINE_FILES, *snapshot.extra]
    files = {}
    for name in names:
        fsync_path(directory / name)
        files[name] = {"bytes": (directory / name).stat().st_size, "crc32c": file_crc(directory / name)}
    meta = {**snapshot.meta, "format": FORMAT, "files": files}
    meta["checksum"] = _meta_checksum(meta)
    (directory / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    fsync_path(directory / "meta.json")
    fsync_path(directory)
    return sum(f["bytes"] for f in files.values())


def verify(directory: Path) -> dict:
    """The meta of a whole, uncorrupted checkpoint at `directory`; CheckpointError otherwise."""
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no meta.json (a checkpoint that was never finished)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory}: meta.json is unreadable: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{directory}: meta.json is not an object")
    version = meta.get("format")
    if not isinstance(version, int) or version < OLDEST_READABLE:
        raise CheckpointError(f"{directory}: checkpoint format {version!r} is older than this version of Kairos "
                              f"reads (formats {OLDEST_READABLE} to {FORMAT}); start without it or convert it")
    if version > FORMAT:
        raise CheckpointError(f"{directory}: checkpoint format {version} was written by a newer Kairos "
                              f"(this one reads formats {OLDEST_READABLE} to {FORMAT})")
    if version < 3:
        log.warning("checkpoint of format %d has no checksums; loaded unverified", version,
                    extra={"fields": {"checkpoint": str(directory)}})
        return meta
    if meta.get("checksum") != _meta_checksum(meta):
        raise CheckpointError(f"{directory}: meta.json fails its checksum")
    for name, expected in meta["files"].items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{directory}: {name} is missing") from None
        if size != expected["bytes"]:
            raise CheckpointError(f"{directory}: {name} has {size} bytes, not {expected['bytes']} (torn)")
        if file_crc(path) != expected["crc32c"]:
            raise CheckpointError(f"{directory}: {name} fails its CRC-32C (corrupt)")
    return meta


def read(directory: Path) -> tuple[dict, dict[str, np.ndarray], str, dict[str, pa.Table]]:
    """Verify and load a checkpoint: (meta, arrays, rules text, tables)."""
    meta = verify(directory)
    rules_text = (directory / "rules.toml").read_text(encoding="utf-8")
    tables = {}
    for name in ("profiles", "issued"):
        with pa.memory_map(str(directory / f"{name}.arrow")) as source:
            tables[name] = ipc.open_file(source).read_all()
    # np.load given a path leaks the file when the archive is damaged; owning the file object closes it.
    with open(directory / "state.npz", "rb") as f, np.load(f) as arrays:
        state = {name: arrays[name] for name in arrays.files}
    return meta, state, rules_text, tables


@dataclass(frozen=True)
class StoredCheckpoint:
    """One checkpoint of a CheckpointStore: where it is, the journal position it covers, its meta."""

    path: Path
    position: int
    meta: dict

    def extra(self, name: str) -> bytes | None:
        path = self.path / name
        return path.read_bytes() if path.exists() else None


class CheckpointStore:
    """A directory of checkpoints named by the journal position they cover; the newest `keep` kept."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError("a checkpoint store keeps at least one checkpoint")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob("*.partial"):
            shutil.rmtree(leftover, ignore_errors=True)  # a write a crash interrupted: never renamed, never used

    def positions(self) -> list[int]:
        """Positions of the finished checkpoints, newest first."""
        return sorted((int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()),
                      reverse=True)

    def path(self, position: int) -> Path:
        return self.directory / f"{position:020d}"

    def write(self, snapshot: Snapshot, position: int) -> int:
        """Write a checkpoint covering journal `position`; returns its bytes.  Older ones beyond `keep` go."""
        final = self.path(position)
        staging = final.with_name(final.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        size = write(snapshot, staging)
        if final.exists():  # the same position again (no entry since): the new one replaces it
            shutil.rmtree(final)
        staging.rename(final)
        fsync_path(self.directory)
        for old in self.positions()[self.keep:]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return size

    def newest_good(self) -> StoredCheckpoint | None:
        """The newest checkpoint that verifies, skipping (and logging) damaged ones; None when there is none.

        A damaged one is renamed `<position>.damaged` (kept for a look, no longer one of the checkpoints).
        """
        for position in self.positions():
            path = self.path(position)
            try:
                meta = verify(path)
            except CheckpointError as exc:
                # Set aside, out of the `keep` kept: left among them, it would push out the good one used instead.
                aside = path.with_name(path.name + ".damaged")
                try:
                    shutil.rmtree(aside, ignore_errors=True)
                    path.rename(aside)
                except OSError:
                    aside = path
                log.error("checkpoint damaged; trying the one before it", extra={"fields": {
                    "error": str(exc), "moved_to": str(aside)}})
                continue
            return StoredCheckpoint(path, position, meta)
        return None

    def oldest_position(self) -> int | None:
        """The journal position the oldest kept checkpoint covers (the journal is kept from there)."""
        positions = self.positions()
        return positions[-1] if positions else None

    def remove_all_but(self, position: int) -> None:
        """Delete every checkpoint except the one at `position` (erasure: older ones still hold the data)."""
        for other in self.positions():
            if other != position:
                shutil.rmtree(self.path(other), ignore_errors=True)
        fsync_path(self.directory)


