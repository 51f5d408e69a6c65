# Every target works from a fresh clone: it creates (or reuses) the local virtualenv first.
PY_SYS ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TINY   := checkpoints/tiny

.PHONY: venv demo test test-all bench peer checkpoint-tiny checkpoint-bench clean

venv: $(STAMP)

# torch is pinned to 2.13.0: on these machines the CPU wheel is on local disk; an open range pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(TINY)/config.json: | $(STAMP)
	$(PY) -m gptoss.tools.make_checkpoint --preset tiny --out $(TINY)

checkpoint-tiny: $(TINY)/config.json

checkpoints/bench/config.json: | $(STAMP)
	$(PY) -m gptoss.tools.make_checkpoint --preset bench --out checkpoints/bench

checkpoint-bench: checkpoints/bench/config.json

# A tool, not a test: several minutes (it compiles the bench graphs cold, then measures). See BENCHMARKS.md.
bench: checkpoints/bench/config.json
	$(PY) -m gptoss.tools.dev.bench --model checkpoints/bench --threads 2 --json build/bench.json

# llama.cpp on the same checkpoint (MXFP4 and F32 GGUFs), in its own virtualenv build/llama-venv: the first run
# builds llama.cpp from source (minutes) and converts; later runs reuse both. See tools/dev/llama_peer.py.
peer: checkpoints/bench/config.json
	$(PY) -m gptoss.tools.dev.llama_peer --model checkpoints/bench --threads 2 --kind mxfp4 --kind f32 --json build/peer.json

demo: $(TINY)/config.json
	$(PY) -m gptoss.tools.demo --model $(TINY)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

clean:
	rm -rf $(VENV) checkpoints artifacts
