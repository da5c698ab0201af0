# Two commands do the whole set-up on a fresh machine with Python 3.10+:
#   make demo   creates .venv, installs pixclass, trains the demo model
#   make test   creates .venv, installs pixclass with test extras, runs the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/pixclass demo

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=30

# also the slow tests (CIFAR-10 and other long checks)
test-all: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m ''

clean:
	rm -rf $(VENV) runs .pytest_cache
