# Compiled msgpack record decoder for adapters.wire.
#
# A wire message is one msgpack array of records; each record is an array
# (positional fields) or a map (field name -> value).  RecordDecoder walks the
# bytes once, without the GIL, and writes every field it knows straight into a
# preallocated int64 column: no Python object is made per value, per row or per
# key.  Value maps (kind names, a feed's own codes) are looked up in C as well.
# What stays in Python (adapters/wire.py) is per column (scale, constants,
# validation against SPEC section 2) or per rejected row (its reason and its
# record for the dead-letter file).
#
# Every read is checked against the end of the buffer: a claimed length that
# runs past the end stops decoding at the row it belongs to, never reads
# beyond.  Rows whose boundary is still known (the row's own header and its
# elements are readable) are rejected one by one and decoding goes on with the
# next row; only when the bytes themselves run out or hold the never-used
# type byte 0xc1 is the rest of the message given up.

cimport cython
from libc.math cimport floor
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memcpy

import numpy as np

# Classes of a msgpack value, from its type byte.
cdef enum:
    V_INT = 0      # any integer that fits int64
    V_BIGUINT = 1  # uint64 above INT64_MAX
    V_NIL = 2
    V_BOOL = 3
    V_FLOAT = 4
    V_STR = 5
    V_BIN = 6
    V_EXT = 7
    V_ARRAY = 8
    V_MAP = 9

# Per-row outcome; adapters/wire.py turns these into reject reasons and details.
# Keep in step with ROW_STATUS below.
cdef enum:
    ST_OK = 0
    ST_NOT_RECORD = 1   # the row is neither an array nor a map
    ST_ARITY = 2        # positional row with another number of fields than configured
    ST_MISSING = 3      # a map row without a required field
    ST_NOT_INTEGER = 4  # str without a value map, bool, bin, ext, array, map, or a non-integral float
    ST_NIL = 5          # nil in a required field
    ST_OUT_OF_RANGE = 6  # an integer or float beyond int64
    ST_UNMAPPED = 7     # a value the field's value map does not name

ROW_STATUS = ("ok", "not_record", "arity", "missing", "not_integer", "nil", "out_of_range", "unmapped")

# How decoding of the whole message ended.  Keep in step with STOP below.
cdef enum:
    STOP_END = 0        # the array was read and ended exactly at the end of the message
    STOP_TRAILING = 1   # the array was read; bytes follow it
    STOP_NOT_ARRAY = 2  # the message is a msgpack value, but not an array
    STOP_TRUNCATED = 3  # a length runs past the end of the message
    STOP_INVALID = 4    # the never-used type byte 0xc1

STOP = ("end", "trailing", "not_array", "truncated", "invalid")

cdef enum:
    # Fields per rejected row in the reject table: row, status, slot, start, end, aux.
    REJECT_FIELDS = 6
    # Key positions remembered for the in-order guess of map keys.
    KEY_HINTS = 64


cdef struct Value:
    int kind
    int64_t i      # V_INT value; V_BOOL 0/1
    double f       # V_FLOAT value
    Py_ssize_t at  # V_STR/V_BIN/V_EXT: offset of the payload
    Py_ssize_t n   # V_STR/V_BIN/V_EXT: payload length; V_ARRAY: elements; V_MAP: pairs


cdef inline uint64_t be16(const uint8_t* q) noexcept nogil:
    return (<uint64_t>q[0] << 8) | q[1]


cdef inline uint64_t be32(const uint8_t* q) noexcept nogil:
    return (<uint64_t>q[0] << 24) | (<uint64_t>q[1] << 16) | (<uint64_t>q[2] << 8) | q[3]


cdef inline uint64_t be64(const uint8_t* q) noexcept nogil:
    return (be32(q) << 32) | be32(q + 4)


cdef inline Py_ssize_t payload(Py_ssize_t pos, Py_ssize_t end, uint64_t n, Value* v) noexcept nogil:
    """A str/bin/ext payload of n bytes at pos: its end, or -STOP_TRUNCATED."""
    if n > <uint64_t>(end - pos):
        return -STOP_TRUNCATED
    v.at = pos
    v.n = <Py_ssize_t>n
    return pos + <Py_ssize_t>n


cdef inline Py_ssize_t read_value(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, Value* v) noexcept nogil:
    """Read the value starting at pos: scalars whole, str/bin/ext with their payload,
    arrays and maps only their header (the caller reads or skips the elements).

    Returns the position after what was read, or -STOP_TRUNCATED / -STOP_INVALID.
    Never reads at or beyond end.
    """
    cdef uint8_t b
    cdef uint64_t u
    cdef uint32_t u32
    cdef float f32
    cdef Py_ssize_t need
    if pos >= end:
        return -STOP_TRUNCATED
    b = p[pos]
    pos += 1
    if b <= 0x7f:
        v.kind = V_INT
        v.i = b
        return pos
    if b >= 0xe0:
        v.kind = V_INT
        v.i = <int8_t>b
        return pos
    if b <= 0x8f:
        v.kind = V_MAP
        v.n = b & 0x0f
        return pos
    if b <= 0x9f:
        v.kind = V_ARRAY
        v.n = b & 0x0f
        return pos
    if b <= 0xbf:
        v.kind = V_STR
        return payload(pos, end, b & 0x1f, v)
    if b == 0xc0:
        v.kind = V_NIL
        return pos
    if b == 0xc1:
        return -STOP_INVALID
    if b == 0xc2 or b == 0xc3:
        v.kind = V_BOOL
        v.i = b - 0xc2
        return pos
    # Everything below has a fixed-size part after the type byte.
    if b == 0xc4 or b == 0xc7 or b == 0xcc or b == 0xd0 or b == 0xd9 or b == 0xd4:
        need = 1
    elif b == 0xc5 or b == 0xc8 or b == 0xcd or b == 0xd1 or b == 0xda or b == 0xdc or b == 0xde or b == 0xd5:
        need = 2
    elif b == 0xc6 or b == 0xc9 or b == 0xca or b == 0xce or b == 0xd2 or b == 0xdb or b == 0xdd or b == 0xdf:
        need = 4
    elif b == 0xd6:
        need = 4
    else:  # 0xcb, 0xcf, 0xd3, 0xd7, 0xd8
        need = 8
    if b >= 0xd4 and b <= 0xd8:
        # fixext 1/2/4/8/16: a type byte then the data
        v.kind = V_EXT
        return payload(pos, end, <uint64_t>(1 + (1 << (b - 0xd4))), v)
    if need > end - pos:
        return -STOP_TRUNCATED
    if b == 0xcc:
        v.kind = V_INT; v.i = p[pos]
    elif b == 0xcd:
        v.kind = V_INT; v.i = <int64_t>be16(p + pos)
    elif b == 0xce:
        v.kind = V_INT; v.i = <int64_t>be32(p + pos)
    elif b == 0xcf:
        u = be64(p + pos)
        if u > <uint64_t>0x7fffffffffffffff:
            v.kind = V_BIGUINT
        else:
            v.kind = V_INT; v.i = <int64_t>u
    elif b == 0xd0:
        v.kind = V_INT; v.i = <int8_t>p[pos]
    elif b == 0xd1:
        v.kind = V_INT; v.i = <int16_t>be16(p + pos)
    elif b == 0xd2:
        v.kind = V_INT; v.i = <int32_t>be32(p + pos)
    elif b == 0xd3:
        v.kind = V_INT; v.i = <int64_t>be64(p + pos)
    elif b == 0xca:
        u32 = <uint32_t>be32(p + pos)
        memcpy(&f32, &u32, 4)
        v.kind = V_FLOAT; v.f = f32
    elif b == 0xcb:
        u = be64(p + pos)
        v.kind = V_FLOAT
        memcpy(&v.f, &u, 8)
    elif b == 0xdc or b == 0xdd:
        v.kind = V_ARRAY; v.n = <Py_ssize_t>(be16(p + pos) if need == 2 else be32(p + pos))
    elif b == 0xde or b == 0xdf:
        v.kind = V_MAP; v.n = <Py_ssize_t>(be16(p + pos) if need == 2 else be32(p + pos))
    elif b == 0xc4 or b == 0xc5 or b == 0xc6:
        v.kind = V_BIN
        u = p[pos] if need == 1 else (be16(p + pos) if need == 2 else be32(p + pos))
        return payload(pos + need, end, u, v)
    elif b == 0xd9 or b == 0xda or b == 0xdb:
        v.kind = V_STR
        u = p[pos] if need == 1 else (be16(p + pos) if need == 2 else be32(p + pos))
        return payload(pos + need, end, u, v)
    else:  # ext 8/16/32: length, type byte, data
        v.kind = V_EXT
        u = p[pos] if need == 1 else (be16(p + pos) if need == 2 else be32(p + pos))
        return payload(pos + need, end, u + 1, v)
    return pos + need


cdef Py_ssize_t skip_items(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, int64_t items) noexcept nogil:
    """Step over `items` values (nested containers included), iteratively: a
    hostile nesting depth costs no stack.  Returns the position after them, or
    -STOP_TRUNCATED / -STOP_INVALID."""
    cdef Value v
    while items > 0:
        # Every value takes at least one byte: a claimed count beyond the bytes
        # left is truncated, and `items` stays bounded by the message size.
        if items > end - pos:
            return -STOP_TRUNCATED
        pos = read_value(p, pos, end, &v)
        if pos < 0:
            return pos
        items -= 1
        if v.kind == V_ARRAY:
            items += v.n
        elif v.kind == V_MAP:
            items += 2 * <int64_t>v.n
    return pos


cdef inline Py_ssize_t skip_contents(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, Value* v) noexcept nogil:
    """After read_value: step over the elements of an array or map value."""
    if v.kind == V_ARRAY:
        return skip_items(p, pos, end, v.n)
    if v.kind == V_MAP:
        return skip_items(p, pos, end, 2 * <int64_t>v.n)
    return pos


# final: store() and find_key() are called directly, not through the vtable, so
# the C compiler can inline them into the per-value loop.
@cython.final
cdef class RecordDecoder:
    """Decodes msgpack messages (an array of records) into int64 columns.

    Built once per feed layout and reused for every message.  Each output
    column is a "slot"; a record's field reaches a slot by its position
    (array records) or its key (map records).

    slots          number of output columns
    positions      for each position of an array record, its slot or -1 (ignored)
    keys           map keys (UTF-8 bytes) that feed a slot, with key_slots
    required       per slot: a record must carry it, and nil there rejects the row
                   (an optional slot reads 0 when absent or nil)
    str_maps       per slot: None, or {str value as UTF-8 bytes: code}
    int_maps       per slot: None (integers pass through), or {integer value: code}
                   (then an integer not named is rejected like an unknown string)
    """

    cdef int n_slots
    cdef int n_positions
    cdef int n_keys
    cdef int32_t[::1] position_slot
    cdef bytes key_blob
    cdef const char* key_chars      # key_blob's bytes (kept alive by key_blob)
    cdef int64_t[::1] key_off       # key i is key_blob[key_off[i]:key_off[i + 1]]
    cdef int32_t[::1] key_slot
    cdef uint8_t[::1] slot_required
    cdef bytes str_blob
    cdef const char* str_chars      # str_blob's bytes
    cdef int64_t[::1] str_off       # string entry e is str_blob[str_off[e]:str_off[e + 1]]
    cdef int64_t[::1] str_code
    cdef int32_t[::1] str_first     # slot s owns string entries str_first[s] .. str_first[s + 1] - 1
    cdef int64_t[::1] int_key
    cdef int64_t[::1] int_code
    cdef int32_t[::1] int_first     # slot s owns integer entries int_first[s] .. int_first[s + 1] - 1
    cdef uint8_t[::1] int_mapped    # slot s maps integers (else they pass through)
    cdef Py_ssize_t min_row_bytes   # the fewest bytes a valid record can take
    cdef int32_t key_hint[KEY_HINTS]  # key index seen at each map position in the last record

    def __init__(self, int slots, positions, keys, key_slots, required, str_maps, int_maps):
        if not 0 < slots <= 64:
            raise ValueError(f"between 1 and 64 slots, not {slots}")
        if len(required) != slots or len(str_maps) != slots or len(int_maps) != slots:
            raise ValueError("required, str_maps and int_maps need one entry per slot")
        if len(keys) != len(key_slots):
            raise ValueError("keys and key_slots differ in length")
        for s in (*positions, *key_slots):
            if not -1 <= s < slots:
                raise ValueError(f"slot {s} out of range")
        self.n_slots = slots
        self.n_positions = len(positions)
        self.position_slot = np.asarray(positions, dtype=np.int32).reshape(-1).copy()
        self.n_keys = len(keys)
        self.key_blob = b"".join(keys)
        self.key_chars = self.key_blob
        self.key_off = np.cumsum([0] + [len(k) for k in keys], dtype=np.int64)
        self.key_slot = np.asarray(key_slots, dtype=np.int32).reshape(-1).copy()
        self.slot_required = np.asarray(required, dtype=np.uint8).reshape(-1).copy()

        str_entries = [(k, c) for m in str_maps for k, c in (m or {}).items()]
        self.str_blob = b"".join(k for k, _ in str_entries)
        self.str_chars = self.str_blob
        self.str_off = np.cumsum([0] + [len(k) for k, _ in str_entries], dtype=np.int64)
        self.str_code = np.asarray([c for _, c in str_entries], dtype=np.int64).reshape(-1)
        self.str_first = np.cumsum([0] + [len(m or {}) for m in str_maps], dtype=np.int32)
        int_entries = [(k, c) for m in int_maps for k, c in (m or {}).items()]
        self.int_key = np.asarray([k for k, _ in int_entries], dtype=np.int64).reshape(-1)
        self.int_code = np.asarray([c for _, c in int_entries], dtype=np.int64).reshape(-1)
        self.int_first = np.cumsum([0] + [len(m or {}) for m in int_maps], dtype=np.int32)
        self.int_mapped = np.asarray([m is not None for m in int_maps], dtype=np.uint8).reshape(-1)

        # A valid array record: header + one byte per field at least.  A valid
        # map record: header + each required key (fixstr header + bytes) and a
        # one-byte value.  Output columns are sized from this, so a hostile
        # claimed count costs no more memory than the message could fill.
        map_bytes = 1 + sum(2 + len(k) for k, s in zip(keys, key_slots, strict=True) if required[s])
        self.min_row_bytes = max(1, min(1 + self.n_positions, map_bytes))
        for i in range(KEY_HINTS):
            self.key_hint[i] = -1

    @property
    def slots(self) -> int:
        return self.n_slots

    cdef inline int store(self, int slot, Value* v, const uint8_t* p, int64_t* out) noexcept nogil:
        """Convert one field value into *out; returns the row status."""
        cdef int32_t e
        cdef int64_t x
        cdef Py_ssize_t n
        if v.kind == V_INT:
            x = v.i
        elif v.kind == V_FLOAT:
            # Integral floats are accepted (some JSON-to-msgpack bridges make
            # every number a double); NaN fails both comparisons.
            if not (v.f >= -9223372036854775808.0 and v.f < 9223372036854775808.0):
                return ST_OUT_OF_RANGE
            if v.f != floor(v.f):
                return ST_NOT_INTEGER
            x = <int64_t>v.f
        elif v.kind == V_NIL:
            if self.slot_required[slot]:
                return ST_NIL
            out[0] = 0
            return ST_OK
        elif v.kind == V_STR:
            n = v.n
            for e in range(self.str_first[slot], self.str_first[slot + 1]):
                if self.str_off[e + 1] - self.str_off[e] == n and memcmp(
                    self.str_chars + self.str_off[e], p + v.at, n
                ) == 0:
                    out[0] = self.str_code[e]
                    return ST_OK
            if self.str_first[slot + 1] > self.str_first[slot]:
                return ST_UNMAPPED
            return ST_NOT_INTEGER
        elif v.kind == V_BIGUINT:
            return ST_OUT_OF_RANGE
        else:
            return ST_NOT_INTEGER
        if self.int_mapped[slot]:
            for e in range(self.int_first[slot], self.int_first[slot + 1]):
                if self.int_key[e] == x:
                    out[0] = self.int_code[e]
                    return ST_OK
            return ST_UNMAPPED
        out[0] = x
        return ST_OK

    cdef inline int find_key(self, const uint8_t* key, Py_ssize_t n, int position) noexcept nogil:
        """The key index of a map key, or -1.  Feeds write their keys in the same
        order record after record, so the key seen at this position last time is
        tried first."""
        cdef int i, hint = -1
        if position < KEY_HINTS:
            hint = self.key_hint[position]
            if hint >= 0 and self.key_off[hint + 1] - self.key_off[hint] == n and memcmp(
                self.key_chars + self.key_off[hint], key, n
            ) == 0:
                return hint
        for i in range(self.n_keys):
            if i != hint and self.key_off[i + 1] - self.key_off[i] == n and memcmp(
                self.key_chars + self.key_off[i], key, n
            ) == 0:
                if position < KEY_HINTS:
                    self.key_hint[position] = i
                return i
        return -1

    def decode(self, const uint8_t[::1] message):
        """Decode one message.

        Returns (columns, source_rows, rejects, claimed, stop, stop_row, stop_at):

        columns      int64 array (slots, n): the valid rows, slot by slot
        source_rows  int64 array (3, n): each valid row's index in the message,
                     and the start and end byte offsets of its record
        rejects      int64 array (m, 6): per rejected row, in row order:
                     row, status (ROW_STATUS), slot (-1 if none), start and end
                     byte offsets of the record, aux (ST_ARITY: the record's
                     field count; otherwise the field's position in the record)
        claimed      the number of records the array header claims (0 if none)
        stop         how decoding ended (STOP)
        stop_row     STOP_TRUNCATED/STOP_INVALID: the first record not decoded;
                     STOP_TRAILING: the record count
        stop_at      STOP_TRUNCATED/STOP_INVALID: byte offset of that record;
                     STOP_TRAILING: offset of the first trailing byte
        """
        cdef Py_ssize_t end = message.shape[0]
        cdef const uint8_t* p = &message[0] if end else NULL
        cdef Value v
        cdef Py_ssize_t pos = 0, capacity, stride, row_start, nxt
        cdef int64_t claimed = 0, r, k = 0, j, m
        cdef int stop = STOP_END, status, slot, fail_slot, s, key
        cdef int64_t aux, stop_row = 0, stop_at = 0
        cdef uint64_t seen = 0, need_mask = 0
        cdef int64_t* out
        cdef int64_t* src
        cdef int64_t* rej = NULL
        cdef int64_t* grown
        cdef int64_t n_rej = 0, rej_cap = 0
        cdef int64_t[:, ::1] cols_view
        cdef int64_t[:, ::1] src_view
        cdef int64_t[:, ::1] rej_view

        for s in range(self.n_slots):
            if self.slot_required[s]:
                need_mask |= (<uint64_t>1) << s

        pos = read_value(p, 0, end, &v)
        if pos < 0:
            return self._result(np.zeros((self.n_slots, 0), np.int64), np.zeros((3, 0), np.int64), None, 0, 0,
                                -pos, 0, 0)
        if v.kind != V_ARRAY:
            return self._result(np.zeros((self.n_slots, 0), np.int64), np.zeros((3, 0), np.int64), None, 0, 0,
                                STOP_NOT_ARRAY, 0, 0)
        claimed = v.n
        # Valid records each take at least min_row_bytes, so at most `capacity`
        # of them fit in the message; the extra row is scratch space for the
        # record being decoded when all those before it were valid.
        capacity = min(claimed, (end - pos) // self.min_row_bytes)
        stride = capacity + 1
        columns = np.empty((self.n_slots, stride), dtype=np.int64)
        source_rows = np.empty((3, stride), dtype=np.int64)
        cols_view = columns
        src_view = source_rows
        out = &cols_view[0, 0]
        src = &src_view[0, 0]

        try:
            with nogil:
                for r in range(claimed):
                    row_start = pos
                    nxt = read_value(p, pos, end, &v)
                    if nxt < 0:
                        stop = -nxt
                        break
                    pos = nxt
                    status = ST_OK
                    fail_slot = -1
                    aux = -1
                    if v.kind == V_ARRAY:
                        m = v.n
                        for s in range(self.n_slots):
                            out[s * stride + k] = 0
                        seen = 0
                        if m != self.n_positions:
                            status = ST_ARITY
                            aux = m
                            nxt = skip_items(p, pos, end, m)
                        else:
                            nxt = pos
                            for j in range(m):
                                nxt = read_value(p, nxt, end, &v)
                                if nxt < 0:
                                    break
                                slot = self.position_slot[j]
                                if slot >= 0 and status == ST_OK:
                                    status = self.store(slot, &v, p, out + slot * stride + k)
                                    seen |= (<uint64_t>1) << slot
                                    if status != ST_OK:
                                        fail_slot = slot
                                        aux = j
                                nxt = skip_contents(p, nxt, end, &v)
                                if nxt < 0:
                                    break
                    elif v.kind == V_MAP:
                        m = v.n
                        for s in range(self.n_slots):
                            out[s * stride + k] = 0
                        seen = 0
                        nxt = pos
                        for j in range(m):
                            nxt = read_value(p, nxt, end, &v)
                            if nxt < 0:
                                break
                            slot = -1
                            if v.kind == V_STR:
                                key = self.find_key(p + v.at, v.n, <int>min(j, KEY_HINTS))
                                if key >= 0:
                                    slot = self.key_slot[key]
                            else:
                                nxt = skip_contents(p, nxt, end, &v)
                                if nxt < 0:
                                    break
                            nxt = read_value(p, nxt, end, &v)
                            if nxt < 0:
                                break
                            if slot >= 0 and status == ST_OK:
                                status = self.store(slot, &v, p, out + slot * stride + k)
                                seen |= (<uint64_t>1) << slot
                                if status != ST_OK:
                                    fail_slot = slot
                                    aux = j
                            nxt = skip_contents(p, nxt, end, &v)
                            if nxt < 0:
                                break
                    else:
                        status = ST_NOT_RECORD
                        nxt = skip_contents(p, pos, end, &v)
                    if nxt < 0:
                        stop = -nxt
                        pos = row_start
                        break
                    pos = nxt
                    if status == ST_OK and (seen & need_mask) != need_mask:
                        # A map without a required key, or a positional layout
                        # that does not place every required column.
                        status = ST_MISSING
                        for s in range(self.n_slots):
                            if (need_mask >> s) & 1 and not (seen >> s) & 1:
                                fail_slot = s
                                break
                    if status == ST_OK:
                        src[k] = r
                        src[stride + k] = row_start
                        src[2 * stride + k] = pos
                        k += 1
                        if k > capacity:
                            # Not reachable (see capacity); never write past the scratch row.
                            stop = STOP_TRUNCATED
                            k -= 1
                            break
                        continue
                    if n_rej == rej_cap:
                        rej_cap = 2 * rej_cap + 64
                        grown = <int64_t*>realloc(rej, rej_cap * REJECT_FIELDS * sizeof(int64_t))
                        if grown == NULL:
                            with gil:
                                raise MemoryError("msgpack decoder: reject table")
                        rej = grown
                    rej[n_rej * REJECT_FIELDS + 0] = r
                    rej[n_rej * REJECT_FIELDS + 1] = status
                    rej[n_rej * REJECT_FIELDS + 2] = fail_slot
                    rej[n_rej * REJECT_FIELDS + 3] = row_start
                    rej[n_rej * REJECT_FIELDS + 4] = pos
                    rej[n_rej * REJECT_FIELDS + 5] = aux
                    n_rej += 1
                else:
                    if pos < end:
                        stop = STOP_TRAILING
                        stop_row = claimed
                        stop_at = pos
            if stop == STOP_TRUNCATED or stop == STOP_INVALID:
                stop_row = r
                stop_at = pos
            rejects = np.empty((n_rej, REJECT_FIELDS), dtype=np.int64)
            if n_rej:
                rej_view = rejects
                memcpy(&rej_view[0, 0], rej, n_rej * REJECT_FIELDS * sizeof(int64_t))
        finally:
            free(rej)
        return self._result(columns, source_rows, rejects, k, claimed, stop, stop_row, stop_at)

    def _result(self, columns, source_rows, rejects, int64_t k, int64_t claimed, int stop, int64_t stop_row,
                int64_t stop_at):
        if rejects is None:
            rejects = np.empty((0, REJECT_FIELDS), dtype=np.int64)
        return columns[:, :k], source_rows[:, :k], rejects, claimed, stop, stop_row, stop_at
