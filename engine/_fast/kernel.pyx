# The rule-matching kernel.
#
# One call of Kernel.process() takes a batch of events as columns and returns
# the (row, rule) pairs that became instructions, in row order.  It works in
# chunks of CHUNK rows, in two phases per chunk:
#
#   1. Filtering, vectorised.  Rows are grouped by kind with a counting sort;
#      each rule's `where` program then runs only over the rows of the kinds in
#      its `on`, one op at a time over the whole selection, producing each
#      rule's candidate rows in row order.  Cost is proportional to the rows a
#      rule listens to, not to the batch.
#   2. Deciding.  The subscribers of rows whose candidates keep state are
#      looked up first, in one pass that prefetches hash buckets a few rows
#      ahead.  Then the window conditions (count, first, changed, sum,
#      distinct), which read and move only their own rule's words, are decided
#      rule by rule over the rule's candidates, in row order, state rows
#      prefetched WINDOW_PREFETCH candidates ahead; only their matches go on.
#      Last, row by row, the sequence conditions (after, absence) and timers,
#      then each match through the contact policy (cooldown, arbitration by
#      priority, caps); the winner is written out and starts its cooldown.
#      With a million subscribers the state does not fit in cache, so hiding
#      memory latency is most of this phase's speed.
#
# Both phases run without the GIL and make no Python call.  State is plain C
# arrays indexed by a dense subscriber id, so a checkpoint is a handful of
# memcpy's (export_state/import_state), and sharding is deciding which msisdns
# a Kernel sees (shard_of).
#
# engine/reference.py states the same semantics in plain Python; the property
# tests in tests/test_differential.py hold the two to identical output.

from libc.stdint cimport INT64_MAX, INT64_MIN, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcpy, memset

import numpy as np

from engine._fast._types cimport (
    COL_ABSENT, COL_I32, COL_I64, COL_U16, COL_U8,
    COND_ABSENCE, COND_AFTER, COND_CHANGED, COND_COUNT, COND_DISTINCT, COND_FIRST, COND_NONE, COND_SUM,
    OP_AND, OP_EQ, OP_GE, OP_GT, OP_IN, OP_LE, OP_LT, OP_NARROW_FALSE, OP_NARROW_TRUE, OP_NE, OP_NOT,
    OP_OR, OP_PREFIX,
    Bucket, Column, Entry, Map, Op, mix64, read,
)

cdef extern from *:
    """
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    #define KAIROS_PREFETCH(p) __asm__ volatile("prefetcht0 %0" : : "m"(*(const char*)(p)))
    #elif defined(__GNUC__) || defined(__clang__)
    #define KAIROS_PREFETCH(p) __builtin_prefetch((p))
    #else
    #define KAIROS_PREFETCH(p) ((void)0)
    #endif
    """
    # A hint to start loading p's cache line; never faults.  An asm statement rather than
    # __builtin_prefetch: GCC judges a function whose only effects are prefetches to have none, and
    # removes calls to it (prefetch_row) once they are direct calls.
    void prefetch "KAIROS_PREFETCH"(const void* p) noexcept nogil
    int count_leading_zeros "__builtin_clzll"(uint64_t x) noexcept nogil

# Rows per chunk: registers (CHUNK bytes each) and the gathered column
# (CHUNK int64) of one rule stay in L1/L2 while its program runs.
cdef enum:
    CHUNK = 2048
    # Rows ahead whose hash bucket the subscriber lookup prefetches: far
    # enough to hide a DRAM access behind the probes in between.
    PREFETCH_DISTANCE = 16
    # Candidates ahead that a window condition's pass prefetches rows for.
    WINDOW_PREFETCH = 16
    # Candidates of a followed rule in one chunk up to which after_pass looks for a subscriber among them.
    AFTER_SCAN_LIMIT = 64
    N_COLUMNS = 12
    KIND_COLUMN = 2
    TS_COLUMN = 0
    MSISDN_COLUMN = 1

# Layout of each event column, in engine.schema.EVENT_COLUMNS order.
cdef int COLUMN_LAYOUT[12]
COLUMN_LAYOUT[:] = [COL_I64, COL_I64, COL_U8, COL_I64, COL_I32, COL_I64,
                    COL_I64, COL_I64, COL_I64, COL_U16, COL_I64, COL_I32]
_LAYOUT_DTYPES = {COL_I64: "int64", COL_I32: "int32", COL_U16: "uint16", COL_U8: "uint8"}

cdef int64_t POW10[19]
POW10[:] = [1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000,
            1000000000, 10000000000, 100000000000, 1000000000000,
            10000000000000, 100000000000000, 1000000000000000,
            10000000000000000, 100000000000000000, 1000000000000000000]

# Sentinel for "no timestamp": validation keeps event ts >= 0.
cdef int64_t NO_TS = INT64_MIN
# A profile attribute the subscriber lacks (engine.profiles.PROFILE_MISSING): every test on it is false.
cdef int64_t MISSING = INT64_MIN
# row_prow of a chunk row whose profile row has not been looked up yet (-1: it has none).
cdef int32_t NOT_FOUND_YET = -2

cdef int64_t DAY_MS = 86400000
cdef int64_t HOUR_MS = 3600000
# Mirrored by engine.policy.HOLDOUT_SALT.
cdef uint64_t HOLDOUT_SALT = 0x2545F4914F6CDD1DULL
# Caps keys: (subscriber + 1) << 21 | is_month << 20 | (period + PERIOD_BIAS),
# periods being local days or months since the epoch (both fit 20 bits).
cdef int64_t PERIOD_BIAS = 1 << 19


def column_dtypes():
    """numpy dtype names the kernel expects, in engine.schema.EVENT_COLUMNS order."""
    return [_LAYOUT_DTYPES[COLUMN_LAYOUT[i]] for i in range(N_COLUMNS)]


def sizeof_op():
    """sizeof(Op), for the test that engine.compiler.OP_DTYPE mirrors it."""
    return sizeof(Op)


def shard_of(const int64_t[::1] msisdn, uint32_t n_shards):
    """Shard of each subscriber: the high half of mix64(msisdn) modulo n_shards.

    Stable across versions and platforms: a shard's checkpoint holds exactly
    the subscribers this function sends to it.
    """
    if n_shards == 0:
        raise ValueError("n_shards must be positive")
    out = np.empty(msisdn.shape[0], dtype=np.uint32)
    cdef uint32_t[::1] dst = out
    cdef Py_ssize_t i
    with nogil:
        for i in range(msisdn.shape[0]):
            dst[i] = <uint32_t>((mix64(<uint64_t>msisdn[i]) >> 32) % n_shards)
    return out


cdef int32_t row_stride(int32_t width) noexcept:
    """Words from one state row to the next in a rule's pool: the width, padded when that is cheap.

    A row of 1, 2, 4 or 8 words, or a multiple of 8, never straddles more
    cache lines than its size needs (the pools start on a line); any other
    row straddles one more line some of the time, and reading it then costs
    another miss.  A row is padded to the next such size when the padding is
    at most a third of its width: 13 or 14 words (a default sum, a distinct
    of 6) become 16, 3 become 4, while 9 or 10 stay as they are.
    """
    cdef int32_t padded = width
    if width > 8:
        padded = (width + 7) // 8 * 8
    elif width > 2:
        padded = 4 if width <= 4 else 8
    return padded if 3 * (padded - width) <= width else width


cdef inline int64_t digit_count(int64_t v) noexcept nogil:
    """Decimal digits of v > 0, without a loop over them: floor(log10(v)) + 1 from the bit length.

    With bits the bit length of v, t = bits * 1233 >> 12 (1233 / 4096 is
    just above log10(2)) is floor(log10(v)) or one more, and comparing v
    with 10^t settles which.  A prefix test makes this call on every row it
    tests, and subscriber numbers have 11 to 13 digits, which a loop over
    the powers of ten would walk one by one.
    """
    cdef int64_t t = (64 - count_leading_zeros(<uint64_t>v)) * 1233 >> 12
    return t - (v < POW10[t]) + 1


cdef inline bint in_sorted(const int64_t* values, int64_t n, int64_t v) noexcept nogil:
    cdef int64_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if values[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo < n and values[lo] == v


cdef inline bint has_prefix(int64_t v, const int64_t* prefixes, const int32_t* digits,
                            int64_t n) noexcept nogil:
    """Prefixes come sorted by digit count, then value: one division per digit count."""
    if v <= 0:
        return 0
    cdef int64_t nd = digit_count(v)
    cdef int64_t k = 0, end
    cdef int32_t d
    while k < n:
        d = digits[k]
        if d > nd:
            return 0
        end = k + 1
        while end < n and digits[end] == d:
            end += 1
        if in_sorted(prefixes + k, end - k, v // POW10[nd - d]):
            return 1
        k = end
    return 0


cdef inline void gather(const Column* col, Py_ssize_t base, const int32_t* sel,
                        Py_ssize_t n, int64_t* out) noexcept nogil:
    """out[j] = column[base + sel[j]], widened to int64."""
    cdef Py_ssize_t j
    cdef const int64_t* p64
    cdef const int32_t* p32
    cdef const uint16_t* p16
    cdef const uint8_t* p8
    if col.type == COL_I64:
        p64 = (<const int64_t*>col.data) + base
        for j in range(n):
            out[j] = p64[sel[j]]
    elif col.type == COL_I32:
        p32 = (<const int32_t*>col.data) + base
        for j in range(n):
            out[j] = p32[sel[j]]
    elif col.type == COL_U16:
        p16 = (<const uint16_t*>col.data) + base
        for j in range(n):
            out[j] = p16[sel[j]]
    elif col.type == COL_U8:
        p8 = (<const uint8_t*>col.data) + base
        for j in range(n):
            out[j] = p8[sel[j]]
    else:
        memset(out, 0, n * sizeof(int64_t))


cdef inline int64_t window_start(int64_t b, int64_t rem, int64_t wq, int64_t wr) noexcept nogil:
    """floor((ts - W) / R) + 1, the window's first bucket, for ts = b * R + rem and W = wq * R + wr.

    ts - W = (b - wq) * R + (rem - wr) with rem - wr in (-R, R): no second
    division on the path every qualifying event takes.
    """
    return b - wq + 1 - (rem < wr)


cdef inline bint sum_holds(int64_t* row, int64_t k, int64_t ts, int64_t v, int64_t wq, int64_t wr,
                           int64_t resolution, int64_t at_least) noexcept nogil:
    """Add v to its bucket of the ring row[2:2 + k] (row[1]: newest bucket), then test the window's sum.

    The window is the buckets from floor((ts - W) / resolution) + 1 to ts's
    own (W = wq * resolution + wr); a bucket k or more behind the newest has
    left the ring.  Bucket q sits at ring position q mod k; positions are
    walked from ts's own with wrap-around, one division per event in all.
    """
    cdef int64_t b = ts // resolution, newest = row[1], q, lo, pos, total = 0
    cdef int64_t pos_b = b % k
    cdef int64_t* ring = row + 2
    if newest == NO_TS or b - newest >= k:
        for q in range(k):
            ring[q] = 0
        newest = b
    elif b > newest:
        pos = pos_b - (b - newest) + 1    # bucket newest + 1
        if pos < 0:
            pos += k
        for q in range(b - newest):
            ring[pos] = 0
            pos += 1
            if pos == k:
                pos = 0
        newest = b
    row[1] = newest
    if b > newest - k:
        ring[pos_b] += v
    lo = window_start(b, ts - b * resolution, wq, wr)
    if lo < newest - k + 1:
        lo = newest - k + 1
    if lo < 0:    # ts >= 0: no bucket before 0 holds anything
        lo = 0
    if lo <= b:
        pos = pos_b - (b - lo)
        if pos < 0:
            pos += k
        for q in range(b - lo + 1):
            total += ring[pos]
            pos += 1
            if pos == k:
                pos = 0
    return total >= at_least


cdef inline bint distinct_holds(int64_t* row, int64_t n, int64_t ts, int64_t v, int64_t wq, int64_t wr,
                                int64_t resolution) noexcept nogil:
    """Note v (0: unknown, ignored) in the pairs row[1:1 + 2n], then count those whose bucket is in the window.

    Pairs are (value, last-seen bucket), value 0 marking a free pair; when
    all n are taken a new value replaces the pair seen longest ago, if that
    is older than its own bucket.  In event-time order the pairs are always
    n most recently seen values, which is all it takes to know whether n
    distinct values lie in the window.

    One pass over the pairs finds v's pair, the first free one and the one
    seen longest ago, and counts the other values in the window, with no
    branch on the pairs' contents; the pair that v updates is counted after.
    Pairs fill in order and a value is in at most one pair.
    """
    cdef int64_t b = ts // resolution, lo, j, val, seen, found = -1, empty = -1, oldest = 0, c = 0
    cdef int64_t oldest_seen = INT64_MAX
    lo = window_start(b, ts - b * resolution, wq, wr)
    for j in range(n):
        val = row[1 + 2 * j]
        seen = row[2 + 2 * j]
        found = j if val == v else found
        empty = j if (val == 0 and empty < 0) else empty
        oldest = j if seen < oldest_seen else oldest
        oldest_seen = seen if seen < oldest_seen else oldest_seen
        c += (val != 0) & (val != v) & (lo <= seen) & (seen <= b)
    if v == 0:
        return c >= n
    if found >= 0:
        if b > row[2 + 2 * found]:
            row[2 + 2 * found] = b
        seen = row[2 + 2 * found]
        c += (lo <= seen) & (seen <= b)
    elif empty >= 0:
        row[1 + 2 * empty] = v
        row[2 + 2 * empty] = b
        c += 1
    elif oldest_seen < b:
        c -= (lo <= oldest_seen)     # the value it replaces was counted if in the window (oldest_seen < b)
        row[1 + 2 * oldest] = v
        row[2 + 2 * oldest] = b
        c += 1
    return c >= n


cdef Py_ssize_t first_out_of_range(const Column* cols, Py_ssize_t n) noexcept nogil:
    """First row with msisdn <= 0 or ts < 0, or -1."""
    cdef const int64_t* msisdn = <const int64_t*>cols[MSISDN_COLUMN].data
    cdef const int64_t* ts = <const int64_t*>cols[TS_COLUMN].data
    cdef Py_ssize_t i
    cdef bint bad = 0
    for i in range(n):
        bad |= (msisdn[i] <= 0) | (ts[i] < 0)
    if not bad:
        return -1
    for i in range(n):
        if msisdn[i] <= 0 or ts[i] < 0:
            return i
    return -1


cdef Column as_column(object array, int layout, Py_ssize_t n) except *:
    """Borrow a pointer to a caller's array; read-only arrays are fine."""
    cdef Column col
    cdef const int64_t[::1] v64
    cdef const int32_t[::1] v32
    cdef const uint16_t[::1] v16
    cdef const uint8_t[::1] v8
    col.data = NULL
    col.type = COL_ABSENT
    if array is None:
        return col
    if len(array) != n:
        raise ValueError(f"column has {len(array)} rows, the batch {n}")
    col.type = layout
    if n == 0:
        return col
    if layout == COL_I64:
        v64 = array
        col.data = &v64[0]
    elif layout == COL_I32:
        v32 = array
        col.data = &v32[0]
    elif layout == COL_U16:
        v16 = array
        col.data = &v16[0]
    else:
        v8 = array
        col.data = &v8[0]
    return col


cdef inline int64_t floordiv(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t q = a / b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        q -= 1
    return q


cdef inline int64_t month_of_day(int64_t day) noexcept nogil:
    """Months since the epoch (year * 12 + month - 1) of a day number (days since 1970-01-01).

    Howard Hinnant's civil_from_days.
    """
    cdef int64_t z = day + 719468
    cdef int64_t era = floordiv(z, 146097)
    cdef int64_t doe = z - era * 146097
    cdef int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365
    cdef int64_t y = yoe + era * 400
    cdef int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
    cdef int64_t mp = (5 * doy + 2) / 153
    cdef int64_t m = mp + 3 if mp < 10 else mp - 9
    if m <= 2:
        y += 1
    return y * 12 + m - 1


cdef inline int64_t caps_key(int64_t sub, int64_t is_month, int64_t period) noexcept nogil:
    return ((sub + 1) << 21) | (is_month << 20) | (period + PERIOD_BIAS)


cdef extern from *:
    """
    #include <stdlib.h>
    #include <string.h>
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    /* State arrays (hash table, slots, row pools) are read at random over
       hundreds of MB.  Arrays of 2 MiB and more come straight from mmap:
       zero without a memset, faulted in only where touched, advised as
       transparent huge pages (with 4 KiB pages nearly every access also
       misses the TLB), and grown with mremap, which moves page tables
       instead of copying.  Smaller arrays use the C heap, aligned to a
       cache line.  Elsewhere than
       Linux everything uses the C heap. */
    #define KAIROS_BIG ((size_t)2 << 20)
    #define KAIROS_PAGE_ROUND(n) (((n) + 4095) & ~(size_t)4095)
    static void* kairos_big_alloc(size_t nbytes) {
    #if defined(__linux__)
        if (nbytes >= KAIROS_BIG) {
            void* p = mmap(NULL, KAIROS_PAGE_ROUND(nbytes), PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) return NULL;
    #if defined(MADV_HUGEPAGE)
            madvise(p, KAIROS_PAGE_ROUND(nbytes), MADV_HUGEPAGE);
    #endif
            return p;
        }
    #endif
        /* Aligned to a cache line, as mmap's pages are: state rows are laid out by lines (row_stride). */
    #if defined(_WIN32)
        return calloc(1, nbytes ? nbytes : 1);
    #else
        void* q = NULL;
        if (posix_memalign(&q, 64, nbytes ? nbytes : 1) != 0) return NULL;
        memset(q, 0, nbytes);
        return q;
    #endif
    }
    static void kairos_big_free(void* p, size_t nbytes) {
        if (p == NULL) return;
    #if defined(__linux__)
        if (nbytes >= KAIROS_BIG) { munmap(p, KAIROS_PAGE_ROUND(nbytes)); return; }
    #endif
        free(p);
    }
    /* Grow (never shrink) to new_nbytes; the added bytes are zero. */
    static void* kairos_big_realloc(void* p, size_t old_nbytes, size_t new_nbytes) {
        void* q;
        if (p == NULL) return kairos_big_alloc(new_nbytes);
    #if defined(__linux__) && defined(MREMAP_MAYMOVE)
        if (old_nbytes >= KAIROS_BIG) {
            q = mremap(p, KAIROS_PAGE_ROUND(old_nbytes), KAIROS_PAGE_ROUND(new_nbytes), MREMAP_MAYMOVE);
            if (q == MAP_FAILED) return NULL;
    #if defined(MADV_HUGEPAGE)
            madvise(q, KAIROS_PAGE_ROUND(new_nbytes), MADV_HUGEPAGE);
    #endif
            return q;
        }
    #endif
        q = kairos_big_alloc(new_nbytes);
        if (q == NULL) return NULL;
        memcpy(q, p, old_nbytes);
        kairos_big_free(p, old_nbytes);
        return q;
    }
    /* Fault every page of [p, p + nbytes) in now.  A read would map the shared
       zero page; writing the byte back makes the kernel supply (huge) pages,
       and compact memory for them, here rather than in the first batches. */
    static void kairos_prefault(void* p, size_t nbytes) {
        volatile char* c = (volatile char*)p;
        for (size_t i = 0; i < nbytes; i += 4096) c[i] = c[i];
    }
    """
    void* big_alloc "kairos_big_alloc"(size_t nbytes) noexcept nogil
    void* big_realloc "kairos_big_realloc"(void* p, size_t old_nbytes, size_t new_nbytes) noexcept nogil
    void big_free "kairos_big_free"(void* p, size_t nbytes) noexcept nogil
    void prefault "kairos_prefault"(void* p, size_t nbytes) noexcept nogil


cdef void* checked_big_alloc(size_t nbytes) except NULL nogil:
    """Zeroed memory for a state array; release with big_free(p, nbytes)."""
    cdef void* p = big_alloc(nbytes)
    if p == NULL:
        with gil:
            raise MemoryError(f"kernel: cannot allocate {nbytes} bytes")
    return p


cdef void* checked_big_realloc(void* p, size_t old_nbytes, size_t nbytes) except NULL nogil:
    """Grow a state array from old_nbytes to nbytes; the new part is zero."""
    cdef void* q = big_realloc(p, old_nbytes, nbytes)
    if q == NULL:
        with gil:
            raise MemoryError(f"kernel: cannot grow to {nbytes} bytes")
    return q


cdef void* checked_alloc(size_t nbytes) except NULL nogil:
    cdef void* p = calloc(1, nbytes if nbytes else 1)
    if p == NULL:
        with gil:
            raise MemoryError(f"kernel: cannot allocate {nbytes} bytes")
    return p


cdef void* checked_realloc(void* p, size_t nbytes) except NULL nogil:
    cdef void* q = realloc(p, nbytes if nbytes else 1)
    if q == NULL:
        with gil:
            raise MemoryError(f"kernel: cannot grow to {nbytes} bytes")
    return q


cdef Entry* map_find(Map* m, int64_t key) noexcept nogil:
    """The entry of key, or NULL."""
    cdef int64_t mask = m.capacity - 1
    cdef int64_t h
    if m.size == 0:
        return NULL
    h = <int64_t>(mix64(<uint64_t>key) & <uint64_t>mask)
    while m.entries[h].key != 0:
        if m.entries[h].key == key:
            return &m.entries[h]
        h = (h + 1) & mask
    return NULL


cdef int map_rehash(Map* m, int64_t capacity) except -1 nogil:
    """Re-create m at capacity (a power of two), keeping entries whose key is non-zero."""
    cdef Entry* old = m.entries
    cdef int64_t old_capacity = m.capacity, i, h, mask = capacity - 1
    m.entries = <Entry*>checked_big_alloc(capacity * sizeof(Entry))
    m.capacity = capacity
    m.size = 0
    for i in range(old_capacity):
        if old[i].key != 0:
            h = <int64_t>(mix64(<uint64_t>old[i].key) & <uint64_t>mask)
            while m.entries[h].key != 0:
                h = (h + 1) & mask
            m.entries[h] = old[i]
            m.size += 1
    big_free(old, old_capacity * sizeof(Entry))
    return 0


cdef Entry* map_insert(Map* m, int64_t key, int64_t value) except NULL nogil:
    """The entry of key, created with value if absent."""
    cdef Entry* e = map_find(m, key)
    cdef int64_t mask, h
    if e != NULL:
        return e
    if 2 * (m.size + 1) > m.capacity:
        map_rehash(m, max(2 * m.capacity, 64))
    mask = m.capacity - 1
    h = <int64_t>(mix64(<uint64_t>key) & <uint64_t>mask)
    while m.entries[h].key != 0:
        h = (h + 1) & mask
    m.entries[h].key = key
    m.entries[h].value = value
    m.size += 1
    return &m.entries[h]


cdef object map_export(Map* m):
    """(keys, values) of every entry, as int64 arrays."""
    cdef int64_t i, k = 0
    keys = np.empty(m.size, dtype=np.int64)
    values = np.empty(m.size, dtype=np.int64)
    cdef int64_t[::1] kv = keys
    cdef int64_t[::1] vv = values
    for i in range(m.capacity):
        if m.entries[i].key != 0:
            kv[k] = m.entries[i].key
            vv[k] = m.entries[i].value
            k += 1
    return keys, values


cdef class Kernel:
    """Compiled rules plus the state of every subscriber they have seen.

    Built by engine.compiler from a RuleSet; users go through engine.Engine.
    Invariants: dense subscriber ids are 0..n_subs-1 in first-seen order and
    never change; a rule's state row, once allocated, keeps its index.
    """

    def __cinit__(self, dict program, int64_t initial_subscribers=1024, int64_t lateness=0):
        cdef Py_ssize_t r, k, n = len(program["kinds"])
        if lateness < 0:
            raise ValueError("lateness must be >= 0")
        self.n_rules = n
        self.lateness = lateness
        self.max_ts = -1
        self.next_due = INT64_MAX
        self.kinds = <uint32_t*>checked_alloc(n * sizeof(uint32_t))
        self.op_begin = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.op_end = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.result_reg = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.cond = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.cond_n = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.cond_window = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.cond_column = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.cond_resolution = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.window_buckets = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.window_rest = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.cooldown = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.priority = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.width = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.stride = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.stateful_index = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.state = <int64_t**>checked_alloc(n * sizeof(int64_t*))
        self.state_rows = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.state_capacity = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.matched = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.stopped_cooldown = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.stopped_arbitrated = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.emitted = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.survivors = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.goal_of = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.cancel_of = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.filter_order = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.shadow = <uint8_t*>checked_alloc(n * sizeof(uint8_t))
        self.after_rule = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.dep_begin = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.dep_end = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.param_begin = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.param_end = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.cap_draw = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.shadow_survivors = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.row_followed = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.chan_begin = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.chan_end = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.holdout_threshold = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.holdout_seed = <uint64_t*>checked_alloc(n * sizeof(uint64_t))
        self.max_per_hour = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.goal_within = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.goal_treated = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.goal_holdout = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.guard_ts = <int64_t**>checked_alloc(n * sizeof(int64_t*))
        self.guard_head = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.guard_count = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.paused = <uint8_t*>checked_alloc(n * sizeof(uint8_t))
        self.stopped_paused = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.stopped_opt_out = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.stopped_suppressed = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.stopped_decline = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.stopped_no_channel = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.stopped_capped = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.holdout = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.active = <uint8_t*>checked_alloc(n * sizeof(uint8_t))
        self.active_first = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.active_last = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.active_days = <uint8_t*>checked_alloc(n * sizeof(uint8_t))
        self.active_start = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.active_end = <int64_t*>checked_alloc(n * sizeof(int64_t))
        self.has_audience = <uint8_t*>checked_alloc(n * sizeof(uint8_t))
        self.aud_begin = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.aud_end = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.aud_result = <int32_t*>checked_alloc(n * sizeof(int32_t))

        cdef const uint32_t[::1] kinds = program["kinds"]
        cdef const int32_t[::1] op_begin = program["op_begin"]
        cdef const int32_t[::1] op_end = program["op_end"]
        cdef const int32_t[::1] result_reg = program["result_reg"]
        cdef const int32_t[::1] cond = program["cond"]
        cdef const int64_t[::1] cond_n = program["cond_n"]
        cdef const int64_t[::1] cond_window = program["cond_window"]
        cdef const int32_t[::1] cond_column = program["cond_column"]
        cdef const int64_t[::1] cond_resolution = program["cond_resolution"]
        cdef const int64_t[::1] cooldown = program["cooldown"]
        cdef const int32_t[::1] priority = program["priority"]
        cdef const Op[::1] ops = program["ops"]
        cdef const int64_t[::1] constants = program["constants"]
        cdef const int32_t[::1] constant_digits = program["constant_digits"]
        cdef const int32_t[::1] goal_of = program["goal_of"]
        cdef const int32_t[::1] cancel_of = program["cancel_of"]
        cdef const uint8_t[::1] shadow = program["shadow"]
        cdef const int32_t[::1] after_rule = program["after_rule"]
        cdef const int32_t[::1] dep_begin = program["dep_begin"]
        cdef const int32_t[::1] dep_end = program["dep_end"]
        cdef const int32_t[::1] dep_list = program["dep_list"]
        cdef const int32_t[::1] param_begin = program["param_begin"]
        cdef const int32_t[::1] param_end = program["param_end"]
        cdef const int32_t[::1] param_list = program["param_list"]
        cdef const int32_t[::1] chan_begin = program["chan_begin"]
        cdef const int32_t[::1] chan_end = program["chan_end"]
        cdef const int32_t[::1] chan_list = program["chan_list"]
        cdef const int64_t[::1] holdout_threshold = program["holdout_threshold"]
        cdef const uint64_t[::1] holdout_seed = program["holdout_seed"]
        cdef const int64_t[::1] max_per_hour = program["max_per_hour"]
        cdef const int64_t[::1] goal_within = program["goal_within"]
        cdef const int64_t[::1] zone_start = program["zone_start"]
        cdef const int64_t[::1] zone_offset = program["zone_offset"]
        cdef const uint8_t[::1] active = program["active"]
        cdef const int64_t[::1] active_first = program["active_first"]
        cdef const int64_t[::1] active_last = program["active_last"]
        cdef const uint8_t[::1] active_days = program["active_days"]
        cdef const int64_t[::1] active_start = program["active_start"]
        cdef const int64_t[::1] active_end = program["active_end"]
        cdef const uint8_t[::1] has_audience = program["has_audience"]
        cdef const int32_t[::1] aud_begin = program["aud_begin"]
        cdef const int32_t[::1] aud_end = program["aud_end"]
        cdef const int32_t[::1] aud_result = program["aud_result"]
        cdef Py_ssize_t o
        self.n_attrs = program["n_attrs"]
        if self.n_attrs < 0:
            raise ValueError("malformed program: n_attrs")
        self.n_channels = program["n_channels"]
        if not 1 <= self.n_channels <= 64:
            raise ValueError("malformed program: 1 to 64 channels")
        self.active_mask = program["active_mask"]
        self.daily_cap = program["daily_cap"]
        self.monthly_cap = program["monthly_cap"]
        self.quiet_start = program["quiet_start"]
        self.quiet_end = program["quiet_end"]
        self.contact_days = program["contact_days"]
        if not (self.daily_cap >= 0 and self.monthly_cap >= 0 and 0 < self.contact_days < 128
                and (self.quiet_start == -1 or (0 <= self.quiet_start < DAY_MS and 0 <= self.quiet_end < DAY_MS
                                                and self.quiet_start != self.quiet_end))
                and zone_start.shape[0] >= 1 and zone_start.shape[0] == zone_offset.shape[0]
                and zone_start[0] == INT64_MIN):
            raise ValueError("malformed program: policy")
        self.n_zone = zone_start.shape[0]
        self.zone_start = <int64_t*>checked_alloc(self.n_zone * sizeof(int64_t))
        self.zone_offset = <int64_t*>checked_alloc(self.n_zone * sizeof(int64_t))
        for r in range(self.n_zone):
            self.zone_start[r] = zone_start[r]
            self.zone_offset[r] = zone_offset[r]
            if r and (zone_start[r] <= zone_start[r - 1] or not -DAY_MS < zone_offset[r] < DAY_MS):
                raise ValueError("malformed program: zone table")
        self.chan_list = <int32_t*>checked_alloc(chan_list.shape[0] * sizeof(int32_t))
        for r in range(chan_list.shape[0]):
            if not 0 <= chan_list[r] < self.n_channels:
                raise ValueError("malformed program: channel code")
            self.chan_list[r] = chan_list[r]
        self.n_regs = program["n_regs"]
        self.n_lists = program["n_lists"]
        if self.n_regs < 1 or self.n_lists < 1:
            raise ValueError("malformed program: n_regs and n_lists must be positive")
        self.dep_list = <int32_t*>checked_alloc(dep_list.shape[0] * sizeof(int32_t))
        for r in range(dep_list.shape[0]):
            if not 0 <= dep_list[r] < n:
                raise ValueError("malformed program: followers")
            self.dep_list[r] = dep_list[r]
        self.param_list = <int32_t*>checked_alloc(param_list.shape[0] * sizeof(int32_t))
        for r in range(param_list.shape[0]):
            if not 0 <= param_list[r] < N_COLUMNS:
                raise ValueError("malformed program: params")
            self.param_list[r] = param_list[r]
        self.n_stateful = 0
        for r in range(n):
            self.kinds[r] = kinds[r]
            self.op_begin[r] = op_begin[r]
            self.op_end[r] = op_end[r]
            self.result_reg[r] = result_reg[r]
            self.cond[r] = cond[r]
            self.cond_n[r] = cond_n[r]
            self.cond_window[r] = cond_window[r]
            self.cond_column[r] = cond_column[r]
            self.cond_resolution[r] = cond_resolution[r]
            self.cooldown[r] = cooldown[r]
            self.priority[r] = priority[r]
            self.goal_of[r] = goal_of[r]
            self.cancel_of[r] = cancel_of[r]
            self.shadow[r] = shadow[r]
            self.after_rule[r] = after_rule[r]
            self.dep_begin[r] = dep_begin[r]
            self.dep_end[r] = dep_end[r]
            self.param_begin[r] = param_begin[r]
            self.param_end[r] = param_end[r]
            if not (shadow[r] <= 1 and -1 <= cancel_of[r] < n and (cancel_of[r] < 0 or goal_of[r] < 0)
                    and 0 <= dep_begin[r] <= dep_end[r] <= dep_list.shape[0]
                    and 0 <= param_begin[r] <= param_end[r] <= param_list.shape[0]
                    and (cond[r] == COND_AFTER) == (after_rule[r] >= 0) and after_rule[r] < n
                    and (cond[r] == COND_ABSENCE or param_end[r] == param_begin[r])
                    and (cond[r] < COND_AFTER or cond_window[r] > 0)):
                raise ValueError(f"malformed program for rule {r}: sequence")
            self.chan_begin[r] = chan_begin[r]
            self.chan_end[r] = chan_end[r]
            self.holdout_threshold[r] = holdout_threshold[r]
            self.holdout_seed[r] = holdout_seed[r]
            self.max_per_hour[r] = max_per_hour[r]
            self.goal_within[r] = goal_within[r]
            self.active[r] = active[r]
            self.active_first[r] = active_first[r]
            self.active_last[r] = active_last[r]
            self.active_days[r] = active_days[r]
            self.active_start[r] = active_start[r]
            self.active_end[r] = active_end[r]
            if not (active[r] <= 1 and active_days[r] < 128
                    and (active_start[r] == -1 == active_end[r]
                         or (0 <= active_start[r] < DAY_MS and 0 <= active_end[r] < DAY_MS))):
                raise ValueError(f"malformed program for rule {r}: active period")
            if not (goal_within[r] >= 0 and -1 <= goal_of[r] < n and 0 <= chan_begin[r] <= chan_end[r] <= chan_list.shape[0]
                    and (goal_of[r] >= 0 or cancel_of[r] >= 0 or chan_end[r] > chan_begin[r])
                    and 0 <= max_per_hour[r] <= 1000000 and 0 <= holdout_threshold[r] <= 9007199254740992):
                raise ValueError(f"malformed program for rule {r}")
            if max_per_hour[r]:
                self.guard_ts[r] = <int64_t*>checked_alloc(max_per_hour[r] * sizeof(int64_t))
            if not (COND_NONE <= cond[r] <= COND_ABSENCE
                    and 0 <= op_begin[r] <= op_end[r] <= ops.shape[0]
                    and -1 <= result_reg[r] < self.n_regs
                    and (result_reg[r] >= 0) == (op_end[r] > op_begin[r])
                    and (cond[r] != COND_COUNT or 1 <= cond_n[r] <= 1024)
                    and (cond[r] != COND_CHANGED or 1 < cond_column[r] < N_COLUMNS)
                    and ((cond[r] != COND_SUM and cond[r] != COND_DISTINCT)
                         or (2 < cond_column[r] < N_COLUMNS
                             and 0 < cond_resolution[r] <= cond_window[r] <= 1024 * cond_resolution[r]
                             and 1 <= cond_n[r] and (cond[r] == COND_SUM or cond_n[r] <= 1024)))):
                raise ValueError(f"malformed program for rule {r}")
            if cond[r] == COND_COUNT:
                self.width[r] = <int32_t>cond_n[r]       # last instruction ts + (at_least - 1) ts
            elif cond[r] == COND_SUM:    # last instruction ts, newest bucket, one sum per bucket of the window
                self.width[r] = <int32_t>(2 + (cond_window[r] + cond_resolution[r] - 1) // cond_resolution[r])
            elif cond[r] == COND_DISTINCT:   # last instruction ts, at_least (value, bucket) pairs
                self.width[r] = <int32_t>(1 + 2 * cond_n[r])
            elif cond[r] == COND_ABSENCE:    # last instruction ts, timer start, the start event's params
                self.width[r] = <int32_t>(2 + param_end[r] - param_begin[r])
                self.has_timers = 1
            elif cond[r] != COND_NONE:
                self.width[r] = 2
            elif cooldown[r] > 0:
                self.width[r] = 1
            else:
                self.width[r] = 0
            self.stride[r] = row_stride(self.width[r])
            if cond[r] == COND_SUM or cond[r] == COND_DISTINCT:
                self.window_buckets[r] = cond_window[r] // cond_resolution[r]
                self.window_rest[r] = cond_window[r] % cond_resolution[r]
            self.stateful_index[r] = -1
            if self.width[r]:
                self.stateful_index[r] = <int32_t>self.n_stateful
                self.n_stateful += 1
        # Phase 1 lists each row's pairs in this order, so that on one event a
        # timer is cancelled before the same event may start it again.
        k = 0
        for r in range(n):
            if cancel_of[r] >= 0:
                if not (0 <= cancel_of[r] < n and cond[cancel_of[r]] == COND_ABSENCE):
                    raise ValueError(f"malformed program for rule {r}: cancel filter")
                self.filter_order[k] = <int32_t>r
                k += 1
        for r in range(n):
            if cancel_of[r] < 0:
                self.filter_order[k] = <int32_t>r
                k += 1
        for r in range(n):
            if after_rule[r] >= 0 and (after_rule[r] == r or goal_of[after_rule[r]] >= 0
                                       or cancel_of[after_rule[r]] >= 0):
                raise ValueError(f"malformed program for rule {r}: `after` must follow another campaign")
        self.n_ops = ops.shape[0]
        self.ops = <Op*>checked_alloc(self.n_ops * sizeof(Op))
        for r in range(self.n_ops):
            self.ops[r] = ops[r]
            if not self._op_is_valid(ops[r], constants.shape[0]):
                raise ValueError(f"malformed op {r}")
        self.n_constants = constants.shape[0]
        self.constants = <int64_t*>checked_alloc(self.n_constants * sizeof(int64_t))
        self.constant_digits = <int32_t*>checked_alloc(self.n_constants * sizeof(int32_t))
        for r in range(self.n_constants):
            self.constants[r] = constants[r]
            self.constant_digits[r] = constant_digits[r]
        self.prof_kinds = 0
        for r in range(n):
            self.has_audience[r] = has_audience[r]
            self.aud_begin[r] = aud_begin[r]
            self.aud_end[r] = aud_end[r]
            self.aud_result[r] = aud_result[r]
            if not (has_audience[r] <= 1 and 0 <= aud_begin[r] <= aud_end[r] <= self.n_ops
                    and -1 <= aud_result[r] < self.n_regs and (aud_result[r] >= 0) == (has_audience[r] == 1)
                    and (aud_end[r] > aud_begin[r]) == (has_audience[r] == 1)):
                raise ValueError(f"malformed program for rule {r}: audience")
            for o in range(aud_begin[r], aud_end[r]):
                # audience_holds reads no event column
                if self.ops[o].code <= OP_PREFIX and self.ops[o].a < N_COLUMNS:
                    raise ValueError(f"malformed program for rule {r}: an audience reads an event column")
            for o in range(op_begin[r], op_end[r]):
                if self.ops[o].code <= OP_PREFIX and self.ops[o].a >= N_COLUMNS:
                    self.prof_kinds |= kinds[r]

        self.regs = <uint8_t*>checked_alloc(<size_t>self.n_regs * CHUNK)
        self.lists = <int32_t*>checked_alloc(<size_t>self.n_lists * CHUNK * sizeof(int32_t))
        self.list_len = <int32_t*>checked_alloc(<size_t>self.n_lists * sizeof(int32_t))
        self.vals = <int64_t*>checked_alloc(CHUNK * sizeof(int64_t))
        self.list_rows = <int32_t*>checked_alloc(CHUNK * sizeof(int32_t))
        self.list_result = <uint8_t*>checked_alloc(CHUNK * sizeof(uint8_t))
        self.bucket_rows = <int32_t*>checked_alloc(CHUNK * sizeof(int32_t))
        self.kind_rows = <int32_t*>checked_alloc(CHUNK * sizeof(int32_t))
        self.cand_rows = <int32_t*>checked_alloc(CHUNK * n * sizeof(int32_t))
        self.cand_begin = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.cand_len = <int32_t*>checked_alloc(n * sizeof(int32_t))
        self.row_head = <int32_t*>checked_alloc(CHUNK * sizeof(int32_t))
        self.row_tail = <int32_t*>checked_alloc(CHUNK * sizeof(int32_t))
        self.pair_next = <int32_t*>checked_alloc(CHUNK * n * sizeof(int32_t))
        self.pair_rule = <int32_t*>checked_alloc(CHUNK * n * sizeof(int32_t))
        self.row_stateful = <uint8_t*>checked_alloc(CHUNK * sizeof(uint8_t))
        self.row_sub = <int64_t*>checked_alloc(CHUNK * sizeof(int64_t))
        self.need_rows = <int32_t*>checked_alloc(CHUNK * sizeof(int32_t))
        self.need_hash = <uint64_t*>checked_alloc(CHUNK * sizeof(uint64_t))
        self.row_prow = <int32_t*>checked_alloc(CHUNK * sizeof(int32_t))
        self.aud_regs = <uint8_t*>checked_alloc(<size_t>self.n_regs)

        # Subscriber index.  initial_subscribers only sizes the first
        # allocation; tests set it tiny to exercise growth.
        self.sub_capacity = max(initial_subscribers, 1)
        self.sub_msisdn = <int64_t*>checked_alloc(self.sub_capacity * sizeof(int64_t))
        self.slots = <int32_t*>checked_big_alloc(self.sub_capacity * self.n_stateful * sizeof(int32_t))
        self.sub_profile = <int32_t*>checked_big_alloc(self.sub_capacity * sizeof(int32_t))
        self.prof_msisdn = <int64_t*>checked_alloc(sizeof(int64_t))
        self.prof_allowed = <uint64_t*>checked_alloc(sizeof(uint64_t))
        self.prof_flags = <uint8_t*>checked_alloc(1)
        self.prof_days = <uint8_t*>checked_alloc(1)
        self.prof_attrs = <int64_t*>checked_alloc(sizeof(int64_t))
        self.n_prof = 0
        self.prof_table_capacity = 2
        self.prof_table = <Bucket*>checked_big_alloc(self.prof_table_capacity * sizeof(Bucket))
        self.blocks.entries = <Entry*>checked_big_alloc(64 * sizeof(Entry))
        self.blocks.capacity = 64
        self.caps.entries = <Entry*>checked_big_alloc(64 * sizeof(Entry))
        self.caps.capacity = 64
        self.policy_clock = NO_TS
        self.goal_open.entries = <Entry*>checked_big_alloc(64 * sizeof(Entry))
        self.goal_open.capacity = 64
        self.rec_free = -1
        self.goal_clock = NO_TS
        self.sent_channel = <int64_t*>checked_alloc(n * self.n_channels * sizeof(int64_t))
        self.table_capacity = 2
        while self.table_capacity < 2 * self.sub_capacity:
            self.table_capacity *= 2
        self.table = <Bucket*>checked_big_alloc(self.table_capacity * sizeof(Bucket))
        # Pay for the index's memory at construction: otherwise the first batch
        # faults it in page by page (330 ms for 2M subscribers, measured).
        with nogil:
            prefault(self.sub_msisdn, self.sub_capacity * sizeof(int64_t))
            prefault(self.slots, self.sub_capacity * self.n_stateful * sizeof(int32_t))
            prefault(self.table, self.table_capacity * sizeof(Bucket))

    def __dealloc__(self):
        cdef Py_ssize_t r
        if self.state != NULL and self.state_capacity != NULL and self.width != NULL:
            for r in range(self.n_rules):
                big_free(self.state[r], self.state_capacity[r] * self.stride[r] * sizeof(int64_t))
        free(self.kinds); free(self.op_begin); free(self.op_end); free(self.result_reg)
        free(self.cond); free(self.cond_n); free(self.cond_window); free(self.cond_column)
        free(self.cond_resolution); free(self.window_buckets); free(self.window_rest)
        free(self.cooldown); free(self.priority); free(self.width); free(self.stride); free(self.stateful_index)
        big_free(self.slots, self.sub_capacity * self.n_stateful * sizeof(int32_t))
        free(self.state); free(self.state_rows); free(self.state_capacity)
        free(self.matched); free(self.stopped_cooldown); free(self.stopped_arbitrated)
        free(self.emitted); free(self.survivors)
        free(self.ops); free(self.constants); free(self.constant_digits)
        free(self.regs); free(self.lists); free(self.list_len); free(self.list_rows)
        free(self.list_result); free(self.vals); free(self.bucket_rows); free(self.row_head)
        free(self.kind_rows); free(self.cand_rows); free(self.cand_begin); free(self.cand_len)
        free(self.row_tail); free(self.pair_next); free(self.pair_rule)
        free(self.row_stateful); free(self.row_sub); free(self.need_rows); free(self.need_hash)
        free(self.sub_msisdn)
        big_free(self.table, self.table_capacity * sizeof(Bucket))
        big_free(self.sub_profile, self.sub_capacity * sizeof(int32_t))
        if self.guard_ts != NULL and self.max_per_hour != NULL:
            for r in range(self.n_rules):
                free(self.guard_ts[r])
        free(self.goal_of); free(self.chan_begin); free(self.chan_end); free(self.chan_list)
        free(self.holdout_threshold); free(self.holdout_seed); free(self.max_per_hour)
        free(self.guard_ts); free(self.guard_head); free(self.guard_count); free(self.paused)
        free(self.stopped_paused); free(self.stopped_opt_out); free(self.stopped_suppressed)
        free(self.stopped_decline); free(self.stopped_no_channel); free(self.stopped_capped)
        free(self.holdout); free(self.sent_channel); free(self.zone_start); free(self.zone_offset)
        free(self.prof_msisdn); free(self.prof_allowed); free(self.prof_flags); free(self.prof_days)
        big_free(self.blocks.entries, self.blocks.capacity * sizeof(Entry))
        big_free(self.goal_open.entries, self.goal_open.capacity * sizeof(Entry))
        free(self.goal_within); free(self.goal_treated); free(self.goal_holdout)
        free(self.rec_ts); free(self.rec_next); free(self.rec_flags)
        free(self.active); free(self.active_first); free(self.active_last); free(self.active_days)
        free(self.active_start); free(self.active_end)
        free(self.has_audience); free(self.aud_begin); free(self.aud_end); free(self.aud_result)
        free(self.row_prow); free(self.aud_regs); free(self.prof_attrs)
        big_free(self.prof_table, self.prof_table_capacity * sizeof(Bucket))
        big_free(self.caps.entries, self.caps.capacity * sizeof(Entry))
        free(self.cancel_of); free(self.filter_order); free(self.shadow); free(self.after_rule)
        free(self.dep_begin); free(self.dep_end); free(self.dep_list)
        free(self.param_begin); free(self.param_end); free(self.param_list)
        free(self.cap_draw); free(self.shadow_survivors); free(self.row_followed)
        free(self.heap_due); free(self.heap_sub); free(self.heap_rule)
        free(self.fired_before); free(self.fired_rule); free(self.fired_channel); free(self.fired_not_before)
        free(self.fired_holdout); free(self.fired_cols)

    cdef bint _op_is_valid(self, Op op, Py_ssize_t n_constants):
        if not (0 <= op.code <= OP_NARROW_FALSE and op.a >= 0 and 0 <= op.sel < self.n_lists):
            return False
        if op.code >= OP_NARROW_TRUE:
            return 0 < op.dst < self.n_lists and op.dst != op.sel and op.a < self.n_regs
        if not 0 <= op.dst < self.n_regs:
            return False
        if op.code <= OP_PREFIX and op.a >= N_COLUMNS + self.n_attrs:
            return False
        if op.code in (OP_IN, OP_PREFIX):
            return 0 <= op.b and op.imm >= 0 and op.b + op.imm <= n_constants  # an empty set matches nothing
        if op.code in (OP_AND, OP_OR, OP_NOT):
            return op.a < self.n_regs and 0 <= op.b < self.n_regs
        return True

    # -- subscriber index ------------------------------------------------------

    cdef int grow_subscribers(self) except -1 nogil:
        cdef int64_t old = self.sub_capacity, new = 2 * old
        if new > 2147483647:
            with gil:
                raise OverflowError("a kernel holds at most 2**31 - 1 subscribers: shard by msisdn")
        self.sub_msisdn = <int64_t*>checked_realloc(self.sub_msisdn, new * sizeof(int64_t))
        self.slots = <int32_t*>checked_big_realloc(self.slots, old * self.n_stateful * sizeof(int32_t),
                                                   new * self.n_stateful * sizeof(int32_t))
        self.sub_profile = <int32_t*>checked_big_realloc(self.sub_profile, old * sizeof(int32_t),
                                                         new * sizeof(int32_t))
        self.sub_capacity = new
        return 0

    cdef int rebuild_table(self, int64_t capacity) except -1 nogil:
        """Re-create the hash table at `capacity` (a power of two) from the dense msisdn array."""
        cdef int64_t mask = capacity - 1, i, h
        cdef Bucket* table = <Bucket*>checked_big_alloc(capacity * sizeof(Bucket))
        for i in range(self.n_subs):
            h = <int64_t>(mix64(<uint64_t>self.sub_msisdn[i]) & <uint64_t>mask)
            while table[h].msisdn != 0:
                h = (h + 1) & mask
            table[h].msisdn = self.sub_msisdn[i]
            table[h].id = <int32_t>i
        big_free(self.table, self.table_capacity * sizeof(Bucket))
        self.table = table
        self.table_capacity = capacity
        return 0

    cdef int64_t find_or_insert(self, int64_t msisdn, uint64_t hash) except -1 nogil:
        """Dense id of msisdn, inserting it if new; hash is mix64(msisdn)."""
        cdef int64_t mask = self.table_capacity - 1
        cdef int64_t h = <int64_t>(hash & <uint64_t>mask)
        while self.table[h].msisdn != 0:
            if self.table[h].msisdn == msisdn:
                return self.table[h].id
            h = (h + 1) & mask
        if self.n_subs == self.sub_capacity:
            self.grow_subscribers()
        if 2 * (self.n_subs + 1) > self.table_capacity:
            self.rebuild_table(2 * self.table_capacity)
            mask = self.table_capacity - 1
            h = <int64_t>(hash & <uint64_t>mask)
            while self.table[h].msisdn != 0:
                h = (h + 1) & mask
        self.table[h].msisdn = msisdn
        self.table[h].id = <int32_t>self.n_subs
        self.sub_msisdn[self.n_subs] = msisdn
        self.n_subs += 1
        return self.n_subs - 1

    cdef int find_subscribers(self, const int64_t* msisdn, Py_ssize_t base, Py_ssize_t m) except -1 nogil:
        """row_sub[i] for every chunk row i with row_stateful[i], in row order.

        Dense ids are assigned in row order, exactly as if each row looked its
        subscriber up when decided; doing all lookups first lets the bucket of
        the row PREFETCH_DISTANCE ahead load while this one is probed.
        """
        cdef Py_ssize_t i, q, n_need = 0
        cdef const char* slots
        for i in range(m):
            if self.row_stateful[i]:
                self.need_rows[n_need] = <int32_t>i
                self.need_hash[n_need] = mix64(<uint64_t>msisdn[base + i])
                n_need += 1
        for q in range(min(n_need, <Py_ssize_t>PREFETCH_DISTANCE)):
            prefetch(&self.table[self.need_hash[q] & <uint64_t>(self.table_capacity - 1)])
        for q in range(n_need):
            if q + PREFETCH_DISTANCE < n_need:
                prefetch(&self.table[self.need_hash[q + PREFETCH_DISTANCE]
                                     & <uint64_t>(self.table_capacity - 1)])
            i = self.need_rows[q]
            self.row_sub[i] = self.find_or_insert(msisdn[base + i], self.need_hash[q])
            # All of the subscriber's slots: with more than 16 stateful rules they span two cache lines,
            # and the window passes read them to find the rows.
            slots = <const char*>&self.slots[self.row_sub[i] * self.n_stateful]
            prefetch(slots)
            prefetch(slots + self.n_stateful * sizeof(int32_t) - 1)
        return 0

    cdef inline int64_t* state_row(self, Py_ssize_t rule, int64_t sub) except NULL nogil:
        """The rule's state row for a subscriber, allocated on first use."""
        cdef int32_t* slot = &self.slots[sub * self.n_stateful + self.stateful_index[rule]]
        if slot[0] > 0:
            return self.state[rule] + <int64_t>(slot[0] - 1) * self.stride[rule]
        return self.new_state_row(rule, slot)

    cdef int64_t* new_state_row(self, Py_ssize_t rule, int32_t* slot) except NULL nogil:
        """A fresh row of the rule's pool for the subscriber whose slot this is."""
        cdef int64_t w = self.width[rule], stride = self.stride[rule], k, capacity
        cdef int64_t* row
        if self.state_rows[rule] == self.state_capacity[rule]:
            capacity = max(2 * self.state_capacity[rule], 64)
            if capacity >= 2147483647:
                with gil:
                    raise OverflowError("a rule holds at most 2**31 - 2 state rows: shard by msisdn")
            self.state[rule] = <int64_t*>checked_big_realloc(
                self.state[rule], self.state_capacity[rule] * stride * sizeof(int64_t),
                capacity * stride * sizeof(int64_t))
            self.state_capacity[rule] = capacity
        row = self.state[rule] + self.state_rows[rule] * stride
        self.state_rows[rule] += 1
        slot[0] = <int32_t>self.state_rows[rule]      # row index + 1
        for k in range(w):
            row[k] = NO_TS
        if self.cond[rule] == COND_CHANGED:
            row[1] = 0
        elif self.cond[rule] == COND_DISTINCT:
            for k in range(1, w, 2):
                row[k] = 0
        return row

    cdef inline void prefetch_row(self, Py_ssize_t rule, int64_t sub) noexcept nogil:
        """Start loading every cache line of the rule's row for a subscriber, if it has one.

        A sum or distinct row spans two or three lines, and the condition reads all of them.
        """
        cdef int32_t slot = self.slots[sub * self.n_stateful + self.stateful_index[rule]]
        cdef const char* line
        cdef const char* end
        if slot > 0:
            line = <const char*>(self.state[rule] + <int64_t>(slot - 1) * self.stride[rule])
            end = line + self.width[rule] * sizeof(int64_t)
            while line < end:
                prefetch(line)
                line += 64
            prefetch(end - 1)

    # -- contact policy ------------------------------------------------------------

    cdef int32_t profile_row(self, int64_t sub, int64_t msisdn) noexcept nogil:
        """The subscriber's row in the profile columns, -1 none; looked up once per profile load."""
        cdef int32_t cached = self.sub_profile[sub]
        cdef Py_ssize_t lo = 0, hi = self.n_prof, mid
        if cached == 0:
            while lo < hi:
                mid = (lo + hi) >> 1
                if self.prof_msisdn[mid] < msisdn:
                    lo = mid + 1
                else:
                    hi = mid
            cached = <int32_t>(lo + 1) if lo < self.n_prof and self.prof_msisdn[lo] == msisdn else -1
            self.sub_profile[sub] = cached
        return cached - 1 if cached > 0 else -1

    cdef void find_profile_rows(self, const int64_t* msisdn, Py_ssize_t base, const int32_t* rows,
                                Py_ssize_t n) noexcept nogil:
        """row_prow[i] for the chunk rows i of rows[0:n] not looked up yet in this chunk (row_prow[i] == NOT_FOUND_YET).

        Called by a profile test for the rows it runs on, so a row is looked
        up at most once per chunk, and only when a test reaches it: behind a
        selective event test (`duration >= 600 and profile.x == 1`) most rows
        never are.  One probe of prof_table per row, the bucket of the row
        PREFETCH_DISTANCE ahead requested while this one is probed, as in
        find_subscribers.  It neither creates subscribers nor touches their
        state.
        """
        cdef Py_ssize_t j, q, i, n_need = 0
        cdef uint64_t mask = <uint64_t>(self.prof_table_capacity - 1)
        cdef int64_t h, key
        for j in range(n):
            i = rows[j]
            if self.row_prow[i] == NOT_FOUND_YET:
                self.row_prow[i] = -1
                if self.n_prof:
                    self.need_rows[n_need] = <int32_t>i
                    self.need_hash[n_need] = mix64(<uint64_t>msisdn[base + i])
                    n_need += 1
        for q in range(min(n_need, <Py_ssize_t>PREFETCH_DISTANCE)):
            prefetch(&self.prof_table[self.need_hash[q] & mask])
        for q in range(n_need):
            if q + PREFETCH_DISTANCE < n_need:
                prefetch(&self.prof_table[self.need_hash[q + PREFETCH_DISTANCE] & mask])
            i = self.need_rows[q]
            key = msisdn[base + i]
            h = <int64_t>(self.need_hash[q] & mask)
            while self.prof_table[h].msisdn != 0:
                if self.prof_table[h].msisdn == key:
                    self.row_prow[i] = self.prof_table[h].id
                    break
                h = (h + 1) & <int64_t>mask

    cdef void gather_profile(self, Py_ssize_t attr, const int64_t* msisdn, Py_ssize_t base, const int32_t* rows,
                             Py_ssize_t n, int64_t* out) noexcept nogil:
        """out[j] = attribute attr of chunk row rows[j]'s profile, MISSING without one."""
        cdef Py_ssize_t j
        cdef int32_t prow
        self.find_profile_rows(msisdn, base, rows, n)
        for j in range(n):
            prow = self.row_prow[rows[j]]
            out[j] = self.prof_attrs[<int64_t>prow * self.n_attrs + attr] if prow >= 0 else MISSING

    cdef bint audience_holds(self, Py_ssize_t rule, Py_ssize_t prow) noexcept nogil:
        """The rule's audience over one profile row (prow < 0: an empty profile, every test false).

        Scalar: every op runs (they are pure), NARROW ops are skipped, so the
        result is the expression's whatever order the compiler chose.
        """
        cdef Py_ssize_t o
        cdef const Op* op
        cdef int64_t v
        cdef uint8_t t
        cdef uint8_t* regs = self.aud_regs
        for o in range(self.aud_begin[rule], self.aud_end[rule]):
            op = &self.ops[o]
            if op.code >= OP_NARROW_TRUE:
                continue
            if op.code == OP_AND:
                regs[op.dst] = regs[op.a] & regs[op.b]
                continue
            if op.code == OP_OR:
                regs[op.dst] = regs[op.a] | regs[op.b]
                continue
            if op.code == OP_NOT:
                regs[op.dst] = regs[op.a] ^ 1
                continue
            v = self.prof_attrs[prow * self.n_attrs + op.a - N_COLUMNS] if prow >= 0 else MISSING
            if v == MISSING:
                t = 0
            elif op.code == OP_EQ:
                t = v == op.imm
            elif op.code == OP_NE:
                t = v != op.imm
            elif op.code == OP_LT:
                t = v < op.imm
            elif op.code == OP_LE:
                t = v <= op.imm
            elif op.code == OP_GT:
                t = v > op.imm
            elif op.code == OP_GE:
                t = v >= op.imm
            elif op.code == OP_IN:
                t = in_sorted(self.constants + op.b, op.imm, v)
            else:
                t = has_prefix(v, self.constants + op.b, self.constant_digits + op.b, op.imm)
            regs[op.dst] = t
        return regs[self.aud_result[rule]]

    cdef Py_ssize_t zone_index(self, int64_t u) noexcept nogil:
        """The last k with zone_start[k] <= u."""
        cdef Py_ssize_t k = self.zone_hint, lo, hi, mid
        if self.zone_start[k] <= u and (k + 1 == self.n_zone or u < self.zone_start[k + 1]):
            return k
        lo, hi = 0, self.n_zone
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if self.zone_start[mid] <= u:
                lo = mid
            else:
                hi = mid
        self.zone_hint = lo
        return lo

    cdef int64_t local_day(self, int64_t u) noexcept nogil:
        """Days since 1970-01-01 of instant u in the configured zone."""
        return floordiv(u + self.zone_offset[self.zone_index(u)], DAY_MS)

    cdef bint in_period(self, Py_ssize_t rule, int64_t ts) noexcept nogil:
        """Whether instant ts lies in the rule's active period, in local time."""
        cdef int64_t local = ts + self.zone_offset[self.zone_index(ts)]
        cdef int64_t day = floordiv(local, DAY_MS)
        cdef int64_t tod = local - day * DAY_MS
        cdef int64_t start = self.active_start[rule], end = self.active_end[rule]
        if day < self.active_first[rule] or day > self.active_last[rule]:
            return 0
        if not (self.active_days[rule] >> ((day + 3) - floordiv(day + 3, 7) * 7)) & 1:   # day 0 was a Thursday
            return 0
        if start < 0:
            return 1
        if start <= end:   # start == end: no time of day at all
            return start <= tod < end
        return tod >= start or tod < end

    cdef int64_t next_allowed(self, int64_t ts, uint8_t days) noexcept nogil:
        """The first instant >= ts on a contact day (mask `days`) and outside quiet hours.

        Walks forward from ts: to the end of the quiet hours or the next local
        midnight, whichever applies, or to the next change of UTC offset if
        that comes first (so a boundary inside a DST gap lands on the
        transition, and one inside a fold on its first occurrence).
        """
        cdef int64_t u = ts, off, local, day, tod, boundary, candidate, transition
        cdef Py_ssize_t k, step
        cdef bint contact, quiet
        if days == 0x7F and self.quiet_start < 0:
            return ts
        for step in range(64):
            k = self.zone_index(u)
            off = self.zone_offset[k]
            local = u + off
            day = floordiv(local, DAY_MS)
            tod = local - day * DAY_MS
            contact = (days >> ((day + 3) - floordiv(day + 3, 7) * 7)) & 1   # day 0 was a Thursday
            quiet = 0
            if self.quiet_start >= 0:
                if self.quiet_start < self.quiet_end:
                    quiet = self.quiet_start <= tod < self.quiet_end
                else:
                    quiet = tod >= self.quiet_start or tod < self.quiet_end
            if contact and not quiet:
                return u
            if not contact:
                boundary = (day + 1) * DAY_MS
            elif tod < self.quiet_end:
                boundary = day * DAY_MS + self.quiet_end
            else:
                boundary = (day + 1) * DAY_MS + self.quiet_end
            candidate = boundary - off
            transition = self.zone_start[k + 1] if k + 1 < self.n_zone else INT64_MAX
            u = transition if transition <= candidate else candidate
        return u

    cdef int prune_caps(self) except -1 nogil:
        """Drop cap counts of local days and months before the policy clock's; grow if still full.

        Called when the caps map is full.  Instructions of events in
        event-time order are delivered on the clock's day or later, so what
        is dropped is never read again; a late event may find its day's
        count gone (docs/policy.md).
        """
        cdef int64_t today = self.local_day(self.policy_clock)
        cdef int64_t this_month = month_of_day(today)
        cdef int64_t i, key, period
        cdef Entry* e
        for i in range(self.caps.capacity):
            e = &self.caps.entries[i]
            if e.key == 0:
                continue
            period = (e.key & ((1 << 20) - 1)) - PERIOD_BIAS
            if (e.key >> 20) & 1:
                if period < this_month:
                    e.key = 0
            elif period < today:
                e.key = 0
        map_rehash(&self.caps, self.caps.capacity)
        if 4 * (self.caps.size + 1) > self.caps.capacity:
            map_rehash(&self.caps, 2 * self.caps.capacity)
        return 0

    cdef int64_t find_subscriber(self, int64_t msisdn) noexcept nogil:
        """Dense id of msisdn, -1 if the kernel has never seen it."""
        cdef int64_t mask = self.table_capacity - 1
        cdef int64_t h = <int64_t>(mix64(<uint64_t>msisdn) & <uint64_t>mask)
        while self.table[h].msisdn != 0:
            if self.table[h].msisdn == msisdn:
                return self.table[h].id
            h = (h + 1) & mask
        return -1

    # -- goals ---------------------------------------------------------------------

    cdef int64_t record_alloc(self) except -1 nogil:
        """A free goal record: from the free list, else after a sweep, else a larger pool."""
        cdef int64_t i, capacity
        if self.rec_free < 0 and self.rec_used == self.rec_capacity and self.rec_capacity:
            self.sweep_goals()
        if self.rec_free >= 0:
            i = self.rec_free
            self.rec_free = self.rec_next[i]
            return i
        if self.rec_used == self.rec_capacity:
            capacity = max(2 * self.rec_capacity, 1024)
            self.rec_ts = <int64_t*>checked_realloc(self.rec_ts, capacity * sizeof(int64_t))
            self.rec_next = <int64_t*>checked_realloc(self.rec_next, capacity * sizeof(int64_t))
            self.rec_flags = <uint8_t*>checked_realloc(self.rec_flags, capacity)
            self.rec_capacity = capacity
        self.rec_used += 1
        return self.rec_used - 1

    cdef int sweep_goals(self) except -1 nogil:
        """Free the records whose goal window closed before goal_clock.

        Events in event-time order never reach back past goal_clock, so what
        is freed could not convert again; a late goal event may miss it.
        """
        cdef int64_t i, j, prev, nxt, rule
        cdef Entry* e
        for i in range(self.goal_open.capacity):
            e = &self.goal_open.entries[i]
            if e.key == 0 or e.value == 0:
                continue
            rule = e.key % (self.n_rules + 1)
            prev = -1
            j = e.value - 1
            while j >= 0:
                nxt = self.rec_next[j]
                if self.rec_ts[j] + self.goal_within[rule] < self.goal_clock:
                    if prev < 0:
                        e.value = nxt + 1
                    else:
                        self.rec_next[prev] = nxt
                    self.rec_next[j] = self.rec_free
                    self.rec_free = j
                else:
                    prev = j
                j = nxt
        return 0

    cdef int goal_issue(self, int64_t sub, Py_ssize_t rule, int64_t ts, bint holdout) except -1 nogil:
        """Open an instruction of a rule with a goal, at the end of its subscriber's chain."""
        cdef int64_t i = self.record_alloc(), j
        cdef Entry* e
        self.rec_ts[i] = ts
        self.rec_flags[i] = holdout
        self.rec_next[i] = -1
        if ts > self.goal_clock:
            self.goal_clock = ts
        e = map_insert(&self.goal_open, (sub + 1) * (self.n_rules + 1) + rule, 0)
        if e.value == 0:
            e.value = i + 1
        else:
            j = e.value - 1
            while self.rec_next[j] >= 0:
                j = self.rec_next[j]
            self.rec_next[j] = i
        return 0

    cdef void goal_event(self, int64_t sub, Py_ssize_t rule, int64_t ts) noexcept nogil:
        """A goal event converts the earliest open instruction with ts in [t - W, t), once.

        Records whose window closed before ts are freed on the way: in
        event-time order no later goal event could convert them.
        """
        cdef Entry* e = NULL
        cdef int64_t j, prev = -1, nxt
        cdef bint convert
        if ts > self.goal_clock:
            self.goal_clock = ts
        if sub < 0:
            return
        e = map_find(&self.goal_open, (sub + 1) * (self.n_rules + 1) + rule)
        if e == NULL:
            return
        j = e.value - 1
        while j >= 0:
            nxt = self.rec_next[j]
            convert = self.rec_ts[j] < ts <= self.rec_ts[j] + self.goal_within[rule]
            if convert or self.rec_ts[j] + self.goal_within[rule] < ts:
                if convert:
                    if self.rec_flags[j] & 1:
                        self.goal_holdout[rule] += 1
                    else:
                        self.goal_treated[rule] += 1
                if prev < 0:
                    e.value = nxt + 1
                else:
                    self.rec_next[prev] = nxt
                self.rec_next[j] = self.rec_free
                self.rec_free = j
                if convert:
                    return
            else:
                prev = j
            j = nxt

    # -- contact policy, one match at a time ------------------------------------------

    cdef bint admit(self, Py_ssize_t r, int64_t sub, int32_t prow, int64_t ts) noexcept nogil:
        """Policy steps 1-3 for one match (SPEC section 8): 1 if it survives; a stop is counted."""
        cdef Entry* e
        cdef int32_t slot
        if self.paused[r]:
            self.stopped_paused[r] += 1
            return 0
        if (prow >= 0 and self.prof_flags[prow] & 1) or (
                self.blocks.size and map_find(&self.blocks, (sub + 1) * (self.n_rules + 1) + self.n_rules)):
            self.stopped_opt_out[r] += 1
            return 0
        if self.blocks.size:
            e = map_find(&self.blocks, (sub + 1) * (self.n_rules + 1) + r)
            if e != NULL and ts < e.value:
                if e.value == INT64_MAX:
                    self.stopped_suppressed[r] += 1
                else:
                    self.stopped_decline[r] += 1
                return 0
        if self.cooldown[r] > 0:
            slot = self.slots[sub * self.n_stateful + self.stateful_index[r]]
            if slot > 0 and self.state[r][<int64_t>(slot - 1) * self.stride[r]] > ts - self.cooldown[r]:
                self.stopped_cooldown[r] += 1
                return 0
        return 1

    cdef int deliver(self, Py_ssize_t r, int64_t sub, int64_t msisdn, int32_t prow, int64_t ts,
                     int32_t* channel_out, int64_t* not_before_out, uint8_t* holdout_out) except -1 nogil:
        """Policy steps 5-8 for an arbitration winner: 1 when it becomes an instruction, 0 when stopped.

        An instruction moves its rule's cooldown, the subscriber's caps, the
        guardrail, the goal windows and the counters.  A shadow rule goes the
        same way and is counted the same, but takes no cap slot and opens no
        goal window: it sends nothing, so nothing may change for live rules.
        """
        cdef uint64_t allowed = self.prof_allowed[prow] if prow >= 0 else <uint64_t>0xFFFFFFFFFFFFFFFFULL
        cdef int32_t channel = -1
        cdef Py_ssize_t k
        cdef int64_t not_before = ts, day = 0, month = 0, ring_at
        cdef bint active, in_holdout
        cdef bint capped = self.daily_cap > 0 or self.monthly_cap > 0
        cdef uint8_t days
        cdef Entry* day_count = NULL
        cdef Entry* month_count = NULL
        for k in range(self.chan_begin[r], self.chan_end[r]):
            if (allowed >> self.chan_list[k]) & 1:
                channel = self.chan_list[k]
                break
        if channel < 0:
            self.stopped_no_channel[r] += 1
            return 0
        # Steps 7 then 6: caps count by the local day of delivery.
        active = (self.active_mask >> channel) & 1
        if active:
            days = self.contact_days
            if prow >= 0 and self.prof_days[prow]:
                days = self.prof_days[prow]
            not_before = self.next_allowed(ts, days)
            if capped:
                if ts > self.policy_clock:
                    self.policy_clock = ts
                day = self.local_day(not_before)
                month = month_of_day(day)
                day_count = map_find(&self.caps, caps_key(sub, 0, day))
                month_count = map_find(&self.caps, caps_key(sub, 1, month))
                if ((self.daily_cap and day_count != NULL and day_count.value >= self.daily_cap)
                        or (self.monthly_cap and month_count != NULL
                            and month_count.value >= self.monthly_cap)):
                    self.stopped_capped[r] += 1
                    return 0
        # Guardrail: one more instruction than max_per_hour within an hour pauses the rule.
        if self.max_per_hour[r]:
            if (self.guard_count[r] == self.max_per_hour[r]
                    and self.guard_ts[r][self.guard_head[r]] > ts - HOUR_MS):
                self.paused[r] = 1
                self.stopped_paused[r] += 1
                return 0
            if self.guard_count[r] < self.max_per_hour[r]:
                ring_at = (self.guard_head[r] + self.guard_count[r]) % self.max_per_hour[r]
                self.guard_count[r] += 1
            else:
                ring_at = self.guard_head[r]
                self.guard_head[r] = (self.guard_head[r] + 1) % self.max_per_hour[r]
            self.guard_ts[r][ring_at] = ts
        # Step 8: holdout, deterministic in (msisdn, rule).
        in_holdout = (self.holdout_threshold[r] > 0 and <int64_t>(
            mix64(<uint64_t>msisdn ^ self.holdout_seed[r] ^ HOLDOUT_SALT) >> 11)
            < self.holdout_threshold[r])
        if active:
            self.cap_draw[r] += 1
            if capped and not self.shadow[r]:
                if 2 * (self.caps.size + 2) > self.caps.capacity:
                    self.prune_caps()
                map_insert(&self.caps, caps_key(sub, 0, day), 0).value += 1
                map_insert(&self.caps, caps_key(sub, 1, month), 0).value += 1
        self.emitted[r] += 1
        if in_holdout:
            self.holdout[r] += 1
        else:
            self.sent_channel[r * self.n_channels + channel] += 1
        if self.width[r]:
            self.state_row(r, sub)[0] = ts
        if self.goal_within[r] and not self.shadow[r]:
            self.goal_issue(sub, r, ts, in_holdout)
        channel_out[0] = channel
        not_before_out[0] = not_before
        holdout_out[0] = in_holdout
        return 1

    # -- sequences and timers ----------------------------------------------------------

    cdef int tell_followers(self, Py_ssize_t a, int64_t sub, int64_t ts) except -1 nogil:
        """Rule a matched at ts: each rule following it keeps the largest such ts."""
        cdef Py_ssize_t k
        cdef int64_t* row
        for k in range(self.dep_begin[a], self.dep_end[a]):
            row = self.state_row(self.dep_list[k], sub)
            if ts > row[1]:
                row[1] = ts
        return 0

    cdef bint heap_less(self, int64_t i, int64_t j) noexcept nogil:
        """Timers fire by due time, then rule, then msisdn (engine.reference fires in the same order)."""
        if self.heap_due[i] != self.heap_due[j]:
            return self.heap_due[i] < self.heap_due[j]
        if self.heap_rule[i] != self.heap_rule[j]:
            return self.heap_rule[i] < self.heap_rule[j]
        return self.sub_msisdn[self.heap_sub[i]] < self.sub_msisdn[self.heap_sub[j]]

    cdef int heap_push(self, int64_t due, Py_ssize_t rule, int64_t sub) except -1 nogil:
        cdef int64_t i, parent, capacity, t64
        cdef int32_t t32
        if self.heap_size == self.heap_capacity:
            capacity = max(2 * self.heap_capacity, 1024)
            self.heap_due = <int64_t*>checked_realloc(self.heap_due, capacity * sizeof(int64_t))
            self.heap_sub = <int64_t*>checked_realloc(self.heap_sub, capacity * sizeof(int64_t))
            self.heap_rule = <int32_t*>checked_realloc(self.heap_rule, capacity * sizeof(int32_t))
            self.heap_capacity = capacity
        i = self.heap_size
        self.heap_size += 1
        self.heap_due[i] = due
        self.heap_sub[i] = sub
        self.heap_rule[i] = <int32_t>rule
        while i > 0:
            parent = (i - 1) // 2
            if not self.heap_less(i, parent):
                break
            t64 = self.heap_due[i]; self.heap_due[i] = self.heap_due[parent]; self.heap_due[parent] = t64
            t64 = self.heap_sub[i]; self.heap_sub[i] = self.heap_sub[parent]; self.heap_sub[parent] = t64
            t32 = self.heap_rule[i]; self.heap_rule[i] = self.heap_rule[parent]; self.heap_rule[parent] = t32
            i = parent
        self.next_due = self.heap_due[0]
        return 0

    cdef void heap_pop(self) noexcept nogil:
        """Remove the top entry."""
        cdef int64_t i = 0, child, t64
        cdef int32_t t32
        self.heap_size -= 1
        self.heap_due[0] = self.heap_due[self.heap_size]
        self.heap_sub[0] = self.heap_sub[self.heap_size]
        self.heap_rule[0] = self.heap_rule[self.heap_size]
        while True:
            child = 2 * i + 1
            if child >= self.heap_size:
                break
            if child + 1 < self.heap_size and self.heap_less(child + 1, child):
                child += 1
            if not self.heap_less(child, i):
                break
            t64 = self.heap_due[i]; self.heap_due[i] = self.heap_due[child]; self.heap_due[child] = t64
            t64 = self.heap_sub[i]; self.heap_sub[i] = self.heap_sub[child]; self.heap_sub[child] = t64
            t32 = self.heap_rule[i]; self.heap_rule[i] = self.heap_rule[child]; self.heap_rule[child] = t32
            i = child
        self.next_due = self.heap_due[0] if self.heap_size else INT64_MAX

    cdef int rebuild_timers(self) except -1 nogil:
        """The heap from the pending timers in the state rows (after import_state, or to drop stale entries)."""
        cdef Py_ssize_t r
        cdef int64_t sub
        cdef int32_t slot
        cdef int64_t* row
        self.heap_size = 0
        self.timers_pending = 0
        self.next_due = INT64_MAX
        for r in range(self.n_rules):
            if self.cond[r] != COND_ABSENCE:
                continue
            for sub in range(self.n_subs):
                slot = self.slots[sub * self.n_stateful + self.stateful_index[r]]
                if slot > 0:
                    row = self.state[r] + <int64_t>(slot - 1) * self.stride[r]
                    if row[1] != NO_TS:
                        self.heap_push(row[1] + self.cond_window[r], r, sub)
                        self.timers_pending += 1
        return 0

    cdef int fire_due(self, int64_t before) except -1 nogil:
        """Fire every timer due at or before the watermark, in order; `before` is the batch row they precede."""
        cdef int64_t watermark = self.max_ts - self.lateness, due, sub
        cdef Py_ssize_t r
        cdef int32_t slot
        cdef int64_t* row
        while self.heap_size and self.heap_due[0] <= watermark:
            due = self.heap_due[0]
            sub = self.heap_sub[0]
            r = self.heap_rule[0]
            self.heap_pop()
            slot = self.slots[sub * self.n_stateful + self.stateful_index[r]]
            row = self.state[r] + <int64_t>(slot - 1) * self.stride[r]
            if row[1] == NO_TS or row[1] + self.cond_window[r] != due:
                continue    # cancelled, or already fired: a stale entry
            row[1] = NO_TS
            self.timers_pending -= 1
            self.fire(r, sub, due, row, before)
        # Cancelled timers leave stale entries behind; drop them once they outnumber the live ones.
        if self.heap_size > 4096 and self.heap_size > 4 * self.timers_pending:
            self.rebuild_timers()
        return 0

    cdef int fire(self, Py_ssize_t r, int64_t sub, int64_t due, const int64_t* row, int64_t before) except -1 nogil:
        """A timer firing is its own trigger at ts = due: a match of its rule alone, policy at due."""
        cdef int64_t msisdn = self.sub_msisdn[sub], not_before, capacity
        cdef int32_t prow = -1, channel
        cdef uint8_t in_holdout
        cdef int64_t* cols
        cdef Py_ssize_t k
        if self.active[r] and not self.in_period(r, due):
            return 0
        if self.n_prof:
            prow = self.profile_row(sub, msisdn)
        if self.has_audience[r] and not self.audience_holds(r, prow):
            return 0
        self.matched[r] += 1
        if self.dep_end[r] > self.dep_begin[r]:
            self.tell_followers(r, sub, due)
        if not self.admit(r, sub, prow, due):
            return 0
        if not self.deliver(r, sub, msisdn, prow, due, &channel, &not_before, &in_holdout) or self.shadow[r]:
            return 0
        if self.n_fired == self.fired_capacity:
            capacity = max(2 * self.fired_capacity, 256)
            self.fired_before = <int64_t*>checked_realloc(self.fired_before, capacity * sizeof(int64_t))
            self.fired_rule = <int32_t*>checked_realloc(self.fired_rule, capacity * sizeof(int32_t))
            self.fired_channel = <int32_t*>checked_realloc(self.fired_channel, capacity * sizeof(int32_t))
            self.fired_not_before = <int64_t*>checked_realloc(self.fired_not_before, capacity * sizeof(int64_t))
            self.fired_holdout = <uint8_t*>checked_realloc(self.fired_holdout, capacity * sizeof(uint8_t))
            self.fired_cols = <int64_t*>checked_realloc(self.fired_cols, capacity * N_COLUMNS * sizeof(int64_t))
            self.fired_capacity = capacity
        self.fired_before[self.n_fired] = before
        self.fired_rule[self.n_fired] = <int32_t>r
        self.fired_channel[self.n_fired] = channel
        self.fired_not_before[self.n_fired] = not_before
        self.fired_holdout[self.n_fired] = in_holdout
        cols = self.fired_cols + self.n_fired * N_COLUMNS
        memset(cols, 0, N_COLUMNS * sizeof(int64_t))
        for k in range(self.param_begin[r], self.param_end[r]):
            cols[self.param_list[k]] = row[2 + k - self.param_begin[r]]
        # The instruction's own time is the due time, a `ts` param included.
        cols[TS_COLUMN] = due
        cols[MSISDN_COLUMN] = msisdn
        self.n_fired += 1
        return 0

    # -- the two phases ----------------------------------------------------------

    cdef void run_where(self, Py_ssize_t rule, const Column* cols, Py_ssize_t base,
                        const int32_t* sel, Py_ssize_t n) noexcept nogil:
        """Run the rule's where program over the selected chunk rows sel[0:n].

        Registers are indexed by position in `sel`.  An op on list 0 runs on
        every position; on another list, only on that list's positions.
        """
        cdef Py_ssize_t o, j, t, cnt
        cdef const Op* op
        cdef uint8_t* dst
        cdef uint8_t* out
        cdef const uint8_t* ra
        cdef const uint8_t* rb
        cdef const int32_t* pos
        cdef const int32_t* rows
        cdef int32_t* narrowed
        cdef uint8_t want
        cdef int64_t imm
        cdef int64_t* vals = self.vals
        for o in range(self.op_begin[rule], self.op_end[rule]):
            op = &self.ops[o]
            imm = op.imm
            pos = self.lists + <Py_ssize_t>op.sel * CHUNK
            cnt = n if op.sel == 0 else self.list_len[op.sel]
            if op.code >= OP_NARROW_TRUE:
                ra = self.regs + <Py_ssize_t>op.a * CHUNK
                narrowed = self.lists + <Py_ssize_t>op.dst * CHUNK
                want = op.code == OP_NARROW_TRUE
                t = 0
                for j in range(cnt):
                    narrowed[t] = <int32_t>(j if op.sel == 0 else pos[j])
                    t += ra[narrowed[t]] == want
                self.list_len[op.dst] = <int32_t>t
                continue
            dst = self.regs + <Py_ssize_t>op.dst * CHUNK
            if op.code >= OP_AND:
                ra = self.regs + <Py_ssize_t>op.a * CHUNK
                rb = self.regs + <Py_ssize_t>op.b * CHUNK
                if op.sel == 0:
                    if op.code == OP_AND:
                        for j in range(cnt):
                            dst[j] = ra[j] & rb[j]
                    elif op.code == OP_OR:
                        for j in range(cnt):
                            dst[j] = ra[j] | rb[j]
                    else:
                        for j in range(cnt):
                            dst[j] = ra[j] ^ 1
                else:
                    for t in range(cnt):
                        j = pos[t]
                        if op.code == OP_AND:
                            dst[j] = ra[j] & rb[j]
                        elif op.code == OP_OR:
                            dst[j] = ra[j] | rb[j]
                        else:
                            dst[j] = ra[j] ^ 1
                continue
            # A test: gather the column at the op's rows, compare into `out`,
            # and scatter to the register when the op runs on a list.
            if op.sel == 0:
                rows = sel
                out = dst
            else:
                for t in range(cnt):
                    self.list_rows[t] = sel[pos[t]]
                rows = self.list_rows
                out = self.list_result
            if op.a < N_COLUMNS:
                gather(&cols[op.a], base, rows, cnt, vals)
            else:
                self.gather_profile(op.a - N_COLUMNS, <const int64_t*>cols[MSISDN_COLUMN].data, base, rows, cnt,
                                    vals)
            if op.code == OP_EQ:
                for t in range(cnt):
                    out[t] = vals[t] == imm
            elif op.code == OP_NE:
                for t in range(cnt):
                    out[t] = vals[t] != imm
            elif op.code == OP_LT:
                for t in range(cnt):
                    out[t] = vals[t] < imm
            elif op.code == OP_LE:
                for t in range(cnt):
                    out[t] = vals[t] <= imm
            elif op.code == OP_GT:
                for t in range(cnt):
                    out[t] = vals[t] > imm
            elif op.code == OP_GE:
                for t in range(cnt):
                    out[t] = vals[t] >= imm
            elif op.code == OP_IN:
                for t in range(cnt):
                    out[t] = in_sorted(self.constants + op.b, imm, vals[t])
            else:
                for t in range(cnt):
                    out[t] = has_prefix(vals[t], self.constants + op.b, self.constant_digits + op.b, imm)
            if op.a >= N_COLUMNS:   # a field the profile lacks fails every test, != and < included
                for t in range(cnt):
                    out[t] &= vals[t] != MISSING
            if op.sel != 0:
                for t in range(cnt):
                    dst[pos[t]] = out[t]

    cdef int filter_chunk(self, const Column* cols, Py_ssize_t base, Py_ssize_t m) except -1 nogil:
        """Phase 1: every rule's candidate rows of the chunk (cand_rows), ascending, and row_stateful.

        Rows are grouped by kind with a counting sort, so that a rule on one
        kind runs its where program over that kind's rows only; a rule on
        several kinds runs it once over the rows of any of them, in row order,
        the order its condition must see them in.
        """
        cdef const uint8_t* kind = <const uint8_t*>cols[KIND_COLUMN].data
        cdef int32_t bucket_start[257]
        cdef int32_t bucket_fill[256]
        cdef Py_ssize_t q, r, i, j, k, cnt, c, n_cand = 0
        cdef uint32_t kinds
        cdef const int32_t* sel
        cdef const uint8_t* res
        cdef int32_t* out
        memset(bucket_fill, 0, sizeof(bucket_fill))
        for i in range(m):
            bucket_fill[kind[base + i]] += 1
        bucket_start[0] = 0
        for k in range(256):
            bucket_start[k + 1] = bucket_start[k] + bucket_fill[k]
            bucket_fill[k] = bucket_start[k]
        for i in range(m):
            self.bucket_rows[bucket_fill[kind[base + i]]] = <int32_t>i
            bucket_fill[kind[base + i]] += 1
            self.row_head[i] = -1
            self.row_stateful[i] = 0
        if self.prof_kinds:   # profile rows are looked up when a profile test first reaches a row
            for i in range(m):
                self.row_prow[i] = NOT_FOUND_YET
        for q in range(self.n_rules):
            r = self.filter_order[q]
            kinds = self.kinds[r]
            self.cand_begin[r] = <int32_t>n_cand
            self.cand_len[r] = 0
            if kinds == 0:
                continue
            if kinds & (kinds - 1) == 0:
                k = 0
                while not (kinds >> k) & 1:
                    k += 1
                sel = self.bucket_rows + bucket_start[k]
                cnt = bucket_start[k + 1] - bucket_start[k]
            else:
                cnt = 0
                for i in range(m):
                    self.kind_rows[cnt] = <int32_t>i
                    cnt += (kinds >> (kind[base + i] & 31)) & <uint32_t>(kind[base + i] < 32)
                sel = self.kind_rows
            if cnt == 0:
                continue
            out = self.cand_rows + n_cand
            if self.result_reg[r] >= 0:
                self.run_where(r, cols, base, sel, cnt)
                res = self.regs + <Py_ssize_t>self.result_reg[r] * CHUNK
                c = 0
                for j in range(cnt):
                    out[c] = sel[j]
                    c += res[j]
            else:
                memcpy(out, sel, cnt * sizeof(int32_t))
                c = cnt
            self.cand_len[r] = <int32_t>c
            n_cand += c
            # Policy keeps per-subscriber state for every campaign (caps,
            # feedback, profile row); goal filters need none.
            if self.goal_of[r] < 0:
                for j in range(c):
                    self.row_stateful[out[j]] = 1
        return 0

    cdef int window_pass(self, Py_ssize_t r, const Column* cols, Py_ssize_t base) except -1 nogil:
        """Rule r's count, first, changed, sum or distinct condition over its candidates, in row order.

        Keeps only the candidates it matched.  These conditions read and move
        their own rule's condition words and nothing else (not the policy's
        word 0), so one rule's candidates can all be decided before the
        chunk's rows are, in a loop with one branch pattern, with the state
        rows requested WINDOW_PREFETCH candidates ahead.
        """
        cdef int32_t* rows = self.cand_rows + self.cand_begin[r]
        cdef Py_ssize_t cnt = self.cand_len[r], j, c = 0, k, g
        cdef int32_t cnd = self.cond[r], w = self.width[r], i
        cdef const int64_t* ts_col = <const int64_t*>cols[TS_COLUMN].data
        cdef const int64_t* msisdn_col = <const int64_t*>cols[MSISDN_COLUMN].data
        cdef int64_t ts, lo, v, last, sub, window = self.cond_window[r], n_at_least = self.cond_n[r]
        cdef int64_t no_row = NO_TS
        cdef int64_t* row = &no_row
        cdef bint match, cooled
        # A match that the rule's cooldown stops is counted here and goes no further, unless the row-order
        # phase could still see it otherwise: when the rule has followers (they are told of every match),
        # or when a guardrail may pause the rule on an earlier row of this chunk (the stop would then be
        # counted as paused).  The cooldown itself cannot lift in between: an instruction of this rule on
        # an earlier row can only have come from an event newer than this one (docs/kernel.md, "One batch").
        cdef bint stop_here = (self.cooldown[r] > 0 and self.dep_begin[r] == self.dep_end[r]
                               and (self.max_per_hour[r] == 0 or self.paused[r]))
        # Nothing but the cooldown can stop such a match, nor undo it: it is simply counted.
        cdef bint plain = (not self.active[r] and not self.has_audience[r] and not self.paused[r]
                           and self.n_prof == 0 and self.blocks.size == 0)
        cdef int64_t n_cooled = 0
        for j in range(min(cnt, <Py_ssize_t>WINDOW_PREFETCH)):
            self.prefetch_row(r, self.row_sub[rows[j]])
        for j in range(cnt):
            # The slot first, then (from the slot) the row: the slots line find_subscribers asked for
            # may have left L1 by the time this rule's pass comes to it.
            if j + 2 * WINDOW_PREFETCH < cnt:
                prefetch(&self.slots[self.row_sub[rows[j + 2 * WINDOW_PREFETCH]] * self.n_stateful
                                     + self.stateful_index[r]])
            if j + WINDOW_PREFETCH < cnt:
                self.prefetch_row(r, self.row_sub[rows[j + WINDOW_PREFETCH]])
            i = rows[j]
            g = base + i
            ts = ts_col[g]
            sub = self.row_sub[i]
            if cnd == COND_COUNT:
                # Window (ts - W, ts]; the current event counts itself.
                row = self.state_row(r, sub)
                lo = ts - window
                v = 1
                for k in range(1, w):
                    if lo < row[k] <= ts:
                        v += 1
                match = v >= n_at_least
                # Keep the at_least - 1 largest ts, ascending.
                if w > 1 and ts > row[1]:
                    k = 1
                    while k + 1 < w and row[k + 1] < ts:
                        row[k] = row[k + 1]
                        k += 1
                    row[k] = ts
            elif cnd == COND_FIRST:
                # Fires when no earlier event lies in [ts - W, ts].  A late
                # event (one newer already seen) cannot tell, so it does not
                # fire: never a false first.
                row = self.state_row(r, sub)
                last = row[1]
                match = last <= ts and last < ts - window
                if ts > last:
                    row[1] = ts
            elif cnd == COND_CHANGED:
                v = read(&cols[self.cond_column[r]], g)
                match = 0
                if v != 0:
                    row = self.state_row(r, sub)
                    match = row[1] != 0 and row[1] != v
                    row[1] = v
            elif cnd == COND_SUM:
                row = self.state_row(r, sub)
                match = sum_holds(row, w - 2, ts, read(&cols[self.cond_column[r]], g),
                                  self.window_buckets[r], self.window_rest[r], self.cond_resolution[r], n_at_least)
            else:
                row = self.state_row(r, sub)
                match = distinct_holds(row, n_at_least, ts, read(&cols[self.cond_column[r]], g),
                                       self.window_buckets[r], self.window_rest[r], self.cond_resolution[r])
            # Without a branch on match, which is as likely as not: row is valid memory whatever the
            # condition read (a changed condition reads no row when its value is 0, but does not match).
            cooled = match & stop_here & (row[0] > ts - self.cooldown[r])
            n_cooled += cooled
            if cooled and not plain:
                self.stop_in_cooldown(r, sub, msisdn_col[g], ts)
            match &= not cooled
            rows[c] = i
            c += match
        self.cand_len[r] = <int32_t>c
        if plain:
            self.matched[r] += n_cooled
            self.stopped_cooldown[r] += n_cooled
        return 0

    cdef void stop_in_cooldown(self, Py_ssize_t r, int64_t sub, int64_t msisdn, int64_t ts) noexcept nogil:
        """A match of rule r that its cooldown stops, dealt with where its window decided it.

        The row-order phase would count it exactly so: the active period and
        the audience decide whether it is a match at all, and admit() then
        counts the first of paused, opted out, blocked and cooldown that stops
        it (cooldown at the latest).  Nothing it reads can change before the
        row-order phase would reach it (window_pass says when this holds).
        """
        cdef int32_t prow = self.profile_row(sub, msisdn) if self.n_prof else -1
        if self.active[r] and not self.in_period(r, ts):
            return
        if self.has_audience[r] and not self.audience_holds(r, prow):
            return
        self.matched[r] += 1
        self.admit(r, sub, prow, ts)

    cdef void after_pass(self, Py_ssize_t r) noexcept nogil:
        """Drop rule r's `after` candidates that cannot match: the subscriber's followed rule never matched.

        An `after` rule gets its row for a subscriber when the rule it follows
        first matches for them (tell_followers), so a candidate without a row
        matches only if that rule matches on an earlier row of this chunk.  It
        can only do so on one of its own candidates, which are final once the
        window passes have run: a candidate is kept when one of those has its
        subscriber.  A followed rule that matches when its timer fires
        (absence) or that is itself an `after` rule is not known that early,
        and nor are the followed rule's candidates worth scanning when there
        are many: then every candidate stays.
        """
        cdef int32_t* rows = self.cand_rows + self.cand_begin[r]
        cdef Py_ssize_t a = self.after_rule[r], cnt = self.cand_len[r], j, t, c = 0
        cdef const int32_t* followed = self.cand_rows + self.cand_begin[a]
        cdef Py_ssize_t n_followed = self.cand_len[a]
        cdef int32_t i
        cdef int64_t sub
        cdef bint keep
        if self.cond[a] == COND_ABSENCE or self.cond[a] == COND_AFTER or n_followed > AFTER_SCAN_LIMIT:
            return
        for j in range(cnt):
            i = rows[j]
            sub = self.row_sub[i]
            keep = self.slots[sub * self.n_stateful + self.stateful_index[r]] > 0
            t = 0
            while not keep and t < n_followed and followed[t] < i:
                keep = self.row_sub[followed[t]] == sub
                t += 1
            rows[c] = i
            c += keep
        self.cand_len[r] = <int32_t>c

    cdef Py_ssize_t link_pairs(self) noexcept nogil:
        """Each chunk row's (row, rule) pairs for the decide phase, in filter_order; returns their number."""
        cdef Py_ssize_t q, r, j, n_pairs = 0
        cdef int32_t i
        cdef const int32_t* rows
        for q in range(self.n_rules):
            r = self.filter_order[q]
            rows = self.cand_rows + self.cand_begin[r]
            for j in range(self.cand_len[r]):
                i = rows[j]
                self.pair_rule[n_pairs] = <int32_t>r
                self.pair_next[n_pairs] = -1
                if self.row_head[i] < 0:
                    self.row_head[i] = <int32_t>n_pairs
                else:
                    self.pair_next[self.row_tail[i]] = <int32_t>n_pairs
                self.row_tail[i] = <int32_t>n_pairs
                n_pairs += 1
        return n_pairs

    cdef Py_ssize_t process_columns(self, const Column* cols, Py_ssize_t n,
                                    int64_t* out_row, int32_t* out_rule, int32_t* out_channel,
                                    int64_t* out_not_before, uint8_t* out_holdout) except -1 nogil:
        cdef Py_ssize_t base, m, i, k, r, g, n_out = 0, n_surv, n_shadow, n_followed, owner
        cdef int32_t p, best, prow, channel
        cdef int64_t msisdn, not_before
        cdef uint8_t in_holdout
        cdef const int64_t* ts_col = <const int64_t*>cols[TS_COLUMN].data
        cdef const int64_t* msisdn_col = <const int64_t*>cols[MSISDN_COLUMN].data
        cdef int64_t ts, sub, last
        cdef int64_t* row
        cdef int32_t slot
        cdef bint match
        base = 0
        while base < n:
            m = min(<Py_ssize_t>CHUNK, n - base)
            # Phase 1: each rule's candidates.
            self.filter_chunk(cols, base, m)
            # Phase 2: subscribers; then the window conditions, rule by rule;
            # then, in row order, the other conditions and the contact policy.
            self.find_subscribers(msisdn_col, base, m)
            for r in range(self.n_rules):
                if COND_COUNT <= self.cond[r] <= COND_DISTINCT and self.cand_len[r]:
                    self.window_pass(r, cols, base)
            for r in range(self.n_rules):
                if self.cond[r] == COND_AFTER and self.cand_len[r]:
                    self.after_pass(r)
            # No prefetching in row order: a window condition's match has just had its row read, and
            # prefetching the other pairs' rows ahead (a slot load per row) cost more than it saved, even
            # with a cooldown-only rule on every long call (bench/README.md, section 8).
            self.link_pairs()
            for i in range(m):
                g = base + i
                ts = ts_col[g]
                if self.has_timers:
                    # Timers the watermark has reached fire before the event that moved it.
                    if ts > self.max_ts:
                        self.max_ts = ts
                    if self.next_due <= self.max_ts - self.lateness:
                        self.fire_due(g)
                p = self.row_head[i]
                if p < 0:
                    continue
                sub = self.row_sub[i]
                msisdn = msisdn_col[g]
                prow = -1
                if self.n_prof and self.row_stateful[i]:
                    prow = self.profile_row(sub, msisdn)
                n_surv = 0
                n_shadow = 0
                n_followed = 0
                best = -1
                while p >= 0:
                    r = self.pair_rule[p]
                    p = self.pair_next[p]
                    if self.goal_of[r] >= 0:
                        self.goal_event(sub if self.row_stateful[i] else self.find_subscriber(msisdn),
                                        self.goal_of[r], ts)
                        continue
                    if self.cancel_of[r] >= 0:
                        # A second-on/where event with t0 <= ts < t0 + W cancels the pending timer.
                        owner = self.cancel_of[r]
                        slot = self.slots[sub * self.n_stateful + self.stateful_index[owner]]
                        if slot > 0:
                            row = self.state[owner] + <int64_t>(slot - 1) * self.stride[owner]
                            if row[1] != NO_TS and row[1] <= ts < row[1] + self.cond_window[owner]:
                                row[1] = NO_TS
                                self.timers_pending -= 1
                        continue
                    # A window condition's pair is here only if it matched (window_pass).
                    match = 1
                    if self.cond[r] == COND_AFTER:
                        # The followed rule matched on an earlier event with ts in (ts - W, ts]; its
                        # matches reach this row only after their event (tell_followers).
                        slot = self.slots[sub * self.n_stateful + self.stateful_index[r]]
                        match = 0
                        if slot > 0:
                            last = self.state[r][<int64_t>(slot - 1) * self.stride[r] + 1]
                            match = ts - self.cond_window[r] < last <= ts
                    elif self.cond[r] == COND_ABSENCE:
                        # Start a timer unless one is pending; the rule matches when it fires.
                        row = self.state_row(r, sub)
                        if row[1] == NO_TS:
                            row[1] = ts
                            for k in range(self.param_begin[r], self.param_end[r]):
                                row[2 + k - self.param_begin[r]] = read(&cols[self.param_list[k]], g)
                            self.heap_push(ts + self.cond_window[r], r, sub)
                            self.timers_pending += 1
                        continue
                    if not match:
                        continue
                    # The active period is part of the match, tested only for rules that have one.
                    if self.active[r] and not self.in_period(r, ts):
                        continue
                    if self.has_audience[r] and not self.audience_holds(r, prow):
                        continue
                    self.matched[r] += 1
                    if self.dep_end[r] > self.dep_begin[r]:
                        self.row_followed[n_followed] = <int32_t>r
                        n_followed += 1
                    # Policy steps 1-3, each match on its own (SPEC section 8).
                    if not self.admit(r, sub, prow, ts):
                        continue
                    if self.shadow[r]:
                        self.shadow_survivors[n_shadow] = <int32_t>r
                        n_shadow += 1
                        continue
                    self.survivors[n_surv] = <int32_t>r
                    n_surv += 1
                    if best < 0 or self.priority[r] > self.priority[best]:
                        best = <int32_t>r
                for k in range(n_followed):
                    self.tell_followers(self.row_followed[k], sub, ts)
                # A shadow rule is what this rule would have done had it alone been live: it loses to a
                # live survivor that would beat it, and otherwise goes on with the caps as they stand.
                for k in range(n_shadow):
                    r = self.shadow_survivors[k]
                    if best >= 0 and (self.priority[best] > self.priority[r]
                                      or (self.priority[best] == self.priority[r] and best < r)):
                        self.stopped_arbitrated[r] += 1
                    else:
                        self.deliver(r, sub, msisdn, prow, ts, &channel, &not_before, &in_holdout)
                if best < 0:
                    continue
                # Step 4: arbitration.
                for k in range(n_surv):
                    if self.survivors[k] != best:
                        self.stopped_arbitrated[self.survivors[k]] += 1
                # Steps 5-8; the winner is not replaced if it stops from here on.
                if not self.deliver(best, sub, msisdn, prow, ts, &channel, &not_before, &in_holdout):
                    continue
                out_row[n_out] = g
                out_rule[n_out] = best
                out_channel[n_out] = channel
                out_not_before[n_out] = not_before
                out_holdout[n_out] = in_holdout
                n_out += 1
            base += m
        if self.next_due <= self.max_ts - self.lateness:
            self.fire_due(n)
        return n_out

    # -- Python interface ----------------------------------------------------------

    def process(self, tuple columns, Py_ssize_t n):
        """Match one batch and apply the contact policy; returns its instructions.

        `columns` are the batch's canonical columns (engine.schema.EVENT_COLUMNS
        order, typed as column_dtypes(), C-contiguous, None for an absent
        optional column); the arrays may be read-only.  The caller guarantees
        msisdn > 0 (engine.schema.validate_events checks it).

        Returns (rows, rules, channels, not_before, holdout): per instruction,
        in row order, its event row, rule, channel code, not_before and
        holdout flag.  At most one instruction per event, so n rows of output
        space always suffice.
        """
        cdef Column cols[12]
        cdef Py_ssize_t i, n_out
        if len(columns) != N_COLUMNS:
            raise ValueError(f"expected {N_COLUMNS} columns, got {len(columns)}")
        for i in (TS_COLUMN, MSISDN_COLUMN, KIND_COLUMN):
            if columns[i] is None:
                raise ValueError(f"column {i} is required")
        for i in range(N_COLUMNS):
            cols[i] = as_column(columns[i], COLUMN_LAYOUT[i], n)
        rows = np.empty(n, dtype=np.int64)
        rules = np.empty(n, dtype=np.int32)
        channels = np.empty(n, dtype=np.int32)
        not_before = np.empty(n, dtype=np.int64)
        holdout = np.empty(n, dtype=np.uint8)
        cdef int64_t[::1] out_row = rows
        cdef int32_t[::1] out_rule = rules
        cdef int32_t[::1] out_channel = channels
        cdef int64_t[::1] out_not_before = not_before
        cdef uint8_t[::1] out_holdout = holdout
        if n == 0:
            return rows, rules, channels, not_before, holdout.view(np.bool_)
        cdef Py_ssize_t bad = first_out_of_range(cols, n)
        if bad >= 0:
            # msisdn 0 is the hash table's empty marker and ts < 0 could
            # overflow ts - W: refuse before any state moves.
            raise ValueError(f"row {bad}: msisdn must be > 0 and ts >= 0 (validate_events checks both)")
        with nogil:
            n_out = self.process_columns(cols, n, &out_row[0], &out_rule[0], &out_channel[0],
                                         &out_not_before[0], &out_holdout[0])
        return rows[:n_out], rules[:n_out], channels[:n_out], not_before[:n_out], holdout[:n_out].view(np.bool_)

    def advance(self, int64_t ts):
        """Move event time to ts as an event with that ts would (never back), firing due timers.

        Their instructions join those of take_fired(), with row -1.
        """
        if ts > self.max_ts:
            self.max_ts = ts
        with nogil:
            if self.next_due <= self.max_ts - self.lateness:
                self.fire_due(-1)

    def set_clock(self, int64_t ts):
        """Start event time at ts (a restored or reloaded engine's watermark) without firing anything now."""
        if ts > self.max_ts:
            self.max_ts = ts

    def take_fired(self):
        """The instructions of timers fired since the last call, and forget them.

        Returns (before, rules, channels, not_before, holdout, columns): per
        instruction, the batch row it precedes (-1: fired by advance(); the
        batch length: after the last row), rule, channel code, not_before,
        holdout flag, and its event columns as an n x 12 int64 matrix
        (EVENT_COLUMNS order: ts = due time, msisdn, the start event's params).
        """
        cdef Py_ssize_t n = self.n_fired
        before = self._copy_i64(self.fired_before, n)
        rules = self._copy_i32(self.fired_rule, n)
        channels = self._copy_i32(self.fired_channel, n)
        not_before = self._copy_i64(self.fired_not_before, n)
        holdout = self._copy_u8(self.fired_holdout, n).view(np.bool_)
        columns = self._copy_i64(self.fired_cols, n * N_COLUMNS).reshape(n, N_COLUMNS)
        self.n_fired = 0
        return before, rules, channels, not_before, holdout, columns

    def set_profiles(self, const int64_t[::1] msisdn, const uint64_t[::1] allowed, const uint8_t[::1] flags,
                     const uint8_t[::1] days, const int64_t[:, ::1] attrs):
        """Replace the profiles: policy columns (ProfileStore.policy_arrays) and attributes (attribute_matrix).

        msisdn sorted ascending and unique; allowed is a channel-code mask,
        flags bit 0 is opt-out, days a weekday mask (bit 0 = Monday, 0 = the
        policy's); attrs is n rows by n_attrs int64 columns, in the order of
        engine.compiler.profile_attributes, MISSING where a profile lacks the
        field.  Applies to every event processed after the call; no condition
        state moves.
        """
        cdef Py_ssize_t n = msisdn.shape[0], i
        cdef int64_t capacity, h, mask
        if allowed.shape[0] != n or flags.shape[0] != n or days.shape[0] != n or attrs.shape[0] != n:
            raise ValueError("profile columns differ in length")
        if attrs.shape[1] != self.n_attrs:
            raise ValueError(f"profile attributes: {attrs.shape[1]} columns, the rules read {self.n_attrs}")
        if n and msisdn[0] <= 0:
            raise ValueError("profile msisdns must be positive")
        for i in range(1, n):
            if msisdn[i] <= msisdn[i - 1]:
                raise ValueError("profile msisdns must be sorted and unique")
        self.prof_msisdn = <int64_t*>checked_realloc(self.prof_msisdn, max(n, 1) * sizeof(int64_t))
        self.prof_allowed = <uint64_t*>checked_realloc(self.prof_allowed, max(n, 1) * sizeof(uint64_t))
        self.prof_flags = <uint8_t*>checked_realloc(self.prof_flags, max(n, 1))
        self.prof_days = <uint8_t*>checked_realloc(self.prof_days, max(n, 1))
        self.prof_attrs = <int64_t*>checked_realloc(self.prof_attrs, max(n * self.n_attrs, 1) * sizeof(int64_t))
        if n * self.n_attrs:
            memcpy(self.prof_attrs, &attrs[0, 0], n * self.n_attrs * sizeof(int64_t))
        if n:
            memcpy(self.prof_msisdn, &msisdn[0], n * sizeof(int64_t))
            memcpy(self.prof_allowed, &allowed[0], n * sizeof(uint64_t))
            memcpy(self.prof_flags, &flags[0], n)
            memcpy(self.prof_days, &days[0], n)
        self.n_prof = n
        memset(self.sub_profile, 0, self.sub_capacity * sizeof(int32_t))
        if self.prof_kinds:
            capacity = 2
            while capacity < 2 * n:
                capacity *= 2
            big_free(self.prof_table, self.prof_table_capacity * sizeof(Bucket))
            self.prof_table = NULL
            self.prof_table_capacity = 0
            self.prof_table = <Bucket*>checked_big_alloc(capacity * sizeof(Bucket))
            self.prof_table_capacity = capacity
            mask = capacity - 1
            with nogil:
                for i in range(n):
                    h = <int64_t>(mix64(<uint64_t>msisdn[i]) & <uint64_t>mask)
                    while self.prof_table[h].msisdn != 0:
                        h = (h + 1) & mask
                    self.prof_table[h].msisdn = msisdn[i]
                    self.prof_table[h].id = <int32_t>i

    def block(self, const int64_t[::1] msisdn, const int32_t[::1] rule, const int64_t[::1] until):
        """Block rule[i] for subscriber msisdn[i] for events with ts < until[i] (feedback).

        rule == -1 blocks every rule (opt-out).  INT64_MAX blocks for
        good (accepted: counted as `suppressed`); any other value is a
        decline cooldown.  A block never shortens an earlier one.
        """
        cdef Py_ssize_t n = msisdn.shape[0], i
        cdef Entry* e
        if rule.shape[0] != n or until.shape[0] != n:
            raise ValueError("block: arrays differ in length")
        for i in range(n):
            if msisdn[i] <= 0 or not -1 <= rule[i] < self.n_rules:
                raise ValueError(f"block: row {i} names no subscriber or rule")
        with nogil:
            for i in range(n):
                e = map_insert(&self.blocks, (self.find_or_insert(msisdn[i], mix64(<uint64_t>msisdn[i])) + 1)
                               * (self.n_rules + 1) + (self.n_rules if rule[i] < 0 else rule[i]), NO_TS)
                if until[i] > e.value:
                    e.value = until[i]

    def resume(self, Py_ssize_t rule):
        """Lift a guardrail pause; the rule's hour starts afresh."""
        if not 0 <= rule < self.n_rules:
            raise IndexError(rule)
        self.paused[rule] = 0
        self.guard_head[rule] = 0
        self.guard_count[rule] = 0

    def paused_rules(self):
        """Per rule: 1 while paused by its guardrail."""
        out = np.zeros(self.n_rules, dtype=np.uint8)
        cdef Py_ssize_t r
        for r in range(self.n_rules):
            out[r] = self.paused[r]
        return out

    def counters(self):
        """Per-rule counters as int64 arrays (copies); `sent_channel` is rules x channels."""
        return {
            "matched": self._copy_i64(self.matched, self.n_rules),
            "stopped_cooldown": self._copy_i64(self.stopped_cooldown, self.n_rules),
            "stopped_arbitrated": self._copy_i64(self.stopped_arbitrated, self.n_rules),
            "emitted": self._copy_i64(self.emitted, self.n_rules),
            "stopped_paused": self._copy_i64(self.stopped_paused, self.n_rules),
            "stopped_opt_out": self._copy_i64(self.stopped_opt_out, self.n_rules),
            "stopped_suppressed": self._copy_i64(self.stopped_suppressed, self.n_rules),
            "stopped_decline_cooldown": self._copy_i64(self.stopped_decline, self.n_rules),
            "stopped_no_channel": self._copy_i64(self.stopped_no_channel, self.n_rules),
            "stopped_capped": self._copy_i64(self.stopped_capped, self.n_rules),
            "holdout": self._copy_i64(self.holdout, self.n_rules),
            "goal_treated": self._copy_i64(self.goal_treated, self.n_rules),
            "goal_holdout": self._copy_i64(self.goal_holdout, self.n_rules),
            "cap_draw": self._copy_i64(self.cap_draw, self.n_rules),
            "sent_channel": self._copy_i64(self.sent_channel, self.n_rules * self.n_channels).reshape(
                self.n_rules, self.n_channels),
        }

    def memory_bytes(self):
        """Bytes held for subscriber state: index, slots and state rows."""
        cdef int64_t total = self.table_capacity * sizeof(Bucket)
        cdef Py_ssize_t r
        total += self.sub_capacity * (sizeof(int64_t) + sizeof(int32_t) + self.n_stateful * sizeof(int32_t))
        total += (self.blocks.capacity + self.caps.capacity + self.goal_open.capacity) * sizeof(Entry)
        total += self.rec_capacity * (2 * sizeof(int64_t) + sizeof(uint8_t))
        for r in range(self.n_rules):
            total += self.state_capacity[r] * self.stride[r] * sizeof(int64_t)
        return total

    cdef object _copy(self, const void* src, Py_ssize_t n, object dtype):
        """A new numpy array of n items of dtype, copied from src."""
        out = np.empty(n, dtype=dtype)
        cdef uint8_t[::1] dst = out.view(np.uint8)
        if n:
            memcpy(&dst[0], src, dst.shape[0])
        return out

    # Typed, so that a call site cannot pair a buffer with the wrong dtype.
    cdef object _copy_i64(self, const int64_t* src, Py_ssize_t n):
        return self._copy(src, n, np.int64)

    cdef object _copy_i32(self, const int32_t* src, Py_ssize_t n):
        return self._copy(src, n, np.int32)

    cdef object _copy_u8(self, const uint8_t* src, Py_ssize_t n):
        return self._copy(src, n, np.uint8)

    def export_state(self):
        """All subscriber state and counters as flat numpy arrays (copies).

        Keys: 'msisdn' (dense id -> msisdn), 'width' (per rule), 'slots'
        (n_subs x stateful rules: state row, -1 none), the four counters, and
        per stateful rule r 'state.r' (rows * width int64 words).
        Whole-array copies: no per-subscriber loop.
        """
        cdef Py_ssize_t r, i
        state = {"msisdn": self._copy_i64(self.sub_msisdn, self.n_subs),
                 "width": self._copy_i32(self.width, self.n_rules),
                 # stored as row + 1 (so zeroed memory means "no row"); exported as row, -1 none
                 "slots": self._copy_i32(self.slots, self.n_subs * self.n_stateful).reshape(
                     self.n_subs, self.n_stateful) - 1}
        state.update(self.counters())
        for r in range(self.n_rules):
            if self.width[r]:
                # Rows as width words each, whatever the padding between them in memory.
                state[f"state.{r}"] = self._copy_i64(self.state[r], self.state_rows[r] * self.stride[r]).reshape(
                    self.state_rows[r], self.stride[r])[:, :self.width[r]].ravel()
        # Blocks are keyed by dense id, which a restore keeps; caps likewise.
        state["blocks.key"], state["blocks.value"] = map_export(&self.blocks)
        state["caps.key"], state["caps.value"] = map_export(&self.caps)
        state["policy_clock"] = np.array([self.policy_clock], dtype=np.int64)
        state["paused"] = self.paused_rules()
        guard = []
        for r in range(self.n_rules):
            for i in range(self.guard_count[r]):
                guard.append((r, self.guard_ts[r][(self.guard_head[r] + i) % self.max_per_hour[r]]))
        state["guard"] = np.array(guard, dtype=np.int64).reshape(-1, 2)
        # Open goal records, chain by chain in issue order: (key, ts, flags).
        records = []
        cdef int64_t j
        for i in range(self.goal_open.capacity):
            if self.goal_open.entries[i].key != 0:
                j = self.goal_open.entries[i].value - 1
                while j >= 0:
                    records.append((self.goal_open.entries[i].key, self.rec_ts[j], self.rec_flags[j]))
                    j = self.rec_next[j]
        state["goal_records"] = np.array(records, dtype=np.int64).reshape(-1, 3)
        state["goal_clock"] = np.array([self.goal_clock], dtype=np.int64)
        return state

    def import_state(self, dict state):
        """Load what export_state() wrote, into a kernel that has seen no events."""
        if self.n_subs:
            raise ValueError("import_state needs a fresh kernel")
        cdef const int32_t[::1] width = np.ascontiguousarray(state["width"], dtype=np.int32)
        cdef Py_ssize_t r
        if width.shape[0] != self.n_rules or any(width[r] != self.width[r] for r in range(self.n_rules)):
            raise ValueError("state was written by a kernel with different rules")
        cdef const int64_t[::1] msisdn = np.ascontiguousarray(state["msisdn"], dtype=np.int64)
        cdef int64_t n = msisdn.shape[0], rows, capacity
        slots_array = np.ascontiguousarray(state["slots"], dtype=np.int32)
        if slots_array.shape != (n, self.n_stateful):
            raise ValueError("slots are malformed")
        # Sorted neighbours, not np.unique: its hash-based path took 0.57 s for 800,000 subscribers.
        if n and (np.min(msisdn) <= 0 or (n > 1 and not (np.diff(np.sort(msisdn)) != 0).all())):
            raise ValueError("msisdn are malformed (not positive or not unique)")
        words_of = {}
        for r in range(self.n_rules):
            if self.width[r]:
                words = np.ascontiguousarray(state[f"state.{r}"], dtype=np.int64)
                if words.shape[0] % self.width[r]:
                    raise ValueError(f"state of rule {r} is malformed")
                column = slots_array[:, self.stateful_index[r]]
                if n and not -1 <= column.min() <= column.max() < words.shape[0] // self.width[r]:
                    raise ValueError(f"slots of rule {r} are malformed")
                words_of[r] = words
        while self.sub_capacity < n:
            self.grow_subscribers()
        cdef const int64_t[::1] i64
        cdef const int32_t[::1] i32 = (slots_array + 1).reshape(-1)
        if n:
            memcpy(self.sub_msisdn, &msisdn[0], n * sizeof(int64_t))
        if n * self.n_stateful:
            memcpy(self.slots, &i32[0], n * self.n_stateful * sizeof(int32_t))
        self.n_subs = n
        capacity = self.table_capacity
        while capacity < 2 * n:
            capacity *= 2
        self.rebuild_table(capacity)
        for r, words in words_of.items():
            i64 = words
            rows = i64.shape[0] // self.width[r]
            big_free(self.state[r], self.state_capacity[r] * self.stride[r] * sizeof(int64_t))
            self.state[r] = NULL
            self.state_capacity[r] = 0
            self.state[r] = <int64_t*>checked_big_alloc(max(rows, 1) * self.stride[r] * sizeof(int64_t))
            if rows:
                padded = np.zeros((rows, self.stride[r]), np.int64)
                padded[:, :self.width[r]] = words.reshape(rows, self.width[r])
                i64 = padded.reshape(-1)
                memcpy(self.state[r], &i64[0], rows * self.stride[r] * sizeof(int64_t))
            self.state_rows[r] = rows
            self.state_capacity[r] = max(rows, 1)
        self._load_counter(state, "matched", self.matched)
        self._load_counter(state, "stopped_cooldown", self.stopped_cooldown)
        self._load_counter(state, "stopped_arbitrated", self.stopped_arbitrated)
        self._load_counter(state, "emitted", self.emitted)
        self._load_counter(state, "stopped_paused", self.stopped_paused)
        self._load_counter(state, "stopped_opt_out", self.stopped_opt_out)
        self._load_counter(state, "stopped_suppressed", self.stopped_suppressed)
        self._load_counter(state, "stopped_decline_cooldown", self.stopped_decline)
        self._load_counter(state, "stopped_no_channel", self.stopped_no_channel)
        self._load_counter(state, "stopped_capped", self.stopped_capped)
        self._load_counter(state, "holdout", self.holdout)
        sent = np.ascontiguousarray(state["sent_channel"], dtype=np.int64)
        if sent.shape != (self.n_rules, self.n_channels):
            raise ValueError("counter sent_channel is malformed")
        cdef const int64_t[::1] sent_flat = sent.reshape(-1)
        if sent.size:
            memcpy(self.sent_channel, &sent_flat[0], sent.size * sizeof(int64_t))
        self._load_map(&self.blocks, state["blocks.key"], state["blocks.value"], n, self.n_rules + 1)
        self._load_map(&self.caps, state["caps.key"], state["caps.value"], n, 1 << 21)
        self.policy_clock = int(np.asarray(state["policy_clock"], dtype=np.int64)[0])
        paused = np.asarray(state["paused"], dtype=np.uint8)
        guard = np.asarray(state["guard"], dtype=np.int64).reshape(-1, 2)
        if paused.shape != (self.n_rules,) or (len(guard) and not (
                0 <= guard[:, 0].min() and guard[:, 0].max() < self.n_rules)):
            raise ValueError("guardrail state is malformed")
        for r in range(self.n_rules):
            self.paused[r] = paused[r]
            self.guard_head[r] = 0
            self.guard_count[r] = 0
        for r, t in guard.tolist():
            if self.guard_count[r] >= self.max_per_hour[r]:
                raise ValueError("guardrail state is malformed")
            self.guard_ts[r][self.guard_count[r]] = t
            self.guard_count[r] += 1
        records = np.asarray(state["goal_records"], dtype=np.int64).reshape(-1, 3)
        for key, t, flags in records.tolist():
            rule = key % (self.n_rules + 1)
            if not (self.n_rules + 1 <= key < (n + 1) * (self.n_rules + 1) and rule < self.n_rules
                    and self.goal_within[rule] and 0 <= flags <= 1):
                raise ValueError("goal state is malformed")
            self.goal_issue(key // (self.n_rules + 1) - 1, rule, t, flags)
        self.goal_clock = int(np.asarray(state["goal_clock"], dtype=np.int64)[0])
        self._load_counter(state, "goal_treated", self.goal_treated)
        self._load_counter(state, "goal_holdout", self.goal_holdout)
        if "cap_draw" in state:  # checkpoints before cap_draw existed start it at 0
            self._load_counter(state, "cap_draw", self.cap_draw)
        with nogil:
            self.rebuild_timers()

    cdef _load_map(self, Map* m, object keys, object values, int64_t n_subs, int64_t per_sub):
        """Fill an empty map from export_state's arrays; every key must name a known subscriber."""
        cdef const int64_t[::1] k = np.ascontiguousarray(keys, dtype=np.int64)
        cdef const int64_t[::1] v = np.ascontiguousarray(values, dtype=np.int64)
        cdef Py_ssize_t i
        if k.shape[0] != v.shape[0]:
            raise ValueError("policy map is malformed")
        for i in range(k.shape[0]):
            if not per_sub <= k[i] < (n_subs + 1) * per_sub:
                raise ValueError("policy map is malformed")
            if map_find(m, k[i]) != NULL:
                raise ValueError("policy map is malformed")
            map_insert(m, k[i], v[i])

    cdef _load_counter(self, dict state, str name, int64_t* dst):
        cdef const int64_t[::1] src = np.ascontiguousarray(state[name], dtype=np.int64)
        if src.shape[0] != self.n_rules:
            raise ValueError(f"counter {name} is malformed")
        if self.n_rules:
            memcpy(dst, &src[0], self.n_rules * sizeof(int64_t))
