# Every target sets itself up: a .venv with the package installed in strict editable mode.
# Python finds ./integrations through resilience/integrations/__init__.py, but mypy cannot
# follow that, so it reads the install's link tree, where integrations/ sits in place.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The installed link tree must be rebuilt when a source file is added or removed.
SOURCES := $(sort $(shell find resilience integrations -type f \( -name '*.py' -o -name '*.lua' -o -name '*.sql' -o -name 'py.typed' \) 2>/dev/null))

.PHONY: demo test lint unasync typecheck check-install pytest bench constraints clean

demo: $(VENV)/.installed
	$(BIN)/resilience demo

# check-install before pytest, so the suite's summary stays the last line.
test: lint typecheck check-install pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/unasync.py --check

# Regenerate every _sync_*.py from its _async_*.py source.
unasync: $(VENV)/.installed
	$(BIN)/python scripts/unasync.py

typecheck: $(VENV)/.installed
	$(BIN)/mypy

# Build the wheel, install it with no extras into a fresh venv, import every module.
check-install: $(VENV)/.installed
	$(BIN)/python scripts/check_install.py

pytest: $(VENV)/.installed
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

$(VENV)/.sources: FORCE
	@mkdir -p $(VENV)
	@echo '$(SOURCES)' | cmp -s - $@ || echo '$(SOURCES)' > $@

$(VENV)/.installed: pyproject.toml $(VENV)/.sources
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=strict
	touch $@

# Pin what CI installs to what this .venv has (after a fresh install has passed make test).
constraints: $(VENV)/.installed
	{ sed -n '1,2p' .ci/constraints.txt; $(BIN)/python -m pip freeze --exclude-editable; } > .ci/constraints.txt.new
	mv .ci/constraints.txt.new .ci/constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info

FORCE:
