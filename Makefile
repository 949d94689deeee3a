# One entry point per task. Every target sets up .venv first, so a fresh clone needs only
# Python 3.11 and `make demo` / `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install gen lint test demo serve bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

gen: $(STAMP)  ## Regenerate gen/ from proto/
	$(BIN)/python scripts/gen_proto.py

lint: $(STAMP)  ## buf lint, ruff, mypy
	$(BIN)/python scripts/gen_proto.py --lint
	$(BIN)/ruff check .
	$(BIN)/mypy ingest_service edge

test: $(STAMP)  ## The whole suite (real Postgres, Redis, grpcurl)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)  ## Embedded Postgres and Redis, the gateway, a real batch through gRPC
	$(BIN)/python scripts/demo.py

serve: $(STAMP)  ## The gateway with Envoy on https://localhost:8443 (REST and gRPC), embedded servers
	$(BIN)/welltegra-ingest serve --dev --data-dir .welltegra/demo --envoy-listen 127.0.0.1:8443

bench: $(STAMP)  ## Benchmarks, each printing its figure beside its ceiling
	$(BIN)/python bench/gateway_throughput.py
	$(BIN)/python bench/rest_throughput.py
	$(BIN)/python bench/limits_isolation.py
	$(BIN)/python bench/agent_pipeline.py
	$(BIN)/python bench/opcua_latency.py
	$(BIN)/python bench/csv_ingest.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
