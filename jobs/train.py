"""Train the LightGBM ranker on the point-in-time training set, evaluate it, register and maybe promote it.

    ./spark-submit.sh train [--training-set-version N] [--sample-fraction 0.05] [--no-promote] [--dry-run]

Exit codes: 0 registered (promoted or kept as challenger), 3 not registered because it did not
beat the popularity baseline, 4 the training set failed its quality gate (each failed expectation
is named in the log), 2 an input is missing, 1 any other failure.

The model. LightGBM with the binary objective: a row is one labelled example (relevance above 0
is the positive class), and its score is the probability that the user rates the item 4 or more.
Binary rather than lambdarank because the labels are pointwise (one rating says nothing about
another the user gave years apart, which a per-user query group would compare), and because the
evaluation reports log loss, which needs probabilities. Early stopping watches the validation
period's AUC. Rows are built by ``reccore.ranking.model_rows``, the code the scorer uses; a missing
value stays NaN, and LightGBM learns a branch for it: a user's first ratings have no history, so
the training set itself holds cold rows.

The evaluation protocol (also in the README and logged with every run):
- periods by event time of the labelled events: train, then validation, then test (the last
  ``training.test_fraction``); never a random split across time;
- users: those with at least one relevant item in the test period; warm when they have an event
  before it, cold otherwise; reported separately;
- candidates per user: every item with an event before the test period that the user had not
  interacted with before it; features of users and items as of the test period's start;
- relevance: a rating of 4 or more (relevance above 0) in the test period; k from ``training.k``;
- baselines on the same candidates: popularity (events before the test period) and item
  co-occurrence (cosine over users' positive items before it, scored against the user's positives).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs import bronze, quality
from jobs.backfill import HISTORY_TABLES
from jobs.lib.session import build_spark
from jobs.registry import CHALLENGER, CHAMPION, RegistryError, alias_version, client_for, promote
from jobs.training_set import TRAINING_TABLE, features_as_of, relevance_column
from reccore import evaluation
from reccore.config import Config, load_config, log_config
from reccore.features import FeatureSet, load_feature_set
from reccore.ranking import category_matrix, model_feature_names, model_rows, reorder_columns
from reccore.store import KeyLayout

log = logging.getLogger("jobs.train")

NOT_REGISTERED = 3
GATE_FAILED = 4
# Neighbours per item in the co-occurrence lists logged with the model (the scorer's candidates).
COOCCURRENCE_NEIGHBOURS = 20
METHODS = ("model", "popularity", "cooccurrence")
# The phases of run_training, in order, as reported to its ``progress`` callback when each one ends.
# A run that is not registered ends after "run logged".
TRAINING_PHASES = ("training set loaded", "booster trained", "model evaluated", "run logged", "model registered",
                   "promotion decided")


@dataclass
class EvaluationSet:
    """The test period's users, candidates and features as of its start, shared by every method."""

    test_start_ms: int
    k: int
    users: list
    segments: dict
    relevant: dict
    consumed: dict
    positives_before: dict
    candidates: np.ndarray
    item_rows: np.ndarray
    item_newest_ms: np.ndarray
    item_categories: np.ndarray
    user_rows: dict
    user_newest_ms: dict
    popularity: dict
    cooccurrence: evaluation.ItemCooccurrence


@dataclass
class TrainResult:
    """Outcome of one training run."""

    run_id: str
    metrics: dict
    registered_version: Optional[str] = None
    promoted: bool = False
    reasons: list = field(default_factory=list)


def load_examples(spark: SparkSession, config: Config, feature_set: FeatureSet,
                  version: Optional[int]) -> tuple[pd.DataFrame, int, dict]:
    """Return the training examples as pandas (after the quality gate), the table version read and the build's metadata."""
    path = config.lake.table(TRAINING_TABLE)
    if not DeltaTable.isDeltaTable(spark, path):
        raise FileNotFoundError(f"no training set at {path}; run `./spark-submit.sh training-set` first")
    history = DeltaTable.forPath(spark, path).history()
    version = version if version is not None else history.agg(F.max("version")).first()[0]
    commit = history.where(F.col("version") == version).select("userMetadata").first()
    if commit is None:
        raise FileNotFoundError(f"training set {path} has no version {version}")
    metadata = json.loads(commit["userMetadata"] or "{}")
    table = spark.read.format("delta").option("versionAsOf", version).load(path)
    quality.enforce(table, "training_set", config, feature_set)
    return table.toPandas(), int(version), metadata


def feature_rows(frame: pd.DataFrame, feature_set: FeatureSet, at_ms: np.ndarray) -> np.ndarray:
    """Return model rows for examples that carry user and item feature columns."""
    def matrix(names):
        return frame[names].to_numpy(dtype=np.float32, na_value=np.nan)

    return model_rows(feature_set, matrix(feature_set.names("user")),
                      frame["user_newest_ms"].to_numpy(dtype=np.float64, na_value=np.nan),
                      matrix(feature_set.names("item")),
                      frame["item_newest_ms"].to_numpy(dtype=np.float64, na_value=np.nan),
                      category_matrix(frame["item_category_codes"].tolist(), len(feature_set.categories)), at_ms)


def split_examples(frame: pd.DataFrame, config: Config) -> tuple[evaluation.TimeSplit, np.ndarray]:
    """Return the time split (over labelled events) and each example's period name."""
    settings = config.training
    labelled = frame.loc[frame["source"] == "event", "label_ms"].to_numpy()
    split = evaluation.time_split(labelled.tolist(), settings.validation_fraction, settings.test_fraction)
    times = frame["label_ms"].to_numpy()
    periods = np.where(times >= split.test_start_ms, "test",
                       np.where(times >= split.validation_start_ms, "validation", "train"))
    return split, periods


def train_booster(config: Config, rows: np.ndarray, labels: np.ndarray, periods: np.ndarray, names: list[str],
                  sample_fraction: float):
    """Train on the train period with early stopping on the validation period; return the booster."""
    import lightgbm

    settings = config.training
    train = periods == "train"
    if sample_fraction < 1.0:
        keep = np.random.default_rng(settings.seed).random(len(labels)) < sample_fraction
        train &= keep
        log.info("training on a %.0f%% sample of the train period: %d rows", sample_fraction * 100, train.sum())
    valid = periods == "validation"
    params = {"metric": ["auc", "binary_logloss"], "seed": settings.seed, "deterministic": True,
              "verbosity": -1, "first_metric_only": True, **settings.lightgbm}
    train_set = lightgbm.Dataset(rows[train], label=labels[train], feature_name=names, free_raw_data=False)
    valid_set = lightgbm.Dataset(rows[valid], label=labels[valid], reference=train_set)
    lightgbm.register_logger(log)
    booster = lightgbm.train(params, train_set, num_boost_round=settings.max_rounds, valid_sets=[valid_set],
                             valid_names=["validation"],
                             callbacks=[lightgbm.early_stopping(settings.early_stopping_rounds, verbose=True),
                                        lightgbm.log_evaluation(50)])
    log.info("trained %d rounds (best %d) on %d rows, validated on %d", booster.current_iteration(),
             booster.best_iteration, train.sum(), valid.sum())
    return booster, params


def build_evaluation_set(spark: SparkSession, config: Config, feature_set: FeatureSet, frame: pd.DataFrame,
                         split: evaluation.TimeSplit, cutoff_ms: int) -> EvaluationSet:
    """Gather the test period's users, their candidates and the features as of its start."""
    test_start = split.test_start_ms
    events = (spark.read.format("delta").load(config.lake.table(bronze.EVENTS_TABLE))
              .where(F.unix_micros("ingest_time") / 1000 <= F.lit(cutoff_ms))
              .select("user_id", "item_id", (F.unix_micros("event_time") / 1000).cast("long").alias("event_ms"),
                      relevance_column(config.training).alias("relevance"))
              .toPandas())
    before = events[events["event_ms"] < test_start]
    first_event = events.groupby("user_id")["event_ms"].min().to_dict()
    test = frame[(frame["source"] == "event") & (frame["label_ms"] >= test_start) & (frame["relevance"] > 0)]
    relevant = test.groupby("user_id")["item_id"].agg(set).to_dict()
    users = sorted(relevant)
    segments = evaluation.user_segments({user: first_event[user] for user in users}, test_start)
    consumed = before.groupby("user_id")["item_id"].agg(set).to_dict()
    positive_before = before[before["relevance"].fillna(0) > 0]
    positives_before = positive_before.groupby("user_id")["item_id"].agg(set).to_dict()
    candidates = np.array(sorted(before["item_id"].unique()), dtype=object)
    triples = list(zip(before["user_id"], before["item_id"], before["event_ms"].astype(int)))
    popularity = evaluation.popularity_scores(triples, test_start)
    cooccurrence = evaluation.ItemCooccurrence().fit(
        list(zip(positive_before["user_id"], positive_before["item_id"], positive_before["event_ms"].astype(int))),
        test_start)

    def as_of(entity: str, ids) -> pd.DataFrame:
        keys = spark.createDataFrame([(str(entity_id), str(entity_id), test_start, cutoff_ms) for entity_id in ids],
                                     "key_id string, entity_id string, at_ms long, ingest_limit_ms long")
        history = spark.read.format("delta").load(config.lake.table(HISTORY_TABLES[entity]))
        return features_as_of(keys, history, feature_set.names(entity), "", cutoff_ms).toPandas().set_index("key_id")

    items = as_of("item", candidates).reindex(candidates)
    user_features = as_of("user", users).reindex(users)
    item_codes = (spark.read.format("delta").load(config.lake.table("silver/items"))
                  .select("item_id", "genres").toPandas().set_index("item_id")["genres"].to_dict())
    codes = {category: code for code, category in enumerate(feature_set.categories)}
    categories = category_matrix([[codes[genre] for genre in item_codes.get(item, []) if genre in codes]
                                  for item in candidates], len(feature_set.categories))
    user_names = feature_set.names("user")
    log.info("evaluation: test period from %d, %d users (%d warm), %d candidate items", test_start, len(users),
             sum(1 for segment in segments.values() if segment == "warm"), len(candidates))
    return EvaluationSet(
        test_start, config.training.k, users, segments, relevant, consumed, positives_before, candidates,
        items[feature_set.names("item")].to_numpy(dtype=np.float32, na_value=np.nan),
        items["newest_ms"].to_numpy(dtype=np.float64, na_value=np.nan), categories,
        {user: user_features.loc[user, user_names].to_numpy(dtype=np.float32, na_value=np.nan) for user in users},
        {user: float(user_features.loc[user, "newest_ms"]) if pd.notna(user_features.loc[user, "newest_ms"])
         else np.nan for user in users},
        popularity, cooccurrence)


def model_rankings(booster, model_names: list[str], feature_set: FeatureSet, data: EvaluationSet) -> dict:
    """Return each user's top k by the model: all candidates scored in one predict call per user."""
    names = model_feature_names(feature_set)
    rankings = {}
    count = len(data.candidates)
    at_ms = np.full(count, data.test_start_ms, dtype=np.float64)
    for user in data.users:
        rows = model_rows(feature_set, np.tile(data.user_rows[user], (count, 1)), np.full(count, data.user_newest_ms[user]),
                          data.item_rows, data.item_newest_ms, data.item_categories, at_ms)
        scores = booster.predict(reorder_columns(rows, names, model_names), num_iteration=booster.best_iteration or None)
        rankings[user] = evaluation.top_k(dict(zip(data.candidates, scores.tolist())), data.k,
                                          exclude=data.consumed.get(user, frozenset()))
    return rankings


def baseline_rankings(data: EvaluationSet) -> dict:
    """Return the popularity and co-occurrence top k of every user."""
    candidates = data.candidates.tolist()
    popularity, cooccurrence = {}, {}
    for user in data.users:
        exclude = data.consumed.get(user, frozenset())
        popularity[user] = evaluation.top_k(data.popularity, data.k, exclude=exclude)
        history = data.positives_before.get(user, set())
        if history:
            scores = data.cooccurrence.score(history, candidates)
            cooccurrence[user] = evaluation.top_k({item: score for item, score in scores.items() if score > 0},
                                                  data.k, exclude=exclude)
        else:
            cooccurrence[user] = []
    return {"popularity": popularity, "cooccurrence": cooccurrence}


def ranking_metrics(rankings: dict, data: EvaluationSet) -> dict:
    """Return ``<method>_<metric>_at_<k>[_cold]`` for every method and segment (warm has no suffix)."""
    metrics = {}
    for segment, suffix in (("warm", ""), ("cold", "_cold")):
        users = [user for user in data.users if data.segments[user] == segment]
        relevant = {user: data.relevant[user] for user in users}
        for method, by_user in rankings.items():
            report = evaluation.evaluate_rankings({user: by_user[user] for user in users}, relevant, data.k)
            for metric, value in (("precision", report.precision_at_k), ("recall", report.recall_at_k),
                                  ("ndcg", report.ndcg_at_k), ("map", report.map_at_k)):
                metrics[f"{method}_{metric}_at_{data.k}{suffix}"] = float(value)
            metrics[f"users{suffix}"] = float(report.users)
    return metrics


def save_plots(folder: Path, booster, names: list[str], labels: np.ndarray, scores: np.ndarray,
               metrics: dict, k: int) -> list[Path]:
    """Write the feature importance, ROC and precision-recall, and method comparison plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    paths = []
    gains = booster.feature_importance(importance_type="gain")
    order = np.argsort(gains)[-25:]
    figure, axis = plt.subplots(figsize=(8, 7))
    axis.barh([names[index] for index in order], gains[order])
    axis.set_title("Feature importance (total gain), top 25")
    figure.tight_layout()
    paths.append(folder / "feature_importance.png")
    figure.savefig(paths[-1])
    plt.close(figure)

    figure, (roc_axis, pr_axis) = plt.subplots(1, 2, figsize=(10, 4.5))
    false_positive, true_positive, _ = roc_curve(labels, scores)
    roc_axis.plot(false_positive, true_positive)
    roc_axis.plot([0, 1], [0, 1], linestyle="--", color="grey")
    roc_axis.set(title=f"ROC, test period (AUC {metrics['model_auc']:.3f})", xlabel="false positive rate",
                 ylabel="true positive rate")
    precision, recall, _ = precision_recall_curve(labels, scores)
    pr_axis.plot(recall, precision)
    pr_axis.set(title="Precision-recall, test period", xlabel="recall", ylabel="precision")
    figure.tight_layout()
    paths.append(folder / "roc_pr.png")
    figure.savefig(paths[-1])
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, suffix, title in ((axes[0], "", "warm users"), (axes[1], "_cold", "cold users")):
        metric_names = ["precision", "recall", "ndcg", "map"]
        width = 0.25
        for offset, method in enumerate(METHODS):
            values = [metrics.get(f"{method}_{metric}_at_{k}{suffix}", 0.0) for metric in metric_names]
            axis.bar(np.arange(len(metric_names)) + offset * width, values, width, label=method)
        axis.set_xticks(np.arange(len(metric_names)) + width, [f"{metric}@{k}" for metric in metric_names])
        axis.set_title(f"{title} ({int(metrics.get('users' + suffix, 0))})")
    axes[0].legend()
    figure.tight_layout()
    paths.append(folder / "metrics_vs_baselines.png")
    figure.savefig(paths[-1])
    plt.close(figure)
    return paths


def redis_has_features(config: Config, feature_set: FeatureSet, data: EvaluationSet) -> tuple[bool, str]:
    """Return whether Redis has this feature-set version (its manifest and sampled vectors), with the reason."""
    from jobs.lib.redis_writer import connect

    layout = KeyLayout(config.redis.key_prefix, feature_set.version)
    client = connect(config.redis, socket_timeout_s=10)
    try:
        if not client.exists(layout.manifest()):
            return False, f"Redis has no manifest of feature set {feature_set.version} ({layout.manifest()})"
        items = data.candidates[:: max(1, len(data.candidates) // 100)].tolist()
        users = [user for user in data.users if data.segments[user] == "warm"][:100]
        keys = [layout.vector("item", item) for item in items] + [layout.vector("user", user) for user in users]
        missing = [key for key, value in zip(keys, client.mget(keys)) if value is None]
        if missing:
            return False, f"Redis lacks {len(missing)} of {len(keys)} sampled vectors (first {missing[0]})"
        return True, f"Redis holds feature set {feature_set.version} for {len(keys)} sampled entities"
    except Exception as error:  # noqa: BLE001 - an unreachable Redis refuses the promotion, with the reason
        return False, f"Redis at {config.redis.host}:{config.redis.port} could not be checked: {error}"
    finally:
        client.close()


def run_training(spark: SparkSession, config: Config, feature_set: FeatureSet, training_set_version: Optional[int] = None,
                 sample_fraction: float = 1.0, allow_promotion: bool = True,
                 progress: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Train, evaluate, log to MLflow, register when it beats popularity, promote when it beats the champion.

    ``progress``, when given, is called with each name of ``TRAINING_PHASES`` as that phase ends.
    """
    import mlflow
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, Schema

    settings = config.training
    client = client_for(config)
    # Arrow converts the training set to pandas in columns, not row by row through Python.
    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    started = time.monotonic()
    frame, version, metadata = load_examples(spark, config, feature_set, training_set_version)
    if metadata.get("feature_set_version", feature_set.version) != feature_set.version:
        raise ValueError(f"training set version {version} was built with feature set "
                         f"{metadata['feature_set_version']}, but the configured one is {feature_set.version}")
    frame = frame.sort_values(["label_ms", "example_id"], kind="stable").reset_index(drop=True)
    names = model_feature_names(feature_set)
    rows = feature_rows(frame, feature_set, frame["label_ms"].to_numpy(dtype=np.float64))
    labels = (frame["relevance"].to_numpy() > 0).astype(np.int32)
    split, periods = split_examples(frame, config)
    log.info("training set version %d: %d examples (train %d, validation %d, test %d), %d features",
             version, len(frame), (periods == "train").sum(), (periods == "validation").sum(),
             (periods == "test").sum(), len(names))
    build_s = time.monotonic() - started
    report = progress or (lambda _phase: None)
    report(TRAINING_PHASES[0])

    began = time.monotonic()
    booster, params = train_booster(config, rows, labels, periods, names, sample_fraction)
    train_s = time.monotonic() - began
    report(TRAINING_PHASES[1])

    cutoff_ms = int(metadata.get("ingest_cutoff_ms") or time.time() * 1000)
    data = build_evaluation_set(spark, config, feature_set, frame, split, cutoff_ms)
    rankings = {"model": model_rankings(booster, names, feature_set, data), **baseline_rankings(data)}
    metrics = ranking_metrics(rankings, data)
    test = periods == "test"
    probabilities = booster.predict(rows[test], num_iteration=booster.best_iteration or None)
    metrics["model_auc"] = evaluation.auc(labels[test].tolist(), probabilities.tolist())
    metrics["model_log_loss"] = evaluation.log_loss(labels[test].tolist(), probabilities.tolist())
    test_items = frame.loc[test, "item_id"].tolist()
    metrics["popularity_auc"] = evaluation.auc(labels[test].tolist(), [data.popularity.get(item, 0.0) for item in test_items])
    metrics["train_s"] = train_s
    metrics["best_iteration"] = float(booster.best_iteration)
    report(TRAINING_PHASES[2])

    protocol = {
        "split": {"validation_start_ms": split.validation_start_ms, "test_start_ms": split.test_start_ms,
                  "validation_fraction": settings.validation_fraction, "test_fraction": settings.test_fraction},
        "users": "users with a relevant item in the test period; warm: an event before it, cold: none",
        "candidates": "items with an event before the test period, minus the user's items before it",
        "relevance": f"relevance above 0 in the test period (rating thresholds {settings.relevance_by_rating})",
        "k": settings.k, "features_as_of": "the test period's start", "objective": "binary",
    }
    mlflow.set_experiment(settings.experiment)
    result = TrainResult(run_id="", metrics=metrics)
    with mlflow.start_run(run_name=f"train-ts{version}") as run:
        result.run_id = run.info.run_id
        mlflow.log_params({**{f"lgb_{key}": value for key, value in params.items()},
                           "training_set_path": config.lake.table(TRAINING_TABLE), "training_set_version": version,
                           "bronze_version": metadata.get("bronze_version"), "ingest_cutoff_ms": cutoff_ms,
                           "feature_set_version": feature_set.version, "sample_fraction": sample_fraction,
                           "k": settings.k, "test_start_ms": split.test_start_ms,
                           "validation_start_ms": split.validation_start_ms})
        mlflow.log_metrics(metrics)
        mlflow.log_dict(protocol, "evaluation_protocol.json")
        mlflow.log_dict({"features": names, "feature_set_version": feature_set.version}, "model_features.json")
        mlflow.log_dict(feature_set.manifest(), "feature_manifest.json")
        mlflow.log_dict({item: data.cooccurrence.neighbours(item)[:COOCCURRENCE_NEIGHBOURS]
                         for item in data.candidates.tolist()}, "cooccurrence.json")
        top_items = evaluation.top_k(data.popularity, 1000) if data.popularity else []
        mlflow.log_dict({"as_of_ms": split.test_start_ms, "events": {item: data.popularity[item] for item in top_items}},
                        "popularity.json")
        with tempfile.TemporaryDirectory() as folder:
            for path in save_plots(Path(folder), booster, names, labels[test], probabilities, metrics, settings.k):
                mlflow.log_artifact(str(path), "plots")
        example = pd.DataFrame(rows[:5], columns=names)
        # Every input may be missing (NaN): a cold user or item has no stored values.
        signature = ModelSignature(inputs=Schema([ColSpec("float", name, required=False) for name in names]),
                                   outputs=infer_signature(example, booster.predict(rows[:5])).outputs)
        info = mlflow.lightgbm.log_model(booster, name="model", signature=signature, input_example=example)
        if info.signature is None:
            raise RuntimeError("the logged model has no signature; the scorer could not check its inputs")
        mlflow.set_tags({"feature_set_version": feature_set.version, "training_set_version": str(version)})
        report(TRAINING_PHASES[3])

        k = settings.k
        model_ndcg, popularity_ndcg = metrics[f"model_ndcg_at_{k}"], metrics[f"popularity_ndcg_at_{k}"]
        needed = popularity_ndcg * (1 + settings.baseline_margin)
        if not model_ndcg > needed:
            reason = (f"not registered: warm NDCG@{k} {model_ndcg:.4f} does not beat popularity {popularity_ndcg:.4f} "
                      f"by the margin {settings.baseline_margin:.0%} (needs more than {needed:.4f})")
            log.warning("%s", reason)
            result.reasons.append(reason)
            mlflow.set_tag("registered", "false")
            return result
        version_info = mlflow.register_model(f"runs:/{run.info.run_id}/model", settings.model_name,
                                             tags={"feature_set_version": feature_set.version})
        result.registered_version = str(version_info.version)
        client.set_registered_model_alias(settings.model_name, CHALLENGER, result.registered_version)
        mlflow.set_tag("registered", result.registered_version)
        log.info("registered %s version %s as challenger: warm NDCG@%d %.4f against popularity %.4f",
                 settings.model_name, result.registered_version, k, model_ndcg, popularity_ndcg)
        report(TRAINING_PHASES[4])

        if allow_promotion:
            result.promoted = decide_promotion(config, feature_set, client, data, metrics, result, rows[test],
                                               labels[test])
        mlflow.set_tag("promoted", str(result.promoted).lower())
        report(TRAINING_PHASES[5])
    log.info("training run %s finished in %.1f s (training-set load %.1f s, train %.1f s)", result.run_id,
             time.monotonic() - started, build_s, train_s)
    return result


def decide_promotion(config: Config, feature_set: FeatureSet, client, data: EvaluationSet, metrics: dict,
                     result: TrainResult, test_rows: np.ndarray, test_labels: np.ndarray) -> bool:
    """Promote the challenger when it beats the champion on the same test split and Redis serves its features.

    The comparison uses ``training.promotion_metric``. ``auc`` is over every example of the test
    period: thousands of rows, so it moves little between equally good models. ``ndcg`` is warm
    NDCG@k, which rests on a few dozen warm users on MovieLens's global time split, so it is noisy.
    """
    import mlflow

    settings = config.training
    k = settings.k
    name = settings.model_name
    metric = settings.promotion_metric
    if metric not in ("auc", "ndcg"):
        raise ValueError(f"training.promotion_metric {metric!r} is invalid; use auc or ndcg")
    label = "test AUC" if metric == "auc" else f"warm NDCG@{k}"
    challenger_value = metrics["model_auc"] if metric == "auc" else metrics[f"model_ndcg_at_{k}"]
    champion = alias_version(client, name, CHAMPION)
    if champion is not None:
        champion_booster = mlflow.lightgbm.load_model(f"models:/{name}@{CHAMPION}")
        champion_names = champion_booster.feature_name()
        try:
            champion_rows = reorder_columns(test_rows, model_feature_names(feature_set), champion_names)
            champion_rankings = model_rankings(champion_booster, champion_names, feature_set, data)
        except ValueError as error:
            reason = f"kept champion {champion}: it cannot be scored on this feature set ({error})"
            log.warning("%s", reason)
            result.reasons.append(reason)
            return False
        champion_metrics = {
            "champion_auc": evaluation.auc(test_labels.tolist(), champion_booster.predict(champion_rows).tolist()),
            f"champion_ndcg_at_{k}": ranking_metrics({"champion": champion_rankings}, data)[f"champion_ndcg_at_{k}"]}
        metrics.update(champion_metrics)
        mlflow.log_metrics(champion_metrics)
        champion_value = champion_metrics["champion_auc"] if metric == "auc" else champion_metrics[f"champion_ndcg_at_{k}"]
        needed = champion_value * (1 + settings.promotion_margin)
        if challenger_value < needed or challenger_value <= champion_value:
            reason = (f"kept champion {champion}: challenger {result.registered_version} {label} "
                      f"{challenger_value:.4f} against the champion's {champion_value:.4f} (needs at least {needed:.4f})")
            log.info("%s", reason)
            result.reasons.append(reason)
            return False
    ready, detail = redis_has_features(config, feature_set, data)
    if not ready:
        reason = f"not promoted: {detail}; run `./spark-submit.sh backfill` for feature set {feature_set.version}"
        log.warning("%s", reason)
        result.reasons.append(reason)
        return False
    promote(client, name, result.registered_version,
            f"{label} {challenger_value:.4f}" + (f" against champion {champion}" if champion else ", first champion"))
    return True


def main(argv: Optional[list[str]] = None, spark: Optional[SparkSession] = None) -> int:
    parser = argparse.ArgumentParser(prog="train", description="Train, evaluate, register and promote the ranker.")
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml)")
    parser.add_argument("--training-set-version", type=int, default=None, help="default: the newest")
    parser.add_argument("--sample-fraction", type=float, default=1.0,
                        help="train on this share of the train period (to build a deliberately weak model)")
    parser.add_argument("--no-promote", action="store_true", help="register the challenger, never promote it")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, train nothing")
    args = parser.parse_args(argv)
    if not 0 < args.sample_fraction <= 1:
        parser.error(f"--sample-fraction {args.sample_fraction} must be in (0, 1]")
    config = load_config(args.env)
    log_config(config, log)
    if args.dry_run:
        log.info("dry run: would train on %s (version %s) with %s, log to %s experiment %s, register %s",
                 config.lake.table(TRAINING_TABLE), args.training_set_version or "newest", config.training.lightgbm,
                 config.mlflow.tracking_uri, config.training.experiment, config.training.model_name)
        return 0
    spark = spark or build_spark(config, "streamrec-train")
    try:
        result = run_training(spark, config, load_feature_set(), args.training_set_version, args.sample_fraction,
                              not args.no_promote)
    except FileNotFoundError as error:
        log.error("%s", error)
        return 2
    except quality.QualityGateError as error:
        log.error("training blocked: %s", error)
        return GATE_FAILED
    except RegistryError as error:
        log.error("%s", error)
        return 1
    return 0 if result.registered_version else NOT_REGISTERED


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
