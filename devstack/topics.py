"""Kafka topics as code: create the topics the config lists, and leave existing ones as they are."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

from reccore.config import TopicConfig

from devstack.process import StackError

log = logging.getLogger(__name__)

ADMIN_TIMEOUT_SECONDS = 30.0
# The local stack has one broker, so a topic can have only one replica.
LOCAL_REPLICATION_FACTOR = 1


@dataclass(frozen=True)
class TopicResult:
    """The outcome of ``ensure_topics`` for one topic."""

    name: str
    outcome: str
    """created, or exists (left unchanged)."""
    partitions: int
    """The topic's partition count on the cluster (for a created topic: the requested one)."""
    configured_partitions: int
    retention_ms: int
    note: str = ""


def ensure_topics(bootstrap_servers: str, topics: list[TopicConfig], options: Mapping[str, str] | None = None,
                  replication_factor: int = LOCAL_REPLICATION_FACTOR,
                  timeout_seconds: float = ADMIN_TIMEOUT_SECONDS) -> list[TopicResult]:
    """Create each topic of ``topics`` that does not exist yet; report a partition count that differs.

    ``options`` are extra librdkafka client settings (security.protocol, sasl.*, ...). An existing
    topic is never altered, because adding partitions moves keys to other partitions and breaks
    per-key ordering. A partition count that differs from the config is logged as a warning and
    noted in the result.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    settings = {**(options or {}), "bootstrap.servers": bootstrap_servers,
                "logger": logging.getLogger("devstack.topics.librdkafka")}
    try:
        admin = AdminClient(settings)
        existing = admin.list_topics(timeout=timeout_seconds).topics
    except KafkaException as error:
        raise StackError(f"kafka: could not read the topic list from {bootstrap_servers} ({error}); "
                         "is the broker running? Start it with `python -m devstack up --only kafka`") from None

    missing = [NewTopic(topic.name, num_partitions=topic.partitions, replication_factor=replication_factor,
                        config={"retention.ms": str(topic.retention_ms)})
               for topic in topics if topic.name not in existing]
    futures = {}
    if missing:
        futures = admin.create_topics(missing, operation_timeout=timeout_seconds, request_timeout=timeout_seconds)

    results = []
    for topic in topics:
        if topic.name in futures:
            try:
                futures[topic.name].result(timeout=timeout_seconds)
            except KafkaException as error:
                kafka_error = error.args[0] if error.args else None
                if not (isinstance(kafka_error, KafkaError) and kafka_error.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                    raise StackError(f"kafka: creating topic {topic.name!r} on {bootstrap_servers} failed: "
                                     f"{error}") from None
                # Another client created it between the listing and the request.
                existing = admin.list_topics(topic=topic.name, timeout=timeout_seconds).topics
            else:
                log.info("kafka: created topic %s (%d partitions, retention.ms=%d)", topic.name, topic.partitions,
                         topic.retention_ms)
                results.append(TopicResult(topic.name, "created", topic.partitions, topic.partitions,
                                           topic.retention_ms))
                continue

        results.append(_existing_result(topic, len(existing[topic.name].partitions)))
    return results


def _existing_result(topic: TopicConfig, partitions: int) -> TopicResult:
    note = ""
    if partitions != topic.partitions:
        note = (f"has {partitions} partitions but the config asks for {topic.partitions}; left unchanged "
                f"(delete the topic to recreate it, or change kafka.topics)")
        log.warning("kafka: topic %s %s", topic.name, note)
    return TopicResult(topic.name, "exists", partitions, topic.partitions, topic.retention_ms, note=note)
