# SaliencyTrust: `make demo` runs the study on SynthCXR; `make demo-ct` the same four criteria on volumes (SynthCT,
# 3-D classifiers); `make test` runs the suite.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
DEMO_CT_DIR ?= demo_ct_out
# Test-only packages, each in its own folder (never in the venv, whose versions they would replace):
# what Slicer ships (5.10: pydicom 2.4.4, numpy 2.0.2, scipy 1.13.1; 5.8: numpy 1.26.4) for the
# module's Slicer-side paths, and MONAI Label's own client (monailabel 0.8.5 without its dependencies).
SLICER510 := $(VENV)/slicer-5.10
SLICER58 := $(VENV)/slicer-5.8
MONAILABEL := $(VENV)/monailabel-0.8.5
EXTRAS := $(VENV)/.test-extras
# Threads per test process (`make test THREADS=1`): the suite must pass with 1 and with 2. OpenMP waits
# passively: spinning waits made CPU passes up to 50x slower beside another busy process on 2 cores.
THREADS ?= 2

.PHONY: demo demo-ct test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, from the pinned builds, so that nothing below can pull another one.
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(EXTRAS): $(STAMP) Makefile
	rm -rf $(SLICER510) $(SLICER58) $(MONAILABEL)
	$(BIN)/python -m pip install --quiet --no-deps --target $(SLICER510) pydicom==2.4.4 numpy==2.0.2 scipy==1.13.1
	$(BIN)/python -m pip install --quiet --no-deps --target $(SLICER58) pydicom==2.4.4 numpy==1.26.4
	$(BIN)/python -m pip install --quiet --no-deps --target $(MONAILABEL) monailabel==0.8.5
	touch $(EXTRAS)

demo: $(STAMP)
	$(BIN)/python -m saliency_trust.workflows.demo --out $(DEMO_DIR)

demo-ct: $(STAMP)
	$(BIN)/python -m saliency_trust.workflows.demo_ct --out $(DEMO_CT_DIR)

test: $(STAMP) $(EXTRAS)
	$(BIN)/ruff check monai_bundle tests bench SaliencyTrust docs
	SALIENCY_TRUST_REQUIRE_EXTRAS=1 OMP_NUM_THREADS=$(THREADS) OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -ra --timeout=900 --durations=15 tests

bench: $(STAMP)
	$(BIN)/python bench/metrics_bench.py --out bench/results
	$(BIN)/python bench/saliency_bench.py --out bench/results

clean:
	rm -rf $(VENV) $(DEMO_DIR) $(DEMO_CT_DIR)
