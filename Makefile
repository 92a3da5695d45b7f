# `make demo` and `make test` work on a fresh machine: each creates .venv with plain pip when absent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo docs-check measure report q-test fashion test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The demo on the embedded digits data, teach -> extract -> score -> distill -> probe; finished steps are reused
# (delete runs/digits to start over). Each step's output depends on the previous one, so a change reruns what follows.
DEMO := runs/digits
KD := $(BIN)/kdpipe
demo: $(DEMO)/distill/probe.json
	$(KD) summary $(DEMO)

$(DEMO)/teacher/model.safetensors: configs/digits.yaml | $(STAMP)
	rm -rf $(DEMO)/extract $(DEMO)/distill
	$(KD) teach --config configs/digits.yaml --overwrite

$(DEMO)/extract/extract.json: $(DEMO)/teacher/model.safetensors
	$(KD) extract --config configs/digits.yaml

$(DEMO)/extract/scores.json: $(DEMO)/extract/extract.json
	$(KD) score --config configs/digits.yaml $(DEMO)/extract

$(DEMO)/distill/student.safetensors: $(DEMO)/extract/scores.json
	rm -rf $(DEMO)/distill
	$(KD) distill --config configs/digits.yaml $(DEMO)/extract

$(DEMO)/distill/probe.json: $(DEMO)/distill/student.safetensors
	$(KD) probe --config configs/digits.yaml $(DEMO)/distill

# Every bash and python block of README.md and docs/*.md, run in order on the demo's runs/digits (blocks that need
# more start with a `# needs: ...` line). The script puts its interpreter's bin first on PATH, so blocks get the venv's
# kdpipe and python; scripts/docs_check.py says how blocks are found and run.
docs-check: $(DEMO)/distill/probe.json
	$(BIN)/python scripts/docs_check.py

# The times and example outputs the docs quote, from a clean runs/digits: demo, docs-check, test-fast and test timed
# (wall and CPU seconds, load) into docs/measured.md and .json, and the <!-- measured:NAME --> regions regenerated.
measure: | $(STAMP)
	$(BIN)/python scripts/measure.py

# The paper's comparison: every method over 5 seeds against the demo's store (runs/digits-report), at the main label
# fraction and across the label budget sweep; finished runs are reused, so an interrupted report continues.
report: $(DEMO)/extract/scores.json
	$(KD) report --config configs/digits-report.yaml

# Q's own test on digits: one student per teacher tap and per tap set, probed; rank correlations of Q, S, I, E and
# depth with the outcome (runs/digits-q-test/q-test.md); finished runs are reused.
q-test: $(DEMO)/extract/scores.json
	$(KD) q-test --config configs/digits-report.yaml

# The Fashion-MNIST study (docs/fashion-mnist.md): teacher, store, scores, the Q test and the paper's comparison from
# one config, resumable: run it again after an interruption and it continues where it stopped.
FASHION_CONFIG ?= configs/fashion-mnist.yaml
fashion: | $(STAMP)
	$(KD) study $(FASHION_CONFIG)

# Everything, the crash soak and the full-accuracy teacher included; test-fast skips the tests marked slow.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# test-fast spreads the tests over one process per core (pytest-xdist), each on one thread: 70 s against one process's
# 104 s on 2 cores (measured back to back); the full suite stays in one process, its kill-and-resume tests timing real processes.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow" -n auto

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
