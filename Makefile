# Quick start: `make train` and `make test` (each sets up what is missing first).
.PHONY: setup train test clean

PYTHON := .venv/bin/python

setup:
	@bash launch/setup.sh

train: setup
	$(PYTHON) -m launch.train --flagfile=launch/configs/digits.cfg $(ARGS)

test: setup
	bazel test //...

clean:
	bazel clean
