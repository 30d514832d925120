# Instruction tables from kernel output (SPEC section 5).
#
# engine.instructions.InstructionBuilder turns the (row, rule) pairs of
# Kernel.process, and the fired absence timers of Kernel.take_fired, into one
# Arrow table per batch.  TableBuilder.build writes every buffer of that table
# in one compiled pass over the instructions: the ids, the numeric columns,
# the bytes of the rule, channel and template strings, and the params map
# (offsets, keys, and the values as decimal text), with the fired timers
# merged into place.  Python then only wraps the buffers, a constant number of
# Arrow calls per batch whatever the number of instructions or rules.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint64_t
from libc.string cimport memcpy

import numpy as np

from engine._fast._types cimport COL_I32, COL_I64, COL_U16, COL_U8, Column, mix64, read
from engine._fast.kernel cimport as_column

from engine._fast.kernel import column_dtypes

cdef enum:
    N_COLUMNS = 12
    TS_COLUMN = 0
    MSISDN_COLUMN = 1
    ID_CHARS = 32

# Layout of each event column, in engine.schema.EVENT_COLUMNS order, as the kernel reads them.
cdef int COLUMN_LAYOUT[12]
_LAYOUT_CODES = {"int64": COL_I64, "int32": COL_I32, "uint16": COL_U16, "uint8": COL_U8}
COLUMN_LAYOUT[:] = [_LAYOUT_CODES[name] for name in column_dtypes()]

# Mirrored by _GOLDEN and _SECOND_SEED in engine/instructions.py.
cdef uint64_t ID_GOLDEN = 0x9E3779B97F4A7C15ULL
cdef uint64_t ID_SECOND_SEED = 0x5851F42D4C957F2DULL
cdef const char* HEX_DIGITS = b"0123456789abcdef"
# "00" to "99": decimal text is written two digits at a time.
cdef const char* DIGIT_PAIRS = (b"00010203040506070809101112131415161718192021222324252627282930313233343536373839"
                                b"40414243444546474849505152535455565758596061626364656667686970717273747576777879"
                                b"8081828384858687888990919293949596979899")
cdef uint64_t POW10[20]
POW10[:] = [10 ** k for k in range(20)]


# A list of strings as an Arrow string array holds them: string k is data[offsets[k]:offsets[k + 1]].
cdef struct Strings:
    const int32_t* offsets
    const char* data
    Py_ssize_t n


cdef object encode_strings(list values):
    """(offsets, data) of UTF-8 strings, as numpy arrays an Arrow string array could own."""
    encoded = [str(v).encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int32)
    np.cumsum(np.array([len(e) for e in encoded], np.int32), out=offsets[1:])
    return offsets, np.frombuffer(b"".join(encoded) or b"\0", np.uint8)


cdef Strings borrow_strings(tuple encoded):
    cdef const int32_t[::1] offsets = encoded[0]
    cdef const uint8_t[::1] data = encoded[1]
    cdef Strings s
    s.offsets = &offsets[0]
    s.data = <const char*>&data[0]
    s.n = offsets.shape[0] - 1
    return s


cdef inline int64_t narrow(int64_t v, int layout) noexcept nogil:
    """A fired timer's int64 column value as the column's own type reads it (numpy's astype)."""
    if layout == COL_I32:
        return <int32_t>v
    if layout == COL_U16:
        return <uint16_t>v
    if layout == COL_U8:
        return <uint8_t>v
    return v


cdef void gather(const Column* col, int layout, Py_ssize_t c, const int64_t* source, Py_ssize_t n,
                 const int64_t* rows, const int64_t* fired, int64_t* out) noexcept nogil:
    """out[k, c] = column c of instruction k's event: a batch row (source >= 0) or a fired timer's (< 0)."""
    cdef Py_ssize_t k
    cdef int64_t s
    for k in range(n):
        s = source[k]
        if s >= 0:
            out[k * N_COLUMNS + c] = read(col, rows[s])
        else:
            out[k * N_COLUMNS + c] = narrow(fired[(-1 - s) * N_COLUMNS + c], layout)


cdef enum:
    # Instructions hashed in lockstep: their independent multiply chains fill the pipeline.
    HASH_LANES = 4


cdef void hash_ids(const int64_t* events, const int32_t* rules, Py_ssize_t n, const uint64_t* seed,
                   char* out) noexcept nogil:
    """The 32 hex digits of each instruction's id (engine.instructions.instruction_id) into out."""
    cdef uint64_t h1[HASH_LANES]
    cdef uint64_t h2[HASH_LANES]
    cdef uint64_t v
    cdef Py_ssize_t k0 = 0, k, lane, lanes, c
    while k0 < n:
        lanes = HASH_LANES if n - k0 >= HASH_LANES else n - k0
        for lane in range(lanes):
            h1[lane] = seed[rules[k0 + lane]]
            h2[lane] = mix64(h1[lane] ^ ID_SECOND_SEED)
        for c in range(N_COLUMNS):
            for lane in range(lanes):
                v = <uint64_t>events[(k0 + lane) * N_COLUMNS + c]
                h1[lane] = mix64(h1[lane] + ID_GOLDEN + v)
                h2[lane] = mix64(h2[lane] + ID_GOLDEN + v)
        for lane in range(lanes):
            k = k0 + lane
            for c in range(16):
                out[ID_CHARS * k + c] = HEX_DIGITS[(h1[lane] >> (60 - 4 * c)) & 0xF]
                out[ID_CHARS * k + 16 + c] = HEX_DIGITS[(h2[lane] >> (60 - 4 * c)) & 0xF]
        k0 += HASH_LANES


cdef inline uint64_t magnitude(int64_t v) noexcept nogil:
    # -(v + 1) + 1 keeps INT64_MIN in range.
    return <uint64_t>(-(v + 1)) + 1 if v < 0 else <uint64_t>v


cdef inline int32_t decimal_length(int64_t v) noexcept nogil:
    """Characters of v in decimal, its sign included."""
    cdef uint64_t m = magnitude(v)
    cdef int32_t digits = 1
    # Independent comparisons, not a chain of divisions.
    while digits < 20 and m >= POW10[digits]:
        digits += 1
    return digits + (v < 0)


cdef inline void write_decimal(int64_t v, char* out, int32_t length) noexcept nogil:
    """The decimal text of v in out[:length] (decimal_length(v)), as Arrow's int64 -> string cast writes it."""
    cdef uint64_t m = magnitude(v), q
    cdef char* p = out + length
    while m >= 100:  # two digits a division
        q = m // 100
        p -= 2
        memcpy(p, DIGIT_PAIRS + 2 * (m - 100 * q), 2)
        m = q
    if m >= 10:
        p -= 2
        memcpy(p, DIGIT_PAIRS + 2 * m, 2)
    else:
        p -= 1
        p[0] = <char>(48 + m)
    if v < 0:
        out[0] = 45  # '-'


cdef inline int32_t copy_string(const Strings* s, Py_ssize_t k, char* out) noexcept nogil:
    cdef int32_t length = s.offsets[k + 1] - s.offsets[k]
    memcpy(out, s.data + s.offsets[k], length)
    return length


cdef class TableBuilder:
    """Per-rule constants of a rule set, and the pass that writes a batch's instruction buffers."""

    cdef readonly Py_ssize_t n_rules
    cdef object _arrays                 # owns the memory the fields below point into
    cdef const uint64_t* seed           # per rule: its id seed (engine.instructions.rule_seed)
    cdef const int32_t* priority        # per rule
    cdef const int32_t* param_start     # per rule: its params are param_column[param_start[r]:param_start[r + 1]]
    cdef const int32_t* param_column    # event column index of each param, rule after rule
    cdef Strings rule_ids               # per rule
    cdef Strings templates              # per rule
    cdef Strings channels               # per channel code
    cdef Strings column_names           # per event column: the params map's keys

    def __init__(self, seeds, priorities, list params, list rule_ids, list templates, list channels,
                 list column_names):
        """Per rule: `seeds`, `priorities`, `params` (event column indices, in the map's key order), `rule_ids`
        and `templates`; `channels` by channel code; `column_names` in engine.schema.EVENT_COLUMNS order.
        """
        seed = np.ascontiguousarray(seeds, np.uint64).reshape(-1)
        priority = np.ascontiguousarray(priorities, np.int32).reshape(-1)
        cdef Py_ssize_t n = len(seed)
        if not (len(priority) == len(params) == len(rule_ids) == len(templates) == n):
            raise ValueError("TableBuilder: per-rule lists differ in length")
        if len(column_names) != N_COLUMNS:
            raise ValueError(f"TableBuilder: {len(column_names)} column names, not {N_COLUMNS}")
        for columns in params:
            for c in columns:
                if not 0 <= c < N_COLUMNS:
                    raise ValueError(f"TableBuilder: param column {c} out of range")
        start = np.zeros(n + 1, np.int32)
        np.cumsum(np.array([len(p) for p in params], np.int32), out=start[1:])
        column = np.array([c for p in params for c in p] or [0], np.int32)
        if not n:  # keep every pointer valid
            seed, priority = np.zeros(1, np.uint64), np.zeros(1, np.int32)
        encoded = [encode_strings(values) for values in (rule_ids, templates, channels, column_names)]
        self._arrays = (seed, priority, start, column, encoded)
        cdef const uint64_t[::1] seed_view = seed
        cdef const int32_t[::1] priority_view = priority
        cdef const int32_t[::1] start_view = start
        cdef const int32_t[::1] column_view = column
        self.n_rules = n
        self.seed = &seed_view[0]
        self.priority = &priority_view[0]
        self.param_start = &start_view[0]
        self.param_column = &column_view[0]
        self.rule_ids = borrow_strings(encoded[0])
        self.templates = borrow_strings(encoded[1])
        self.channels = borrow_strings(encoded[2])
        self.column_names = borrow_strings(encoded[3])

    def build(self, tuple columns, Py_ssize_t n_events, tuple output, tuple fired):
        """The buffers of one batch's instruction table, as a dict of numpy arrays.

        `columns` are the batch's event columns (engine.schema.EventColumns),
        `output` what Kernel.process returned for them (rows, rules, channels,
        not_before, holdout) and `fired` what Kernel.take_fired returned
        after it.  A fired timer goes before the instructions of the batch
        row it precedes, in firing order, as Engine.process documents; both
        inputs must be in that order already (the kernel writes them so).

        Keys: id_offsets and id_data; ts, msisdn, not_before (int64); rule,
        channel, priority (int32: rule index, channel code, priority); holdout
        (bool); rule_offsets/rule_data, channel_offsets/channel_data,
        template_offsets/template_data (strings); params_offsets (per
        instruction), key_offsets/key_data and value_offsets/value_data (per
        param).
        """
        cdef const int64_t[::1] rows = output[0]
        cdef const int32_t[::1] rules = output[1]
        cdef const int32_t[::1] channels = output[2]
        cdef const int64_t[::1] not_before = output[3]
        cdef const uint8_t[::1] holdout = output[4].view(np.uint8)
        cdef const int64_t[::1] f_before = fired[0]
        cdef const int32_t[::1] f_rules = fired[1]
        cdef const int32_t[::1] f_channels = fired[2]
        cdef const int64_t[::1] f_not_before = fired[3]
        cdef const uint8_t[::1] f_holdout = fired[4].view(np.uint8)
        cdef const int64_t[:, ::1] f_columns = fired[5]
        cdef Py_ssize_t nb = rows.shape[0], nf = f_before.shape[0], n = nb + nf
        cdef Py_ssize_t i, j, k, c, p, r, ch
        cdef Column cols[12]
        if len(columns) != N_COLUMNS:
            raise ValueError(f"TableBuilder.build: {len(columns)} event columns, not {N_COLUMNS}")
        if not (rules.shape[0] == channels.shape[0] == not_before.shape[0] == holdout.shape[0] == nb):
            raise ValueError("TableBuilder.build: kernel output columns differ in length")
        if not (f_rules.shape[0] == f_channels.shape[0] == f_not_before.shape[0] == f_holdout.shape[0] == nf
                and f_columns.shape[0] == nf and (nf == 0 or f_columns.shape[1] == N_COLUMNS)):
            raise ValueError("TableBuilder.build: fired timer columns differ in length")
        for c in range(N_COLUMNS):
            cols[c] = as_column(columns[c], COLUMN_LAYOUT[c], n_events)
        for j in range(nb):
            if not 0 <= rows[j] < n_events:
                raise IndexError(f"row {rows[j]} outside the batch")
            if j and rows[j] < rows[j - 1]:
                raise ValueError("TableBuilder.build: instruction rows out of order")
            if not 0 <= rules[j] < self.n_rules or not 0 <= channels[j] < self.channels.n:
                raise ValueError(f"TableBuilder.build: rule {rules[j]} or channel {channels[j]} out of range")
        for i in range(nf):
            if i and f_before[i] < f_before[i - 1]:
                raise ValueError("TableBuilder.build: fired timers out of order")
            if not 0 <= f_rules[i] < self.n_rules or not 0 <= f_channels[i] < self.channels.n:
                raise ValueError(f"TableBuilder.build: rule {f_rules[i]} or channel {f_channels[i]} out of range")

        # source[k]: batch instruction j as j, fired timer i as -1 - i.
        source_array = np.empty(n, np.int64)
        cdef int64_t[::1] source = source_array
        out_rule = np.empty(n, np.int32)
        out_channel = np.empty(n, np.int32)
        cdef int32_t[::1] rule_v = out_rule, channel_v = out_channel
        params_offsets = np.empty(n + 1, np.int32)
        cdef int32_t[::1] params_offsets_v = params_offsets
        cdef int64_t n_params = 0, rule_bytes = 0, template_bytes = 0, channel_bytes = 0
        with nogil:
            i = 0
            j = 0
            params_offsets_v[0] = 0
            for k in range(n):
                # A timer fired before row b goes before the instructions of rows >= b.
                if i < nf and (j == nb or f_before[i] <= rows[j]):
                    source[k] = -1 - i
                    r = f_rules[i]
                    ch = f_channels[i]
                    i += 1
                else:
                    source[k] = j
                    r = rules[j]
                    ch = channels[j]
                    j += 1
                rule_v[k] = <int32_t>r
                channel_v[k] = <int32_t>ch
                n_params += self.param_start[r + 1] - self.param_start[r]
                params_offsets_v[k + 1] = <int32_t>n_params
                rule_bytes += self.rule_ids.offsets[r + 1] - self.rule_ids.offsets[r]
                template_bytes += self.templates.offsets[r + 1] - self.templates.offsets[r]
                channel_bytes += self.channels.offsets[ch + 1] - self.channels.offsets[ch]

        id_offsets = np.arange(0, ID_CHARS * (n + 1), ID_CHARS, dtype=np.int32)
        id_data = np.empty(ID_CHARS * n + 1, np.uint8)
        ts = np.empty(n, np.int64)
        msisdn = np.empty(n, np.int64)
        out_not_before = np.empty(n, np.int64)
        priority = np.empty(n, np.int32)
        out_holdout = np.empty(n, np.uint8)
        rule_offsets = np.empty(n + 1, np.int32)
        # Byte buffers get one spare byte, so that their first byte always exists to point at.
        rule_data = np.empty(rule_bytes + 1, np.uint8)
        channel_offsets = np.empty(n + 1, np.int32)
        channel_data = np.empty(channel_bytes + 1, np.uint8)
        template_offsets = np.empty(n + 1, np.int32)
        template_data = np.empty(template_bytes + 1, np.uint8)
        key_offsets = np.empty(n_params + 1, np.int32)
        value_offsets = np.empty(n_params + 1, np.int32)
        values_array = np.empty(n_params, np.int64)
        key_index_array = np.empty(n_params, np.int32)
        value_length_array = np.empty(n_params, np.int32)
        cdef uint8_t[::1] id_v = id_data, holdout_v = out_holdout
        cdef int64_t[::1] ts_v = ts, msisdn_v = msisdn, not_before_v = out_not_before, values = values_array
        cdef int32_t[::1] priority_v = priority, key_index = key_index_array, value_length = value_length_array
        cdef int32_t[::1] rule_off = rule_offsets, channel_off = channel_offsets, template_off = template_offsets
        cdef int32_t[::1] key_off = key_offsets, value_off = value_offsets
        cdef uint8_t[::1] rule_text = rule_data, channel_text = channel_data, template_text = template_data
        # The triggering event of each instruction, gathered a column at a time so that the column's
        # type is looked at once; hashing then reads one contiguous row per instruction.
        events_array = np.empty((max(n, 1), N_COLUMNS), np.int64)
        cdef int64_t[:, ::1] event = events_array
        cdef int64_t key_bytes = 0, value_bytes = 0
        with nogil:
            for c in range(N_COLUMNS):
                gather(&cols[c], COLUMN_LAYOUT[c], c, &source[0] if n else NULL, n, &rows[0] if nb else NULL,
                       &f_columns[0, 0] if nf else NULL, &event[0, 0])
            hash_ids(&event[0, 0], &rule_v[0] if n else NULL, n, self.seed, <char*>&id_v[0])
            rule_off[0] = channel_off[0] = template_off[0] = 0
            key_off[0] = value_off[0] = 0
            p = 0
            for k in range(n):
                r = rule_v[k]
                ch = channel_v[k]
                if source[k] >= 0:
                    j = source[k]
                    not_before_v[k] = not_before[j]
                    holdout_v[k] = holdout[j]
                else:
                    i = -1 - source[k]
                    not_before_v[k] = f_not_before[i]
                    holdout_v[k] = f_holdout[i]
                ts_v[k] = event[k, TS_COLUMN]
                msisdn_v[k] = event[k, MSISDN_COLUMN]
                priority_v[k] = self.priority[r]
                rule_off[k + 1] = rule_off[k] + copy_string(&self.rule_ids, r, <char*>&rule_text[0] + rule_off[k])
                template_off[k + 1] = template_off[k] + copy_string(
                    &self.templates, r, <char*>&template_text[0] + template_off[k])
                channel_off[k + 1] = channel_off[k] + copy_string(
                    &self.channels, ch, <char*>&channel_text[0] + channel_off[k])
                for c in range(self.param_start[r], self.param_start[r + 1]):
                    key_index[p] = self.param_column[c]
                    values[p] = event[k, self.param_column[c]]
                    key_bytes += self.column_names.offsets[key_index[p] + 1] - self.column_names.offsets[key_index[p]]
                    value_length[p] = decimal_length(values[p])
                    value_bytes += value_length[p]
                    p += 1

        key_data = np.empty(key_bytes + 1, np.uint8)
        value_data = np.empty(value_bytes + 1, np.uint8)
        cdef uint8_t[::1] key_text = key_data, value_text = value_data
        with nogil:
            for p in range(n_params):
                key_off[p + 1] = key_off[p] + copy_string(&self.column_names, key_index[p],
                                                          <char*>&key_text[0] + key_off[p])
                write_decimal(values[p], <char*>&value_text[0] + value_off[p], value_length[p])
                value_off[p + 1] = value_off[p] + value_length[p]
        return {
            "id_offsets": id_offsets, "id_data": id_data[:ID_CHARS * n], "ts": ts, "msisdn": msisdn,
            "not_before": out_not_before,
            "rule": out_rule, "channel": out_channel, "priority": priority, "holdout": out_holdout.view(np.bool_),
            "rule_offsets": rule_offsets, "rule_data": rule_data[:rule_bytes], "channel_offsets": channel_offsets,
            "channel_data": channel_data[:channel_bytes], "template_offsets": template_offsets,
            "template_data": template_data[:template_bytes], "params_offsets": params_offsets,
            "key_offsets": key_offsets, "key_data": key_data[:key_bytes], "value_offsets": value_offsets,
            "value_data": value_data[:value_bytes],
        }
