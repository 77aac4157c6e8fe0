# Two commands do all set-up on a fresh machine with only Python: `make demo` and `make test`.
# torch goes in first and pinned: on a CPU box torch==2.13.0 resolves to the CPU wheel; any
# later range it satisfies installs nothing more, so a multi-GB CUDA build is never pulled.
# editable_mode=compat puts the repo on sys.path (a .pth line), so `colossus` is a regular
# package that tests/colossus/ (a folder without __init__) can never shadow.
# --no-build-isolation: deepspeed ships as an sdist whose setup.py imports torch; an isolated
# build env would fetch a second (CUDA) torch just to build it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.colossus-installed
PYTEST_ARGS ?=

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "setuptools>=64" wheel
	$(PY) -m pip install -q --no-build-isolation --config-settings editable_mode=compat -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/colossus train recipes/gpt2-tiny.yaml

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(VENV)/bin/colossus bench step --model gpt2-124m --json docs/bench-step.json

clean:
	rm -rf $(VENV) .cache runs
