"""The served log never makes a request wait: a full buffer drops records and counts them."""

from __future__ import annotations

import socket
import time

from prometheus_client import CollectorRegistry, Counter

from reccore.config import KafkaConfig
from serving.served_log import ServedLog, served_record


def closed_loopback_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def counters():
    registry = CollectorRegistry()
    sent = Counter("sent_total", "sent", registry=registry)
    dropped = Counter("dropped_total", "dropped", ["reason"], registry=registry)
    return registry, sent, dropped


def record(number: int) -> dict:
    body = {"request_id": f"r{number}", "user_id": "414", "model_version": "3", "feature_set_version": "v1",
            "fallback_reason": None, "items": [{"item_id": "318", "score": 0.5, "title": "x"}]}
    return served_record(body, "ranker", 10, 1_700_000_000_000 + number, 1_500_000_000_000)


def test_full_buffer_drops_and_counts_without_waiting():
    registry, sent, dropped = counters()
    kafka = KafkaConfig(bootstrap_servers=f"127.0.0.1:{closed_loopback_port()}", served_topic="served")
    served_log = ServedLog(kafka, buffer_messages=5, sent=sent, dropped=dropped)
    started = time.perf_counter()
    results = [served_log.publish(record(number)) for number in range(20)]
    elapsed = time.perf_counter() - started
    assert results == [True] * 5 + [False] * 15
    assert registry.get_sample_value("dropped_total", {"reason": "buffer_full"}) == 15
    assert registry.get_sample_value("sent_total") == 0
    # A blocking publish would wait for the 30 s message timeout; these return at once.
    assert elapsed < 5.0, f"publishing took {elapsed:.3f} s"
    assert served_log.flush(0.1) == 5


def test_served_record_fields():
    value = record(1)
    assert value == {"request_id": "r1", "user_id": "414", "items": ["318"], "scores": [0.5],
                     "model_name": "ranker", "model_version": "3", "feature_set_version": "v1",
                     "fallback_reason": None, "k": 10, "served_at_ms": 1_700_000_000_001,
                     "event_time_ms": 1_500_000_000_000}
