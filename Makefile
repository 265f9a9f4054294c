# One-command setup on a fresh Debian machine (Python 3.11; root or sudo).
#   make run    set everything up, run configs/default.py (the embedded default)
#   make test   set everything up, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
WORKDIR ?= workdirs/default

.PHONY: setup data weights run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
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

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) workdirs
