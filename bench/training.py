"""Ranking quality and training cost on MovieLens: the model against popularity and co-occurrence.

    .venv/bin/python bench/training.py

Needs the stack (make stack-up: Kafka, Redis, MLflow). In a fresh topic, lake and Redis prefix it
replays the MovieLens ratings, ingests them, loads the catalogue and backfills the features. Then
it builds the training set and runs the training job, both timed. The model gets a name of its
own, so the project's registry is left alone. Prints ``name: value`` lines: warm users unless the
name ends in ``_cold``, the protocol of jobs/train.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewTopic

from jobs.backfill import run_backfill
from jobs.ingest import IngestJob
from jobs.items import DEFAULT_MOVIES, read_catalog, write_catalog
from jobs.lib.session import build_spark
from jobs.replay import DEFAULT_RATINGS, Publisher, movielens_events, movielens_record, publish
from jobs.train import run_training
from jobs.training_set import build_training_set
from reccore.config import Config, load_config
from reccore.features import load_feature_set

log = logging.getLogger("bench.training")


def with_sections(config: Config, **sections) -> Config:
    changes = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(config, **changes)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    base = load_config("local")
    work = Path(tempfile.mkdtemp(prefix="streamrec-bench-train-"))
    suffix = uuid.uuid4().hex[:8]
    topic = f"bench-train-{suffix}"
    admin = AdminClient(base.kafka.client_options())
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(timeout=30)
    config = with_sections(base, kafka={"interactions_topic": topic},
                           lake={"root": str(work / "lake"), "checkpoint_root": str(work / "cp")},
                           ingest={"trigger": "available_now", "metrics_port": 0},
                           redis={"key_prefix": f"bench-{suffix}"},
                           training={"model_name": f"bench-ranker-{suffix}", "experiment": f"bench-ranking-{suffix}"})

    rows = movielens_events(DEFAULT_RATINGS, 1)
    publisher = Publisher(config.kafka.client_options(), topic)
    publish((movielens_record(*row) for row in rows), publisher, len(rows), speedup=0.0, progress=True)
    if publisher.flush(300) or publisher.failed:
        raise RuntimeError(f"replay into {topic} failed: {publisher.first_error}")
    spark = build_spark(config, "streamrec-bench-training")
    job = IngestJob(spark, config)
    job.start().awaitTermination()
    job.close()
    feature_set = load_feature_set()
    write_catalog(spark, config, read_catalog(DEFAULT_MOVIES))
    run_backfill(spark, config, feature_set)

    started = time.monotonic()
    built = build_training_set(spark, config, feature_set)
    build_s = time.monotonic() - started
    result = run_training(spark, config, feature_set)
    metrics = result.metrics
    lines = [f"training_examples: {built.examples}", f"training_set_build_s: {build_s:.1f}",
             f"train_s: {metrics['train_s']:.1f}", f"best_iteration: {metrics['best_iteration']:.0f}",
             f"evaluated_users: {metrics['users']:.0f}", f"evaluated_users_cold: {metrics['users_cold']:.0f}"]
    for suffix_name in ("", "_cold"):
        for metric, methods in (("ndcg", ("model", "popularity", "cooccurrence")), ("recall", ("model", "popularity"))):
            for method in methods:
                lines.append(f"{metric}_at_10_{method}{suffix_name}: {metrics[f'{method}_{metric}_at_10{suffix_name}']:.4f}")
    lines += [f"auc_model: {metrics['model_auc']:.4f}", f"log_loss_model: {metrics['model_log_loss']:.4f}",
              f"registered: {result.registered_version is not None}"]
    sys.stdout.write("\n".join(lines) + "\n")
    admin.delete_topics([topic])
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
