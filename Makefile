# `make test` is the one command that takes a fresh clone to a passing test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test install bench clean

$(BIN)/mvit: pyproject.toml examples/mvit-isic2019/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[1/3] pip"
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "[2/3] mvit with torch, timm and the rest: the longest step (about 80 s on two cores, quiet while it works)"
	$(BIN)/python -m pip install --quiet -e '.[dev,onnx,serve,tensorboard]'
	@echo "[3/3] the example plugin, installed for real so the tests exercise its entry point"
	$(BIN)/python -m pip install --quiet -e examples/mvit-isic2019
	touch $(BIN)/mvit
	@echo "installed: $(BIN)/mvit (activate with . $(BIN)/activate)"

install: $(BIN)/mvit

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/backbone_vs_timm.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
