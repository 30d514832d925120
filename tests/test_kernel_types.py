"""The Python side of the kernel boundary agrees with the C side."""

import numpy as np
import pytest

from engine import EVENT_COLUMNS, EVENT_SCHEMA, parse_rules, shard_of
from engine._fast import kernel
from engine.compiler import OP_DTYPE, compile_program
from engine.schema import COLUMN_DTYPES


def test_op_dtype_mirrors_c_struct():
    assert OP_DTYPE.itemsize == kernel.sizeof_op()


def test_kernel_column_layout_matches_schema():
    assert kernel.column_dtypes() == [str(COLUMN_DTYPES[name]) for name in EVENT_COLUMNS]
    assert [str(np.dtype(f.type.to_pandas_dtype())) for f in EVENT_SCHEMA] == kernel.column_dtypes()


def _kernel(text='[[rule]]\nid = "a"\non = "call_out"\nwhere = "peer in [1, 2]"\nchannels = ["sms"]\n'):
    return kernel.Kernel(compile_program(parse_rules(text)))


def test_kernel_refuses_mistyped_column():
    k = _kernel()
    cols = [None] * len(EVENT_COLUMNS)
    cols[0] = np.zeros(3, np.int64)
    cols[1] = np.ones(3, np.int64)
    cols[2] = np.zeros(3, np.int64)  # kind must be uint8
    with pytest.raises(ValueError):
        k.process(tuple(cols), 3)


def test_kernel_refuses_column_of_wrong_length():
    k = _kernel()
    cols = [None] * len(EVENT_COLUMNS)
    cols[0] = np.zeros(3, np.int64)
    cols[1] = np.ones(2, np.int64)
    cols[2] = np.zeros(3, np.uint8)
    with pytest.raises(ValueError, match="rows"):
        k.process(tuple(cols), 3)


def test_kernel_refuses_malformed_program():
    program = compile_program(parse_rules('[[rule]]\nid = "a"\non = "call_out"\nwhere = "peer in [1]"\n'
                                          'channels = ["sms"]\n'))
    program["ops"] = program["ops"].copy()
    program["ops"]["b"] = 5  # constant pool holds one value
    with pytest.raises(ValueError, match="malformed op"):
        kernel.Kernel(program)


@pytest.mark.parametrize(("key", "value"), [("active", 2), ("active_days", 128), ("active_start", 86_400_000),
                                            ("active_end", -5)])
def test_kernel_refuses_malformed_active_period(key, value):
    program = compile_program(parse_rules('[[rule]]\nid = "a"\non = "call_out"\nchannels = ["sms"]\n'
                                          'active = { hours = "09:00-21:00" }\n'))
    program[key] = program[key].copy()
    program[key][0] = value
    with pytest.raises(ValueError, match="active period"):
        kernel.Kernel(program)


PROFILE_RULES = ('[[rule]]\nid = "a"\non = "call_out"\nwhere = "profile.tier >= 2"\n'
                 'audience = "profile.segment == \'gold\'"\nchannels = ["sms"]\n')


def test_kernel_refuses_a_profile_test_past_its_attributes():
    program = compile_program(parse_rules(PROFILE_RULES))
    assert program["n_attrs"] == 2
    program["n_attrs"] = 1  # the audience reads attribute 1
    with pytest.raises(ValueError, match="malformed op"):
        kernel.Kernel(program)


@pytest.mark.parametrize(("key", "value"), [("has_audience", 0), ("aud_result", -1), ("aud_end", 0)])
def test_kernel_refuses_a_malformed_audience(key, value):
    program = compile_program(parse_rules(PROFILE_RULES))
    program[key] = program[key].copy()
    program[key][0] = value
    with pytest.raises(ValueError, match="audience"):
        kernel.Kernel(program)


def test_kernel_refuses_an_audience_that_reads_an_event_column():
    program = compile_program(parse_rules(PROFILE_RULES))
    program["ops"] = program["ops"].copy()
    program["ops"]["a"][program["aud_begin"][0]] = 3  # peer
    with pytest.raises(ValueError, match="an audience reads an event column"):
        kernel.Kernel(program)


def test_set_profiles_takes_one_attribute_column_per_attribute_read_only_arrays_included():
    k = kernel.Kernel(compile_program(parse_rules(PROFILE_RULES)))
    msisdn, allowed = np.array([5, 9], np.int64), np.full(2, 2**64 - 1, np.uint64)
    flags, days = np.zeros(2, np.uint8), np.zeros(2, np.uint8)
    with pytest.raises(ValueError, match="1 columns, the rules read 2"):
        k.set_profiles(msisdn, allowed, flags, days, np.zeros((2, 1), np.int64))
    with pytest.raises(ValueError, match="differ in length"):
        k.set_profiles(msisdn, allowed, flags, days, np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match="positive"):
        k.set_profiles(np.array([0, 9], np.int64), allowed, flags, days, np.zeros((2, 2), np.int64))
    attrs = np.array([[3, 0], [1, 0]], np.int64)
    for array in (msisdn, allowed, flags, days, attrs):
        array.setflags(write=False)
    k.set_profiles(msisdn, allowed, flags, days, attrs)


def test_shard_of_is_stable_and_balanced():
    msisdn = np.arange(8613800000000, 8613800000000 + 100_000, dtype=np.int64)
    shards = shard_of(msisdn, 4)
    assert shards.dtype == np.uint32
    assert np.array_equal(shards, shard_of(msisdn.copy(), 4))
    counts = np.bincount(shards, minlength=4)
    assert counts.min() > 0.95 * len(msisdn) / 4
    with pytest.raises(ValueError):
        shard_of(msisdn, 0)


@pytest.mark.parametrize(("msisdn", "ts"), [(0, 5), (-3, 5), (7, -1)])
def test_kernel_refuses_rows_that_would_corrupt_its_state(msisdn, ts):
    k = _kernel('[[rule]]\nid = "a"\non = "call_out"\ncount = { at_least = 2, within = "1h" }\nchannels = ["sms"]\n')
    cols = [None] * len(EVENT_COLUMNS)
    cols[0] = np.array([5, ts, 6], np.int64)
    cols[1] = np.array([7, msisdn, 7], np.int64)
    cols[2] = np.zeros(3, np.uint8)
    with pytest.raises(ValueError, match="row 1"):
        k.process(tuple(cols), 3)
    assert k.n_subs == 0
