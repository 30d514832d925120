"""Builds the Cython kernels under engine/_fast and the msgpack decoder of adapters/wire.py.

Compiler directives are set here, once.  KAIROS_DEBUG=1 gives a debug build:
bounds and wraparound checks on, line tracing for coverage and profilers,
and -O0 -g for gdb.  KAIROS_SANITIZE=1 adds AddressSanitizer and
UndefinedBehaviorSanitizer (run Python with LD_PRELOAD=$(gcc
-print-file-name=libasan.so)).  Nothing falls back to pure Python: if the
extension does not build, installation fails.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("KAIROS_DEBUG", "") not in ("", "0")
SANITIZE = os.environ.get("KAIROS_SANITIZE", "") not in ("", "0")

directives = {
    "language_level": 3,
    "embedsignature": True,
    "cdivision": True,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "linetrace": DEBUG,
}
compile_args = ["-O0", "-g"] if DEBUG else ["-O3"]
link_args = []
if SANITIZE:
    sanitizers = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    compile_args += ["-g", *sanitizers]
    link_args += sanitizers
macros = []
if DEBUG:
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

extensions = [
    Extension(
        "engine._fast.kernel",
        ["engine/_fast/kernel.pyx"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=macros,
    ),
    Extension(
        "engine._fast.table",
        ["engine/_fast/table.pyx"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=macros,
    ),
    Extension(
        "adapters._msgpack",
        ["adapters/_msgpack.pyx"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=macros,
    ),
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, include_path=["."]))
