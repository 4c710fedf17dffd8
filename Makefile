# One set of commands for people, CI and the README.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run migrate test test-fast lint bench chart-test screenshots clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

migrate: install
	$(VENV)/bin/cybersec migrate

# Checks PostgreSQL, Redis and RabbitMQ, migrates, runs the API on 127.0.0.1:8000 and a worker.
run: install
	$(VENV)/bin/cybersec dev

# Every test against the real services. pytest exits 5 when it collected nothing: that fails.
test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest tests/unit

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Engine vs nmap inside a private network namespace and on a lab network (root), the threads
# pool against prefork on the lab, then the service against its peers.
bench: install
	$(PY) -m bench.scan_bench
	$(PY) -m bench.network_bench
	$(PY) -m bench.pool_bench
	$(PY) -m bench.service_bench

chart-test: install
	$(PY) -m pytest tests/deploy

# The README's dashboard pictures, taken by the browser tests against a real gateway and worker.
screenshots: install
	UI_SCREENSHOTS_DIR=docs/screenshots $(PY) -m pytest tests/ui -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
