"""Offline evaluation of a ranking model: metrics, baselines, the time split and user segments.

A model earns its place only if it ranks held-out items better than simple baselines, so the
baselines live here beside the metrics. They follow the point-in-time rule: popularity and
co-occurrence count only events strictly before the cut (``as_of_ms``), never events of the period
they are scored on. Every ordering breaks ties by item id, so two runs on the same data give the same
rankings and the same numbers.

Ranking metrics use binary relevance: an item is relevant or not. A user with no relevant item has
no ranking metric, so the per-user functions raise ValueError and ``evaluate_rankings`` counts such
users separately instead of averaging a made-up value. A global time split can leave few users with any
history before the test period; ``user_segments`` labels users warm or cold so that each group can
be reported on its own.

Pure Python and numpy: no Spark, no services.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import AbstractSet, Iterable, Iterator, Literal, Mapping, Optional, Sequence

import numpy as np

Event = tuple[str, str, int]
"""An event as (user_id, item_id, event_ms)."""

Split = Literal["train", "validation", "test"]

LOG_LOSS_EPSILON = 1e-15
DEFAULT_MAX_NEIGHBOURS = 100
DEFAULT_MAX_ITEMS_PER_USER = 500

# Maximum ratio of catalogue size to gathered items at which one item's co-occurrences are counted
# in a dense array rather than by sorting.
_DENSE_COUNT_RATIO = 8


# ---------------------------------------------------------------------------------------------
# Ranking metrics for one user


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got k={k}")


def _hit_positions(ranked: Sequence[str], relevant: AbstractSet[str], k: int) -> list[int]:
    """Return the 1-based positions of relevant items in the top ``k`` of ``ranked``.

    Raise ValueError when k < 1, when ``relevant`` is empty, or when an item repeats in the top k.
    """
    _check_k(k)
    if not relevant:
        raise ValueError("relevant is empty, so ranking metrics are undefined for this user. "
                         "Skip users with no relevant item.")

    positions = []
    seen = set()
    for position, item in enumerate(ranked[:k], start=1):
        if item in seen:
            raise ValueError(f"ranked lists item {item!r} twice in the top {k}, but a ranking must list each item once")
        seen.add(item)
        if item in relevant:
            positions.append(position)
    return positions


def precision_at_k(ranked: Sequence[str], relevant: AbstractSet[str], k: int) -> float:
    """Return the share of the top ``k`` that is relevant.

    The divisor is always k, so a ranking shorter than k counts its missing places as misses.
    """
    return len(_hit_positions(ranked, relevant, k)) / k


def recall_at_k(ranked: Sequence[str], relevant: AbstractSet[str], k: int) -> float:
    """Return the share of the relevant items that appear in the top ``k``."""
    return len(_hit_positions(ranked, relevant, k)) / len(relevant)


def _ideal_dcg(hits: int) -> float:
    return sum(1.0 / math.log2(position + 1) for position in range(1, hits + 1))


def ndcg_at_k(ranked: Sequence[str], relevant: AbstractSet[str], k: int) -> float:
    """Return the normalised discounted cumulative gain of the top ``k``.

    A relevant item at position p (from 1) gains 1 / log2(p + 1). The ideal ranking puts
    min(k, len(relevant)) relevant items first, so a perfect top k scores 1.0.
    """
    positions = _hit_positions(ranked, relevant, k)
    dcg = sum(1.0 / math.log2(position + 1) for position in positions)
    return dcg / _ideal_dcg(min(k, len(relevant)))


def average_precision_at_k(ranked: Sequence[str], relevant: AbstractSet[str], k: int) -> float:
    """Return the average precision of the top ``k`` (its mean over users is MAP@k).

    The sum of precision@i at each relevant position i <= k, divided by min(k, len(relevant)).
    """
    positions = _hit_positions(ranked, relevant, k)
    # The n-th hit at position p means precision@p = n / p.
    total = sum(hits / position for hits, position in enumerate(positions, start=1))
    return total / min(k, len(relevant))


@dataclass(frozen=True)
class RankingReport:
    """Mean ranking metrics at ``k`` over the evaluated users, and the counts behind them."""

    k: int
    precision_at_k: float
    recall_at_k: float
    ndcg_at_k: float
    map_at_k: float
    # Users averaged: at least one relevant item, with or without a ranking.
    users: int
    # Users skipped because they have no relevant item.
    users_without_relevant: int
    # Users with relevant items but no ranking (missing or empty); they score 0 on every metric.
    users_without_ranking: int


def evaluate_rankings(ranked_by_user: Mapping[str, Sequence[str]],
                      relevant_by_user: Mapping[str, AbstractSet[str]], k: int) -> RankingReport:
    """Average the four ranking metrics at ``k`` over users.

    A user with relevant items but no ranking scores 0 on every metric and counts in ``users``,
    because a model that returns nothing for a user has failed that user. A user with no relevant
    item (an empty set, or ranked but absent from ``relevant_by_user``) is skipped and counted in
    ``users_without_relevant``. With no user to average, every mean is 0.0 and ``users`` is 0.
    """
    _check_k(k)
    sums = {"precision": 0.0, "recall": 0.0, "ndcg": 0.0, "map": 0.0}
    users = users_without_relevant = users_without_ranking = 0

    for user_id in set(ranked_by_user) | set(relevant_by_user):
        relevant = relevant_by_user.get(user_id)
        if not relevant:
            users_without_relevant += 1
            continue

        users += 1
        ranked = ranked_by_user.get(user_id)
        if not ranked:
            users_without_ranking += 1
            continue

        sums["precision"] += precision_at_k(ranked, relevant, k)
        sums["recall"] += recall_at_k(ranked, relevant, k)
        sums["ndcg"] += ndcg_at_k(ranked, relevant, k)
        sums["map"] += average_precision_at_k(ranked, relevant, k)

    divisor = users or 1
    return RankingReport(
        k=k,
        precision_at_k=sums["precision"] / divisor,
        recall_at_k=sums["recall"] / divisor,
        ndcg_at_k=sums["ndcg"] / divisor,
        map_at_k=sums["map"] / divisor,
        users=users,
        users_without_relevant=users_without_relevant,
        users_without_ranking=users_without_ranking,
    )


# ---------------------------------------------------------------------------------------------
# Pointwise metrics


def _binary_labels(labels: Iterable[int], values: Iterable[float], values_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return labels as a bool array and ``values`` as a float array, both 1-D and of equal length."""
    label_array = np.asarray(list(labels))
    value_array = np.asarray(list(values), dtype=np.float64)
    if label_array.ndim != 1 or value_array.ndim != 1:
        raise ValueError(f"labels and {values_name} must be one-dimensional, "
                         f"got shapes {label_array.shape} and {value_array.shape}")
    if len(label_array) != len(value_array):
        raise ValueError(f"labels has {len(label_array)} values but {values_name} has {len(value_array)}. "
                         "Pass one value per label.")
    if len(label_array) == 0:
        raise ValueError(f"labels and {values_name} are empty")
    if not np.isin(label_array, (0, 1)).all():
        invalid = sorted({value for value in label_array.tolist() if value not in (0, 1)}, key=repr)[:5]
        raise ValueError(f"labels must be 0 or 1, got {invalid}")
    if not np.isfinite(value_array).all():
        raise ValueError(f"{values_name} contains NaN or infinite values")
    return label_array == 1, value_array


def auc(labels: Iterable[int], scores: Iterable[float]) -> float:
    """Return the area under the ROC curve, the probability that a positive outscores a negative.

    Computed as the Mann-Whitney U statistic over average ranks, so a positive and a negative with
    the same score count one half. Raise ValueError when the labels contain only one class.
    """
    positive, score_array = _binary_labels(labels, scores, "scores")
    positives = int(positive.sum())
    negatives = len(positive) - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"labels contain only one class ({positives} positives, {negatives} negatives), "
                         "but AUC needs both")

    # Tied scores share the mean of the ranks they span, which is the group's last rank minus (count - 1) / 2.
    _, inverse, counts = np.unique(score_array, return_inverse=True, return_counts=True)
    mean_ranks = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = mean_ranks[inverse]

    u_statistic = ranks[positive].sum() - positives * (positives + 1) / 2.0
    return float(u_statistic / (positives * negatives))


def log_loss(labels: Iterable[int], probabilities: Iterable[float]) -> float:
    """Return the mean binary cross-entropy (natural log) of predicted positive probabilities.

    Probabilities are clipped to [1e-15, 1 - 1e-15] so a confident miss costs about 34.5, not
    infinity. A probability outside [0, 1] raises ValueError, because clipping would hide the bug.
    """
    positive, probability_array = _binary_labels(labels, probabilities, "probabilities")
    outside = (probability_array < 0.0) | (probability_array > 1.0)
    if outside.any():
        raise ValueError(f"probabilities must lie in [0, 1], got {probability_array[outside][:5].tolist()}")

    clipped = np.clip(probability_array, LOG_LOSS_EPSILON, 1.0 - LOG_LOSS_EPSILON)
    losses = np.where(positive, -np.log(clipped), -np.log1p(-clipped))
    return float(losses.mean())


# ---------------------------------------------------------------------------------------------
# Baselines


def popularity_scores(events: Iterable[Event], as_of_ms: int, window_ms: Optional[int] = None) -> dict[str, float]:
    """Count each item's events strictly before ``as_of_ms``.

    With ``window_ms``, only events in the open interval (as_of_ms - window_ms, as_of_ms) count, so
    an event exactly at either end is left out. Items with no counted event are absent.
    """
    if window_ms is not None and window_ms <= 0:
        raise ValueError(f"window_ms must be positive or None, got window_ms={window_ms}")
    window_start_ms = None if window_ms is None else as_of_ms - window_ms

    counts: Counter[str] = Counter()
    for _user_id, item_id, event_ms in events:
        if event_ms >= as_of_ms:
            continue
        if window_start_ms is not None and event_ms <= window_start_ms:
            continue
        counts[item_id] += 1
    return {item_id: float(count) for item_id, count in counts.items()}


class ItemCooccurrence:
    """Item-to-item cosine similarity over binary user vectors, with each item's nearest neighbours.

    The similarity of items i and j is (users with both) / sqrt(n_i * n_j), where n_i counts the
    users with item i. Only each item's ``max_neighbours`` most similar items are kept, ties broken
    by item id. Ties are between equal floating-point similarities, and two ratios that are equal
    on paper can differ in the last bit.

    A user with more than ``max_items_per_user`` distinct items keeps only the most recent ones,
    by each item's latest event. Among equal times, the smaller item id is kept. Fitting takes time
    in proportion to the sum over users of their item count squared, so without the cap one heavy
    user would dominate both the time and the similarities. n_i is counted over the kept items too, so similarities stay within [0, 1].

    Co-occurrences are counted one item at a time over the items of that item's users, never in a
    dense item-by-item matrix, so memory grows with the events and the kept neighbours, not with
    the square of the catalogue.
    """

    def __init__(self, max_items_per_user: int = DEFAULT_MAX_ITEMS_PER_USER):
        if max_items_per_user < 1:
            raise ValueError(f"max_items_per_user must be at least 1, "
                             f"got max_items_per_user={max_items_per_user}")
        self.max_items_per_user = max_items_per_user
        self._neighbours: Optional[dict[str, dict[str, float]]] = None

    def fit(self, positive_events: Iterable[Event], as_of_ms: int,
            max_neighbours: int = DEFAULT_MAX_NEIGHBOURS) -> ItemCooccurrence:
        """Learn the neighbours from positive events strictly before ``as_of_ms`` and return self.

        Refitting replaces everything learnt before.
        """
        if max_neighbours < 1:
            raise ValueError(f"max_neighbours must be at least 1, got max_neighbours={max_neighbours}")

        item_sets = self._recent_items_by_user(positive_events, as_of_ms)
        item_ids = sorted({item_id for items in item_sets for item_id in items})
        # Indices in sorted id order, so comparing indices compares ids when breaking ties.
        index_of = {item_id: index for index, item_id in enumerate(item_ids)}
        user_items = [np.fromiter((index_of[item] for item in items), dtype=np.int64, count=len(items))
                      for items in item_sets]

        neighbours = {}
        for item, (neighbour_indices, similarities) in _nearest_neighbours(user_items, len(item_ids),
                                                                           max_neighbours):
            neighbours[item_ids[item]] = {item_ids[index]: similarity for index, similarity
                                          in zip(neighbour_indices.tolist(), similarities.tolist())}
        self._neighbours = neighbours
        return self

    def _recent_items_by_user(self, positive_events: Iterable[Event], as_of_ms: int) -> list[list[str]]:
        """Return each user's distinct items before ``as_of_ms``, capped to the most recent ones."""
        latest_by_user: dict[str, dict[str, int]] = defaultdict(dict)
        for user_id, item_id, event_ms in positive_events:
            if event_ms >= as_of_ms:
                continue
            latest = latest_by_user[user_id]
            if event_ms > latest.get(item_id, event_ms - 1):
                latest[item_id] = event_ms

        item_sets = []
        for latest in latest_by_user.values():
            items = list(latest)
            if len(items) > self.max_items_per_user:
                items = sorted(items, key=lambda item: (-latest[item], item))[:self.max_items_per_user]
            item_sets.append(items)
        return item_sets

    def neighbours(self, item_id: str) -> list[tuple[str, float]]:
        """Return the kept neighbours of ``item_id`` with their similarity, most similar first."""
        return list(self._fitted().get(item_id, {}).items())

    def score(self, history_items: Iterable[str], candidates: Iterable[str]) -> dict[str, float]:
        """Score each candidate by the sum of its similarities to the distinct history items.

        A pair contributes only when the candidate is among the history item's kept neighbours.
        Candidates with no such pair score 0.0, and so do all candidates of an unknown history.
        """
        neighbours = self._fitted()
        scores = dict.fromkeys(candidates, 0.0)
        for history_item in set(history_items):
            for neighbour, similarity in neighbours.get(history_item, {}).items():
                if neighbour in scores:
                    scores[neighbour] += similarity
        return scores

    def _fitted(self) -> dict[str, dict[str, float]]:
        if self._neighbours is None:
            raise RuntimeError("ItemCooccurrence is not fitted. Call fit(positive_events, as_of_ms) first.")
        return self._neighbours


def _nearest_neighbours(user_items: list[np.ndarray], item_count: int,
                        max_neighbours: int) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray]]]:
    """Yield each item index with its kept neighbour indices and similarities, most similar first.

    ``user_items`` contains each user's distinct item indices. Items with no co-occurring item are
    not yielded.
    """
    lengths = np.fromiter((len(items) for items in user_items), dtype=np.int64, count=len(user_items))
    all_items = np.concatenate(user_items) if user_items else np.empty(0, dtype=np.int64)
    users_per_item = np.bincount(all_items, minlength=item_count)

    # The users of item i are users_by_item[item_starts[i]:item_starts[i + 1]].
    owners = np.repeat(np.arange(len(user_items)), lengths)
    users_by_item = owners[np.argsort(all_items, kind="stable")].tolist()
    item_starts = np.concatenate([[0], np.cumsum(users_per_item)]).tolist()

    for item in range(item_count):
        users = users_by_item[item_starts[item]:item_starts[item + 1]]
        indices, both_counts = _cooccurrence_counts(np.concatenate([user_items[user] for user in users]),
                                                    item, item_count)
        if len(indices) == 0:
            continue
        similarities = both_counts / np.sqrt(float(users_per_item[item]) * users_per_item[indices])
        top_positions = _most_similar(indices, similarities, max_neighbours)
        yield item, (indices[top_positions], similarities[top_positions])


def _cooccurrence_counts(other_items: np.ndarray, item: int, item_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the distinct items in ``other_items`` except ``item``, and how often each occurs.

    ``other_items`` concatenates the items of every user of ``item``, so an occurrence count is the
    number of users with both items.
    """
    # A dense count costs O(item_count) and a sort O(m log m) for m gathered items, so sort only sparse rows.
    if item_count <= _DENSE_COUNT_RATIO * len(other_items):
        counts = np.bincount(other_items, minlength=item_count)
        counts[item] = 0
        indices = np.flatnonzero(counts)
        return indices, counts[indices]

    indices, counts = np.unique(other_items, return_counts=True)
    others = indices != item
    return indices[others], counts[others]


def _most_similar(indices: np.ndarray, similarities: np.ndarray, max_neighbours: int) -> np.ndarray:
    """Return the positions of the ``max_neighbours`` highest similarities, ties by index ascending."""
    if len(similarities) > max_neighbours:
        # Narrow to the entries at or above the max_neighbours-th highest similarity, ties included.
        kth = len(similarities) - max_neighbours
        threshold = np.partition(similarities, kth)[kth]
        candidates = np.flatnonzero(similarities >= threshold)
    else:
        candidates = np.arange(len(similarities))
    order = np.lexsort((indices[candidates], -similarities[candidates]))
    return candidates[order[:max_neighbours]]


def top_k(scores: Mapping[str, float], k: int, exclude: AbstractSet[str] = frozenset()) -> list[str]:
    """Return the ``k`` best-scored items, best first, ties broken by item id ascending.

    Items in ``exclude`` never appear, so fewer than k items come back when too few remain.
    A NaN score raises ValueError because it has no place in the order.
    """
    _check_k(k)
    candidates = []
    for item_id, score in scores.items():
        if item_id in exclude:
            continue
        if math.isnan(score):
            raise ValueError(f"score of item {item_id!r} is NaN, which has no rank. Drop the item or give it a number.")
        candidates.append((-score, item_id))
    return [item_id for _, item_id in heapq.nsmallest(k, candidates)]


# ---------------------------------------------------------------------------------------------
# Time split and user segments


@dataclass(frozen=True)
class TimeSplit:
    """Global time boundaries: train before validation_start_ms, then validation, then test from test_start_ms."""

    validation_start_ms: int
    test_start_ms: int

    def __post_init__(self) -> None:
        if self.validation_start_ms > self.test_start_ms:
            raise ValueError(f"validation_start_ms={self.validation_start_ms} is after "
                             f"test_start_ms={self.test_start_ms}, but validation must come first")


def time_split(event_times_ms: Iterable[int], validation_fraction: float, test_fraction: float) -> TimeSplit:
    """Return split boundaries placed at event-time quantiles.

    With n events sorted by time, the test period starts at the time of the event at index
    n - max(1, round(n * test_fraction)), and validation starts max(1, round(n * validation_fraction))
    events earlier, but never before index 0. When all n >= 2 times are distinct, validation and
    test each hold at least one event. Events at a boundary time belong to the later period, so with
    tied times the fractions are approximate.
    """
    for name, fraction in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {name}={fraction}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(f"validation_fraction + test_fraction must be below 1 to leave a training period, "
                         f"got {validation_fraction} + {test_fraction} = {validation_fraction + test_fraction}")

    times = np.sort(np.asarray(list(event_times_ms), dtype=np.int64))
    if len(times) == 0:
        raise ValueError("event_times_ms is empty, but a time split needs at least one event")

    count = len(times)
    test_start_index = max(0, count - max(1, round(count * test_fraction)))
    validation_start_index = max(0, test_start_index - max(1, round(count * validation_fraction)))
    return TimeSplit(validation_start_ms=int(times[validation_start_index]),
                     test_start_ms=int(times[test_start_index]))


def split_of(event_ms: int, split: TimeSplit) -> Split:
    """Return the period an event time falls in: "train", "validation" or "test"."""
    if event_ms >= split.test_start_ms:
        return "test"
    if event_ms >= split.validation_start_ms:
        return "validation"
    return "train"


def user_segments(first_event_ms_by_user: Mapping[str, int], test_start_ms: int) -> dict[str, str]:
    """Label each user "warm" when their first event is before ``test_start_ms``, otherwise "cold"."""
    return {user_id: ("warm" if first_event_ms < test_start_ms else "cold")
            for user_id, first_event_ms in first_event_ms_by_user.items()}
