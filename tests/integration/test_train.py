"""Training on MovieLens end to end: training set, LightGBM, MLflow runs, registry aliases, rollback."""

from __future__ import annotations

import uuid

import pytest

from jobs.registry import CHALLENGER, CHAMPION, alias_version, client_for, promote, rollback
from jobs.train import run_training
from reccore.features import load_feature_set
from tests.conftest import with_overrides

pytestmark = [pytest.mark.integration, pytest.mark.spark]

K = 10
METHODS = ("model", "popularity", "cooccurrence")


@pytest.fixture(scope="module")
def trained(movielens_training_set, spark):
    """The shared MovieLens training set, a model name of this module's own and its first training run."""
    suffix = uuid.uuid4().hex[:8]
    config = with_overrides(movielens_training_set.config, training={"model_name": f"test-ranker-{suffix}",
                                                                    "experiment": f"test-ranking-{suffix}"})
    feature_set = load_feature_set()
    first = run_training(spark, config, feature_set)
    return config, feature_set, movielens_training_set.built, first


def test_training_set_from_bronze(trained):
    _config, _feature_set, built, _first = trained
    # Every MovieLens rating is labelled; sampled negatives come on top.
    assert built.examples == 100_836 + built.sampled_negatives
    assert built.positives == 48_580
    assert built.sampled_negatives > 0.9 * built.positives


def test_first_run_registers_champion_beating_popularity(trained):
    config, _feature_set, _built, first = trained
    client = client_for(config)
    name = config.training.model_name
    assert first.registered_version is not None, first.reasons
    assert first.promoted
    assert alias_version(client, name, CHAMPION) == first.registered_version
    assert alias_version(client, name, CHALLENGER) == first.registered_version
    assert first.metrics[f"model_ndcg_at_{K}"] > first.metrics[f"popularity_ndcg_at_{K}"]

    run = client.get_run(first.run_id)
    for method in METHODS:
        for metric in ("precision", "recall", "ndcg", "map"):
            for suffix in ("", "_cold"):
                assert f"{method}_{metric}_at_{K}{suffix}" in run.data.metrics
    for metric in ("model_auc", "model_log_loss", "popularity_auc", "users", "users_cold"):
        assert metric in run.data.metrics, metric
    assert run.data.metrics["users"] >= 10
    assert run.data.params["feature_set_version"] == load_feature_set().version
    assert run.data.params["training_set_version"] is not None
    artifacts = {item.path for item in client.list_artifacts(first.run_id)}
    assert {"evaluation_protocol.json", "cooccurrence.json", "popularity.json", "model_features.json", "plots"} <= artifacts
    plots = {item.path for item in client.list_artifacts(first.run_id, "plots")}
    assert plots == {"plots/feature_importance.png", "plots/roc_pr.png", "plots/metrics_vs_baselines.png"}

    import mlflow

    info = mlflow.models.get_model_info(f"models:/{name}/{first.registered_version}")
    assert info.signature is not None
    assert len(info.signature.inputs.input_names()) == 76
    version = client.get_model_version(name, first.registered_version)
    assert version.tags["feature_set_version"] == load_feature_set().version


def test_promotion_gate_and_rollback(trained, spark):
    config, feature_set, _built, first = trained
    client = client_for(config)
    name = config.training.model_name

    # Same data, same seed: the same model, which does not beat the champion by the margin.
    assert config.training.promotion_metric == "auc"
    second = run_training(spark, config, feature_set)
    assert second.registered_version not in (None, first.registered_version)
    assert not second.promoted
    assert alias_version(client, name, CHAMPION) == first.registered_version
    assert alias_version(client, name, CHALLENGER) == second.registered_version
    assert any("kept champion" in reason for reason in second.reasons), second.reasons

    # A deliberately weak model (5% of the train period) replaces the champion by hand.
    weak_config = with_overrides(config, training={"baseline_margin": -1.0})
    weak = run_training(spark, weak_config, feature_set, sample_fraction=0.05, allow_promotion=False)
    assert weak.registered_version is not None
    promote(client, name, weak.registered_version, "test: a weak champion")
    assert alias_version(client, name, CHAMPION) == weak.registered_version

    third = run_training(spark, config, feature_set)
    assert third.promoted, third.reasons
    assert alias_version(client, name, CHAMPION) == third.registered_version
    assert third.metrics["champion_auc"] < third.metrics["model_auc"]
    assert f"champion_ndcg_at_{K}" in third.metrics

    assert rollback(client, name) == weak.registered_version
    assert alias_version(client, name, CHAMPION) == weak.registered_version
