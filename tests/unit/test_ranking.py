"""Model rows shared by training and the scorer: derived values, the cold-user policy, feature order."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from reccore.features import load_feature_set
from reccore.ranking import DERIVED_FEATURES, category_matrix, model_feature_names, model_rows, reorder_columns

FEATURE_SET = load_feature_set()
USER_NAMES = FEATURE_SET.names("user")
ITEM_NAMES = FEATURE_SET.names("item")


def rows_for(user_values, user_newest, item_values, item_newest, codes, at_ms, feature_set=FEATURE_SET):
    count = len(user_values)
    return model_rows(feature_set, np.asarray(user_values, dtype=np.float32), np.full(count, user_newest, dtype=float),
                      np.asarray(item_values, dtype=np.float32), np.full(count, item_newest, dtype=float),
                      category_matrix(codes, len(feature_set.categories)), np.full(count, at_ms, dtype=float))


def test_derived_values():
    user = np.zeros((1, len(USER_NAMES)), dtype=np.float32)
    drama = FEATURE_SET.categories.index("Drama")
    comedy = FEATURE_SET.categories.index("Comedy")
    user[0, USER_NAMES.index("drama_share_30d_user")] = 0.5
    user[0, USER_NAMES.index("comedy_share_30d_user")] = 0.25
    item = np.ones((1, len(ITEM_NAMES)), dtype=np.float32)
    rows = rows_for(user, 1_000_000, item, 1_500_000, [[drama, comedy]], 2_000_000)
    names = model_feature_names(FEATURE_SET)
    assert rows.dtype == np.float32
    assert rows.shape == (1, len(names))
    assert rows[0, names.index("user_recency_s")] == 1000.0
    assert rows[0, names.index("item_recency_s")] == 500.0
    # 0.5 for Drama plus 0.25 for Comedy.
    assert rows[0, names.index("category_affinity_user_item")] == 0.75


def test_cold_user_values_stay_missing():
    user = np.full((1, len(USER_NAMES)), np.nan, dtype=np.float32)
    item = np.ones((1, len(ITEM_NAMES)), dtype=np.float32)
    rows = rows_for(user, np.nan, item, 1_500_000, [[0]], 2_000_000)
    names = model_feature_names(FEATURE_SET)
    for name in [*USER_NAMES, "user_recency_s", "category_affinity_user_item"]:
        assert np.isnan(rows[0, names.index(name)]), name
    assert rows[0, names.index("item_recency_s")] == 500.0


def test_wrong_shape_rejected():
    with pytest.raises(ValueError, match=r"item_values has shape \(1, 3\)"):
        model_rows(FEATURE_SET, np.zeros((1, len(USER_NAMES))), np.zeros(1), np.zeros((1, 3)), np.zeros(1),
                   np.zeros((1, len(FEATURE_SET.categories))), np.zeros(1))


def test_reorder_needs_every_model_feature():
    with pytest.raises(ValueError, match="needs features \\['c'\\]"):
        reorder_columns(np.zeros((1, 2)), ["a", "b"], ["b", "c"])


def synthetic_booster():
    """A small model trained where a missing user history means a much higher score than a zero one."""
    import lightgbm

    generator = np.random.default_rng(3)
    names = model_feature_names(FEATURE_SET)
    count = 4000
    user = generator.random((count, len(USER_NAMES))).astype(np.float32)
    cold = generator.random(count) < 0.3
    zero = ~cold & (generator.random(count) < 0.3)
    user[cold] = np.nan
    user[zero] = 0.0
    item = generator.random((count, len(ITEM_NAMES))).astype(np.float32)
    user_newest = np.where(cold, np.nan, 1_000_000.0)
    codes = [[int(code)] for code in generator.integers(0, len(FEATURE_SET.categories), count)]
    rows = model_rows(FEATURE_SET, user, user_newest, item, np.full(count, 1_500_000.0),
                      category_matrix(codes, len(FEATURE_SET.categories)), np.full(count, 2_000_000.0))
    labels = np.where(cold, generator.random(count) < 0.9, np.where(zero, generator.random(count) < 0.1,
                                                                      generator.random(count) < item[:, 0]))
    data = lightgbm.Dataset(rows, label=labels.astype(int), feature_name=names)
    booster = lightgbm.train({"objective": "binary", "verbosity": -1, "seed": 1, "num_threads": 1,
                              "min_data_in_leaf": 20}, data, num_boost_round=40)
    return booster, names


def test_cold_user_scored_by_missing_branch():
    booster, names = synthetic_booster()
    item = np.full((1, len(ITEM_NAMES)), 0.5, dtype=np.float32)
    cold = rows_for(np.full((1, len(USER_NAMES)), np.nan), np.nan, item, 1_500_000, [[0]], 2_000_000)
    zeros = rows_for(np.zeros((1, len(USER_NAMES))), 1_000_000, item, 1_500_000, [[0]], 2_000_000)
    cold_score = booster.predict(reorder_columns(cold, model_feature_names(FEATURE_SET), names))[0]
    zero_score = booster.predict(reorder_columns(zeros, model_feature_names(FEATURE_SET), names))[0]
    # The policy: a cold user's values are missing and take the branch learnt for missing values,
    # where 9 in 10 training rows were positive; a user whose counts are zero had 1 in 10.
    assert cold_score > 0.7
    assert zero_score < 0.3


def test_scores_ignore_manifest_order():
    booster, names = synthetic_booster()
    generator = np.random.default_rng(5)
    user = generator.random((50, len(USER_NAMES))).astype(np.float32)
    item = generator.random((50, len(ITEM_NAMES))).astype(np.float32)
    codes = [[int(code)] for code in generator.integers(0, len(FEATURE_SET.categories), 50)]
    base = rows_for(user, 1_000_000, item, 1_500_000, codes, 2_000_000)
    expected = booster.predict(reorder_columns(base, model_feature_names(FEATURE_SET), names))

    # The same features listed in reverse order: vectors come in that order and are reordered by name.
    reversed_set = dataclasses.replace(FEATURE_SET, user=tuple(reversed(FEATURE_SET.user)),
                                       item=tuple(reversed(FEATURE_SET.item)))
    reversed_names = model_feature_names(reversed_set)
    assert reversed_names != model_feature_names(FEATURE_SET)
    user_order = [USER_NAMES.index(name) for name in reversed_set.names("user")]
    item_order = [ITEM_NAMES.index(name) for name in reversed_set.names("item")]
    shuffled = rows_for(user[:, user_order], 1_000_000, item[:, item_order], 1_500_000, codes, 2_000_000,
                        feature_set=reversed_set)
    scores = booster.predict(reorder_columns(shuffled, reversed_names, names))
    assert np.array_equal(scores, expected)
    assert set(DERIVED_FEATURES) <= set(names)
