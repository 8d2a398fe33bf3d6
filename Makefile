# Two entry points for a fresh machine: `make serve` (the main job) and `make test` (what CI runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install gen check serve test test-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch where no GPU is present; triton's interpreter needs numpy < 2.4 (see shared/GPU.md).
	$(BIN)/pip install -q "torch==2.13.0" "triton==3.6.0" "numpy>=1.26,<2.4"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

gen: install
	$(BIN)/vibee gen specs/tri/*.vibee

check: install
	$(BIN)/vibee gen --check specs/tri/*.vibee

# The main job: the OpenAI-compatible server on the built-in model (pass flags with ARGS="--port 9000 ...").
serve: install
	$(BIN)/vibee serve $(ARGS)

test: install
	$(BIN)/vibee gen --check specs/tri/*.vibee
	# one thread per worker: two xdist workers on two cores, no oversubscription
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
