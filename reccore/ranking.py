"""The ranking model's input: stored features plus the few computed when a row is scored.

Training and the scorer both build model rows here, so no value is computed one way in training
and another way in serving. A row is the user's stored features, the item's stored
features (both float32, in manifest order) and three values computed at read time:

    user_recency_s               seconds from the user's newest event to the moment of scoring
    item_recency_s               the same for the item
    category_affinity_user_item  the sum of the user's 30-day category shares over the item's categories

A missing stored value stays NaN, and so does every value computed from it: LightGBM sends NaN
down the branch it learnt for missing values, which is how a cold user is scored.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


DERIVED_FEATURES = ("user_recency_s", "item_recency_s", "category_affinity_user_item")


def model_feature_names(feature_set) -> list[str]:
    """Return the names of a model row, in the order ``model_rows`` builds them."""
    return [*feature_set.names("user"), *feature_set.names("item"), *DERIVED_FEATURES]


class ManifestLayout:
    """The parts of a feature set that scoring needs, read from its manifest (as stored in Redis).

    It offers the same ``version``, ``categories``, ``names`` and ``category_share_names`` as a
    FeatureSet, so ``model_rows`` accepts either; the scorer has only the manifest of the model's
    feature-set version, not the definitions file.
    """

    def __init__(self, manifest: dict):
        missing = [key for key in ("version", "user", "item", "category_codes", "category_shares") if key not in manifest]
        if missing:
            raise ValueError(f"feature manifest {manifest.get('version')!r} lacks {missing}; "
                             "rerun the backfill to store a current manifest")
        self.version = manifest["version"]
        codes = manifest["category_codes"]
        self.categories = tuple(sorted(codes, key=codes.get))
        self._names = {"user": list(manifest["user"]), "item": list(manifest["item"])}
        self._shares = dict(manifest["category_shares"])

    def names(self, entity: str) -> list[str]:
        return self._names[entity]

    def category_share_names(self) -> dict[str, str]:
        return self._shares


def category_share_columns(feature_set) -> list[int]:
    """Return, for each category code, the position of the user's share of it in the user vector."""
    names = feature_set.names("user")
    shares = feature_set.category_share_names()
    absent = [category for category in feature_set.categories if shares.get(category) not in names]
    if absent:
        raise ValueError(f"feature set {feature_set.version} has no user share of categories {absent[:5]}; "
                         "the affinity needs one per category")
    return [names.index(shares[category]) for category in feature_set.categories]


def category_matrix(category_codes: Sequence[Sequence[int]], categories: int) -> np.ndarray:
    """Return a float32 matrix with a 1 for each item (row) and category code (column) it has."""
    matrix = np.zeros((len(category_codes), categories), dtype=np.float32)
    for row, codes in enumerate(category_codes):
        for code in codes:
            matrix[row, code] = 1.0
    return matrix


def model_rows(feature_set, user_values: np.ndarray, user_newest_ms: np.ndarray,
               item_values: np.ndarray, item_newest_ms: np.ndarray, item_categories: np.ndarray,
               at_ms: np.ndarray) -> np.ndarray:
    """Return float32 model rows, one per (user row, item row) pair, in ``model_feature_names`` order.

    ``feature_set`` is a FeatureSet or a ManifestLayout.

    ``user_values`` (n x user features) and ``item_values`` (n x item features) are the stored
    vectors, NaN where missing. ``*_newest_ms`` is the newest event time behind each, NaN when the
    entity has no values. ``item_categories`` is the n x categories matrix of ``category_matrix``,
    and ``at_ms`` the moment each row is scored at.
    """
    user_values = np.asarray(user_values, dtype=np.float32)
    item_values = np.asarray(item_values, dtype=np.float32)
    count = user_values.shape[0]
    for name, array, width in (("user_values", user_values, len(feature_set.names("user"))),
                               ("item_values", item_values, len(feature_set.names("item"))),
                               ("item_categories", np.asarray(item_categories), len(feature_set.categories))):
        if array.shape != (count, width):
            raise ValueError(f"{name} has shape {array.shape}, expected ({count}, {width})")
    at_ms = np.asarray(at_ms, dtype=np.float64)
    user_recency = (at_ms - np.asarray(user_newest_ms, dtype=np.float64)) / 1000.0
    item_recency = (at_ms - np.asarray(item_newest_ms, dtype=np.float64)) / 1000.0
    shares = user_values[:, category_share_columns(feature_set)]
    # A user with no events in 30 days has NaN shares, so the affinity is NaN too (missing, not 0).
    affinity = np.einsum("ij,ij->i", shares, np.asarray(item_categories, dtype=np.float32))
    derived = np.column_stack([user_recency, item_recency, affinity]).astype(np.float32)
    return np.hstack([user_values, item_values, derived]).astype(np.float32, copy=False)


def reorder_columns(rows: np.ndarray, names: Sequence[str], model_names: Sequence[str]) -> np.ndarray:
    """Return ``rows`` with its columns (named ``names``) put in the model's own order ``model_names``."""
    position = {name: index for index, name in enumerate(names)}
    missing = [name for name in model_names if name not in position]
    if missing:
        raise ValueError(f"the model needs features {missing[:5]} that the rows do not have; "
                         "the model and the feature set do not match")
    return rows[:, [position[name] for name in model_names]]
