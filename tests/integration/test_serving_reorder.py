"""Reordered feature definitions, under a new feature-set version and rewritten to Redis by the backfill, score the same."""

from __future__ import annotations

import shutil
import uuid

import pytest
import yaml

from jobs import bronze
from jobs.backfill import run_backfill
from jobs.items import ITEMS_TABLE
from reccore.features import build_feature_set, features_path, load_feature_set
from serving.app import create_app
from tests.conftest import with_overrides

pytestmark = [pytest.mark.integration, pytest.mark.spark]


def reordered_feature_set():
    """The project's definitions with every group listed in reverse, under a version of its own."""
    with open(features_path(), encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    raw["version"] = f"{raw['version']}-reordered-{uuid.uuid4().hex[:6]}"
    raw["user"] = list(reversed(raw["user"]))
    raw["item"] = list(reversed(raw["item"]))
    return build_feature_set(raw, "reordered")


def test_reordered_definitions_give_identical_scores(movielens_champion, spark, tmp_path):
    from mlflow.tracking import MlflowClient

    original, reordered = load_feature_set(), reordered_feature_set()
    for entity in ("user", "item"):
        assert sorted(reordered.names(entity)) == sorted(original.names(entity))
        assert reordered.names(entity) != original.names(entity)

    # A lake of its own with the same bronze and catalogue; Redis keys of the new version, same prefix.
    config = with_overrides(movielens_champion, lake={"root": str(tmp_path / "lake"),
                                                      "checkpoint_root": str(tmp_path / "checkpoints")})
    for table in (bronze.EVENTS_TABLE, ITEMS_TABLE):
        shutil.copytree(movielens_champion.lake.table(table), config.lake.table(table))
    run_backfill(spark, config, reordered)

    # The same booster, registered again and tagged with the reordered feature-set version.
    registry = MlflowClient(tracking_uri=config.mlflow.tracking_uri, registry_uri=config.mlflow.tracking_uri)
    name = movielens_champion.training.model_name
    source = registry.get_model_version_by_alias(name, "champion")
    copy = registry.copy_model_version(f"models:/{name}/{source.version}", f"{name}-reordered")
    registry.set_model_version_tag(copy.name, copy.version, "feature_set_version", reordered.version)
    registry.set_registered_model_alias(copy.name, "champion", copy.version)

    before_app = create_app(movielens_champion)
    after_app = create_app(with_overrides(config, training={"model_name": copy.name}))
    try:
        before, after = before_app.test_client(), after_app.test_client()
        requests = [("get", "/v1/users/414/recommendations?k=10", None),
                    ("get", "/v1/users/68/recommendations?k=10", None),
                    ("post", "/v1/rank", {"user_id": "414", "candidates": ["1", "50", "260", "318", "999999"]})]
        for method, path, payload in requests:
            first = getattr(before, method)(path, json=payload).json
            second = getattr(after, method)(path, json=payload).json
            assert first["feature_set_version"] == original.version
            assert second["feature_set_version"] == reordered.version
            assert first["fallback"] is False
            assert second["fallback"] is False
            assert [item["item_id"] for item in second["items"]] == [item["item_id"] for item in first["items"]]
            # Only the recency features move, by the milliseconds between the two requests.
            assert [item["score"] for item in second["items"]] == pytest.approx(
                [item["score"] for item in first["items"]], rel=1e-9, abs=1e-12)
    finally:
        before_app.extensions["streamrec"]["holder"].stop()
        after_app.extensions["streamrec"]["holder"].stop()
