# The two commands: `make run` and `make test`. Both create .venv when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto')
GENERATED := modelserver/v1/modelserver_pb2.py

.PHONY: run test generate lint bench bench-reliability bench-overload bench-protocols bench-lifecycle perf-analyzer clean

# Reinstall when the dependency pins change or the venv's interpreter no longer runs.
$(STAMP): pyproject.toml requirements.lock
	@$(PY) -c 'import sys' 2>/dev/null || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $@

$(GENERATED): $(PROTOS) proto/generate.py | $(STAMP)
	$(PY) proto/generate.py

generate: $(STAMP)
	$(PY) proto/generate.py

run: $(STAMP) $(GENERATED)
	$(PY) -m server $(ARGS)

test: $(STAMP) $(GENERATED) deploy-tools
	-@$(MAKE) --no-print-directory $(PERF_ANALYZER)  # best effort: without it tests/integration/test_perf_analyzer.py skips
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy  # strict on server/ ([tool.mypy] in pyproject.toml names the files)
	$(PY) -m pytest $(PYTEST_ARGS)

# Real Prometheus and nginx for the deployment tests, installed from Debian's packages when missing.
.PHONY: deploy-tools
deploy-tools:
	@.ci/install-debian-tools

# One layer of the suite (README, Development): `make test-unit` (no server process; about a minute on 2 cores),
# `make test-integration` (real servers), `make test-deploy` (the image, compose, nginx, Prometheus, deploy files).
# `make test` runs all three, after the checks.
.PHONY: test-unit test-integration test-deploy
test-unit test-integration: $(STAMP) $(GENERATED)
	$(PY) -m pytest -m $(@:test-%=%) $(PYTEST_ARGS)
test-deploy: $(STAMP) $(GENERATED) deploy-tools
	$(PY) -m pytest -m deploy $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Triton's perf_analyzer from the tritonclient 2.41.1 wheel, kept out of the venv (bench/perf_analyzer.py).
PERF_ANALYZER := .perf_analyzer/bin/perf_analyzer
perf-analyzer: $(PERF_ANALYZER)
$(PERF_ANALYZER): bench/perf_analyzer.py | $(STAMP)
	$(PY) -m bench.perf_analyzer

clean:
	rm -rf $(VENV) model_repository .pytest_cache .ruff_cache .mypy_cache .perf_analyzer

# The performance goals as same-run ratios (bench/run.py), then 1 against 2 workers (bench/workers.py).
bench: $(STAMP) $(GENERATED)
	$(PY) -m bench.run $(ARGS)
	$(PY) -m bench.workers

# Drain over 10 SIGTERMs and a 10-minute soak (about 12 minutes in all).
bench-reliability: $(STAMP) $(GENERATED)
	$(PY) -m bench.reliability $(ARGS)

# Open loops at 2x and 4x capacity through nginx (deploy/nginx/nginx.conf) and at the bare server (about 4 minutes).
bench-overload: $(STAMP) $(GENERATED) deploy-tools
	$(PY) -m bench.overload $(ARGS)

bench-protocols: $(STAMP) $(GENERATED)
	$(PY) -m bench.protocols $(ARGS)

# The HTTP port's protocols (OIP binary and JSON, TF Serving :predict) against our gRPC OIP, c=1/16/64 (about 4 minutes).
.PHONY: bench-rest
bench-rest: $(STAMP) $(GENERATED)
	$(PY) -m bench.rest $(ARGS)

# A version switch under 64 callers against the same load without one (about a minute).
bench-lifecycle: $(STAMP) $(GENERATED)
	$(PY) -m bench.lifecycle $(ARGS)

# The image (Dockerfile), built with podman from a wheelhouse (README, "The image"). `make image` needs podman and
# root: the stand-in base image is made from Debian's packages (deploy/podman/make-debian-image) when it is missing,
# since no container registry is reachable here; BASE_IMAGE=python:3.11-slim-bookworm uses the official one.
IMAGE ?= localhost/modelserver:local
BASE_IMAGE ?= localhost/modelserver-base:bookworm
WHEELHOUSE := deploy/docker/wheelhouse
.PHONY: image base-image nginx-image prometheus-image wheelhouse
wheelhouse: $(WHEELHOUSE)/.complete
$(WHEELHOUSE)/.complete: pyproject.toml requirements.lock deploy/docker/requirements-image.lock | $(STAMP)
	$(PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
		> $(WHEELHOUSE)/requirements.txt
	$(PY) -m pip download --quiet --only-binary=:all: --dest $(WHEELHOUSE) \
		-r $(WHEELHOUSE)/requirements.txt -r deploy/docker/requirements-image.lock -c requirements.lock
	@touch $@

base-image:
	@case "$(BASE_IMAGE)" in localhost/*) deploy/podman/make-debian-image python $(BASE_IMAGE);; esac

# Debian's nginx as an image, for the compose stack under podman (tests/deploy/test_compose.py).
NGINX_IMAGE ?= localhost/modelserver-nginx:bookworm
nginx-image: deploy-tools
	deploy/podman/make-debian-image nginx $(NGINX_IMAGE)

# Debian's Prometheus as an image, for the compose stack's prometheus service under podman.
PROMETHEUS_IMAGE ?= localhost/modelserver-prometheus:bookworm
prometheus-image: deploy-tools
	deploy/podman/make-debian-image prometheus $(PROMETHEUS_IMAGE)

image: wheelhouse base-image deploy-tools
	podman build --format docker --network none --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(IMAGE) .
