"""The input journal (engine/journal.py): entries read back as written, segments, torn tails, damage, release, fsync."""

from __future__ import annotations

import logging
import os
import struct
import time

import numpy as np
import pytest

from engine import journal as jr
from engine.journal import FILE_HEADER, RECORD_HEADER, Journal, JournalError


@pytest.fixture(autouse=True)
def _kairos_logs_reach_caplog():
    # engine.logs.setup (the CLI's) stops "kairos" propagating; a test earlier in the process may have run it.
    logger = logging.getLogger("kairos")
    before = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = before


def events(k: int, rows: int = 3) -> dict[str, np.ndarray]:
    """A small batch whose values depend on k, so that entries are told apart."""
    return {
        "ts": np.arange(rows, dtype=np.int64) + 1_000 * k,
        "msisdn": np.full(rows, 8613800000000 + k, dtype=np.int64),
        "kind": np.full(rows, k % 7, dtype=np.uint8),
        "peer": np.arange(rows, dtype=np.int64) * k,
    }


def write_mixed(journal: Journal) -> list[tuple]:
    """One entry of every kind (events with and without a sequence, feedback, advance, reload); what was written."""
    reload = {"rules_text": "[[rule]]\nid = 'x'\n", "rules_source": "rules.toml", "set_values": {"vip": [1, 2]},
              "profiles": None}
    written = [
        ("events", journal.append_events(events(1), "switch", 7, 41), events(1), "switch", 7, 41),
        ("events", journal.append_events(events(2), "probe"), events(2), "probe", None, None),
        ("feedback", journal.append_feedback(["r:1", "r:2"], ["delivered", "failed"], [5, 6], "channel:sms"),
         ["r:1", "r:2"], ["delivered", "failed"], [5, 6], "channel:sms"),
        ("advance", journal.append_advance(123_456_789)),
        ("reload", journal.append_reload(reload), reload),
        ("events", journal.append_events({}, "switch", 7, 42), {}, "switch", 7, 42),  # a message without rows
    ]
    return written


def assert_entry(entry: jr.Entry, expected: tuple) -> None:
    kind, position = expected[0], expected[1]
    assert entry.position == position and jr.KINDS[entry.kind] == kind
    if kind == "events":
        columns, input, sender, seq = expected[2:]
        assert (entry.input, entry.sender, entry.seq) == (input, sender, seq)
        assert entry.n == (len(next(iter(columns.values()))) if columns else 0)
        assert sorted(entry.columns) == sorted(columns)
        for name, values in columns.items():
            assert entry.columns[name].dtype == values.dtype, name
            np.testing.assert_array_equal(entry.columns[name], values)
    elif kind == "feedback":
        ids, outcomes, ts, source = expected[2:]
        assert entry.columns == {"id": ids, "outcome": outcomes, "ts": ts} and entry.source == source
        assert entry.n == len(ids)
    elif kind == "advance":
        assert entry.ts == 123_456_789
    else:
        assert entry.reload == expected[2]


def test_every_kind_of_entry_reads_back_as_written_with_positions_1_to_n(tmp_path):
    journal = Journal(tmp_path)
    written = write_mixed(journal)
    assert [w[1] for w in written] == list(range(1, len(written) + 1))
    journal.close()
    reopened = Journal(tmp_path)  # and from the files, by a journal that did not write them
    for journal_ in (journal, reopened):
        read = list(journal_.entries())
        assert len(read) == len(written)
        for entry, expected in zip(read, written, strict=True):
            assert_entry(entry, expected)
    assert reopened.next_position == len(written) + 1 and reopened.durable_position == len(written)
    assert reopened.torn_bytes == 0
    assert reopened.append_advance(1) == len(written) + 1


def test_segments_rotate_at_segment_bytes_and_are_read_across(tmp_path):
    journal = Journal(tmp_path, segment_bytes=1_500)
    written = [journal.append_events(events(k, rows=k % 5 + 1), "switch", 1, k) for k in range(1, 41)]
    assert written == list(range(1, 41))
    segments = journal.segments()
    assert len(segments) >= 4
    for first, path in segments:  # named by their first entry, none much over the size
        assert path.name == f"{first:020d}.journal"
        assert path.stat().st_size < 1_500 + 400
    firsts = [first for first, _ in segments]
    assert firsts[0] == 1 and firsts == sorted(set(firsts))
    journal.close()
    journal = Journal(tmp_path, segment_bytes=1_500)
    read = list(journal.entries())
    assert [e.position for e in read] == written
    for entry, k in zip(read, range(1, 41), strict=True):
        assert entry.seq == k
        np.testing.assert_array_equal(entry.columns["ts"], events(k, rows=k % 5 + 1)["ts"])
    # every starting point, at a segment's edges and inside one
    for after in [0, *firsts, *(f - 1 for f in firsts), 17, 39, 40, 41]:
        assert [e.position for e in journal.entries(after=after)] == list(range(after + 1, 41)), after
    assert journal.append_advance(5) == 41


@pytest.mark.parametrize("cut", range(1, 31))
def test_a_torn_tail_is_cut_back_on_open_and_nothing_before_it_is_lost(tmp_path, cut):
    journal = Journal(tmp_path, segment_bytes=2_000)
    for k in range(1, 30):
        journal.append_events(events(k), "switch", 7, k)
    journal.close()
    segments = journal.segments()
    assert len(segments) >= 2  # the tear is in the last segment; the others are read as they are
    last = segments[-1][1]
    size = last.stat().st_size
    os.truncate(last, size - cut)
    reopened = Journal(tmp_path, segment_bytes=2_000)
    record = RECORD_HEADER.size + sum(part.size for part in jr.encode_events(events(29), "switch", 7, 29))
    assert reopened.torn_bytes == record - cut
    assert last.stat().st_size == size - record  # cut back to the last whole record
    assert reopened.next_position == 29 and reopened.durable_position == 28
    assert [e.position for e in reopened.entries()] == list(range(1, 29))
    assert reopened.append_events(events(99), "switch", 7, 29) == 29
    reopened.close()
    read = list(Journal(tmp_path).entries())
    assert [e.position for e in read] == list(range(1, 30))
    assert [e.seq for e in read] == list(range(1, 30))
    np.testing.assert_array_equal(read[-1].columns["ts"], events(99)["ts"])


@pytest.mark.parametrize("garbage", [b"\x00", b"\x00" * 23, b"\xff" * 24, b"KREC" + b"\x01" * 40,
                                     RECORD_HEADER.pack(b"KREC", 1, 7, 10, 0) + b"0123456789"])
def test_garbage_after_the_last_record_is_cut_off(tmp_path, garbage, caplog):
    journal = Journal(tmp_path)
    written = write_mixed(journal)
    journal.close()
    (_, path), = journal.segments()
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(garbage)
    with caplog.at_level(logging.WARNING, logger="kairos.journal"):
        reopened = Journal(tmp_path)
    assert reopened.torn_bytes == len(garbage) and path.stat().st_size == size
    assert any("torn" in r.getMessage() for r in caplog.records)
    read = list(reopened.entries())
    for entry, expected in zip(read, written, strict=True):
        assert_entry(entry, expected)
    assert reopened.append_advance(9) == len(written) + 1
    assert [e.position for e in reopened.entries()] == list(range(1, len(written) + 2))


@pytest.mark.parametrize("length", [0, 5, FILE_HEADER.size - 1])
def test_a_segment_shorter_than_its_header_is_started_again(tmp_path, length):
    journal = Journal(tmp_path, segment_bytes=800)
    for k in range(1, 12):
        journal.append_events(events(k), "switch", 7, k)
    journal.close()
    n = journal.next_position
    # A crash between creating the next segment and writing its header.
    stub = tmp_path / f"{n:020d}.journal"
    stub.write_bytes(FILE_HEADER.pack(b"KJOURNAL", jr.FORMAT)[:length])
    reopened = Journal(tmp_path, segment_bytes=800)
    assert reopened.torn_bytes == length
    assert reopened.next_position == n
    assert stub.read_bytes() == FILE_HEADER.pack(b"KJOURNAL", jr.FORMAT)
    assert reopened.append_advance(77) == n
    reopened.close()
    read = list(Journal(tmp_path, segment_bytes=800).entries())
    assert [e.position for e in read] == list(range(1, n + 1)) and read[-1].ts == 77


@pytest.mark.parametrize("length", [0, 5, FILE_HEADER.size - 1, FILE_HEADER.size])
def test_an_older_segment_cut_to_its_header_or_less_stops_replay_before_it(tmp_path, caplog, length):
    journal = Journal(tmp_path, segment_bytes=2_000)
    for k in range(1, 20):
        journal.append_events(events(k), "switch", 7, k)
    journal.close()
    segments = journal.segments()
    assert len(segments) >= 4
    (_, second), (third, _) = segments[1], segments[2]
    with open(second, "r+b") as f:
        f.truncate(length)
    with caplog.at_level(logging.ERROR, logger="kairos.journal"):
        read = list(Journal(tmp_path, segment_bytes=2_000).entries())
    assert [e.position for e in read] == list(range(1, segments[1][0]))
    assert [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [e.position for e in Journal(tmp_path, segment_bytes=2_000).entries(after=third - 1)] == \
        list(range(third, 20))


def _record_offsets(path) -> list[tuple[int, int]]:
    """(offset, position) of each record of a segment."""
    data = path.read_bytes()
    offset, found = FILE_HEADER.size, []
    while offset < len(data):
        _, _, position, length, _ = RECORD_HEADER.unpack_from(data, offset)
        found.append((offset, position))
        offset += RECORD_HEADER.size + length
    return found


@pytest.mark.parametrize("where", ["payload", "header", "crc"])
def test_a_damaged_record_in_an_older_segment_stops_replay_there(tmp_path, caplog, where):
    journal = Journal(tmp_path, segment_bytes=5_000)
    for k in range(1, 40):
        journal.append_events(events(k), "switch", 7, k)
    journal.close()
    segments = journal.segments()
    assert len(segments) >= 3
    older = segments[0][1]
    records = _record_offsets(older)
    offset, damaged = records[len(records) // 2]
    assert 1 < damaged < segments[1][0] - 1  # in the middle
    flip = {"payload": RECORD_HEADER.size + 30, "header": 9, "crc": 21}[where]
    data = bytearray(older.read_bytes())
    data[offset + flip] ^= 0x40
    older.write_bytes(bytes(data))
    reopened = Journal(tmp_path, segment_bytes=5_000)  # only the last segment is checked on opening
    assert reopened.torn_bytes == 0 and reopened.next_position == 40
    with caplog.at_level(logging.ERROR, logger="kairos.journal"):
        read = list(reopened.entries())
    assert [e.position for e in read] == list(range(1, damaged))  # nothing from the damaged record on
    for entry in read:
        np.testing.assert_array_equal(entry.columns["ts"], events(entry.seq)["ts"])
        assert entry.seq == entry.position
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "kairos.journal"]
    assert errors and "damaged" in errors[0].getMessage()
    assert errors[0].fields["segment"] == str(older) and errors[0].fields["position"] == damaged
    # A start from after the damage reads on from there: the damage is in what it skips.
    caplog.clear()
    later = segments[1][0] - 1
    assert [e.position for e in reopened.entries(after=later)] == list(range(later + 1, 40))


def test_release_deletes_only_segments_wholly_covered_and_never_the_current_one(tmp_path):
    journal = Journal(tmp_path, segment_bytes=1_000)
    for k in range(1, 40):
        journal.append_events(events(k), "switch", 7, k)
    firsts = [first for first, _ in journal.segments()]
    assert len(firsts) >= 4
    assert journal.release(0) == 0
    assert journal.release(firsts[1] - 2) == 0  # the first segment's last entry is not covered
    assert [f for f, _ in journal.segments()] == firsts
    assert journal.release(firsts[1] - 1) == 1
    assert [f for f, _ in journal.segments()] == firsts[1:]
    assert journal.first_position() == firsts[1]
    assert journal.release(firsts[3] - 1 + 1) == 2  # covering into the fourth: the second and third go
    assert [f for f, _ in journal.segments()] == firsts[3:]
    assert journal.release(10**9) == len(firsts) - 4  # all but the one being written
    assert [f for f, _ in journal.segments()] == firsts[-1:]
    assert journal.release(10**9) == 0
    assert journal.append_advance(1) == 40  # the current segment is still the one written to
    assert [e.position for e in journal.entries(after=firsts[-1] - 1)] == list(range(firsts[-1], 41))


def test_retention_keeps_covered_segments_until_they_are_old_enough(tmp_path):
    now = [time.time()]
    journal = Journal(tmp_path, segment_bytes=1_000, retain_seconds=3_600, wall=lambda: now[0])
    for k in range(1, 30):
        journal.append_events(events(k), "switch", 7, k)
    firsts = [first for first, _ in journal.segments()]
    assert len(firsts) >= 3
    assert journal.release(10**9) == 0
    now[0] += 3_000
    assert journal.release(10**9) == 0
    assert [f for f, _ in journal.segments()] == firsts
    now[0] += 700
    assert journal.release(10**9) == len(firsts) - 1
    assert [f for f, _ in journal.segments()] == firsts[-1:]


@pytest.fixture
def fdatasyncs(monkeypatch):
    calls = []
    real = os.fdatasync

    def counting(fd):
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(jr.os, "fdatasync", counting)
    return calls


def test_fsync_batch_syncs_at_commit_and_only_then(tmp_path, fdatasyncs):
    journal = Journal(tmp_path, fsync=jr.parse_fsync("batch"))
    journal.append_events(events(1), "switch", 7, 1)
    journal.append_events(events(2), "switch", 7, 2)
    journal.tick()
    assert fdatasyncs == [] and journal.durable_position == 0 and journal.durable_sequences == {}
    journal.commit()
    assert len(fdatasyncs) == 1 and journal.syncs == 1  # one sync for the whole batch
    assert journal.durable_position == 2 and journal.durable_sequences == {("switch", 7): 2}
    journal.commit()  # nothing new: no sync
    assert len(fdatasyncs) == 1
    journal.append_advance(5)
    journal.commit()
    assert len(fdatasyncs) == 2 and journal.durable_position == 3


def test_fsync_interval_syncs_at_tick_once_the_interval_has_passed(tmp_path, fdatasyncs):
    now = [100.0]  # steps that are exact in binary floating point
    journal = Journal(tmp_path, fsync=jr.parse_fsync("125ms"), clock=lambda: now[0])
    assert journal.fsync == 0.125
    journal.append_events(events(1), "switch", 7, 1)
    journal.commit()
    journal.tick()
    assert fdatasyncs == [] and journal.durable_position == 0 and journal.durable_sequences == {}
    now[0] += 0.0625
    journal.append_events(events(2), "switch", 7, 2)
    journal.tick()
    assert fdatasyncs == [] and journal.durable_sequences == {}
    now[0] += 0.0625
    journal.tick()
    assert len(fdatasyncs) == 1 and journal.durable_position == 2
    assert journal.durable_sequences == {("switch", 7): 2}
    now[0] += 1
    journal.tick()  # nothing waits
    assert len(fdatasyncs) == 1
    journal.append_events(events(3), "switch", 8, 10)
    journal.tick()  # the interval is counted from the last sync, not from the append
    assert len(fdatasyncs) == 2 and journal.durable_sequences == {("switch", 7): 2, ("switch", 8): 10}
    journal.append_events(events(4), "switch", 8, 11)
    now[0] += 0.0625
    journal.tick()
    journal.commit()
    assert len(fdatasyncs) == 2 and journal.durable_sequences[("switch", 8)] == 10
    now[0] += 0.0625
    journal.commit()  # a commit once the interval has passed syncs too
    assert len(fdatasyncs) == 3 and journal.durable_sequences[("switch", 8)] == 11 and journal.durable_position == 4


def test_fsync_off_never_syncs_and_counts_everything_written_as_durable(tmp_path, fdatasyncs):
    journal = Journal(tmp_path, fsync=jr.parse_fsync("off"), segment_bytes=600)
    for k in range(1, 20):
        journal.append_events(events(k), "switch", 7, k)
        assert journal.durable_position == k and journal.durable_sequences == {("switch", 7): k}
        journal.commit()
        journal.tick()
    journal.rotate()
    journal.close()
    assert len(journal.segments()) >= 3
    assert fdatasyncs == [] and journal.syncs == 0


def test_durable_sequences_follow_each_sender_only_when_durable(tmp_path):
    journal = Journal(tmp_path)
    journal.restore_sequences({("switch", 1): 10})
    assert journal.durable_sequences == {("switch", 1): 10}
    journal.append_events(events(1), "switch", 1, 11)
    journal.append_events(events(2), "switch", 2, 1)
    journal.append_events(events(3), "other", 1, 5)
    journal.append_events(events(4), "switch")  # no sequence: acknowledges nothing
    assert journal.durable_sequences == {("switch", 1): 10}
    journal.sync()
    assert journal.durable_sequences == {("switch", 1): 11, ("switch", 2): 1, ("other", 1): 5}
    journal.append_events({}, "switch", 1, 12)  # a message without rows is acknowledged too, once durable
    assert journal.durable_sequences[("switch", 1)] == 11
    journal.commit()
    assert journal.durable_sequences[("switch", 1)] == 12


@pytest.mark.parametrize("header, message", [
    (FILE_HEADER.pack(b"KJOURNAL", jr.FORMAT + 1), f"journal format {jr.FORMAT + 1} is not {jr.FORMAT}"),
    (FILE_HEADER.pack(b"NOTJOURN", jr.FORMAT), "not a journal segment"),
])
def test_a_segment_of_another_format_is_refused(tmp_path, header, message):
    journal = Journal(tmp_path)
    journal.append_advance(1)
    journal.close()
    (_, path), = journal.segments()
    data = path.read_bytes()
    path.write_bytes(header + data[FILE_HEADER.size:])
    with pytest.raises(JournalError, match=message) as raised:
        Journal(tmp_path)
    assert str(path) in str(raised.value)
    # An older segment of another format is refused when it is read, not passed over.
    path.write_bytes(data)
    journal = Journal(tmp_path)
    journal.rotate()
    journal.append_advance(2)
    path.write_bytes(header + data[FILE_HEADER.size:])
    with pytest.raises(JournalError, match=message):
        list(journal.entries())


def test_a_record_of_an_unknown_kind_is_refused_clearly(tmp_path):
    journal = Journal(tmp_path)
    assert journal.append(9, b"x" * 8) == 1
    with pytest.raises(JournalError, match="unknown kind 9"):
        list(journal.entries())


def test_the_record_format_is_as_documented(tmp_path):
    journal = Journal(tmp_path)
    journal.append_advance(-5)
    journal.close()
    data = journal.segments()[0][1].read_bytes()
    assert data[:16] == b"KJOURNAL" + struct.pack("<H", jr.FORMAT) + bytes(6)
    magic, kind, position, length, crc = RECORD_HEADER.unpack_from(data, 16)
    assert (magic, kind, position, length) == (b"KREC", jr.ADVANCE, 1, 8)
    assert data[16 + 5:16 + 8] == bytes(3)
    import crc32c
    assert crc == crc32c.crc32c(data[40:48], crc32c.crc32c(data[16:36]))
    assert struct.unpack("<q", data[40:48]) == (-5,)


def test_a_journal_that_ends_before_the_checkpoint_continues_after_its_position(tmp_path, caplog):
    """Entries after a checkpoint must never take positions it covers: a replay after it would skip them."""
    journal = Journal(tmp_path)
    for k in range(1, 4):
        journal.append_events(events(k), "switch")
    journal.close()
    reopened = Journal(tmp_path)  # as if a power cut had lost entries 4..9, which a checkpoint at 9 covers
    reopened.continue_after(9)
    assert "ends before the checkpoint" in caplog.text
    assert reopened.append_events(events(10), "switch") == 10
    reopened.close()
    assert [e.position for e in Journal(tmp_path).entries(after=9)] == [10]
    untouched = Journal(tmp_path)
    untouched.continue_after(5)  # the journal reaches past 5: nothing changes
    assert untouched.next_position == 11
