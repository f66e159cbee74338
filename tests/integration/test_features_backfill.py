"""The feature backfill on the real MovieLens history: Delta history and Redis against the CSV."""

from __future__ import annotations

import csv
from collections import defaultdict

import pytest
import redis

from jobs.backfill import HISTORY_TABLES
from jobs.items import ITEMS_TABLE, catalog_key
from jobs.replay import DEFAULT_RATINGS
from reccore.features import load_feature_set
from reccore.store import KeyLayout, unpack

pytestmark = [pytest.mark.integration, pytest.mark.spark]

THIRTY_DAYS_S = 30 * 86400


@pytest.fixture(scope="module")
def ratings_by_entity():
    users, items = defaultdict(list), defaultdict(list)
    with open(DEFAULT_RATINGS, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            timestamp, rating = int(row["timestamp"]), float(row["rating"])
            users[row["userId"]].append((timestamp, rating))
            items[row["movieId"]].append((timestamp, rating))
    return users, items


@pytest.fixture
def backfilled(movielens_features):
    config = movielens_features.config
    client = redis.Redis(host=config.redis.host, port=config.redis.port, socket_timeout=30)
    yield config, client, load_feature_set(), movielens_features.result
    client.close()


def test_backfill_movielens(backfilled, spark, ratings_by_entity):
    config, client, feature_set, result = backfilled
    users, items = ratings_by_entity
    layout = KeyLayout(config.redis.key_prefix, feature_set.version)
    assert result.events == 100_836
    assert len(users) == 610
    assert len(items) == 9_724

    # Every user and every rated movie has its vector in Redis.
    user_keys = client.mget([layout.vector("user", user) for user in users])
    assert sum(value is not None for value in user_keys) == 610
    item_keys = client.mget([layout.vector("item", item) for item in items])
    assert sum(value is not None for value in item_keys) == 9_724

    user_names, item_names = feature_set.names("user"), feature_set.names("item")
    count_index = user_names.index("rating_count_30d_user")
    mean_index = item_names.index("rating_mean_30d_item")
    for user in ("1", "414", "610", "53"):
        newest = max(timestamp for timestamp, _ in users[user])
        expected = sum(1 for timestamp, _ in users[user] if newest - THIRTY_DAYS_S < timestamp <= newest)
        stamp, values = unpack(client.get(layout.vector("user", user)), len(user_names))
        assert values[count_index] == expected, user
        assert stamp.newest_event_ms == newest * 1000
        assert stamp.events_counted == expected
    for item in ("1", "356", "2571", "193609"):
        newest = max(timestamp for timestamp, _ in items[item])
        window = [rating for timestamp, rating in items[item] if newest - THIRTY_DAYS_S < timestamp <= newest]
        _, values = unpack(client.get(layout.vector("item", item)), len(item_names))
        assert values[mean_index] == pytest.approx(sum(window) / len(window), rel=1e-6), item

    # History rows: one per entity and event second, as of that second.
    user_history = spark.read.format("delta").load(config.lake.table(HISTORY_TABLES["user"]))
    distinct_seconds = sum(len({timestamp for timestamp, _ in ratings}) for ratings in users.values())
    assert user_history.count() == distinct_seconds
    assert client.hget(catalog_key(config.redis.key_prefix, "1"), "title") == b"Toy Story (1995)"
    assert client.zcard(layout.popularity("30d")) > 0
    assert client.sismember(layout.consumed("1"), "1")
    assert spark.read.format("delta").load(config.lake.table(ITEMS_TABLE)).count() == 9_742
