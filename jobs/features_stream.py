"""Streaming features: new bronze events to tiles, feature history in Delta and latest values in Redis.

    ./spark-submit.sh features-stream                          # until SIGTERM
    ./spark-submit.sh features-stream --trigger available_now  # catch up, then exit

Reads bronze as a Delta stream from the version after the last backfill. Per micro-batch:
1. events older than the previous batch's watermark (newest event time seen minus
   ``--watermark-seconds``) are late: counted in the log and left to the next backfill. Spark
   tracks the watermark (``withWatermark``) and stores it with each batch's offsets, so a batch
   rerun after a failure or a restart classifies its events the same way;
2. the batch's tiles are added into the tile tables (MERGE, under the batch's Delta transaction id,
   so a replayed batch adds nothing twice);
3. for the entities the batch touched, features are recomputed from their stored tiles for every
   tile from the earliest one the batch changed;
4. each touched entity's newest values go to Redis through the versioned writer, then the
   recomputed rows are upserted into the history tables (Redis first, for freshness); each user's
   consumed items are added to their set, and the popularity sorted sets are recomputed from the
   item tiles as of the stream's event-time clock.

Counts and timings are logged once per batch and exported as Prometheus metrics
(``features.metrics_port``). SIGTERM stops the query between micro-batches.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.errors import StreamingQueryException
from pyspark.sql.streaming import StreamingQuery

from jobs import bronze
from jobs import features as transforms
from jobs.backfill import HISTORY_TABLES, STATE_TABLE, TILE_TABLES, seed_redis, write_consumed, write_popularity
from jobs.items import ITEMS_TABLE
from jobs.lib.checkpoint import CheckpointLock, CheckpointReader
from jobs.lib.metrics import FeaturesMetrics, features_metrics, serve_metrics
from jobs.lib.session import build_spark
from jobs.lib.streaming import TRIGGERS, delta_transaction, with_trigger
from reccore.config import Config, load_config, log_config
from reccore.features import FeatureSet, load_feature_set

log = logging.getLogger("jobs.features_stream")

QUERY_NAME = "features_stream"


@dataclass
class FeatureBatchResult:
    """Counts of one micro-batch of the features stream."""

    batch_id: int
    events: int = 0
    late: int = 0
    touched: dict = field(default_factory=dict)
    redis_written: dict = field(default_factory=dict)
    redis_kept: dict = field(default_factory=dict)
    watermark_ms: Optional[int] = None
    clock_ms: Optional[int] = None
    duration_s: float = 0.0
    steps_s: dict = field(default_factory=dict)

    def step(self, name: str, since: float) -> float:
        """Record the seconds since ``since`` as step ``name`` and return the current time."""
        now = time.monotonic()
        self.steps_s[name] = round(now - since, 2)
        return now


class StopRequested(RuntimeError):
    """Raised at the start of a micro-batch after SIGTERM/SIGINT, before it writes anything."""


class NothingToFold(StopRequested):
    """Raised by an available-now start when bronze has no commit after the backfill's: nothing to do."""


class FeaturesStream:
    """The features query; ``start()`` returns the StreamingQuery handle."""

    def __init__(self, spark: SparkSession, config: Config, feature_set: FeatureSet,
                 watermark_seconds: int = 600, trigger: str = "processing_time",
                 trigger_interval_seconds: float = 5.0, max_files_per_trigger: Optional[int] = None,
                 checkpoint: Optional[str] = None, metrics: Optional[FeaturesMetrics] = None):
        if trigger not in TRIGGERS:
            raise ValueError(f"trigger {trigger!r} is invalid; use one of {TRIGGERS}")
        self.spark = spark
        self.batch_spark = spark
        self.config = config
        self.feature_set = feature_set
        self.watermark_ms = watermark_seconds * 1000
        self.trigger = trigger
        self.trigger_interval_seconds = trigger_interval_seconds
        self.max_files_per_trigger = max_files_per_trigger
        self.checkpoint = checkpoint or config.lake.checkpoint(QUERY_NAME)
        self.reader = CheckpointReader(self.checkpoint, spark)
        self.lock = CheckpointLock(self.checkpoint)
        self.results: list[FeatureBatchResult] = []
        self.query: Optional[StreamingQuery] = None
        self.stop_requested = threading.Event()
        self._backfill_max_event_ms: Optional[int] = None
        self._app_id: Optional[str] = None
        self._items: Optional[DataFrame] = None
        self.restarts = 0
        self.metrics = metrics or features_metrics()

    def starting_version(self) -> int:
        """Return the bronze version after the last backfill; raise when no backfill ran."""
        state_path = self.config.lake.table(STATE_TABLE)
        if not DeltaTable.isDeltaTable(self.spark, state_path):
            raise FileNotFoundError(f"no feature backfill recorded at {state_path}; "
                                    "run `./spark-submit.sh backfill` first")
        row = (self.spark.read.format("delta").load(state_path)
               .where(F.col("feature_set_version") == self.feature_set.version)
               .agg(F.max("bronze_version"), F.max("max_event_ms")).first())
        if row[0] is None:
            raise FileNotFoundError(f"no backfill of feature set {self.feature_set.version} in {state_path}")
        # Until Spark has a watermark of its own (the first batch), the backfill's newest event sets it.
        self._backfill_max_event_ms = row[1]
        return int(row[0]) + 1

    def start(self) -> StreamingQuery:
        """Start the query from the checkpoint, or after the last backfill when the checkpoint is new."""
        self.lock.acquire()
        try:
            version = self.starting_version()
            if not self.reader.list_batches("offsets"):
                self._wait_for_version(version)
            if self.stop_requested.is_set():
                raise StopRequested("stop requested before the features stream started")
            self._items = self.spark.read.format("delta").load(self.config.lake.table(ITEMS_TABLE))
            reader = (self.spark.readStream.format("delta").option("startingVersion", version)
                      # Only the ingest job's inserts land in bronze; a compaction would be skipped.
                      .option("skipChangeCommits", "true"))
            if self.max_files_per_trigger:
                reader = reader.option("maxFilesPerTrigger", self.max_files_per_trigger)
            stream = (reader.load(self.config.lake.table(bronze.EVENTS_TABLE))
                      .withWatermark("event_time", f"{self.watermark_ms // 1000} seconds"))
            writer = (stream.writeStream.queryName(QUERY_NAME).option("checkpointLocation", self.checkpoint)
                      .foreachBatch(self.process_batch))
            self.query = with_trigger(writer, self.trigger, self.trigger_interval_seconds).start()
        except BaseException:
            self.lock.release()
            raise
        log.info("features stream started from bronze version %d, checkpoint %s, watermark %d s", version,
                 self.checkpoint, self.watermark_ms // 1000)
        return self.query

    def _wait_for_version(self, version: int) -> None:
        """Wait until bronze has ``version``: Delta refuses to start a stream at a version not yet written.

        Only a new checkpoint starts at a version. Starting at "latest" instead could skip a commit
        made between this check and the query's start.
        """
        path = self.config.lake.table(bronze.EVENTS_TABLE)
        announced = False
        while not self.stop_requested.is_set():
            latest = DeltaTable.forPath(self.spark, path).history(1).first()["version"]
            if latest >= version:
                return
            if self.trigger == "available_now":
                # Drain-and-exit has nothing to drain: waiting would never end on an idle topic.
                raise NothingToFold(f"bronze has no version after {latest}, the one the backfill read; "
                                    "nothing to fold")
            if not announced:
                log.info("waiting for bronze version %d: the backfill covered up to version %d and the ingest "
                         "job has not written since", version, latest)
                announced = True
            self.stop_requested.wait(max(1.0, self.trigger_interval_seconds))

    def _batch_watermark_ms(self, batch_id: int) -> Optional[int]:
        """Return the watermark Spark planned this batch with, from the checkpoint's offset log."""
        text = self.reader.read_text(f"offsets/{batch_id}")
        planned = json.loads(text.splitlines()[1]).get("batchWatermarkMs", 0) if text else 0
        if planned:
            return int(planned)
        if self._backfill_max_event_ms is None:
            return None
        return int(self._backfill_max_event_ms) - self.watermark_ms

    def _txn_app_id(self) -> str:
        if self._app_id is None:
            self._app_id = f"streamrec-features-{self.reader.query_id()}"
        return self._app_id

    def process_batch(self, batch_df: DataFrame, batch_id: int) -> None:
        """Fold one micro-batch of bronze events into tiles, history and Redis."""
        if self.stop_requested.is_set():
            # A normal return would make Spark commit this batch without its writes. The batch is
            # planned but untouched, and a restart runs it.
            raise StopRequested(f"stop requested: batch {batch_id} was not started and runs after the restart")
        started = time.monotonic()
        # The batch's own session (the query's clone): Delta's transaction settings are session
        # settings, and another query in this application must not see or change them.
        self.batch_spark = batch_df.sparkSession
        result = FeatureBatchResult(batch_id=batch_id)
        app_id = self._txn_app_id()
        events = transforms.feature_events(batch_df, self._items, self.feature_set).persist()
        try:
            watermark = self._batch_watermark_ms(batch_id)
            result.watermark_ms = watermark
            late = F.col("event_ms") < F.lit(watermark) if watermark is not None else F.lit(False)
            row = events.agg(F.count(F.lit(1)).alias("events"), F.sum(F.when(late, 1).otherwise(0)).alias("late"),
                             F.max(F.when(~late, F.col("event_ms"))).alias("newest_on_time")).first()
            result.events, result.late = row["events"], row["late"] or 0
            on_time = events.where(~late)
            if result.events > result.late:
                # Redis first for both entity types. The history upserts feed only Delta, so they follow.
                histories = {entity: self._fold_entity(on_time, entity, app_id, batch_id, result)
                             for entity in ("user", "item")}
                for entity, history in histories.items():
                    step = time.monotonic()
                    self._upsert_history(history, self.config.lake.table(HISTORY_TABLES[entity]), app_id, batch_id)
                    history.unpersist()
                    result.step(f"{entity}_history", step)
            if result.events:
                # A late event was still consumed: the user's set includes it at once.
                step = time.monotonic()
                write_consumed(events, self.config, self.feature_set)
                result.step("consumed", step)
            if result.events > result.late:
                # The event-time clock: the newest on-time event seen, which the watermark trails. It
                # moves last, so a request that reads the new clock also reads the new consumed sets.
                previous = watermark + self.watermark_ms if watermark is not None else None
                result.clock_ms = max(value for value in (previous, row["newest_on_time"]) if value is not None)
                step = time.monotonic()
                write_popularity(self.spark, self.config, self.feature_set, result.clock_ms)
                result.step("popularity", step)
        finally:
            events.unpersist()
        result.duration_s = time.monotonic() - started
        self.results.append(result)
        self._export(result)
        log.info("features batch %d: %d events, %d late (watermark %s), touched %s, Redis written %s kept %s, "
                 "%.2f s (%s)", batch_id, result.events, result.late, result.watermark_ms, result.touched,
                 result.redis_written, result.redis_kept, result.duration_s,
                 ", ".join(f"{name} {seconds}" for name, seconds in result.steps_s.items()))

    def _export(self, result: FeatureBatchResult) -> None:
        metrics = self.metrics
        metrics.batches.inc()
        metrics.events.inc(result.events)
        metrics.late_events.inc(result.late)
        for entity, count in result.redis_written.items():
            metrics.entities_written.labels(entity).inc(count)
        for entity, count in result.redis_kept.items():
            metrics.entities_kept.labels(entity).inc(count)
        metrics.batch_duration.observe(result.duration_s)
        metrics.last_redis_write.set(time.time())
        if result.clock_ms is not None:
            metrics.max_event_time.set(result.clock_ms / 1000)

    def _fold_entity(self, events: DataFrame, entity: str, app_id: str, batch_id: int,
                     result: FeatureBatchResult) -> DataFrame:
        """Add the batch's tiles, recompute the touched entities and write them to Redis.

        Returns the recomputed history rows, persisted, for the caller to upsert and unpersist.
        """
        feature_set = self.feature_set
        tile_path = self.config.lake.table(TILE_TABLES[entity])

        step = time.monotonic()
        batch_tiles = transforms.tiles(events, entity, feature_set).persist()
        try:
            # The earliest tile the batch changes, per entity: every later tile's windows change too.
            changed = batch_tiles.groupBy("entity_id").agg(F.min("bucket_s").alias("from_bucket")).persist()
            result.touched[entity] = changed.count()
            self._add_tiles(batch_tiles, tile_path, entity, app_id, batch_id)
            step = result.step(f"{entity}_tiles", step)

            lookback_s = feature_set.longest_window_seconds
            stored = (self.spark.read.format("delta").load(tile_path)
                      .join(F.broadcast(changed), "entity_id")
                      .where(F.col("bucket_s") > F.col("from_bucket") - lookback_s)
                      .drop("from_bucket", "event_month"))
            history = (transforms.window_features(stored, entity, feature_set)
                       .join(F.broadcast(changed), "entity_id")
                       .where(F.col("bucket_s") >= F.col("from_bucket")).drop("from_bucket")
                       .withColumn("event_month", F.date_format("event_time", "yyyy-MM"))
                       .persist())
            # A rerun of this batch writes the same values again (an equal stamp keeps them).
            latest = transforms.latest_per_entity(history)
            written, kept = seed_redis(latest, self.config, feature_set, entity, backfill=False)
            result.redis_written[entity], result.redis_kept[entity] = written, kept
            result.step(f"{entity}_redis", step)
            changed.unpersist()
            return history
        finally:
            batch_tiles.unpersist()

    def _add_tiles(self, batch_tiles: DataFrame, tile_path: str, entity: str, app_id: str, batch_id: int) -> None:
        columns = transforms.tile_columns(entity, self.feature_set)
        updates = {column: f"t.`{column}` + s.`{column}`" for column in columns}
        updates["max_event_ms"] = "greatest(t.max_event_ms, s.max_event_ms)"
        updates["max_ingest_ms"] = "greatest(t.max_ingest_ms, s.max_ingest_ms)"
        source = batch_tiles.withColumn("event_month", F.date_format(F.timestamp_seconds("bucket_s"), "yyyy-MM"))
        with delta_transaction(self.batch_spark, app_id, batch_id, f"{app_id}:{batch_id}:tiles-{entity}"):
            (DeltaTable.forPath(self.batch_spark, tile_path).alias("t")
             .merge(source.alias("s"), "t.entity_id = s.entity_id AND t.bucket_s = s.bucket_s")
             .whenMatchedUpdate(set=updates)
             .whenNotMatchedInsertAll()
             .execute())

    def _upsert_history(self, history: DataFrame, history_path: str, app_id: str, batch_id: int) -> None:
        # Recomputed rows are absolute values, so replaying this upsert leaves the same table.
        with delta_transaction(self.batch_spark, app_id, batch_id, f"{app_id}:{batch_id}:history"):
            (DeltaTable.forPath(self.batch_spark, history_path).alias("t")
             .merge(history.alias("s"), "t.entity_id = s.entity_id AND t.bucket_s = s.bucket_s")
             .whenMatchedUpdateAll()
             .whenNotMatchedInsertAll()
             .execute())

    def run_supervised(self, max_restarts: int = 5, restart_delay_seconds: float = 10.0) -> int:
        """Run the query, restarting it from its checkpoint after a failure; return an exit code.

        Spark does not retry a failed micro-batch. A batch that failed (Redis down after the
        writer's own retries, say) runs again from the checkpoint after a delay that doubles with
        each consecutive failure. Its Delta writes carry transaction ids and its Redis writes are
        versioned, so the rerun adds nothing twice. A run that completed a batch before failing
        resets the count. After ``max_restarts`` consecutive failures the error is final. Setting
        ``stop_requested`` (SIGTERM in ``main``) ends the run between micro-batches with 0.
        """
        stop = self.stop_requested
        failures = 0
        while True:
            batches_before = len(self.results)
            try:
                query = self.start()
            except NothingToFold as reason:
                log.info("features stream: %s", reason)
                return 0
            except StopRequested:
                return 0
            try:
                while query.isActive and not stop.is_set():
                    query.awaitTermination(1.0)
                if query.isActive:
                    self.stop_gracefully()
            except StreamingQueryException:
                pass  # the same error is read from query.exception() below
            finally:
                self.close()
            error = query.exception()
            if error is None or StopRequested.__name__ in str(error):
                return 0

            cause = _root_cause(error)
            self.metrics.batch_failures.labels("redis" if "Redis" in cause else "other").inc()
            failures = 1 if len(self.results) > batches_before else failures + 1
            self.restarts += 1
            if failures > max_restarts:
                log.error("features stream failed %d times in a row; giving up: %s", failures, error)
                return 1
            delay_s = restart_delay_seconds * 2 ** (failures - 1)
            log.warning("features stream failed (%s); restart %d of %d from the checkpoint in %.0f s",
                        cause, failures, max_restarts, delay_s)
            if stop.wait(delay_s):
                return 0

    def stop_gracefully(self) -> None:
        """Stop between micro-batches (see IngestJob.stop_gracefully for the reasoning)."""
        self.stop_requested.set()
        if self.query is not None:
            deadline = time.monotonic() + 600
            while self.query.isActive and self.query.status["isTriggerActive"] and time.monotonic() < deadline:
                time.sleep(0.05)
            self.query.stop()

    def close(self) -> None:
        self.lock.release()


def _root_cause(error: BaseException) -> str:
    # A foreachBatch failure arrives wrapped in py4j and Spark text; the Python error line names the cause.
    lines = [line.strip() for line in str(error).splitlines() if re.match(r"\s*[\w.]+(Error|Exception): ", line)]
    return (lines[-1] if lines else str(error).splitlines()[0])[:300]


def _given(value, default):
    return default if value is None else value


def main(argv: Optional[list[str]] = None, spark: Optional[SparkSession] = None) -> int:
    parser = argparse.ArgumentParser(prog="features-stream", description="Streaming features from bronze.")
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml)")
    parser.add_argument("--trigger", choices=TRIGGERS, default=None, help="default: features.trigger")
    parser.add_argument("--trigger-interval-seconds", type=float, default=None,
                        help="default: features.trigger_interval_seconds")
    parser.add_argument("--watermark-seconds", type=int, default=None,
                        help="events older than the newest event time seen minus this are late "
                             "(default: features.watermark_seconds)")
    parser.add_argument("--max-restarts", type=int, default=None,
                        help="consecutive restarts from the checkpoint after a failed micro-batch before giving up "
                             "(default: features.max_restarts)")
    parser.add_argument("--restart-delay-seconds", type=float, default=None,
                        help="delay before the first restart; it doubles with each consecutive failure "
                             "(default: features.restart_delay_seconds)")
    args = parser.parse_args(argv)
    config = load_config(args.env)
    settings = config.features
    log_config(config, log)
    spark = spark or build_spark(config, "streamrec-features-stream")
    stream = FeaturesStream(spark, config, load_feature_set(), _given(args.watermark_seconds, settings.watermark_seconds),
                            _given(args.trigger, settings.trigger),
                            _given(args.trigger_interval_seconds, settings.trigger_interval_seconds))
    serve_metrics(settings.metrics_host, settings.metrics_port)
    def request_stop(signum, _frame):
        log.info("received %s: stopping after the current micro-batch", signal.Signals(signum).name)
        stream.stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        return stream.run_supervised(_given(args.max_restarts, settings.max_restarts),
                                     _given(args.restart_delay_seconds, settings.restart_delay_seconds))
    except FileNotFoundError as error:
        log.error("features stream did not start: %s", error)
        return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
