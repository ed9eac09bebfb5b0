# The two commands: `make demo` (set up + train the quickstart) and `make test` (set up + test suite).
# `make test-fast`: the in-process unit tests alone (tests/unit), to run while changing code.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast bench lint clean browser

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# Re-install when pyproject.toml changes; the stamp marks a finished install.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# tests/end_to_end/test_space.py drives Debian's chromium through playwright (never `playwright install`: no browser
# downloads). CI runs as root; a machine that has chromium skips this.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# One process needs no launcher: a recipe file runs as a script (`accelerate launch` adds 4 s, its process importing
# torch and timm before it starts the script; see bench/overhead.py). Several processes: README, "Launching".
demo: $(VENV)/.installed
	$(BIN)/python recipes/quickstart.py

test: $(VENV)/.installed browser
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests/unit

bench: $(VENV)/.installed
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/loop.py

lint: $(VENV)/.installed
	$(BIN)/ruff check trainer loaders recipes bench tests

clean:
	rm -rf $(VENV) runs
