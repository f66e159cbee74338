"""The scorer against real Redis, a real registered model and the real tracking server (MovieLens)."""

from __future__ import annotations

import csv
import dataclasses
import json
import time

import numpy as np
import pytest
import redis

from jobs.items import DEFAULT_MOVIES
from jobs.replay import DEFAULT_RATINGS
from reccore.features import load_feature_set
from reccore.ranking import ManifestLayout, category_matrix, model_feature_names, model_rows, reorder_columns
from reccore.store import KeyLayout, unpack
from serving.app import create_app
from tests.conftest import with_overrides
from tests.integration.test_features_stream import PrivateRedis

pytestmark = [pytest.mark.integration, pytest.mark.spark]


@pytest.fixture(scope="module")
def served(movielens_champion):
    return movielens_champion


@pytest.fixture(scope="module")
def client(served):
    app = create_app(served)
    assert app.extensions["streamrec"]["holder"].current is not None
    yield app.test_client()
    app.extensions["streamrec"]["holder"].stop()


@pytest.fixture(scope="module")
def movielens():
    rated, titles = {}, {}
    with open(DEFAULT_RATINGS, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            rated.setdefault(row["userId"], set()).add(row["movieId"])
    with open(DEFAULT_MOVIES, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            titles[row["movieId"]] = row["title"]
    return rated, titles


def test_known_user_ranked_by_booster(client, served, movielens):
    rated, titles = movielens
    response = client.get("/v1/users/414/recommendations?k=10")
    assert response.status_code == 200, response.json
    body = response.json
    assert body["fallback"] is False
    assert body["fallback_reason"] is None
    items = body["items"]
    assert len(items) == 10
    assert not {item["item_id"] for item in items} & rated["414"]
    for item in items:
        assert item["title"] == titles[item["item_id"]]

    # The same scores recomputed from the Redis vectors with the registered booster.
    import mlflow.lightgbm

    booster = mlflow.lightgbm.load_model(f"models:/{served.training.model_name}/{body['model_version']}")
    feature_set = load_feature_set()
    layout_keys = KeyLayout(served.redis.key_prefix, feature_set.version)
    connection = redis.Redis(host=served.redis.host, port=served.redis.port)
    _user_stamp, user = unpack(connection.get(layout_keys.vector("user", "414")), len(feature_set.names("user")))
    user_newest = _user_stamp.newest_event_ms
    ids = [item["item_id"] for item in items]
    vectors = [unpack(connection.get(layout_keys.vector("item", item_id)), len(feature_set.names("item"))) for item_id in ids]
    genres = [connection.hget(f"{served.redis.key_prefix}:catalog:item:{item_id}", "genres").decode().split("|")
              for item_id in ids]
    codes = [[feature_set.categories.index(genre) for genre in item_genres if genre in feature_set.categories]
             for item_genres in genres]
    layout = ManifestLayout(feature_set.manifest())
    now_ms = time.time() * 1000
    rows = model_rows(layout, np.tile(np.array(user, dtype=np.float32), (len(ids), 1)), np.full(len(ids), user_newest),
                      np.array([values for _stamp, values in vectors], dtype=np.float32),
                      np.array([stamp.newest_event_ms for stamp, _values in vectors], dtype=float),
                      category_matrix(codes, len(feature_set.categories)), np.full(len(ids), now_ms))
    expected = booster.predict(reorder_columns(rows, model_feature_names(layout), booster.feature_name()))
    scores = [item["score"] for item in items]
    # Recency moves by the milliseconds between the two computations: the scores agree closely.
    assert scores == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-6)
    assert scores == sorted(scores, reverse=True)
    assert body["feature_age_seconds"] > 0
    connection.close()


def test_unknown_user_gets_popularity(client, served):
    response = client.get("/v1/users/999999999/recommendations?k=5")
    assert response.status_code == 200
    body = response.json
    assert body["fallback"] is True
    assert body["fallback_reason"] == "unknown_user"
    connection = redis.Redis(host=served.redis.host, port=served.redis.port)
    top = connection.zrevrange(KeyLayout(served.redis.key_prefix, load_feature_set().version).popularity("7d"), 0, 4)
    assert [item["item_id"] for item in body["items"]] == [member.decode() for member in top]
    assert all(item["score"] is None for item in body["items"])
    connection.close()


@pytest.mark.parametrize("method, path, payload, field", [
    ("get", "/v1/users/abc!/recommendations", None, "user_id"),
    ("get", "/v1/users/414/recommendations?k=0", None, "k"),
    ("post", "/v1/rank", {"user_id": "", "candidates": ["1"]}, "user_id"),
    ("post", "/v1/rank", {"user_id": "414", "candidates": []}, "candidates"),
    ("post", "/v1/rank", {"user_id": "414", "candidates": ["1"], "extra": 1}, "extra"),
])
def test_bad_input_is_400(client, method, path, payload, field):
    response = getattr(client, method)(path, json=payload) if payload is not None else getattr(client, method)(path)
    assert response.status_code == 400
    assert response.json["error"]["field"] == field
    assert response.json["error"]["message"]


def test_malformed_and_oversized_bodies(client, served):
    response = client.post("/v1/rank", data="{not json", content_type="application/json")
    assert response.status_code == 400
    big = {"user_id": "414", "candidates": ["1"] * 5, "k": 1, "pad": "x" * served.serving.max_body_bytes}
    assert client.post("/v1/rank", json=big).status_code == 413
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/nothing").json["error"]["code"] == "not_found"


def test_rank_given_candidates(client, movielens):
    response = client.post("/v1/rank", json={"user_id": "414", "candidates": ["1", "2", "3", "999999"], "k": 4})
    assert response.status_code == 200
    body = response.json
    assert body["fallback"] is False
    assert {item["item_id"] for item in body["items"]} == {"1", "2", "3", "999999"}
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)


def copy_keys(source: redis.Redis, target: redis.Redis, pattern: str) -> int:
    keys = list(source.scan_iter(pattern, count=5000))
    for start in range(0, len(keys), 2000):
        chunk = keys[start:start + 2000]
        pipeline = source.pipeline(transaction=False)
        for key in chunk:
            pipeline.dump(key)
        dumps = pipeline.execute()
        writer = target.pipeline(transaction=False)
        for key, dumped in zip(chunk, dumps):
            if dumped is not None:
                writer.restore(key, 0, dumped, replace=True)
        writer.execute()
    return len(keys)


def test_redis_down_then_back(served, tmp_path):
    private = PrivateRedis(tmp_path / "redis")
    private.start()
    try:
        stack = redis.Redis(host=served.redis.host, port=served.redis.port)
        target = redis.Redis(host="127.0.0.1", port=private.port)
        assert copy_keys(stack, target, f"{served.redis.key_prefix}:*") > 10_000
        target.save()
        config = dataclasses.replace(served, redis=dataclasses.replace(served.redis, host="127.0.0.1", port=private.port),
                                     serving=dataclasses.replace(served.serving, redis_timeout_ms=500.0))
        app = create_app(config)
        client = app.test_client()
        assert client.get("/v1/users/414/recommendations?k=5").json["fallback"] is False

        private.stop()
        down = client.get("/v1/users/414/recommendations?k=5")
        assert down.status_code == 200
        assert down.json["fallback_reason"] == "redis_unavailable"
        assert len(down.json["items"]) == 5
        assert client.get("/readyz").status_code == 503

        # A scorer started while Redis is down gives the same responses.
        cold_app = create_app(config)
        cold = cold_app.test_client()
        assert cold.get("/v1/users/414/recommendations?k=5").json["fallback_reason"] == "redis_unavailable"
        assert cold.get("/readyz").json["ready"] is False

        private.start()
        for scorer in (client, cold):
            for _attempt in range(10):  # the first call on a pooled connection may find it closed
                back = scorer.get("/v1/users/414/recommendations?k=5")
                if not back.json["fallback"]:
                    break
                time.sleep(0.5)
            assert back.json["fallback"] is False, back.json
            assert all(item["title"] for item in back.json["items"])
            assert scorer.get("/readyz").status_code == 200
        app.extensions["streamrec"]["holder"].stop()
        cold_app.extensions["streamrec"]["holder"].stop()
    finally:
        private.stop()


def test_metrics_and_openapi(client):
    client.get("/healthz")
    text = client.get("/metrics").data.decode()
    assert 'streamrec_scorer_requests_total{endpoint="/healthz",status="200"}' in text
    assert "streamrec_scorer_model_version{" in text
    document = client.get("/openapi.json").json
    assert set(document["paths"]) >= {"/v1/users/{user_id}/recommendations", "/v1/rank", "/healthz", "/readyz"}


def test_missing_model_is_not_ready_but_answers(served):
    config = with_overrides(served, training={"model_name": "no-such-model"})
    app = create_app(config)
    client = app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 503
    reason = " ".join(ready.json["reasons"])
    assert "'no-such-model'" in reason
    assert "'champion'" in reason
    assert config.mlflow.tracking_uri in reason
    response = client.get("/v1/users/414/recommendations?k=3")
    assert response.status_code == 200
    assert response.json["fallback_reason"] == "no_model"
    assert len(response.json["items"]) == 3
    app.extensions["streamrec"]["holder"].stop()


class Gunicorn:
    """The scorer under gunicorn on a free loopback port, configured through STREAMREC__* variables."""

    def __init__(self, config, tmp_path, workers: int = 2, poll_seconds: float = 1.0):
        import socket

        from tests.conftest import project_env

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.env = project_env({"serving.port": self.port, "serving.workers": workers,
                                "serving.model_poll_seconds": poll_seconds,
                                "training.model_name": config.training.model_name,
                                "redis.key_prefix": config.redis.key_prefix,
                                "serving.compiled_cache_dir": config.serving.compiled_cache_dir})
        self.env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
        self.log = open(tmp_path / "gunicorn.log", "w", encoding="utf-8")
        self.process = None
        self.sent = 0

    def start(self) -> None:
        import subprocess
        import sys
        from pathlib import Path

        from reccore.config import PROJECT_ROOT

        gunicorn = Path(sys.executable).with_name("gunicorn")
        self.process = subprocess.Popen([str(gunicorn), "-c", "conf/gunicorn.conf.py", "serving.wsgi:app"],
                                        cwd=PROJECT_ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"gunicorn exited; see {self.log.name}"
            try:
                if self.get("/readyz").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the scorer was not ready within 120 s; see {self.log.name}")

    def get(self, path: str):
        return self.request("GET", path)

    def request(self, method: str, path: str, body: dict | None = None, connection=None):
        import http.client
        import json as json_module

        own = connection is None
        connection = connection or http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            payload = json_module.dumps(body) if body is not None else None
            connection.request(method, path, body=payload, headers={"Content-Type": "application/json"} if body else {})
            response = connection.getresponse()
            response.data = response.read()
            self.sent += 1
            return response
        finally:
            if own:
                connection.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)
        self.log.close()


def requests_total(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("streamrec_scorer_requests_total{"))


def test_request_count_across_workers(served, tmp_path):
    server = Gunicorn(served, tmp_path, workers=2)
    server.start()
    try:
        # Counted from a first scrape on: a readiness poll that timed out on the client's side while
        # the workers loaded the model may still have been served and counted.
        before = requests_total(server.get("/metrics").data.decode())
        for number in range(40):
            assert server.get(f"/v1/users/{414 + number % 5}/recommendations?k=5").status == 200
        for _ in range(20):
            assert server.get("/healthz").status == 200
        text = server.get("/metrics").data.decode()
        # 60 requests and the first scrape (a scrape is counted after its own response is built).
        assert requests_total(text) - before == 61
        assert 'streamrec_scorer_requests_total{endpoint="/healthz",status="200"} 20.0' in text
    finally:
        server.stop()


def test_alias_moves_under_load(served, tmp_path):
    import http.client
    import threading

    import mlflow
    from mlflow.tracking import MlflowClient

    registry = MlflowClient(tracking_uri=served.mlflow.tracking_uri)
    name = served.training.model_name
    first = registry.get_model_version_by_alias(name, "champion")
    mlflow.set_tracking_uri(served.mlflow.tracking_uri)
    second = mlflow.register_model(f"runs:/{first.run_id}/model", name, tags=dict(first.tags))
    server = Gunicorn(served, tmp_path, workers=2, poll_seconds=1.0)
    server.start()
    results, stop = [], threading.Event()

    def client_loop():
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        body = {"user_id": "414", "candidates": [str(item) for item in range(1, 21)], "k": 5}
        next_at = time.monotonic()
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = server.request("POST", "/v1/rank", body, connection)
                version = json.loads(response.data)["model_version"] if response.status == 200 else None
                results.append((started, response.status, version))
            except OSError as error:
                results.append((started, repr(error), None))
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            next_at += 0.02  # 50 requests/s per client
            time.sleep(max(0.0, next_at - time.monotonic()))
        connection.close()

    clients = [threading.Thread(target=client_loop) for _ in range(4)]
    try:
        began = time.monotonic()
        for thread in clients:
            thread.start()
        time.sleep(3)
        moves = []
        for version in (second.version, first.version):
            registry.set_registered_model_alias(name, "champion", version)
            moves.append((time.monotonic(), str(version)))
            time.sleep(6)
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
        elapsed = time.monotonic() - began
    finally:
        stop.set()
        server.stop()
        registry.set_registered_model_alias(name, "champion", first.version)

    failed = [result for result in results if result[1] != 200]
    assert not failed, failed[:5]
    assert len(results) / elapsed >= 4 * 50 * 0.9, f"{len(results)} requests in {elapsed:.1f} s"
    for moved_at, version in moves:
        served_after = [started for started, _status, served_version in results
                        if started >= moved_at and served_version == version]
        assert served_after, f"version {version} was never served"
        # The poll interval (1 s) plus the time to download and load the model.
        assert served_after[0] - moved_at <= 1.0 + 3.0
    for (moved_at, version), (next_move, _next_version) in zip(moves, moves[1:] + [(float("inf"), None)]):
        settled = {served_version for started, _status, served_version in results
                   if moved_at + 4.0 <= started < next_move}
        assert settled == {version}, (version, settled)


def app_sharing(client, config, **serving):
    """A second app over the first one's model and Redis reads, with other serving settings."""
    parts = client.application.extensions["streamrec"]
    return create_app(with_overrides(config, serving=serving), holder=parts["holder"], store=parts["store"],
                      start_polling=False).test_client()


def test_api_keys(client, served, monkeypatch):
    monkeypatch.setenv(served.serving.api_keys_env, "first-key, second-key")
    keyed = app_sharing(client, served)
    path = "/v1/users/414/recommendations?k=2"
    missing = keyed.get(path)
    assert missing.status_code == 401
    assert "X-API-Key" in missing.json["error"]["message"]
    assert keyed.get(path, headers={"X-API-Key": "first-key-but-longer"}).status_code == 401
    assert keyed.post("/v1/rank", json={"user_id": "414", "candidates": ["1"]}).status_code == 401
    assert keyed.get(path, headers={"X-API-Key": "second-key"}).status_code == 200
    assert keyed.get("/healthz").status_code == 200
    monkeypatch.delenv(served.serving.api_keys_env)
    assert app_sharing(client, served).get(path).status_code == 200


def test_stale_flag_follows_max_feature_age(client, served):
    path = "/v1/users/414/recommendations?k=2"
    body = app_sharing(client, served, max_feature_age_seconds=60.0).get(path).json
    # MovieLens ends in 2018: the features are years old.
    assert body["feature_age_seconds"] > 60
    assert body["stale"] is True
    fresh = app_sharing(client, served, max_feature_age_seconds=body["feature_age_seconds"] + 86400).get(path).json
    assert fresh["fallback"] is False
    assert fresh["stale"] is False


def test_request_over_budget_gets_snapshot(client, served, movielens):
    rated, _titles = movielens
    slow = app_sharing(client, served, request_budget_ms=0.001)
    body = slow.get("/v1/users/414/recommendations?k=5").json
    assert body["fallback"] is True
    assert body["fallback_reason"] == "over_budget"
    snapshot = [item for item in client.application.extensions["streamrec"]["holder"].current.popularity
                if item not in rated["414"]]
    assert [item["item_id"] for item in body["items"]] == snapshot[:5]
    metrics = slow.get("/metrics").data.decode()
    assert 'streamrec_scorer_fallbacks_total{reason="over_budget"} 1.0' in metrics


def test_event_time_clock_as_now(client, served):
    connection = redis.Redis(host=served.redis.host, port=served.redis.port)
    layout = KeyLayout(served.redis.key_prefix, load_feature_set().version)
    clock = int(connection.get(layout.popularity_as_of()))
    newest = unpack(connection.get(layout.vector("user", "414")), len(load_feature_set().names("user")))[0].newest_event_ms
    connection.close()
    body = app_sharing(client, served, clock="event_time").get("/v1/users/414/recommendations?k=3").json
    assert body["fallback"] is False
    assert body["feature_age_seconds"] == pytest.approx((clock - newest) / 1000)
    assert body["stale"] is ((clock - newest) / 1000 > served.serving.max_feature_age_seconds)
    with pytest.raises(ValueError, match="serving.clock 'lunar' is invalid"):
        create_app(with_overrides(served, serving={"clock": "lunar"}))
