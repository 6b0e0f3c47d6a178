# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when
# it is missing (about 2 minutes) and are fast when it is already there.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
LOCK   := requirements.lock
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo test test-fast bench venv lock gpu clean-data sentinel sentinel-registered scenes

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || (command -v $(PYTHON) >/dev/null 2>&1 && $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV))
	$(PY) -m pip install -q --disable-pip-version-check -c $(LOCK) -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch, timm, torch_geometric, faiss, rasterio, geopandas, h5py, matplotlib, pymilvus, milvus_lite, distributed" \
	  || (echo "error: the environment did not install correctly (see pip output above)" && exit 1)
	@touch $(STAMP)

venv: $(STAMP)

## The main job on the embedded default: synthetic world -> dataset -> train -> index -> localize -> evaluate.
demo: $(STAMP)
	$(PY) -m cmpc demo experiments/demo.json

## The test suite (unit + end-to-end on a tiny world; real-data tests skip when ../shared is absent).
test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

## The Sentinel-1 -> Sentinel-2 recipe trained on the pairs as published, three seeds, fused,
## evaluated (the card shipped until 2026-12-01, now the baseline), the pairs' co-registration
## measured, docs/real.json written (needs ../shared/data/real/sentinel-la; 2-3 hours on 2 cores).
sentinel: $(STAMP)
	bash experiments/sentinel/run.sh

## The shipped model (weights/sentinel/) retrained from scratch: the same recipe on sentinel-la
## with each SAR file moved onto its content first (CFOG co-registration), three seeds fused, its
## gate calibrated on validation, the test tilings answered once, its scene pieces trained (it
## needs ../shared/data/real/sentinel-la; about 3 hours on 2 cores). Its header says how to ship it.
sentinel-registered: $(STAMP)
	bash experiments/sentinel/run_registered.sh

## Scene localization study: 8 km unseen synthetic map (200 scenes per size and heading), UAVSAR and
## sentinel-la scenes; docs/scenes.json and docs/img/scenes_*.png (needs make demo; about 2-2.5 h, estimated
## from its parts; SCENES=10 CAL_SCENES=6 GNN_SCENES=6 DEMO_SCENES=6 make scenes is a smoke run).
scenes: $(STAMP)
	bash experiments/scenes/run.sh

## Benchmarks (not part of CI): rewrites docs/BENCHMARKS.md and docs/benchmarks.json.
bench: $(STAMP)
	$(PY) -m benchmarks.run_all

## Refresh requirements.lock: a fresh venv from pyproject.toml alone (newest allowed versions), frozen.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	{ sed -n '1,3p' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^-e'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

## GPU install (docs/SCALE.md): faiss with CUDA (requirements-gpu.txt) instead of faiss-cpu, in .venv.
gpu: $(STAMP)
	$(PY) -m pip uninstall -q -y faiss-cpu
	$(PY) -m pip install -q --disable-pip-version-check -c $(LOCK) -r requirements-gpu.txt
	$(PY) -c "import faiss, torch; n = faiss.get_num_gpus(); print(f'faiss {faiss.__version__}: {n} GPU(s); torch CUDA {torch.version.cuda}: {torch.cuda.is_available()}'); raise SystemExit(0 if n > 0 else 'error: faiss sees no GPU (driver? see docs/SCALE.md)')"

clean-data:
	rm -rf data runs reports index/*/
