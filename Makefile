# The companion's entry points. `make figures` and `make test` are all a user needs; both create .venv first.
PROFILE ?= quick
DEVICE  ?= cpu
JOBS    ?= 2
PYTHON  ?= python3
PY      := .venv/bin/python
NOTEBOOKS := $(sort $(wildcard notebooks/*/*.ipynb))
EXECUTED  := $(patsubst notebooks/%.ipynb,build/$(PROFILE)/%.ipynb,$(NOTEBOOKS))
PAPERS    := mpe lpntk regularity laftr compare
QUICK_DATA := fmnist  # real data the quick profile reads besides the embedded sets
PARAMS    ?=          # notebook parameters for figures: PARAMS='-p n_train 500' (checked against the notebook)
# Where torch==2.13.0 comes from. Empty: the default index, i.e. the CPU build this project pins. For a GPU, the CUDA
# build from PyTorch's index, e.g. make env TORCH_INDEX=https://download.pytorch.org/whl/cu128 (pick the CUDA version
# your driver supports); the pin stays the same version, so the stored results compare like with like.
TORCH_INDEX ?=

.PHONY: help env data-quick figures $(addprefix figures-,$(PAPERS)) test test-kernels smoke unit bench cost book lab references data clean
.DEFAULT_GOAL := help

help:  ## list the targets
	@echo "make figures [PROFILE=quick|paper] [DEVICE=cpu|cuda|mps|auto] [JOBS=2]  run every notebook -> figures/<profile>/"
	@echo "                       each notebook's variants of the profile too (params/<profile>/<id>-<variant>.yaml)"
	@echo "make figures-<paper>   only one paper's notebooks ($(PAPERS))"
	@echo "make test              unit tests + nbval regression checks of every notebook (quick profile)"
	@echo "make test-kernels      one notebook per paper under torch's portable CPU kernels (part of make test)"
	@echo "make smoke [DEVICE=cuda]  every paper profile and variant, shrunk to tiny data, on DEVICE (the GPU check: minutes)"
	@echo "make unit              unit tests only"
	@echo "make bench             a retraining sweep vectorised / on Dask / one after another; per-example gradients"
	@echo "make cost              what every paper-profile notebook trains and its GPU-hours -> figures/paper/COST.md"
	@echo "make book [PROFILE=quick]  the companion as a static site -> build/book/ (from the stored outputs; offline; needs Node.js)"
	@echo "make lab               JupyterLab on notebooks/"
	@echo "make references        re-execute notebooks in place: refresh the stored nbval references"
	@echo "make data-quick        provide and verify what the quick profile needs (Fashion-MNIST; run by figures and test)"
	@echo "make data              download and verify MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100, Jiang's C-scores (needs internet)"
	@echo "make env [TORCH_INDEX=https://download.pytorch.org/whl/cu128]  create .venv (torch pinned first: CPU build, or CUDA)"
	@echo "make clean             remove build products and caches (keeps figures/ and downloaded data)"

.venv/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned (the CPU build unless TORCH_INDEX names a CUDA index), so that nothing later pulls other wheels
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -c "import torch; print('torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"
	$(PY) -m pip install -q -c constraints.txt -e '.[test,dev,distributed,peers,book]'
	touch $@

env: .venv/.installed

# Fashion-MNIST for the quick profile: a verified copy on disk, else the canonical mirror, else Debian's
# dataset-fashion-mnist unpacked into the cache (apt-get download, no root); otherwise an error naming the fixes.
data-quick: env
	$(PY) -m mpe.data provision $(QUICK_DATA)

# -k: a failing notebook does not stop the others; the summary then lists what failed and why (status column of
# figures/<profile>/SUMMARY.md), and the target fails.
figures: env data-quick
	@$(MAKE) -k -j$(JOBS) --no-print-directory $(EXECUTED); rc=$$?; \
	$(PY) -m mpe.harness summary --profile $(PROFILE); exit $$rc

$(addprefix figures-,$(PAPERS)): figures-%: env data-quick
	@$(MAKE) -k -j$(JOBS) --no-print-directory $(filter build/$(PROFILE)/$*/%,$(EXECUTED)); rc=$$?; \
	$(PY) -m mpe.harness summary --profile $(PROFILE); exit $$rc

build/$(PROFILE)/%.ipynb: notebooks/%.ipynb $(wildcard mpe/*.py) $(wildcard params/$(PROFILE)/*.yaml) | env
	$(PY) -m mpe.harness run $< --profile $(PROFILE) --device $(DEVICE) $(PARAMS)

# Figures written while testing go to build/test-figures, not into the tracked figures/.
# One pytest run: unit tests and every notebook (nbval-lax compares the claims-check cells with the stored outputs),
# except one notebook per paper (KERNEL_NOTEBOOKS), which then runs under torch's portable CPU kernels
# (ATEN_CPU_CAPABILITY=default), with a cache of its own, against the same stored references: once, not twice, to
# keep make test within its 45 minutes on 2 cores.
KERNEL_NOTEBOOKS := notebooks/mpe/fig10_adam_preconditioner.ipynb notebooks/lpntk/table1_forgetting_events.ipynb \
	notebooks/regularity/noise_flipped_labels.ipynb notebooks/laftr/ablations_laftr_variants.ipynb
NBVAL := --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
# nbval compares the claims and their sources; `harness compare` then compares each run's verdicts with the stored
# reference (figures/quick): a move of one step is within noise and reported, a contradiction fails.
test: env data-quick
	rm -rf build/test-figures
	MPE_FIGURES_DIR=$(CURDIR)/build/test-figures MPE_OFFLINE=1 MPLBACKEND=Agg $(PY) -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder \
		--junitxml=build/test-junit.xml $(NBVAL) tests $(filter-out $(KERNEL_NOTEBOOKS),$(NOTEBOOKS))
	$(PY) -m mpe.harness compare build/test-figures/quick
	$(MAKE) --no-print-directory test-kernels

test-kernels: env data-quick  ## the KERNEL_NOTEBOOKS under torch's portable kernels, against the same references
	rm -rf build/test-figures-default
	ATEN_CPU_CAPABILITY=default MPE_RESULTS_DIR=$(CURDIR)/build/cache-default MPE_FIGURES_DIR=$(CURDIR)/build/test-figures-default \
		MPE_OFFLINE=1 MPLBACKEND=Agg $(PY) -m pytest -n $(JOBS) --dist loadfile $(NBVAL) $(KERNEL_NOTEBOOKS)
	$(PY) -m mpe.harness compare build/test-figures-default/quick

# The paper profile of every notebook and variant, shrunk (params/shrunk/), on DEVICE: on a GPU this is the check that
# nothing mixes devices before hours of compute are spent. make test runs the notebooks' own paper profiles, shrunk,
# on the CPU; the variants (CIFAR-10, Split CIFAR) only here, as their mechanisms have unit tests of their own.
smoke: env data-quick
	MPE_SMOKE_DEVICE=$(DEVICE) MPE_OFFLINE=1 MPLBACKEND=Agg $(PY) -m pytest -n $(JOBS) -rfE tests/test_paper_profiles.py

unit: env
	MPE_OFFLINE=1 $(PY) -m pytest -n $(JOBS) tests

# The executed notebooks (build/<profile>/ where make figures ran, else the stored quick-profile outputs), the figures and
# the README as a static site: MyST (mystmd) builds its content, mpe.book draws the pages. Nothing is re-executed.
book: env
	$(PY) -m mpe.book --profile $(PROFILE)

lab: env
	$(PY) -m jupyter lab notebooks/

references: env
	$(PY) -m mpe.harness references $(NOTEBOOKS)

data: env
	$(PY) -c "from mpe.data import load; [print(n, load(n, download=True).x_train.shape) for n in ('mnist', 'fmnist', 'cifar10', 'cifar100')]"
	$(PY) -c "from mpe.data import load, load_cscores; [print(n, 'C-scores', load_cscores(n, load(n).y_train, download=True).shape) for n in ('cifar10', 'cifar100')]"

clean:
	rm -rf build .pytest_cache *.egg-info
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +

# Ratios measured side by side in one run on this machine (not a test: timings vary between machines).
bench: env
	MPE_OFFLINE=1 $(PY) -m mpe.cost sweeps

cost: env
	$(PY) -m mpe.harness cost --out figures/paper/COST.md
