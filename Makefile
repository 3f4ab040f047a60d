# `make demo` and `make test` work on a fresh machine: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test demo gpu-check clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# One CUDA GPU, about 6 minutes: CUDA tests, training and decode figures -> gpu_check_out/.
# The lent GPU machine has no .venv: there run `python3 scripts/gpu_check.py --out $$OUT/gpu`
# (docs/benchmarks.md, "GPU check", has the wheels to carry).
gpu-check: $(STAMP)
	$(BIN)/python scripts/gpu_check.py --out gpu_check_out

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
