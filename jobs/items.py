"""Item metadata: load the catalogue (movies.csv: id, title, genres) into Delta and Redis.

    ./spark-submit.sh items                       # the bundled MovieLens movies.csv
    ./spark-submit.sh items --path other.csv      # same columns: movieId,title,genres

Writes the Delta dimension table ``silver/items`` (item_id, title, genres) in full, and one Redis
hash per item at ``<prefix>:catalog:item:<id>`` with title and genres (pipe-separated).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Optional

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import ArrayType, StringType, StructField, StructType

from jobs.lib.session import build_spark
from reccore.config import PROJECT_ROOT, Config, load_config, log_config
from reccore.events import is_valid_id

log = logging.getLogger("jobs.items")

ITEMS_TABLE = "silver/items"
DEFAULT_MOVIES = PROJECT_ROOT / "data" / "movielens-ml-latest-small" / "movies.csv"
NO_GENRES = "(no genres listed)"
ITEMS_SCHEMA = StructType([
    StructField("item_id", StringType(), False),
    StructField("title", StringType(), False),
    StructField("genres", ArrayType(StringType(), False), False),
])


def read_catalog(path: Path) -> list[tuple[str, str, list[str]]]:
    """Parse a movies.csv file (quoted titles with commas, Windows line endings) into rows."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != ["movieId", "title", "genres"]:
            raise ValueError(f"{path}: header {header} is not movieId,title,genres")
        for line_number, row in enumerate(reader, start=2):
            if len(row) != 3:
                raise ValueError(f"{path}:{line_number}: expected 3 columns, found {len(row)}: {row}")
            item_id, title, genres = row
            if not is_valid_id(item_id):
                raise ValueError(f"{path}:{line_number}: movieId {item_id!r} breaks the id grammar")
            rows.append((item_id, title, [] if genres == NO_GENRES else genres.split("|")))
    return rows


def catalog_key(prefix: str, item_id: str) -> str:
    """Return the Redis key of an item's catalogue entry."""
    return f"{prefix}:catalog:item:{item_id}"


def write_catalog(spark: SparkSession, config: Config, rows: list) -> DataFrame:
    """Overwrite ``silver/items`` and the catalogue hashes in Redis; return the items DataFrame."""
    items = spark.createDataFrame(rows, ITEMS_SCHEMA)
    path = config.lake.table(ITEMS_TABLE)
    items.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(path)

    from jobs.lib.redis_writer import connect

    client = connect(config.redis)
    pipeline = client.pipeline(transaction=False)
    for item_id, title, genres in rows:
        pipeline.hset(catalog_key(config.redis.key_prefix, item_id), mapping={"title": title, "genres": "|".join(genres)})
    replies = pipeline.execute(raise_on_error=False)
    failed = [reply for reply in replies if isinstance(reply, Exception)]
    if failed:
        raise RuntimeError(f"Redis rejected {len(failed)} of {len(rows)} catalogue writes; first: {failed[0]}")
    log.info("catalogue: %d items to %s and Redis %s:%d", len(rows), path, config.redis.host, config.redis.port)
    return spark.read.format("delta").load(path)


def main(argv: Optional[list[str]] = None, spark: Optional[SparkSession] = None) -> int:
    parser = argparse.ArgumentParser(prog="items", description="Load the item catalogue into Delta and Redis.")
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml)")
    parser.add_argument("--path", type=Path, default=DEFAULT_MOVIES, help="movies.csv (movieId,title,genres)")
    args = parser.parse_args(argv)
    config = load_config(args.env)
    log_config(config, log)
    try:
        rows = read_catalog(args.path)
    except (OSError, ValueError) as error:
        log.error("cannot read the catalogue: %s", error)
        return 2
    spark = spark or build_spark(config, "streamrec-items")
    write_catalog(spark, config, rows)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
