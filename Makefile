# The two commands: `make demo` (set up + train the quickstart) and `make test` (set up + test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# Re-install when pyproject.toml changes; the stamp marks a finished install.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/accelerate launch --config_file accelerate_config.yaml recipes/quickstart.py

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/loop.py

lint: $(VENV)/.installed
	$(BIN)/ruff check trainer loaders recipes bench tests

clean:
	rm -rf $(VENV) runs
