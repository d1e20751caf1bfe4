# pvemu: every target works from a fresh clone (it builds .venv itself).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PACKAGES := shared hypervisor guest scripts

.PHONY: all venv test check run bench-rtt clean

all: check test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

check: $(STAMP)
	$(BIN)/ruff check $(PACKAGES) tests
	$(BIN)/ruff format --check $(PACKAGES) tests
	$(BIN)/mypy --strict $(PACKAGES)

run: $(STAMP)
	$(BIN)/pvemu run

# Trap round trip vs a blocking msgpack echo floor (reported, never asserted).
bench-rtt: $(STAMP)
	$(BIN)/python -m scripts.rtt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
