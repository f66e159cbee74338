"""Summarise bronze: rows, distinct event ids, event-time range, data files, quarantine by reason.

    ./spark-submit.sh bronze-report            # a readable summary on stdout
    ./spark-submit.sh bronze-report --json     # the same as one JSON object
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs import bronze
from jobs.lib.session import build_spark
from reccore.config import Config, load_config

log = logging.getLogger("jobs.bronze_report")


def summarize(spark: SparkSession, config: Config) -> dict:
    """Return the bronze and quarantine summary as a dictionary."""
    events_path = config.lake.table(bronze.EVENTS_TABLE)
    quarantine_path = config.lake.table(bronze.QUARANTINE_TABLE)
    if not DeltaTable.isDeltaTable(spark, events_path):
        raise FileNotFoundError(f"no bronze table at {events_path}; run the ingest job first")

    events = spark.read.format("delta").load(events_path)
    row = events.agg(F.count(F.lit(1)).alias("rows"), F.count_distinct("event_id").alias("event_ids"),
                     F.min("event_time").alias("first"), F.max("event_time").alias("last"),
                     F.count_distinct("user_id").alias("users"),
                     F.count_distinct("item_id").alias("items")).first()
    detail = DeltaTable.forPath(spark, events_path).detail().first()
    summary = {
        "events_path": events_path,
        "rows": row["rows"],
        "distinct_event_ids": row["event_ids"],
        "users": row["users"],
        "items": row["items"],
        "first_event_time": row["first"].isoformat() + "Z" if row["first"] else None,
        "last_event_time": row["last"].isoformat() + "Z" if row["last"] else None,
        "data_files": detail["numFiles"],
        "partitions": events.select(bronze.PARTITION_COLUMN).distinct().count(),
        "table_version": DeltaTable.forPath(spark, events_path).history(1).first()["version"],
        "quarantine_path": quarantine_path,
        "quarantined": {},
    }
    if DeltaTable.isDeltaTable(spark, quarantine_path):
        for reason in spark.read.format("delta").load(quarantine_path).groupBy("reason_code").count().collect():
            summary["quarantined"][reason["reason_code"]] = reason["count"]
    return summary


def main(argv: Optional[list[str]] = None, spark: Optional[SparkSession] = None) -> int:
    parser = argparse.ArgumentParser(prog="bronze-report", description="Summarise bronze events and quarantine.")
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    config = load_config(args.env)
    spark = spark or build_spark(config, "streamrec-bronze-report")
    try:
        summary = summarize(spark, config)
    except FileNotFoundError as error:
        log.error("%s", error)
        return 2

    if args.json:
        sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
        return 0
    lines = [
        f"bronze events      {summary['events_path']} (version {summary['table_version']})",
        f"  rows             {summary['rows']:,} ({summary['distinct_event_ids']:,} distinct event ids)",
        f"  users / items    {summary['users']:,} / {summary['items']:,}",
        f"  event time       {summary['first_event_time']} .. {summary['last_event_time']}",
        f"  data files       {summary['data_files']:,} in {summary['partitions']:,} monthly partitions",
        f"quarantine         {summary['quarantine_path']}",
    ]
    if summary["quarantined"]:
        lines += [f"  {reason:<17}{count:,}" for reason, count in sorted(summary["quarantined"].items())]
    else:
        lines.append("  (empty)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
