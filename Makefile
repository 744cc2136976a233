# The two commands: `make run` and `make test`. Both create .venv when it is missing and
# install the project into it (editable, so conf/ and experiments/ are read in place).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: run test bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# reinstall when the declared dependencies change
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m mbv2.run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) -m mbv2.bench $(ARGS)

clean-venv:
	rm -rf $(VENV)
