# Two commands set up a fresh machine:
#   make demo   - install, start Airflow (LocalExecutor, SQLite, 127.0.0.1) and run the DAG on the small model
#   make test   - the whole test suite (what CI runs through .ci/run)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# W8A8 int8: served fast by vLLM's CPU build on every CPU of this kind (FP8 runs there through a slow
# fallback). 4-bit on AVX512/GPU hosts: make demo DEMO_CONF='{"method":"gptq","bits":4,"group_size":32}'
DEMO_CONF ?= {"method":"w8a8","bits":8}

.PHONY: venv assets demo stop test test-fast serving-env services bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip wheel
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

assets: venv
	$(PY) scripts/prepare_assets.py

serving-env:
	@if [ -x scripts/setup_serving_env.sh ]; then scripts/setup_serving_env.sh; fi

services: venv
	scripts/setup_test_services.sh
	scripts/setup_browser.sh

demo: assets serving-env services
	$(PY) scripts/monitoring_local.py start
	$(PY) scripts/airflow_local.py start
	$(PY) scripts/airflow_local.py trigger '$(DEMO_CONF)'

stop:
	$(PY) scripts/airflow_local.py stop
	$(PY) scripts/monitoring_local.py stop

# the setup (venv assets serving-env services) runs inside run_tests.sh: vLLM's environment beside the rest
test:
	scripts/run_tests.sh $(PY)

test-fast: assets
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: assets
	$(PY) bench/stage_bench.py

clean: stop
	rm -rf .airflow .artifacts
