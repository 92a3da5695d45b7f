# `make demo` and `make test` work on a fresh machine: each creates .venv with plain pip when absent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The demo on the embedded digits data; finished steps are reused (delete runs/ to start over).
DEMO := runs/digits
demo: $(DEMO)/extract/scores.json
	$(BIN)/kdpipe info $(DEMO)/extract

# A new teacher invalidates the features cached from the old one.
$(DEMO)/teacher/model.safetensors: configs/digits.yaml | $(STAMP)
	rm -rf $(DEMO)/extract
	$(BIN)/kdpipe teach --config configs/digits.yaml

$(DEMO)/extract/extract.json: $(DEMO)/teacher/model.safetensors
	$(BIN)/kdpipe extract --config configs/digits.yaml

$(DEMO)/extract/scores.json: $(DEMO)/extract/extract.json
	$(BIN)/kdpipe score --config configs/digits.yaml $(DEMO)/extract

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
