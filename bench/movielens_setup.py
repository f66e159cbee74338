"""MovieLens in a lake, topic and Redis prefix of a benchmark's own: the set-up that benchmarks share.

Benchmark scripts import this module as a sibling (``bench/`` is the script's folder, so it is on
``sys.path``). ``bench_config`` names a fresh topic, a temporary lake and a Redis prefix.
``load_movielens`` replays the MovieLens ratings into that topic, ingests them to bronze, writes the
catalogue and backfills the features into the lake and Redis. ``drop_bench_data`` removes them again.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from reccore.config import Config

log = logging.getLogger("bench.movielens_setup")


def with_sections(config: Config, **sections) -> Config:
    """Return ``config`` with the given fields replaced, section by section."""
    changes = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(config, **changes)


def bench_config(base: Config, label: str, suffix: str, **sections) -> Config:
    """Return ``base`` with topic ``bench-<label>-<suffix>``, a new temporary lake and Redis prefix ``bench-<suffix>``.

    ``sections`` change further fields, as in ``with_sections``.
    """
    work = Path(tempfile.mkdtemp(prefix=f"streamrec-bench-{label}-"))
    config = with_sections(base, kafka={"interactions_topic": f"bench-{label}-{suffix}"},
                           lake={"root": str(work / "lake"), "checkpoint_root": str(work / "cp")},
                           ingest={"trigger": "available_now", "metrics_port": 0},
                           redis={"key_prefix": f"bench-{suffix}"})
    return with_sections(config, **sections)


def load_movielens(config: Config, spark_name: str):
    """Replay, ingest and backfill MovieLens under ``config``; return the Spark session and the feature set.

    Creates ``config.kafka.interactions_topic`` with 2 partitions first. The caller stops the session.
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    from jobs.backfill import run_backfill
    from jobs.ingest import IngestJob
    from jobs.items import DEFAULT_MOVIES, read_catalog, write_catalog
    from jobs.lib.session import build_spark
    from jobs.replay import DEFAULT_RATINGS, Publisher, movielens_events, movielens_record, publish
    from reccore.features import load_feature_set

    topic = config.kafka.interactions_topic
    admin = AdminClient(config.kafka.client_options())
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(timeout=30)

    rows = movielens_events(DEFAULT_RATINGS, 1)
    publisher = Publisher(config.kafka.client_options(), topic)
    publish((movielens_record(*row) for row in rows), publisher, len(rows), speedup=0.0, progress=True)
    if publisher.flush(300) or publisher.failed:
        raise RuntimeError(f"replay into {topic} failed: {publisher.first_error}")
    spark = build_spark(config, spark_name)
    job = IngestJob(spark, config)
    job.start().awaitTermination()
    job.close()
    feature_set = load_feature_set()
    write_catalog(spark, config, read_catalog(DEFAULT_MOVIES))
    run_backfill(spark, config, feature_set)
    return spark, feature_set


def delete_topic(config: Config, topic: Optional[str] = None) -> None:
    """Delete ``topic`` (default: the benchmark's ``kafka.interactions_topic``); log a failure, never raise."""
    from confluent_kafka.admin import AdminClient

    topic = topic or config.kafka.interactions_topic
    admin = AdminClient(config.kafka.client_options())
    try:
        admin.delete_topics([topic])[topic].result(timeout=30)
    except Exception as error:  # noqa: BLE001 - confluent-kafka raises KafkaException and timeouts
        log.error("could not delete topic %s: %s; delete it by hand", topic, error)


def drop_bench_data(config: Config, delete_model: bool = True) -> None:
    """Delete the Redis prefix, the topic, the temporary lake and (``delete_model``) the registered model.

    Every step runs even when an earlier one fails; each failure is logged.
    """
    import redis

    prefix = config.redis.key_prefix
    try:
        client = redis.Redis(host=config.redis.host, port=config.redis.port, password=config.redis.password or None,
                             socket_timeout=30)
        deleted = 0
        batch: list = []
        for key in client.scan_iter(f"{prefix}:*", count=5000):
            batch.append(key)
            if len(batch) == 5000:
                deleted += client.unlink(*batch)
                batch = []
        if batch:
            deleted += client.unlink(*batch)
        client.close()
        log.info("deleted %d Redis keys under prefix %s", deleted, prefix)
    except redis.RedisError as error:
        log.error("could not delete the Redis keys under %s: %s; delete them by hand", prefix, error)

    delete_topic(config)

    work = Path(config.lake.root).parent
    if work.name.startswith("streamrec-bench-"):
        shutil.rmtree(work, ignore_errors=True)

    if delete_model:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=config.mlflow.tracking_uri, registry_uri=config.mlflow.tracking_uri)
            client.delete_registered_model(config.training.model_name)
            experiment = client.get_experiment_by_name(config.training.experiment)
            if experiment is not None:
                client.delete_experiment(experiment.experiment_id)
            log.info("deleted model %s and experiment %s from %s", config.training.model_name,
                     config.training.experiment, config.mlflow.tracking_uri)
        except Exception as error:  # noqa: BLE001 - MLflow raises its own and HTTP errors
            log.error("could not delete model %s from %s: %s", config.training.model_name,
                      config.mlflow.tracking_uri, error)
