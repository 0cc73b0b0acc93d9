# The two fresh-machine commands (README): `make demo` and `make test`. Both set up first.
#
# torch: this CPU machine keeps a CPU build of torch 2.13.0 on local disk, and pip takes it for
# an exact `torch==2.13.0`. Installing it *before* the project means the project's range
# (torch>=2.5,<=2.14.1) is already satisfied and neither pip nor uv fetches a multi-GB CUDA build.
# On a GPU image set TORCH_SPEC to the CUDA build the image wants (or to nothing).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# The project itself is installed by uv, into the same venv: it fetches and unpacks in parallel and
# compiles bytecode on both cores, 30 s where pip took 76 s (measured on a fresh venv, 2026-12-05;
# the same versions, pip freeze compared). Bytecode is compiled at install because this machine
# sets PYTHONDONTWRITEBYTECODE=1: without it every process would compile torch again on import.
# torch comes first, from pip, which knows this machine's local CPU build; uv then sees it installed.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv $(if $(TORCH_SPEC),"$(TORCH_SPEC)")
	$(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -e ".[offline,local,test]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m jobs.demo

# Two pytest workers (pytest-xdist): most tests wait on Ray, S3 or a subprocess for part of their
# time, so two share 2 cores (README "Tests" has the times). --dist loadfile keeps a file's tests on
# one worker, so a module fixture (the demo run, the S3 outage) runs once; PYTEST_ARGS="-n 0" runs
# the suite in one process.
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache runs
