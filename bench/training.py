"""Ranking quality and training cost on MovieLens: the model against popularity and co-occurrence.

    .venv/bin/python bench/training.py

Needs the stack (make stack-up: Kafka, Redis, MLflow). In a fresh topic, lake and Redis prefix it
replays the MovieLens ratings, ingests them, loads the catalogue and backfills the features. Then
it builds the training set and runs the training job, both timed. The model gets a name of its
own, so the project's registry is left alone. Prints ``name: value`` lines: warm users unless the
name ends in ``_cold``, the protocol of jobs/train.py.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid

from jobs.train import run_training
from jobs.training_set import build_training_set
from movielens_setup import bench_config, delete_topic, load_movielens
from reccore.config import load_config

log = logging.getLogger("bench.training")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    suffix = uuid.uuid4().hex[:8]
    config = bench_config(load_config("local"), "train", suffix,
                          training={"model_name": f"bench-ranker-{suffix}", "experiment": f"bench-ranking-{suffix}"})
    spark, feature_set = load_movielens(config, "streamrec-bench-training")

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
    delete_topic(config)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
