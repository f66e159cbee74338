"""What the scorer served reaches Kafka, then Delta through served-ingest, exactly once (real Kafka, Spark, Redis, MLflow)."""

from __future__ import annotations

import time

import pytest
import redis

from jobs.served_ingest import QUARANTINE_TABLE, SERVED_TABLE, ServedIngest
from reccore.features import load_feature_set
from reccore.store import KeyLayout
from serving.app import create_app
from tests.conftest import produce, with_overrides

pytestmark = [pytest.mark.integration, pytest.mark.spark]


def drain(spark, config) -> None:
    job = ServedIngest(spark, config)
    query = job.start()
    try:
        assert query.awaitTermination(300), "served-ingest did not drain the topic within 300 s"
        assert query.exception() is None, query.exception()
    finally:
        job.close()


def test_served_log_reaches_delta(movielens_champion, make_topic, kafka_settings, spark, tmp_path):
    topic = make_topic(2)
    config = with_overrides(movielens_champion, kafka={"served_topic": topic},
                            lake={"root": str(tmp_path / "lake"), "checkpoint_root": str(tmp_path / "checkpoints")},
                            monitoring={"served_trigger": "available_now"})
    app = create_app(config)
    parts = app.extensions["streamrec"]
    client = app.test_client()
    started_ms = int(time.time() * 1000)
    bodies = [client.get(f"/v1/users/{user}/recommendations?k=5").json for user in ("414", "68", "480", "999999999")]
    bodies.append(client.post("/v1/rank", json={"user_id": "414", "candidates": ["1", "2", "3"], "k": 2}).json)
    finished_ms = int(time.time() * 1000)
    parts["holder"].stop()
    assert parts["served_log"].flush(30) == 0
    metrics = parts["metrics"]
    assert metrics.registry.get_sample_value("streamrec_scorer_served_log_sent_total") == len(bodies)

    produce(kafka_settings, topic, ["not json", '{"user_id": "1", "items": [], "scores": [], "served_at_ms": 1}'])
    drain(spark, config)

    connection = redis.Redis(host=config.redis.host, port=config.redis.port)
    clock = int(connection.get(KeyLayout(config.redis.key_prefix, load_feature_set().version).popularity_as_of()))
    connection.close()
    rows = {row["request_id"]: row for row in spark.read.format("delta").load(config.lake.table(SERVED_TABLE)).collect()}
    assert set(rows) == {body["request_id"] for body in bodies}
    for body in bodies:
        row = rows[body["request_id"]]
        assert row["user_id"] == body["user_id"]
        assert row["items"] == [item["item_id"] for item in body["items"]]
        assert row["scores"] == [item["score"] for item in body["items"]]
        assert row["model_name"] == config.training.model_name
        assert row["model_version"] == body["model_version"]
        assert row["fallback_reason"] == body["fallback_reason"]
        assert started_ms <= row["served_at_ms"] <= finished_ms
        assert row["event_time_ms"] == clock
    assert rows[bodies[3]["request_id"]]["fallback_reason"] == "unknown_user"
    assert rows[bodies[4]["request_id"]]["k"] == 2

    quarantined = spark.read.format("delta").load(config.lake.table(QUARANTINE_TABLE)).collect()
    assert sorted(row["reason"] for row in quarantined) == ["request_id is missing or not of its type",
                                                            "value is not a JSON object"]

    # A restart on the same checkpoint with nothing new writes nothing twice; new records are added once.
    drain(spark, config)
    client = create_app(config, holder=parts["holder"], store=parts["store"]).test_client()
    extra = client.get("/v1/users/414/recommendations?k=3").json
    assert client.application.extensions["streamrec"]["served_log"].flush(30) == 0
    drain(spark, config)
    table = spark.read.format("delta").load(config.lake.table(SERVED_TABLE))
    assert table.count() == len(bodies) + 1
    assert table.where(table.request_id == extra["request_id"]).count() == 1
