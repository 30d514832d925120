"""Durability costs: checkpoints of a populated Engine, and the input journal's cost on Engine.process.

    python bench/bench_checkpoint.py                                # checkpoints at 1M and 10M subscribers, journal
    python bench/bench_checkpoint.py --subscribers 1000000 --skip-journal --json ckpt.json
    python bench/bench_checkpoint.py --skip-checkpoint --rounds 7   # the journal part alone

Checkpoints.  For each `--subscribers` value N, an Engine on the 20 rules of
engine/data/bench_rules_full.toml (`--rules`) is given state by running
N * `--events-per-subscriber` events of seeded synthetic traffic
(engine.synth, as bench/bench_engine.py; streamed batch by batch, so only
one batch of events is in memory at a time).  Then, `--repeat` times each:

  pause     Engine.snapshot(): the state copied out of the kernel, the pause
            the daemon's loop sees before its writer thread takes over.
            Each is taken `--gap` seconds (default 5) after the previous
            snapshot was freed, as a daemon's checkpoints a minute apart
            meet memory; a second snapshot taken at once after the first
            is freed is reported beside it ("back to back"), and so is the
            issued-instruction table alone (`issued`, part of the pause);
  write     engine.checkpoint.write of that snapshot into a fresh directory:
            serialise, CRC-32C, fsync of every file and the directory;
  size      the bytes of the checkpoint directory's files;
  restore   Engine.restore of the last checkpoint written, with the engine
            that wrote it gone: once with the files in the page cache (as
            after a process restart) and once with them dropped from it
            first (posix_fadvise DONTNEED; the VM's host may still cache
            them), alternating, each `--gap` seconds after the one before
            was freed.

On the VM these figures come from, memory a process frees is handed back to
the host within seconds (free page reporting), and touching new memory then
costs faults on both sides: a snapshot or restore that follows freed memory
at once is several times faster than one a few seconds later.

With `--tune-allocator` the daemon's glibc settings apply (blocks up to
32 MiB come from the heap and up to 512 MiB of freed memory stays with the
process).  The peak resident memory of each size (VmHWM, reset before it
where Linux allows) is reported with it.

Journal.  The standard workload (`--journal-subscribers` 1,000,000, the 10
rules of engine/data/bench_rules.toml, `--journal-events` 10,000,000 in
batches of 65,536), generated before anything is timed, through
Engine.process alone and with each batch first appended to an
engine.journal.Journal (append_events with the batch's columns, then
commit(), as the daemon does) under fsync "batch" (fsync=0.0: fdatasync
before every batch), "100ms" (fsync=0.1, tick() after each batch) and "off"
(fsync=None).  Every run has a fresh Engine and a fresh journal directory.
The four variants alternate in `--rounds` rounds, the order rotated each
round, after an untimed warm-up run; the report gives each variant's median
events/s and the median over rounds of its ratio to the no-journal run of
the same round, and the journal's own time per batch (append_events,
commit() and tick(), the syncs included), its syncs and bytes.  A plain
sequential write and fdatasync of 512 MiB before and after the rounds gives
the disk's rate for scale.

Files go under a temporary directory in `--dir` (default: the system's),
removed at the end; the report names its filesystem.  Times are
time.perf_counter wall time.  See bench/README.md, section 11.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import gc
import importlib.resources
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine import Engine
from engine import checkpoint as ckpt
from engine.journal import Journal
from engine.rules import RuleSet, load_rules, parse_rules
from engine.synth import TrafficGenerator

JOURNAL_VARIANTS = (("none", "no journal", False), ("batch", "fsync batch", 0.0),
                    ("100ms", "fsync 100ms", 0.1), ("off", "fsync off", None))


def packaged_rules(name: str) -> RuleSet:
    text = importlib.resources.files("engine").joinpath("data", name).read_text(encoding="utf-8")
    return parse_rules(text, source=f"engine/data/{name}")


def rules_from(path: str | None, default: str) -> RuleSet:
    return load_rules(path) if path else packaged_rules(default)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def fmt_s(s: dict, unit: str = "s") -> str:
    scale, suffix = (1e3, "ms") if unit == "ms" else (1.0, "s")
    return (f"{s['median'] * scale:8.3f} {suffix} [{s['min'] * scale:.3f} - {s['max'] * scale:.3f}]"
            if suffix == "s" else
            f"{s['median'] * scale:8.1f} {suffix} [{s['min'] * scale:.1f} - {s['max'] * scale:.1f}]")


def fmt_rate(rate: float) -> str:
    return f"{rate / 1e6:.2f} M/s"


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


# -- machine and filesystem ---------------------------------------------------------------


def proc_status(field: str) -> int | None:
    """A memory field of /proc/self/status in bytes (VmRSS, VmHWM), None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+: '5' to clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def filesystem_of(path: Path) -> dict:
    """The mount holding `path`: device, mount point and type, from /proc/self/mounts."""
    path = path.resolve()
    best = {"device": None, "mount": None, "type": None}
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                mount = mount.replace("\\040", " ")
                if (path == Path(mount) or Path(mount) in path.parents) and \
                        (best["mount"] is None or len(mount) >= len(best["mount"])):
                    best = {"device": device, "mount": mount, "type": fstype}
    except OSError:
        pass
    return best


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def drop_cached(directory: Path) -> None:
    """Drop the (clean, fsynced) pages of the directory's files from the page cache."""
    for p in directory.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# -- checkpoints --------------------------------------------------------------------------


def bench_checkpoints(subscribers: int, ruleset: RuleSet, args, root: Path, say) -> dict:
    peak_reset = reset_peak_rss()
    clock = time.perf_counter
    n_events = round(subscribers * args.events_per_subscriber)
    say(f"\n{subscribers:,} subscribers, {ruleset.source} ({len(ruleset.rules)} rules): "
        f"building state from {n_events:,} events ...")
    t0 = clock()
    generator = TrafficGenerator(subscribers, seed=args.seed)
    eng = Engine(ruleset)
    processed = 0
    for batch in generator.batches(n_events, args.batch_size):
        eng.process(batch)
        processed += batch.num_rows
    build_s = clock() - t0
    del generator, batch
    stats = eng.stats()
    say(f"  state      {stats['subscribers']:,} subscribers with state ({stats['subscribers'] / subscribers:.1%}), "
        f"state {mib(stats['state_bytes'])}, {stats['instructions']:,} instructions; "
        f"built in {build_s:.1f} s (generation and Engine.process, {fmt_rate(processed / build_s)}), "
        f"RSS {mib(proc_status('VmRSS') or 0)}")

    pauses, back_to_back, issued, writes, sizes = [], [], [], [], []
    directory = None
    for k in range(args.repeat):
        gc.collect()
        time.sleep(args.gap)
        t0 = clock()
        snap = eng.snapshot()
        pauses.append(clock() - t0)
        previous, directory = directory, root / f"checkpoint-{subscribers}-{k}"
        if previous is not None:
            shutil.rmtree(previous)
        t0 = clock()
        ckpt.write(snap, directory)
        writes.append(clock() - t0)
        sizes.append(dir_bytes(directory))
        del snap
        gc.collect()
        t0 = clock()
        snap = eng.snapshot()
        back_to_back.append(clock() - t0)
        del snap
        gc.collect()
        t0 = clock()
        eng._issued.to_table()  # the issued instructions as a table: the part of the pause outside the kernel
        issued.append(clock() - t0)
        say(f"  run {k + 1}      snapshot {pauses[-1] * 1e3:8.1f} ms (back to back {back_to_back[-1] * 1e3:6.1f}, "
            f"issued {issued[-1] * 1e3:6.1f})   write {writes[-1]:7.3f} s   {mib(sizes[-1])}")
    issued_entries = len(eng._issued)
    del eng
    gc.collect()

    restores = {"cached": [], "cold": []}
    restored_subscribers = None
    for k in range(args.repeat):
        for mode in (("cached", "cold") if k % 2 == 0 else ("cold", "cached")):
            time.sleep(args.gap)
            if mode == "cold":
                drop_cached(directory)
            t0 = clock()
            restored = Engine.restore(directory)
            restores[mode].append(clock() - t0)
            restored_subscribers = restored.stats()["subscribers"]
            del restored
            gc.collect()
        say(f"  run {k + 1}      restore: page cache {restores['cached'][-1]:7.3f} s   "
            f"dropped from it {restores['cold'][-1]:7.3f} s")
    shutil.rmtree(directory)
    if restored_subscribers != stats["subscribers"]:
        raise SystemExit(f"error: the restored engine has {restored_subscribers} subscribers with state, "
                         f"not {stats['subscribers']}")

    result = {
        "subscribers": subscribers,
        "rules": ruleset.source,
        "n_rules": len(ruleset.rules),
        "events": processed,
        "build_seconds": build_s,
        "subscribers_with_state": stats["subscribers"],
        "state_bytes": stats["state_bytes"],
        "instructions": stats["instructions"],
        "issued_entries": issued_entries,
        "gap_seconds": args.gap,
        "snapshot_seconds": summary(pauses),
        "snapshot_seconds_back_to_back": summary(back_to_back),
        "issued_table_seconds": summary(issued),
        "write_seconds": summary(writes),
        "bytes_on_disk": summary(sizes),
        "restore_seconds_cached": summary(restores["cached"]),
        "restore_seconds_cold": summary(restores["cold"]),
        "peak_rss_bytes": proc_status("VmHWM"),
        "peak_rss_reset": peak_reset,
    }
    return result


def report_checkpoint(r: dict, say) -> None:
    size = r["bytes_on_disk"]["median"]
    say(f"  {r['subscribers']:,} subscribers, {r['n_rules']} rules ({r['rules']}), {r['events']:,} events: "
        f"{r['subscribers_with_state']:,} with state, state {mib(r['state_bytes'])}")
    say(f"    pause    Engine.snapshot     {fmt_s(r['snapshot_seconds'], 'ms')}   ({r['gap_seconds']:g} s after "
        f"the last one was freed)")
    say(f"             back to back        {fmt_s(r['snapshot_seconds_back_to_back'], 'ms')}")
    say(f"             issued table alone  {fmt_s(r['issued_table_seconds'], 'ms')}   "
        f"({r['issued_entries']:,} instructions answerable by feedback)")
    say(f"    write    checkpoint.write    {fmt_s(r['write_seconds'])}   "
        f"({size / r['write_seconds']['median'] / 2**20:,.0f} MiB/s)")
    say(f"    size     on disk             {mib(size)}   "
        f"({size / max(r['subscribers_with_state'], 1):,.0f} bytes per subscriber with state)")
    say(f"    restore  page cache          {fmt_s(r['restore_seconds_cached'])}")
    say(f"    restore  dropped from cache  {fmt_s(r['restore_seconds_cold'])}")
    peak = r["peak_rss_bytes"]
    if peak is not None:
        say(f"    peak RSS {mib(peak)}" + ("" if r["peak_rss_reset"] else " (whole process: could not reset)"))


# -- journal ------------------------------------------------------------------------------


def run_variant(ruleset: RuleSet, batches: list[pa.RecordBatch], columns: list[dict], fsync, root: Path,
                name: str) -> dict:
    """One run: a fresh Engine over every batch, each batch journaled first unless fsync is False."""
    eng = Engine(ruleset)
    clock = time.perf_counter
    journal_s = []
    journal = None
    directory = root / f"journal-{name}"
    if fsync is not False:
        shutil.rmtree(directory, ignore_errors=True)
        journal = Journal(directory, fsync=fsync)
    started = clock()
    if journal is None:
        for batch in batches:
            eng.process(batch)
    else:
        for batch, cols in zip(batches, columns, strict=True):
            t0 = clock()
            journal.append_events(cols, "bench")
            journal.commit()
            journal_s.append(clock() - t0)
            eng.process(batch)
            t0 = clock()
            journal.tick()
            journal_s[-1] += clock() - t0
    elapsed = clock() - started
    out = {"seconds": elapsed}
    if journal is not None:
        out.update(bytes=journal.bytes_written, syncs=journal.syncs, journal_seconds=sum(journal_s),
                   per_batch_ms=[s * 1e3 for s in journal_s])
        journal.close()
        shutil.rmtree(directory)
    return out


def disk_write_rate(root: Path, nbytes: int = 512 << 20) -> float:
    """Bytes/s of one sequential write of `nbytes` (4 MiB writes) and its fdatasync, into a new file under root."""
    chunk = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    path = root / "disk-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        started = time.perf_counter()
        for _ in range(nbytes // len(chunk)):
            os.write(fd, chunk)
        os.fdatasync(fd)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()
    return nbytes / elapsed


def bench_journal(args, root: Path, say) -> dict:
    ruleset = rules_from(args.journal_rules, "bench_rules.toml")
    clock = time.perf_counter
    say(f"\nJournal: {args.journal_subscribers:,} subscribers, {ruleset.source} ({len(ruleset.rules)} rules), "
        f"{args.journal_events:,} events in batches of {args.batch_size:,}; generating ...")
    t0 = clock()
    generator = TrafficGenerator(args.journal_subscribers, seed=args.seed)
    batches = list(generator.batches(args.journal_events, args.batch_size))
    del generator
    # The daemon journals the decoder's numpy columns; here they are views of the Arrow batch (no copy).
    columns = [{name: batch.column(i).to_numpy() for i, name in enumerate(batch.schema.names)} for batch in batches]
    n_events = sum(b.num_rows for b in batches)
    say(f"  generated in {clock() - t0:.1f} s, {mib(sum(b.nbytes for b in batches))}")

    disk = [disk_write_rate(root)]
    say(f"  disk       sequential write + fdatasync, 512 MiB: {disk[0] / 2**20:,.0f} MiB/s")
    t0 = clock()
    run_variant(ruleset, batches, columns, False, root, "warmup")
    say(f"  warm-up (Engine.process, untimed) {fmt_rate(n_events / (clock() - t0))}")
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in JOURNAL_VARIANTS}
    for rnd in range(args.rounds):
        order = JOURNAL_VARIANTS[rnd % len(JOURNAL_VARIANTS):] + JOURNAL_VARIANTS[:rnd % len(JOURNAL_VARIANTS)]
        line = []
        for key, label, fsync in order:
            gc.collect()
            run = run_variant(ruleset, batches, columns, fsync, root, key)
            runs[key].append(run)
            line.append(f"{label} {fmt_rate(n_events / run['seconds'])}")
        say(f"  round {rnd + 1}  " + "   ".join(line))

    disk.append(disk_write_rate(root))
    say(f"  disk       sequential write + fdatasync, 512 MiB: {disk[1] / 2**20:,.0f} MiB/s (after the rounds)")
    result = {"subscribers": args.journal_subscribers, "rules": ruleset.source, "events": n_events,
              "batch_size": args.batch_size, "batches": len(batches), "rounds": args.rounds,
              "disk_write_bytes_per_second": disk, "variants": {}}
    base = [n_events / r["seconds"] for r in runs["none"]]
    for key, label, fsync in JOURNAL_VARIANTS:
        rates = [n_events / r["seconds"] for r in runs[key]]
        entry = {"label": label, "fsync": fsync if fsync is not False else "no journal",
                 "events_per_second": summary(rates)}
        if key != "none":
            ratios = [rate / b for rate, b in zip(rates, base, strict=True)]
            per_batch = np.array([ms for r in runs[key] for ms in r["per_batch_ms"]])
            entry.update(
                ratio_to_no_journal=summary(ratios),
                ratio_of_medians=statistics.median(rates) / statistics.median(base),
                journal_bytes_per_run=runs[key][0]["bytes"],
                journal_bytes_per_event=runs[key][0]["bytes"] / n_events,
                syncs_per_run=summary([r["syncs"] for r in runs[key]]),
                journal_ms_per_batch={"p50": float(np.percentile(per_batch, 50)),
                                      "p99": float(np.percentile(per_batch, 99)),
                                      "max": float(per_batch.max())},
                journal_share_of_run=summary([r["journal_seconds"] / r["seconds"] for r in runs[key]]),
            )
        result["variants"][key] = entry
    return result


def report_journal(r: dict, say) -> None:
    disk = " and ".join(f"{d / 2**20:,.0f}" for d in r["disk_write_bytes_per_second"])
    say(f"  {r['subscribers']:,} subscribers, {r['rules']}, {r['events']:,} events, batches of "
        f"{r['batch_size']:,}, {r['rounds']} rounds; disk {disk} MiB/s (write + fdatasync, before and after)")
    say(f"    {'variant':<12} {'events/s, median [min - max]':<30} {'ratio':>6}   {'journal/batch p50 / p99':>24}"
        f"   {'syncs/run':>9}   {'bytes/event':>11}")
    for key, v in r["variants"].items():
        rate = v["events_per_second"]
        lo, mid, hi = rate["min"] / 1e6, rate["median"] / 1e6, rate["max"] / 1e6
        text = f"    {v['label']:<12} {mid:6.2f} M/s [{lo:.2f} - {hi:.2f}]"
        text = f"{text:<47}"
        if key == "none":
            text += f" {1:6.3f}"
        else:
            j = v["journal_ms_per_batch"]
            text += (f" {v['ratio_to_no_journal']['median']:6.3f}   {j['p50']:9.2f} / {j['p99']:6.2f} ms"
                     f"   {v['syncs_per_run']['median']:>9,.0f}   {v['journal_bytes_per_event']:>11.1f}")
        say(text)
    say("    (ratio: the median over rounds of the run's events/s over the no-journal run's of the same round)")


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, nargs="+", default=[1_000_000, 10_000_000],
                        help="populations to checkpoint, one or more; default %(default)s")
    parser.add_argument("--events-per-subscriber", type=float, default=10.0,
                        help="events run to build state, per subscriber; default %(default)s")
    parser.add_argument("--rules", metavar="PATH",
                        help="rules for the checkpoints (default: the packaged bench_rules_full.toml)")
    parser.add_argument("--repeat", type=int, default=3, help="snapshots, writes and restores; default %(default)s")
    parser.add_argument("--gap", type=float, default=5.0,
                        help="idle seconds before each snapshot and restore; default %(default)s")
    parser.add_argument("--journal-subscribers", type=int, default=1_000_000)
    parser.add_argument("--journal-events", type=int, default=10_000_000)
    parser.add_argument("--journal-rules", metavar="PATH",
                        help="rules for the journal runs (default: the packaged bench_rules.toml)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of the four journal variants; default %(default)s")
    parser.add_argument("--batch-size", type=int, default=65_536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", metavar="PATH", help="where the temporary directory goes (default: the system's)")
    parser.add_argument("--skip-checkpoint", action="store_true", help="only the journal part")
    parser.add_argument("--skip-journal", action="store_true", help="only the checkpoint part")
    parser.add_argument("--tune-allocator", action="store_true",
                        help="keep freed memory for reuse as the daemon does (engine.daemon.tune_allocator)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if min(*args.subscribers, args.repeat, args.rounds, args.batch_size, args.journal_subscribers,
           args.journal_events) < 1 or args.events_per_subscriber <= 0 or args.gap < 0:
        parser.error("sizes, --repeat and --rounds must be positive")

    say = print
    tuned = None
    if args.tune_allocator:
        from engine.daemon import tune_allocator

        tuned = tune_allocator()
    root = Path(tempfile.mkdtemp(prefix="kairos-bench-checkpoint-", dir=args.dir))
    fs = filesystem_of(root)
    machine = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    }
    say("Kairos checkpoint and journal benchmark")
    say(f"  machine    {machine['platform']}, {machine['cpus']} CPUs, {mib(machine['memory_bytes'])}, "
        f"Python {machine['python']}, numpy {machine['numpy']}, pyarrow {machine['pyarrow']}")
    say(f"  files      {root} ({fs['type']} on {fs['device']}, mounted at {fs['mount']})")
    if args.tune_allocator:
        say(f"  allocator  the daemon's glibc settings (mmap threshold 32 MiB, trim threshold 512 MiB): "
            f"{'applied' if tuned else 'not available'}")

    results = {"benchmark": "kairos.bench_checkpoint", "machine": machine, "filesystem": fs,
               "tune_allocator": tuned, "checkpoints": [], "journal": None}
    try:
        if not args.skip_checkpoint:
            ruleset = rules_from(args.rules, "bench_rules_full.toml")
            for n in args.subscribers:
                results["checkpoints"].append(bench_checkpoints(n, ruleset, args, root, say))
                gc.collect()
        if not args.skip_journal:
            results["journal"] = bench_journal(args, root, say)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    say("\nResults (median of runs, [min - max])")
    for r in results["checkpoints"]:
        report_checkpoint(r, say)
    if results["journal"]:
        say("  Journal before Engine.process")
        report_journal(results["journal"], say)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        say(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
