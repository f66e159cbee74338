"""Bronze: Kafka records parsed against the event contract into Delta ``bronze/events``.

Pure pieces of the ingest job: the table schemas, the parse step (one pass over each Arrow batch in
Python, with reccore.events as the single definition of a valid event) and the dedup merge.
"""

from __future__ import annotations

import importlib.metadata
import time
from typing import Iterator, Optional

import pyarrow as pa
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (BinaryType, BooleanType, DoubleType, IntegerType, LongType, MapType,
                               StringType, StructField, StructType, TimestampType)

from reccore.events import Event, EventRules, validate

EVENTS_TABLE = "bronze/events"
QUARANTINE_TABLE = "bronze/events_quarantine"

# Partitioned by the month of event time. A day partition would let live traffic prune more
# finely, but a replay of 22 years of history spans about 8,000 days, and every micro-batch would
# write one small file per day it touches. A month keeps a 22-year replay near 270 partitions while
# a query over recent events still reads one or two of them. The column is generated from
# event_time, so Delta derives the partition filter from a filter on event_time by itself.
PARTITION_COLUMN = "event_month"
PARTITION_EXPRESSION = "date_format(event_time, 'yyyy-MM')"

_STRING_MAP = MapType(StringType(), StringType())

PARSED_SCHEMA = StructType([
    StructField("ok", BooleanType(), False),
    StructField("event_id", StringType()),
    StructField("event_time_us", LongType()),
    StructField("user_id", StringType()),
    StructField("item_id", StringType()),
    StructField("event_type", StringType()),
    StructField("value", DoubleType()),
    StructField("session_id", StringType()),
    StructField("context", _STRING_MAP),
    StructField("extra_fields", _STRING_MAP),
    StructField("reason_code", StringType()),
    StructField("reason_field", StringType()),
    StructField("reason", StringType()),
    StructField("raw_value", BinaryType()),
    StructField("kafka_topic", StringType()),
    StructField("kafka_partition", IntegerType()),
    StructField("kafka_offset", LongType()),
    StructField("kafka_timestamp", TimestampType()),
])

EVENTS_SCHEMA = StructType([
    StructField("event_id", StringType(), False),
    StructField("event_time", TimestampType(), False),
    StructField("user_id", StringType(), False),
    StructField("item_id", StringType(), False),
    StructField("event_type", StringType(), False),
    StructField("value", DoubleType()),
    StructField("session_id", StringType()),
    StructField("context", _STRING_MAP),
    StructField("extra_fields", _STRING_MAP),
    StructField("ingest_time", TimestampType(), False),
    StructField("kafka_topic", StringType()),
    StructField("kafka_partition", IntegerType()),
    StructField("kafka_offset", LongType()),
])

QUARANTINE_SCHEMA = StructType([
    StructField("raw_value", BinaryType()),
    StructField("kafka_topic", StringType(), False),
    StructField("kafka_partition", IntegerType(), False),
    StructField("kafka_offset", LongType(), False),
    StructField("kafka_timestamp", TimestampType()),
    StructField("reason_code", StringType(), False),
    StructField("reason_field", StringType(), False),
    StructField("reason", StringType(), False),
    StructField("ingest_time", TimestampType(), False),
])


def ensure_tables(spark: SparkSession, events_path: str, quarantine_path: str) -> None:
    """Create the bronze and quarantine tables with explicit schemas when they do not exist."""
    events = DeltaTable.createIfNotExists(spark).location(events_path).addColumns(EVENTS_SCHEMA)
    events = events.addColumn(PARTITION_COLUMN, "STRING", generatedAlwaysAs=PARTITION_EXPRESSION)
    events.partitionedBy(PARTITION_COLUMN).property("delta.appendOnly", "false").execute()

    quarantine = DeltaTable.createIfNotExists(spark).location(quarantine_path).addColumns(QUARANTINE_SCHEMA)
    quarantine = quarantine.addColumn("ingest_date", "DATE", generatedAlwaysAs="CAST(ingest_time AS DATE)")
    quarantine.partitionedBy("ingest_date").execute()


def _map_array(values: list) -> pa.Array:
    return pa.array([list(item.items()) if item else None for item in values],
                    type=pa.map_(pa.string(), pa.string()))


def parse_arrow_batches(batches: Iterator[pa.RecordBatch], rules: EventRules) -> Iterator[pa.RecordBatch]:
    """Validate each Kafka record; yield one Arrow batch per input batch in PARSED_SCHEMA's layout.

    Input columns: value, topic, partition, offset, timestamp (Spark's Kafka source). The Kafka
    columns and the raw value pass through without a copy.
    """
    for batch in batches:
        now_ms = int(time.time() * 1000)
        raw_values = batch.column(0).to_pylist()
        size = len(raw_values)
        ok = [False] * size
        event_id, event_time, user_id, item_id, event_type = ([None] * size for _ in range(5))
        value, session_id, context, extra = ([None] * size for _ in range(4))
        reason_code, reason_field, reason = ([None] * size for _ in range(3))

        for index, raw in enumerate(raw_values):
            result = validate(raw, rules, now_ms)
            if isinstance(result, Event):
                ok[index] = True
                event_id[index] = result.event_id
                event_time[index] = result.event_time_ms * 1000
                user_id[index] = result.user_id
                item_id[index] = result.item_id
                event_type[index] = result.event_type
                value[index] = result.value
                session_id[index] = result.session_id
                context[index] = result.context
                extra[index] = result.extra_fields
            else:
                reason_code[index] = result.code
                reason_field[index] = result.field
                reason[index] = result.message

        yield pa.RecordBatch.from_arrays([
            pa.array(ok, pa.bool_()),
            pa.array(event_id, pa.string()),
            pa.array(event_time, pa.int64()),
            pa.array(user_id, pa.string()),
            pa.array(item_id, pa.string()),
            pa.array(event_type, pa.string()),
            pa.array(value, pa.float64()),
            pa.array(session_id, pa.string()),
            _map_array(context),
            _map_array(extra),
            pa.array(reason_code, pa.string()),
            pa.array(reason_field, pa.string()),
            pa.array(reason, pa.string()),
            batch.column(0),
            batch.column(1),
            batch.column(2),
            batch.column(3),
            batch.column(4),
        ], names=PARSED_SCHEMA.fieldNames())


def parse_kafka_records(kafka_df: DataFrame, rules: EventRules) -> DataFrame:
    """Parse a DataFrame of Kafka records (batch or streaming) into PARSED_SCHEMA."""
    source = kafka_df.select(
        F.col("value").cast(BinaryType()).alias("value"),
        F.col("topic"), F.col("partition"), F.col("offset"), F.col("timestamp"),
    )
    return source.mapInArrow(lambda batches: parse_arrow_batches(batches, rules), PARSED_SCHEMA)


def event_month(event_time_us: str = "event_time_us"):
    """Return the partition value (``yyyy-MM`` in UTC) of an event-time column in microseconds."""
    return F.date_format(F.timestamp_micros(event_time_us), "yyyy-MM")


def valid_events(parsed: DataFrame, ingest_time, deduplicate: bool = True) -> DataFrame:
    """Select the valid rows of a parsed batch in the bronze layout, one row per event_id.

    Of several copies of an event_id in one batch the one with the lowest (partition, offset) is
    kept, so a rerun of the same batch keeps the same copy. That needs a sort of the whole batch,
    so a caller that knows the batch has no repeated id passes ``deduplicate=False``.
    """
    events = parsed.where(F.col("ok")).select(
        "event_id",
        F.timestamp_micros("event_time_us").alias("event_time"),
        "user_id", "item_id", "event_type", "value", "session_id", "context", "extra_fields",
        F.lit(ingest_time).cast(TimestampType()).alias("ingest_time"),
        "kafka_topic", "kafka_partition", "kafka_offset",
    )
    if not deduplicate:
        return events
    first = F.min_by(F.struct(*events.columns), F.struct("kafka_partition", "kafka_offset"))
    return events.groupBy("event_id").agg(first.alias("row")).select("row.*")


def quarantined_records(parsed: DataFrame, ingest_time) -> DataFrame:
    """Select the rejected rows of a parsed batch in the quarantine layout."""
    return parsed.where(~F.col("ok")).select(
        "raw_value", "kafka_topic", "kafka_partition", "kafka_offset", "kafka_timestamp",
        "reason_code", "reason_field", "reason",
        F.lit(ingest_time).cast(TimestampType()).alias("ingest_time"),
    )


def merge_new_quarantine(spark: SparkSession, quarantine_path: str, records: DataFrame,
                         commit_marker: str) -> Optional[int]:
    """Insert quarantined records not yet present, keyed by Kafka (topic, partition, offset).

    A batch read again after its checkpoint was deleted has a new query id, so Delta's transaction
    ids do not recognise it; this key does.
    """
    target = DeltaTable.forPath(spark, quarantine_path)
    merge = (target.alias("t")
             .merge(records.alias("s"), "t.kafka_topic = s.kafka_topic AND t.kafka_partition = s.kafka_partition "
                                        "AND t.kafka_offset = s.kafka_offset")
             .whenNotMatchedInsert(values={name: f"s.`{name}`" for name in QUARANTINE_SCHEMA.fieldNames()}))
    return _execute_counting_inserts(target, merge, commit_marker)


def merge_new_events(spark: SparkSession, events_path: str, events: DataFrame, commit_marker: str,
                     months: Optional[list[str]] = None) -> Optional[int]:
    """Insert the events whose event_id is not in bronze yet (insert-only MERGE, no streaming state).

    The match is on event_id, so a copy that arrives years after the original is still caught and a
    late event (new id, old time) is never taken for a duplicate. With ``months`` (the event months
    of the batch) the merge reads only those partitions of bronze. A copy of an event carries the
    same event_time and so the same month. Only a record that reuses an id with another event time
    escapes this check. With ``months=None`` the merge reads the whole table.
    Returns the rows inserted, or None when Delta skipped the merge because the session's
    transaction id (txnAppId, txnVersion) was already committed. ``commit_marker`` must be the
    commit's userMetadata, set by the caller.
    """
    condition = "t.event_id = s.event_id"
    if months is not None:
        listed = ", ".join(f"'{month}'" for month in sorted(months))
        condition += f" AND t.{PARTITION_COLUMN} IN ({listed})"
    target = DeltaTable.forPath(spark, events_path)
    merge = (target.alias("t")
             .merge(events.alias("s"), condition)
             # Columns named one by one: Delta computes the generated partition column itself.
             .whenNotMatchedInsert(values={name: f"s.`{name}`" for name in EVENTS_SCHEMA.fieldNames()}))
    return _execute_counting_inserts(target, merge, commit_marker)


def _execute_counting_inserts(target: DeltaTable, merge, commit_marker: str) -> Optional[int]:
    """Run a MERGE; return the rows it inserted, or None when Delta skipped it as already committed."""
    if not _MERGE_RETURNS_METRICS:
        # Delta 3.x (the Spark 3.5 line) returns nothing from execute(): the new commit is found in
        # the history by its userMetadata, among the versions after the one read here.
        version_before = target.history(1).first()["version"]
        merge.execute()
        commits = (target.history(20).where(F.col("version") > version_before)
                   .where(F.col("userMetadata") == commit_marker).select("operationMetrics").collect())
        return int(commits[0]["operationMetrics"].get("numTargetRowsInserted", "0")) if commits else None

    # Delta 4.x returns one row of metrics, and no row for a skipped transaction.
    row = merge.execute().first()
    return None if row is None else int(row["num_inserted_rows"])


def _delta_major_version() -> int:
    try:
        return int(importlib.metadata.version("delta-spark").split(".")[0])
    except importlib.metadata.PackageNotFoundError:  # a cluster image with Delta's jar but no wheel
        return 0


_MERGE_RETURNS_METRICS = _delta_major_version() >= 4

