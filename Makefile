# Two commands do all the set-up on a fresh machine (Python >= 3.10 with venv and pip):
#   make demo   # create .venv, install exmap-ray, run the C-MNIST demo (a few minutes on 2 CPU cores)
#   make test   # create .venv, install exmap-ray with test extras, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# The suite runs in two pytest processes (pytest-xdist), each taking whole test files: on 2 cores it
# takes about half the time of one process (docs/benchmarks.md). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2

.PHONY: demo test lint format install lock clean

# On Python 3.11 the install takes the versions in constraints.txt (what the suite last passed with);
# on another Python, the newest that pyproject.toml's ranges allow.
PINS = $$($(PY) -c 'import sys; print("-c constraints.txt" if sys.version_info[:2] == (3, 11) else "")')

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' $(PINS)
	touch $(STAMP)

# Re-pin constraints.txt: a fresh venv with the newest versions pyproject.toml allows (with the peers and
# dpe extras, so their pins are kept), frozen (run the suite after it, and commit constraints.txt with the
# figures it gives).
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q -e '.[dev,peers,dpe]'
	{ grep '^#' constraints.txt; .lock-venv/bin/python -m pip freeze --exclude-editable; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt && rm -rf .lock-venv

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/exmap-ray run tune_specs/cmnist.yaml --out runs/demo

# pytest exits 5 when it collected no tests: that must fail, not pass quietly.
test: $(STAMP)
	$(VENV)/bin/ruff check exmap_ray tests benchmarks
	$(VENV)/bin/ruff format --check exmap_ray tests benchmarks
	@RAY_AUTH_MODE=disabled $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests - failing" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache

# ruff's checks and format check alone (make test runs them first); settings in pyproject.toml, [tool.ruff]
lint: $(STAMP)
	$(VENV)/bin/ruff check exmap_ray tests benchmarks
	$(VENV)/bin/ruff format --check exmap_ray tests benchmarks

# rewrite the code in the house style (what `ruff format --check` in make test asks for)
format: $(STAMP)
	$(VENV)/bin/ruff format exmap_ray tests benchmarks
