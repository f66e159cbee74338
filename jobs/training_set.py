"""Point-in-time training set: labelled events joined with the features knowable just before them.

    ./spark-submit.sh training-set [--ingest-cutoff 2026-12-01T00:00:00Z] [--dry-run]

1. Labels come from bronze by the rules in ``training`` (for MovieLens: a rating of 5 is
   relevance 2, of 4 or 4.5 relevance 1, below 4 relevance 0). For each positive,
   ``negatives_per_positive`` items are sampled by popularity (seeded) among the items the user
   had not touched by the label's time. Sampled negatives get relevance 0.
2. Each example takes the user's and the item's feature row as of strictly before its second:
   the newest history row whose second is earlier than the label's second (events in the same
   second are not visible) and whose ingest time is no later than the label's own ingest time and
   the build's ingest cut-off. A value recomputed later (a backfill that folded in a late event, a
   correction) carries a later ingest time, so it never reaches an earlier label.
3. The result is written to ``gold/training_examples`` (overwritten), with the bronze version,
   the history versions and the cut-off in the commit's user metadata.

Feature columns keep the float32 values the history tables store, which are the values the scorer
reads from Redis.
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

import numpy as np
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs import bronze
from jobs.backfill import HISTORY_TABLES
from jobs.items import ITEMS_TABLE
from jobs.lib.session import build_spark
from jobs.lib.streaming import USER_METADATA_CONF
from reccore.config import Config, TrainingConfig, load_config, log_config
from reccore.features import FeatureSet, load_feature_set

log = logging.getLogger("jobs.training_set")

TRAINING_TABLE = "gold/training_examples"
# Draws per sampled negative wanted, before the user's own items and repeats are dropped.
OVERSAMPLE = 4


@dataclass
class TrainingSetResult:
    """Outcome of one build: the table version written, its counts and its inputs."""

    version: int
    examples: int
    positives: int
    sampled_negatives: int
    bronze_version: int
    history_versions: dict
    ingest_cutoff_ms: int
    duration_s: float


def relevance_column(settings: TrainingConfig) -> F.Column:
    """Return the relevance of an event by the configured rules, or null when the event is not labelled."""
    rating = F.col("value")
    by_rating = F.lit(0)
    for threshold, relevance in sorted(((float(key), int(value)) for key, value in settings.relevance_by_rating.items())):
        by_rating = F.when(rating >= F.lit(threshold), F.lit(relevance)).otherwise(by_rating)
    return (F.when((F.col("event_type") == "rating") & rating.isNotNull(), by_rating)
            .when(F.col("event_type").isin(list(settings.positive_event_types) or [""]), F.lit(1))
            .when(F.col("event_type").isin(list(settings.negative_event_types) or [""]), F.lit(0)))


def labelled_events(events: DataFrame, settings: TrainingConfig) -> DataFrame:
    """Return the labelled events: example_id, user_id, item_id, label_ms, label_ingest_ms, relevance, source."""
    return (events
            .select(F.col("event_id").alias("example_id"), "user_id", "item_id",
                    (F.unix_micros("event_time") / 1000).cast("long").alias("label_ms"),
                    (F.unix_micros("ingest_time") / 1000).cast("long").alias("label_ingest_ms"),
                    relevance_column(settings).alias("relevance"))
            .where(F.col("relevance").isNotNull())
            .withColumn("source", F.lit("event")))


def sample_negatives(spark: SparkSession, events: DataFrame, labels: DataFrame, settings: TrainingConfig) -> DataFrame:
    """Return sampled negatives: for each positive, items by popularity the user had not touched by then.

    Popularity is each item's share of all events. Each positive draws ``OVERSAMPLE`` times the
    items it needs, seeded, so a rebuild gives the same sample. Draws of an item the user had
    touched at or before the label's time are dropped, and so are repeats. The first draws left
    are kept. A user who had touched nearly every popular item may still get fewer (the build logs the
    count).
    """
    per_positive = settings.negatives_per_positive
    if per_positive <= 0:
        return labels.limit(0)
    popularity = events.groupBy("item_id").count().orderBy("item_id").collect()
    if not popularity:
        return labels.limit(0)
    items = np.array([row["item_id"] for row in popularity], dtype=object)
    weights = np.array([row["count"] for row in popularity], dtype=np.float64)
    positives = (labels.where(F.col("relevance") > 0)
                 .select("example_id", "user_id", "label_ms", "label_ingest_ms").orderBy("example_id").collect())
    generator = np.random.default_rng(settings.seed)
    whole, fraction = int(per_positive), per_positive - int(per_positive)
    counts = whole + (generator.random(len(positives)) < fraction)
    draws = generator.choice(len(items), size=int(counts.sum()) * OVERSAMPLE, p=weights / weights.sum())
    rows, cursor = [], 0
    for positive, count in zip(positives, counts):
        for draw in range(count * OVERSAMPLE):
            rows.append((positive["example_id"], draw, int(count), positive["user_id"], str(items[draws[cursor]]),
                         positive["label_ms"], positive["label_ingest_ms"]))
            cursor += 1
    sampled = spark.createDataFrame(rows, "positive_id string, draw int, wanted int, user_id string, item_id string, "
                                          "label_ms long, label_ingest_ms long")
    touched = (events.groupBy("user_id", "item_id")
               .agg((F.min(F.unix_micros("event_time")) / 1000).cast("long").alias("first_touch_ms")))
    first_draw = Window.partitionBy("positive_id", "item_id").orderBy("draw")
    in_order = Window.partitionBy("positive_id").orderBy("draw")
    return (sampled.join(touched, ["user_id", "item_id"], "left")
            .where(F.col("first_touch_ms").isNull() | (F.col("first_touch_ms") > F.col("label_ms")))
            .withColumn("_repeat", F.row_number().over(first_draw)).where("_repeat = 1")
            .withColumn("_rank", F.row_number().over(in_order)).where(F.col("_rank") <= F.col("wanted"))
            .select(F.concat("positive_id", F.lit("~neg"), (F.col("_rank") - 1).cast("string")).alias("example_id"),
                    "user_id", "item_id", "label_ms", "label_ingest_ms")
            .withColumn("relevance", F.lit(0)).withColumn("source", F.lit("sampled")))


def features_as_of(keys: DataFrame, history: DataFrame, names: list[str], prefix: str,
                   ingest_cutoff_ms: int) -> DataFrame:
    """Return, per key, the entity's feature row as of strictly before the key's second.

    ``keys`` has key_id, entity_id, at_ms and ingest_limit_ms; ``history`` is a history table. The
    row taken is the newest one whose second is before ``at_ms``'s second and whose ingest time is
    at most both ``ingest_limit_ms`` and ``ingest_cutoff_ms``. Keys without such a row get nulls.
    Output: key_id, ``{prefix}newest_ms``, ``{prefix}ingest_ms``, then ``names``.
    """
    rows = (history.select("entity_id", "bucket_s",
                           (F.unix_micros("event_time") / 1000).cast("long").alias("newest_ms"),
                           (F.unix_micros("ingest_time") / 1000).cast("long").alias("ingest_ms"), *names)
            .where(F.col("ingest_ms") <= F.lit(ingest_cutoff_ms)))
    # Keys sort before history rows of the same second, so a row of the label's own second is not visible.
    stacked = (keys.select("key_id", "entity_id", F.floor(F.col("at_ms") / 1000).cast("long").alias("second"),
                           F.lit(0).alias("kind"), F.lit(None).cast("struct<bucket_s:long,ingest_ms:long>").alias("row"))
               .unionByName(rows.select(F.lit(None).cast("string").alias("key_id"), "entity_id",
                                        F.col("bucket_s").alias("second"), F.lit(1).alias("kind"),
                                        F.struct("bucket_s", "ingest_ms").alias("row"))))
    before = (Window.partitionBy("entity_id").orderBy("second", "kind")
              .rowsBetween(Window.unboundedPreceding, -1))
    candidates = (stacked.withColumn("previous", F.last("row", ignorenulls=True).over(before))
                  .where(F.col("kind") == 0)
                  .select("key_id", "entity_id", "second", F.col("previous.bucket_s").alias("row_second"),
                          F.col("previous.ingest_ms").alias("row_ingest_ms"))
                  .join(keys.select("key_id", "ingest_limit_ms"), "key_id"))
    in_time = (candidates.where(F.col("row_ingest_ms").isNull() | (F.col("row_ingest_ms") <= F.col("ingest_limit_ms")))
               .select("key_id", "entity_id", "row_second"))
    # The newest row was ingested after the label (a recomputation that folded in a late event, say):
    # it hides the row that was knowable then, so those few keys are looked up among earlier rows.
    recomputed = candidates.where(F.col("row_ingest_ms") > F.col("ingest_limit_ms"))
    newest_first = Window.partitionBy("key_id").orderBy(F.col("bucket_s").desc())
    earlier = (recomputed.select("key_id", "entity_id", "second", "ingest_limit_ms")
               .join(rows.select("entity_id", "bucket_s", "ingest_ms"), "entity_id")
               .where((F.col("bucket_s") < F.col("second")) & (F.col("ingest_ms") <= F.col("ingest_limit_ms")))
               .withColumn("_rank", F.row_number().over(newest_first))
               .where("_rank = 1")
               .select("key_id", "entity_id", F.col("bucket_s").alias("row_second")))
    without_row = (recomputed.join(earlier.select("key_id"), "key_id", "left_anti")
                   .select("key_id", "entity_id", F.lit(None).cast("long").alias("row_second")))
    chosen = in_time.unionByName(earlier).unionByName(without_row)
    values = rows.select("entity_id", F.col("bucket_s").alias("row_second"), "newest_ms", "ingest_ms", *names)
    return (chosen.join(values, ["entity_id", "row_second"], "left")
            .select("key_id", F.col("newest_ms").alias(f"{prefix}newest_ms"),
                    F.col("ingest_ms").alias(f"{prefix}ingest_ms"), *names))


def build_training_set(spark: SparkSession, config: Config, feature_set: FeatureSet,
                       ingest_cutoff_ms: Optional[int] = None) -> TrainingSetResult:
    """Build and write ``gold/training_examples``; return what was written and from which versions."""
    started = time.monotonic()
    settings = config.training
    cutoff_ms = ingest_cutoff_ms if ingest_cutoff_ms is not None else int(time.time() * 1000)
    events_path = config.lake.table(bronze.EVENTS_TABLE)
    bronze_version = DeltaTable.forPath(spark, events_path).history(1).first()["version"]
    events = (spark.read.format("delta").option("versionAsOf", bronze_version).load(events_path)
              .where(F.unix_micros("ingest_time") / 1000 <= F.lit(cutoff_ms)))
    history_versions, histories = {}, {}
    for entity, table in HISTORY_TABLES.items():
        path = config.lake.table(table)
        if not DeltaTable.isDeltaTable(spark, path):
            raise FileNotFoundError(f"no feature history at {path}; run `./spark-submit.sh backfill` first")
        history_versions[entity] = DeltaTable.forPath(spark, path).history(1).first()["version"]
        histories[entity] = spark.read.format("delta").option("versionAsOf", history_versions[entity]).load(path)

    labels = labelled_events(events, settings).persist()
    negatives = sample_negatives(spark, events, labels, settings)
    examples = labels.unionByName(negatives).persist()
    counts = examples.groupBy("source").agg(F.count(F.lit(1)).alias("n"),
                                            F.sum(F.when(F.col("relevance") > 0, 1).otherwise(0)).alias("positive")).collect()
    by_source = {row["source"]: row for row in counts}
    positives = by_source["event"]["positive"] if "event" in by_source else 0
    sampled = by_source["sampled"]["n"] if "sampled" in by_source else 0
    log.info("training set: %d labelled events (%d positive), %d sampled negatives (%.2f per positive asked)",
             by_source["event"]["n"] if "event" in by_source else 0, positives, sampled,
             settings.negatives_per_positive)

    joined = examples
    for entity, column in (("user", "user_id"), ("item", "item_id")):
        keys = examples.select(F.col("example_id").alias("key_id"), F.col(column).alias("entity_id"),
                               F.col("label_ms").alias("at_ms"), F.col("label_ingest_ms").alias("ingest_limit_ms"))
        as_of = features_as_of(keys, histories[entity], feature_set.names(entity), f"{entity}_", cutoff_ms)
        joined = joined.join(as_of.withColumnRenamed("key_id", "example_id"), "example_id", "left")
    items = spark.read.format("delta").load(config.lake.table(ITEMS_TABLE))
    codes = {category: code for code, category in enumerate(feature_set.categories)}
    code_map = F.create_map(*[part for category, code in codes.items() for part in (F.lit(category), F.lit(code))])
    item_codes = items.select("item_id", F.filter(F.transform("genres", lambda genre: code_map[genre]),
                                                  lambda code: code.isNotNull()).alias("item_category_codes"))
    joined = (joined.join(item_codes, "item_id", "left")
              .withColumn("item_category_codes", F.coalesce("item_category_codes", F.array().cast("array<int>")))
              .withColumn("label_month", F.date_format(F.timestamp_millis("label_ms"), "yyyy-MM")))

    metadata = json.dumps({"bronze_version": bronze_version, "history_versions": history_versions,
                           "ingest_cutoff_ms": cutoff_ms, "feature_set_version": feature_set.version})
    path = config.lake.table(TRAINING_TABLE)
    spark.conf.set(USER_METADATA_CONF, metadata)
    try:
        (joined.repartition(2).write.format("delta").mode("overwrite").option("overwriteSchema", "true")
         .save(path))
    finally:
        spark.conf.unset(USER_METADATA_CONF)
    version = DeltaTable.forPath(spark, path).history(1).first()["version"]
    total = spark.read.format("delta").option("versionAsOf", version).load(path).count()
    labels.unpersist()
    examples.unpersist()
    result = TrainingSetResult(version, total, positives, sampled, bronze_version, history_versions, cutoff_ms,
                               time.monotonic() - started)
    log.info("training set written to %s version %d: %d examples in %.1f s", path, version, total, result.duration_s)
    return result


def parse_instant_ms(text: str) -> int:
    """Return the epoch milliseconds of an ISO-8601 instant (UTC when it has no offset)."""
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as error:
        raise ValueError(f"ingest cut-off {text!r} is not an ISO-8601 instant such as 2026-12-01T00:00:00Z") from error
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp() * 1000)


def main(argv: Optional[list[str]] = None, spark: Optional[SparkSession] = None) -> int:
    parser = argparse.ArgumentParser(prog="training-set", description="Build the point-in-time training set.")
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml)")
    parser.add_argument("--ingest-cutoff", default=None,
                        help="leave out what was ingested after this ISO-8601 instant (default: training.ingest_cutoff, "
                             "or now when that is empty)")
    parser.add_argument("--dry-run", action="store_true", help="print the inputs and the output path, write nothing")
    args = parser.parse_args(argv)
    config = load_config(args.env)
    log_config(config, log)
    text = args.ingest_cutoff or config.training.ingest_cutoff
    try:
        cutoff_ms = parse_instant_ms(text) if text else None
    except ValueError as error:
        log.error("%s", error)
        return 2
    if args.dry_run:
        log.info("dry run: would read %s and %s, write %s, ingest cut-off %s", config.lake.table(bronze.EVENTS_TABLE),
                 ", ".join(config.lake.table(table) for table in HISTORY_TABLES.values()),
                 config.lake.table(TRAINING_TABLE), text or "the start of the build")
        return 0
    spark = spark or build_spark(config, "streamrec-training-set")
    try:
        build_training_set(spark, config, load_feature_set(), cutoff_ms)
    except FileNotFoundError as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
