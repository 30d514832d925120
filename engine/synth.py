"""Synthetic CDR and signalling traffic: seeded, vectorised, realistic enough to exercise rules.

`TrafficGenerator` makes a stream of Arrow record batches with the columns of
SPEC section 2 (`engine.EVENT_SCHEMA`).  It feeds `kairos demo`, the
benchmarks in bench/, and any test that wants traffic at scale:

    gen = TrafficGenerator(subscribers=100_000, seed=7)
    for batch in gen.batches(2_000_000):
        eng.process(batch)

Everything is numpy over whole blocks of events; there is no Python loop per
event or per subscriber.  Memory is about 70 bytes per subscriber for the
population (about 70 MB for 1,000,000 subscribers) plus one block of events
at a time.

What the traffic looks like (each is something a rule can see):

- Subscribers: distinct Chinese mobile numbers, 86 + an 11-digit number on a
  China Mobile prefix (8613812345678), as int64.
- Activity is Zipf-skewed: the subscriber of activity rank k gets weight
  (k + q) ** -s, s = `zipf_exponent` (default 1.1) and q = max(1, subscribers
  // 1000).  The offset q keeps the head realistic (without it the busiest of
  1,000,000 subscribers would make 12 % of all traffic; with it, about 0.02 %,
  some 2,000 times the quietest) while the tail stays Zipf.  Ranks are given to
  subscribers through a random permutation, so heavy users are spread over the
  number range.  Sampling: cumulative weights + searchsorted.
- Time: event time is non-decreasing over the whole stream.  Arrivals are a
  Poisson process averaging `events_per_second` (default: 1e9 events a day over
  80 million subscribers, the operator of the source material, scaled to
  `subscribers`: about 12.5 events per subscriber a day) with a daily rhythm in
  Asia/Shanghai time (UTC+8, no daylight saving): about 9 % of the mean rate
  at 03:00-05:00, 160 % at 20:00.
- Kind mix: call_out 25 %, call_in 20 %, sms_out 10 %, sms_in 10 %, data 20 %,
  location 8 %, recharge 1 %, balance 3 %, device 1 %, order 0.6 %, care 0.5 %,
  status 0.2 %, portal 0.7 %.
- Peers: calls and SMS go mostly to a subscriber's own circle of 8 contacts
  (other subscribers) and to random mobile numbers, some to fixed lines, the
  operator's 10086, and SMS gateways (1069...).  5 % of subscribers drive (12 %
  of their calls go to the traffic hotlines 12122/96122) and 10 % bank by phone
  (8 % of their calls go to 95555/95588/95533, bare or with an IVR extension
  such as 955551234); everyone else calls those lines rarely.  Overall about
  0.8 % of outgoing calls reach a hotline and 1 % a bank.
- Durations: calls log-normal around a minute (8 % unanswered, duration 0),
  hotline calls around 70 s, bank calls around 2 min; data sessions around
  15 min with log-normal volumes (median about 3 MB, long tail), app id in `code`.
- Cells: CGIs as one integer, MCC(3) MNC(2) LAC(5) CI(5) digits, e.g.
  460001234505678.  Each subscriber has a home and a work cell; working hours
  favour the work cell, evenings and nights the home cell.
- Roaming: 3 % of subscribers cross the border to Hong Kong (454) or Macau (455)
  on a regular cycle (every 4 to 30 days, for half a day to 4 days); while
  there, their calls, data and location events carry that MCC and a foreign CGI.
  Everyone else is on 460.
- Handsets: each subscriber has a stable 15-digit IMEI (reporting body 35 or 86,
  valid Luhn check digit).  Device events report it; 7 % of device events
  report a new handset, which is then the subscriber's IMEI from that event on.
- Money in fen: balances log-normal per subscriber (median 30 yuan; about 10 %
  of balance events are under 500 fen); recharges of 10 to 1,000 yuan with the
  balance after; orders with a product id and price; care reasons and status
  codes (1 suspend, 2 resume, 3 lost-phone report, 4 SIM replacement).

Determinism: the stream is a function of (subscribers, seed, start_ts,
events_per_second, zipf_exponent) alone.  `batch_size` only decides where the
stream is cut, and `n_events` where it stops: the first k events are the same
for every n_events >= k and every batch size.  Each call of `batches` starts
the stream afresh.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from engine.schema import COLUMN_DTYPES, EVENT_COLUMNS, EVENT_SCHEMA, KIND_CODES

# 2026-11-01T00:00:00Z in milliseconds.
DEFAULT_START_TS = 1_793_491_200_000

# Events a day per subscriber at the operator of the source material:
# about one billion network contacts a day over 80 million subscribers.
EVENTS_PER_SUBSCRIBER_DAY = 1e9 / 80e6

# Events are generated in blocks of this many, each from its own seeded random
# stream; batches are cut from the blocks.  This is what makes the stream
# independent of batch_size.
BLOCK = 65_536

_MS_HOUR = 3_600_000
_MS_DAY = 86_400_000
_UTC_OFFSET_SHANGHAI = 8 * _MS_HOUR

# Relative event rate per local hour (Asia/Shanghai), 00:00 to 23:00; the
# generator normalises it to a mean of 1.
_HOURLY_RHYTHM = np.array(
    [0.35, 0.20, 0.12, 0.08, 0.08, 0.12, 0.30, 0.70, 1.10, 1.35, 1.45, 1.45,
     1.30, 1.30, 1.35, 1.35, 1.30, 1.30, 1.35, 1.45, 1.50, 1.40, 1.00, 0.60]
)

# Kind mix, SPEC section 2 codes.
_KIND_SHARE = {
    "call_out": 25.0, "call_in": 20.0, "sms_out": 10.0, "sms_in": 10.0, "data": 20.0,
    "location": 8.0, "recharge": 1.0, "balance": 3.0, "device": 1.0,
    "order": 0.6, "care": 0.5, "status": 0.2, "portal": 0.7,
}

# China Mobile number blocks (subscribers) and all carriers' (random peers).
_CMCC_PREFIXES = np.array([134, 135, 136, 137, 138, 139, 147, 150, 151, 152, 157, 158, 159,
                           172, 178, 182, 183, 184, 187, 188, 195, 197, 198], np.int64)
_MOBILE_PREFIXES = np.concatenate(
    [_CMCC_PREFIXES, np.array([130, 131, 132, 133, 145, 153, 155, 156, 166, 173, 175, 176,
                               177, 180, 181, 185, 186, 189, 191, 193, 199], np.int64)]
)
_CC = 86
_MOBILE_BASE = _CC * 10**11  # 86 + 11 digits
# Fixed lines: 86 + area code + 8-digit local number (Beijing, Shanghai,
# Guangzhou, Shenzhen, Hangzhou, Chengdu, Wuhan, Nanjing).
_FIXED_BASES = np.array([int(f"{_CC}{area}") * 10**8 for area in (10, 21, 20, 755, 571, 28, 27, 25)], np.int64)
_TRAFFIC_HOTLINES = np.array([12122, 96122], np.int64)
_BANK_LINES = np.array([95555, 95588, 95533], np.int64)
_OPERATOR_SERVICE = 10086
_SMS_GATEWAY_BASE = 10_690_000_000  # 1069 + 7 digits: verification codes and notices

_CONTACT_CIRCLE = 8

# Subscriber traits: share of subscribers, and share of their calls to the lines.
_DRIVER_SHARE, _DRIVER_HOTLINE_P, _BASE_HOTLINE_P = 0.05, 0.12, 0.002
_BANKER_SHARE, _BANKER_BANK_P, _BASE_BANK_P = 0.10, 0.08, 0.002
_ROAMER_SHARE = 0.03
_NEW_HANDSET_P = 0.07

# Roaming: (mcc, operator MNCs).
_HONG_KONG = (454, np.array([0, 3, 6, 10, 12], np.int64))
_MACAU = (455, np.array([0, 1, 3, 5], np.int64))
_HOME_MCC, _HOME_MNC = 460, 0

_RECHARGE_AMOUNTS = np.array([1000, 2000, 3000, 5000, 10000, 20000, 30000, 50000, 100000], np.int64)
_RECHARGE_WEIGHTS = np.array([10, 15, 12, 25, 20, 8, 4, 4, 2], np.float64)
_ORDER_PRICES = np.array([0, 500, 1000, 1500, 2000, 3000, 5000, 10000], np.int64)
_ORDER_WEIGHTS = np.array([10, 20, 20, 10, 15, 10, 10, 5], np.float64)
_N_PRODUCTS, _PRODUCT_BASE = 40, 2001
_N_APPS = 64
_N_CARE_REASONS = 12
_STATUS_WEIGHTS = np.array([0.3, 0.3, 0.2, 0.2])  # suspend, resume, lost-phone report, SIM replacement

# Which kinds carry a cell and an MCC (SPEC section 2, "typical fields"), by kind code.
_KINDS_WITH_CELL = np.isin(
    np.arange(len(KIND_CODES)), [KIND_CODES[k] for k in ("call_out", "call_in", "sms_out", "data", "location")]
)
_KINDS_WITH_MCC = np.isin(
    np.arange(len(KIND_CODES)), [KIND_CODES[k] for k in ("call_out", "call_in", "data", "location")]
)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(np.asarray(weights, np.float64))
    return cdf / cdf[-1]


def _pick(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """n indices drawn with the probabilities whose cumulative sum is cdf."""
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


def _luhn_check_digit(payload: np.ndarray) -> np.ndarray:
    """Luhn check digit of 14-digit payloads, so payload * 10 + digit is a valid IMEI."""
    total = np.zeros(len(payload), np.int64)
    rest = payload.copy()
    for position in range(14):  # from the right; position 0 is doubled (the check digit follows it)
        digit = rest % 10
        rest //= 10
        if position % 2 == 0:
            digit = digit * 2
            digit = digit - 9 * (digit > 9)
        total += digit
    return (10 - total % 10) % 10


def _lognormal_int(rng: np.random.Generator, median: float, sigma: float, n: int, lo: int, hi: int) -> np.ndarray:
    values = rng.lognormal(np.log(median), sigma, n)
    return np.clip(np.rint(values), lo, hi).astype(np.int64)


class _StreamState:
    """What carries from one block to the next within one call of `batches`."""

    def __init__(self, subscribers: int, first_position: float):
        self.block = 0
        self.position = first_position  # expected-event count since the local midnight before start_ts
        self.last_ts = 0
        self.handset = np.zeros(subscribers, np.uint16)  # handset generation per subscriber


class TrafficGenerator:
    """A seeded population of subscribers and the traffic they make (see the module docstring).

    Building one costs a few numpy passes over the population (well under a
    second for 1,000,000 subscribers); `batches` then streams events.

    `msisdns` holds the subscribers' numbers (int64; position = subscriber id).
    `events_per_second` None means the source material's rate scaled to
    `subscribers` (EVENTS_PER_SUBSCRIBER_DAY).
    """

    def __init__(
        self,
        subscribers: int,
        seed: int = 0,
        start_ts: int = DEFAULT_START_TS,
        events_per_second: float | None = None,
        *,
        zipf_exponent: float = 1.1,
    ):
        if subscribers < 1:
            raise ValueError("subscribers must be at least 1")
        if subscribers > len(_CMCC_PREFIXES) * 10**8 // 2:
            raise ValueError("too many subscribers for the China Mobile number blocks")
        if start_ts < 0:
            raise ValueError("start_ts must be >= 0")
        if events_per_second is None:
            events_per_second = subscribers * EVENTS_PER_SUBSCRIBER_DAY / 86_400
        if not events_per_second > 0:
            raise ValueError("events_per_second must be positive")
        if not zipf_exponent > 0:
            raise ValueError("zipf_exponent must be positive")
        self.subscribers = int(subscribers)
        self.seed = int(seed)
        self.start_ts = int(start_ts)
        self.events_per_second = float(events_per_second)
        self.zipf_exponent = float(zipf_exponent)
        self._build_population(np.random.default_rng([self.seed, 0]))
        self._build_clock()
        self._kind_cdf = _cdf([_KIND_SHARE[name] for name in KIND_CODES])
        self._app_cdf = _cdf(np.arange(1, _N_APPS + 1, dtype=np.float64) ** -1.2)
        self._product_cdf = _cdf(np.arange(1, _N_PRODUCTS + 1, dtype=np.float64) ** -1.0)
        self._care_cdf = _cdf(np.arange(1, _N_CARE_REASONS + 1, dtype=np.float64) ** -0.8)

    # -- population ------------------------------------------------------------

    def _build_population(self, rng: np.random.Generator) -> None:
        n = self.subscribers
        # Distinct numbers: 86 + 3-digit China Mobile prefix + 8 digits.
        index = rng.choice(len(_CMCC_PREFIXES) * 10**8, size=n, replace=False)
        self.msisdns = _MOBILE_BASE + _CMCC_PREFIXES[index // 10**8] * 10**8 + index % 10**8
        # Activity: rank k gets (k + q) ** -s; rank_to_sub spreads ranks over subscribers.
        q = max(1, n // 1000)
        weights = (np.arange(n, dtype=np.float64) + q) ** -self.zipf_exponent
        self._activity_cdf = _cdf(weights)
        self._rank_to_sub = rng.permutation(n).astype(np.int32)
        # Traits.
        self._driver = rng.random(n) < _DRIVER_SHARE
        self._banker = rng.random(n) < _BANKER_SHARE
        roamer = rng.random(n) < _ROAMER_SHARE
        # Roaming cycle: inside a trip while (t - start + phase) mod period < length.
        self._roam_period = np.where(roamer, rng.uniform(4, 30, n) * _MS_DAY, 0).astype(np.int64)
        length = rng.uniform(0.5, 4, n) * _MS_DAY
        self._roam_length = np.where(roamer, np.minimum(length, self._roam_period / 2), 0).astype(np.int64)
        self._roam_phase = np.where(roamer, rng.random(n) * self._roam_period, 0).astype(np.int64)
        self._roam_macau = rng.random(n) < 0.25  # of roamers: Macau, else Hong Kong
        # Cells: a pool of CGIs (about 40 subscribers each), a home and a work cell each.
        n_cells = max(64, n // 40)
        lac = rng.integers(4096, 65536, n_cells, dtype=np.int64)
        ci = rng.integers(1, 65536, n_cells, dtype=np.int64)
        self._cells = ((_HOME_MCC * 100 + _HOME_MNC) * 10**5 + lac) * 10**5 + ci
        self._home_cell = rng.integers(0, n_cells, n, dtype=np.int32)
        self._work_cell = rng.integers(0, n_cells, n, dtype=np.int32)
        # Money: a per-subscriber balance level in fen.
        self._balance_level = rng.lognormal(np.log(3000), 1.3, n).astype(np.float32)
        # Handsets: type approval codes (8 digits, reporting body 35 or 86).
        bodies = np.where(rng.random(400) < 0.5, 35, 86).astype(np.int64)
        self._tacs = bodies * 10**6 + rng.integers(0, 10**6, 400, dtype=np.int64)
        self._salt = np.uint64(int(rng.integers(0, 2**63, dtype=np.int64)))

    def _build_clock(self) -> None:
        rhythm = _HOURLY_RHYTHM / _HOURLY_RHYTHM.mean()
        per_hour = self.events_per_second * 3600 * rhythm  # expected events in each local hour
        self._hour_rate = per_hour
        self._hour_start = np.concatenate([[0.0], np.cumsum(per_hour)])  # expected events before each hour
        self._per_day = self._hour_start[-1]
        # Local midnight (Asia/Shanghai) at or before start_ts, and the expected
        # event count between it and start_ts: the stream begins there.
        local = self.start_ts + _UTC_OFFSET_SHANGHAI
        self._midnight = self.start_ts - local % _MS_DAY
        into_day = local % _MS_DAY
        hour = into_day // _MS_HOUR
        self._first_position = self._hour_start[hour] + per_hour[hour] * (into_day % _MS_HOUR) / _MS_HOUR

    def _event_times(self, positions: np.ndarray) -> np.ndarray:
        """Event time (ms) of positions on the expected-event axis: the inverse of the rate's integral."""
        day = np.floor(positions / self._per_day)
        rest = positions - day * self._per_day
        hour = np.clip(np.searchsorted(self._hour_start, rest, side="right") - 1, 0, 23)
        into_hour = (rest - self._hour_start[hour]) / self._hour_rate[hour] * _MS_HOUR
        return self._midnight + day.astype(np.int64) * _MS_DAY + hour * _MS_HOUR + into_hour.astype(np.int64)

    # -- streaming -------------------------------------------------------------

    def batches(self, n_events: int, batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
        """`n_events` events as record batches of `batch_size` rows (the last may be shorter)."""
        if n_events < 0:
            raise ValueError("n_events must be >= 0")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        state = _StreamState(self.subscribers, self._first_position)
        pending: list[dict[str, np.ndarray]] = []
        pending_rows = 0
        produced = 0
        while produced < n_events:
            block = self._block(state)
            take = min(BLOCK, n_events - produced)
            if take < BLOCK:
                block = {name: column[:take] for name, column in block.items()}
            produced += take
            pending.append(block)
            pending_rows += take
            while pending_rows >= batch_size:
                columns, pending = _split(pending, batch_size)
                pending_rows -= batch_size
                yield _record_batch(columns)
        if pending_rows:
            columns, _ = _split(pending, pending_rows)
            yield _record_batch(columns)

    def _block(self, state: _StreamState) -> dict[str, np.ndarray]:
        """The next BLOCK events of the stream, as canonical numpy columns."""
        rng = np.random.default_rng([self.seed, 1, state.block])
        state.block += 1
        n = BLOCK

        positions = state.position + np.cumsum(rng.standard_exponential(n))
        state.position = float(positions[-1])
        ts = self._event_times(positions)
        # Guard float rounding at hour seams: never decrease, within or across blocks.
        ts[0] = max(ts[0], state.last_ts)
        np.maximum.accumulate(ts, out=ts)
        state.last_ts = int(ts[-1])

        # Sorted draws make searchsorted over a large cdf cache-friendly (3x
        # faster); the shuffle then gives the subscribers random places.
        rank = np.searchsorted(self._activity_cdf, np.sort(rng.random(n)), side="right")
        rng.shuffle(rank)
        sub = self._rank_to_sub[np.minimum(rank, self.subscribers - 1)]
        kind = _pick(rng, self._kind_cdf, n).astype(np.uint8)

        cols = {name: np.zeros(n, COLUMN_DTYPES[name]) for name in EVENT_COLUMNS}
        cols["ts"] = ts
        cols["msisdn"] = self.msisdns[sub]
        cols["kind"] = kind

        # Rows of each kind, in row order.
        order = np.argsort(kind, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(kind, minlength=len(KIND_CODES)))])
        rows = {name: order[bounds[code]:bounds[code + 1]] for name, code in KIND_CODES.items()}

        # Where each subscriber is: home network or a border trip.
        local_hour = ((ts + _UTC_OFFSET_SHANGHAI) // _MS_HOUR) % 24
        period = self._roam_period[sub]
        roaming = period > 0
        roaming[roaming] = (
            (ts[roaming] - self.start_ts + self._roam_phase[sub[roaming]]) % period[roaming]
            < self._roam_length[sub[roaming]]
        )
        self._fill_location(rng, cols, sub, local_hour, roaming)
        self._fill_calls(rng, cols, sub, rows)
        self._fill_sms(rng, cols, sub, rows)
        self._fill_data(rng, cols, rows)
        self._fill_money(rng, cols, sub, rows)
        self._fill_devices(rng, cols, sub, rows["device"], state)
        self._fill_care(rng, cols, rows)
        return cols

    def _fill_location(self, rng, cols, sub, local_hour, roaming) -> None:
        """cell for calls, sms_out, data and location; mcc for calls, data and location."""
        n = len(sub)
        has_cell = _KINDS_WITH_CELL[cols["kind"]]
        has_mcc = _KINDS_WITH_MCC[cols["kind"]]
        # Working hours favour the work cell; evenings and nights the home cell.
        working = (local_hour >= 9) & (local_hour < 18)
        u = rng.random(n)
        p_work = np.where(working, 0.60, 0.10)
        p_home = np.where(working, 0.25, 0.75)
        other = rng.integers(0, len(self._cells), n, dtype=np.int32)
        which = np.where(u < p_work, self._work_cell[sub], np.where(u < p_work + p_home, self._home_cell[sub], other))
        cell = self._cells[which]
        mcc = np.full(n, _HOME_MCC, np.int64)
        # Abroad: a foreign operator's CGI.
        r = np.flatnonzero(roaming)
        if len(r):
            macau = self._roam_macau[sub[r]]
            mcc[r] = np.where(macau, _MACAU[0], _HONG_KONG[0])
            mnc = np.where(macau, _MACAU[1][rng.integers(0, len(_MACAU[1]), len(r))],
                           _HONG_KONG[1][rng.integers(0, len(_HONG_KONG[1]), len(r))])
            lac = rng.integers(1, 2048, len(r), dtype=np.int64)
            ci = rng.integers(1, 65536, len(r), dtype=np.int64)
            cell[r] = ((mcc[r] * 100 + mnc) * 10**5 + lac) * 10**5 + ci
        cols["cell"] = np.where(has_cell, cell, 0)
        cols["mcc"] = np.where(has_mcc, mcc, 0).astype(np.uint16)

    def _contacts(self, rng, sub: np.ndarray) -> np.ndarray:
        """A member of each subscriber's circle of contacts (the first ones more often)."""
        k = np.minimum(rng.geometric(0.35, len(sub)) - 1, _CONTACT_CIRCLE - 1).astype(np.uint64)
        h = _mix64(sub.astype(np.uint64) * np.uint64(_CONTACT_CIRCLE) + k + self._salt)
        if self.subscribers == 1:
            return self._random_mobiles(rng, len(sub))
        # Another subscriber, never oneself: an offset of 1 .. subscribers - 1.
        offset = (h % np.uint64(self.subscribers - 1)).astype(np.int64) + 1
        return self.msisdns[(sub + offset) % self.subscribers]

    def _random_mobiles(self, rng, n: int) -> np.ndarray:
        prefix = _MOBILE_PREFIXES[rng.integers(0, len(_MOBILE_PREFIXES), n)]
        return _MOBILE_BASE + prefix * 10**8 + rng.integers(0, 10**8, n, dtype=np.int64)

    def _fixed_lines(self, rng, n: int) -> np.ndarray:
        return _FIXED_BASES[rng.integers(0, len(_FIXED_BASES), n)] + rng.integers(10**7, 10**8, n, dtype=np.int64)

    def _bank_numbers(self, rng, n: int) -> np.ndarray:
        """Bank service lines, bare (95555) or with an IVR extension (9555512, 955551234)."""
        line = _BANK_LINES[rng.integers(0, len(_BANK_LINES), n)]
        form = rng.random(n)
        return np.where(
            form < 0.4, line,
            np.where(form < 0.6, line * 100 + rng.integers(10, 100, n), line * 10_000 + rng.integers(1000, 10_000, n)),
        )

    def _fill_calls(self, rng, cols, sub, rows) -> None:
        for name in ("call_out", "call_in"):
            r = rows[name]
            n = len(r)
            if not n:
                continue
            s = sub[r]
            u = rng.random(n)
            if name == "call_out":
                p_hot = np.where(self._driver[s], _DRIVER_HOTLINE_P, _BASE_HOTLINE_P)
                p_bank = np.where(self._banker[s], _BANKER_BANK_P, _BASE_BANK_P)
            else:  # banks and the operator call subscribers too; nobody is called by a hotline
                p_hot = np.zeros(n)
                p_bank = np.full(n, 0.01)
            hot = u < p_hot
            bank = ~hot & (u < p_hot + p_bank)
            v = rng.random(n)  # the rest: contacts 55 %, random mobiles 35 %, fixed 8 %, 10086 2 %
            contact = ~hot & ~bank & (v < 0.55)
            mobile = ~hot & ~bank & (v >= 0.55) & (v < 0.90)
            fixed = ~hot & ~bank & (v >= 0.90) & (v < 0.98)
            service = ~hot & ~bank & (v >= 0.98)
            peer = np.empty(n, np.int64)
            peer[hot] = _TRAFFIC_HOTLINES[rng.integers(0, 2, int(hot.sum()))]
            peer[bank] = self._bank_numbers(rng, int(bank.sum())) if name == "call_out" else (
                _BANK_LINES[rng.integers(0, 3, int(bank.sum()))])
            peer[contact] = self._contacts(rng, s[contact])
            peer[mobile] = self._random_mobiles(rng, int(mobile.sum()))
            peer[fixed] = self._fixed_lines(rng, int(fixed.sum()))
            peer[service] = _OPERATOR_SERVICE
            duration = _lognormal_int(rng, 60, 1.0, n, 1, 7200)
            duration[rng.random(n) < 0.08] = 0  # unanswered
            duration[hot] = _lognormal_int(rng, 70, 0.7, int(hot.sum()), 5, 1800)
            duration[bank] = _lognormal_int(rng, 120, 0.8, int(bank.sum()), 5, 3600)
            cols["peer"][r] = peer
            cols["duration"][r] = duration

    def _fill_sms(self, rng, cols, sub, rows) -> None:
        r = rows["sms_out"]  # contacts 70 %, random mobiles 28 %, 10086 2 %
        v = rng.random(len(r))
        peer = np.where(v < 0.70, self._contacts(rng, sub[r]), self._random_mobiles(rng, len(r)))
        peer[v >= 0.98] = _OPERATOR_SERVICE
        cols["peer"][r] = peer
        r = rows["sms_in"]  # contacts 50 %, random mobiles 20 %, SMS gateways 25 %, 10086 5 %
        v = rng.random(len(r))
        peer = np.where(v < 0.50, self._contacts(rng, sub[r]), self._random_mobiles(rng, len(r)))
        gateway = (v >= 0.70) & (v < 0.95)
        peer[gateway] = _SMS_GATEWAY_BASE + rng.integers(0, 10**7, int(gateway.sum()), dtype=np.int64)
        peer[v >= 0.95] = _OPERATOR_SERVICE
        cols["peer"][r] = peer

    def _fill_data(self, rng, cols, rows) -> None:
        r = rows["data"]
        n = len(r)
        duration = _lognormal_int(rng, 900, 1.2, n, 1, 86_400)
        rate = rng.lognormal(np.log(3_000), 1.5, n)  # bytes per second
        cols["duration"][r] = duration
        cols["volume"][r] = np.clip(duration * rate, 0, 50e9).astype(np.int64)
        cols["code"][r] = _pick(rng, self._app_cdf, n) + 1

    def _fill_money(self, rng, cols, sub, rows) -> None:
        r = rows["balance"]
        level = self._balance_level[sub[r]]
        cols["balance"][r] = np.rint(level * rng.lognormal(0.0, 0.6, len(r))).astype(np.int64)
        r = rows["recharge"]
        amount = _RECHARGE_AMOUNTS[_pick(rng, _cdf(_RECHARGE_WEIGHTS), len(r))]
        before = np.rint(self._balance_level[sub[r]] * 0.3 * rng.lognormal(0.0, 0.6, len(r))).astype(np.int64)
        cols["amount"][r] = amount
        cols["balance"][r] = amount + before
        r = rows["order"]
        product = _pick(rng, self._product_cdf, len(r))
        cols["code"][r] = _PRODUCT_BASE + product
        cols["amount"][r] = _ORDER_PRICES[_pick(rng, _cdf(_ORDER_WEIGHTS), len(r))]

    def _imei(self, sub: np.ndarray, generation: np.ndarray) -> np.ndarray:
        """The IMEI of a subscriber's handset number `generation` (0: the one they start with)."""
        h = _mix64((sub.astype(np.uint64) << np.uint64(16)) + generation.astype(np.uint64) + self._salt)
        tac = self._tacs[(h % np.uint64(len(self._tacs))).astype(np.int64)]
        serial = ((h >> np.uint64(20)) % np.uint64(10**6)).astype(np.int64)
        payload = tac * 10**6 + serial
        return payload * 10 + _luhn_check_digit(payload)

    def _fill_devices(self, rng, cols, sub, r, state: _StreamState) -> None:
        """IMEI checks; a new handset becomes the subscriber's from the event that reports it."""
        if not len(r):
            return
        s = sub[r]
        new = rng.random(len(r)) < _NEW_HANDSET_P
        # Handset generation at each event: the generation before this block plus
        # the subscriber's new handsets in this block up to and including it.
        by_sub = np.argsort(s, kind="stable")  # grouped by subscriber, row order within
        s_sorted = s[by_sub]
        new_sorted = new[by_sub].astype(np.int64)
        running = np.cumsum(new_sorted)
        group_start = np.ones(len(s_sorted), bool)
        group_start[1:] = s_sorted[1:] != s_sorted[:-1]
        first = np.maximum.accumulate(np.where(group_start, np.arange(len(s_sorted)), 0))
        within = running - running[first] + new_sorted[first]
        generation = state.handset[s_sorted].astype(np.int64) + within
        imei = np.empty(len(r), np.int64)
        imei[by_sub] = self._imei(s_sorted, generation)
        cols["imei"][r] = imei
        np.add.at(state.handset, s[new], 1)

    def _fill_care(self, rng, cols, rows) -> None:
        r = rows["care"]
        cols["code"][r] = _pick(rng, self._care_cdf, len(r)) + 1
        r = rows["status"]
        cols["code"][r] = _pick(rng, _cdf(_STATUS_WEIGHTS), len(r)) + 1


def _split(pending: list[dict[str, np.ndarray]], rows: int) -> tuple[dict[str, np.ndarray], list]:
    """The first `rows` rows of the pending blocks, and what remains."""
    first = pending[0]
    have = len(first["ts"])
    if have == rows:
        return first, pending[1:]
    if have > rows:
        return {k: v[:rows] for k, v in first.items()}, [{k: v[rows:] for k, v in first.items()}, *pending[1:]]
    parts, rest, needed = [], list(pending), rows
    while needed:
        block = rest.pop(0)
        size = len(block["ts"])
        if size <= needed:
            parts.append(block)
            needed -= size
        else:
            parts.append({k: v[:needed] for k, v in block.items()})
            rest.insert(0, {k: v[needed:] for k, v in block.items()})
            needed = 0
    return {name: np.concatenate([p[name] for p in parts]) for name in EVENT_COLUMNS}, rest


def _record_batch(columns: dict[str, np.ndarray]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(columns[f.name], f.type) for f in EVENT_SCHEMA], schema=EVENT_SCHEMA
    )
