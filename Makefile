# Two commands on a fresh machine: `make demo` and `make test`.
# Both build a virtual environment in .venv with the compiled kernel
# (pip install -e '.[test]'), rebuilt whenever the build files or the Cython
# sources change.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.kairos-installed

.PHONY: demo test bench debug-build clean

$(INSTALLED): pyproject.toml setup.py $(wildcard engine/_fast/*.pyx engine/_fast/*.pxd adapters/*.pyx)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(INSTALLED)
	$(VENV)/bin/kairos demo

test: $(INSTALLED)
	$(PY) -m pytest

bench: $(INSTALLED)
	$(PY) bench/bench_engine.py

# Bounds checks, line tracing and -O0 -g (setup.py); `make test` afterwards
# runs the suite against it.  Remove .venv/.kairos-installed to go back.
debug-build: $(INSTALLED)
	$(PY) -m pip install -q wheel
	KAIROS_DEBUG=1 $(PY) -m pip install -q --no-build-isolation -e '.[test]'

clean:
	rm -rf $(VENV) build engine/_fast/*.c engine/_fast/*.so *.egg-info
