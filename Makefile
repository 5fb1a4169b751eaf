# `make demo` and `make test` are all the set-up there is: each (re)creates .venv when missing
# or when pyproject.toml changed.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tune-landmarks demo --workdir demo_run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check tune_landmarks tests scripts

clean:
	rm -rf $(VENV) demo_run
