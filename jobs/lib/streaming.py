"""Helpers the streaming jobs share: the trigger from config and idempotent Delta writes."""

from __future__ import annotations

from pyspark.sql import SparkSession
from pyspark.sql.streaming import DataStreamWriter

TRIGGERS = ("processing_time", "available_now")
TXN_APP_ID_CONF = "spark.databricks.delta.write.txnAppId"
TXN_VERSION_CONF = "spark.databricks.delta.write.txnVersion"
USER_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"


def with_trigger(writer: DataStreamWriter, trigger: str, interval_seconds: float) -> DataStreamWriter:
    """Set ``processing_time`` (every ``interval_seconds``) or ``available_now`` (drain, then stop)."""
    if trigger == "available_now":
        return writer.trigger(availableNow=True)
    if trigger == "processing_time":
        return writer.trigger(processingTime=f"{interval_seconds} seconds")
    raise ValueError(f"trigger {trigger!r} is invalid; use one of {TRIGGERS}")


class delta_transaction:
    """Session settings that make the next Delta write idempotent per (app id, version).

    Delta skips a write whose (txnAppId, txnVersion) the table has already committed. The user
    metadata marks the commit so that its metrics can be found in the history.
    """

    def __init__(self, spark: SparkSession, app_id: str, version: int, user_metadata: str):
        self.spark, self.app_id, self.version, self.user_metadata = spark, app_id, version, user_metadata

    def __enter__(self):
        self.spark.conf.set(TXN_APP_ID_CONF, self.app_id)
        self.spark.conf.set(TXN_VERSION_CONF, str(self.version))
        self.spark.conf.set(USER_METADATA_CONF, self.user_metadata)

    def __exit__(self, *exc_info):
        for key in (TXN_APP_ID_CONF, TXN_VERSION_CONF, USER_METADATA_CONF):
            self.spark.conf.unset(key)
