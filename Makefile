# The two fresh-machine commands (README): `make demo` and `make test`. Both set up first.
#
# torch: this CPU machine keeps a CPU build of torch 2.13.0 on local disk, and pip takes it for
# an exact `torch==2.13.0`. Installing it *before* the project means the project's range
# (torch>=2.5,<=2.14.1) is already satisfied and pip never fetches a multi-GB CUDA build.
# On a GPU image set TORCH_SPEC to the CUDA build the image wants (or to nothing).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[offline,local,test]"
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
