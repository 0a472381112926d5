# `make test` is the one command that takes a fresh clone to a passing test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test install bench clean

$(BIN)/mvit: pyproject.toml examples/mvit-isic2019/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,onnx,serve]'
	# The example plugin is installed for real so the tests exercise its entry point.
	$(BIN)/python -m pip install --quiet -e examples/mvit-isic2019
	touch $(BIN)/mvit

install: $(BIN)/mvit

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/backbone_vs_timm.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
