"""The scorer's reads from Redis: packed vectors in one MGET, a small item cache, the catalogue.

Everything a request needs from Redis comes in one pipeline: the user's packed vector, the user's
consumed items, and the packed vectors of the candidates missing from this worker's item cache.
Item vectors change slowly and many requests share them, so each worker keeps them for
``serving.item_cache_seconds``, up to ``serving.item_cache_size`` items. The catalogue (titles and
genres) and the manifest of each feature-set version are read once and kept.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import redis

from reccore.ranking import ManifestLayout
from reccore.store import KeyLayout


@dataclass
class Fetched:
    """The Redis values of one request."""

    user_packed: Optional[bytes]
    consumed: frozenset
    item_packed: list


class ItemCache:
    """Packed item vectors by key, each kept ``ttl_s`` seconds, the oldest dropped beyond ``size``."""

    def __init__(self, ttl_s: float, size: int):
        self.ttl_s = ttl_s
        self.size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str], now: float) -> dict:
        with self._lock:
            found = {}
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry[0] > now:
                    found[key] = entry[1]
            return found

    def put_many(self, values: dict, now: float) -> None:
        with self._lock:
            for key, value in values.items():
                self._entries[key] = (now + self.ttl_s, value)
                self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


class OnlineStore:
    """Reads of one worker; create it after the fork (it owns a connection pool)."""

    def __init__(self, redis_config, serving_config):
        self.prefix = redis_config.key_prefix
        self.client = redis.Redis(host=redis_config.host, port=redis_config.port,
                                  password=redis_config.password or None,
                                  socket_timeout=serving_config.redis_timeout_ms / 1000.0,
                                  socket_connect_timeout=serving_config.redis_timeout_ms / 1000.0)
        self.cache = ItemCache(serving_config.item_cache_seconds, serving_config.item_cache_size)
        self._layouts: dict = {}
        self.titles: dict = {}
        self.genres: dict = {}
        self._catalogue_tried = float("-inf")
        # The stream's event-time clock as last read (popularity_as_of_ms): the served log's event time.
        self.clock_ms: Optional[int] = None

    def ensure_catalogue(self, retry_s: float = 1.0) -> None:
        """Load the catalogue when it is not loaded yet, at most once every ``retry_s`` seconds."""
        if self.titles or time.monotonic() - self._catalogue_tried < retry_s:
            return
        self._catalogue_tried = time.monotonic()
        self.load_catalogue()

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def layout(self, version: str) -> ManifestLayout:
        """Return the manifest layout of a feature-set version, read from Redis once."""
        if version not in self._layouts:
            raw = self.client.get(KeyLayout(self.prefix, version).manifest())
            if raw is None:
                raise LookupError(f"Redis has no manifest of feature set {version}; run the backfill for it")
            self._layouts[version] = ManifestLayout(json.loads(raw))
        return self._layouts[version]

    def load_catalogue(self, batch: int = 2000) -> int:
        """Read every catalogue hash (title, genres) into memory and return the number of items."""
        self._catalogue_tried = time.monotonic()
        pattern = f"{self.prefix}:catalog:item:*"
        keys = list(self.client.scan_iter(pattern, count=5000))
        titles, genres = {}, {}
        for start in range(0, len(keys), batch):
            chunk = keys[start:start + batch]
            pipeline = self.client.pipeline(transaction=False)
            for key in chunk:
                pipeline.hmget(key, "title", "genres")
            for key, (title, genre_text) in zip(chunk, pipeline.execute()):
                item_id = key.decode().rsplit(":", 1)[1]
                titles[item_id] = title.decode() if title else None
                genres[item_id] = tuple(genre_text.decode().split("|")) if genre_text else ()
        self.titles, self.genres = titles, genres
        return len(titles)

    def popularity(self, version: str, window: str, count: int) -> list[str]:
        """Return the ``count`` most popular items of a window, most popular first."""
        members = self.client.zrevrange(KeyLayout(self.prefix, version).popularity(window), 0, count - 1)
        return [member.decode() for member in members]

    def user_state(self, version: str, user_id: str, popularity_window: Optional[str] = None,
                   popularity_count: int = 0) -> tuple[Optional[bytes], frozenset, list]:
        """Return the user's packed vector, consumed items and (when asked) the top popular items, in one round trip.

        The same round trip reads the stream's event-time clock into ``clock_ms``.
        """
        layout = KeyLayout(self.prefix, version)
        pipeline = self.client.pipeline(transaction=False)
        pipeline.get(layout.vector("user", user_id))
        pipeline.smembers(layout.consumed(user_id))
        pipeline.get(layout.popularity_as_of())
        if popularity_window and popularity_count > 0:
            pipeline.zrevrange(layout.popularity(popularity_window), 0, popularity_count - 1)
        replies = pipeline.execute()
        if replies[2] is not None:
            self.clock_ms = int(replies[2])
        popular = [member.decode() for member in replies[3]] if len(replies) > 3 else []
        return replies[0], frozenset(member.decode() for member in replies[1]), popular

    def items(self, version: str, item_ids: Sequence[str]) -> list:
        """Return the packed vectors of ``item_ids`` (None where absent), from the cache or one MGET."""
        layout = KeyLayout(self.prefix, version)
        keys = [layout.vector("item", item_id) for item_id in item_ids]
        now = time.monotonic()
        cached = self.cache.get_many(keys, now)
        missing = [key for key in keys if key not in cached]
        if missing:
            fetched = dict(zip(missing, self.client.mget(missing)))
            self.cache.put_many(fetched, now)
            cached.update(fetched)
        return [cached[key] for key in keys]
