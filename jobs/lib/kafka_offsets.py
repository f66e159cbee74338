"""Kafka offsets from the broker side: earliest and latest per partition, data loss and lag."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

def watermarks(settings: dict, topic: str, timeout_s: float = 10.0) -> dict[int, tuple[int, int]]:
    """Return ``{partition: (earliest, latest)}`` for ``topic``; raises RuntimeError when the broker does not respond."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({**settings, "group.id": "streamrec-offset-reader", "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        topic_metadata = metadata.topics.get(topic)
        if topic_metadata is None or topic_metadata.error is not None:
            error = topic_metadata.error if topic_metadata is not None else "not found"
            raise RuntimeError(f"Kafka topic {topic!r} is not available on {settings['bootstrap.servers']}: {error}")
        result = {}
        for partition in sorted(topic_metadata.partitions):
            try:
                result[partition] = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                                   timeout=timeout_s, cached=False)
            except KafkaException as error:
                raise RuntimeError(f"could not read offsets of {topic} partition {partition}: {error}") from error
        return result
    finally:
        consumer.close()


@dataclass(frozen=True)
class OffsetGap:
    """Records deleted from Kafka before the query read them."""

    topic: str
    partition: int
    checkpointed: int
    earliest: int

    @property
    def skipped(self) -> int:
        return self.earliest - self.checkpointed

    def describe(self) -> str:
        return (f"topic {self.topic} partition {self.partition}: offsets {self.checkpointed} to "
                f"{self.earliest - 1} were deleted before they were read (checkpoint at {self.checkpointed}, "
                f"earliest available {self.earliest}; {self.skipped} records)")


def find_gaps(start_offsets: dict, marks_by_topic: dict) -> list[OffsetGap]:
    """Compare checkpointed start offsets with the earliest offsets still in Kafka."""
    gaps = []
    for topic, partitions in start_offsets.items():
        marks = marks_by_topic.get(topic, {})
        for partition, checkpointed in sorted(partitions.items()):
            if partition in marks and marks[partition][0] > checkpointed >= 0:
                gaps.append(OffsetGap(topic, partition, checkpointed, marks[partition][0]))
    return gaps
