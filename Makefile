# The two commands: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch/torchvision are pinned in constraints.txt (CUDA builds that also run on CPU).
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
PYTEST_ARGS ?= -n 2 --timeout 900

.PHONY: setup demo test test-fast bench clean help gpu-bundle
help:
	@echo "make demo   set up .venv if needed, then run the built-in end-to-end demo (demo-output/)"
	@echo "make test   set up .venv if needed, then run the test suite"
	@echo "make bench  run the benchmarks in benchmarks/"

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch torchvision
	$(PIP) -e '.[test]'
	$(PIP) --no-deps lightly  # DINO loss/head only (pretrain-encoder): not its pytorch-lightning, hydra-core
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/dinodiff demo --out demo-output

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The report's browser test (tests/report/test_report_browser.py) needs Chromium: installed once from Debian, never skipped.
.PHONY: browser
browser:
	@command -v chromium >/dev/null || command -v chromium-headless-shell >/dev/null || \
	  { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update && $$SUDO apt-get install -y chromium; }

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_prepare.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_fid.py
	$(BIN)/python benchmarks/bench_segment.py
	$(BIN)/python benchmarks/bench_ncut.py
	$(BIN)/python benchmarks/bench_superpixel_nodes.py --data $${DINODIFF_TEST_DATA:-../shared/data}/lungs-covid
	$(BIN)/python benchmarks/superpixel_ceiling.py --data $${DINODIFF_TEST_DATA:-../shared/data}/lungs-covid --data $${DINODIFF_TEST_DATA:-../shared/data}/lungs-shenzhen

gpu-bundle: $(STAMP)  # .gpu/: wheels, prepared CXRs and TAEF2 for the GPU machine (benchmarks/gpu/README.md)
	PYTHON=$(BIN)/python bash benchmarks/gpu/bundle.sh

clean:
	rm -rf $(VENV) demo-output .pytest_cache
