"""Parity check: recompute the features from bronze in batch and compare with what is stored.

    ./spark-submit.sh parity          # exit 0 when Delta history and Redis match the recomputation

Compares, feature by feature, the stored history tables (written by the backfill and the stream)
with a recomputation over the same bronze events, each entity's Redis vector with its newest
recomputed row, and the popularity and consumed sets with theirs. Values match when both are
missing (NaN) or when they differ by at most ``TOLERANCE`` relative (1e-6, a few float32 ulps: the stream sums fewer tiles than the batch, so
rounding can differ in the last bit). Holds on input with no event beyond the stream's
watermark; late events are corrected by the next backfill, not by the stream.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Optional

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs import bronze
from jobs import features as transforms
from jobs.backfill import HISTORY_TABLES
from jobs.items import ITEMS_TABLE
from jobs.lib.redis_writer import connect
from jobs.lib.session import build_spark
from reccore.config import Config, load_config
from reccore.features import FeatureSet, load_feature_set
from reccore.store import KeyLayout, unpack

log = logging.getLogger("jobs.parity")

TOLERANCE = 1e-6


@dataclass
class ParityReport:
    """Differences between stored and recomputed features of one entity type."""

    entity: str
    rows_expected: int = 0
    missing_rows: int = 0
    extra_rows: int = 0
    mismatched_values: int = 0
    redis_checked: int = 0
    redis_mismatched: int = 0
    examples: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_rows or self.extra_rows or self.mismatched_values or self.redis_mismatched)


def _events(spark: SparkSession, config: Config, feature_set: FeatureSet) -> DataFrame:
    return transforms.feature_events(spark.read.format("delta").load(config.lake.table(bronze.EVENTS_TABLE)),
                                     spark.read.format("delta").load(config.lake.table(ITEMS_TABLE)), feature_set)


def recompute(spark: SparkSession, config: Config, feature_set: FeatureSet, entity: str) -> DataFrame:
    """Return the feature history of ``entity`` recomputed from all of bronze."""
    events = _events(spark, config, feature_set)
    return transforms.window_features(transforms.tiles(events, entity, feature_set), entity, feature_set)


def compare_sets(spark: SparkSession, config: Config, feature_set: FeatureSet, report: ParityReport) -> None:
    """Compare the popularity sorted sets and the users' consumed sets with a recomputation from bronze.

    Popularity is recomputed as of the event time stored with it in Redis. Consumed sets hold every
    event, late ones included, so they must equal bronze exactly.
    """
    layout = KeyLayout(config.redis.key_prefix, feature_set.version)
    client = connect(config.redis)
    events = _events(spark, config, feature_set)
    try:
        as_of = client.get(layout.popularity_as_of())
        if as_of is None:
            report.redis_mismatched += 1
            report.examples.append({"popularity": "missing"})
        else:
            item_tiles = transforms.tiles(events, "item", feature_set)
            rows = transforms.popularity_from_tiles(item_tiles, int(as_of), feature_set).collect()
            for window in feature_set.windows:
                expected = {row["entity_id"]: float(row[window]) for row in rows if row[window]}
                stored = {member.decode(): score
                          for member, score in client.zrange(layout.popularity(window), 0, -1, withscores=True)}
                report.redis_checked += 1
                if stored != expected:
                    report.redis_mismatched += 1
                    differing = sorted(set(stored.items()) ^ set(expected.items()))[:3]
                    report.examples.append({"popularity": window, "differing": differing})
        consumed = events.groupBy("user_id").agg(F.collect_set("item_id").alias("items")).collect()
        for start in range(0, len(consumed), 500):
            chunk = consumed[start:start + 500]
            pipeline = client.pipeline(transaction=False)
            for row in chunk:
                pipeline.smembers(layout.consumed(row["user_id"]))
            for row, members in zip(chunk, pipeline.execute()):
                report.redis_checked += 1
                if {member.decode() for member in members} != set(row["items"]):
                    report.redis_mismatched += 1
                    if len(report.examples) < 6:
                        report.examples.append({"consumed": row["user_id"]})
    finally:
        client.close()


def _differs(column: str):
    expected, actual = F.col(f"e.`{column}`"), F.col(f"a.`{column}`")
    both_missing = F.isnan(expected) & F.isnan(actual)
    close = F.abs(expected - actual) <= F.lit(TOLERANCE) * F.greatest(F.abs(expected), F.lit(1.0))
    return ~(both_missing | close)


def compare_history(expected: DataFrame, actual: DataFrame, feature_set: FeatureSet, entity: str,
                    report: ParityReport) -> None:
    """Count rows missing on either side and rows whose features or stamps differ."""
    names = feature_set.names(entity)
    keys = ["entity_id", "bucket_s"]
    joined = expected.alias("e").join(actual.alias("a"), keys, "full_outer")
    report.rows_expected = expected.count()
    report.missing_rows = joined.where(F.col("a.event_time").isNull()).count()
    report.extra_rows = joined.where(F.col("e.event_time").isNull()).count()

    both = joined.where(F.col("a.event_time").isNotNull() & F.col("e.event_time").isNotNull())
    checks = [_differs(name) for name in names]
    checks += [F.col("e.events_counted") != F.col("a.events_counted"), F.col("e.event_time") != F.col("a.event_time"),
               F.col("e.ingest_time") != F.col("a.ingest_time")]
    any_difference = checks[0]
    for check in checks[1:]:
        any_difference = any_difference | check
    different = both.where(any_difference)
    report.mismatched_values = different.count()
    for row in different.select(*keys, *[F.col(f"e.`{name}`").alias(f"expected_{name}") for name in names[:3]],
                                *[F.col(f"a.`{name}`").alias(f"actual_{name}") for name in names[:3]]).limit(3).collect():
        report.examples.append(row.asDict())


def compare_redis(latest: DataFrame, config: Config, feature_set: FeatureSet, entity: str,
                  report: ParityReport) -> None:
    """Compare each entity's Redis vector and stamp with its newest recomputed row."""
    names = feature_set.names(entity)
    layout = KeyLayout(config.redis.key_prefix, feature_set.version)
    client = connect(config.redis)
    rows = latest.select("entity_id", "event_time", "events_counted", *names).collect()
    for start in range(0, len(rows), 1000):
        chunk = rows[start:start + 1000]
        for row, packed in zip(chunk, client.mget([layout.vector(entity, row["entity_id"]) for row in chunk])):
            report.redis_checked += 1
            if packed is None:
                report.redis_mismatched += 1
                report.examples.append({"entity_id": row["entity_id"], "redis": "missing"})
                continue
            stamp, values = unpack(packed, len(names))
            same = stamp.events_counted == row["events_counted"] and all(
                (math.isnan(value) and math.isnan(row[name])) or
                abs(value - row[name]) <= TOLERANCE * max(abs(row[name]), 1.0)
                for name, value in zip(names, values))
            if not same:
                report.redis_mismatched += 1
                if len(report.examples) < 6:
                    report.examples.append({"entity_id": row["entity_id"], "redis_stamp": str(stamp)})
    client.close()


def check(spark: SparkSession, config: Config, feature_set: FeatureSet) -> list[ParityReport]:
    """Run the parity check for users and items."""
    reports = []
    for entity in ("user", "item"):
        report = ParityReport(entity)
        expected = recompute(spark, config, feature_set, entity).persist()
        actual = spark.read.format("delta").load(config.lake.table(HISTORY_TABLES[entity])).drop("event_month")
        compare_history(expected, actual, feature_set, entity, report)
        compare_redis(transforms.latest_per_entity(expected), config, feature_set, entity, report)
        expected.unpersist()
        log.info("parity %s: %s", entity, report)
        reports.append(report)
    report = ParityReport("sets")
    compare_sets(spark, config, feature_set, report)
    log.info("parity popularity and consumed sets: %s", report)
    reports.append(report)
    return reports


def main(argv: Optional[list[str]] = None, spark: Optional[SparkSession] = None) -> int:
    parser = argparse.ArgumentParser(prog="parity", description="Compare stored features with a batch recomputation.")
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml)")
    args = parser.parse_args(argv)
    config = load_config(args.env)
    spark = spark or build_spark(config, "streamrec-parity")
    reports = check(spark, config, load_feature_set())
    return 0 if all(report.ok for report in reports) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
