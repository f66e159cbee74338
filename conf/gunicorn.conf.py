"""Gunicorn settings for the scorer, from the project config (serving.host, port, workers, threads)."""

import os

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
