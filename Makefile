# Two commands for a fresh machine (see README):
#   make demo   install everything, run the whole job end to end on embedded defaults
#   make test   install everything, run the test suite
# Everything is pinned in uv.lock; uv itself is bootstrapped with pip when missing.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install system-deps demo test clean

$(BIN)/fashion-tagging: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	uv sync --frozen --extra test
	@touch $@

install: $(BIN)/fashion-tagging

system-deps:  ## headless Chromium for the UI browser test: apt-installs it when root, else says what to install
	@bash scripts/ensure-system-deps.sh

demo: install
	$(BIN)/fashion-tagging demo

test: install system-deps
	$(BIN)/pytest

clean:  ## stops the embedded PostgreSQL first: its data directory is deleted with the rest
	@if [ -x $(BIN)/fashion-tagging ]; then $(BIN)/fashion-tagging db stop; fi
	rm -rf .fashion-tagging .pytest_cache
