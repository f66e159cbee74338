"""The WSGI entry point for gunicorn: ``gunicorn -c conf/gunicorn.conf.py serving.wsgi:app``.

Each worker imports this module after the fork (the config does not preload the app), so the Redis
pool and the model-polling thread belong to one worker each.
"""

from __future__ import annotations

import logging
import os

from reccore.config import load_config
from serving.app import create_app

logging.basicConfig(level=os.environ.get("STREAMREC_LOG_LEVEL", "INFO"),
                    format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
app = create_app(load_config(os.environ.get("STREAMREC_ENV") or None))
