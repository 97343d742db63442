# mrplab: `make run` and `make test` create the virtual environment on first use.
# The venv is (re)installed whenever pyproject.toml changes (stamp file .venv/.installed).

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: venv run test bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[test]'
	touch $(STAMP)

# the default theory run; extra options via ARGS, e.g. make run ARGS="--set mrp.mask_ratio=0.6"
run: venv
	$(VENV)/bin/mrplab theory $(ARGS)

test: venv
	$(VENV)/bin/python -m pytest -q -rs tests

bench: venv
	$(VENV)/bin/python benchmarks/theory_walltime.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
