# SaliencyTrust: two commands. `make demo` runs the study on SynthCXR; `make test` runs the suite.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, from the pinned builds, so that nothing below can pull another one.
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m saliency_trust.workflows.demo --out $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/ruff check monai_bundle tests bench SaliencyTrust docs
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -ra --timeout=900 tests

bench: $(STAMP)
	$(BIN)/python bench/metrics_bench.py --out bench/results
	$(BIN)/python bench/saliency_bench.py --out bench/results

clean:
	rm -rf $(VENV) $(DEMO_DIR)
