# Three commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs controltune, runs the main job on the real MiniLM
#   make test   creates .venv, installs controltune with its test extras, runs the test suite
#   make figures  rebuilds paper_figs/ (pdf, png, caption) from experiments/results/ in seconds
# The CPU build of torch is installed first with plain pip (torch==2.13.0 is a local
# wheel here); on a GPU machine install your own torch into .venv before `make`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,peft]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/controltune verify --model minilm --methods all --dtype float64

test: install
	$(PY) -m pytest -q

figures: install
	$(VENV)/bin/controltune figures

.PHONY: install demo test figures
