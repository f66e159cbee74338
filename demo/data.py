"""The demo's MovieLens slice: ratings in a time range, split by event time, and the users it follows.

The slice and its split are the replay tool's own selection (``jobs.replay.select``), so the two
parts are what ``python -m jobs.replay movielens --from A --to B --fraction F`` and
``--from-fraction F`` publish.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from jobs.replay import movielens_events, select

# One rating as jobs.replay.movielens_events returns it: (timestamp_s, user, movie, stars, copy).
Rating = tuple


class SliceError(ValueError):
    """A slice or split that leaves one of the demo's two parts empty."""


@dataclass(frozen=True)
class DemoSlice:
    """The ratings of the slice in event-time order, and its two parts."""

    first: list
    rest: list

    @property
    def events(self) -> list:
        return self.first + self.rest

    @property
    def split_clock_ms(self) -> int:
        """The newest event time of the first part: the stream's event-time clock after the backfill."""
        return self.first[-1][0] * 1000

    @property
    def last_event_ms(self) -> int:
        return self.rest[-1][0] * 1000


def load_slice(path: Path, start_ms: Optional[int], end_ms: Optional[int], fraction: float) -> DemoSlice:
    """Read the ratings in [start_ms, end_ms) and split them at ``fraction`` of their count, by event time."""
    events = movielens_events(path)

    def time_of(row: Rating) -> int:
        return row[0] * 1000

    first = select(events, time_of, start_ms, end_ms, fraction, None)
    rest = select(events, time_of, start_ms, end_ms, None, fraction)
    if not first or not rest:
        raise SliceError(f"the slice of {path} has {len(first) + len(rest)} ratings; split at {fraction} it leaves "
                         f"{len(first)} before and {len(rest)} after the split. Widen --from/--to or change --split")
    return DemoSlice(first, rest)


def followed_users(data: DemoSlice) -> list[str]:
    """Return the users with ratings in both parts, the most active after the split first (ties by id)."""
    before = {row[1] for row in data.first}
    after = Counter(row[1] for row in data.rest)
    users = [user for user in after if user in before]
    return sorted(users, key=lambda user: (-after[user], _numeric_first(user)))


def items_by_user(rows: list) -> dict[str, set]:
    """Return each user's rated items."""
    items: dict[str, set] = defaultdict(set)
    for row in rows:
        items[row[1]].add(row[2])
    return dict(items)


def rated_highly(rows: list, user: str, threshold: float, count: int) -> list[tuple[str, float]]:
    """Return the user's ratings at or above ``threshold`` as (item, stars), newest first, at most ``count``."""
    chosen = [(row[2], row[3]) for row in reversed(rows) if row[1] == user and row[3] >= threshold]
    return chosen[:count]


def positive_threshold(relevance_by_rating: dict) -> float:
    """Return the lowest rating with a relevance above 0 under training's rules (4.0 for MovieLens)."""
    thresholds = [float(rating) for rating, relevance in relevance_by_rating.items() if int(relevance) > 0]
    if not thresholds:
        raise ValueError(f"training.relevance_by_rating {relevance_by_rating} gives no rating a relevance above 0")
    return min(thresholds)


def _numeric_first(user: str) -> tuple:
    return (0, int(user), "") if user.isdigit() else (1, 0, user)
