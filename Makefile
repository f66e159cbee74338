# Two commands on a fresh machine; each sets up what it needs on first use.
#   make demo   the whole loop on the bundled MovieLens data: stack, streams, features, training,
#               scorer, live replay, freshness and online accuracy (DEMO_ARGS=--keep-running keeps it up)
#   make test   the whole test suite against a local stack (Kafka, Redis, MLflow on loopback)
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON := .venv/bin/python

.PHONY: help demo test unit stack-up stack-status stack-down bench-ingest bench-scorer

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

demo: ## the whole loop on MovieLens, events in to recommendations out (first use sets up everything)
	scripts/demo $(DEMO_ARGS)

test: ## run the whole test suite; starts the local stack if it is not running
	scripts/test

unit: ## unit tests only (no services, no Spark)
	scripts/bootstrap && $(PYTHON) -m pytest -m "not integration and not spark" tests/unit

stack-up: ## start Kafka, Redis and MLflow on loopback and create the topics
	scripts/bootstrap && $(PYTHON) -m devstack up

stack-status: ## show what runs where (python -m devstack status exits 1 when a service is down)
	@$(PYTHON) -m devstack status || true

stack-down: ## stop what stack-up started
	$(PYTHON) -m devstack down

bench-ingest: ## ingest throughput benchmark (about 5 minutes)
	scripts/bootstrap && $(PYTHON) -m devstack up --only kafka && $(PYTHON) bench/ingest_throughput.py

bench-scorer: ## scorer latency and throughput under gunicorn (about 8 minutes)
	scripts/bootstrap && $(PYTHON) -m devstack up && $(PYTHON) bench/scorer.py
