"""The point-in-time training set against real Kafka, Spark, Delta and Redis: no value from after a label."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
import redis

from jobs.backfill import run_backfill
from jobs.items import write_catalog
from jobs.training_set import TRAINING_TABLE, build_training_set
from reccore.features import load_feature_set
from tests.conftest import produce, with_overrides
from tests.integration.test_features_stream import CATALOG, ingest, rating

pytestmark = [pytest.mark.integration, pytest.mark.spark]

T_MS = 1_700_000_000_000  # a whole second: the label's second is [T_MS, T_MS + 1000)
HOUR_MS = 3_600_000


@pytest.fixture
def lake(spark, make_topic, make_config, base_config):
    topic = make_topic(partitions=1)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    config = make_config(topic, trigger="available_now")
    config = dataclasses.replace(config, redis=dataclasses.replace(base_config.redis, key_prefix=prefix))
    write_catalog(spark, config, CATALOG)
    client = redis.Redis(host=config.redis.host, port=config.redis.port, socket_timeout=30)
    yield topic, config
    keys = list(client.scan_iter(f"{prefix}:*", count=5000))
    if keys:
        client.delete(*keys)
    client.close()


def test_label_sees_only_values_from_before(spark, lake, kafka_settings):
    topic, config = lake
    config = with_overrides(config, training={"negatives_per_positive": 2.0, "seed": 7})
    feature_set = load_feature_set()

    produce(kafka_settings, topic, [
        rating("before", "u", "i1", T_MS - 2 * HOUR_MS, 4.0),
        rating("label", "u", "i9", T_MS, 5.0),
        rating("same-second", "u", "i2", T_MS + 400, 1.0),
        rating("after", "u", "i3", T_MS + 60_000, 2.0),
        rating("other", "v", "i1", T_MS - 3 * HOUR_MS, 3.0),
    ])
    ingest(spark, config)
    run_backfill(spark, config, feature_set)
    # A late event with an earlier event time, ingested later and folded in by a second backfill:
    # the history rows from T - 1 h on are recomputed with a later ingest time.
    produce(kafka_settings, topic, [rating("late", "u", "i4", T_MS - HOUR_MS, 5.0)])
    ingest(spark, config)
    run_backfill(spark, config, feature_set)

    result = build_training_set(spark, config, feature_set)
    table = spark.read.format("delta").option("versionAsOf", result.version).load(config.lake.table(TRAINING_TABLE))
    rows = {row["example_id"]: row for row in table.collect()}

    label = rows["label"]
    assert label["relevance"] == 2
    # Only "before" is visible: not the same-second or later events, not the late one ingested afterwards.
    assert label["rating_count_24h_user"] == 1
    assert label["rating_mean_24h_user"] == 4.0
    assert label["user_newest_ms"] == T_MS - 2 * HOUR_MS
    # Nothing was known about item i9 before its first rating.
    assert label["item_newest_ms"] is None
    assert label["rating_count_30d_item"] is None

    # The late event's own row gets "before" only (ingested after it, and earlier in time).
    assert rows["late"]["rating_count_24h_user"] == 1
    # "after" was ingested with the label: the recomputed row at T is not visible to it either.
    assert rows["after"]["rating_count_24h_user"] == 1
    assert rows["after"]["user_ingest_ms"] <= rows["after"]["label_ingest_ms"]
    # Relevance by the configured thresholds.
    assert (rows["before"]["relevance"], rows["same-second"]["relevance"], rows["other"]["relevance"]) == (1, 0, 0)

    # Sampled negatives: never an item the user had touched by the label's time, and seeded.
    sampled = [row for row in rows.values() if row["source"] == "sampled"]
    assert sampled, "negatives_per_positive 2 should sample negatives"
    touched = {"u": {("i1", T_MS - 2 * HOUR_MS), ("i9", T_MS), ("i2", T_MS + 400), ("i3", T_MS + 60_000),
                     ("i4", T_MS - HOUR_MS)}, "v": {("i1", T_MS - 3 * HOUR_MS)}}
    for row in sampled:
        assert row["relevance"] == 0
        assert not any(item == row["item_id"] and at <= row["label_ms"] for item, at in touched[row["user_id"]]), row
    again = build_training_set(spark, config, feature_set)
    table = spark.read.format("delta").option("versionAsOf", again.version).load(config.lake.table(TRAINING_TABLE))
    assert sorted((row["example_id"], row["item_id"]) for row in table.where("source = 'sampled'").collect()) == \
        sorted((row["example_id"], row["item_id"]) for row in sampled)


def test_quality_gate_names_each_failed_expectation(spark, base_config):
    from jobs.quality import QualityGateError, check, enforce

    feature_set = load_feature_set()
    config = with_overrides(base_config, training={"min_examples": 3})
    user_name, item_name = feature_set.names("user")[0], feature_set.names("item")[0]
    schema = (f"example_id string, user_id string, item_id string, label_ms long, label_ingest_ms long, "
              f"relevance int, source string, user_newest_ms long, user_ingest_ms long, item_newest_ms long, "
              f"item_ingest_ms long, `{user_name}` float, `{item_name}` float")
    good = [("a", "u", "i", 5000, 9000, 1, "event", 1000, 8000, None, None, 1.0, None),
            ("b", "u", "j", 6000, 9000, 0, "sampled", 1000, 8000, 2000, 9000, 1.0, 2.0),
            ("c", "v", "i", 7000, 9500, 2, "event", None, None, 3000, 9500, None, 1.0)]
    assert check(spark.createDataFrame(good, schema), "training_set", config, feature_set).success

    bad = good + [("c", None, "i", 8000, 9600, 7, "event", 8000, 9700, 1000, 9000, 1.0, 1.0)]
    with pytest.raises(QualityGateError) as failure:
        enforce(spark.createDataFrame(bad, schema), "training_set", config, feature_set)
    message = str(failure.value)
    assert "expect_column_values_to_be_unique {'column': 'example_id'}" in message
    assert "expect_column_values_to_not_be_null {'column': 'user_id'}" in message
    assert "expect_column_values_to_be_in_set {'column': 'relevance'" in message
    # A user row as new as the label, and one ingested after it: both break the point-in-time rule.
    assert "'column_A': 'label_ms', 'column_B': 'user_newest_ms'" in message
    assert "'column_A': 'label_ingest_ms', 'column_B': 'user_ingest_ms'" in message
    assert "failed 5 of" in message
