"""Write entity features to Redis: versioned compare-and-set in Lua, many entities per call.

Each entity's packed vector and readable hash are replaced together, and only when the write's
stamp is newer than the stored one (see reccore.store.Stamp). The comparison runs on the server
inside one script, so two writers can never interleave. Values are absolute, never increments,
so a retried or replayed write leaves the same state. Keys get a long TTL refreshed on every write:
staleness is judged at read time, and expiry only cleans up entities that stopped changing long ago.

The client sends one argument per entity, the packed value; the script reads the stamp from its
header and, when the readable hash is on, formats the hash from the vector itself. Formatting in
Python cost more than the whole server-side write (see BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import redis

from reccore.store import HEADER, KeyLayout, Stamp, pack

log = logging.getLogger(__name__)

# KEYS: vector key and hash key per entity. ARGV: ttl_ms, is_backfill (0/1), write the hash (0/1),
# feature count n, the n feature names, then one packed value per entity. The stored stamp is the
# header of the stored vector. Returns one integer per entity: 1 written, 0 kept (the stored stamp
# is newer, or equal and this is not a backfill). Hash values are the float32 values printed with 9
# significant digits, which read back as the same float32, and 'nan' marks a missing value.
COMPARE_AND_SET = """
local ttl = tonumber(ARGV[1])
local backfill = ARGV[2] == '1'
local with_hash = ARGV[3] == '1'
local count = tonumber(ARGV[4])
local first = 5 + count
local results = {}
for i = 1, #KEYS, 2 do
  local vec_key, hash_key = KEYS[i], KEYS[i + 1]
  local packed = ARGV[first + (i - 1) / 2]
  if #packed ~= 24 + 4 * count then
    return redis.error_reply('packed value for ' .. vec_key .. ' has ' .. #packed .. ' bytes, expected ' ..
      (24 + 4 * count))
  end
  local newest, counted, ingest, position = struct.unpack('<i8i8i8', packed)
  local write = true
  local stored = redis.call('GETRANGE', vec_key, 0, 23)
  if #stored == 24 then
    local old_newest, old_counted = struct.unpack('<i8i8', stored)
    if newest < old_newest then
      write = false
    elseif newest == old_newest then
      write = counted > old_counted or (counted == old_counted and backfill)
    end
  end
  if write then
    if with_hash then
      local fields = {}
      for j = 1, count do
        local value
        value, position = struct.unpack('<f', packed, position)
        fields[2 * j - 1] = ARGV[4 + j]
        if value ~= value then
          fields[2 * j] = 'nan'
        else
          fields[2 * j] = string.format('%.9g', value)
        end
      end
      local n = 2 * count
      fields[n + 1], fields[n + 2] = '_newest_event_ms', string.format('%d', newest)
      fields[n + 3], fields[n + 4] = '_events_counted', string.format('%d', counted)
      fields[n + 5], fields[n + 6] = '_ingest_ms', string.format('%d', ingest)
      redis.call('HSET', hash_key, unpack(fields))
      redis.call('PEXPIRE', hash_key, ttl)
    end
    -- The vector last: when the hash write fails (a key of another type), nothing of the entity changed.
    redis.call('SET', vec_key, packed, 'PX', ttl)
    results[#results + 1] = 1
  else
    results[#results + 1] = 0
  end
end
return results
"""


class RedisWriteError(RuntimeError):
    """Redis did not accept a write after the configured retries."""


@dataclass(frozen=True)
class EntityValues:
    """The values of one entity to write: id, stamp and features in manifest order."""

    entity_id: str
    stamp: Stamp
    values: Sequence[Optional[float]]


class FeatureWriter:
    """Write the features of one entity type under one feature-set version."""

    def __init__(self, client: redis.Redis, layout: KeyLayout, entity: str, names: Sequence[str],
                 ttl_seconds: int, entities_per_call: int = 100, retries: int = 3, retry_delay_s: float = 0.5,
                 readable_hash: bool = True):
        self.client = client
        self.layout = layout
        self.entity = entity
        self.names = list(names)
        self.ttl_ms = int(ttl_seconds * 1000)
        self.entities_per_call = entities_per_call
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.readable_hash = readable_hash
        self._script = client.register_script(COMPARE_AND_SET)

    def write(self, entities: Iterable[EntityValues], backfill: bool = False) -> tuple[int, int]:
        """Write ``entities`` in pipelined batches; return (written, kept because the stored stamp is newer)."""
        written = kept = 0
        chunk: list[EntityValues] = []
        for entity in entities:
            chunk.append(entity)
            if len(chunk) == self.entities_per_call * 20:
                done, skipped = self._write_pipelined(chunk, backfill)
                written, kept, chunk = written + done, kept + skipped, []
        if chunk:
            done, skipped = self._write_pipelined(chunk, backfill)
            written, kept = written + done, kept + skipped
        return written, kept

    def _call_args(self, group: Sequence[EntityValues], backfill: bool) -> tuple[list, list]:
        keys: list = []
        args: list = [self.ttl_ms, 1 if backfill else 0, 1 if self.readable_hash else 0, len(self.names), *self.names]
        for entity in group:
            if len(entity.values) != len(self.names):
                raise ValueError(f"{self.entity} {entity.entity_id}: {len(entity.values)} values for "
                                 f"{len(self.names)} features")
            keys += [self.layout.vector(self.entity, entity.entity_id), self.layout.fields(self.entity, entity.entity_id)]
            args.append(pack(entity.stamp, entity.values))
        return keys, args

    def _write_pipelined(self, entities: Sequence[EntityValues], backfill: bool) -> tuple[int, int]:
        groups = [entities[start:start + self.entities_per_call]
                  for start in range(0, len(entities), self.entities_per_call)]
        calls = [self._call_args(group, backfill) for group in groups]
        for attempt in range(1, self.retries + 2):
            try:
                pipeline = self.client.pipeline(transaction=False)
                for keys, args in calls:
                    self._script(keys=keys, args=args, client=pipeline)
                replies = pipeline.execute(raise_on_error=False)
                break
            except (redis.ConnectionError, redis.TimeoutError) as error:
                if attempt > self.retries:
                    raise RedisWriteError(f"Redis write of {len(entities)} {self.entity} entities failed after "
                                          f"{self.retries} retries: {error}") from error
                log.warning("Redis write of %d %s entities failed (%s); retry %d of %d", len(entities), self.entity,
                            error, attempt, self.retries)
                time.sleep(self.retry_delay_s * attempt)

        written = kept = 0
        for group, reply in zip(groups, replies):
            if isinstance(reply, Exception):
                raise RedisWriteError(f"Redis rejected a write of {len(group)} {self.entity} entities "
                                      f"(first id {group[0].entity_id}): {reply}")
            if len(reply) != len(group):
                raise RedisWriteError(f"Redis returned {len(reply)} results for {len(group)} entities")
            written += sum(reply)
            kept += len(group) - sum(reply)
        return written, kept


# KEYS[1]: the key with the event time the sets are as of. KEYS[2..]: one sorted set per window.
# ARGV[1]: as_of_ms, then per window: the member count n and n score/member pairs. The sets are
# replaced only when as_of_ms is at least the stored one, so an older recomputation (a backfill of
# an earlier range) never overwrites fresher popularity. Returns 1 when replaced, 0 when kept.
REPLACE_POPULARITY = """
local as_of = tonumber(ARGV[1])
local stored = redis.call('GET', KEYS[1])
if stored and tonumber(stored) > as_of then
  return 0
end
local arg = 2
for k = 2, #KEYS do
  redis.call('DEL', KEYS[k])
  local count = tonumber(ARGV[arg])
  arg = arg + 1
  local done = 0
  while done < count do
    local chunk = {}
    local take = math.min(1000, count - done)
    for j = 0, 2 * take - 1 do
      chunk[j + 1] = ARGV[arg + j]
    end
    redis.call('ZADD', KEYS[k], unpack(chunk))
    arg = arg + 2 * take
    done = done + take
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


def replace_popularity(client: redis.Redis, layout: KeyLayout, as_of_ms: int, counts: dict[str, dict[str, float]],
                       ttl_seconds: int) -> bool:
    """Replace the popularity sorted sets (window -> item -> events) as of ``as_of_ms``; return whether replaced.

    Kept when Redis already has sets as of a later event time.
    """
    keys = [layout.popularity_as_of()] + [layout.popularity(window) for window in counts]
    args: list = [as_of_ms]
    for members in counts.values():
        args.append(len(members))
        for item_id, score in members.items():
            args += [score, item_id]
    replaced = client.register_script(REPLACE_POPULARITY)(keys=keys, args=args)
    pipeline = client.pipeline(transaction=False)
    for key in keys:
        pipeline.expire(key, ttl_seconds)
    pipeline.execute()
    return bool(replaced)


def add_consumed(client: redis.Redis, layout: KeyLayout, items_by_user: dict[str, Sequence[str]],
                 ttl_seconds: int, retries: int = 3, retry_delay_s: float = 0.5) -> None:
    """Add items to each user's consumed set (a set union: replays add nothing new)."""
    for attempt in range(1, retries + 2):
        try:
            pipeline = client.pipeline(transaction=False)
            for user_id, items in items_by_user.items():
                pipeline.sadd(layout.consumed(user_id), *items)
                pipeline.expire(layout.consumed(user_id), ttl_seconds)
            replies = pipeline.execute(raise_on_error=False)
            break
        except (redis.ConnectionError, redis.TimeoutError) as error:
            if attempt > retries:
                raise RedisWriteError(f"Redis write of the consumed items of {len(items_by_user)} users failed "
                                      f"after {retries} retries: {error}") from error
            log.warning("Redis write of consumed items failed (%s); retry %d of %d", error, attempt, retries)
            time.sleep(retry_delay_s * attempt)
    failed = [reply for reply in replies if isinstance(reply, Exception)]
    if failed:
        raise RedisWriteError(f"Redis rejected {len(failed)} writes of consumed items: {failed[0]}")


def connect(redis_config, socket_timeout_s: float = 30.0) -> redis.Redis:
    """Return a client for the configured Redis (a RedisConfig: host, port, password)."""
    return redis.Redis(host=redis_config.host, port=redis_config.port, password=redis_config.password or None,
                       socket_timeout=socket_timeout_s)


def read_stamp(client: redis.Redis, layout: KeyLayout, entity: str, entity_id: str) -> Optional[Stamp]:
    """Return the stored stamp of an entity (the header of its vector), or None when Redis has no values for it."""
    header = client.getrange(layout.vector(entity, entity_id), 0, HEADER.size - 1)
    if len(header) != HEADER.size:
        return None
    return Stamp(*HEADER.unpack(header))
