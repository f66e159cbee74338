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


def post_worker_init(worker):
    """Freeze the loaded app's objects (gc.freeze) so that full collections stop walking them.

    Measured with bench/scorer.py: a full collection over the worker's 260,000 objects (imports,
    MLflow, catalogue, model) took 90 to 600 ms, and requests caught behind one went over their time
    budget. serving/model.py freezes again each time a new model is served.
    """
    import gc

    gc.collect()
    gc.freeze()
    worker.log.info("gc.freeze: %d objects left out of garbage collection", gc.get_freeze_count())


def child_exit(_server, worker):
    """Drop a dead worker's live gauges (its counters stay in the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
