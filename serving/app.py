"""The scorer's Flask app: thin views over ``serving.scoring``, with a flagged fallback where a request cannot be scored.

    create_app(config)            # gunicorn: serving.wsgi:app (see conf/gunicorn.conf.py)

Endpoints: ``GET /v1/users/<user_id>/recommendations?k=10``, ``POST /v1/rank``, ``/healthz``,
``/readyz``, ``/metrics`` and ``/openapi.json``. Every response states whether it is a fallback and
why: ``unknown_user`` (no features for the user: popularity), ``redis_unavailable`` (Redis down or
slower than ``serving.redis_timeout_ms``: the popularity snapshot logged with the model),
``over_budget`` (features not fetched within ``serving.request_budget_ms``: the same snapshot),
``no_model`` (no model loaded yet: Redis popularity when it answers). Bad input gets a 4xx with a
JSON body naming the problem; no input reaches a 500. What was served goes to the served log
(``serving.served_log``), which never makes a request wait.
"""

from __future__ import annotations

import atexit
import hmac
import logging
import os
import time
import uuid
from typing import Optional

import redis
from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from werkzeug.exceptions import HTTPException

from reccore.config import Config
from reccore.features import load_feature_set
from serving.compiled import PredictorCompiler
from serving.model import ModelHolder, ServedModel
from serving.openapi import openapi_document
from serving.served_log import ServedLog, served_record
from serving.scoring import BadRequest, check_candidates, check_id, check_k, is_stale, rank
from serving.store import OnlineStore

log = logging.getLogger("serving.app")

POPULARITY_WINDOW = "7d"
CLOCKS = ("wall", "event_time")
AFFINITY_CATEGORIES = 2
COOCCURRENCE_SOURCES = 50


class Metrics:
    """The scorer's Prometheus metrics.

    Under gunicorn (``PROMETHEUS_MULTIPROC_DIR`` set by conf/gunicorn.conf.py) every worker writes
    its values to files in that folder and ``/metrics`` adds them up across workers. A count is
    the whole server's, whichever worker serves the scrape. Without it (one process, tests) the
    metrics live in a registry of the app's own.
    """

    def __init__(self):
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = None if self.multiprocess else CollectorRegistry()
        registry = self.registry
        self.requests = Counter("streamrec_scorer_requests_total", "Requests by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.latency = Histogram("streamrec_scorer_request_duration_seconds", "Request latency by endpoint",
                                 ["endpoint"], registry=registry,
                                 buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.fallbacks = Counter("streamrec_scorer_fallbacks_total", "Fallback responses by reason", ["reason"],
                                 registry=registry)
        self.model_version = Gauge("streamrec_scorer_model_version", "Model version served (the value is 1)",
                                   ["model", "version"], registry=registry, multiprocess_mode="liveall")
        self.feature_age = Histogram("streamrec_scorer_feature_age_seconds",
                                     "Age of the user's features when scored (wall clock minus newest event)",
                                     registry=registry,
                                     buckets=(1, 10, 60, 600, 3600, 86400, 7 * 86400, 30 * 86400, 365 * 86400))
        # Which predictor scored each request: "native" (booster) until a worker's compiled one is ready.
        self.predictions = Counter("streamrec_scorer_predictions_total", "Requests scored by the model, by predictor",
                                   ["predictor"], registry=registry)
        self.predictor_compile = Histogram(
            "streamrec_scorer_predictor_compile_seconds",
            "Time for a worker to get a model version's compiled predictor, by outcome (compiled, cache, failed)",
            ["outcome"], registry=registry, buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600))
        self.served_log_sent = Counter("streamrec_scorer_served_log_sent_total",
                                       "Served records Kafka acknowledged", registry=registry)
        self.served_log_dropped = Counter("streamrec_scorer_served_log_dropped_total",
                                          "Served records dropped (buffer full, Kafka error) by reason", ["reason"],
                                          registry=registry)

    def exposition(self) -> bytes:
        """Return the text format of every metric (summed over workers in multiprocess mode)."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


def create_app(config: Config, holder: Optional[ModelHolder] = None, store: Optional[OnlineStore] = None,
               start_polling: bool = True) -> Flask:
    """Return the scorer app; ``holder`` and ``store`` default to ones built from ``config``.

    Call it in each worker process (after the fork): it owns a Redis pool, a polling thread and,
    with ``serving.served_log``, a Kafka producer.
    """
    settings = config.serving
    if settings.clock not in CLOCKS:
        raise ValueError(f"serving.clock {settings.clock!r} is invalid; use one of {CLOCKS}")
    app = Flask("streamrec-scorer")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    holder = holder or ModelHolder(config.mlflow.tracking_uri, config.training.model_name, settings.model_alias,
                                   settings.model_poll_seconds, PredictorCompiler.from_settings(settings))
    store = store or OnlineStore(config.redis, settings)
    metrics = Metrics()
    if holder.compile_listener is None:  # a holder shared by several apps reports to the first one
        holder.compile_listener = lambda outcome, seconds: metrics.predictor_compile.labels(outcome).observe(seconds)
    served_log = (ServedLog(config.kafka, settings.served_log_buffer, metrics.served_log_sent,
                            metrics.served_log_dropped) if settings.served_log else None)
    if served_log is not None:
        atexit.register(served_log.flush)
    app.extensions["streamrec"] = {"holder": holder, "store": store, "metrics": metrics, "served_log": served_log}
    if start_polling:
        holder.start()
    try:
        log.info("catalogue: %d items", store.load_catalogue())
    except redis.RedisError as error:
        log.warning("catalogue not loaded (Redis at %s:%d: %s); retried by requests, at most once a second",
                    config.redis.host, config.redis.port, error)
    # Without a model, the fallback reads popularity under the configured feature-set version.
    default_version = load_feature_set().version
    api_keys = [key.strip() for key in os.environ.get(settings.api_keys_env, "").split(",") if key.strip()]

    def error_body(status: int, code: str, message: str, field: Optional[str] = None):
        body = {"error": {"code": code, "message": message}}
        if field:
            body["error"]["field"] = field
        return jsonify(body), status

    @app.before_request
    def check_key():
        request.environ["streamrec.started"] = time.perf_counter()
        if api_keys and request.path.startswith("/v1/"):
            given = request.headers.get("X-API-Key", "")
            if not any(hmac.compare_digest(given.encode(), key.encode()) for key in api_keys):
                return error_body(401, "unauthorized", "missing or unknown API key; send it in the X-API-Key header")
        return None

    @app.after_request
    def count(response):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        started = request.environ.get("streamrec.started")
        if started is not None:
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.errorhandler(BadRequest)
    def bad_request(error: BadRequest):
        return error_body(400, "invalid_request", str(error), error.field)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        message = {413: f"request body is larger than {settings.max_body_bytes} bytes",
                   404: f"no route {request.method} {request.path}; see /openapi.json"}.get(error.code, error.description)
        response, status = error_body(error.code or 500, codes.get(error.code, "http_error"), message)
        # Keep the headers werkzeug gives the error, such as the Allow header that RFC 9110 requires on a 405.
        response.headers.extend([(name, value) for name, value in error.get_headers() if name.lower() != "content-type"])
        return response, status

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("request %s %s failed", request.method, request.path)
        return error_body(500, "internal_error", f"the scorer failed on this request ({type(error).__name__}); "
                                                 "it is logged with its stack trace")

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        model = holder.current
        reasons = []
        if model is None:
            reasons.append(holder.error or f"model {holder.name!r} alias {holder.alias!r} is not loaded yet")
        redis_ok = store.ping()
        if not redis_ok:
            reasons.append(f"Redis at {config.redis.host}:{config.redis.port} is not reachable")
        body = {"ready": not reasons, "redis": redis_ok,
                "model": {"name": holder.name, "alias": holder.alias, "version": model.version if model else None,
                          "tracking_uri": holder.tracking_uri},
                "reasons": reasons}
        return jsonify(body), 200 if not reasons else 503

    @app.get("/metrics")
    def prometheus():
        model = holder.current
        if model is not None:
            metrics.model_version.clear()
            metrics.model_version.labels(model.name, model.version).set(1)
        return Response(metrics.exposition(), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json")
    def openapi():
        return jsonify(openapi_document(settings, api_keys_required=bool(api_keys)))

    @app.get("/v1/users/<user_id>/recommendations")
    def recommendations(user_id: str):
        check_id("user_id", user_id)
        k = check_k(request.args.get("k", "10"), settings.max_k)
        return jsonify(publish(respond(user_id, k, None), k))

    @app.post("/v1/rank")
    def rank_candidates():
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise BadRequest("body", "the body must be a JSON object with user_id and candidates")
        unknown = sorted(set(body) - {"user_id", "candidates", "k"})
        if unknown:
            raise BadRequest(unknown[0], f"unknown fields {unknown}; allowed: user_id, candidates, k")
        user_id = check_id("user_id", body.get("user_id"))
        candidates = check_candidates(body.get("candidates"), settings.max_candidates)
        k = check_k(body.get("k", len(candidates) if len(candidates) <= settings.max_k else settings.max_k),
                    settings.max_k)
        return jsonify(publish(respond(user_id, k, candidates), k))

    def publish(body: dict, k: int) -> dict:
        """Hand what was served to the served log (never waits) and return the body."""
        if served_log is not None:
            served_log.publish(served_record(body, holder.name, k, int(time.time() * 1000), store.clock_ms))
        return body

    def over_budget() -> bool:
        started = request.environ.get("streamrec.started")
        return started is not None and (time.perf_counter() - started) * 1000 > settings.request_budget_ms

    def respond(user_id: str, k: int, requested: Optional[list]) -> dict:
        model = holder.current
        request_id = uuid.uuid4().hex
        base = {"request_id": request_id, "user_id": user_id, "model_version": model.version if model else None,
                "feature_set_version": model.feature_set_version if model else None}
        if model is None:
            return fallback(base, user_id, k, requested, "no_model", None)
        try:
            store.ensure_catalogue()
            user_packed, consumed, popular = store.user_state(
                model.feature_set_version, user_id, None if requested else POPULARITY_WINDOW,
                settings.candidates * 5)
            if user_packed is None:
                return fallback(base, user_id, k, requested, "unknown_user", model, consumed)
            candidates = requested or generate_candidates(model, user_packed, consumed, popular)
            item_packed = store.items(model.feature_set_version, candidates) if not over_budget() else None
            layout = store.layout(model.feature_set_version)
        except (redis.RedisError, LookupError) as error:
            log.warning("request %s: Redis unavailable (%s); popularity snapshot served", request_id, error)
            return fallback(base, user_id, k, requested, "redis_unavailable", model)
        if item_packed is None or over_budget():
            # Each Redis reply arrives within redis_timeout_ms, but together they may exceed the budget.
            return fallback(base, user_id, k, requested, "over_budget", model, consumed)
        codes = {category: code for code, category in enumerate(layout.categories)}
        genres = [[codes[genre] for genre in store.genres.get(item, ()) if genre in codes] for item in candidates]
        now_ms = int(time.time() * 1000)
        if settings.clock == "event_time" and store.clock_ms is not None:
            now_ms = store.clock_ms
        ranking = rank(model.predictor, layout, candidates, user_packed, item_packed, genres, now_ms, k,
                       exclude=frozenset() if requested else consumed)
        metrics.predictions.labels(model.predictor.kind).inc()
        if ranking.feature_age_s is not None:
            metrics.feature_age.observe(ranking.feature_age_s)
        return {**base, "items": [{"item_id": item.item_id, "score": item.score, "title": store.titles.get(item.item_id)}
                                  for item in ranking.items],
                "fallback": False, "fallback_reason": None, "feature_age_seconds": ranking.feature_age_s,
                "stale": is_stale(ranking.feature_age_s, settings.max_feature_age_seconds)}

    def generate_candidates(model: ServedModel, user_packed: bytes, consumed: frozenset, popular: list) -> list[str]:
        """Co-occurrence of the user's items, then popular items of the user's top categories, then popularity."""
        from reccore.store import unpack

        layout = store.layout(model.feature_set_version)
        chosen: dict = {}
        for item in sorted(consumed)[:COOCCURRENCE_SOURCES]:
            for neighbour in model.cooccurrence.get(item, ()):
                if neighbour not in consumed:
                    chosen.setdefault(neighbour, None)
        popular = popular or list(model.popularity)
        _stamp, values = unpack(user_packed, len(layout.names("user")))
        shares = layout.category_share_names()
        names = layout.names("user")
        by_share = sorted((value, category) for category, name in shares.items()
                          if (value := values[names.index(name)]) == value and value > 0)
        favourite = {category for _value, category in by_share[-AFFINITY_CATEGORIES:]}
        for item in popular:
            if favourite & set(store.genres.get(item, ())) and item not in consumed:
                chosen.setdefault(item, None)
        for item in popular:
            if item not in consumed:
                chosen.setdefault(item, None)
        return list(chosen)[:settings.candidates]

    def fallback(base: dict, user_id: str, k: int, requested: Optional[list], reason: str,
                 model: Optional[ServedModel], consumed: frozenset = frozenset()) -> dict:
        metrics.fallbacks.labels(reason).inc()
        popular: list = []
        if reason not in ("redis_unavailable", "over_budget"):
            version = model.feature_set_version if model is not None else default_version
            try:
                popular = store.popularity(version, POPULARITY_WINDOW, k + len(consumed) + 100)
            except redis.RedisError:
                popular = []
        if not popular and model is not None:
            popular = list(model.popularity)
        if requested:
            position = {item: index for index, item in enumerate(popular)}
            ordered = sorted(requested, key=lambda item: (position.get(item, len(position)), item))
        else:
            ordered = [item for item in popular if item not in consumed]
        return {**base, "items": [{"item_id": item, "score": None, "title": store.titles.get(item)}
                                  for item in ordered[:k]],
                "fallback": True, "fallback_reason": reason, "feature_age_seconds": None, "stale": True}

    return app
