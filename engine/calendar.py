"""Local time in the configured zone: UTC offsets as a table, for the kernel.

Caps, quiet hours and contact days (SPEC sections 4 and 8) are calendar
rules in `[policy] timezone`.  The kernel does not call zoneinfo per
instruction: it gets the zone as a table of transitions (`ZoneTable`), the
instants where the UTC offset changes and the offset from each on, and finds
an instant's offset by binary search.  Local day = floor((ts + offset) /
1 day); months and weekdays follow from the day number.

The table is exact for 1970 to 2100 (transitions are found by scanning
zoneinfo day by day and bisecting to the millisecond); after 2100 the last
offset holds.  tests/test_calendar.py checks it against zoneinfo.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import numpy as np

DAY_MS = 86_400_000
MINUTE_MS = 60_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SCAN_DAYS = (datetime(2101, 1, 1, tzinfo=UTC) - _EPOCH).days


@dataclass(frozen=True)
class ZoneTable:
    """`offset[k]` (ms) holds from `start[k]` (ms since the epoch, UTC) until `start[k + 1]`.

    start[0] is the smallest int64, so every instant has an offset.
    """

    start: np.ndarray  # int64, ascending
    offset: np.ndarray  # int64

    def offset_at(self, ts: int) -> int:
        return int(self.offset[np.searchsorted(self.start, ts, side="right") - 1])


def _offset_ms(tz: ZoneInfo, ts_ms: int) -> int:
    moment = _EPOCH + timedelta(milliseconds=ts_ms)
    return int(moment.astimezone(tz).utcoffset() // timedelta(milliseconds=1))


@lru_cache(maxsize=64)
def zone_table(name: str) -> ZoneTable:
    """The transitions of IANA zone `name` from 1970 to 2100."""
    tz = ZoneInfo(name)
    starts, offsets = [np.iinfo(np.int64).min], [_offset_ms(tz, 0)]
    previous = offsets[0]
    for day in range(1, _SCAN_DAYS + 1):
        at = day * DAY_MS
        current = _offset_ms(tz, at)
        if current == previous:
            continue
        lo, hi = at - DAY_MS, at  # offset(lo) == previous, offset(hi) == current
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _offset_ms(tz, mid) == previous:
                lo = mid
            else:
                hi = mid
        starts.append(hi)
        offsets.append(current)
        previous = current
    return ZoneTable(np.array(starts, np.int64), np.array(offsets, np.int64))


def transitions_between(name: str, lo: int, hi: int) -> list[int]:
    """Instants in [lo, hi] at which the zone's offset changes."""
    table = zone_table(name)
    return [int(t) for t in table.start[1:] if lo <= t <= hi]
