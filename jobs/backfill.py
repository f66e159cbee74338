"""Feature backfill: the feature definitions as a batch job over bronze, into Delta and Redis.

    ./spark-submit.sh backfill                              # all of bronze
    ./spark-submit.sh backfill --from 2015-01-01 --to 2016-01-01

Bulk history always goes this way. It reads one bronze version (recorded in
``silver/feature_backfills``, so the streaming job can continue after it), builds the tiles and the
feature history of users and items, and seeds Redis in bulk with each entity's newest values.
Redis writes carry the backfill flag, so a backfill replaces values with the same stamp (it may
include late events the stream left out) but never a value that is newer.

A range rebuilds the history rows whose event time lies in [from, to), reading the events of the
longest window before ``from`` as well, so windows that reach back across the boundary are whole.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs import bronze
from jobs import features as transforms
from jobs.items import ITEMS_TABLE
from jobs.lib.session import build_spark
from reccore.config import Config, load_config, log_config
from reccore.features import FeatureSet, load_feature_set
from reccore.store import KeyLayout, Stamp

log = logging.getLogger("jobs.backfill")

HISTORY_TABLES = {"user": "silver/user_features", "item": "silver/item_features"}
TILE_TABLES = {"user": "silver/user_tiles", "item": "silver/item_tiles"}
STATE_TABLE = "silver/feature_backfills"


@dataclass
class BackfillResult:
    """Counts and timing of one backfill run."""

    bronze_version: int
    events: int
    history_rows: dict
    redis_written: dict
    redis_kept: dict
    duration_s: float


def _ms(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp() * 1000)


def _write_entities(rows, config: Config, feature_set: FeatureSet, entity: str, backfill: bool) -> list:
    """Write one partition of latest rows to Redis (runs on the executors)."""
    from jobs.lib.redis_writer import EntityValues, FeatureWriter, connect

    client = connect(config.redis)
    names = feature_set.names(entity)
    writer = FeatureWriter(client, KeyLayout(config.redis.key_prefix, feature_set.version), entity, names,
                           config.redis.ttl_seconds, readable_hash=config.redis.readable_hash)
    batch = (EntityValues(row["entity_id"],
                          Stamp(int(row["event_time"].replace(tzinfo=timezone.utc).timestamp() * 1000),
                                int(row["events_counted"]),
                                int(row["ingest_time"].replace(tzinfo=timezone.utc).timestamp() * 1000)),
                          [row[name] for name in names])
             for row in rows)
    written, kept = writer.write(batch, backfill=backfill)
    client.close()
    return [(written, kept)]


def seed_redis(latest: DataFrame, config: Config, feature_set: FeatureSet, entity: str,
               backfill: bool = True) -> tuple[int, int]:
    """Write each entity's newest values to Redis from the executors; return (written, kept)."""
    results = latest.rdd.mapPartitions(
        lambda rows: _write_entities(rows, config, feature_set, entity, backfill)).collect()
    return sum(result[0] for result in results), sum(result[1] for result in results)


def write_popularity(spark: SparkSession, config: Config, feature_set: FeatureSet, as_of_ms: int) -> bool:
    """Replace the popularity sorted sets from the stored item tiles, as of ``as_of_ms``; return whether replaced.

    Kept when Redis has popularity as of a later event time (a backfill of an older range).
    """
    from jobs.lib.redis_writer import connect, replace_popularity

    first_month = datetime.fromtimestamp((as_of_ms - feature_set.longest_window_seconds * 1000) / 1000,
                                         timezone.utc).strftime("%Y-%m")
    item_tiles = (spark.read.format("delta").load(config.lake.table(TILE_TABLES["item"]))
                  .where(F.col("event_month") >= first_month))
    rows = transforms.popularity_from_tiles(item_tiles, as_of_ms, feature_set).collect()
    counts = {window: {row["entity_id"]: row[window] for row in rows if row[window]} for window in feature_set.windows}
    client = connect(config.redis)
    try:
        replaced = replace_popularity(client, KeyLayout(config.redis.key_prefix, feature_set.version), as_of_ms,
                                      counts, config.redis.ttl_seconds)
    finally:
        client.close()
    log.info("popularity as of %d: %d items in the longest window, %s", as_of_ms, len(rows),
             "replaced" if replaced else "kept (Redis holds a later one)")
    return replaced


def write_consumed(events: DataFrame, config: Config, feature_set: FeatureSet) -> int:
    """Add each user's items in ``events`` to their consumed set and return the number of users."""
    from jobs.lib.redis_writer import add_consumed, connect

    rows = events.groupBy("user_id").agg(F.collect_set("item_id").alias("items")).collect()
    client = connect(config.redis)
    try:
        add_consumed(client, KeyLayout(config.redis.key_prefix, feature_set.version),
                     {row["user_id"]: row["items"] for row in rows}, config.redis.ttl_seconds)
    finally:
        client.close()
    return len(rows)


def write_manifest(config: Config, feature_set: FeatureSet) -> None:
    from jobs.lib.redis_writer import connect

    client = connect(config.redis)
    try:
        client.set(KeyLayout(config.redis.key_prefix, feature_set.version).manifest(),
                   json.dumps(feature_set.manifest(), sort_keys=True))
    finally:
        client.close()


def run_backfill(spark: SparkSession, config: Config, feature_set: FeatureSet,
                 start_ms: Optional[int] = None, end_ms: Optional[int] = None) -> BackfillResult:
    """Backfill features from the current bronze version over [start_ms, end_ms) (all when None)."""
    started = time.monotonic()
    events_path = config.lake.table(bronze.EVENTS_TABLE)
    items_path = config.lake.table(ITEMS_TABLE)
    if not DeltaTable.isDeltaTable(spark, items_path):
        raise FileNotFoundError(f"no item table at {items_path}; run `./spark-submit.sh items` first")
    version = DeltaTable.forPath(spark, events_path).history(1).first()["version"]
    bronze_df = spark.read.format("delta").option("versionAsOf", version).load(events_path)

    lookback_ms = feature_set.longest_window_seconds * 1000
    if start_ms is not None:
        bronze_df = bronze_df.where(F.col("event_time") >= F.timestamp_millis(F.lit(start_ms - lookback_ms)))
    if end_ms is not None:
        bronze_df = bronze_df.where(F.col("event_time") < F.timestamp_millis(F.lit(end_ms)))
    items = spark.read.format("delta").load(items_path)
    events = transforms.feature_events(bronze_df, items, feature_set).persist()
    event_count = events.count()
    log.info("backfill: %d events from bronze version %d (%s to %s)", event_count, version, start_ms, end_ms)

    history_rows, written, kept = {}, {}, {}
    for entity in ("user", "item"):
        tile_df = transforms.tiles(events, entity, feature_set)
        history = transforms.window_features(tile_df, entity, feature_set)
        if start_ms is not None:
            tile_df = tile_df.where(F.col("bucket_s") >= start_ms // 1000)
            history = history.where(F.col("bucket_s") >= start_ms // 1000)
        _overwrite(tile_df.withColumn("event_month", F.date_format(F.timestamp_seconds("bucket_s"), "yyyy-MM")),
                   config.lake.table(TILE_TABLES[entity]), start_ms, end_ms, "bucket_s", 1000)
        history = history.withColumn("event_month", F.date_format("event_time", "yyyy-MM"))
        history_path = config.lake.table(HISTORY_TABLES[entity])
        _overwrite(history, history_path, start_ms, end_ms, "bucket_s", 1000)

        stored = spark.read.format("delta").load(history_path)
        history_rows[entity] = stored.count()
        written[entity], kept[entity] = seed_redis(transforms.latest_per_entity(stored), config, feature_set, entity)
        log.info("backfill: %s history %d rows; Redis %d written, %d kept (newer values already there)",
                 entity, history_rows[entity], written[entity], kept[entity])

    as_of_ms = events.agg(F.max("event_ms")).first()[0]
    if as_of_ms is not None:
        write_popularity(spark, config, feature_set, as_of_ms)
        write_consumed(events, config, feature_set)
    write_manifest(config, feature_set)
    events.unpersist()

    state = spark.createDataFrame(
        [(version, start_ms, end_ms, feature_set.version, as_of_ms,
          datetime.now(timezone.utc).replace(tzinfo=None))],
        "bronze_version long, start_ms long, end_ms long, feature_set_version string, max_event_ms long, "
        "finished_at timestamp")
    state.write.format("delta").mode("append").save(config.lake.table(STATE_TABLE))
    result = BackfillResult(version, event_count, history_rows, written, kept, time.monotonic() - started)
    log.info("backfill finished in %.1f s: %s", result.duration_s, result)
    return result


def _overwrite(frame: DataFrame, path: str, start_ms: Optional[int], end_ms: Optional[int],
               column: str, divisor: int) -> None:
    writer = frame.write.format("delta").partitionBy("event_month")
    if start_ms is None and end_ms is None:
        writer.mode("overwrite").option("overwriteSchema", "true").save(path)
        return
    conditions = []
    if start_ms is not None:
        conditions.append(f"{column} >= {start_ms // divisor}")
    if end_ms is not None:
        conditions.append(f"{column} < {end_ms // divisor}")
    writer.mode("overwrite").option("replaceWhere", " AND ".join(conditions)).save(path)


def main(argv: Optional[list[str]] = None, spark: Optional[SparkSession] = None) -> int:
    parser = argparse.ArgumentParser(prog="backfill", description="Backfill features from bronze into Delta and Redis.")
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml)")
    parser.add_argument("--from", dest="start", help="first event time to rebuild (ISO-8601, UTC if no offset)")
    parser.add_argument("--to", dest="end", help="event time to stop before (ISO-8601)")
    args = parser.parse_args(argv)
    config = load_config(args.env)
    log_config(config, log)
    feature_set = load_feature_set()
    spark = spark or build_spark(config, "streamrec-backfill")
    try:
        run_backfill(spark, config, feature_set, _ms(args.start), _ms(args.end))
    except FileNotFoundError as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
