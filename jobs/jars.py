"""The JVM jars the jobs need, chosen from the Spark version in this one place.

Delta Lake publishes one jar per Spark line and Spark's Kafka source follows Spark's own version,
so both are derived from the installed pyspark (or from STREAMREC_SPARK_VERSION, to prepare jars
for a cluster whose Spark differs from the local one, such as EMR 7 with Spark 3.5). They are
resolved from Maven Central once into the jar cache and then passed to Spark offline as
``spark.jars``, which avoids per-run ``--packages`` resolution and its Ivy lock.

    python -m jobs.jars --resolve      # fetch what is missing (jobs jars and the Kafka broker)
    python -m jobs.jars --print        # comma-separated jar paths for spark-submit --jars
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from devstack import maven

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparkLine:
    """The jar coordinates that go with one Spark major.minor line."""

    scala: str
    delta_artifact: str
    delta_version: str


# Delta Lake's compatibility table: Delta 4.x builds per Spark 4 line, Delta 3.3 for Spark 3.5.
SPARK_LINES = {
    "4.2": SparkLine("2.13", "delta-spark_4.2_2.13", "4.4.0"),
    "4.1": SparkLine("2.13", "delta-spark_4.1_2.13", "4.4.0"),
    "4.0": SparkLine("2.13", "delta-spark_4.0_2.13", "4.4.0"),
    "3.5": SparkLine("2.12", "delta-spark_2.12", "3.3.2"),
}


def spark_version() -> str:
    """Return the Spark version to build jars for: STREAMREC_SPARK_VERSION, else pyspark's."""
    configured = os.environ.get("STREAMREC_SPARK_VERSION")
    if configured:
        return configured
    import pyspark

    return pyspark.__version__


def coordinates(version: str | None = None) -> list[str]:
    """Return the Maven coordinates of Delta and the Kafka source for Spark ``version``."""
    version = version or spark_version()
    line_key = ".".join(version.split(".")[:2])
    line = SPARK_LINES.get(line_key)
    if line is None:
        raise RuntimeError(f"Spark {version} is not supported; supported lines: {sorted(SPARK_LINES)}. "
                           "Add its Delta jar to jobs.jars.SPARK_LINES.")
    return [
        f"io.delta:{line.delta_artifact}:{line.delta_version}",
        f"org.apache.spark:spark-sql-kafka-0-10_{line.scala}:{version}",
    ]


def _pyspark_jar_names() -> set[str]:
    try:
        import pyspark
    except ImportError:
        return set()
    jar_dir = Path(pyspark.__file__).parent / "jars"
    return {maven.artifact_id(jar.name) for jar in jar_dir.glob("*.jar")}


def resolve_spark_jars(version: str | None = None) -> list[Path]:
    """Resolve (once) and return the jars to add to Spark, without those pyspark already ships."""
    version = version or spark_version()
    folder = maven.resolve(f"spark-{version}", coordinates(version), exclude_names=_pyspark_jar_names())
    return maven.jars_in(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.jars", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolve", action="store_true", help="fetch missing jars (jobs and Kafka broker)")
    parser.add_argument("--print", dest="print_jars", action="store_true",
                        help="print the jobs' jars as a comma-separated list")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    jars = resolve_spark_jars()
    if args.resolve:
        from devstack import kafka

        kafka.resolve_broker_jars()
        log.info("jars ready: %d for Spark %s, Kafka broker in %s", len(jars), spark_version(), maven.cache_root())
    if args.print_jars:
        sys.stdout.write(",".join(str(jar) for jar in jars) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
