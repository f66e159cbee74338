"""The probes beside the streams while the rest of the ratings is replayed: send times, freshness, request rounds."""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from jobs.replay import Publisher, Record
from reccore.store import HEADER, KeyLayout

from demo.console import DemoError

log = logging.getLogger("demo.live")

PROBE_INTERVAL_SECONDS = 0.2
# A round of requests never runs longer than this many requests, whatever the number of users.
MAX_REQUESTS_PER_ROUND = 1000
MAX_ROUNDS = 10_000


class TimedPublisher(Publisher):
    """A replay publisher that reports each record's user, event time and wall-clock send time."""

    def __init__(self, settings: dict, topic: str, on_send: Callable[[str, int, float], None]):
        super().__init__(settings, topic)
        self.on_send = on_send

    def publish(self, record: Record) -> None:
        self.on_send(record.key.decode(), record.event_time_ms, time.time())
        super().publish(record)


class FreshnessProbe(threading.Thread):
    """Measure freshness: the seconds from an event's send to Kafka until its user's features in Redis reflect it.

    Every ``PROBE_INTERVAL_SECONDS`` it reads the stamp of every watched user's packed vector (one
    MGET). An event is visible once its user's stamp (the newest event time the vector reflects) has
    reached the event's time. An event the stream leaves out as late becomes visible only through a
    later event of the same user. An event that never becomes visible is counted as unseen.
    """

    def __init__(self, client, layout: KeyLayout, users: list[str]):
        super().__init__(name="freshness-probe", daemon=True)
        self.client = client
        self.users = users
        self.keys = [layout.vector("user", user) for user in users]
        self.latencies: list[float] = []
        self.sent = 0
        self.error: Optional[str] = None
        self._incoming: deque = deque()
        self._stop_at: Optional[float] = None
        self._stop_event = threading.Event()

    def record_send(self, user: str, event_ms: int, sent_at: float) -> None:
        self._incoming.append((user, event_ms, sent_at))
        self.sent += 1

    @property
    def visible(self) -> int:
        return len(self.latencies)

    def stop(self, drain_s: float) -> None:
        """Stop after at most ``drain_s`` more seconds (sooner when every event is visible)."""
        self._stop_at = time.monotonic() + drain_s
        self._stop_event.set()

    def run(self) -> None:
        pending: dict[str, deque] = defaultdict(deque)
        try:
            while True:
                while self._incoming:
                    user, event_ms, sent_at = self._incoming.popleft()
                    pending[user].append((event_ms, sent_at))
                now = time.time()
                for user, packed in zip(self.users, self.client.mget(self.keys)):
                    queue = pending.get(user)
                    if packed is None or not queue:
                        continue
                    newest_ms = HEADER.unpack_from(packed)[0]
                    while queue and queue[0][0] <= newest_ms:
                        self.latencies.append(now - queue.popleft()[1])
                waiting = any(pending.values()) or self._incoming
                if self._stop_event.is_set() and (not waiting or time.monotonic() >= self._stop_at):
                    return
                time.sleep(PROBE_INTERVAL_SECONDS)
        except Exception as error:  # noqa: BLE001 - reported with the freshness figures
            log.exception("freshness probe failed")
            self.error = str(error)

    def summary(self) -> dict:
        """Return p50, p95 and max in seconds over every sent event, unseen events counting as slower than any seen."""
        measured = sorted(self.latencies)

        def quantile(fraction: float) -> Optional[float]:
            index = min(self.sent - 1, int(self.sent * fraction))
            return measured[index] if 0 <= index < len(measured) else None

        return {"events": self.sent, "visible": len(measured), "unseen": self.sent - len(measured),
                "p50_s": quantile(0.5), "p95_s": quantile(0.95), "max_s": quantile(1.0),
                "mean_s": statistics.fmean(measured) if measured else None, "error": self.error}


@dataclass
class Served:
    """One response of the scorer, as the demo keeps it."""

    round: int
    user_id: str
    request_id: str
    items: list
    titles: list
    scores: list
    model_version: Optional[str]
    fallback_reason: Optional[str]
    feature_age_seconds: Optional[float]
    stale: bool


@dataclass
class RequestLog:
    """Every response and error of the demo's requests."""

    responses: list = field(default_factory=list)
    errors: int = 0
    first_error: Optional[str] = None
    rounds: int = 0

    def fallbacks(self) -> Counter:
        return Counter(served.fallback_reason for served in self.responses if served.fallback_reason)

    def last_round(self) -> dict:
        """Return the responses of the newest round, by user."""
        return {served.user_id: served for served in self.responses if served.round == self.rounds - 1}


def request_round(recommend: Callable[[str], dict], users: list[str], requests: RequestLog) -> dict:
    """Request every user's recommendations once; return this round's responses by user."""
    number = requests.rounds
    requests.rounds += 1
    this_round = {}
    for user in users[:MAX_REQUESTS_PER_ROUND]:
        try:
            body = recommend(user)
        except (OSError, DemoError) as error:
            requests.errors += 1
            requests.first_error = requests.first_error or f"user {user}: {error}"
            continue
        served = Served(number, user, body["request_id"], [item["item_id"] for item in body["items"]],
                        [item.get("title") for item in body["items"]], [item["score"] for item in body["items"]],
                        body.get("model_version"), body.get("fallback_reason"), body.get("feature_age_seconds"),
                        bool(body.get("stale")))
        requests.responses.append(served)
        this_round[user] = served
    return this_round


class RequestRounds(threading.Thread):
    """Request every followed user's recommendations, one round every ``interval_s``, until stopped."""

    def __init__(self, recommend: Callable[[str], dict], users: list[str], requests: RequestLog, interval_s: float):
        super().__init__(name="request-rounds", daemon=True)
        self.recommend = recommend
        self.users = users
        self.requests = requests
        self.interval_s = interval_s
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        for _ in range(MAX_ROUNDS):
            started = time.monotonic()
            request_round(self.recommend, self.users, self.requests)
            if self._stop_event.wait(max(0.0, self.interval_s - (time.monotonic() - started))):
                return


def list_changes(before: dict, after: dict) -> dict:
    """Compare two rounds of lists by user: how many users' lists changed and how many items were replaced."""
    users = sorted(set(before) & set(after))
    replaced = {user: len(set(before[user].items) - set(after[user].items)) for user in users}
    changed = [user for user in users if before[user].items != after[user].items]
    return {"users": len(users), "changed": len(changed),
            "mean_replaced": statistics.fmean(replaced.values()) if users else None, "replaced": replaced}


def lists_with_rated_items(lists: dict, rated: dict) -> list[str]:
    """Return the users whose list contains an item they had rated (``rated``: user -> items)."""
    return sorted(user for user, served in lists.items() if set(served.items) & rated.get(user, set()))
