"""A bench-only Flask app that does the Redis reads of a scoring request and nothing else.

    gunicorn -c conf/gunicorn.conf.py bench.fetch_only:app      # started by bench/scorer.py

``GET /v1/users/<user_id>/fetch`` runs ``OnlineStore.user_state`` (user vector, consumed items and
the top ``serving.candidates * 5`` popular items in one pipeline), then ``OnlineStore.items`` for
the same candidates the scorer generated for that user. The reads go through the same worker item cache with
the same settings. It returns a small JSON object with the counts. The scorer's throughput divided
by this app's is the share of a request's cost that the scoring work takes on top of the reads.
Both are Flask apps on the same gunicorn settings, so the framework's cost is on both sides.

The candidate lists come from the JSON file named by ``STREAMREC_BENCH_CANDIDATES``:
``{"feature_set_version": "...", "candidates": {"<user id>": ["<item id>", ...]}}``. bench/scorer.py
writes it from the scorer's own candidate generation. Config comes from ``conf/`` and
``STREAMREC__*`` variables, as for the scorer.
"""

from __future__ import annotations

import json
import os

from flask import Flask, jsonify

from reccore.config import load_config
from serving.app import POPULARITY_WINDOW
from serving.store import OnlineStore

CANDIDATES_ENV = "STREAMREC_BENCH_CANDIDATES"


def create_fetch_only_app(config, candidates_path: str) -> Flask:
    """Return the fetch-only app over the candidate lists in ``candidates_path``."""
    with open(candidates_path, encoding="utf-8") as handle:
        document = json.load(handle)
    version = document["feature_set_version"]
    candidates = document["candidates"]
    popular_count = config.serving.candidates * 5
    store = OnlineStore(config.redis, config.serving)
    app = Flask("streamrec-fetch-only")

    @app.get("/readyz")
    def readyz():
        ready = store.ping()
        return jsonify({"ready": ready, "users": len(candidates)}), 200 if ready else 503

    @app.get("/v1/users/<user_id>/fetch")
    def fetch(user_id: str):
        if user_id not in candidates:
            return jsonify({"error": f"user {user_id!r} is not in {candidates_path}"}), 404
        user_packed, consumed, popular = store.user_state(version, user_id, POPULARITY_WINDOW, popular_count)
        item_packed = store.items(version, candidates[user_id])
        return jsonify({"user_id": user_id, "user_found": user_packed is not None, "consumed": len(consumed),
                        "popular": len(popular), "items": len(item_packed),
                        "found": sum(packed is not None for packed in item_packed)})

    return app


if not os.environ.get(CANDIDATES_ENV):
    raise RuntimeError(f"{CANDIDATES_ENV} is not set; it names the candidate lists that bench/scorer.py writes")
app = create_fetch_only_app(load_config(os.environ.get("STREAMREC_ENV") or None), os.environ[CANDIDATES_ENV])
