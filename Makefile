# Two commands for a newcomer: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch is installed first and pinned: the CPU build of this version is what these machines
# carry; letting pip resolve torch on its own would fetch a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install install-dev clean ci install-cluster

# Every optional part's install target; CI installs them all so their tests run, not skip.
OPTIONAL_INSTALLS :=

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/grpo run

test: install-dev
	$(BIN)/python -m pytest

# The Ray cluster (flows/ray_cluster.py): --cluster auto | ray://host:port.
install-cluster: $(VENV)/.installed-dev
	$(BIN)/pip install -q -e '.[cluster]'
OPTIONAL_INSTALLS += install-cluster

# What .ci/run does: every optional part installed, then the README's test command with
# missing optional dependencies turned from skips into failures.
ci: $(OPTIONAL_INSTALLS)
	GRPOFLOW_REQUIRE_OPTIONAL=1 $(MAKE) test

clean:
	rm -rf $(VENV) runs .pytest_cache
