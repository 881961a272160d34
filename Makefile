# Set-up and everyday targets. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test lint bench clean

# torch is pinned to the CPU build first: an unpinned torch would pull several GB of CUDA packages.
$(BIN)/spt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile torch==2.13.0
	$(BIN)/python -m pip install -q --no-compile -e ".[dev,bertscore,meteor,serve]"
	touch $@

install: $(BIN)/spt

demo: install
	$(BIN)/spt demo --out runs/demo

# The multi-process tests (2 CPU processes each, ~15 s start-up per launch) run as a second call.
test: install
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest -m distributed

lint: install
	$(BIN)/ruff check spt tests bench

clean:
	rm -rf $(VENV) runs *.egg-info
