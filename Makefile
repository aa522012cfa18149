# Two commands for a fresh machine (see README):
#   make demo   install everything, run the whole job end to end on embedded defaults
#   make test   install everything, run the test suite
# Everything is pinned in uv.lock; uv itself is bootstrapped with pip when missing.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install system-deps demo test benchmarks clean

$(BIN)/fashion-tagging: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	uv sync --frozen --extra test
	@touch $@

install: $(BIN)/fashion-tagging

system-deps:  ## headless Chromium for the UI browser test (Debian packages)
	@bash scripts/ensure-system-deps.sh

demo: install
	$(BIN)/fashion-tagging demo

test: install system-deps
	$(BIN)/pytest

benchmarks: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf .fashion-tagging .pytest_cache
