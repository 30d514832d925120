# C types shared by the Kairos kernels.
#
# The numpy dtypes that mirror these structs live in engine/compiler.py
# (OP_DTYPE); tests/test_kernel_types.py checks that their sizes agree, so a
# field added here without its numpy twin fails the suite rather than
# silently misreading compiled rules.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint64_t


# How one event column is laid out in the caller's memory.  The kernel never
# converts a whole column: it gathers the rows it needs, widening to int64.
cdef enum ColumnType:
    COL_ABSENT = 0      # optional column not in the batch: every row reads 0
    COL_I64 = 1
    COL_I32 = 2
    COL_U16 = 3
    COL_U8 = 4


cdef struct Column:
    const void* data    # row 0 of the column; NULL when COL_ABSENT
    int type            # a ColumnType


# Opcodes of a compiled `where` program.  A program is a straight-line list of
# Ops over one selection of rows (the chunk rows of one kind).  Registers hold
# a byte per position of that selection; lists hold positions.  Each op works
# on the positions of its list `sel` (0: every position), which is how
# and/or short-circuit: the right operand of `and` runs only where the left
# was true, and a register may hold stale bytes (always 0 or 1) elsewhere.
cdef enum OpCode:
    OP_EQ = 0           # dst = column[a] == imm
    OP_NE = 1
    OP_LT = 2
    OP_LE = 3
    OP_GT = 4
    OP_GE = 5
    OP_IN = 6           # dst = column[a] in constants[b : b + imm] (sorted)
    OP_PREFIX = 7       # dst = decimal digits of column[a] start with one of constants[b : b + imm]
                        #       (sorted by digit count, then value)
    OP_AND = 8          # dst = reg[a] & reg[b]
    OP_OR = 9           # dst = reg[a] | reg[b]
    OP_NOT = 10         # dst = !reg[a]
    OP_NARROW_TRUE = 11     # list dst = positions of list sel where reg[a] is 1
    OP_NARROW_FALSE = 12    # list dst = positions of list sel where reg[a] is 0


cdef struct Op:
    int32_t code        # an OpCode
    int32_t dst         # register written (list written, for NARROW ops)
    int32_t a           # column index (tests) or first register (logic, NARROW)
    int32_t b           # second register (AND/OR) or offset into the constant pool (IN/PREFIX)
    int64_t imm         # comparison literal, or number of constants (IN/PREFIX)
    int32_t sel         # list of positions the op runs on; 0: all positions
    int32_t unused      # keeps the struct 8-byte aligned, identical to OP_DTYPE


# One bucket of the subscriber hash table.  Key and id share a cache line,
# so a lookup that hits costs one memory access, not two.
cdef struct Bucket:
    int64_t msisdn      # 0: empty (validation guarantees msisdn > 0)
    int32_t id          # dense subscriber id
    int32_t unused      # keeps buckets 16 bytes, four to a cache line


# One entry of a policy map (engine/_fast/kernel.pyx: caps and blocks), open
# addressing keyed by a positive int64.
cdef struct Entry:
    int64_t key         # 0: empty
    int64_t value


cdef struct Map:
    Entry* entries      # capacity entries, a power of two, kept at most half full
    int64_t capacity
    int64_t size


# Stateful condition of a rule (SPEC section 3).
cdef enum CondType:
    COND_NONE = 0
    COND_COUNT = 1      # state: the at_least - 1 largest qualifying ts seen, ascending
    COND_FIRST = 2      # state: the largest qualifying ts seen
    COND_CHANGED = 3    # state: the last non-zero value of the column
    COND_SUM = 4        # state: newest bucket index, then a ring of per-bucket sums (docs/kernel.md)
    COND_DISTINCT = 5   # state: at_least (value, last-seen bucket) pairs, value 0 = empty
    COND_AFTER = 6      # state: the largest ts at which the followed rule matched
    COND_ABSENCE = 7    # state: the pending timer's start ts (NO_TS: none), then the start event's params


# splitmix64's finaliser: a bijection on 64 bits with full avalanche.  The
# subscriber table uses its low bits and shard selection its high bits, so a
# shard's subscribers still spread evenly over that shard's table.
cdef inline uint64_t mix64(uint64_t z) noexcept nogil:
    z = (z ^ (z >> 30)) * <uint64_t>0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * <uint64_t>0x94d049bb133111ebULL
    return z ^ (z >> 31)


# One value of an event column, whatever its layout; an absent column reads as 0.
cdef inline int64_t read(const Column* col, Py_ssize_t row) noexcept nogil:
    if col.type == COL_I64:
        return (<const int64_t*>col.data)[row]
    if col.type == COL_I32:
        return (<const int32_t*>col.data)[row]
    if col.type == COL_U16:
        return (<const uint16_t*>col.data)[row]
    if col.type == COL_U8:
        return (<const uint8_t*>col.data)[row]
    return 0
