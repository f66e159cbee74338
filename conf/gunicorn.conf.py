"""Gunicorn settings for the scorer, from the project config (serving.host, port, workers, threads)."""

import os
import shutil
import tempfile

from reccore.config import load_config

_serving = load_config(os.environ.get("STREAMREC_ENV") or None).serving

bind = f"{_serving.host}:{_serving.port}"
workers = _serving.workers
threads = _serving.threads
worker_class = "gthread"
# The app is imported in each worker after the fork: Redis pools and threads are never shared.
preload_app = False
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = None

# Prometheus multiprocess mode: workers write their metrics to files in this folder and /metrics
# adds them up. The variable must be set before a worker imports prometheus_client.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="streamrec-scorer-metrics-")


def on_starting(_server):
    """Start each server with an empty metrics folder: files of an earlier run would be added in."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)


def child_exit(_server, worker):
    """Drop a dead worker's live gauges (its counters stay in the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
