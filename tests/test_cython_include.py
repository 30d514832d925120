"""Another service can cimport the kernel's declarations (engine.get_include())."""

import subprocess
import sys
import textwrap

import engine

OUTSIDE_PYX = """
from libc.stdint cimport int64_t, uint64_t
from engine._fast._types cimport mix64
from engine._fast.kernel cimport Kernel

def shard(int64_t msisdn, unsigned int n):
    return (mix64(<uint64_t>msisdn) >> 32) % n

def subscribers(Kernel k):
    return k.n_subs
"""

SETUP = """
import sys
from Cython.Build import cythonize
from setuptools import Extension, setup
sys.argv[1:] = ["build_ext", "--inplace", "-q"]
setup(ext_modules=cythonize([Extension("outside", ["outside.pyx"])],
                            include_path=[{include!r}], language_level=3, quiet=True))
"""


def test_outside_module_compiles_against_kernel_pxd(tmp_path):
    (tmp_path / "outside.pyx").write_text(OUTSIDE_PYX)
    (tmp_path / "setup.py").write_text(textwrap.dedent(SETUP.format(include=engine.get_include())))
    build = subprocess.run([sys.executable, "setup.py"], cwd=tmp_path, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    check = """
import numpy as np, outside, engine
from engine.engine import Engine
m = np.arange(8613800000000, 8613800001000, dtype=np.int64)
assert [outside.shard(int(x), 7) for x in m] == engine.shard_of(m, 7).tolist()
RULES = '''
[[rule]]
id = "a"
on = "call_out"
count = { at_least = 2, within = "1d" }
channels = ["sms"]
'''
eng = Engine.from_text(RULES)
eng.process({"ts": np.array([1, 2]), "msisdn": np.array([5, 6]), "kind": np.zeros(2, np.uint8)})
assert outside.subscribers(eng._kernel) == 2
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
