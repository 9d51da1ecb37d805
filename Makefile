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

export RAY_USAGE_STATS_ENABLED = 0
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: venv build-db chunks test bench corpus clean

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

build-db: venv
	$(BIN)/python -m pipeline build-db --corpus $(CORPUS) --db $(DB) $(if $(RUNNER),--runner=$(RUNNER)) $(BEAM_ARGS)

chunks: venv
	$(BIN)/python -m pipeline chunks --corpus $(CORPUS) --db $(DB) $(if $(RUNNER),--runner=$(RUNNER)) $(BEAM_ARGS)

test: venv
	$(BIN)/python -m pytest -q -ra tests

bench: venv
	$(BIN)/python -m bench.chunk_pipeline

# Regenerates the bundled corpus from Debian's python3.11-doc package (byte-identical output).
corpus: venv
	mkdir -p .corpus-src && cd .corpus-src && apt-get download python3.11-doc=3.11.2-6+deb12u9
	dpkg -x .corpus-src/python3.11-doc_*.deb .corpus-src/root
	$(BIN)/python -m pipeline.default_corpus --sources .corpus-src/root/usr/share/doc/python3.11/html/_sources
	sha256sum -c data/python-docs-3.11.jsonl.zst.sha256

clean:
	rm -rf $(DB) .corpus-src
