"""Compiles a checked RuleSet into the kernel's program arrays.

The boundary between Python and the kernel is this module's output: a dict of
flat numpy arrays, one entry per rule field, plus a straight-line op list per
`where` (OP_DTYPE records, mirroring the C struct `Op` in
engine/_fast/_types.pxd).  Nothing else about rules crosses into C.
"""

from __future__ import annotations

import numpy as np

from engine.rules import And, Changed, Compare, Count, Expr, First, InSet, Not, Or, Prefix, Rule, RuleSet
from engine.schema import COLUMN_INDEX

# Mirrors engine/_fast/_types.pxd; tests/test_kernel_types.py checks the sizes.
OP_DTYPE = np.dtype(
    [("code", np.int32), ("dst", np.int32), ("a", np.int32), ("b", np.int32), ("imm", np.int64)],
    align=True,
)
OPCODES = {"==": 0, "!=": 1, "<": 2, "<=": 3, ">": 4, ">=": 5, "in": 6, "prefix": 7, "and": 8, "or": 9, "not": 10}
CONDITIONS = {None: 0, Count: 1, First: 2, Changed: 3}


class _ProgramBuilder:
    """Lowers expressions to ops; registers are numbered afresh for each rule."""

    def __init__(self):
        self.ops: list[tuple[int, int, int, int, int]] = []
        self.constants: list[int] = []
        self.digits: list[int] = []
        self.next_reg = 0
        self.max_regs = 1

    def register(self) -> int:
        reg = self.next_reg
        self.next_reg += 1
        self.max_regs = max(self.max_regs, self.next_reg)
        return reg

    def pool(self, values: tuple[int, ...]) -> int:
        offset = len(self.constants)
        self.constants.extend(values)
        self.digits.extend(len(str(v)) if v > 0 else 0 for v in values)
        return offset

    def emit(self, expr: Expr) -> int:
        if isinstance(expr, Compare):
            dst = self.register()
            self.ops.append((OPCODES[expr.op], dst, COLUMN_INDEX[expr.column], 0, expr.value))
        elif isinstance(expr, InSet):
            dst = self.register()
            offset = self.pool(expr.values)
            self.ops.append((OPCODES["in"], dst, COLUMN_INDEX[expr.column], offset, len(expr.values)))
        elif isinstance(expr, Prefix):
            dst = self.register()
            offset = self.pool(expr.prefixes)
            self.ops.append((OPCODES["prefix"], dst, COLUMN_INDEX[expr.column], offset, len(expr.prefixes)))
        elif isinstance(expr, (And, Or)):
            code = OPCODES["and" if isinstance(expr, And) else "or"]
            dst = self.emit(expr.items[0])
            for item in expr.items[1:]:
                other = self.emit(item)
                combined = self.register()
                self.ops.append((code, combined, dst, other, 0))
                dst = combined
        elif isinstance(expr, Not):
            inner = self.emit(expr.item)
            dst = self.register()
            self.ops.append((OPCODES["not"], dst, inner, inner, 0))
        else:  # pragma: no cover - the parser builds nothing else
            raise TypeError(f"cannot compile {expr!r}")
        return dst


def _kind_mask(rule: Rule) -> int:
    mask = 0
    for code in rule.on:
        mask |= 1 << code
    return mask


def compile_program(ruleset: RuleSet) -> dict[str, np.ndarray | int]:
    """The kernel program of a rule set (see engine._fast.kernel.Kernel)."""
    n = len(ruleset.rules)
    builder = _ProgramBuilder()
    program: dict[str, np.ndarray | int] = {
        "kinds": np.zeros(n, np.uint32),
        "op_begin": np.zeros(n, np.int32),
        "op_end": np.zeros(n, np.int32),
        "result_reg": np.full(n, -1, np.int32),
        "cond": np.zeros(n, np.int32),
        "cond_n": np.zeros(n, np.int64),
        "cond_window": np.zeros(n, np.int64),
        "cond_column": np.zeros(n, np.int32),
        "cooldown": np.zeros(n, np.int64),
        "priority": np.zeros(n, np.int32),
    }
    for r, rule in enumerate(ruleset.rules):
        program["kinds"][r] = _kind_mask(rule)
        program["op_begin"][r] = len(builder.ops)
        if rule.where is not None:
            builder.next_reg = 0
            program["result_reg"][r] = builder.emit(rule.where)
        program["op_end"][r] = len(builder.ops)
        cond = rule.condition
        program["cond"][r] = CONDITIONS[type(cond) if cond is not None else None]
        if isinstance(cond, Count):
            program["cond_n"][r] = cond.at_least
            program["cond_window"][r] = cond.within
        elif isinstance(cond, First):
            program["cond_window"][r] = cond.within
        elif isinstance(cond, Changed):
            program["cond_column"][r] = COLUMN_INDEX[cond.column]
        program["cooldown"][r] = rule.cooldown
        program["priority"][r] = rule.priority
    program["ops"] = np.array(builder.ops, dtype=OP_DTYPE) if builder.ops else np.zeros(0, OP_DTYPE)
    program["n_regs"] = builder.max_regs
    program["constants"] = np.array(builder.constants, dtype=np.int64)
    program["constant_digits"] = np.array(builder.digits, dtype=np.int32)
    return program
