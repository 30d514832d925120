"""engine.calendar: the zone tables the kernel reads local time from, held to zoneinfo."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from engine.calendar import transitions_between, zone_table

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def offset_ms(zone: str, ts: int) -> int:
    moment = EPOCH + timedelta(milliseconds=ts)
    return int(moment.astimezone(ZoneInfo(zone)).utcoffset() // timedelta(milliseconds=1))


@pytest.mark.parametrize("zone", ["UTC", "Asia/Shanghai", "Europe/Berlin", "America/New_York",
                                  "Australia/Lord_Howe", "America/Santiago"])
def test_zone_table_agrees_with_zoneinfo(zone):
    table = zone_table(zone)
    rng = np.random.default_rng(7)
    for ts in rng.integers(0, 4_102_444_800_000, 300).tolist():  # 1970 to 2100
        assert table.offset_at(ts) == offset_ms(zone, ts)
    # Either side of every transition, to the millisecond.
    for start in table.start[1:].tolist():
        assert table.offset_at(start) == offset_ms(zone, start)
        assert table.offset_at(start - 1) == offset_ms(zone, start - 1)
        assert offset_ms(zone, start) != offset_ms(zone, start - 1)


def test_berlin_2024_transitions():
    spring = int(datetime(2024, 3, 31, 1, tzinfo=UTC).timestamp() * 1000)
    autumn = int(datetime(2024, 10, 27, 1, tzinfo=UTC).timestamp() * 1000)
    assert transitions_between("Europe/Berlin", spring - 86_400_000, autumn + 86_400_000) == [spring, autumn]
    assert transitions_between("Asia/Shanghai", spring, autumn) == []
