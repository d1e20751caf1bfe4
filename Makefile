# pvemu: every target works from a fresh clone (it builds .venv itself).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PACKAGES := shared hypervisor guest scripts
# Installed, the four folders are pvemu.shared, pvemu.hypervisor, ... (one
# top-level package). mypy cannot follow the editable install's import hook,
# so it reads them through a tree of symlinks with the installed names.
MYPY_ROOT := $(VENV)/mypy-root

.PHONY: all venv test check run bench bench-ci bench-rtt bench-goals fuzz soak load clean

all: check test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	mkdir -p $(MYPY_ROOT)/pvemu
	for p in $(PACKAGES); do ln -sfn ../../../$$p $(MYPY_ROOT)/pvemu/$$p; done
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

check: $(STAMP)
	$(BIN)/ruff check $(PACKAGES) tests
	$(BIN)/ruff format --check $(PACKAGES) tests
	MYPYPATH=$(MYPY_ROOT) $(BIN)/mypy --strict $(addprefix -p pvemu.,$(PACKAGES))

run: $(STAMP)
	$(BIN)/pvemu run

# The benchmark harness (docs/benchmarks.md). BENCH can point at another entry
# point, e.g. BENCH="$(BIN)/python -m pvemu.scripts.bench_cmd".
BENCH ?= $(BIN)/pvemu bench
CI_BASELINE := benchmarks/baseline.json

# A default sweep with a progress bar, stored in .pvemu/results.db, then plots.
bench: $(STAMP)
	$(BENCH) --mc-bytes 128,256,512,1024 --cost-model default
	$(BENCH) plot --out .pvemu/plots
	$(BIN)/python -m pvemu.scripts.goals

# Issue 12's speed goals side by side in one run: 1 GiB batched mprotect per
# PTE, trap vs batched on 64 MiB, the trap round trip vs a trio echo, and
# 'pvemu run --pages 262144' in every mode (several minutes; reported only).
bench-goals: $(STAMP)
	$(BIN)/python -m pvemu.scripts.goals

# The CI gate: the baseline's sweep, not stored; exit 1 on any count increase.
bench-ci: $(STAMP)
	$(BENCH) --sweep-from $(CI_BASELINE) --repeat 1 --no-store --output .pvemu/bench-ci.json
	$(BENCH) compare --baseline $(CI_BASELINE) --against .pvemu/bench-ci.json

# Trap round trip beside a blocking, a spinning and a trio echo server (reported, never asserted).
bench-rtt: $(STAMP)
	$(BIN)/python -m pvemu.scripts.rtt

# The wire-decoder and hypercall-argument fuzzers (tests/fuzz/), long: at
# least a million messages / requests each; exit 1 if any crash was found.
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz --min-count 1000000

# 32 guest processes, a latency probe and a 1,000,000-record batch against one
# hypervisor (docs/robustness.md); reports records/s, probe latency, memory.
# Guests SIGKILLed at random points, 20 seeds instead of the suite's 2; the
# whole soak is one test, so its hang-dump timer is raised past its length.
soak: $(STAMP)
	PVEMU_SOAK_SEEDS=20 $(BIN)/python -m pytest -q -o faulthandler_timeout=900 \
		tests/test_faults.py -k killed_at_random

load: $(STAMP)
	$(BIN)/pvemu load

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
