"""What the scorer served, published to Kafka without ever making a request wait.

Each response becomes one JSON record on ``kafka.served_topic`` (keyed by user):

    {"request_id": "...", "user_id": "414", "items": ["318", ...], "scores": [0.71, ...],
     "model_name": "streamrec-ranker", "model_version": "3", "feature_set_version": "...",
     "fallback_reason": null, "k": 10, "served_at_ms": 1764900000000, "event_time_ms": 1537799250000}

``served_at_ms`` is the wall clock. ``event_time_ms`` is the stream's event-time clock: the newest
event time the features reflect (``popularity_as_of_ms`` in Redis). With it, online accuracy can be
measured against later events on replayed history as well as on live traffic. The served-ingest
job (jobs/served_ingest.py) lands the records in Delta.

The producer is librdkafka's: ``produce`` only appends to a local buffer, which a background thread
of librdkafka sends. When the buffer contains ``serving.served_log_buffer`` messages (Kafka down or
slow), a record is dropped and counted in ``streamrec_scorer_served_log_dropped_total{reason}``;
records Kafka never acknowledged (after ``message.timeout.ms``) are counted there too. The request
never waits. Create one ``ServedLog`` per worker process, after the fork.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Optional

log = logging.getLogger("serving.served_log")

# How long a record may wait for Kafka before it counts as dropped.
MESSAGE_TIMEOUT_MS = 30_000


class ServedLog:
    """A non-blocking publisher of served records; ``publish`` returns whether the record was buffered."""

    def __init__(self, kafka_config, buffer_messages: int, sent, dropped):
        self.topic = kafka_config.served_topic
        self.settings = {**kafka_config.client_options(),
                         "client.id": "streamrec-scorer",
                         "acks": "all",
                         "enable.idempotence": True,
                         "linger.ms": 20,
                         "queue.buffering.max.messages": max(1, int(buffer_messages)),
                         "message.timeout.ms": MESSAGE_TIMEOUT_MS}
        self.sent = sent
        self.dropped = dropped
        self._producer = None
        self._lock = threading.Lock()
        self._warned = False

    def _get_producer(self):
        # Created on first use, in the process that publishes (never inherited across a fork).
        if self._producer is None:
            with self._lock:
                if self._producer is None:
                    from confluent_kafka import Producer

                    # librdkafka's own messages (a refused connection, say) go through logging.
                    self._producer = Producer(self.settings, logger=logging.getLogger("serving.served_log.kafka"))
                    log.info("served log: publishing to %s at %s", self.topic, self.settings["bootstrap.servers"])
        return self._producer

    def publish(self, record: dict) -> bool:
        """Buffer one served record for Kafka; on a full buffer drop it, count it and return False."""
        from confluent_kafka import KafkaException

        value = json.dumps(record, separators=(",", ":")).encode()
        try:
            producer = self._get_producer()
            producer.produce(self.topic, value=value, key=str(record.get("user_id", "")).encode(),
                             on_delivery=self._delivered)
        except BufferError:
            self._drop("buffer_full", f"the producer buffer holds {self.settings['queue.buffering.max.messages']} "
                                      "messages (is Kafka reachable?)")
            return False
        except KafkaException as error:
            self._drop("producer_error", str(error))
            return False
        # poll(0) runs the delivery callbacks of earlier records and returns at once.
        producer.poll(0)
        return True

    def _delivered(self, error, _message) -> None:
        if error is None:
            self.sent.inc()
        else:
            self._drop("delivery_failed", str(error))

    def _drop(self, reason: str, detail: str) -> None:
        self.dropped.labels(reason).inc()
        if not self._warned:
            # One line, not one per record, because the counter keeps the totals.
            self._warned = True
            log.warning("served log: dropping records for topic %s (%s: %s); counted in "
                        "streamrec_scorer_served_log_dropped_total", self.topic, reason, detail)

    def flush(self, timeout_s: float = 5.0) -> int:
        """Wait up to ``timeout_s`` for buffered records; return how many are still waiting."""
        if self._producer is None:
            return 0
        remaining = self._producer.flush(timeout_s)
        if remaining:
            log.warning("served log: %d records not acknowledged by Kafka at shutdown", remaining)
        return remaining


def served_record(body: dict, model_name: Optional[str], k: int, served_at_ms: int,
                  event_time_ms: Optional[int]) -> dict:
    """Return the served-log record of one response body."""
    return {"request_id": body["request_id"], "user_id": body["user_id"],
            "items": [item["item_id"] for item in body["items"]],
            "scores": [item["score"] for item in body["items"]],
            "model_name": model_name, "model_version": body["model_version"],
            "feature_set_version": body["feature_set_version"], "fallback_reason": body["fallback_reason"],
            "k": k, "served_at_ms": served_at_ms, "event_time_ms": event_time_ms}
