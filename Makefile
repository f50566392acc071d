# make demo  - create .venv, install, fine-tune the packaged all-MiniLM-L6-v2 on the NLI pairs
# make test  - create .venv, install, lint and run the tests
# make bench - the side-by-side benchmark against sentence-transformers (slow; see BENCHMARKS.md)
#
# torch is installed first and pinned, because a bare `torch` requirement pulls a multi-GB CUDA
# build. With a GPU, choose your own build: make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
# Real data (STSb, SNLI, MultiNLI): $MNR_DATA_DIR, else ../shared/data.
MNR_DATA_DIR ?= $(abspath ../shared/data)
export MNR_DATA_DIR
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,bench]'
	touch $@

# A finished demo starts afresh; a stopped one (Ctrl-C, SIGTERM, a timeout) continues from its checkpoint.
demo: install
	@if [ -d runs/demo/final ]; then rm -rf runs/demo; fi
	@if [ -f runs/demo/config.toml ]; then echo "continuing the stopped demo run in runs/demo"; fi
	$(BIN)/mnr train --config configs/nli-minilm-cpu.toml --output runs/demo $$([ -f runs/demo/config.toml ] && echo --resume) \
		|| { code=$$?; [ $$code -ne 130 ] && [ $$code -ne 143 ] || echo "make demo: stopped; run make demo again to continue"; exit $$code; }
	$(BIN)/mnr eval sentence-transformers/all-MiniLM-L6-v2 runs/demo/final --sts sts/stsb_dev.jsonl.gz sts/stsb_test.jsonl.gz

lint: install
	$(BIN)/ruff check src tests bench

test: lint
	$(BIN)/pytest -q

bench: install
	$(BIN)/python -m bench.compare

clean:
	rm -rf $(VENV) runs bench/out
