"""Shared fixtures.

Tiers: unit tests need nothing; tests marked ``integration`` use the local stack that
``make test`` (or ``python -m devstack up``) started once for the whole run; ``spark`` tests share
one in-process SparkSession. Each test gets its own Kafka topic, lake folder and checkpoint, so tests
never see each other's data. The MovieLens bronze table is built once per run by the README's own
commands and shared read-only.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from reccore.config import PROJECT_ROOT, Config, load_config

MOVIELENS_RATINGS = 100_836


@pytest.fixture(scope="session")
def base_config() -> Config:
    """The local configuration, as the environment resolves it."""
    return load_config("local")


@pytest.fixture(scope="session")
def kafka_settings(base_config):
    """confluent-kafka settings for the stack's broker; fails the test when the broker is down."""
    from confluent_kafka.admin import AdminClient

    settings = {"bootstrap.servers": base_config.kafka.bootstrap_servers}
    admin = AdminClient(settings)
    try:
        admin.list_topics(timeout=15)
    except Exception as error:  # noqa: BLE001 - any client error means the same thing here
        pytest.fail(f"Kafka is not reachable at {base_config.kafka.bootstrap_servers} ({error}); "
                    "start the stack with `.venv/bin/python -m devstack up` or run `make test`")
    return settings


@pytest.fixture
def make_topic(kafka_settings, request):
    """Create a fresh topic for this test: ``make_topic(partitions=2) -> name``."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(kafka_settings)
    created = []

    def create(partitions: int = 2) -> str:
        safe = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[:60]
        name = f"t-{safe}-{uuid.uuid4().hex[:8]}"
        futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        futures[name].result(timeout=30)
        _wait_for_topic(admin, name, partitions)
        created.append(name)
        return name

    yield create
    if created:
        for future in admin.delete_topics(created).values():
            try:
                future.result(timeout=30)
            except Exception:  # noqa: BLE001 - cleanup only; a leftover topic harms no other test
                pass


def _wait_for_topic(admin, name: str, partitions: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        topic = admin.list_topics(name, timeout=10).topics.get(name)
        if topic is not None and topic.error is None and len(topic.partitions) == partitions:
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} did not get {partitions} partitions within {timeout_s} s")


def with_overrides(config: Config, **sections) -> Config:
    """Return ``config`` with fields of its sections replaced: ``with_overrides(c, ingest={...})``."""
    changes = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(config, **changes)


@pytest.fixture
def make_config(base_config, tmp_path):
    """Build a config whose lake and checkpoints live in this test's folder."""

    def build(topic: str, **ingest) -> Config:
        ingest.setdefault("metrics_port", 0)
        return with_overrides(
            base_config,
            kafka={"interactions_topic": topic},
            lake={"root": str(tmp_path / "lake"), "checkpoint_root": str(tmp_path / "checkpoints")},
            ingest=ingest,
        )

    return build


@pytest.fixture(scope="session")
def spark(base_config):
    """One in-process SparkSession for the whole run (local[2], UI off, two shuffle partitions)."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from jobs.lib.session import build_spark

    session = build_spark(base_config, "streamrec-tests")
    yield session
    session.stop()


def produce(settings: dict, topic: str, values: list, keys: list | None = None, partition: int | None = None) -> None:
    """Publish raw message values (bytes or str) and wait until Kafka acknowledged every one."""
    from confluent_kafka import Producer

    producer = Producer({**settings, "acks": "all", "enable.idempotence": True})
    failures = []

    def on_delivery(error, _message):
        if error is not None:
            failures.append(error)

    for index, value in enumerate(values):
        message = {"value": value.encode() if isinstance(value, str) else value,
                   "key": keys[index].encode() if keys else None, "on_delivery": on_delivery}
        if partition is not None:
            message["partition"] = partition
        for _attempt in range(600):
            try:
                producer.produce(topic, **message)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.1)
        else:
            raise TimeoutError("the producer queue stayed full for 60 s")
        producer.poll(0)
    remaining = producer.flush(60)
    assert remaining == 0, f"{remaining} messages were not acknowledged by Kafka"
    assert not failures, f"Kafka rejected messages: {failures[:3]}"


def project_env(config_overrides: dict) -> dict:
    """Environment for a subprocess of the project, with STREAMREC__* overrides and loopback Spark."""
    env = dict(os.environ)
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    env["PYTHONUNBUFFERED"] = "1"
    for dotted, value in config_overrides.items():
        env["STREAMREC__" + dotted.upper().replace(".", "__")] = str(value)
    return env


@dataclasses.dataclass(frozen=True)
class MovieLensBronze:
    """The real-data fixture: MovieLens replayed through Kafka into bronze by the README's commands."""

    topic: str
    lake_root: Path
    checkpoint_root: Path
    events_path: str
    ingest_log: str


@pytest.fixture(scope="session")
def movielens_bronze(kafka_settings, tmp_path_factory) -> MovieLensBronze:
    """Replay all MovieLens ratings and ingest them with spark-submit, once per test run (read-only)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    root = tmp_path_factory.mktemp("movielens")
    topic = f"movielens-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(kafka_settings)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(timeout=30)
    _wait_for_topic(admin, topic, 2)

    env = project_env({
        "kafka.interactions_topic": topic,
        "lake.root": root / "lake",
        "lake.checkpoint_root": root / "checkpoints",
        "ingest.metrics_port": 0,
    })
    replay = subprocess.run([sys.executable, "-m", "jobs.replay", "movielens", "--no-progress"],
                            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, f"replay failed:\n{replay.stderr[-3000:]}"
    ingest = subprocess.run(["./spark-submit.sh", "ingest", "--trigger", "available_now"],
                            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert ingest.returncode == 0, f"ingest failed:\n{ingest.stdout[-5000:]}\n{ingest.stderr[-5000:]}"
    return MovieLensBronze(topic=topic, lake_root=root / "lake", checkpoint_root=root / "checkpoints",
                           events_path=str(root / "lake" / "bronze" / "events"),
                           ingest_log=ingest.stdout + ingest.stderr)


@dataclasses.dataclass(frozen=True)
class MovieLensFeatures:
    """MovieLens bronze copied into a lake of its own, with the catalogue and a full feature backfill."""

    config: Config
    result: object


@pytest.fixture(scope="session")
def movielens_features(movielens_bronze, spark, base_config, tmp_path_factory):
    """Backfill the shared MovieLens bronze once per run into its own lake and Redis prefix (read-only).

    Tests that write (a training set, say) copy ``config.lake.root`` first.
    """
    import shutil

    import redis

    from jobs.backfill import run_backfill
    from jobs.items import DEFAULT_MOVIES, read_catalog, write_catalog
    from reccore.features import load_feature_set

    root = tmp_path_factory.mktemp("movielens-features")
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    config = dataclasses.replace(
        base_config,
        lake=dataclasses.replace(base_config.lake, root=str(root / "lake"), checkpoint_root=str(root / "checkpoints")),
        redis=dataclasses.replace(base_config.redis, key_prefix=prefix))
    shutil.copytree(movielens_bronze.events_path, config.lake.table("bronze/events"))
    write_catalog(spark, config, read_catalog(DEFAULT_MOVIES))
    result = run_backfill(spark, config, load_feature_set())
    yield MovieLensFeatures(config, result)

    client = redis.Redis(host=config.redis.host, port=config.redis.port, socket_timeout=30)
    keys = list(client.scan_iter(f"{prefix}:*", count=5000))
    for start in range(0, len(keys), 5000):
        client.delete(*keys[start:start + 5000])
    client.close()


@dataclasses.dataclass(frozen=True)
class MovieLensTrainingSet:
    """A copy of the MovieLens features lake with its training set built."""

    config: Config
    built: object


@pytest.fixture(scope="session")
def movielens_training_set(movielens_features, spark, tmp_path_factory):
    """Copy the backfilled MovieLens lake once per run and build its training set (tests use their own model names)."""
    import shutil

    from jobs.training_set import build_training_set
    from reccore.features import load_feature_set

    root = tmp_path_factory.mktemp("movielens-training")
    source = movielens_features.config
    config = dataclasses.replace(source, lake=dataclasses.replace(source.lake, root=str(root / "lake"),
                                                                   checkpoint_root=str(root / "checkpoints")))
    shutil.copytree(source.lake.root, config.lake.root)
    return MovieLensTrainingSet(config, build_training_set(spark, config, load_feature_set()))


@pytest.fixture(scope="session")
def movielens_champion(movielens_training_set, spark, tmp_path_factory):
    """A champion of the run's own, trained on the shared MovieLens training set: its config (scorer tests).

    The model name is unique to the run; tests may move its alias but must leave a champion behind.
    Its compiled predictors go to a folder of the run's own.
    """
    from jobs.train import run_training
    from reccore.features import load_feature_set

    suffix = uuid.uuid4().hex[:8]
    config = with_overrides(movielens_training_set.config,
                            training={"model_name": f"test-scorer-{suffix}", "experiment": f"test-scorer-{suffix}"},
                            serving={"redis_timeout_ms": 2000.0,
                                     "compiled_cache_dir": str(tmp_path_factory.mktemp("compiled-models"))})
    result = run_training(spark, config, load_feature_set())
    assert result.promoted, result.reasons
    return config
