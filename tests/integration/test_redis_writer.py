"""The Redis feature writer against the stack's real Redis: versioning, atomic replace, errors."""

from __future__ import annotations

from array import array

import random
import socket
import uuid

import pytest
import redis

from jobs.lib.redis_writer import EntityValues, FeatureWriter, RedisWriteError, read_stamp
from reccore.store import KeyLayout, Stamp, readable_fields, unpack

pytestmark = pytest.mark.integration

NAMES = ["rating_count_30d_user", "rating_mean_30d_user", "positive_share_30d_user"]
TTL_SECONDS = 30 * 86400


@pytest.fixture
def client(base_config):
    connection = redis.Redis(host=base_config.redis.host, port=base_config.redis.port,
                             password=base_config.redis.password or None, socket_timeout=10)
    try:
        connection.ping()
    except redis.ConnectionError as error:
        pytest.fail(f"Redis is not reachable at {base_config.redis.host}:{base_config.redis.port} ({error}); "
                    "start the stack with `.venv/bin/python -m devstack up` or run `make test`")
    yield connection
    connection.close()


@pytest.fixture
def layout(client):
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    yield KeyLayout(prefix, "v1")
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


def writer(client, layout, **options) -> FeatureWriter:
    return FeatureWriter(client, layout, "user", NAMES, TTL_SECONDS, **options)


def test_write_and_read_back(client, layout):
    stamp = Stamp(1537799250000, 12, 1796416765000)
    written, kept = writer(client, layout).write([EntityValues("42", stamp, [12, 3.75, None])])
    assert (written, kept) == (1, 0)

    read, values = unpack(client.get(layout.vector("user", "42")), len(NAMES))
    assert read == stamp
    assert values[:2] == [12.0, 3.75]
    fields = client.hgetall(layout.fields("user", "42"))
    assert fields[b"rating_mean_30d_user"] == b"3.75"
    assert fields[b"positive_share_30d_user"] == b"nan"
    assert read_stamp(client, layout, "user", "42") == stamp
    assert client.pttl(layout.vector("user", "42")) > (TTL_SECONDS - 60) * 1000
    assert client.pttl(layout.fields("user", "42")) > (TTL_SECONDS - 60) * 1000


def test_older_stamp_kept(client, layout):
    feature_writer = writer(client, layout)
    feature_writer.write([EntityValues("u", Stamp(2000, 5), [5, 4.0, 0.8])])

    assert feature_writer.write([EntityValues("u", Stamp(1000, 50), [50, 1.0, 0.1])]) == (0, 1)
    assert feature_writer.write([EntityValues("u", Stamp(2000, 4), [4, 1.0, 0.1])]) == (0, 1)
    assert read_stamp(client, layout, "user", "u") == Stamp(2000, 5)

    assert feature_writer.write([EntityValues("u", Stamp(3000, 1), [1, 2.0, 0.0])]) == (1, 0)
    _, values = unpack(client.get(layout.vector("user", "u")), len(NAMES))
    assert values == [1.0, 2.0, 0.0]


def test_tie_goes_to_backfill(client, layout):
    feature_writer = writer(client, layout)
    feature_writer.write([EntityValues("u", Stamp(2000, 5), [5, 4.0, 0.8])])

    assert feature_writer.write([EntityValues("u", Stamp(2000, 5), [9, 9.0, 0.9])], backfill=False) == (0, 1)
    assert feature_writer.write([EntityValues("u", Stamp(2000, 5), [5, 3.0, 0.6])], backfill=True) == (1, 0)
    assert client.hget(layout.fields("user", "u"), "rating_mean_30d_user") == b"3"


def test_replayed_write_same_state(client, layout):
    batch = [EntityValues(str(n), Stamp(1000 + n, n + 1), [n, 3.0, 0.5]) for n in range(50)]
    feature_writer = writer(client, layout)
    feature_writer.write(batch)
    snapshot = {key: client.get(key) for key in client.scan_iter(f"{layout.base}:*:vec")}

    feature_writer.write(batch)
    feature_writer.write(batch, backfill=True)
    assert {key: client.get(key) for key in client.scan_iter(f"{layout.base}:*:vec")} == snapshot


def test_many_entities_pipelined(client, layout):
    batch = [EntityValues(f"e{n}", Stamp(5000, 1), [n, 1.0, 1.0]) for n in range(2500)]
    assert writer(client, layout, entities_per_call=50).write(batch) == (2500, 0)
    assert len(list(client.scan_iter(f"{layout.base}:user:*:vec", count=5000))) == 2500


def test_rejected_reply_names_entity(client, layout):
    client.set(layout.fields("user", "broken"), "not a hash")
    batch = [EntityValues("broken", Stamp(1, 1), [1, 1.0, 1.0])]
    with pytest.raises(RedisWriteError, match="first id broken"):
        writer(client, layout).write(batch)
    # Nothing of the entity was written: its vector is still absent.
    assert client.get(layout.vector("user", "broken")) is None


def test_hash_formatted_on_server_reads_back_as_float32(client, layout):
    generator = random.Random(7)
    stamp = Stamp(1537799250123, 987654, 1796416765456)
    batch = []
    for number in range(200):
        values = [generator.choice([None, 0.0, generator.randint(0, 10**6), generator.uniform(-1e6, 1e6),
                                    generator.uniform(0, 1e-6)]) for _ in NAMES]
        batch.append(EntityValues(f"r{number}", stamp, values))
    assert writer(client, layout).write(batch) == (200, 0)
    for entity in batch:
        stored = {key.decode(): value.decode() for key, value in client.hgetall(layout.fields("user", entity.entity_id)).items()}
        assert stored == readable_fields(NAMES, entity.values, stamp), entity
        _, vector = unpack(client.get(layout.vector("user", entity.entity_id)), len(NAMES))
        for name, value in zip(NAMES, vector):
            if value != value:
                assert stored[name] == "nan"
            else:
                assert array("f", [float(stored[name])])[0] == value, (name, stored[name], value)


def test_without_readable_hash_only_vectors(client, layout):
    feature_writer = writer(client, layout, readable_hash=False)
    assert feature_writer.write([EntityValues("v", Stamp(2000, 5), [5, 4.0, 0.8])]) == (1, 0)
    assert client.exists(layout.fields("user", "v")) == 0
    assert read_stamp(client, layout, "user", "v") == Stamp(2000, 5)
    assert feature_writer.write([EntityValues("v", Stamp(1000, 9), [9, 1.0, 0.1])]) == (0, 1)
    assert unpack(client.get(layout.vector("user", "v")), len(NAMES))[1][0] == 5.0


def test_wrong_value_count_rejected(client, layout):
    with pytest.raises(ValueError, match="user short: 2 values for 3 features"):
        writer(client, layout).write([EntityValues("short", Stamp(1, 1), [1, 2])])


def test_unreachable_redis_fails_after_retries():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    unreachable = redis.Redis(host="127.0.0.1", port=closed_port, socket_connect_timeout=1)
    feature_writer = FeatureWriter(unreachable, KeyLayout("test", "v1"), "user", NAMES, TTL_SECONDS,
                                   retries=2, retry_delay_s=0.01)
    with pytest.raises(RedisWriteError, match="failed after 2 retries"):
        feature_writer.write([EntityValues("u", Stamp(1, 1), [1, 1.0, 1.0])])
