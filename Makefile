# Fresh-machine entry points: `make test` (tests) and, with the secure runtime, `make demo`.
# Outside this machine, point pip at PyTorch's CPU wheels without editing this file:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make install
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
RAY_STAMP = $(VENV)/.installed-ray
PYTEST_ARGS ?=
# Ray, the optional extra of `deepreduce optimize --executor ray` (docs/RAY.md): `make install-ray` adds it.
# `make test` installs it too, so that CI (.ci/run) runs the Ray tests; `make test WITH_RAY=0` leaves it out
# (the base install; where Ray is not installed the Ray tests are skipped, with the reason).
WITH_RAY ?= 1
TEST_INSTALL = $(if $(filter 1,$(WITH_RAY)),install-ray,install)

.PHONY: install install-ray test test-fast clean-venv

install: $(STAMP)

install-ray: $(RAY_STAMP)

# Re-runs only when the dependency list changes; every step is idempotent.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps crypten==0.4.1
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

$(RAY_STAMP): $(STAMP)
	$(PIP) install -q -e '.[dev,ray]'
	touch $(RAY_STAMP)

test: $(TEST_INSTALL)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(TEST_INSTALL)
	$(PY) -m pytest -m "not slow and not faults and not fuzz" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# `make demo`: secure inference end to end on the shipped plan and images (scripts/demo.py), checked
# against plaintext. Override the inputs, or add flags, e.g. DEMO_ARGS="--batch-size 1".
DEMO_PLAN   ?= demo/model.plan
DEMO_IMAGES ?= demo/images
DEMO_ARGS   ?=

.PHONY: demo
demo: install
	$(PY) scripts/demo.py --plan $(DEMO_PLAN) --images $(DEMO_IMAGES) $(DEMO_ARGS)

# -- Docker (docker/): one image for pi-dealer, pi-server and pi-client, built with no registry access ----
# `make docker-demo` builds what is missing (wheelhouse, base image, image), runs docker/docker-compose.yml
# (dealer, server, client on a compose network), prints the client's summary line and tears everything
# down. BASE_IMAGE: python:3.11-slim where it is already present locally (`docker pull` it where Docker
# Hub is reachable), else the bookworm image of `make docker-base`. DOCKER_BUILD_ARGS: e.g.
# "--build-arg PLAN=demo/model.plan" bakes the plan in.
DOCKER            ?= docker
COMPOSE           ?= $(shell $(DOCKER) compose version >/dev/null 2>&1 && echo "$(DOCKER) compose" || echo docker-compose)
DOCKER_IMAGE      ?= deepreduce-pi:latest
DOCKER_BASE_LOCAL ?= deepreduce-pi-base:bookworm
DEBIAN_MIRROR     ?= http://deb.debian.org/debian
BASE_IMAGE        ?= $(shell $(DOCKER) image inspect python:3.11-slim >/dev/null 2>&1 && echo python:3.11-slim || echo $(DOCKER_BASE_LOCAL))
WHEELHOUSE        ?= wheelhouse
DOCKER_BUILD_ARGS ?=
COMPOSE_PROJECT   ?= deepreduce-pi-demo

.PHONY: docker-base docker-wheelhouse docker-image docker-demo docker-clean

# A local Debian bookworm base image from Debian packages (debootstrap + docker import); skipped if present.
docker-base:
	@$(DOCKER) image inspect $(DOCKER_BASE_LOCAL) >/dev/null 2>&1 \
	  && echo "$(DOCKER_BASE_LOCAL) exists (docker rmi it to rebuild)" \
	  || DOCKER="$(DOCKER)" sh docker/make-base.sh $(DOCKER_BASE_LOCAL) $(DEBIAN_MIRROR)

# Every wheel the image installs (docker/requirements.txt, crypten without its dependencies, the build
# tools for the project itself), downloaded on the host by its Python 3.11 (cp311 wheels, as in the
# image); pip skips files already there. Where the default index serves torch's CUDA build, add
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu as for `make install`.
docker-wheelhouse:
	$(PYTHON) -m pip download -q --only-binary=:all: -d $(WHEELHOUSE) -r docker/requirements.txt
	$(PYTHON) -m pip download -q --only-binary=:all: --no-deps -d $(WHEELHOUSE) crypten==0.4.1
	$(PYTHON) -m pip download -q --only-binary=:all: -d $(WHEELHOUSE) 'setuptools>=77' wheel
	@echo "$(WHEELHOUSE)/: $$(ls $(WHEELHOUSE) | wc -l) wheels, $$(du -sh $(WHEELHOUSE) | cut -f1)"

# The stamp lives outside the wheelhouse: a new file there would invalidate the image's wheel layer.
build/docker-wheelhouse.stamp: docker/requirements.txt
	$(MAKE) --no-print-directory docker-wheelhouse
	mkdir -p build && touch $@

# The image, from the working tree (code changes are picked up; the wheel layer stays cached).
docker-image: build/docker-wheelhouse.stamp
	@$(DOCKER) info >/dev/null 2>&1 || { echo "error: no Docker daemon is reachable: start dockerd (apt-get install docker.io)" >&2; exit 2; }
	@if [ "$(BASE_IMAGE)" = "$(DOCKER_BASE_LOCAL)" ]; then $(MAKE) --no-print-directory docker-base; fi
	DOCKER_BUILDKIT=0 $(DOCKER) build -q -f docker/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  $(DOCKER_BUILD_ARGS) -t $(DOCKER_IMAGE) .
	@$(DOCKER) image inspect --format '$(DOCKER_IMAGE): {{.Size}} bytes' $(DOCKER_IMAGE)

docker-demo: docker-image
	@token=$${DEEPREDUCE_TOKEN:-$$($(PYTHON) -c 'import secrets; print(secrets.token_hex(16))')}; \
	log=$$(mktemp /tmp/pi-docker-demo.XXXXXX); start=$$(date +%s); \
	PI_IMAGE=$(DOCKER_IMAGE) DEEPREDUCE_TOKEN=$$token $(COMPOSE) -f docker/docker-compose.yml -p $(COMPOSE_PROJECT) \
	  up --no-build --exit-code-from client >$$log 2>&1; rc=$$?; \
	$(COMPOSE) -f docker/docker-compose.yml -p $(COMPOSE_PROJECT) logs --no-color client 2>/dev/null \
	  | sed -n 's/^[^|]*| //p' | grep -v '^$$'; \
	PI_IMAGE=$(DOCKER_IMAGE) $(COMPOSE) -f docker/docker-compose.yml -p $(COMPOSE_PROJECT) down --volumes --remove-orphans >/dev/null 2>&1; \
	echo "docker demo: $$(( $$(date +%s) - start )) s wall (compose up to down), exit code $$rc"; \
	if [ $$rc -ne 0 ]; then tail -20 $$log >&2; fi; rm -f $$log; exit $$rc

# Stops and removes the demo's containers and network if a run was interrupted.
docker-clean:
	-$(COMPOSE) -f docker/docker-compose.yml -p $(COMPOSE_PROJECT) down --volumes --remove-orphans

# -- Three hosts in network namespaces (root): latency per image unlimited, at 1 Gbit/s and 100 Mbit/s ------
NETNS_ARGS ?= --plan demo/model.plan
.PHONY: netns-demo
netns-demo: install
	$(PY) -m secure.tools.netns $(NETNS_ARGS)
