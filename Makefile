# One-command setup on a fresh Debian machine (Python 3.11; root or sudo).
#   make run    set everything up, run configs/default.py (the embedded default)
#   make test   set everything up, run the test suite
#   make paper EXTRAS=test,cuda   on a GPU machine with a network: the paper's
#               benchmarks (BENCHMARKS=, METHOD=), each fetched, prepared and
#               sized to the device by its first run, then the report beside
#               the published table (workdirs/paper/report.md); ARGS= more flags
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= test
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
METHOD ?= lorm
BENCHMARKS ?= imagenet_r cifar100 eurosat imagenet_a cars196 cub200
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
WORKDIR ?= workdirs/default

.PHONY: setup data weights run test paper clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

$(FMNIST):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist

data: $(FMNIST)

weights: $(STAMP)
	$(BIN)/python -m experiments.fetch_weights

setup: $(STAMP) data weights

run: setup
	$(BIN)/python -m experiments.run --config=configs/default.py --workdir=$(WORKDIR)

# The suite in one worker process per core (at most 4: each holds its own
# compiled programs), a test file per worker at a time; set TEST_WORKERS=0
# to run it in this process.
TEST_WORKERS ?= auto --maxprocesses=4
test: setup
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile --durations=25

paper: $(STAMP)
	set -e; for b in $(BENCHMARKS); do \
	  $(BIN)/python -m experiments.run --config=configs/$$b.py --config.method=$(METHOD) \
	      --workdir=workdirs/paper/$(METHOD)_$$b $(ARGS); \
	done
	$(BIN)/python -m experiments.report workdirs/paper/*_* --out=workdirs/paper

clean:
	rm -rf $(VENV) workdirs
