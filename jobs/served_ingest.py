"""Served-log ingest: the scorer's ``recommendations_served`` records from Kafka into Delta.

    ./spark-submit.sh served-ingest [--trigger available_now]

Each Kafka record is one response of the scorer (serving/served_log.py). Valid records land in
``served/recommendations``, one row per response, partitioned by the wall-clock day it was served.
A record that is not valid JSON or lacks a required field lands in ``served/quarantine`` with the
raw bytes and the reason, so nothing is dropped unseen. Each micro-batch is written under a Delta
transaction id made of the checkpoint's query id and the batch id, so a batch replayed after a crash
is skipped by Delta instead of written twice; a recreated checkpoint has a new query id, so its
writes are never mistaken for old ones. The online accuracy job (jobs/online_metrics.py) reads the
table.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Optional

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, IntegerType, LongType, StringType, StructField, StructType

from jobs.lib.checkpoint import CheckpointInUseError, CheckpointLock, CheckpointReader
from jobs.lib.session import build_spark
from jobs.lib.streaming import TRIGGERS, delta_transaction, with_trigger
from reccore.config import Config, load_config, log_config

log = logging.getLogger("jobs.served_ingest")

QUERY_NAME = "served-ingest"
SERVED_TABLE = "served/recommendations"
QUARANTINE_TABLE = "served/quarantine"

RECORD_SCHEMA = StructType([
    StructField("request_id", StringType()),
    StructField("user_id", StringType()),
    StructField("items", ArrayType(StringType())),
    StructField("scores", ArrayType(DoubleType())),
    StructField("model_name", StringType()),
    StructField("model_version", StringType()),
    StructField("feature_set_version", StringType()),
    StructField("fallback_reason", StringType()),
    StructField("k", IntegerType()),
    StructField("served_at_ms", LongType()),
    StructField("event_time_ms", LongType()),
])

REQUIRED = ("request_id", "user_id", "items", "scores", "served_at_ms")


def parse_served(kafka_df: DataFrame) -> DataFrame:
    """Return the Kafka records parsed: the record's fields, ``reason`` (null when valid) and the Kafka coordinates."""
    parsed = kafka_df.select(F.col("value").alias("raw_value"), F.col("partition").alias("kafka_partition"),
                             F.col("offset").alias("kafka_offset"),
                             F.from_json(F.col("value").cast("string"), RECORD_SCHEMA).alias("record"))
    # from_json turns text that is not JSON into a record of nulls, so json_object_keys detects it.
    reason = F.when(F.json_object_keys(F.col("raw_value").cast("string")).isNull(),
                    F.lit("value is not a JSON object"))
    for name in REQUIRED:
        reason = reason.when(F.col(f"record.{name}").isNull(), F.lit(f"{name} is missing or not of its type"))
    reason = reason.when(F.size("record.items") != F.size("record.scores"),
                         F.lit("items and scores differ in length"))
    return parsed.select("*", reason.alias("reason"))


def served_rows(parsed: DataFrame, ingest_time) -> DataFrame:
    """Return the valid records as table rows."""
    return (parsed.where(F.col("reason").isNull())
            .select("record.*", "kafka_partition", "kafka_offset")
            .withColumn("served_at", F.timestamp_millis("served_at_ms"))
            .withColumn("event_time", F.timestamp_millis("event_time_ms"))
            .withColumn("ingest_time", F.lit(ingest_time).cast("timestamp"))
            .withColumn("served_date", F.to_date("served_at")))


def quarantine_rows(parsed: DataFrame, ingest_time) -> DataFrame:
    """Return the invalid records with their raw bytes and the reason."""
    return (parsed.where(F.col("reason").isNotNull())
            .select("raw_value", "kafka_partition", "kafka_offset", "reason")
            .withColumn("ingest_time", F.lit(ingest_time).cast("timestamp")))


class ServedIngest:
    """The served-log query and its exactly-once batch writer."""

    def __init__(self, spark: SparkSession, config: Config, checkpoint: Optional[str] = None):
        self.spark = spark
        self.config = config
        self.settings = config.monitoring
        self.topic = config.kafka.served_topic
        self.served_path = config.lake.table(SERVED_TABLE)
        self.quarantine_path = config.lake.table(QUARANTINE_TABLE)
        self.checkpoint = checkpoint or config.lake.checkpoint(QUERY_NAME)
        self.reader = CheckpointReader(self.checkpoint, spark)
        self.lock = CheckpointLock(self.checkpoint)
        self.query = None
        self.totals = {"batches": 0, "written": 0, "quarantined": 0}
        if self.settings.served_trigger not in TRIGGERS:
            raise ValueError(f"monitoring.served_trigger {self.settings.served_trigger!r} is invalid; "
                             f"use one of {TRIGGERS}")

    def start(self):
        self.lock.acquire()
        try:
            reader = (self.spark.readStream.format("kafka")
                      .option("kafka.bootstrap.servers", self.config.kafka.bootstrap_servers)
                      .option("subscribe", self.topic)
                      .option("startingOffsets", "earliest")
                      .option("failOnDataLoss", "true"))
            for key, value in self.config.kafka.options.items():
                reader = reader.option(f"kafka.{key}", str(value))
            writer = (parse_served(reader.load()).writeStream.queryName(QUERY_NAME)
                      .option("checkpointLocation", self.checkpoint)
                      .foreachBatch(self.process_batch))
            self.query = with_trigger(writer, self.settings.served_trigger,
                                      self.settings.served_trigger_interval_seconds).start()
        except BaseException:
            self.lock.release()
            raise
        log.info("served-ingest started: topic %s -> %s (quarantine %s), checkpoint %s, trigger %s",
                 self.topic, self.served_path, self.quarantine_path, self.checkpoint, self.settings.served_trigger)
        return self.query

    def process_batch(self, batch_df: DataFrame, batch_id: int) -> None:
        started = time.monotonic()
        spark = batch_df.sparkSession
        query_id = self.reader.query_id()
        if query_id is None:
            raise RuntimeError(f"checkpoint {self.checkpoint} has no query id in its metadata file")
        app_id = f"streamrec-served-ingest-{query_id}"
        ingest_time = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())

        parsed = batch_df.persist()
        try:
            counts = {row["valid"]: row["count"] for row in
                      parsed.groupBy(F.col("reason").isNull().alias("valid")).count().collect()}
            written, quarantined = counts.get(True, 0), counts.get(False, 0)
            # Each table is written under its own transaction id, so a replayed batch (the same
            # records, the same counts) is skipped by both.
            if written:
                with delta_transaction(spark, app_id, batch_id, f"{app_id}:{batch_id}"):
                    (served_rows(parsed, ingest_time).write.format("delta").mode("append")
                     .partitionBy("served_date").save(self.served_path))
            if quarantined:
                with delta_transaction(spark, f"{app_id}-quarantine", batch_id, f"{app_id}:{batch_id}"):
                    (quarantine_rows(parsed, ingest_time).write.format("delta").mode("append")
                     .save(self.quarantine_path))
        finally:
            parsed.unpersist()

        self.totals["batches"] += 1
        self.totals["written"] += written
        self.totals["quarantined"] += quarantined
        log.info("served-ingest batch %d: %d records written, %d quarantined, %.1f s", batch_id, written,
                 quarantined, time.monotonic() - started)
        if quarantined:
            log.warning("served-ingest batch %d: %d records quarantined in %s (see the reason column)", batch_id,
                        quarantined, self.quarantine_path)

    def close(self) -> None:
        self.lock.release()


def main(argv: Optional[list[str]] = None, spark: Optional[SparkSession] = None,
         config: Optional[Config] = None) -> int:
    """Run until the topic is drained (available_now) or SIGTERM/SIGINT stops it."""
    from jobs.ingest import _overrides

    parser = argparse.ArgumentParser(prog="served-ingest", description="Kafka served log to Delta.")
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml)")
    parser.add_argument("--trigger", choices=TRIGGERS, help="override monitoring.served_trigger")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value")
    args = parser.parse_args(argv)
    overrides = _overrides(argparse.Namespace(overrides=args.overrides, trigger=None))
    if args.trigger:
        overrides["monitoring.served_trigger"] = args.trigger
    config = config or load_config(args.env, overrides)
    log_config(config, log)

    stop = threading.Event()

    def request_stop(signum, _frame):
        if not stop.is_set():
            log.info("received %s: stopping; a batch cut short is rewritten after the restart (Delta skips "
                     "what it already committed)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    spark = spark or build_spark(config, "streamrec-served-ingest")
    job = ServedIngest(spark, config)
    try:
        query = job.start()
    except CheckpointInUseError as error:
        log.error("served-ingest did not start: %s", error)
        return 3
    try:
        while query.isActive and not stop.is_set():
            query.awaitTermination(1.0)
        if query.isActive:
            query.stop()
        error = query.exception()
        if error is not None and not stop.is_set():
            log.error("served-ingest query failed: %s", error)
            return 1
    finally:
        job.close()
    log.info("served-ingest stopped: %s", job.totals)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
