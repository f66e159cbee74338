"""The streaming features job: parity with the batch, lateness, replays (real Kafka, Spark, Delta, Redis)."""

from __future__ import annotations

import dataclasses
import json
import uuid

import pytest
import redis
from prometheus_client import REGISTRY

from jobs.backfill import run_backfill
from jobs.features_stream import FeaturesStream
from jobs.ingest import IngestJob
from jobs.items import write_catalog
from jobs.parity import check
from reccore.features import load_feature_set
from reccore.store import KeyLayout, unpack
from tests.conftest import produce, with_overrides

pytestmark = [pytest.mark.integration, pytest.mark.spark]

T0_MS = 1_700_000_000_000
HOUR_MS = 3_600_000
CATALOG = [(f"i{n}", f"Item {n}", [["Drama"], ["Comedy", "Romance"], ["Sci-Fi"], []][n % 4]) for n in range(20)]


def rating(event_id: str, user: str, item: str, at_ms: int, value: float = 4.0) -> str:
    return json.dumps({"event_id": event_id, "event_time": at_ms, "user_id": user, "item_id": item,
                       "event_type": "rating", "value": value})


@pytest.fixture
def world(spark, make_topic, make_config, base_config):
    """A topic, lake and Redis prefix for one scenario, with the catalogue loaded."""
    topic = make_topic(partitions=2)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    config = make_config(topic, trigger="available_now")
    config = dataclasses.replace(config, redis=dataclasses.replace(base_config.redis, key_prefix=prefix))
    client = redis.Redis(host=config.redis.host, port=config.redis.port, socket_timeout=30)
    write_catalog(spark, config, CATALOG)
    yield topic, config, client
    keys = list(client.scan_iter(f"{prefix}:*", count=5000))
    if keys:
        client.delete(*keys)
    client.close()


def ingest(spark, config, **ingest_settings):
    job = IngestJob(spark, with_overrides(config, ingest=ingest_settings) if ingest_settings else config)
    query = job.start()
    try:
        assert query.awaitTermination(300)
        assert query.exception() is None, query.exception()
    finally:
        job.close()


def stream_once(spark, config, watermark_seconds: int, max_files: int | None = None) -> FeaturesStream:
    stream = FeaturesStream(spark, config, load_feature_set(), watermark_seconds, trigger="available_now",
                            max_files_per_trigger=max_files)
    query = stream.start()
    try:
        assert query.awaitTermination(600)
        assert query.exception() is None, query.exception()
    finally:
        stream.close()
    return stream


def test_parity_with_skewed_partitions(spark, world, kafka_settings):
    topic, config, client = world
    feature_set = load_feature_set()
    history = [rating(f"h{n}", f"u{n % 6}", f"i{n % 20}", T0_MS - 3 * 86_400_000 + n * 600_000, 1 + n % 5)
               for n in range(200)]
    produce(kafka_settings, topic, history)
    ingest(spark, config)
    run_backfill(spark, config, feature_set)

    # Partition 0 runs six hours ahead of partition 1 in event time; both stay inside the watermark.
    ahead = [rating(f"a{n}", f"u{n % 3}", f"i{n % 20}", T0_MS + 6 * HOUR_MS + n * 60_000, 1 + n % 5)
             for n in range(120)]
    behind = [rating(f"b{n}", f"u{3 + n % 3}", f"i{(n * 7) % 20}", T0_MS + n * 60_000, 1 + (n * 3) % 5)
              for n in range(120)]
    produce(kafka_settings, topic, ahead, partition=0)
    produce(kafka_settings, topic, behind, partition=1)
    ingest(spark, config, max_offsets_per_trigger=30)

    stream = stream_once(spark, config, watermark_seconds=86_400, max_files=1)
    assert len(stream.results) >= 4, "maxFilesPerTrigger should force several micro-batches"
    assert sum(result.late for result in stream.results) == 0

    reports = check(spark, config, feature_set)
    for report in reports:
        assert report.missing_rows == 0, report
        assert report.extra_rows == 0, report
        assert report.mismatched_values == 0, report
        assert report.redis_mismatched == 0, report
        assert report.redis_checked > 0


def test_late_event_counted_then_backfilled(spark, world, kafka_settings):
    topic, config, client = world
    feature_set = load_feature_set()
    layout = KeyLayout(config.redis.key_prefix, feature_set.version)
    names = feature_set.names("user")
    count_24h = names.index("rating_count_24h_user")

    produce(kafka_settings, topic, [rating("seed", "other", "i1", T0_MS - 86_400_000)])
    ingest(spark, config)
    run_backfill(spark, config, feature_set)

    steps = [("t0", T0_MS), ("t30", T0_MS + 30 * 60_000), ("t1", T0_MS + 60_000), ("t25", T0_MS + 25 * 60_000)]
    late_metric_before = REGISTRY.get_sample_value("streamrec_features_late_events_total") or 0.0
    late_counts = []
    for event_id, at_ms in steps:
        produce(kafka_settings, topic, [rating(event_id, "u", "i2", at_ms)])
        ingest(spark, config)
        stream = stream_once(spark, config, watermark_seconds=600)
        late_counts.append(sum(result.late for result in stream.results))

    # t=1 min arrives after t=30 min: 29 minutes late with a 10-minute watermark. t=25 min is 5 late: on time.
    assert late_counts == [0, 0, 1, 0]
    assert REGISTRY.get_sample_value("streamrec_features_late_events_total") - late_metric_before == 1
    # The late event is still a consumed item; popularity, like the windows, leaves it to the backfill.
    assert client.sismember(layout.consumed("u"), "i2")
    assert int(client.get(layout.popularity_as_of())) == T0_MS + 30 * 60_000
    assert client.zscore(layout.popularity("1h"), "i2") == 3  # t=0, t=30 and t=25 min
    stamp, values = unpack(client.get(layout.vector("user", "u")), len(names))
    assert values[count_24h] == 3, "the late event must be absent from the streamed windows"
    assert stamp.newest_event_ms == T0_MS + 30 * 60_000

    run_backfill(spark, config, feature_set)
    stamp, values = unpack(client.get(layout.vector("user", "u")), len(names))
    assert values[count_24h] == 4, "the backfill includes the late event"
    assert client.zscore(layout.popularity("1h"), "i2") == 4
    assert stamp.newest_event_ms == T0_MS + 30 * 60_000
    assert stamp.events_counted == 4


def snapshot(spark, config, client) -> tuple:
    from jobs.backfill import HISTORY_TABLES, TILE_TABLES

    tables = {}
    for entity in ("user", "item"):
        for name, path in (("history", HISTORY_TABLES[entity]), ("tiles", TILE_TABLES[entity])):
            frame = spark.read.format("delta").load(config.lake.table(path))
            tables[f"{entity}-{name}"] = sorted(tuple(str(value) for value in row) for row in frame.collect())
    values = {key: client.get(key) for key in client.scan_iter(f"{config.redis.key_prefix}:*:vec", count=5000)}
    return tables, values


def test_commit_log_replay_changes_nothing(spark, world, kafka_settings):
    from jobs.lib.checkpoint import CheckpointReader, local_path

    topic, config, client = world
    feature_set = load_feature_set()
    produce(kafka_settings, topic, [rating("seed", "u0", "i0", T0_MS - 86_400_000)])
    ingest(spark, config)
    run_backfill(spark, config, feature_set)
    produce(kafka_settings, topic, [rating(f"e{n}", f"u{n % 4}", f"i{n % 9}", T0_MS + n * 60_000) for n in range(40)])
    ingest(spark, config, max_offsets_per_trigger=10)
    stream_once(spark, config, watermark_seconds=86_400, max_files=1)
    before = snapshot(spark, config, client)

    checkpoint = config.lake.checkpoint("features_stream")
    last = CheckpointReader(checkpoint).last_committed_batch()
    commits = local_path(checkpoint) / "commits"
    (commits / str(last)).unlink()
    # The local file system keeps a checksum beside each file; the entry includes it.
    (commits / f".{last}.crc").unlink(missing_ok=True)
    replayed = stream_once(spark, config, watermark_seconds=86_400, max_files=1)

    assert [result.batch_id for result in replayed.results] == [last], "the uncommitted batch runs again"
    assert snapshot(spark, config, client) == before


def test_older_backfill_keeps_fresher_values(spark, world, kafka_settings):
    topic, config, client = world
    feature_set = load_feature_set()
    layout = KeyLayout(config.redis.key_prefix, feature_set.version)
    produce(kafka_settings, topic, [rating(f"old{n}", "u", f"i{n}", T0_MS - 5 * 86_400_000 + n * 1000) for n in range(5)])
    ingest(spark, config)
    run_backfill(spark, config, feature_set)
    produce(kafka_settings, topic, [rating(f"new{n}", "u", f"i{n}", T0_MS + n * 1000) for n in range(3)])
    ingest(spark, config)
    stream_once(spark, config, watermark_seconds=86_400)
    streamed = client.get(layout.vector("user", "u"))
    popularity = {window: client.zrange(layout.popularity(window), 0, -1, withscores=True)
                  for window in feature_set.windows}
    assert int(client.get(layout.popularity_as_of())) == T0_MS + 2000
    assert dict(popularity["1h"]) == {b"i0": 1.0, b"i1": 1.0, b"i2": 1.0}

    # Rebuild only the older days: the stream's fresher values for "u" stay as they are.
    run_backfill(spark, config, feature_set, start_ms=T0_MS - 6 * 86_400_000, end_ms=T0_MS - 86_400_000)

    assert client.get(layout.vector("user", "u")) == streamed
    assert int(client.get(layout.popularity_as_of())) == T0_MS + 2000
    assert {window: client.zrange(layout.popularity(window), 0, -1, withscores=True)
            for window in feature_set.windows} == popularity
    stamp, _ = unpack(streamed, len(feature_set.names("user")))
    assert stamp.newest_event_ms == T0_MS + 2000


class PrivateRedis:
    """A redis-server of this test's own on a free loopback port, to stop and start at will."""

    def __init__(self, folder):
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.folder = folder
        self.process = None

    def start(self) -> None:
        import subprocess
        import time

        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
             "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise TimeoutError(f"redis-server on port {self.port} did not start within 30 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


def test_redis_down_during_batch_recovers(spark, world, kafka_settings, tmp_path):
    import threading
    import time

    from jobs.backfill import HISTORY_TABLES, TILE_TABLES

    topic, config, _shared = world
    private = PrivateRedis(tmp_path / "redis")
    private.start()
    try:
        config = dataclasses.replace(config, redis=dataclasses.replace(config.redis, port=private.port))
        client = redis.Redis(host="127.0.0.1", port=private.port, socket_timeout=30)
        feature_set = load_feature_set()
        produce(kafka_settings, topic, [rating("seed", "u0", "i0", T0_MS - 86_400_000)])
        ingest(spark, config)
        run_backfill(spark, config, feature_set)

        private.stop()
        produce(kafka_settings, topic, [rating(f"e{n}", f"u{n % 5}", f"i{n % 7}", T0_MS + n * 60_000) for n in range(30)])
        ingest(spark, config)

        stream = FeaturesStream(spark, config, feature_set, 86_400, trigger="available_now")
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.setdefault("code", stream.run_supervised(5, 2.0)))
        runner.start()
        deadline = time.monotonic() + 300
        while stream.restarts == 0 and time.monotonic() < deadline and runner.is_alive():
            time.sleep(0.5)
        assert stream.restarts >= 1, "the batch should fail while Redis is down"
        private.start()
        runner.join(timeout=600)
        assert not runner.is_alive()
        assert outcome["code"] == 0

        # Delta has every tile and history row once, and Redis matches a batch recomputation.
        for entity in ("user", "item"):
            for path in (TILE_TABLES[entity], HISTORY_TABLES[entity]):
                frame = spark.read.format("delta").load(config.lake.table(path))
                assert frame.count() == frame.select("entity_id", "bucket_s").distinct().count(), path
        for report in check(spark, config, feature_set):
            assert report.ok, report
        # No entity half written: each vector has its hash, with the same stamp.
        layout = KeyLayout(config.redis.key_prefix, feature_set.version)
        for user in ("u0", "u1", "u2", "u3", "u4"):
            stamp, _ = unpack(client.get(layout.vector("user", user)), len(feature_set.names("user")))
            fields = client.hgetall(layout.fields("user", user))
            assert int(fields[b"_newest_event_ms"]) == stamp.newest_event_ms
            assert int(fields[b"_events_counted"]) == stamp.events_counted
        client.close()
    finally:
        private.stop()


def test_stream_started_right_after_backfill_waits_for_bronze(spark, world, kafka_settings):
    import threading
    import time

    topic, config, client = world
    feature_set = load_feature_set()
    layout = KeyLayout(config.redis.key_prefix, feature_set.version)
    produce(kafka_settings, topic, [rating("seed", "u", "i1", T0_MS)])
    ingest(spark, config)
    run_backfill(spark, config, feature_set)

    # Available-now with nothing after the backfill: it exits at once with 0, having folded nothing.
    drain = FeaturesStream(spark, config, feature_set, 600, trigger="available_now")
    assert drain.run_supervised(max_restarts=0) == 0
    assert drain.results == []

    # Bronze has no version after the backfill's yet: the stream must wait for it, not fail.
    stream = FeaturesStream(spark, config, feature_set, 600, trigger="processing_time", trigger_interval_seconds=1)
    started = threading.Thread(target=stream.start)
    started.start()
    try:
        time.sleep(3)
        assert started.is_alive(), "start() should wait for the next bronze version"
        produce(kafka_settings, topic, [rating("next", "u", "i2", T0_MS + 60_000)])
        ingest(spark, config)
        started.join(timeout=120)
        assert not started.is_alive()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not stream.results:
            time.sleep(0.5)
        assert stream.results and stream.query.isActive, stream.query.exception()
        stamp, _ = unpack(client.get(layout.vector("user", "u")), len(feature_set.names("user")))
        assert stamp.newest_event_ms == T0_MS + 60_000
    finally:
        stream.stop_gracefully()
        started.join(timeout=60)
        stream.close()
