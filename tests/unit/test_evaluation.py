"""Offline evaluation: ranking and pointwise metrics, baselines, time split (no services).

Expected values are worked out by hand in the comments beside them.
"""

import math

import numpy as np
import pytest

from reccore.evaluation import (
    ItemCooccurrence,
    TimeSplit,
    auc,
    average_precision_at_k,
    evaluate_rankings,
    log_loss,
    ndcg_at_k,
    popularity_scores,
    precision_at_k,
    recall_at_k,
    split_of,
    time_split,
    top_k,
    user_segments,
)

RANKING_METRICS = [precision_at_k, recall_at_k, ndcg_at_k, average_precision_at_k]

# 3 users: u1 has A, B, C. u2 has A, B. u3 has B, C.
# Users per item: n_A = 2, n_B = 3, n_C = 2. Users with both: AB = 2, AC = 1, BC = 2.
# cos(A, B) = 2 / sqrt(2 * 3) = 2 / sqrt(6) ~ 0.8165
# cos(A, C) = 1 / sqrt(2 * 2) = 0.5
# cos(B, C) = 2 / sqrt(3 * 2) = 2 / sqrt(6)
TOY_AS_OF_MS = 1_000
TOY_EVENTS = [
    ("u1", "A", 100), ("u1", "B", 200), ("u1", "C", 300),
    ("u2", "A", 110), ("u2", "B", 210),
    ("u3", "B", 120), ("u3", "C", 220),
    # At or after the cut: these must not count.
    ("u2", "C", TOY_AS_OF_MS), ("u1", "D", TOY_AS_OF_MS + 5),
]
COS_AB = 2 / math.sqrt(6)
COS_AC = 0.5
COS_BC = 2 / math.sqrt(6)


# ---------------------------------------------------------------------------------------------
# Ranking metrics for one user


def test_metrics_hits_at_one_and_three():
    ranked, relevant = ["a", "b", "c", "d"], {"a", "c"}

    # 2 hits in the top 3.
    assert precision_at_k(ranked, relevant, 3) == pytest.approx(2 / 3)
    # Both relevant items found.
    assert recall_at_k(ranked, relevant, 3) == pytest.approx(1.0)
    # DCG = 1/log2(2) + 1/log2(4) = 1 + 1/2. Ideal DCG over min(3, 2) = 2 hits = 1 + 1/log2(3).
    assert ndcg_at_k(ranked, relevant, 3) == pytest.approx((1 + 1 / 2) / (1 + 1 / math.log2(3)))
    # Precision at the hits: 1/1 and 2/3, sum 5/3, divided by min(3, 2) = 2 -> 5/6.
    assert average_precision_at_k(ranked, relevant, 3) == pytest.approx(5 / 6)


def test_average_precision_more_relevant_than_hits():
    # Hits at positions 2 and 4: precision 1/2 and 2/4, sum 1.0, divided by min(4, 3) = 3.
    assert average_precision_at_k(["x", "a", "y", "b"], {"a", "b", "c"}, 4) == pytest.approx(1 / 3)


def test_average_precision_k_below_relevant():
    # One hit at position 1: precision 1/1, divided by min(2, 3) = 2.
    assert average_precision_at_k(["a", "x"], {"a", "b", "c"}, 2) == pytest.approx(0.5)


def test_ndcg_perfect_when_k_below_relevant():
    # Ideal DCG covers min(2, 3) = 2 hits, which the ranking achieves.
    assert ndcg_at_k(["a", "b", "x"], {"a", "b", "c"}, 2) == pytest.approx(1.0)


def test_ndcg_single_hit_at_two():
    # DCG = 1/log2(3). Ideal DCG over min(5, 1) = 1 hit = 1/log2(2) = 1.
    assert ndcg_at_k(["x", "a", "y"], {"a"}, 5) == pytest.approx(1 / math.log2(3))


def test_recall_divides_by_relevant():
    # 1 of 4 relevant items is in the top 2.
    assert recall_at_k(["a", "x", "b"], {"a", "b", "c", "d"}, 2) == pytest.approx(0.25)


def test_precision_short_ranking():
    # 1 hit over k = 5: missing places count as misses.
    assert precision_at_k(["a"], {"a"}, 5) == pytest.approx(0.2)


def test_metrics_zero_without_hits():
    for metric in RANKING_METRICS:
        assert metric(["x", "y"], {"a"}, 2) == 0.0, metric.__name__


@pytest.mark.parametrize("metric", RANKING_METRICS)
def test_metric_rejects_empty_relevant(metric):
    with pytest.raises(ValueError, match="relevant is empty"):
        metric(["a"], set(), 1)


@pytest.mark.parametrize("metric", RANKING_METRICS)
@pytest.mark.parametrize("k", [0, -1])
def test_metric_rejects_k_below_one(metric, k):
    with pytest.raises(ValueError, match=f"k={k}"):
        metric(["a"], {"a"}, k)


@pytest.mark.parametrize("metric", RANKING_METRICS)
def test_metric_rejects_repeated_item(metric):
    with pytest.raises(ValueError, match="'a' twice"):
        metric(["a", "b", "a"], {"a"}, 3)


# ---------------------------------------------------------------------------------------------
# evaluate_rankings


def test_evaluate_rankings_means_and_counts():
    ranked_by_user = {
        "u1": ["a", "b", "c"],
        "u2": ["x", "y", "z"],
        "u4": ["a"],
        "u5": [],
        "u6": ["a"],
    }
    relevant_by_user = {
        "u1": {"a", "c"},
        "u2": {"y"},
        "u3": {"b"},
        "u4": set(),
        "u5": {"q"},
    }

    report = evaluate_rankings(ranked_by_user, relevant_by_user, 3)

    # Averaged: u1, u2, u3 (no ranking), u5 (empty ranking). Skipped: u4 (empty set), u6 (absent).
    assert report.k == 3
    assert report.users == 4
    assert report.users_without_relevant == 2
    assert report.users_without_ranking == 2
    # u1: hits at 1 and 3. u2: hit at 2 of 1 relevant. u3 and u5 score 0.
    # Precision: (2/3 + 1/3 + 0 + 0) / 4.
    assert report.precision_at_k == pytest.approx(0.25)
    # Recall: (1 + 1 + 0 + 0) / 4.
    assert report.recall_at_k == pytest.approx(0.5)
    # NDCG: u1 = 1.5 / (1 + 1/log2(3)), u2 = (1/log2(3)) / 1.
    expected_ndcg = (1.5 / (1 + 1 / math.log2(3)) + 1 / math.log2(3)) / 4
    assert report.ndcg_at_k == pytest.approx(expected_ndcg)
    # AP: u1 = 5/6, u2 = (1/2) / 1, mean (5/6 + 1/2) / 4 = 1/3.
    assert report.map_at_k == pytest.approx(1 / 3)


def test_evaluate_rankings_empty():
    report = evaluate_rankings({}, {}, 10)

    assert report.users == 0
    assert report.users_without_relevant == 0
    assert report.users_without_ranking == 0
    assert report.precision_at_k == 0.0
    assert report.recall_at_k == 0.0
    assert report.ndcg_at_k == 0.0
    assert report.map_at_k == 0.0


def test_evaluate_rankings_only_skipped_users():
    report = evaluate_rankings({"u1": ["a"]}, {"u1": set(), "u2": set()}, 5)

    assert report.users == 0
    assert report.users_without_relevant == 2
    assert report.ndcg_at_k == 0.0


def test_evaluate_rankings_rejects_k_zero():
    with pytest.raises(ValueError, match="k=0"):
        evaluate_rankings({"u1": ["a"]}, {"u1": {"a"}}, 0)


def test_ranking_report_frozen():
    report = evaluate_rankings({}, {}, 1)
    with pytest.raises(AttributeError):
        report.users = 3


# ---------------------------------------------------------------------------------------------
# Pointwise metrics


def test_auc_with_tied_scores():
    labels = [1, 0, 1, 0, 1]
    scores = [0.9, 0.9, 0.5, 0.3, 0.1]

    # Positive-negative pairs (positive score vs negative score):
    # 0.9 vs 0.9 tie -> 1/2, 0.9 vs 0.3 -> 1, 0.5 vs 0.9 -> 0, 0.5 vs 0.3 -> 1, 0.1 vs 0.9 -> 0,
    # 0.1 vs 0.3 -> 0. Sum 2.5 over 3 * 2 = 6 pairs = 5/12.
    assert auc(labels, scores) == pytest.approx(5 / 12)


def test_auc_extremes():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(1.0)
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.0)
    # Every pair tied.
    assert auc([1, 0, 1, 0], [0.7, 0.7, 0.7, 0.7]) == pytest.approx(0.5)


def test_auc_matches_pair_count():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, size=200)
    # Few distinct scores, so many ties.
    scores = rng.integers(0, 10, size=200) / 10

    positives = scores[labels == 1]
    negatives = scores[labels == 0]
    wins = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    expected = (wins + 0.5 * ties) / (len(positives) * len(negatives))

    assert auc(labels.tolist(), scores.tolist()) == pytest.approx(expected)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0]])
def test_auc_rejects_one_class(labels):
    with pytest.raises(ValueError, match="only one class"):
        auc(labels, [0.5] * len(labels))


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([1, 0], [0.5], "labels has 2 values but scores has 1"),
        ([1, 2], [0.5, 0.4], r"labels must be 0 or 1, got \[2\]"),
        ([1, 0], [0.5, float("nan")], "scores contains NaN"),
        ([], [], "empty"),
    ],
)
def test_auc_rejects_invalid_input(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        auc(labels, scores)


def test_log_loss_by_hand():
    # -(ln 0.8 + ln(1 - 0.4)) / 2 = (0.22314 + 0.51083) / 2 ~ 0.36699.
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(expected)


def test_log_loss_clips_extremes():
    # A confident miss costs -ln(1e-15) ~ 34.539 instead of infinity.
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(1e-15))
    # 1 - (1 - 1e-15) is not exactly 1e-15 in float64, hence the looser tolerance.
    assert log_loss([0], [1.0]) == pytest.approx(-math.log(1e-15), rel=1e-3)
    # A confident hit costs about 1e-15, not exactly 0.
    assert log_loss([1], [1.0]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "labels, probabilities, message",
    [
        ([1], [1.5], r"must lie in \[0, 1\], got \[1.5\]"),
        ([0], [-0.1], r"must lie in \[0, 1\]"),
        ([1, 0], [0.5], "labels has 2 values but probabilities has 1"),
        ([3], [0.5], r"labels must be 0 or 1, got \[3\]"),
        ([1], [float("nan")], "probabilities contains NaN"),
        ([], [], "empty"),
    ],
)
def test_log_loss_rejects_invalid_input(labels, probabilities, message):
    with pytest.raises(ValueError, match=message):
        log_loss(labels, probabilities)


# ---------------------------------------------------------------------------------------------
# Popularity


POPULARITY_EVENTS = [
    ("u1", "a", 999),    # inside the window
    ("u2", "a", 1_000),  # exactly at as_of_ms: never counted
    ("u3", "b", 900),    # exactly at as_of_ms - window_ms: outside the window
    ("u1", "b", 901),    # first millisecond inside the window
    ("u2", "c", 1_500),  # after as_of_ms
    ("u3", "c", 10),     # long before: counted only without a window
]


def test_popularity_strictly_before():
    assert popularity_scores(POPULARITY_EVENTS, as_of_ms=1_000) == {"a": 1.0, "b": 2.0, "c": 1.0}


def test_popularity_window_edges():
    assert popularity_scores(POPULARITY_EVENTS, as_of_ms=1_000, window_ms=100) == {"a": 1.0, "b": 1.0}


def test_popularity_no_events_before():
    assert popularity_scores(POPULARITY_EVENTS, as_of_ms=10) == {}


@pytest.mark.parametrize("window_ms", [0, -5])
def test_popularity_rejects_window(window_ms):
    with pytest.raises(ValueError, match=f"window_ms={window_ms}"):
        popularity_scores(POPULARITY_EVENTS, as_of_ms=1_000, window_ms=window_ms)


# ---------------------------------------------------------------------------------------------
# Item co-occurrence


def neighbour_ids(model, item_id):
    return [neighbour for neighbour, _ in model.neighbours(item_id)]


def neighbour_similarities(model, item_id):
    return [similarity for _, similarity in model.neighbours(item_id)]


def test_cooccurrence_cosine_toy():
    model = ItemCooccurrence().fit(TOY_EVENTS, as_of_ms=TOY_AS_OF_MS)

    assert neighbour_ids(model, "A") == ["B", "C"]
    assert neighbour_similarities(model, "A") == pytest.approx([COS_AB, COS_AC])
    # cos(B, A) == cos(B, C): the tie goes to the smaller id.
    assert neighbour_ids(model, "B") == ["A", "C"]
    assert neighbour_similarities(model, "B") == pytest.approx([COS_AB, COS_BC])
    assert neighbour_ids(model, "C") == ["B", "A"]
    assert neighbour_similarities(model, "C") == pytest.approx([COS_BC, COS_AC])
    # D appears only after the cut.
    assert model.neighbours("D") == []


def test_cooccurrence_neighbour_cap():
    model = ItemCooccurrence().fit(TOY_EVENTS, as_of_ms=TOY_AS_OF_MS, max_neighbours=1)

    assert neighbour_ids(model, "A") == ["B"]
    # Tie between A and C at 2/sqrt(6): A wins by id.
    assert neighbour_ids(model, "B") == ["A"]
    assert neighbour_ids(model, "C") == ["B"]
    assert neighbour_similarities(model, "B") == pytest.approx([COS_AB])


def test_cooccurrence_score():
    model = ItemCooccurrence().fit(TOY_EVENTS, as_of_ms=TOY_AS_OF_MS)

    scores = model.score(["A"], ["B", "C", "D"])
    assert scores == pytest.approx({"B": COS_AB, "C": COS_AC, "D": 0.0})
    # B is near both history items: 2/sqrt(6) + 2/sqrt(6).
    assert model.score(["A", "C"], ["B"]) == pytest.approx({"B": COS_AB + COS_BC})
    # A repeated history item counts once.
    assert model.score(["A", "A"], ["B"]) == pytest.approx({"B": COS_AB})
    assert model.score(["Z"], ["A"]) == {"A": 0.0}
    assert model.score([], ["A"]) == {"A": 0.0}


def test_cooccurrence_score_uses_history_neighbours():
    model = ItemCooccurrence().fit(TOY_EVENTS, as_of_ms=TOY_AS_OF_MS, max_neighbours=1)

    # B keeps only A, so C gets nothing from a history of B even though C keeps B.
    assert model.score(["B"], ["A", "C"]) == pytest.approx({"A": COS_AB, "C": 0.0})


def test_cooccurrence_keeps_recent_items():
    # With a cap of 2, u1 keeps its latest items: A (re-rated at 500) and C (300), not B (200).
    # u2 keeps A and B. Users per item: n_A = 2, n_B = 1, n_C = 1.
    # cos(A, B) = 1 / sqrt(2 * 1), cos(A, C) = 1 / sqrt(2 * 1). No user keeps both B and C.
    events = [
        ("u1", "A", 100), ("u1", "B", 200), ("u1", "C", 300), ("u1", "A", 500),
        ("u2", "A", 110), ("u2", "B", 210),
    ]
    model = ItemCooccurrence(max_items_per_user=2).fit(events, as_of_ms=1_000)

    assert neighbour_ids(model, "A") == ["B", "C"]
    assert neighbour_similarities(model, "A") == pytest.approx([1 / math.sqrt(2)] * 2)
    assert neighbour_ids(model, "B") == ["A"]
    assert neighbour_ids(model, "C") == ["A"]


def test_cooccurrence_large_catalogue():
    # 100 one-item users make the catalogue much larger than any toy item's co-occurring items,
    # so the counts go through the sorting path. One-item users add no pair.
    events = TOY_EVENTS + [(f"solo{index}", f"Z{index:03d}", 50) for index in range(100)]
    model = ItemCooccurrence().fit(events, as_of_ms=TOY_AS_OF_MS)

    assert neighbour_ids(model, "B") == ["A", "C"]
    assert neighbour_similarities(model, "B") == pytest.approx([COS_AB, COS_BC])
    assert neighbour_similarities(model, "A") == pytest.approx([COS_AB, COS_AC])
    assert model.neighbours("Z000") == []


def reference_neighbours(events, as_of_ms, max_items_per_user, max_neighbours):
    """Neighbour lists computed from user sets with plain Python, for comparison."""
    latest_by_user = {}
    for user_id, item_id, time_ms in events:
        if time_ms < as_of_ms:
            latest = latest_by_user.setdefault(user_id, {})
            latest[item_id] = max(time_ms, latest.get(item_id, time_ms))
    users_by_item = {}
    for user_id, latest in latest_by_user.items():
        for item_id in sorted(latest, key=lambda item: (-latest[item], item))[:max_items_per_user]:
            users_by_item.setdefault(item_id, set()).add(user_id)

    neighbours = {}
    for item_id, users in users_by_item.items():
        similar = []
        for other_id, other_users in users_by_item.items():
            both = len(users & other_users)
            if other_id != item_id and both:
                similar.append((other_id, both / math.sqrt(len(users) * len(other_users))))
        similar.sort(key=lambda pair: (-pair[1], pair[0]))
        neighbours[item_id] = similar[:max_neighbours]
    return neighbours


def test_cooccurrence_matches_reference():
    # Few times and items, so the cap, re-rated items and similarity ties all occur.
    rng = np.random.default_rng(5)
    events = [(f"u{rng.integers(40)}", f"i{rng.integers(25)}", int(rng.integers(20))) for _ in range(400)]
    as_of_ms = 15

    model = ItemCooccurrence(max_items_per_user=5).fit(events, as_of_ms=as_of_ms, max_neighbours=3)
    expected = reference_neighbours(events, as_of_ms, max_items_per_user=5, max_neighbours=3)

    assert expected
    for item_id, expected_neighbours in expected.items():
        assert neighbour_ids(model, item_id) == [other for other, _ in expected_neighbours], item_id
        assert neighbour_similarities(model, item_id) == pytest.approx(
            [similarity for _, similarity in expected_neighbours]), item_id


def test_cooccurrence_no_events_before():
    model = ItemCooccurrence().fit(TOY_EVENTS, as_of_ms=0)

    assert model.neighbours("A") == []
    assert model.score(["A"], ["B"]) == {"B": 0.0}


def test_cooccurrence_refit_replaces():
    model = ItemCooccurrence().fit(TOY_EVENTS, as_of_ms=TOY_AS_OF_MS)
    model.fit([("u9", "X", 1), ("u9", "Y", 2)], as_of_ms=TOY_AS_OF_MS)

    assert model.neighbours("A") == []
    assert model.neighbours("X") == [("Y", pytest.approx(1.0))]


def test_cooccurrence_unfitted_score():
    with pytest.raises(RuntimeError, match="not fitted"):
        ItemCooccurrence().score(["A"], ["B"])


def test_cooccurrence_rejects_max_neighbours():
    with pytest.raises(ValueError, match="max_neighbours=0"):
        ItemCooccurrence().fit(TOY_EVENTS, as_of_ms=TOY_AS_OF_MS, max_neighbours=0)


def test_cooccurrence_rejects_max_items_per_user():
    with pytest.raises(ValueError, match="max_items_per_user=0"):
        ItemCooccurrence(max_items_per_user=0)


def test_cooccurrence_100k_events():
    # 100,000 events by 1,000 users over 10,000 items. Squaring a uniform draw skews users and
    # items towards low indices, so a few users pass the 500-item cap and a few items are popular.
    rng = np.random.default_rng(3)
    event_count, user_count, item_count = 100_000, 1_000, 10_000
    users = (user_count * rng.random(event_count) ** 2).astype(int)
    items = (item_count * rng.random(event_count) ** 2).astype(int)
    events = [(f"u{user}", f"i{item}", time_ms)
              for time_ms, (user, item) in enumerate(zip(users.tolist(), items.tolist()))]

    model = ItemCooccurrence().fit(events, as_of_ms=event_count, max_neighbours=100)

    neighbours = model.neighbours("i0")
    assert 0 < len(neighbours) <= 100
    similarities = [similarity for _, similarity in neighbours]
    assert similarities == sorted(similarities, reverse=True)
    assert all(0.0 < similarity <= 1.0 for similarity in similarities)

    # Check the best neighbour of i0 against user sets built directly, with the same cap: each
    # user's 500 most recent distinct items. Event times are distinct, so there are no ties.
    latest_by_user = {}
    for user_id, item_id, time_ms in events:
        latest_by_user.setdefault(user_id, {})[item_id] = time_ms
    assert max(len(latest) for latest in latest_by_user.values()) > 500
    users_by_item = {}
    for user_id, latest in latest_by_user.items():
        for item_id in sorted(latest, key=latest.get, reverse=True)[:500]:
            users_by_item.setdefault(item_id, set()).add(user_id)
    best, best_similarity = neighbours[0]
    both = len(users_by_item["i0"] & users_by_item[best])
    expected = both / math.sqrt(len(users_by_item["i0"]) * len(users_by_item[best]))
    assert best_similarity == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# top_k


TOP_K_SCORES = {"b": 1.0, "a": 1.0, "c": 2.0, "d": 0.5, "e": 1.0}


def test_top_k_ties_by_id():
    # c leads. a, b and e tie at 1.0 and come in id order.
    assert top_k(TOP_K_SCORES, 3) == ["c", "a", "b"]
    assert top_k(TOP_K_SCORES, 5) == ["c", "a", "b", "e", "d"]


def test_top_k_excludes():
    assert top_k(TOP_K_SCORES, 3, exclude={"a", "c"}) == ["b", "e", "d"]
    assert top_k(TOP_K_SCORES, 3, exclude=frozenset(TOP_K_SCORES)) == []


def test_top_k_fewer_than_k():
    assert top_k({"x": 0.1, "y": 0.3}, 10) == ["y", "x"]


def test_top_k_rejects_k_zero():
    with pytest.raises(ValueError, match="k=0"):
        top_k(TOP_K_SCORES, 0)


def test_top_k_rejects_nan():
    with pytest.raises(ValueError, match="'n' is NaN"):
        top_k({"a": 1.0, "n": float("nan")}, 1)


# ---------------------------------------------------------------------------------------------
# Time split and user segments


def test_time_split_even_times():
    # 100 events at 0, 1000, ..., 99000 ms, given out of order.
    times = [index * 1_000 for index in range(100)]
    shuffled = times[50:] + times[:50]

    split = time_split(shuffled, validation_fraction=0.1, test_fraction=0.2)

    # Test: the last 20 events (index 80 on) -> 80,000 ms. Validation: the 10 before -> 70,000 ms.
    assert split == TimeSplit(validation_start_ms=70_000, test_start_ms=80_000)
    periods = [split_of(time_ms, split) for time_ms in times]
    assert periods.count("train") == 70
    assert periods.count("validation") == 10
    assert periods.count("test") == 20


def test_split_of_boundaries():
    split = TimeSplit(validation_start_ms=100, test_start_ms=200)

    assert split_of(99, split) == "train"
    assert split_of(100, split) == "validation"
    assert split_of(199, split) == "validation"
    assert split_of(200, split) == "test"


@pytest.mark.parametrize(
    "validation_fraction, test_fraction, message",
    [
        (0.0, 0.2, "validation_fraction must be in \\(0, 1\\), got validation_fraction=0.0"),
        (-0.1, 0.2, "validation_fraction=-0.1"),
        (0.1, 1.0, "test_fraction must be in \\(0, 1\\), got test_fraction=1.0"),
        (0.1, float("nan"), "test_fraction=nan"),
        (0.5, 0.5, "must be below 1 .* got 0.5 \\+ 0.5"),
        (0.7, 0.4, "got 0.7 \\+ 0.4"),
    ],
)
def test_time_split_rejects_fractions(validation_fraction, test_fraction, message):
    with pytest.raises(ValueError, match=message):
        time_split(range(100), validation_fraction, test_fraction)


def test_time_split_rejects_no_events():
    with pytest.raises(ValueError, match="event_times_ms is empty"):
        time_split([], 0.1, 0.2)


def test_time_split_two_events():
    # One event each for validation and test, none left for training.
    assert time_split([5, 9], 0.1, 0.1) == TimeSplit(validation_start_ms=5, test_start_ms=9)


def test_time_split_rejects_order():
    with pytest.raises(ValueError, match="validation_start_ms=5 is after test_start_ms=1"):
        TimeSplit(validation_start_ms=5, test_start_ms=1)


def test_user_segments():
    first_event_ms_by_user = {"u1": 10, "u2": 100, "u3": 150}

    segments = user_segments(first_event_ms_by_user, test_start_ms=100)

    # u2 starts exactly at the test start, so it has no history before it.
    assert segments == {"u1": "warm", "u2": "cold", "u3": "cold"}
