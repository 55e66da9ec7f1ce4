# pagedserve: `make serve` and `make test` are all a newcomer needs (both run `make install` first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=
SERVE_ARGS ?=

.PHONY: install test serve bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[worker,test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q --durations=25 tests

serve: install
	$(VENV)/bin/pagedserve serve $(if $(MODEL),$(MODEL),--demo) $(SERVE_ARGS)

bench: install
	$(PY) benchmarks/throughput.py $(if $(MODEL),--model $(MODEL),--demo-size smol135 --arch llama)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
