"""The scorer's pure core: packed vectors to ranked items, request checks (no Flask, no Redis)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from reccore.features import load_feature_set
from reccore.ranking import ManifestLayout, category_matrix, model_feature_names, model_rows, reorder_columns
from reccore.store import Stamp, pack, unpack
from serving.scoring import BadRequest, check_candidates, check_id, check_k, is_stale, rank, score, unpack_many
from tests.unit.test_ranking import synthetic_booster

FEATURE_SET = load_feature_set()
NOW_MS = 2_000_000
USER_SIZE = len(FEATURE_SET.names("user"))
ITEM_SIZE = len(FEATURE_SET.names("item"))


@pytest.fixture(scope="module")
def booster():
    return synthetic_booster()[0]


def vectors(seed: int, items: int):
    generator = np.random.default_rng(seed)
    user = generator.random(USER_SIZE).astype(np.float32)
    item_values = generator.random((items, ITEM_SIZE)).astype(np.float32)
    codes = [[int(code)] for code in generator.integers(0, len(FEATURE_SET.categories), items)]
    return user, item_values, codes


def test_rank_follows_booster_scores(booster):
    user, item_values, codes = vectors(1, 30)
    candidates = [f"i{number:02d}" for number in range(30)]
    user_packed = pack(Stamp(1_000_000, 7, 1_500_000), user)
    item_packed = [pack(Stamp(1_500_000, 3), values) for values in item_values]
    ranking = rank(booster, ManifestLayout(FEATURE_SET.manifest()), candidates, user_packed, item_packed, codes,
                   NOW_MS, k=10, exclude=frozenset({"i03", "i07"}))

    rows = model_rows(FEATURE_SET, np.tile(user, (30, 1)), np.full(30, 1_000_000.0), item_values,
                      np.full(30, 1_500_000.0), category_matrix(codes, len(FEATURE_SET.categories)),
                      np.full(30, float(NOW_MS)))
    expected = booster.predict(reorder_columns(rows, model_feature_names(FEATURE_SET), booster.feature_name()))
    allowed = [index for index in range(30) if candidates[index] not in ("i03", "i07")]
    best = sorted(allowed, key=lambda index: (-expected[index], candidates[index]))[:10]
    assert [item.item_id for item in ranking.items] == [candidates[index] for index in best]
    assert [item.score for item in ranking.items] == pytest.approx([float(expected[index]) for index in best])
    assert ranking.user_known
    assert ranking.feature_age_s == 1000.0
    assert ranking.newest_event_ms == 1_000_000


def test_missing_vectors_score_as_missing(booster):
    _user, item_values, codes = vectors(2, 3)
    layout = ManifestLayout(FEATURE_SET.manifest())
    packed = [pack(Stamp(1_500_000, 3), item_values[0]), None, pack(Stamp(1_500_000, 3), item_values[2])]
    scores = score(booster, layout, None, packed, codes, NOW_MS)
    rows = model_rows(FEATURE_SET, np.full((3, USER_SIZE), np.nan), np.full(3, np.nan),
                      np.vstack([item_values[0], np.full(ITEM_SIZE, np.nan), item_values[2]]),
                      np.array([1_500_000.0, np.nan, 1_500_000.0]), category_matrix(codes, len(FEATURE_SET.categories)),
                      np.full(3, float(NOW_MS)))
    expected = booster.predict(reorder_columns(rows, model_feature_names(FEATURE_SET), booster.feature_name()))
    assert np.array_equal(scores, expected)
    ranking = rank(booster, layout, ["a", "b", "c"], None, packed, codes, NOW_MS, k=3)
    assert not ranking.user_known
    assert ranking.feature_age_s is None
    assert is_stale(ranking.feature_age_s, 3600)


def test_reordered_manifest_gives_same_scores(booster):
    user, item_values, codes = vectors(3, 20)
    candidates = [f"m{number}" for number in range(20)]
    original = rank(booster, ManifestLayout(FEATURE_SET.manifest()), candidates,
                    pack(Stamp(1_000_000, 7), user), [pack(Stamp(1_500_000, 3), row) for row in item_values], codes,
                    NOW_MS, k=20)

    # Same names in reverse order under a new version: vectors are written in that order.
    reordered = dataclasses.replace(FEATURE_SET, version="v1r", user=tuple(reversed(FEATURE_SET.user)),
                                    item=tuple(reversed(FEATURE_SET.item)))
    user_order = [FEATURE_SET.names("user").index(name) for name in reordered.names("user")]
    item_order = [FEATURE_SET.names("item").index(name) for name in reordered.names("item")]
    again = rank(booster, ManifestLayout(reordered.manifest()), candidates,
                 pack(Stamp(1_000_000, 7), user[user_order]),
                 [pack(Stamp(1_500_000, 3), row[item_order]) for row in item_values], codes, NOW_MS, k=20)
    assert again.items == original.items


def test_manifest_without_shares_rejected():
    manifest = FEATURE_SET.manifest()
    del manifest["category_shares"]
    with pytest.raises(ValueError, match="lacks \\['category_shares'\\]; rerun the backfill"):
        ManifestLayout(manifest)


@pytest.mark.parametrize("value", ["abc!", "", "x" * 129, 42, None, "a b"])
def test_bad_ids_rejected(value):
    with pytest.raises(BadRequest, match="user_id .* is not a valid id"):
        check_id("user_id", value)


def test_good_id_accepted():
    assert check_id("user_id", "user-1@shop.example:7") == "user-1@shop.example:7"


@pytest.mark.parametrize("value, message", [("0", "out of range"), ("101", "out of range"), ("ten", "not an integer"),
                                            ("1.5", "not an integer"), (True, "out of range"), ("010", "out of range")])
def test_bad_k_rejected(value, message):
    with pytest.raises(BadRequest, match=message):
        check_k(value)


def test_k_accepted():
    assert (check_k("10"), check_k(1), check_k("100")) == (10, 1, 100)


def test_candidates_checked():
    assert check_candidates(["a", "b", "a"]) == ["a", "b"]
    with pytest.raises(BadRequest, match="candidates is empty"):
        check_candidates([])
    with pytest.raises(BadRequest, match="1001 candidates, more than the limit of 1000"):
        check_candidates([str(number) for number in range(1001)])
    with pytest.raises(BadRequest, match="candidates\\[\\] 'no way' is not a valid id"):
        check_candidates(["ok", "no way"])
    with pytest.raises(BadRequest, match="must be a list"):
        check_candidates("a,b")


def test_unpack_many_matches_unpack_row_by_row():
    rng = np.random.default_rng(7)
    packed = [None if row % 5 == 0 else pack(Stamp(1_000 + row, row, 9), rng.random(12).astype(np.float32).tolist())
              for row in range(23)]
    values, newest = unpack_many(packed, 12)
    for row, raw in enumerate(packed):
        if raw is None:
            assert np.isnan(values[row]).all()
            assert np.isnan(newest[row])
            continue
        stamp, expected = unpack(raw, 12)
        assert values[row].tolist() == np.array(expected, dtype=np.float32).tolist()
        assert newest[row] == stamp.newest_event_ms
    with pytest.raises(ValueError, match="expected 72 for 12 features"):
        unpack_many([packed[1], packed[2][:-4]], 12)
