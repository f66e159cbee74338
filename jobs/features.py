"""Rolling features as pure DataFrame transforms, shared by the batch backfill and the stream.

The pipeline has three steps:
1. ``feature_events``: bronze events with what the definitions need (positive flag, item
   categories, times in ms);
2. ``tiles``: partial aggregates per entity and event-time second (a tile), additive, so a
   micro-batch's tiles merge into the stored ones by addition;
3. ``window_features``: for every tile time t of an entity, each windowed value over the tiles in
   (t - w, t], which is "as of the entity's newest event" when t is its newest tile.

A row of ``window_features`` carries the newest event time of its tile (``event_time``), the events
counted in the longest window and, as ``ingest_time``, the newest ingest time of the events it
reflects: recomputing the same events gives identical rows. Values are cast to float32, the type
the scorer reads.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import FloatType

from reccore.features import FeatureSet

ENTITY_COLUMNS = {"user": "user_id", "item": "item_id"}


def feature_events(bronze: DataFrame, items: DataFrame, feature_set: FeatureSet) -> DataFrame:
    """Return the events with user_id, item_id, event_type, value, positive, category codes and times in ms."""
    codes = {category: code for code, category in enumerate(feature_set.categories)}
    code_map = F.create_map(*[item for category, code in codes.items() for item in (F.lit(category), F.lit(code))])
    item_codes = items.select(
        F.col("item_id"),
        F.filter(F.transform("genres", lambda genre: code_map[genre]), lambda code: code.isNotNull())
        .alias("category_codes"))

    positive = F.col("event_type").isin(list(feature_set.positive_event_types)) | (
        (F.col("event_type") == "rating") & (F.col("value") >= F.lit(feature_set.positive_rating_min)))
    return (bronze
            .select("user_id", "item_id", "event_type", "value",
                    (F.unix_micros("event_time") / 1000).cast("long").alias("event_ms"),
                    (F.unix_micros("ingest_time") / 1000).cast("long").alias("ingest_ms"),
                    F.coalesce(positive, F.lit(False)).alias("positive"))
            .join(item_codes, "item_id", "left")
            .withColumn("category_codes", F.coalesce("category_codes", F.array().cast("array<int>"))))


def tile_columns(entity: str, feature_set: FeatureSet) -> list[str]:
    """Return the additive columns of a tile, in a fixed order."""
    columns = ["n_events"] + [f"n_{event_type}" for event_type in feature_set.event_types]
    columns += ["rating_sum", "rating_n", "positive_n"]
    if entity == "user":
        columns += [f"category_{code}" for code in range(len(feature_set.categories))]
    return columns


def tiles(events: DataFrame, entity: str, feature_set: FeatureSet) -> DataFrame:
    """Aggregate events into tiles: one row per (entity_id, bucket_s), with additive counts and sums.

    ``max_event_ms`` and ``max_ingest_ms`` combine by max, every other column by addition.
    """
    is_rating = (F.col("event_type") == "rating") & F.col("value").isNotNull()
    aggregates = [F.count(F.lit(1)).alias("n_events")]
    aggregates += [F.sum(F.when(F.col("event_type") == event_type, 1).otherwise(0)).alias(f"n_{event_type}")
                   for event_type in feature_set.event_types]
    aggregates += [F.sum(F.when(is_rating, F.col("value")).otherwise(0.0)).alias("rating_sum"),
                   F.sum(F.when(is_rating, 1).otherwise(0)).alias("rating_n"),
                   F.sum(F.when(F.col("positive"), 1).otherwise(0)).alias("positive_n")]
    if entity == "user":
        aggregates += [F.sum(F.when(F.array_contains("category_codes", code), 1).otherwise(0)).alias(f"category_{code}")
                       for code in range(len(feature_set.categories))]
    aggregates += [F.max("event_ms").alias("max_event_ms"), F.max("ingest_ms").alias("max_ingest_ms")]
    return (events
            .groupBy(F.col(ENTITY_COLUMNS[entity]).alias("entity_id"),
                     F.floor(F.col("event_ms") / 1000).cast("long").alias("bucket_s"))
            .agg(*aggregates))


def combine_tiles(stacked: DataFrame, entity: str, feature_set: FeatureSet) -> DataFrame:
    """Merge tiles of the same (entity_id, bucket_s): sums add, maxima take the max."""
    sums = [F.sum(column).alias(column) for column in tile_columns(entity, feature_set)]
    maxima = [F.max("max_event_ms").alias("max_event_ms"), F.max("max_ingest_ms").alias("max_ingest_ms")]
    return stacked.groupBy("entity_id", "bucket_s").agg(*sums, *maxima)


def _ratio(numerator: Column, denominator: Column) -> Column:
    # No events in the window: the value is missing (NaN), not zero.
    return F.when(denominator > 0, numerator / denominator).otherwise(F.lit(float("nan")))


def window_features(tile_df: DataFrame, entity: str, feature_set: FeatureSet) -> DataFrame:
    """Return, for every tile, the entity's features over the windows ending at that tile.

    Columns: entity_id, bucket_s, event_time, ingest_time, events_counted, then the features in
    manifest order (float32).

    A sum over (t - w, t] is computed as the running total at t minus the running total at the
    last tile at or before t - w. Both are frames that only grow, which Spark evaluates in one
    pass; a sliding frame would re-aggregate the whole window for every row. Every tile column is
    non-negative, so the running total is non-decreasing and its max over the earlier frame is
    its value at that tile.
    """
    features = feature_set.features(entity)
    longest = max(feature_set.windows, key=feature_set.windows.get)
    ordered = Window.partitionBy("entity_id").orderBy("bucket_s")
    running = ordered.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    sources = tile_columns(entity, feature_set)
    cumulative = tile_df.select(
        "entity_id", "bucket_s", "max_event_ms",
        F.max("max_ingest_ms").over(ordered.rangeBetween(-(feature_set.windows[longest] - 1), 0)).alias("ingest_ms"),
        *[F.sum(F.col(column).cast("double")).over(running).alias(f"cum_{column}") for column in sources])

    def total(column: str, window_name: str) -> Column:
        before = ordered.rangeBetween(Window.unboundedPreceding, -feature_set.windows[window_name])
        return F.col(f"cum_{column}") - F.coalesce(F.max(f"cum_{column}").over(before), F.lit(0.0))

    columns = [F.col("entity_id"), F.col("bucket_s"),
               F.timestamp_millis("max_event_ms").alias("event_time"),
               F.timestamp_millis("ingest_ms").alias("ingest_time"),
               total("n_events", longest).cast("long").alias("events_counted")]
    for feature in features:
        window = feature.window
        if feature.aggregation == "count":
            value = total(f"n_{feature.event_type}", window)
        elif feature.aggregation == "popularity":
            value = total("n_events", window)
        elif feature.aggregation == "rating_mean":
            value = _ratio(total("rating_sum", window), total("rating_n", window))
        elif feature.aggregation == "positive_share":
            value = _ratio(total("positive_n", window), total("n_events", window))
        elif feature.aggregation == "category_share":
            code = feature_set.categories.index(feature.category)
            value = _ratio(total(f"category_{code}", window), total("n_events", window))
        elif feature.aggregation == "trend":
            short_rate = total("n_events", feature.short_window) / feature_set.windows[feature.short_window]
            long_rate = total("n_events", feature.long_window) / feature_set.windows[feature.long_window]
            value = _ratio(short_rate, long_rate)
        else:  # pragma: no cover - build_feature_set rejects unknown aggregations
            raise ValueError(f"aggregation {feature.aggregation!r} has no implementation")
        columns.append(value.cast(FloatType()).alias(feature.name))
    return cumulative.select(*columns)


def latest_per_entity(history: DataFrame) -> DataFrame:
    """Keep each entity's row of its newest tile: the values "as of its newest event"."""
    newest = Window.partitionBy("entity_id").orderBy(F.col("bucket_s").desc())
    return history.withColumn("_rank", F.row_number().over(newest)).where("_rank = 1").drop("_rank")


def popularity_from_tiles(item_tiles: DataFrame, as_of_ms: int, feature_set: FeatureSet) -> DataFrame:
    """Return entity_id (the item) and its event count per window ending at ``as_of_ms``.

    Windows are over tiles, like every windowed feature: the tiles in (t - w, t] with t the second
    of ``as_of_ms``. Items without events in the longest window are left out.
    """
    as_of_s = as_of_ms // 1000
    counts = [F.sum(F.when(F.col("bucket_s") > as_of_s - seconds, F.col("n_events")).otherwise(0)).alias(name)
              for name, seconds in feature_set.windows.items()]
    return (item_tiles.where((F.col("bucket_s") <= as_of_s)
                             & (F.col("bucket_s") > as_of_s - feature_set.longest_window_seconds))
            .groupBy("entity_id").agg(*counts))
