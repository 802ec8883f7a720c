# Two entry points for a fresh machine: `make demo` (set up + main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test lint clean wheel-check

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/edgecompress compress

test: $(BIN)/.installed
	# two workers, one torch thread each: most tests are Python-bound and use under one core each
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist worksteal
	$(BIN)/ruff check edgecompress tests benchmarks
	bash .ci/wheel_check.sh $(VENV)

wheel-check: $(BIN)/.installed
	bash .ci/wheel_check.sh $(VENV)

lint: $(BIN)/.installed
	$(BIN)/ruff check edgecompress tests benchmarks
	$(BIN)/ruff format --check edgecompress tests benchmarks

clean:
	rm -rf $(VENV) runs
