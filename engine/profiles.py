"""Subscriber profiles: the one place they live (SPEC section 8).

A `ProfileStore` is an Arrow table keyed by `msisdn` (int64, positive,
unique), kept sorted so that msisdn -> row is a vectorised binary search
(`rows`).  It is loaded from Parquet, Arrow IPC (file or stream) or CSV, or
given as an Arrow table; `Engine.load_profiles` replaces it while running.
A subscriber absent from the table has an empty profile.

Columns the contact policy reads, all optional (a null value means the key
is missing for that subscriber):

| column             | Arrow type   | CSV text       | meaning |
|--------------------|--------------|----------------|---------|
| `opt_out`          | bool         | true/false/1/0 | no marketing at all |
| `opt_out_channels` | list<string> | `sms;mms`      | channels the subscriber refused; missing = none |
| `channels`         | list<string> | `sms;portal`   | channels the subscriber accepts; missing = all |
| `contact_days`     | list<int>    | `1;2;3;4;5`    | ISO weekdays for active channels; missing = the policy's |

In CSV a list is one field, items separated by `;`, `,`, `|` or spaces.
An empty list in these three columns (`[]` in Parquet or Arrow, an empty
field in CSV) states no preference: it is read as missing, in every format.
Other columns are kept as they are, for the `where` and `audience` tests on
profile fields (`profile.NAME`, docs/rules.md).

`policy_arrays` turns the policy columns into the flat arrays the kernel
takes (engine/_fast/kernel.pyx, `Kernel.set_profiles`); `attribute_matrix`
turns the fields the rules test into its int64 attribute columns, one per
(field, encoding) the compiler lists (engine.compiler.profile_attributes):
integers as they are, booleans 0/1, strings as `string_hash`, a tag as 0/1
for "the list holds it", and PROFILE_MISSING where the profile lacks the
field, which every compiled test reads as false.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc

POLICY_COLUMNS = ("opt_out", "opt_out_channels", "channels", "contact_days")
_LIST_COLUMNS = {"opt_out_channels": pa.string(), "channels": pa.string(), "contact_days": pa.int64()}
_LIST_SEPARATOR = r"[;,| ]+"
ALL_CHANNELS = np.uint64(2**64 - 1)
PROFILE_OPT_OUT = 1  # bit of the kernel's per-profile flags


# An attribute the profile lacks (unknown subscriber, null value, no such column): every test on it is false.
# Mirrored by the kernel's MISSING; a profile integer of this value is refused.
PROFILE_MISSING = -(2**63)
# (kind, field, detail): ("int", name, ""), ("str", name, ""), ("has", name, tag) -- engine.compiler builds them.
Attribute = tuple[str, str, str]


def string_hash(text: str) -> int:
    """A stable 63-bit hash of a string's UTF-8: how rules and profiles compare strings without a shared dictionary.

    The first 8 bytes of its BLAKE2b digest, big-endian, top bit cleared (so
    never PROFILE_MISSING).  Two different strings collide with probability
    2**-63 per pair.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


class ProfileError(ValueError):
    """A profile table that cannot be used; the message names the source, column and subscriber."""


class ProfileStore:
    """Profiles sorted by msisdn; immutable (replace the store to change profiles)."""

    def __init__(self, table: pa.Table, source: str = "<table>"):
        self.source = source
        self.table = self._checked(table)
        self.msisdn = self.table.column("msisdn").to_numpy()

    @classmethod
    def empty(cls) -> ProfileStore:
        return cls(pa.table({"msisdn": pa.array([], pa.int64())}), "<empty>")

    @classmethod
    def load(cls, source: str | os.PathLike | pa.Table | ProfileStore) -> ProfileStore:
        """A store from a ProfileStore, an Arrow table, or a file (.parquet, .arrow/.ipc/.feather, .csv)."""
        if isinstance(source, ProfileStore):
            return source
        if isinstance(source, pa.Table):
            return cls(source)
        path = Path(source)
        suffix = path.suffix.lower()
        try:
            if suffix == ".parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(path)
            elif suffix in (".arrow", ".ipc", ".feather", ".arrows"):
                table = _read_ipc(path)
            elif suffix in (".csv", ".txt"):
                table = _read_csv(path)
            else:
                raise ProfileError(f"{path}: profiles are .parquet, .arrow (Arrow IPC) or .csv files")
        except (OSError, pa.ArrowInvalid) as exc:
            raise ProfileError(f"{path}: cannot read profiles: {exc}") from None
        return cls(table, str(path))

    def __len__(self) -> int:
        return self.table.num_rows

    def _fail(self, reason: str) -> ProfileError:
        return ProfileError(f"{self.source}: {reason}")

    def _checked(self, table: pa.Table) -> pa.Table:
        if "msisdn" not in table.column_names:
            raise self._fail("profiles need an 'msisdn' column")
        try:
            msisdn = table.column("msisdn").cast(pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise self._fail("column 'msisdn' must be integers") from None
        if msisdn.null_count:
            raise self._fail("column 'msisdn' has empty values")
        table = table.set_column(table.column_names.index("msisdn"), "msisdn", msisdn)
        for name, item_type in _LIST_COLUMNS.items():
            if name in table.column_names:
                column = self._list_column(table, name, item_type)
                table = table.set_column(table.column_names.index(name), name, column)
        if "opt_out" in table.column_names:
            try:
                column = table.column("opt_out").cast(pa.bool_())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise self._fail("column 'opt_out' must be true/false") from None
            table = table.set_column(table.column_names.index("opt_out"), "opt_out", column)
        table = table.sort_by("msisdn").combine_chunks()
        keys = table.column("msisdn").to_numpy()
        if len(keys) and keys[0] <= 0:
            raise self._fail(f"msisdn {keys[0]} is not positive")
        duplicate = np.flatnonzero(keys[1:] == keys[:-1])
        if len(duplicate):
            raise self._fail(f"msisdn {keys[duplicate[0]]} has more than one profile")
        if "contact_days" in table.column_names:
            days = pc.list_flatten(table.column("contact_days")).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero((days < 1) | (days > 7))
            if len(bad):
                raise self._fail(f"contact_days: {days[bad[0]]} is not an ISO weekday (1 = Monday .. 7 = Sunday)")
        return table

    def _list_column(self, table: pa.Table, name: str, item_type: pa.DataType) -> pa.ChunkedArray:
        column = table.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            text = pc.utf8_trim(column, characters=" ;,|")
            split = pc.split_pattern_regex(text, _LIST_SEPARATOR)
            # "" splits to [""]: an empty field is an empty list
            column = pc.if_else(pc.equal(text, ""), pa.scalar([], pa.list_(pa.string())), split)
        try:
            column = column.cast(pa.list_(item_type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise self._fail(f"column {name!r} must be a list of {item_type}") from None
        # An empty list is no preference, as a missing value is: `channels = []` must not mean "no channel".
        empty = pc.equal(pc.list_value_length(column), 0)
        return pc.if_else(empty, pa.scalar(None, column.type), column)

    def rows(self, msisdn: np.ndarray) -> np.ndarray:
        """Row of each msisdn in the table, -1 for subscribers without a profile."""
        msisdn = np.asarray(msisdn, np.int64)
        at = np.searchsorted(self.msisdn, msisdn)
        found = at < len(self.msisdn)
        found[found] = self.msisdn[at[found]] == msisdn[found]
        return np.where(found, at, -1)

    def without(self, msisdns: np.ndarray) -> tuple[ProfileStore, int]:
        """A store without the profiles of `msisdns` (erasure), and how many rows it dropped.

        The store is immutable, so the rows go with a new table (a filtered
        copy, sorted and checked as any store); when none of them has a
        profile the store itself comes back.
        """
        gone = np.isin(self.msisdn, np.asarray(msisdns, np.int64))
        dropped = int(np.count_nonzero(gone))
        if not dropped:
            return self, 0
        return ProfileStore(self.table.filter(pa.array(~gone)), self.source), dropped

    def get(self, msisdn: int) -> dict:
        """One subscriber's profile as Python values, null fields left out; {} when unknown."""
        if not len(self.msisdn):
            return {}
        row = int(self.rows(np.array([msisdn]))[0])
        if row < 0:
            return {}
        record = self.table.slice(row, 1).to_pylist()[0]
        return {key: value for key, value in record.items() if value is not None}

    def column(self, name: str) -> pa.ChunkedArray | None:
        return self.table.column(name) if name in self.table.column_names else None

    def policy_arrays(self, channels: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The policy columns for the kernel, channel names as bits of `channels` (rules' channel codes).

        msisdn (sorted), allowed (uint64 channel mask: accepted minus opted
        out), flags (uint8, PROFILE_OPT_OUT), days (uint8 weekday mask, bit
        0 = Monday; 0 = use the policy's).
        """
        n = len(self)
        allowed = np.full(n, ALL_CHANNELS, np.uint64)
        accepted = self.column("channels")
        if accepted is not None:
            mask = self._channel_mask(accepted, channels)
            allowed = np.where(accepted.is_null().to_numpy(zero_copy_only=False), allowed, mask)
        refused = self.column("opt_out_channels")
        if refused is not None:
            allowed &= ~self._channel_mask(refused, channels)
        flags = np.zeros(n, np.uint8)
        opt_out = self.column("opt_out")
        if opt_out is not None:
            flags[pc.fill_null(opt_out, False).to_numpy(zero_copy_only=False)] |= PROFILE_OPT_OUT
        days = np.zeros(n, np.uint8)
        contact = self.column("contact_days")
        if contact is not None:
            flat = contact.combine_chunks()
            values = pc.list_flatten(flat).to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(flat).to_numpy(zero_copy_only=False)
            np.bitwise_or.at(days, parents, (1 << (values - 1)).astype(np.uint8))
        return {"msisdn": self.msisdn, "allowed": allowed, "flags": flags, "days": days}

    def attribute_matrix(self, attributes: tuple[Attribute, ...]) -> np.ndarray:
        """The kernel's attribute columns: int64, one row per profile (msisdn order), one column per attribute.

        Raises ProfileError naming the column when a field the rules test has
        a type they cannot test: floats, structs, maps, a list where a value
        is compared, or text where an integer is compared.
        """
        out = np.full((len(self), len(attributes)), PROFILE_MISSING, np.int64)
        for a, (kind, name, tag) in enumerate(attributes):
            column = self.column(name)
            if column is None or not len(self):
                continue
            column = column.combine_chunks()
            if pa.types.is_dictionary(column.type):
                column = column.dictionary_decode()
            valid = column.is_valid().to_numpy(zero_copy_only=False)
            if kind == "has":
                values = self._has_tag(name, column, tag)
            elif kind == "str":
                values = self._string_hashes(name, column)
            else:
                values = self._integers(name, column)
            out[:, a] = np.where(valid, values, PROFILE_MISSING)
        return out

    def _unsupported(self, name: str, column: pa.Array, wanted: str) -> ProfileError:
        return self._fail(f"column {name!r} is {column.type}: the rules test it as {wanted}")

    def _integers(self, name: str, column: pa.Array) -> np.ndarray:
        if pa.types.is_boolean(column.type):
            return pc.fill_null(column, False).to_numpy(zero_copy_only=False).astype(np.int64)
        if pa.types.is_null(column.type):
            return np.zeros(len(column), np.int64)
        if pa.types.is_integer(column.type) or pa.types.is_string(column.type) or pa.types.is_large_string(
                column.type):
            try:
                values = pc.fill_null(column.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise self._unsupported(name, column, "integers (a value is not a 64-bit integer)") from None
            if (values == PROFILE_MISSING).any():
                raise self._fail(f"column {name!r}: {PROFILE_MISSING} is reserved for a missing value")
            return values
        raise self._unsupported(name, column, "integers or true/false")

    def _string_hashes(self, name: str, column: pa.Array) -> np.ndarray:
        if pa.types.is_null(column.type):
            return np.zeros(len(column), np.int64)
        if pa.types.is_integer(column.type):  # CSV reads a plan "388" as an integer
            column = column.cast(pa.string())
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise self._unsupported(name, column, "strings")
        # Hash each distinct value once: profile columns hold few distinct strings (segments, plans).
        distinct = pc.unique(column).drop_null()
        hashes = np.array([string_hash(v) for v in distinct.to_pylist()] + [0], np.int64)
        index = pc.fill_null(pc.index_in(column, value_set=distinct), len(distinct))
        return hashes[index.to_numpy(zero_copy_only=False)]

    def _has_tag(self, name: str, column: pa.Array, tag: str) -> np.ndarray:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):  # CSV: "car_owner;vip"
            text = pc.utf8_trim(column, characters=" ;,|")
            column = pc.if_else(pc.equal(text, ""), pa.scalar([], pa.list_(pa.string())),
                                pc.split_pattern_regex(text, _LIST_SEPARATOR))
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or not (
                pa.types.is_string(column.type.value_type) or pa.types.is_large_string(column.type.value_type)):
            raise self._unsupported(name, column, "a list of strings (has)")
        found = np.zeros(len(column), np.int64)
        hit = pc.fill_null(pc.equal(pc.list_flatten(column), tag), False).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        found[parents[hit]] = 1
        return found

    @staticmethod
    def _channel_mask(column: pa.ChunkedArray, channels: tuple[str, ...]) -> np.ndarray:
        lists = column.combine_chunks()
        mask = np.zeros(len(lists), np.uint64)
        code = pc.index_in(pc.list_flatten(lists), value_set=pa.array(channels, pa.string()))
        parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
        known = code.is_valid().to_numpy(zero_copy_only=False)
        bits = np.left_shift(np.uint64(1), pc.fill_null(code, 0).to_numpy(zero_copy_only=False).astype(np.uint64))
        np.bitwise_or.at(mask, parents[known], bits[known])
        return mask


def _read_ipc(path: Path) -> pa.Table:
    try:
        with pa.memory_map(str(path)) as source:
            return ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            return ipc.open_stream(source).read_all()


def _read_csv(path: Path) -> pa.Table:
    # Lists and flags arrive as text; _checked parses them.  msisdn as int64 outright.
    options = pacsv.ConvertOptions(
        column_types={"msisdn": pa.int64(), **{name: pa.string() for name in _LIST_COLUMNS}},
        strings_can_be_null=True,
        true_values=["true", "True", "TRUE", "1", "yes"],
        false_values=["false", "False", "FALSE", "0", "no"],
    )
    return pacsv.read_csv(path, convert_options=options)
