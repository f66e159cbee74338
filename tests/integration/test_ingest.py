"""The ingest job against the real broker, Spark and Delta, run in-process on the shared session."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from datetime import datetime

import pytest
from pyspark.sql import functions as F

from jobs.ingest import DataLossError, IngestJob
from jobs.lib.checkpoint import CheckpointInUseError
from jobs.lib.metrics import serve_metrics
from reccore.config import PROJECT_ROOT
from tests.conftest import MOVIELENS_RATINGS, produce, project_env

pytestmark = [pytest.mark.integration, pytest.mark.spark]


def event(event_id: str, event_time="2018-09-24T14:27:30Z", user_id="u1", item_id="i1", **fields) -> str:
    record = {"event_id": event_id, "event_time": event_time, "user_id": user_id, "item_id": item_id,
              "event_type": "rating", "value": 4.0}
    record.update(fields)
    return json.dumps(record)


def run_available_now(spark, config) -> IngestJob:
    """Drain the topic with an available-now trigger and return the finished job."""
    job = IngestJob(spark, _with_trigger(config, "available_now"))
    query = job.start()
    try:
        finished = query.awaitTermination(300)
        assert finished, "the available-now run did not finish within 300 s"
        assert query.exception() is None, query.exception()
    finally:
        if query.isActive:
            query.stop()
        job.close()
    return job


def _with_trigger(config, trigger):
    from tests.conftest import with_overrides

    return with_overrides(config, ingest={"trigger": trigger})


def bronze_rows(spark, config):
    return spark.read.format("delta").load(config.lake.table("bronze/events"))


def quarantine_rows(spark, config):
    return spark.read.format("delta").load(config.lake.table("bronze/events_quarantine"))


BAD_RECORDS = {
    '{"user_id": {, "item_id": 3}': ("invalid_json", "value"),
    event("bad-time", event_time="yesterday"): ("invalid_event_time", "event_time"),
    json.dumps({"event_id": "no-item", "event_time": "2018-09-24T14:27:30Z", "user_id": "u1",
                "event_type": "rating", "value": 3.0}): ("missing_field", "item_id"),
    event("hover", event_type="hover", value=None): ("unknown_event_type", "event_type"),
    event("future", event_time="2226-09-24T14:27:30Z"): ("event_time_in_future", "event_time"),
    event("obj-user", user_id={"x": 1}): ("wrong_type", "user_id"),
    event("bool-user", user_id=True): ("wrong_type", "user_id"),
    event("string-value", value="4.5"): ("wrong_type", "value"),
    event("big-value", value=7): ("value_out_of_range", "value"),
}


def test_bad_records_quarantined_while_running(spark, make_topic, make_config, kafka_settings):
    topic = make_topic(partitions=2)
    config = make_config(topic, trigger="processing_time", trigger_interval_seconds=0.5)
    good = [event(f"good-{n}", user_id=f"u{n}") for n in range(20)]
    good.append(event("numeric-user", user_id=123456))
    good.append(event("with-campaign", campaign="spring-sale"))
    produce(kafka_settings, topic, good + list(BAD_RECORDS))

    job = IngestJob(spark, config)
    query = job.start()
    try:
        query.processAllAvailable()
        assert query.isActive, "the job stopped on bad input"

        # A second wave after the bad records still flows.
        produce(kafka_settings, topic, [event("after-bad")])
        query.processAllAvailable()
        assert query.isActive
    finally:
        query.stop()
        job.close()

    events = bronze_rows(spark, config)
    ids = sorted(row.event_id for row in events.select("event_id").collect())
    assert ids == sorted([f"good-{n}" for n in range(20)] + ["numeric-user", "with-campaign", "after-bad"])

    numeric = events.where(F.col("event_id") == "numeric-user").first()
    assert numeric.user_id == "123456"
    campaign = events.where(F.col("event_id") == "with-campaign").first()
    assert json.loads(campaign.extra_fields["campaign"]) == "spring-sale"

    quarantined = {bytes(row.raw_value).decode(): (row.reason_code, row.reason_field, row.reason)
                   for row in quarantine_rows(spark, config).collect()}
    assert set(quarantined) == set(BAD_RECORDS)
    for raw, (code, field) in BAD_RECORDS.items():
        assert quarantined[raw][:2] == (code, field), raw
        assert field in quarantined[raw][2] or code == "invalid_json"
    for row in quarantine_rows(spark, config).collect():
        assert row.kafka_topic == topic
        assert row.kafka_partition in (0, 1)
        assert row.kafka_offset >= 0

    assert sum(result.quarantined.get("wrong_type", 0) for result in job.results) == 3


def test_event_time_normalised_to_utc(spark, make_topic, make_config, kafka_settings):
    topic = make_topic(partitions=1)
    config = make_config(topic)
    produce(kafka_settings, topic, [event("offset", event_time="2018-09-24T16:27:30+02:00"),
                                    event("millis", event_time=1537799250000)])
    run_available_now(spark, config)

    times = {row.event_id: row.event_time for row in bronze_rows(spark, config).collect()}
    expected = datetime(2018, 9, 24, 14, 27, 30)
    assert times == {"offset": expected, "millis": expected}
    months = {row.event_month for row in bronze_rows(spark, config).select("event_month").collect()}
    assert months == {"2018-09"}


def test_duplicates_dropped_late_events_land(spark, make_topic, make_config, kafka_settings):
    topic = make_topic(partitions=1)
    config = make_config(topic, late_threshold_seconds=600)
    produce(kafka_settings, topic, [event("a", event_time="2018-09-24T12:00:00Z"),
                                    event("a", event_time="2018-09-24T12:00:00Z"),
                                    event("b", event_time="2018-09-24T12:05:00Z")])
    first = run_available_now(spark, config)
    assert sum(result.duplicates for result in first.results) == 1

    # Days later: a copy of "a", a new event one hour behind the newest (late) and a fresh one.
    produce(kafka_settings, topic, [event("a", event_time="2018-09-24T12:00:00Z"),
                                    event("late", event_time="2018-09-24T11:05:00Z"),
                                    event("c", event_time="2018-09-24T12:06:00Z")])
    second = run_available_now(spark, config)

    ids = sorted(row.event_id for row in bronze_rows(spark, config).collect())
    assert ids == ["a", "b", "c", "late"]
    assert sum(result.duplicates for result in second.results) == 1
    assert sum(result.late for result in second.results) == 1
    assert sum(result.written for result in second.results) == 2

    # The late event again: now it is a duplicate, and a duplicate is never counted as late.
    produce(kafka_settings, topic, [event("late", event_time="2018-09-24T11:05:00Z")])
    third = run_available_now(spark, config)
    assert sum(result.duplicates for result in third.results) == 1
    assert sum(result.late for result in third.results) == 0


@pytest.mark.parametrize("scope, expected_rows", [("event_month", 2), ("table", 1)])
def test_dedup_scope_on_reused_id(spark, make_topic, make_config, kafka_settings, scope, expected_rows):
    # A producer bug: the same event_id with an event time in another month. "table" catches it,
    # "event_month" only compares with the months the batch touches, as documented.
    topic = make_topic(partitions=1)
    config = make_config(topic, dedup_scope=scope)
    produce(kafka_settings, topic, [event("reused", event_time="2018-08-01T00:00:00Z")])
    run_available_now(spark, config)
    produce(kafka_settings, topic, [event("reused", event_time="2018-09-01T00:00:00Z")])
    run_available_now(spark, config)

    assert bronze_rows(spark, config).where(F.col("event_id") == "reused").count() == expected_rows


def test_second_job_on_checkpoint_refused(spark, make_topic, make_config, kafka_settings):
    topic = make_topic(partitions=1)
    config = make_config(topic, trigger="processing_time", trigger_interval_seconds=1)
    produce(kafka_settings, topic, [event("x")])
    first = IngestJob(spark, config)
    query = first.start()
    try:
        with pytest.raises(CheckpointInUseError, match="is in use by another job"):
            IngestJob(spark, config).start()
        assert query.isActive
    finally:
        query.stop()
        first.close()


def test_deleted_checkpoint_writes_nothing_twice(spark, make_topic, make_config, kafka_settings):
    topic = make_topic(partitions=2)
    config = make_config(topic, max_offsets_per_trigger=7)
    produce(kafka_settings, topic, [event(f"e{n}", user_id=f"u{n % 5}") for n in range(30)]
            + ['{"broken', event("bad", value=9)])
    run_available_now(spark, config)
    before_events = sorted(row.event_id for row in bronze_rows(spark, config).collect())
    before_quarantine = quarantine_rows(spark, config).count()
    assert len(before_events) == 30
    assert before_quarantine == 2

    shutil.rmtree(config.lake.checkpoint("ingest_bronze_events"))
    rerun = run_available_now(spark, config)

    assert sorted(row.event_id for row in bronze_rows(spark, config).collect()) == before_events
    assert quarantine_rows(spark, config).count() == before_quarantine
    assert sum(result.written for result in rerun.results) == 0
    assert sum(result.duplicates for result in rerun.results) == 30


def _delete_records(kafka_settings, topic: str, partition: int, before_offset: int) -> None:
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(kafka_settings)
    futures = admin.delete_records([TopicPartition(topic, partition, before_offset)])
    for future in futures.values():
        future.result(timeout=30)


def test_data_loss_strict_names_topic_and_partition(spark, make_topic, make_config, kafka_settings):
    topic = make_topic(partitions=1)
    config = make_config(topic, fail_on_data_loss=True)
    produce(kafka_settings, topic, [event(f"e{n}") for n in range(100)])
    run_available_now(spark, config)
    produce(kafka_settings, topic, [event(f"f{n}") for n in range(100)])
    _delete_records(kafka_settings, topic, 0, 150)

    job = IngestJob(spark, _with_trigger(config, "available_now"))
    with pytest.raises(DataLossError, match=f"topic {topic} partition 0: offsets 100 to 149 were deleted"):
        job.start()
    assert bronze_rows(spark, config).count() == 100


def test_data_loss_lenient_counts_skipped(spark, make_topic, make_config, kafka_settings):
    topic = make_topic(partitions=1)
    config = make_config(topic, fail_on_data_loss=False)
    produce(kafka_settings, topic, [event(f"e{n}") for n in range(100)])
    run_available_now(spark, config)
    produce(kafka_settings, topic, [event(f"f{n}") for n in range(100)])
    _delete_records(kafka_settings, topic, 0, 150)

    job = run_available_now(spark, config)

    assert sum(result.offsets_skipped for result in job.results) == 50
    assert bronze_rows(spark, config).count() == 150
    ids = {row.event_id for row in bronze_rows(spark, config).collect()}
    assert "f49" not in ids
    assert "f50" in ids
    sample = job.metrics.offsets_skipped.labels(topic, "0")._value.get()
    assert sample == 50


def test_metrics_endpoint_counts(spark, make_topic, make_config, kafka_settings):
    topic = make_topic(partitions=1)
    config = make_config(topic)
    port = serve_metrics("127.0.0.1", 0)

    def scrape() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("streamrec_ingest_") and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    before = scrape()
    produce(kafka_settings, topic, [event("m1"), event("m1"), event("m2"), "not json"])
    run_available_now(spark, config)
    after = scrape()

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("streamrec_ingest_records_read_total") == 4
    assert delta("streamrec_ingest_events_written_total") == 2
    assert delta("streamrec_ingest_duplicates_total") == 1
    assert delta('streamrec_ingest_quarantined_total{reason="invalid_json"}') == 1
    assert after[f'streamrec_ingest_kafka_lag_records{{partition="0",topic="{topic}"}}'] == 0


def test_movielens_main_job(movielens_bronze, spark):
    events = spark.read.format("delta").load(movielens_bronze.events_path)
    summary = events.agg(F.count(F.lit(1)).alias("rows"), F.count_distinct("event_id").alias("ids"),
                         F.min("event_time").alias("first"), F.max("event_time").alias("last")).first()
    assert summary.rows == MOVIELENS_RATINGS
    assert summary.ids == MOVIELENS_RATINGS
    assert summary.first == datetime(1996, 3, 29, 18, 36, 55)
    assert summary.last == datetime(2018, 9, 24, 14, 27, 30)

    from delta.tables import DeltaTable

    files = DeltaTable.forPath(spark, movielens_bronze.events_path).detail().first().numFiles
    assert files <= 1000
    assert "batch 0: read" in movielens_bronze.ingest_log


def test_movielens_replayed_twice_plus_one(movielens_bronze, spark, make_topic, make_config, tmp_path):
    topic = make_topic(partitions=2)
    config = make_config(topic)
    # Start from a copy of the shared bronze table: the fixture stays read-only.
    shutil.copytree(movielens_bronze.events_path, config.lake.table("bronze/events"))

    # The whole file again, then one new event dated 1997, both through the replay tool.
    new_event = tmp_path / "new.jsonl"
    new_event.write_text(event("ml-new-1997", event_time="1997-06-01T12:00:00Z", user_id="1", item_id="1") + "\n")
    env = project_env({"kafka.interactions_topic": topic})
    for args in (["movielens"], ["jsonl", str(new_event)]):
        replay = subprocess.run([sys.executable, "-m", "jobs.replay", *args, "--no-progress"], cwd=PROJECT_ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert replay.returncode == 0, replay.stderr[-3000:]
    job = run_available_now(spark, config)

    assert bronze_rows(spark, config).count() == MOVIELENS_RATINGS + 1
    assert sum(result.written for result in job.results) == 1
    assert sum(result.duplicates for result in job.results) == MOVIELENS_RATINGS
    stored = bronze_rows(spark, config).where(F.col("event_id") == "ml-new-1997").first()
    assert stored.event_time == datetime(1997, 6, 1, 12, 0, 0)
    assert stored.event_month == "1997-06"
