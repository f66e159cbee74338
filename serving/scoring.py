"""Scoring a user's candidates from packed Redis vectors: the pure core of the scorer, no HTTP.

The views fetch the user's and the candidates' packed vectors in one MGET and hand them here with
the model. Everything between the bytes and the ranked list is in this module, so it can be tested
with a real booster and real packed values but without Flask or Redis:

1. each packed value is unpacked (``reccore.store``). A missing one becomes a row of NaN, the
   form in which training saw an entity without history;
2. rows are built by ``reccore.ranking.model_rows``, the code training used, in the manifest's
   order, then put in the model's own feature order by name;
3. all candidates are scored in one predict call, and the top k are kept, ties broken by item id so
   equal scores always come out in the same order. The predictor is the native booster or the same
   model version compiled by lleaves (``serving.compiled``); both take the same float64 matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from reccore.events import is_valid_id
from reccore.ranking import category_matrix, model_feature_names, model_rows, reorder_columns
from reccore.store import HEADER, unpack

MAX_K = 100
MAX_CANDIDATES = 1000


class BadRequest(ValueError):
    """A request value outside the API's rules; the message names the value and the rule."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_id(field: str, value) -> str:
    """Return ``value`` as an id, or raise BadRequest naming the field when it breaks the id grammar."""
    if not isinstance(value, str) or not is_valid_id(value):
        raise BadRequest(field, f"{field} {value!r} is not a valid id: 1 to 128 characters from "
                                "letters, digits and _ . : @ -")
    return value


def check_k(value, max_k: int = MAX_K) -> int:
    """Return ``value`` as k, or raise BadRequest when it is not an integer from 1 to ``max_k``."""
    try:
        k = int(value)
    except (TypeError, ValueError, OverflowError):  # int() of a JSON Infinity or 1e400 raises OverflowError
        raise BadRequest("k", f"k {value!r} is not an integer; use 1 to {max_k}") from None
    if isinstance(value, bool) or str(k) != str(value).strip() or not 1 <= k <= max_k:
        raise BadRequest("k", f"k {value!r} is out of range; use an integer from 1 to {max_k}")
    return k


def check_candidates(values, max_candidates: int = MAX_CANDIDATES) -> list[str]:
    """Return the candidate ids without repeats, or raise BadRequest naming the first bad one."""
    if not isinstance(values, list):
        raise BadRequest("candidates", "candidates must be a list of item ids")
    if not values:
        raise BadRequest("candidates", "candidates is empty; send at least one item id")
    if len(values) > max_candidates:
        raise BadRequest("candidates", f"{len(values)} candidates, more than the limit of {max_candidates}")
    unique = list(dict.fromkeys(check_id("candidates[]", value) for value in values))
    return unique


@dataclass(frozen=True)
class ScoredItem:
    """One ranked item with its model score."""

    item_id: str
    score: float


@dataclass(frozen=True)
class Ranking:
    """The top items of one request and the age of the features behind them."""

    items: list
    user_known: bool
    feature_age_s: Optional[float]
    newest_event_ms: Optional[int]


def unpack_many(packed: Sequence[Optional[bytes]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the float32 values (NaN rows where a value is missing) and each newest event time (NaN if missing).

    All present values are decoded by one ``np.frombuffer`` over their concatenation (the stamp's
    three little-endian int64, then ``size`` little-endian float32); a value of the wrong length is
    refused with the same error ``reccore.store.unpack`` gives.
    """
    values = np.full((len(packed), size), np.nan, dtype=np.float32)
    newest = np.full(len(packed), np.nan, dtype=np.float64)
    present = [row for row, raw in enumerate(packed) if raw is not None]
    if not present:
        return values, newest
    expected = HEADER.size + 4 * size
    for row in present:
        if len(packed[row]) != expected:
            unpack(packed[row], size)  # raises ValueError naming both lengths
    record = np.dtype([("stamp", "<i8", (3,)), ("values", "<f4", (size,))])
    decoded = np.frombuffer(b"".join(packed[row] for row in present), dtype=record)
    values[present] = decoded["values"]
    newest[present] = decoded["stamp"][:, 0]
    return values, newest


def score(predictor, layout, user_packed: Optional[bytes], item_packed: Sequence[Optional[bytes]],
          item_categories: Sequence[Sequence[int]], now_ms: int) -> np.ndarray:
    """Return the model's score of every candidate, in candidate order, from one predict call.

    ``predictor`` has ``feature_name()`` and ``predict(rows)``: a LightGBM booster, or a predictor
    of ``serving.compiled``.
    """
    count = len(item_packed)
    user_size, item_size = len(layout.names("user")), len(layout.names("item"))
    user_values, user_newest = unpack_many([user_packed], user_size)
    item_values, item_newest = unpack_many(item_packed, item_size)
    rows = model_rows(layout, np.repeat(user_values, count, axis=0), np.repeat(user_newest, count),
                      item_values, item_newest, category_matrix(item_categories, len(layout.categories)),
                      np.full(count, float(now_ms)))
    ordered = reorder_columns(rows, model_feature_names(layout), predictor.feature_name())
    # float64 represents every float32 value exactly, and lleaves reads a C-order float64 matrix
    # without a copy.
    return predictor.predict(np.ascontiguousarray(ordered, dtype=np.float64))


def rank(predictor, layout, candidates: Sequence[str], user_packed: Optional[bytes],
         item_packed: Sequence[Optional[bytes]], item_categories: Sequence[Sequence[int]], now_ms: int,
         k: int, exclude: frozenset = frozenset()) -> Ranking:
    """Return the k best candidates by score (ties by item id), leaving out ``exclude``."""
    if len(candidates) != len(item_packed) or len(candidates) != len(item_categories):
        raise ValueError(f"{len(candidates)} candidates, {len(item_packed)} vectors and "
                         f"{len(item_categories)} category lists must match")
    keep = [index for index, item in enumerate(candidates) if item not in exclude]
    scores = score(predictor, layout, user_packed, [item_packed[index] for index in keep],
                   [item_categories[index] for index in keep], now_ms) if keep else np.zeros(0)
    order = sorted(range(len(keep)), key=lambda position: (-scores[position], candidates[keep[position]]))[:k]
    items = [ScoredItem(candidates[keep[position]], float(scores[position])) for position in order]
    newest = HEADER.unpack_from(user_packed)[0] if user_packed else None
    age = max(0.0, (now_ms - newest) / 1000.0) if newest is not None else None
    return Ranking(items, user_packed is not None, age, newest)


def is_stale(age_s: Optional[float], max_age_s: float) -> bool:
    """Return whether features of this age (None: none at all) are past the configured maximum."""
    return age_s is None or math.isinf(age_s) or age_s > max_age_s
