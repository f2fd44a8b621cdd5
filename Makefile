# The two Quickstart commands: `make demo` and `make test`. Each sets up .venv from scratch if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out
# torch is pinned and installed first: this version's CPU build needs no multi-GB download here;
# on a GPU machine the same line gives the CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: setup demo demo-quick test bench clean

$(BIN)/medmim: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

setup: $(BIN)/medmim

demo: setup
	$(BIN)/medmim demo --out $(DEMO_OUT)

demo-quick: setup
	$(BIN)/medmim demo --quick --out $(DEMO_OUT)-quick

# PYTHONWARNDEFAULTENCODING: text read or written without an explicit encoding in medmim fails the suite
# (pyproject's filterwarnings), so no code path can come to depend on the process locale
test: setup
	PYTHONWARNDEFAULTENCODING=1 $(BIN)/python -m pytest -n 2 --dist loadgroup -q

bench: setup
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_predict_ct.py
	$(BIN)/python benchmarks/bench_finetune_run.py --sweep

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
