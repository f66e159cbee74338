"""Write entity features to Redis: versioned compare-and-set in Lua, many entities per call.

Each entity's packed vector and readable hash are replaced together, and only when the write's
stamp is newer than the stored one (see reccore.store.Stamp). The comparison runs on the server
inside one script, so two writers can never interleave. Values are absolute, never increments,
so a retried or replayed write leaves the same state. Keys get a long TTL refreshed on every write:
staleness is judged at read time, and expiry only cleans up entities that stopped changing long ago.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import redis

from reccore.store import STAMP_FIELDS, KeyLayout, Stamp, pack, readable_fields

log = logging.getLogger(__name__)

# KEYS: vector key and hash key per entity. ARGV: ttl_ms, is_backfill (0/1), then per entity:
# newest_event_ms, events_counted, packed vector, field count n, then n field/value pairs.
# Returns one integer per entity: 1 written, 0 kept (the stored stamp is newer, or equal and this
# is not a backfill).
COMPARE_AND_SET = """
local ttl = tonumber(ARGV[1])
local backfill = ARGV[2] == '1'
local results = {}
local arg = 3
for i = 1, #KEYS, 2 do
  local vec_key, hash_key = KEYS[i], KEYS[i + 1]
  local newest, counted = tonumber(ARGV[arg]), tonumber(ARGV[arg + 1])
  local packed, field_count = ARGV[arg + 2], tonumber(ARGV[arg + 3])
  local stored = redis.call('HMGET', hash_key, '_newest_event_ms', '_events_counted')
  local write = true
  if stored[1] then
    local old_newest, old_counted = tonumber(stored[1]), tonumber(stored[2])
    if newest < old_newest then
      write = false
    elseif newest == old_newest then
      write = counted > old_counted or (counted == old_counted and backfill)
    end
  end
  if write then
    redis.call('SET', vec_key, packed, 'PX', ttl)
    redis.call('DEL', hash_key)
    local pairs_args = {}
    for j = 0, 2 * field_count - 1 do
      pairs_args[#pairs_args + 1] = ARGV[arg + 4 + j]
    end
    redis.call('HSET', hash_key, unpack(pairs_args))
    redis.call('PEXPIRE', hash_key, ttl)
    results[#results + 1] = 1
  else
    results[#results + 1] = 0
  end
  arg = arg + 4 + 2 * field_count
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
                 ttl_seconds: int, entities_per_call: int = 100, retries: int = 3, retry_delay_s: float = 0.5):
        self.client = client
        self.layout = layout
        self.entity = entity
        self.names = list(names)
        self.ttl_ms = int(ttl_seconds * 1000)
        self.entities_per_call = entities_per_call
        self.retries = retries
        self.retry_delay_s = retry_delay_s
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
        args: list = [self.ttl_ms, 1 if backfill else 0]
        for entity in group:
            if len(entity.values) != len(self.names):
                raise ValueError(f"{self.entity} {entity.entity_id}: {len(entity.values)} values for "
                                 f"{len(self.names)} features")
            keys += [self.layout.vector(self.entity, entity.entity_id), self.layout.fields(self.entity, entity.entity_id)]
            fields = readable_fields(self.names, entity.values, entity.stamp)
            args += [entity.stamp.newest_event_ms, entity.stamp.events_counted, pack(entity.stamp, entity.values),
                     len(fields)]
            for name, value in fields.items():
                args += [name, value]
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


def connect(redis_config, socket_timeout_s: float = 30.0) -> redis.Redis:
    """Return a client for the configured Redis (a RedisConfig: host, port, password)."""
    return redis.Redis(host=redis_config.host, port=redis_config.port, password=redis_config.password or None,
                       socket_timeout=socket_timeout_s)


def read_stamp(client: redis.Redis, layout: KeyLayout, entity: str, entity_id: str) -> Optional[Stamp]:
    """Return the stored stamp of an entity, or None when Redis has no values for it."""
    newest, counted, ingest = client.hmget(layout.fields(entity, entity_id), *STAMP_FIELDS)
    if newest is None:
        return None
    return Stamp(int(newest), int(counted), int(ingest))
