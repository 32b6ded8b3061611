# Two commands do all the set-up on a fresh machine:
#   make run    create .venv, install, run the default job (python -m dg_pipeline: base -> sft -> quantize -> export)
#   make test   create .venv, install, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install run test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU build of torch first, so nothing pulls a multi-GB CUDA build (a GPU host brings its own).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m dg_pipeline $(ARGS)

test: install
	$(PY) -m pytest -q tests $(ARGS)

bench: install
	$(PY) -m bench.sampler $(ARGS)

clean:
	rm -rf $(VENV) runs outputs wandb
