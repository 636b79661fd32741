# nowcast: every stage is a Make target, a `nowcast` CLI command and a library function.
# `make demo` runs the pipeline end to end; `make test` runs the test suite.
# Both install into .venv on first use.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NOWCAST := $(VENV)/bin/nowcast
TORCH_VERSION ?= 2.13.0
# Set to https://download.pytorch.org/whl/cpu on a machine without a local CPU wheel,
# so pip takes the CPU build of torch instead of the multi-GB CUDA one.
TORCH_INDEX_URL ?=
export NOWCAST_DATA_ROOT ?= $(abspath ../shared/data/pysteps-data)

SOURCE ?= bom
CONFIG ?= pipelines/configs/bom.yaml
OUT ?= runs
START ?=
END ?=
ARGS ?=

STAMP := $(VENV)/.installed

.PHONY: system-deps setup data ingest patches train evaluate evaluate-source calibrate export predict watch skill compare test lint format bench demo lab clean

# System libraries from Debian: udunits2 for the CF checker, GSHHS coastlines for offline maps.
# Installed when we are root with apt-get (CI, containers); otherwise a note is printed.
SYSTEM_PACKAGES := libudunits2-0 python-cartopy-data

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "note: install$$missing (Debian/Ubuntu) for the CF checker and offline coastlines"; fi; \
	fi

$(STAMP): pyproject.toml
	$(MAKE) system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, pinned, so the dependency resolver never picks a CUDA build.
	$(PY) -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	# Not the notebooks extra: JupyterLab's jupyter-events brings jsonschema's format checkers,
	# whose rfc3987_syntax grammar costs every fresh `nowcast` process ~1 s when pysteps imports
	# jsonschema. `make lab` adds it when wanted.
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

data: $(STAMP)
	$(NOWCAST) data $(ARGS)

ingest: $(STAMP)
	$(NOWCAST) ingest $(SOURCE) $(ARGS)

patches: $(STAMP)
	$(NOWCAST) patches $(CONFIG) $(ARGS)

train: $(STAMP)
	$(NOWCAST) train $(CONFIG) $(ARGS)

evaluate: $(STAMP)
	$(NOWCAST) evaluate $(CONFIG) $(ARGS)

# Zero-shot: the pretrained model (or ARGS="--checkpoint ...") on any catalog source, e.g.
# make evaluate-source SOURCE=fmi_2016 START=2016-09-28T15:00 END=2016-09-28T17:00
evaluate-source: $(STAMP)
	$(NOWCAST) evaluate --source $(SOURCE) $(if $(START),--start $(START)) $(if $(END),--end $(END)) $(ARGS)

calibrate: $(STAMP)
	$(NOWCAST) calibrate $(CONFIG) $(ARGS)

export: $(STAMP)
	$(NOWCAST) export $(CONFIG) $(ARGS)

predict: $(STAMP)
	$(NOWCAST) predict --source $(SOURCE) $(ARGS)

# One long-lived process: a nowcast for every new frame of SOURCE's folders (Ctrl-C stops it).
watch: $(STAMP)
	$(NOWCAST) predict --source $(SOURCE) --watch --out-dir $(or $(OUT),runs/watch) $(ARGS)

test: $(STAMP) system-deps
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check nowcast pipelines tests benchmarks
	$(VENV)/bin/ruff format --check nowcast pipelines tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format nowcast pipelines tests benchmarks
	$(VENV)/bin/ruff check --fix nowcast pipelines tests benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks $(ARGS); status=$$?; $(PY) -m benchmarks.performance_doc && exit $$status

skill: $(STAMP)
	$(PY) -m pipelines.skill $(ARGS)

compare: $(STAMP)
	$(PY) -m pipelines.skill --compare $(ARGS)

demo: $(STAMP)
	$(PY) -m pipelines.demo $(ARGS)

lab: $(STAMP)
	$(PY) -m pip install -q -e ".[notebooks]"
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf runs data/cubes data/patches
