"""Streaming features: new bronze events to tiles, feature history in Delta and latest values in Redis.

    ./spark-submit.sh features-stream                          # until SIGTERM
    ./spark-submit.sh features-stream --trigger available_now  # catch up, then exit

Reads bronze as a Delta stream from the version after the last backfill. Per micro-batch:
1. events older than the previous batch's watermark (newest event time seen minus
   ``features.watermark_seconds``) are late: counted in the log and metrics and left to the next
   backfill;
2. the batch's tiles are added into the tile tables (MERGE, under the batch's Delta transaction id,
   so a replayed batch adds nothing twice);
3. for the entities the batch touched, features are recomputed from their stored tiles for every
   tile from the earliest one the batch changed, and upserted into the history tables;
4. each touched entity's newest values go to Redis through the versioned writer.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from jobs import bronze
from jobs import features as transforms
from jobs.backfill import HISTORY_TABLES, STATE_TABLE, TILE_TABLES, seed_redis
from jobs.ingest import TRIGGERS, _delta_txn
from jobs.items import ITEMS_TABLE
from jobs.lib.checkpoint import CheckpointLock, CheckpointReader
from jobs.lib.session import build_spark
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
    duration_s: float = 0.0


class FeaturesStream:
    """The features query; ``start()`` returns the StreamingQuery handle."""

    def __init__(self, spark: SparkSession, config: Config, feature_set: FeatureSet,
                 watermark_seconds: int = 600, trigger: str = "processing_time",
                 trigger_interval_seconds: float = 5.0, max_files_per_trigger: Optional[int] = None,
                 checkpoint: Optional[str] = None):
        if trigger not in TRIGGERS:
            raise ValueError(f"trigger {trigger!r} is invalid; use one of {TRIGGERS}")
        self.spark = spark
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
        self._max_event_ms: Optional[int] = None
        self._app_id: Optional[str] = None
        self._items: Optional[DataFrame] = None

    def starting_version(self) -> int:
        """Return the bronze version after the last backfill; raise when no backfill ran."""
        state_path = self.config.lake.table(STATE_TABLE)
        if not DeltaTable.isDeltaTable(self.spark, state_path):
            raise FileNotFoundError(f"no feature backfill recorded at {state_path}; "
                                    "run `./spark-submit.sh backfill` first")
        row = (self.spark.read.format("delta").load(state_path)
               .where(F.col("feature_set_version") == self.feature_set.version)
               .agg(F.max("bronze_version")).first())
        if row[0] is None:
            raise FileNotFoundError(f"no backfill of feature set {self.feature_set.version} in {state_path}")
        return int(row[0]) + 1

    def start(self) -> StreamingQuery:
        """Start the query from the checkpoint, or after the last backfill when the checkpoint is new."""
        self.lock.acquire()
        try:
            version = self.starting_version()
            self._items = self.spark.read.format("delta").load(self.config.lake.table(ITEMS_TABLE))
            self._max_event_ms = self._newest_tile_ms()
            reader = (self.spark.readStream.format("delta").option("startingVersion", version)
                      # Only the ingest job's inserts land in bronze; a compaction would be skipped.
                      .option("skipChangeCommits", "true"))
            if self.max_files_per_trigger:
                reader = reader.option("maxFilesPerTrigger", self.max_files_per_trigger)
            stream = reader.load(self.config.lake.table(bronze.EVENTS_TABLE))
            writer = (stream.writeStream.queryName(QUERY_NAME).option("checkpointLocation", self.checkpoint)
                      .foreachBatch(self.process_batch))
            if self.trigger == "available_now":
                writer = writer.trigger(availableNow=True)
            else:
                writer = writer.trigger(processingTime=f"{self.trigger_interval_seconds} seconds")
            self.query = writer.start()
        except BaseException:
            self.lock.release()
            raise
        log.info("features stream started from bronze version %d, checkpoint %s, watermark %d s", version,
                 self.checkpoint, self.watermark_ms // 1000)
        return self.query

    def _newest_tile_ms(self) -> Optional[int]:
        path = self.config.lake.table(TILE_TABLES["user"])
        if not DeltaTable.isDeltaTable(self.spark, path):
            return None
        return self.spark.read.format("delta").load(path).agg(F.max("max_event_ms")).first()[0]

    def _txn_app_id(self) -> str:
        if self._app_id is None:
            self._app_id = f"streamrec-features-{self.reader.query_id()}"
        return self._app_id

    def process_batch(self, batch_df: DataFrame, batch_id: int) -> None:
        """Fold one micro-batch of bronze events into tiles, history and Redis."""
        started = time.monotonic()
        result = FeatureBatchResult(batch_id=batch_id)
        app_id = self._txn_app_id()
        events = transforms.feature_events(batch_df, self._items, self.feature_set).persist()
        try:
            watermark = None if self._max_event_ms is None else self._max_event_ms - self.watermark_ms
            result.watermark_ms = watermark
            late = F.col("event_ms") < F.lit(watermark) if watermark is not None else F.lit(False)
            row = events.agg(F.count(F.lit(1)).alias("events"), F.sum(F.when(late, 1).otherwise(0)).alias("late"),
                             F.max(F.when(~late, F.col("event_ms"))).alias("newest")).first()
            result.events, result.late = row["events"], row["late"] or 0
            on_time = events.where(~late)
            if result.events > result.late:
                for entity in ("user", "item"):
                    self._fold_entity(on_time, entity, app_id, batch_id, result)
            if row["newest"] is not None:
                self._max_event_ms = max(self._max_event_ms or 0, row["newest"])
        finally:
            events.unpersist()
        result.duration_s = time.monotonic() - started
        self.results.append(result)
        log.info("features batch %d: %d events, %d late (watermark %s), touched %s, Redis written %s kept %s, %.2f s",
                 batch_id, result.events, result.late, result.watermark_ms, result.touched, result.redis_written,
                 result.redis_kept, result.duration_s)

    def _fold_entity(self, events: DataFrame, entity: str, app_id: str, batch_id: int,
                     result: FeatureBatchResult) -> None:
        feature_set = self.feature_set
        tile_path = self.config.lake.table(TILE_TABLES[entity])
        history_path = self.config.lake.table(HISTORY_TABLES[entity])

        batch_tiles = transforms.tiles(events, entity, feature_set).persist()
        try:
            # The earliest tile the batch changes, per entity: every later tile's windows change too.
            changed = batch_tiles.groupBy("entity_id").agg(F.min("bucket_s").alias("from_bucket")).persist()
            result.touched[entity] = changed.count()
            self._add_tiles(batch_tiles, tile_path, entity, app_id, batch_id)

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
            self._upsert_history(history, history_path, app_id, batch_id)
            latest = transforms.latest_per_entity(history)
            written, kept = seed_redis(latest, self.config, feature_set, entity, backfill=False)
            result.redis_written[entity], result.redis_kept[entity] = written, kept
            history.unpersist()
            changed.unpersist()
        finally:
            batch_tiles.unpersist()

    def _add_tiles(self, batch_tiles: DataFrame, tile_path: str, entity: str, app_id: str, batch_id: int) -> None:
        columns = transforms.tile_columns(entity, self.feature_set)
        updates = {column: f"t.`{column}` + s.`{column}`" for column in columns}
        updates["max_event_ms"] = "greatest(t.max_event_ms, s.max_event_ms)"
        updates["max_ingest_ms"] = "greatest(t.max_ingest_ms, s.max_ingest_ms)"
        source = batch_tiles.withColumn("event_month", F.date_format(F.timestamp_seconds("bucket_s"), "yyyy-MM"))
        with _delta_txn(self.spark, app_id, batch_id, f"{app_id}:{batch_id}:tiles-{entity}"):
            (DeltaTable.forPath(self.spark, tile_path).alias("t")
             .merge(source.alias("s"), "t.entity_id = s.entity_id AND t.bucket_s = s.bucket_s")
             .whenMatchedUpdate(set=updates)
             .whenNotMatchedInsertAll()
             .execute())

    def _upsert_history(self, history: DataFrame, history_path: str, app_id: str, batch_id: int) -> None:
        # Recomputed rows are absolute values, so replaying this upsert leaves the same table.
        with _delta_txn(self.spark, app_id, batch_id, f"{app_id}:{batch_id}:history"):
            (DeltaTable.forPath(self.spark, history_path).alias("t")
             .merge(history.alias("s"), "t.entity_id = s.entity_id AND t.bucket_s = s.bucket_s")
             .whenMatchedUpdateAll()
             .whenNotMatchedInsertAll()
             .execute())

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


def main(argv: Optional[list[str]] = None, spark: Optional[SparkSession] = None) -> int:
    parser = argparse.ArgumentParser(prog="features-stream", description="Streaming features from bronze.")
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml)")
    parser.add_argument("--trigger", choices=TRIGGERS, default="processing_time")
    parser.add_argument("--trigger-interval-seconds", type=float, default=5.0)
    parser.add_argument("--watermark-seconds", type=int, default=600,
                        help="events older than the newest event time seen minus this are late")
    args = parser.parse_args(argv)
    config = load_config(args.env)
    log_config(config, log)
    spark = spark or build_spark(config, "streamrec-features-stream")
    stream = FeaturesStream(spark, config, load_feature_set(), args.watermark_seconds, args.trigger,
                            args.trigger_interval_seconds)
    try:
        query = stream.start()
    except FileNotFoundError as error:
        log.error("features stream did not start: %s", error)
        return 2
    try:
        query.awaitTermination()
        if query.exception() is not None:
            log.error("features stream failed: %s", query.exception())
            return 1
    finally:
        stream.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
