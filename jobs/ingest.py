"""Streaming ingest: Kafka topic ``interactions`` to Delta ``bronze/events``.

Each micro-batch is parsed against the event contract. Valid events are merged into bronze by
event_id, insert only, so an event is never written twice however late its copy comes. Rejected
records are merged into ``bronze/events_quarantine`` by Kafka topic, partition and offset, with the
raw bytes and a reason naming the field. Both merges also carry Delta transaction ids (the query id
and the batch id), so a batch replayed after a crash between the Delta commit and the checkpoint
commit is skipped as a whole; a recreated checkpoint has a new query id, and the merge keys keep its
first batches from writing anything twice.

    ./spark-submit.sh ingest                          # runs until SIGTERM (processing-time trigger)
    ./spark-submit.sh ingest --trigger available_now  # drains the topic, then exits
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from delta.exceptions import (ConcurrentAppendException, ConcurrentDeleteDeleteException,
                              ConcurrentDeleteReadException, ConcurrentTransactionException,
                              ConcurrentWriteException, DeltaConcurrentModificationException,
                              MetadataChangedException, ProtocolChangedException)
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.errors import StreamingQueryException
from pyspark.sql.streaming import StreamingQuery

from jobs import bronze
from jobs.lib import kafka_offsets
from jobs.lib.checkpoint import CheckpointInUseError, CheckpointLock, CheckpointReader
from jobs.lib.metrics import IngestMetrics, ingest_metrics, serve_metrics
from jobs.lib.session import build_spark
from jobs.lib.streaming import TRIGGERS, delta_transaction, with_trigger
from reccore.config import Config, load_config, log_config
from reccore.events import EventRules

log = logging.getLogger("jobs.ingest")

QUERY_NAME = "ingest_bronze_events"
DEDUP_SCOPES = ("event_month", "table")
DELTA_CONFLICTS = (DeltaConcurrentModificationException, ConcurrentWriteException, MetadataChangedException,
                   ProtocolChangedException, ConcurrentAppendException, ConcurrentDeleteReadException,
                   ConcurrentDeleteDeleteException, ConcurrentTransactionException)
# Test-only: exit the process right after batch N's Delta commits, before Spark's checkpoint commit.
EXIT_AFTER_COMMIT_ENV = "STREAMREC_TEST_EXIT_AFTER_DELTA_COMMIT"


class StopRequested(RuntimeError):
    """Raised at the start of a micro-batch after SIGTERM/SIGINT, before it writes anything."""


class DataLossError(RuntimeError):
    """Kafka deleted records the query had not read yet, and fail_on_data_loss is on."""


@dataclass
class BatchResult:
    """Counts and timings of one micro-batch, as logged and exported as metrics."""

    batch_id: int
    records_read: int = 0
    written: int = 0
    duplicates: int = 0
    late: int = 0
    quarantined: dict = None
    offsets_skipped: int = 0
    already_committed: bool = False
    duration_s: float = 0.0
    parse_s: float = 0.0
    merge_s: float = 0.0
    quarantine_s: float = 0.0


class IngestJob:
    """The ingest query and its per-batch writer; ``start()`` returns the StreamingQuery handle."""

    def __init__(self, spark: SparkSession, config: Config, checkpoint: Optional[str] = None,
                 metrics: Optional[IngestMetrics] = None):
        self.spark = spark
        self.batch_spark = spark
        self.config = config
        self.settings = config.ingest
        self.topic = config.kafka.interactions_topic
        self.events_path = config.lake.table(bronze.EVENTS_TABLE)
        self.quarantine_path = config.lake.table(bronze.QUARANTINE_TABLE)
        self.checkpoint = checkpoint or config.lake.checkpoint(QUERY_NAME)
        self.rules = EventRules.from_config(config.events)
        self.metrics = metrics or ingest_metrics()
        self.reader = CheckpointReader(self.checkpoint, spark)
        self.kafka_settings = config.kafka.client_options()
        self.lock = CheckpointLock(self.checkpoint)
        self.query: Optional[StreamingQuery] = None
        self.results: list[BatchResult] = []
        self._app_id: Optional[str] = None
        self._max_event_time_us: Optional[int] = None
        self._exit_after_batch = os.environ.get(EXIT_AFTER_COMMIT_ENV)
        self.stop_requested = threading.Event()

        if self.settings.trigger not in TRIGGERS:
            raise ValueError(f"ingest.trigger {self.settings.trigger!r} is invalid; use one of {TRIGGERS}")
        if self.settings.dedup_scope not in DEDUP_SCOPES:
            raise ValueError(f"ingest.dedup_scope {self.settings.dedup_scope!r} is invalid; use one of {DEDUP_SCOPES}")

    # -- reading -------------------------------------------------------------------------------

    def kafka_stream(self) -> DataFrame:
        """Return the streaming DataFrame of Kafka records with the configured offsets policy."""
        reader = (self.spark.readStream.format("kafka")
                  .option("kafka.bootstrap.servers", self.config.kafka.bootstrap_servers)
                  .option("subscribe", self.topic)
                  .option("startingOffsets", self.settings.starting_offsets)
                  .option("failOnDataLoss", str(self.settings.fail_on_data_loss).lower())
                  .option("maxOffsetsPerTrigger", str(self.settings.max_offsets_per_trigger)))
        for key, value in self.config.kafka.options.items():
            reader = reader.option(f"kafka.{key}", str(value))
        return reader.load()

    # -- starting ------------------------------------------------------------------------------

    def start(self) -> StreamingQuery:
        """Check the checkpoint, create the tables and start the query."""
        self.lock.acquire()
        try:
            bronze.ensure_tables(self.spark, self.events_path, self.quarantine_path)
            self._check_data_loss_before_start()
            self._max_event_time_us = self._newest_event_time_us()

            parsed = bronze.parse_kafka_records(self.kafka_stream(), self.rules)
            writer = (parsed.writeStream.queryName(QUERY_NAME)
                      .option("checkpointLocation", self.checkpoint)
                      .foreachBatch(self.process_batch))
            self.query = with_trigger(writer, self.settings.trigger, self.settings.trigger_interval_seconds).start()
        except BaseException:
            self.lock.release()
            raise
        log.info("ingest started: topic %s -> %s (quarantine %s), checkpoint %s, trigger %s, query id %s",
                 self.topic, self.events_path, self.quarantine_path, self.checkpoint, self.settings.trigger,
                 self.query.id)
        return self.query

    def _newest_event_time_us(self) -> Optional[int]:
        # Delta computes max() from file statistics, so this reads no data files.
        row = self.spark.read.format("delta").load(self.events_path).agg(F.max("event_time")).first()
        if row[0] is None:
            return None
        return int(row[0].replace(tzinfo=timezone.utc).timestamp() * 1_000_000)

    def _check_data_loss_before_start(self) -> None:
        last = self.reader.last_committed_batch()
        if last is None:
            return
        committed = self.reader.end_offsets(last)
        if not committed:
            return
        gaps = kafka_offsets.find_gaps(committed, {self.topic: kafka_offsets.watermarks(self.kafka_settings,
                                                                                          self.topic)})
        if gaps and self.settings.fail_on_data_loss:
            raise DataLossError("data loss: " + "; ".join(gap.describe() for gap in gaps)
                                + ". Replay the lost range from the source, or set "
                                  "ingest.fail_on_data_loss=false to skip it")
        for gap in gaps:
            log.warning("data loss ahead (fail_on_data_loss is off, so they will be skipped): %s", gap.describe())

    # -- one micro-batch -----------------------------------------------------------------------

    def process_batch(self, batch_df: DataFrame, batch_id: int) -> None:
        """Write one micro-batch to bronze and quarantine, exactly once per (query id, batch id)."""
        if self.stop_requested.is_set():
            # Raising is the only safe way out here: a normal return would make Spark commit this
            # batch without its writes. The batch is planned but untouched; a restart runs it.
            raise StopRequested(f"stop requested: batch {batch_id} was not started and runs after the restart")
        started = time.monotonic()
        # The batch's own session (the query's clone): Delta's transaction settings are session
        # settings, and another query in this application must not see or change them.
        self.batch_spark = batch_df.sparkSession
        result = BatchResult(batch_id=batch_id, quarantined={})
        ingest_time = datetime.now(timezone.utc).replace(tzinfo=None)
        app_id = self._txn_app_id()

        result.offsets_skipped = self._account_for_data_loss(batch_id)
        parsed = batch_df.persist()
        try:
            late_cutoff_us = None
            if self._max_event_time_us is not None:
                late_cutoff_us = self._max_event_time_us - self.settings.late_threshold_seconds * 1_000_000
            step = time.monotonic()
            stats = self._batch_stats(parsed, late_cutoff_us)
            result.parse_s = time.monotonic() - step
            result.records_read = stats["records"]
            result.quarantined = stats["quarantined"]
            # A late candidate that is a copy of an event already in bronze is a duplicate, not late.
            result.late = self._count_new_late(parsed, late_cutoff_us, stats) if stats["late"] else 0
            if result.records_read:
                step = time.monotonic()
                inserted = self._write_events(parsed, ingest_time, app_id, batch_id, stats)
                result.merge_s = time.monotonic() - step
                if inserted is None:
                    result.already_committed = True
                else:
                    result.written = inserted
                    result.duplicates = stats["valid"] - inserted
                if result.quarantined:
                    step = time.monotonic()
                    self._write_quarantine(parsed, ingest_time, app_id, batch_id)
                    result.quarantine_s = time.monotonic() - step
            if stats["max_event_time_us"] is not None:
                self._max_event_time_us = max(self._max_event_time_us or 0, stats["max_event_time_us"])
        finally:
            parsed.unpersist()

        if self._exit_after_batch is not None and int(self._exit_after_batch) == batch_id:
            log.warning("test switch %s: exiting after the Delta commits of batch %d, before the checkpoint "
                        "commit", EXIT_AFTER_COMMIT_ENV, batch_id)
            logging.shutdown()
            os._exit(75)

        result.duration_s = time.monotonic() - started
        self._record(result)
        self._update_lag(batch_id)

    def _txn_app_id(self) -> str:
        if self._app_id is None:
            query_id = self.reader.query_id()
            if query_id is None:
                raise RuntimeError(f"checkpoint {self.checkpoint} has no query id in its metadata file")
            self._app_id = f"streamrec-ingest-{query_id}"
        return self._app_id

    def _count_new_late(self, parsed: DataFrame, late_cutoff_us: int, stats: dict) -> int:
        """Count the batch's late events whose event_id is not in bronze yet (run before the merge)."""
        candidates = (parsed.where(F.col("ok") & (F.col("event_time_us") < F.lit(late_cutoff_us)))
                      .select("event_id", bronze.event_month().alias("month")).distinct())
        existing = self.spark.read.format("delta").load(self.events_path)
        if self.settings.dedup_scope == "event_month":
            months = [row["month"] for row in candidates.select("month").distinct().collect()]
            existing = existing.where(F.col(bronze.PARTITION_COLUMN).isin(months))
        return candidates.join(existing.select("event_id"), "event_id", "left_anti").select("event_id").distinct().count()

    def _batch_stats(self, parsed: DataFrame, late_cutoff_us: Optional[int]) -> dict:
        late = F.lit(0)
        if late_cutoff_us is not None:
            late = F.when(F.col("ok") & (F.col("event_time_us") < F.lit(late_cutoff_us)), 1).otherwise(0)
        month = F.when(F.col("ok"), bronze.event_month()).alias("month")
        rows = (parsed.groupBy("ok", "reason_code", month)
                .agg(F.count(F.lit(1)).alias("records"), F.sum(late).alias("late"),
                     F.max("event_time_us").alias("max_event_time_us"))
                .collect())
        stats = {"records": 0, "valid": 0, "distinct_ids": 0, "late": 0, "quarantined": {}, "months": [],
                 "max_event_time_us": None}
        for row in rows:
            stats["records"] += row["records"]
            if row["ok"]:
                stats["valid"] += row["records"]
                stats["late"] += row["late"] or 0
                stats["months"].append(row["month"])
                stats["max_event_time_us"] = max(stats["max_event_time_us"] or 0, row["max_event_time_us"])
            else:
                reason = row["reason_code"]
                stats["quarantined"][reason] = stats["quarantined"].get(reason, 0) + row["records"]
        if stats["valid"]:
            stats["distinct_ids"] = parsed.where(F.col("ok")).agg(F.count_distinct("event_id")).first()[0]
        return stats

    def _write_events(self, parsed: DataFrame, ingest_time: datetime, app_id: str, batch_id: int,
                      stats: dict) -> Optional[int]:
        """Merge the batch's valid events; return rows inserted, or None when the batch was already committed."""
        if not stats["valid"]:
            return 0
        events = bronze.valid_events(parsed, ingest_time, deduplicate=stats["distinct_ids"] < stats["valid"])
        months = stats["months"] if self.settings.dedup_scope == "event_month" else None
        inserted = self._with_conflict_retries(
            lambda: bronze.merge_new_events(self.batch_spark, self.events_path, events, f"{app_id}:{batch_id}", months),
            app_id, batch_id, "merge into bronze events")
        if inserted is None:
            log.info("batch %d: already in bronze (transaction %s:%d was committed before a "
                     "restart); skipped", batch_id, app_id, batch_id)
        return inserted

    def _write_quarantine(self, parsed: DataFrame, ingest_time: datetime, app_id: str, batch_id: int) -> None:
        records = bronze.quarantined_records(parsed, ingest_time)
        self._with_conflict_retries(
            lambda: bronze.merge_new_quarantine(self.batch_spark, self.quarantine_path, records, f"{app_id}:{batch_id}"),
            app_id, batch_id, "merge into quarantine")

    def _with_conflict_retries(self, write, app_id: str, batch_id: int, what: str):
        """Run ``write`` under the batch's Delta transaction id, retrying concurrent-commit conflicts."""
        attempts = max(1, self.settings.write_retries + 1)
        for attempt in range(1, attempts + 1):
            try:
                with delta_transaction(self.batch_spark, app_id, batch_id, f"{app_id}:{batch_id}"):
                    return write()
            except DELTA_CONFLICTS as error:
                if attempt == attempts:
                    raise
                self.metrics.delta_retries.inc()
                delay_s = min(30.0, 0.5 * 2 ** (attempt - 1))
                log.warning("%s: concurrent Delta commit (%s); retry %d of %d in %.1f s", what,
                            type(error).__name__, attempt, attempts - 1, delay_s)
                time.sleep(delay_s)
        return None

    def _account_for_data_loss(self, batch_id: int) -> int:
        start = self.reader.start_offsets(batch_id)
        if not start or self.topic not in start:
            return 0
        marks = kafka_offsets.watermarks(self.kafka_settings, self.topic)
        end = self.reader.end_offsets(batch_id) or {}
        skipped_total = 0
        for gap in kafka_offsets.find_gaps(start, {self.topic: marks}):
            # Only what lies inside this batch's range was skipped by this batch.
            end_offset = end.get(gap.topic, {}).get(gap.partition, gap.earliest)
            skipped = min(gap.earliest, end_offset) - gap.checkpointed
            if skipped <= 0:
                continue
            if self.settings.fail_on_data_loss:
                raise DataLossError(f"data loss in batch {batch_id}: {gap.describe()}. Replay the lost range "
                                    "from the source, or set ingest.fail_on_data_loss=false to skip it")
            log.warning("batch %d skipped %d offsets: %s", batch_id, skipped, gap.describe())
            self.metrics.offsets_skipped.labels(gap.topic, str(gap.partition)).inc(skipped)
            skipped_total += skipped
        return skipped_total

    def _update_lag(self, batch_id: int) -> None:
        end = (self.reader.end_offsets(batch_id) or {}).get(self.topic)
        if not end:
            return
        try:
            marks = kafka_offsets.watermarks(self.kafka_settings, self.topic)
        except RuntimeError as error:
            log.warning("could not read Kafka offsets for the lag metric: %s", error)
            return
        for partition, (_earliest, latest) in marks.items():
            self.metrics.kafka_lag.labels(self.topic, str(partition)).set(max(0, latest - end.get(partition, 0)))

    def _record(self, result: BatchResult) -> None:
        self.results.append(result)
        metrics = self.metrics
        metrics.batches.inc()
        metrics.records_read.inc(result.records_read)
        metrics.events_written.inc(result.written)
        metrics.duplicates.inc(result.duplicates)
        metrics.late_events.inc(result.late)
        for reason, count in result.quarantined.items():
            metrics.quarantined.labels(reason).inc(count)
        metrics.batch_duration.observe(result.duration_s)
        metrics.last_batch_time.set(time.time())
        if self._max_event_time_us is not None:
            metrics.max_event_time.set(self._max_event_time_us / 1_000_000)
        log.info("batch %d: read %d, written %d, quarantined %d %s, duplicates %d, late %d, offsets skipped %d%s, "
                 "%.2f s (parse %.2f, merge %.2f, quarantine %.2f)", result.batch_id, result.records_read, result.written, sum(result.quarantined.values()),
                 dict(sorted(result.quarantined.items())), result.duplicates, result.late, result.offsets_skipped,
                 " (already committed)" if result.already_committed else "", result.duration_s,
                 result.parse_s, result.merge_s, result.quarantine_s)

    # -- stopping ------------------------------------------------------------------------------

    def stop_gracefully(self, timeout_s: float = 600.0) -> None:
        """Stop the query without cutting a micro-batch short.

        A batch that starts after the request raises StopRequested before it writes; between
        batches the query is stopped directly. Either way the last batch that wrote to Delta is the
        last one in the commit log.
        """
        self.stop_requested.set()
        query = self.query
        if query is None:
            return
        deadline = time.monotonic() + timeout_s
        while query.isActive and time.monotonic() < deadline:
            if not query.status["isTriggerActive"]:
                query.stop()
                break
            try:
                query.awaitTermination(0.05)
            except StreamingQueryException as error:
                if not self.stopped_on_request(error):
                    raise
                break
        if query.isActive:
            log.warning("the running micro-batch did not finish within %.0f s; stopping it (it runs again after "
                        "the restart)", timeout_s)
            query.stop()

    @staticmethod
    def stopped_on_request(error: Optional[BaseException]) -> bool:
        """Return whether a query error is the StopRequested raised by a graceful stop."""
        return error is not None and StopRequested.__name__ in str(error)

    def close(self) -> None:
        """Release the checkpoint lock (the query must be stopped)."""
        self.lock.release()



def _hide_stop_requested(record: logging.LogRecord) -> bool:
    # py4j logs every exception raised in a foreachBatch callback, the graceful stop's included.
    return not (record.exc_info and isinstance(record.exc_info[1], StopRequested))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ingest", description="Kafka interactions to Delta bronze events.")
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml); default STREAMREC_ENV or local")
    parser.add_argument("--trigger", choices=TRIGGERS, help="override ingest.trigger")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set ingest.max_offsets_per_trigger=50000")
    return parser.parse_args(argv)


def _overrides(args: argparse.Namespace) -> dict:
    import yaml

    overrides = {}
    for item in args.overrides:
        key, separator, value = item.partition("=")
        if not separator:
            raise SystemExit(f"--set {item!r} is invalid; write KEY=VALUE, e.g. ingest.trigger=available_now")
        overrides[key.strip()] = yaml.safe_load(value)
    if args.trigger:
        overrides["ingest.trigger"] = args.trigger
    return overrides


def main(argv: Optional[list[str]] = None, spark: Optional[SparkSession] = None,
         config: Optional[Config] = None) -> int:
    """Run the ingest job until it drains (available_now) or is stopped by SIGTERM/SIGINT."""
    args = parse_args(argv)
    config = config or load_config(args.env, _overrides(args))
    log_config(config, log)

    stop_requested = threading.Event()

    def request_stop(signum, _frame):
        # spark-submit.sh forwards the signal too, so a group-wide SIGTERM arrives twice.
        if not stop_requested.is_set():
            log.info("received %s: stopping after the current micro-batch", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    logging.getLogger("py4j.clientserver").addFilter(_hide_stop_requested)

    spark = spark or build_spark(config, "streamrec-ingest")
    serve_metrics(config.ingest.metrics_host, config.ingest.metrics_port)
    job = IngestJob(spark, config)
    try:
        query = job.start()
    except (DataLossError, CheckpointInUseError) as error:
        log.error("ingest did not start: %s", error)
        return 3
    try:
        while query.isActive:
            if stop_requested.is_set():
                job.stop_gracefully()
                break
            query.awaitTermination(1.0)
        error = query.exception()
        if job.stopped_on_request(error):
            log.info("stopped on request after the last committed micro-batch; Spark's error for the batch that "
                     "was refused before it started is expected")
        elif error is not None:
            log.error("ingest query failed: %s", error)
            return 1
    finally:
        job.close()
    totals = {name: sum(getattr(result, name) for result in job.results)
              for name in ("records_read", "written", "duplicates", "late")}
    log.info("ingest stopped: %d batches, %s", len(job.results), totals)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
