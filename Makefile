# make run   — train Fashion-MNIST through the real KFP pipeline on this machine (kfp.local)
# make test  — lint, type-check, check infra/ (terraform fmt, checkov) and run the test suite (all three tiers)
# make test-unit | test-integration | test-e2e — one tier of the test suite alone (pyproject.toml's markers);
#   test-unit starts no process and takes under a minute
# Each creates .venv and installs the pinned dependencies when missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.microfed-installed
FMNIST := /usr/share/datasets/fashion-mnist
# torch/torchvision are pinned to the builds cached on the project's machines (see DESIGN.md).
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install data run test test-unit test-integration test-e2e lint typecheck infra-check compile image bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

# checkov gets a virtualenv of its own: its pinned dependencies would fight kfp's in .venv.
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV    := .venv-checkov
CHECKOV_STAMP   := $(CHECKOV_VENV)/.checkov-$(CHECKOV_VERSION)

# Fashion-MNIST: Debian's package where apt-get can install it; otherwise torchvision downloads it on first
# use; with neither, the loader's error says how to get it.
data:
	@if [ -d $(FMNIST) ] || [ -n "$$MICROFED_DATA_DIR" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's dataset-fashion-mnist into $(FMNIST)"; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	  echo "apt-get could not install dataset-fashion-mnist: torchvision will try to download it"; \
	else echo "$(FMNIST) is missing: torchvision will download Fashion-MNIST on first use"; fi

run: install data
	$(VENV)/bin/microfed run $(ARGS)

compile: install
	$(VENV)/bin/microfed compile $(if $(IMAGE),--image $(IMAGE)) -o pipeline.yaml

# The components' and workers' image (needs a Docker engine): make image IMAGE=REGION-docker.pkg.dev/P/R/microfed:TAG
# [TORCH_VARIANT=cu128] — then `docker push $(IMAGE)` and `make compile IMAGE=...`.
image:
	@test -n "$(IMAGE)" || { echo "set IMAGE=registry/path:tag"; exit 2; }
	docker build -t $(IMAGE) --build-arg TORCH_VARIANT=$(or $(TORCH_VARIANT),cpu) .

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy reads the import names through src/microfed/ (pyproject.toml's [tool.mypy]).
typecheck: install
	$(VENV)/bin/mypy

# Static checks of infra/ (the providers cannot be downloaded here, so no terraform validate): formatting, every block
# against the pinned providers' schemas (infra/schema_check.py, schemas in infra/schemas/), and checkov with a gate that fails on parse errors (which checkov reports as fewer checks, not as a failure), failed
# checks, and skips without a reason or missing from infra/README.md.
$(CHECKOV_STAMP):
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	@printf '*\n' > $(CHECKOV_VENV)/.gitignore
	$(CHECKOV_VENV)/bin/pip install -qq --upgrade pip
	$(CHECKOV_VENV)/bin/pip install -qq checkov==$(CHECKOV_VERSION)
	@touch $@

infra-check: install $(CHECKOV_STAMP)
	@command -v terraform >/dev/null 2>&1 || { \
	  echo "infra-check needs terraform >= 1.9 on PATH: https://developer.hashicorp.com/terraform/install"; exit 2; }
	terraform fmt -check -recursive -diff infra/
	$(PY) infra/schema_check.py infra
	$(CHECKOV_VENV)/bin/python infra/checkov_gate.py --checkov $(CHECKOV_VENV)/bin/checkov infra

test: install data lint typecheck infra-check
	$(PY) -m pytest -q $(PYTEST_ARGS)

# One tier, without the static checks (tests/conftest.py says what each may do).
test-unit: install
	$(PY) -m pytest -q -m unit $(PYTEST_ARGS)

test-integration: install
	$(PY) -m pytest -q -m integration $(PYTEST_ARGS)

test-e2e: install data
	$(PY) -m pytest -q -m e2e $(PYTEST_ARGS)

# Side-by-side measurements (not part of `make test`): make bench [BENCH_ARGS=--quick]
bench: install data
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf runs pipeline.yaml .pytest_cache .mypy_cache .ruff_cache
