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

# Until the server lands (issue 3), the main job regenerates the modules and says where they are.
serve: gen
	@echo "generated modules: output/vibee_gen/   generated tests: output/tests/"

test: install
	$(BIN)/vibee gen --check specs/tri/*.vibee
	# one thread per worker: two xdist workers on two cores, no oversubscription
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
