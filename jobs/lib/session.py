"""Build the SparkSession every job uses, with Delta on and the project's settings applied."""

from __future__ import annotations

import logging
import os
import sys

from pyspark import SparkConf
from pyspark.sql import SparkSession

from reccore.config import Config

log = logging.getLogger(__name__)

DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


def build_spark(config: Config, app_name: str) -> SparkSession:
    """Return a SparkSession for ``app_name`` configured from ``config``.

    Under spark-submit the master and jars come from the command line and are kept. Started from
    plain Python (tests, notebooks) the session takes the master from config and the jars from the
    jar cache, resolving them on first use.
    """
    # Python workers run the driver's interpreter, so they see the same packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    launched = SparkConf()
    builder = SparkSession.builder.appName(app_name)
    if not launched.contains("spark.master"):
        builder = builder.master(config.spark.master)
    if not launched.contains("spark.jars"):
        from jobs.jars import resolve_spark_jars

        builder = builder.config("spark.jars", ",".join(str(jar) for jar in resolve_spark_jars()))

    settings = dict(DELTA_CONF)
    settings["spark.sql.session.timeZone"] = "UTC"
    settings["spark.sql.shuffle.partitions"] = str(config.spark.shuffle_partitions)
    settings.update({str(key): str(value) for key, value in config.spark.conf.items()})
    for key, value in settings.items():
        builder = builder.config(key, value)

    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("STREAMREC_SPARK_LOG_LEVEL", "WARN"))
    log.info("spark session ready: master %s, Spark %s", spark.sparkContext.master, spark.version)
    return spark
