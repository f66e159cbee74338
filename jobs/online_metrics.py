"""Online accuracy: precision@k and recall@k of what the scorer served, on the event-time clock.

    ./spark-submit.sh online-metrics [--k 10] [--horizon-seconds 604800] [--include-fallbacks]

A served list (``served/recommendations``, written by served-ingest) is judged against the user's
positive events, by training's relevance rules: a rating of 4 or more, or a positive event type.
An event counts when its event time is after the stream's event-time clock at serving time, and at
most ``monitoring.online_horizon_seconds`` after it. Because the clock is event time, a replay of
old history is measured the same way as live traffic. For each served list with at least one such
positive:

    precision@k = |top k ∩ later positives| / k
    recall@k    = |top k ∩ later positives| / |later positives|

Lists with no later positive cannot measure accuracy, so they are left out (counted in the log). A user
served several times counts once: their lists are averaged first, then the users. Fallback lists
(popularity) are left out unless ``--include-fallbacks``. The result, overall and per model
version, is appended to ``gold/online_metrics``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs import bronze
from jobs.served_ingest import SERVED_TABLE
from jobs.training_set import relevance_column
from reccore.config import Config, load_config, log_config

log = logging.getLogger("jobs.online_metrics")

METRICS_TABLE = "gold/online_metrics"
ALL_VERSIONS = "all"


@dataclass(frozen=True)
class OnlineMetrics:
    """Online precision and recall of one model version (or ``all``)."""

    model_version: str
    k: int
    horizon_seconds: int
    users: int
    lists: int
    precision_at_k: Optional[float]
    recall_at_k: Optional[float]


def positive_events(events: DataFrame, config: Config) -> DataFrame:
    """Return the positive events: user_id, item_id, event_ms."""
    return (events.select("user_id", "item_id", (F.unix_micros("event_time") / 1000).cast("long").alias("event_ms"),
                          relevance_column(config.training).alias("relevance"))
            .where(F.col("relevance") > 0)
            .select("user_id", "item_id", "event_ms"))


def judged_lists(served: DataFrame, positives: DataFrame, k: int, horizon_ms: int) -> DataFrame:
    """Return one row per served list with later positives: request_id, user_id, model_version, hits, relevant."""
    lists = served.select("request_id", "user_id", "model_version", "event_time_ms",
                          F.slice("items", 1, k).alias("top"))
    later = (lists.join(positives, "user_id")
             .where((F.col("event_ms") > F.col("event_time_ms"))
                    & (F.col("event_ms") <= F.col("event_time_ms") + F.lit(horizon_ms)))
             .select("request_id", "item_id", F.array_contains("top", F.col("item_id")).alias("hit"))
             .distinct())
    per_list = later.groupBy("request_id").agg(F.count(F.lit(1)).alias("relevant"),
                                               F.sum(F.col("hit").cast("int")).alias("hits"))
    return lists.join(per_list, "request_id").select("request_id", "user_id", "model_version", "hits", "relevant")


def summarise(judged: DataFrame, k: int, horizon_s: int, version: str) -> OnlineMetrics:
    """Return the user-averaged precision@k and recall@k of ``judged`` lists."""
    per_user = (judged.groupBy("user_id")
                .agg(F.avg(F.col("hits") / F.lit(k)).alias("precision"),
                     F.avg(F.col("hits") / F.col("relevant")).alias("recall"),
                     F.count(F.lit(1)).alias("lists")))
    row = per_user.agg(F.count(F.lit(1)).alias("users"), F.sum("lists").alias("lists"),
                       F.avg("precision").alias("precision"), F.avg("recall").alias("recall")).first()
    return OnlineMetrics(version, k, horizon_s, int(row["users"]), int(row["lists"] or 0), row["precision"],
                         row["recall"])


def compute_online_metrics(spark: SparkSession, config: Config, k: Optional[int] = None,
                           horizon_s: Optional[int] = None, include_fallbacks: Optional[bool] = None,
                           write: bool = True) -> list[OnlineMetrics]:
    """Return online metrics overall (first) and per model version; append them to gold/online_metrics."""
    settings = config.monitoring
    k = k or settings.online_k
    horizon_s = horizon_s or settings.online_horizon_seconds
    include_fallbacks = settings.online_include_fallbacks if include_fallbacks is None else include_fallbacks
    if k < 1 or horizon_s < 1:
        raise ValueError(f"k {k} and horizon {horizon_s} s must be at least 1")
    served_path = config.lake.table(SERVED_TABLE)
    try:
        served = spark.read.format("delta").load(served_path)
    except Exception as error:  # noqa: BLE001 - Spark's AnalysisException when the table is missing
        raise FileNotFoundError(f"no served log at {served_path}: run served-ingest first ({error})") from None
    total = served.count()
    without_clock = served.where(F.col("event_time_ms").isNull()).count()
    chosen = served.where(F.col("event_time_ms").isNotNull() & (F.size("items") > 0))
    if not include_fallbacks:
        chosen = chosen.where(F.col("fallback_reason").isNull())
    events = spark.read.format("delta").load(config.lake.table(bronze.EVENTS_TABLE))
    judged = judged_lists(chosen, positive_events(events, config), k, horizon_s * 1000).persist()
    try:
        results = [summarise(judged, k, horizon_s, ALL_VERSIONS)]
        versions = sorted(row[0] for row in judged.select("model_version").distinct().collect() if row[0] is not None)
        results += [summarise(judged.where(F.col("model_version") == version), k, horizon_s, version)
                    for version in versions]
    finally:
        judged.unpersist()
    log.info("online metrics: %d served lists, %d without an event-time clock (not judged), %d judged lists of "
             "%d users with later positives; precision@%d %s, recall@%d %s", total, without_clock,
             results[0].lists, results[0].users, k, _fmt(results[0].precision_at_k), k,
             _fmt(results[0].recall_at_k))
    if write:
        computed_at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        rows = [{**asdict(result), "include_fallbacks": include_fallbacks} for result in results]
        (spark.createDataFrame(rows).withColumn("computed_at", F.lit(computed_at).cast("timestamp"))
         .write.format("delta").mode("append").option("mergeSchema", "true")
         .save(config.lake.table(METRICS_TABLE)))
    return results


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main(argv: Optional[list[str]] = None, spark: Optional[SparkSession] = None) -> int:
    from jobs.ingest import _overrides
    from jobs.lib.session import build_spark

    parser = argparse.ArgumentParser(prog="online-metrics", description=__doc__.splitlines()[0])
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml)")
    parser.add_argument("--k", type=int, help="override monitoring.online_k")
    parser.add_argument("--horizon-seconds", type=int, help="override monitoring.online_horizon_seconds")
    parser.add_argument("--include-fallbacks", action="store_true", default=None,
                        help="judge fallback (popularity) lists too")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value")
    args = parser.parse_args(argv)
    config = load_config(args.env, _overrides(argparse.Namespace(overrides=args.overrides, trigger=None)))
    log_config(config, log)
    spark = spark or build_spark(config, "streamrec-online-metrics")
    try:
        results = compute_online_metrics(spark, config, args.k, args.horizon_seconds, args.include_fallbacks)
    except FileNotFoundError as error:
        log.error("%s", error)
        return 2
    for result in results:
        log.info("online metrics %s", json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
