"""Feature freshness: wall-clock time from an event produced to Kafka until its effect is in Redis.

    .venv/bin/python bench/freshness.py [--rate 1000] [--seconds 180] [--warmup-seconds 40]

Needs the stack's Kafka and Redis (make stack-up). In a fresh lake, topic and Redis prefix it loads
the MovieLens catalogue, ingests and backfills a small seed history, then runs the ingest job and
the features stream side by side in one Spark session on local[2], both with processing-time
triggers (``--trigger-interval-seconds``). A producer thread sends ``--rate`` rating events a second
for ``--seconds``, each with the current wall-clock time as its event time, spread over ``--users``
users. A poller reads every user's packed vector header (one MGET) every 100 ms: an event is
visible once its user's stamp has reached the event's time. Events of the first
``--warmup-seconds`` are left out of the figures. Prints ``name: value`` lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict, deque
from pathlib import Path

import orjson
import redis
from confluent_kafka.admin import AdminClient, NewTopic

from jobs.backfill import run_backfill
from jobs.features_stream import FeaturesStream
from jobs.ingest import IngestJob
from jobs.items import DEFAULT_MOVIES, read_catalog, write_catalog
from jobs.lib.session import build_spark
from jobs.replay import Publisher, Record
from reccore.config import Config, load_config
from reccore.features import load_feature_set
from reccore.store import HEADER, KeyLayout

log = logging.getLogger("bench.freshness")


def with_sections(config: Config, **sections) -> Config:
    changes = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(config, **changes)


def event(number: int, user: str, item: str, at_ms: int, rating: float) -> Record:
    body = {"event_id": f"fresh-{number}", "event_time": at_ms, "user_id": user, "item_id": item,
            "event_type": "rating", "value": rating}
    return Record(at_ms, user.encode(), orjson.dumps(body))


class Producer(threading.Thread):
    """Send ``rate`` events a second for ``seconds``, paced in 10 ms steps; remember each send time."""

    def __init__(self, config: Config, topic: str, users: list[str], items: list[str], rate: int, seconds: float):
        super().__init__(daemon=True)
        self.publisher = Publisher(config.kafka.client_options(), topic)
        self.users, self.items, self.rate, self.seconds = users, items, rate, seconds
        self.sent: list[tuple[str, int, float]] = []  # (user, event ms, wall-clock send time)

    def run(self) -> None:
        generator = random.Random(11)
        started = time.time()
        number = 0
        while True:
            elapsed = time.time() - started
            if elapsed >= self.seconds:
                break
            due = int(elapsed * self.rate)
            while number < due:
                user = generator.choice(self.users)
                now = time.time()
                at_ms = int(now * 1000)
                self.publisher.publish(event(number, user, generator.choice(self.items), at_ms,
                                             generator.choice([1.0, 2.5, 3.0, 4.0, 4.5, 5.0])))
                self.sent.append((user, at_ms, now))
                number += 1
            self.publisher.producer.poll(0)
            time.sleep(0.01)
        if self.publisher.flush(60) or self.publisher.failed:
            raise RuntimeError(f"producer failed: {self.publisher.first_error}")


def poll_visibility(client: redis.Redis, layout: KeyLayout, producer: Producer, stop: threading.Event,
                    latencies: list[tuple[float, float]]) -> None:
    """Record (send time, latency) for each event once its user's Redis stamp reaches its event time."""
    pending: dict[str, deque] = defaultdict(deque)
    seen = 0
    keys = [layout.vector("user", user) for user in producer.users]
    while not stop.is_set() or any(pending.values()):
        new = producer.sent[seen:]  # the producer appends meanwhile: count exactly what was taken
        seen += len(new)
        for user, at_ms, sent_at in new:
            pending[user].append((at_ms, sent_at))
        headers = client.mget(keys)
        now = time.time()
        for user, packed in zip(producer.users, headers):
            if packed is None or not pending[user]:
                continue
            newest_ms = HEADER.unpack_from(packed)[0]
            queue = pending[user]
            while queue and queue[0][0] <= newest_ms:
                at_ms, sent_at = queue.popleft()
                latencies.append((sent_at, now - sent_at))
        if stop.is_set() and time.time() > stop.deadline:  # type: ignore[attr-defined]
            break
        time.sleep(0.1)


def percentile(seen: list[float], total: int, fraction: float) -> str:
    """Return the ``fraction`` quantile over ``total`` events, counting unseen ones as slower than any seen."""
    index = min(total - 1, int(total * fraction))
    return f"{seen[index]:.2f}" if index < len(seen) else "never (events not visible by the end)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=1000, help="events produced per second")
    parser.add_argument("--seconds", type=float, default=180.0, help="how long to produce")
    parser.add_argument("--warmup-seconds", type=float, default=40.0, help="events sent earlier are not measured")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--trigger-interval-seconds", type=float, default=1.0)
    parser.add_argument("--drain-seconds", type=float, default=120.0,
                        help="how long to wait after the last send for events to become visible")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    base = load_config("local")
    work = Path(tempfile.mkdtemp(prefix="streamrec-bench-fresh-"))
    topic = f"bench-fresh-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(base.kafka.client_options())
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(timeout=30)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    config = with_sections(base, kafka={"interactions_topic": topic},
                           lake={"root": str(work / "lake"), "checkpoint_root": str(work / "cp")},
                           redis={"key_prefix": prefix},
                           ingest={"trigger": "available_now", "metrics_port": 0})
    spark = build_spark(config, "streamrec-bench-freshness")
    feature_set = load_feature_set()
    catalog = read_catalog(DEFAULT_MOVIES)
    write_catalog(spark, config, catalog)
    items = [row[0] for row in catalog]
    users = [f"fresh{n}" for n in range(args.users)]

    # A seed history an hour old, so the stream has a backfill to continue from.
    seed = Producer(config, topic, users[:50], items, rate=1, seconds=0)
    hour_ago_ms = int(time.time() * 1000) - 3_600_000
    for number in range(200):
        seed.publisher.publish(event(10_000_000 + number, users[number % 50], items[number], hour_ago_ms + number, 4.0))
    seed.publisher.flush(60)
    ingest = IngestJob(spark, config)
    query = ingest.start()
    query.awaitTermination()
    ingest.close()
    run_backfill(spark, config, feature_set)

    live = with_sections(config, ingest={"trigger": "processing_time",
                                         "trigger_interval_seconds": args.trigger_interval_seconds})
    ingest = IngestJob(spark, live)
    stream = FeaturesStream(spark, live, feature_set, watermark_seconds=600, trigger="processing_time",
                            trigger_interval_seconds=args.trigger_interval_seconds)
    client = redis.Redis(host=config.redis.host, port=config.redis.port, socket_timeout=30)
    producer = Producer(config, topic, users, items, args.rate, args.seconds)
    latencies: list[tuple[float, float]] = []
    stop = threading.Event()
    poller = threading.Thread(target=poll_visibility,
                              args=(client, KeyLayout(prefix, feature_set.version), producer, stop, latencies))
    ingest.start()
    began = time.time()
    producer.start()
    poller.start()
    log.info("producing %d events/s for %.0f s", args.rate, args.seconds)
    stream.start()  # waits for the ingest job's first commit after the backfill
    log.info("features stream running")
    producer.join()
    log.info("producer done: %d events in %.0f s", len(producer.sent), time.time() - began)
    stop.deadline = time.time() + args.drain_seconds  # type: ignore[attr-defined]
    stop.set()
    poller.join()
    ingest.stop_gracefully()
    ingest.close()
    stream.stop_gracefully()
    stream.close()

    measured = sorted(latency for sent_at, latency in latencies if sent_at >= began + args.warmup_seconds)
    total_measured = sum(1 for _user, _at, sent_at in producer.sent if sent_at >= began + args.warmup_seconds)
    unseen = total_measured - len(measured)
    if unseen:
        # Not visible within --drain-seconds of the last send: the stream fell behind the rate.
        log.warning("%d of %d measured events were not visible in Redis %.0f s after the last send", unseen,
                    total_measured, args.drain_seconds)
    ingest_batches = [result.duration_s for result in ingest.results]
    feature_batches = [result.duration_s for result in stream.results]
    lines = [
        f"freshness_events: {len(producer.sent)}",
        f"freshness_rate_per_s: {len(producer.sent) / args.seconds:.0f}",
        f"freshness_measured_events: {total_measured}",
        f"freshness_unseen_events: {unseen}",
        f"freshness_p50_s: {percentile(measured, total_measured, 0.50)}",
        f"freshness_p95_s: {percentile(measured, total_measured, 0.95)}",
        f"freshness_max_s: {percentile(measured, total_measured, 1.0)}",
        f"freshness_ingest_batch_median_s: {statistics.median(ingest_batches):.2f}",
        f"freshness_features_batch_median_s: {statistics.median(feature_batches):.2f}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    keys = list(client.scan_iter(f"{prefix}:*", count=5000))
    for start in range(0, len(keys), 5000):
        client.delete(*keys[start:start + 5000])
    admin.delete_topics([topic])
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
