# The two set-up commands of README.md: `make demo` and `make test`.
VENV := .venv
BK := $(VENV)/bin/beekeeper
KUBECTL := $(BK) dev kubectl --

.PHONY: install demo down test lint format crds

install:
	bash scripts/install.sh

demo: install
	$(BK) dev up
	$(BK) dev apply -f examples/ --timeout 300
	@echo "--- busiest processes by system calls (live, from the node daemon's /metrics) ---"
	@sleep 3; $(BK) dev metrics --grep '^syscalls_total' --top 8
	$(KUBECTL) get nodes
	$(KUBECTL) get beekeeper -A

down:
	$(BK) dev down

test: install lint
	$(VENV)/bin/pytest

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

crds:
	$(VENV)/bin/python -m beekeeper.crds.generate
