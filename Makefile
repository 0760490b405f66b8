# The two commands of the README. Each creates .venv on first use and installs into it;
# torch==2.13.0 is named so pip takes the local CPU build instead of a multi-GB CUDA one.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.leantorch-installed
ORACLE_STAMP := $(VENV)/.leantorch-oracle-installed

.PHONY: demo test test-slow lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[cli,hf,plot,bench,dev]"
	touch $(STAMP)

## demo: the main job: compress the embedded pretrained MiniLM sentence encoder with the
## default recipe (int8) on the bundled sentences, verify it, print the before/after table
demo: $(STAMP)
	$(VENV)/bin/leantorch compress minilm --recipe int8 --out out/minilm-int8 --overwrite

## test: the test suite (what CI runs)
test: $(STAMP)
	$(PY) -m pytest -q

# the slow tests also compare against independent oracles (the "oracle" extra: fla on the CPU);
# LEANTORCH_REQUIRE_ORACLE=1 makes a missing oracle a failure instead of a skip
$(ORACLE_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[oracle]"
	touch $(ORACLE_STAMP)

test-slow: $(ORACLE_STAMP)
	LEANTORCH_REQUIRE_ORACLE=1 $(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

## bench: every benchmark, one after the other (each writes benchmarks/results/<name>.json);
## about an hour on a quiet 2-core machine
BENCHMARKS := measure_overhead flop_counters quant recipes prune_structured sparse_matmul lottery \
	attention_softmax linear_attention attention_decode moe moe_plusplus moe_expert_parallel
bench: $(STAMP)
	for b in $(BENCHMARKS); do $(PY) benchmarks/$$b.py || exit 1; done
	$(PY) benchmarks/lottery.py --rewind-step 50

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
