# The rule-matching kernel: declarations other Cython modules can cimport
# (see engine.get_include()).  Semantics are documented in kernel.pyx and in
# docs/kernel.md; engine/reference.py is the plain-Python statement of them.

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from engine._fast._types cimport Bucket, Column, Entry, Map, Op


# A caller's event column as the kernels read it (engine._fast.table uses it too).
cdef Column as_column(object array, int layout, Py_ssize_t n) except *


# final: the kernel's methods call each other directly, not through a vtable, so the C compiler can
# inline them on the hot path.
@cython.final
cdef class Kernel:
    # -- compiled rules, immutable after construction ------------------------
    cdef readonly Py_ssize_t n_rules
    cdef uint32_t* kinds          # per rule: bit k set when the rule listens to kind k
    cdef int32_t* op_begin        # per rule: its where program is ops[op_begin:op_end]
    cdef int32_t* op_end
    cdef int32_t* result_reg      # per rule: register holding where's result; -1 = no where
    cdef int32_t* cond            # per rule: a CondType
    cdef int64_t* cond_n          # per rule: count/sum/distinct's at_least
    cdef int64_t* cond_window     # per rule: count/first/sum/distinct window W in ms
    cdef int32_t* cond_column     # per rule: changed/sum/distinct's column index
    cdef int64_t* cond_resolution # per rule: sum/distinct bucket width in ms
    cdef int64_t* window_buckets  # per sum/distinct rule: W // resolution and W % resolution, so that an
    cdef int64_t* window_rest     #   event finds its window's first bucket without a second division
    cdef int64_t* cooldown        # per rule: ms, 0 = none
    cdef int32_t* priority        # per rule: higher wins arbitration
    cdef int32_t* width           # per rule: int64 words per state row; 0 = stateless
    cdef int32_t* stride          # per rule: int64 words from one row of its pool to the next (row_stride)
    cdef int32_t* goal_of         # per rule: -1 for a campaign; for a goal filter, the campaign it serves
    cdef int32_t* cancel_of       # per rule: -1; for an absence cancel filter, the rule whose timer it cancels
    cdef int32_t* filter_order    # kernel rules in the order phase 1 lists a row's pairs: cancel filters first
    cdef uint8_t* shadow          # per rule: 1 for a shadow rule (counts what it would send, sends nothing)
    cdef int32_t* after_rule      # per rule: the rule an `after` condition follows, -1 none
    cdef int32_t* dep_begin       # per rule: the rules following it are dep_list[dep_begin:dep_end]
    cdef int32_t* dep_end
    cdef int32_t* dep_list
    cdef int32_t* param_begin     # per absence rule: param_list[param_begin:param_end] are the columns its
    cdef int32_t* param_end       #   timer keeps from the start event (its params)
    cdef int32_t* param_list
    cdef Op* ops
    cdef Py_ssize_t n_ops
    cdef int32_t n_regs           # registers one program may use
    cdef int32_t n_lists          # position lists one program may use (list 0: all positions)
    cdef int64_t* constants       # IN sets (sorted) and PREFIX prefixes
    cdef int32_t* constant_digits # decimal digit count of each constant (PREFIX only)
    cdef Py_ssize_t n_constants
    # Profile tests (docs/rules.md): a test op whose column a >= N_COLUMNS reads profile attribute
    # a - N_COLUMNS of the event's subscriber (prof_attrs); MISSING there makes every test false.
    cdef Py_ssize_t n_attrs       # attributes the rules read (engine.compiler.profile_attributes)
    cdef uint32_t prof_kinds      # kinds of the rules whose where reads an attribute: their rows may need a profile row
    cdef uint8_t* has_audience    # per rule: 1 when it has an audience
    cdef int32_t* aud_begin       # per rule: its audience program is ops[aud_begin:aud_end], over attributes only
    cdef int32_t* aud_end
    cdef int32_t* aud_result      # per rule: register holding the audience's result; -1 = no audience

    # -- subscriber index: msisdn -> dense subscriber id -----------------------
    # Open addressing with linear probing over a power-of-two table kept at
    # most half full; key 0 marks an empty bucket (validation guarantees
    # msisdn > 0).  Dense ids never change when the table grows, so all state
    # indexed by them survives growth untouched.
    cdef Bucket* table
    cdef int64_t table_capacity
    cdef int64_t* sub_msisdn      # dense id -> msisdn; with n_subs, all a checkpoint needs to rebuild the table
    cdef readonly int64_t n_subs
    cdef int64_t sub_capacity

    # -- per-rule state, allocated on a subscriber's first qualifying event ------
    # A state row is [last instruction ts, condition words...].  Only
    # subscribers that ever passed a rule's on + where have a row for it, so a
    # rare campaign costs 4 bytes per subscriber (its slot), not a row.  The
    # slots of one subscriber for all stateful rules are adjacent: one cache
    # line finds every row of an event's subscriber.
    cdef Py_ssize_t n_stateful    # rules with width > 0
    cdef int32_t* stateful_index  # per rule: its column in `slots`; -1 for stateless rules
    cdef int32_t* slots           # [dense id * n_stateful + stateful index] -> state row + 1, 0 none
    cdef int64_t** state          # [rule] rows of width[rule] words
    cdef int64_t* state_rows
    cdef int64_t* state_capacity

    # -- contact policy, immutable after construction (docs/policy.md) ----------
    cdef readonly Py_ssize_t n_channels   # channel codes 0..n_channels-1 (RuleSet.channels)
    cdef int32_t* chan_begin      # per rule: its channel preference is chan_list[chan_begin:chan_end]
    cdef int32_t* chan_end
    cdef int32_t* chan_list
    cdef uint64_t active_mask     # bit c set: channel c is active (capped, quiet hours apply)
    cdef int64_t daily_cap        # 0 = none
    cdef int64_t monthly_cap      # 0 = none
    cdef int64_t quiet_start      # ms after local midnight; -1: no quiet hours
    cdef int64_t quiet_end
    cdef uint8_t contact_days     # bit d (0 = Monday): contact day by default
    cdef int64_t* zone_start      # UTC offset zone_offset[k] holds from zone_start[k] on (ascending)
    cdef int64_t* zone_offset
    cdef Py_ssize_t n_zone
    cdef Py_ssize_t zone_hint     # last index found: consecutive instructions share an offset
    cdef int64_t* holdout_threshold   # per rule: holdout iff 53-bit hash < this
    cdef uint64_t* holdout_seed
    cdef int64_t* max_per_hour    # per rule: guardrail, 0 = none
    cdef int64_t* goal_within     # per rule: goal window in ms, 0 = no goal
    # Active periods (docs/rules.md), local time in the zone above; tested per match, only where active[r].
    cdef uint8_t* active          # per rule: 1 when it has an active period
    cdef int64_t* active_first    # per rule: first and last local day (days since 1970-01-01), inclusive
    cdef int64_t* active_last
    cdef uint8_t* active_days     # per rule: bit d (0 = Monday) set on an active weekday
    cdef int64_t* active_start    # per rule: active hours [start, end) in ms after local midnight, wrapping
    cdef int64_t* active_end      #   midnight when start > end; -1: all day

    # -- contact policy state ------------------------------------------------------
    cdef int32_t* sub_profile     # per subscriber: profile row + 1, -1 none, 0 not looked up yet
    cdef int64_t* prof_msisdn     # profiles' policy columns, sorted by msisdn (set_profiles)
    cdef uint64_t* prof_allowed   # channels the subscriber accepts and has not opted out of
    cdef uint8_t* prof_flags      # bit 0: opted out of all marketing
    cdef uint8_t* prof_days       # contact-day mask, 0 = the policy's
    cdef int64_t* prof_attrs      # [profile row * n_attrs + attribute]: the attribute matrix (set_profiles)
    cdef Py_ssize_t n_prof
    # msisdn -> profile row for the filter phase, open addressing like the subscriber index (id = the row);
    # built by set_profiles only when prof_kinds is not 0.
    cdef Bucket* prof_table
    cdef int64_t prof_table_capacity
    cdef Map blocks               # (subscriber, rule) -> ts until which the rule is blocked (feedback)
    cdef Map caps                 # (subscriber, local day or month) -> instructions on active channels
    cdef int64_t policy_clock     # largest trigger ts policy has seen; caps older than its day are pruned
    cdef int64_t** guard_ts       # per rule with max_per_hour: ring of its latest instruction ts
    cdef int64_t* guard_head
    cdef int64_t* guard_count
    cdef uint8_t* paused          # per rule: paused by its guardrail
    # Open instructions of rules with a goal: per (subscriber, rule) a chain of
    # records in issue order; goal_open maps the pair to its first record + 1
    # (0: none).  Records live in a pool with a free list.
    cdef Map goal_open
    cdef int64_t* rec_ts          # the instruction's trigger ts
    cdef int64_t* rec_next        # next record of the chain (or of the free list), -1 none
    cdef uint8_t* rec_flags       # bit 0: holdout
    cdef int64_t rec_capacity
    cdef int64_t rec_used         # records ever handed out; below it, in a chain or on the free list
    cdef int64_t rec_free         # first free record, -1 none
    cdef int64_t goal_clock       # largest ts goal bookkeeping has seen

    # -- absence timers (docs/kernel.md, "timers") ---------------------------------
    # A pending timer is its rule's state row (start ts, kept params); the heap
    # orders (due, rule, msisdn) and may hold stale entries (a cancelled or
    # fired timer), recognised when popped because the row no longer matches.
    cdef bint has_timers          # some rule has an absence condition
    cdef readonly int64_t lateness    # ms the watermark trails the largest ts seen
    cdef readonly int64_t max_ts      # largest event ts seen or advanced to; -1 before any
    cdef int64_t next_due         # due time of the heap's top entry, INT64_MAX when empty
    cdef int64_t* heap_due
    cdef int64_t* heap_sub
    cdef int32_t* heap_rule
    cdef int64_t heap_size
    cdef int64_t heap_capacity
    cdef readonly int64_t timers_pending
    # Instructions of fired timers since the last take_fired(): the row of the
    # batch they precede (-1: fired by advance), rule, channel, not_before,
    # holdout, and the event columns of the instruction (ts = due, msisdn,
    # the start event's params, zeros elsewhere).
    cdef int64_t n_fired
    cdef int64_t fired_capacity
    cdef int64_t* fired_before
    cdef int32_t* fired_rule
    cdef int32_t* fired_channel
    cdef int64_t* fired_not_before
    cdef uint8_t* fired_holdout
    cdef int64_t* fired_cols

    # -- counters per rule -------------------------------------------------------
    cdef int64_t* matched
    cdef int64_t* stopped_cooldown
    cdef int64_t* stopped_arbitrated
    cdef int64_t* emitted
    cdef int64_t* stopped_paused
    cdef int64_t* stopped_opt_out
    cdef int64_t* stopped_suppressed
    cdef int64_t* stopped_decline
    cdef int64_t* stopped_no_channel
    cdef int64_t* stopped_capped
    cdef int64_t* holdout
    cdef int64_t* sent_channel    # [rule * n_channels + channel]: treated instructions
    cdef int64_t* goal_treated    # conversions of treated instructions
    cdef int64_t* goal_holdout    # conversions of holdout instructions
    cdef int64_t* cap_draw        # instructions on active channels (each takes a daily and monthly cap slot)

    # -- scratch reused by every batch -----------------------------------------
    cdef uint8_t* regs            # n_regs registers of CHUNK bytes
    cdef int32_t* lists           # n_lists lists of up to CHUNK positions
    cdef int32_t* list_len        # length of each list
    cdef int64_t* vals            # a gathered column, CHUNK values
    cdef int32_t* list_rows       # chunk rows of a list's positions
    cdef uint8_t* list_result     # a test's result per list entry, before scattering
    cdef int32_t* bucket_rows     # chunk rows grouped by kind
    cdef int32_t* kind_rows       # chunk rows of any of a multi-kind rule's kinds, ascending
    cdef int32_t* cand_rows       # per rule, its candidate chunk rows (passed on + where), ascending;
    cdef int32_t* cand_begin      #   rule r's are cand_rows[cand_begin[r]:cand_begin[r] + cand_len[r]], and a
    cdef int32_t* cand_len        #   window condition's pass keeps only those it matched
    cdef int32_t* row_head        # per chunk row: first (row, rule) pair, -1 none
    cdef int32_t* row_tail
    cdef int32_t* pair_next
    cdef int32_t* pair_rule
    cdef int32_t* survivors       # rules that survived policy on one event
    cdef int32_t* shadow_survivors    # shadow rules that survived policy on one event
    cdef int32_t* row_followed    # rules with followers that matched on one event (told after the event)
    cdef uint8_t* row_stateful    # per chunk row: some candidate rule keeps state
    cdef int64_t* row_sub         # per chunk row: dense subscriber id, when row_stateful
    cdef int32_t* need_rows       # chunk rows with row_stateful set, ascending
    cdef uint64_t* need_hash      # mix64(msisdn) of each of need_rows
    cdef int32_t* row_prow        # per chunk row: its profile row, -1 none, -2 not looked up yet (rows of prof_kinds)
    cdef uint8_t* aud_regs        # n_regs registers of one byte: an audience program over one profile row

    cdef bint _op_is_valid(self, Op op, Py_ssize_t n_constants)
    cdef object _copy(self, const void* src, Py_ssize_t n, object dtype)
    cdef object _copy_i64(self, const int64_t* src, Py_ssize_t n)
    cdef object _copy_i32(self, const int32_t* src, Py_ssize_t n)
    cdef object _copy_u8(self, const uint8_t* src, Py_ssize_t n)
    cdef _load_counter(self, dict state, str name, int64_t* dst)
    cdef _load_map(self, Map* m, object keys, object values, int64_t n_subs, int64_t per_sub)
    cdef int grow_subscribers(self) except -1 nogil
    cdef int rebuild_table(self, int64_t capacity) except -1 nogil
    cdef int64_t find_or_insert(self, int64_t msisdn, uint64_t hash) except -1 nogil
    cdef int find_subscribers(self, const int64_t* msisdn, Py_ssize_t base, Py_ssize_t m) except -1 nogil
    cdef int64_t* state_row(self, Py_ssize_t rule, int64_t sub) except NULL nogil
    cdef int64_t* new_state_row(self, Py_ssize_t rule, int32_t* slot) except NULL nogil
    cdef void prefetch_row(self, Py_ssize_t rule, int64_t sub) noexcept nogil
    cdef int filter_chunk(self, const Column* cols, Py_ssize_t base, Py_ssize_t m) except -1 nogil
    cdef int window_pass(self, Py_ssize_t rule, const Column* cols, Py_ssize_t base) except -1 nogil
    cdef void stop_in_cooldown(self, Py_ssize_t r, int64_t sub, int64_t msisdn, int64_t ts) noexcept nogil
    cdef void after_pass(self, Py_ssize_t r) noexcept nogil
    cdef Py_ssize_t link_pairs(self) noexcept nogil
    cdef void run_where(self, Py_ssize_t rule, const Column* cols, Py_ssize_t base,
                        const int32_t* sel, Py_ssize_t n) noexcept nogil
    cdef int32_t profile_row(self, int64_t sub, int64_t msisdn) noexcept nogil
    cdef void find_profile_rows(self, const int64_t* msisdn, Py_ssize_t base, const int32_t* rows,
                                Py_ssize_t n) noexcept nogil
    cdef void gather_profile(self, Py_ssize_t attr, const int64_t* msisdn, Py_ssize_t base, const int32_t* rows,
                             Py_ssize_t n, int64_t* out) noexcept nogil
    cdef bint audience_holds(self, Py_ssize_t rule, Py_ssize_t prow) noexcept nogil
    cdef Py_ssize_t zone_index(self, int64_t u) noexcept nogil
    cdef int64_t local_day(self, int64_t u) noexcept nogil
    cdef bint in_period(self, Py_ssize_t rule, int64_t ts) noexcept nogil
    cdef int64_t next_allowed(self, int64_t ts, uint8_t days) noexcept nogil
    cdef int prune_caps(self) except -1 nogil
    cdef int64_t find_subscriber(self, int64_t msisdn) noexcept nogil
    cdef int64_t record_alloc(self) except -1 nogil
    cdef int sweep_goals(self) except -1 nogil
    cdef int goal_issue(self, int64_t sub, Py_ssize_t rule, int64_t ts, bint holdout) except -1 nogil
    cdef void goal_event(self, int64_t sub, Py_ssize_t rule, int64_t ts) noexcept nogil
    cdef bint admit(self, Py_ssize_t r, int64_t sub, int32_t prow, int64_t ts) noexcept nogil
    cdef int deliver(self, Py_ssize_t r, int64_t sub, int64_t msisdn, int32_t prow, int64_t ts,
                     int32_t* channel_out, int64_t* not_before_out, uint8_t* holdout_out) except -1 nogil
    cdef int tell_followers(self, Py_ssize_t a, int64_t sub, int64_t ts) except -1 nogil
    cdef bint heap_less(self, int64_t i, int64_t j) noexcept nogil
    cdef int heap_push(self, int64_t due, Py_ssize_t rule, int64_t sub) except -1 nogil
    cdef void heap_pop(self) noexcept nogil
    cdef int rebuild_timers(self) except -1 nogil
    cdef int fire_due(self, int64_t before) except -1 nogil
    cdef int fire(self, Py_ssize_t r, int64_t sub, int64_t due, const int64_t* row, int64_t before) except -1 nogil
    cdef Py_ssize_t process_columns(self, const Column* cols, Py_ssize_t n,
                                    int64_t* out_row, int32_t* out_rule, int32_t* out_channel,
                                    int64_t* out_not_before, uint8_t* out_holdout) except -1 nogil
