"""Ingest throughput: the full job against the same read, parse and good/bad split into a no-op sink.

    make bench-ingest          # or: .venv/bin/python bench/ingest_throughput.py [--repeat 10]

Replays the MovieLens ratings ``--repeat`` times with new event ids (10 gives 1,008,360 events) into
a fresh topic with one partition per core, warms the session up on a small topic, then drains the
big topic twice with available-now triggers on local[2]:
  noop    Kafka read, contract parse, good/bad split, both sides written to Spark's no-op sink
  full    the ingest job: the same, plus the bronze dedup MERGE and the quarantine MERGE
Prints ``name: value`` lines for BENCHMARKS.md. Needs the stack's Kafka (make stack-up).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewTopic

from jobs import bronze
from jobs.ingest import IngestJob
from jobs.lib.session import build_spark
from jobs.replay import DEFAULT_RATINGS, Publisher, movielens_events, movielens_record, publish
from reccore.config import Config, load_config
from reccore.events import EventRules

log = logging.getLogger("bench.ingest")


def with_sections(config: Config, **sections) -> Config:
    changes = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(config, **changes)


def create_topic(config: Config, partitions: int) -> str:
    name = f"bench-ingest-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(config.kafka.client_options())
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[name].result(timeout=30)
    return name


def fill_topic(config: Config, topic: str, repeat: int, limit: int | None = None) -> int:
    rows = movielens_events(DEFAULT_RATINGS, repeat)
    if limit is not None:
        rows = rows[:limit]
    publisher = Publisher(config.kafka.client_options(), topic)
    publish((movielens_record(*row) for row in rows), publisher, len(rows), speedup=0.0, progress=True)
    if publisher.flush(300) or publisher.failed:
        raise RuntimeError(f"replay into {topic} failed: {publisher.first_error}")
    return len(rows)


def run_full(spark, config: Config) -> tuple[float, IngestJob]:
    job = IngestJob(spark, config)
    started = time.monotonic()
    query = job.start()
    query.awaitTermination()
    elapsed = time.monotonic() - started
    job.close()
    if query.exception() is not None:
        raise RuntimeError(f"ingest failed: {query.exception()}")
    return elapsed, job


def run_noop(spark, config: Config, checkpoint: str) -> float:
    """Same source, parse and split as the job, both sides into the no-op sink."""
    probe = IngestJob(spark, config)
    rules = EventRules.from_config(config.events)
    parsed = bronze.parse_kafka_records(probe.kafka_stream(), rules)

    def split(batch_df, _batch_id):
        # The job's own statistics and selection, so the only difference left is the Delta writes.
        batch = batch_df.persist()
        stats = probe._batch_stats(batch, None)
        deduplicate = stats["distinct_ids"] < stats["valid"]
        bronze.valid_events(batch, "2026-01-01 00:00:00", deduplicate).write.format("noop").mode("overwrite").save()
        bronze.quarantined_records(batch, "2026-01-01 00:00:00").write.format("noop").mode("overwrite").save()
        batch.unpersist()

    started = time.monotonic()
    query = (parsed.writeStream.option("checkpointLocation", checkpoint).foreachBatch(split)
             .trigger(availableNow=True).start())
    query.awaitTermination()
    if query.exception() is not None:
        raise RuntimeError(f"no-op run failed: {query.exception()}")
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="copies of MovieLens (10 gives 1,008,360 events)")
    parser.add_argument("--max-offsets-per-trigger", type=int, default=250_000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    base = load_config("local")
    cores = os.cpu_count() or 2
    work = Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    spark = build_spark(base, "streamrec-bench-ingest")

    def config_for(topic: str, name: str) -> Config:
        return with_sections(base, kafka={"interactions_topic": topic},
                             lake={"root": str(work / name / "lake"), "checkpoint_root": str(work / name / "cp")},
                             ingest={"trigger": "available_now", "metrics_port": 0,
                                     "max_offsets_per_trigger": args.max_offsets_per_trigger})

    warm_topic = create_topic(base, cores)
    fill_topic(base, warm_topic, 1, limit=50_000)
    run_noop(spark, config_for(warm_topic, "warm-noop"), str(work / "warm-noop-cp"))
    run_full(spark, config_for(warm_topic, "warm-full"))
    log.info("warm-up done")

    topic = create_topic(base, cores)
    started = time.monotonic()
    total = fill_topic(base, topic, args.repeat)
    replay_s = time.monotonic() - started

    noop_s = run_noop(spark, config_for(topic, "noop"), str(work / "noop-cp"))
    full_s, job = run_full(spark, config_for(topic, "full"))
    written = sum(result.written for result in job.results)
    if written != total:
        raise RuntimeError(f"bronze got {written} events, expected {total}")
    batch_s = sum(result.duration_s for result in job.results)
    merge_s = sum(result.merge_s for result in job.results)

    lines = [
        f"ingest_events: {total}",
        f"ingest_topic_partitions: {cores}",
        f"ingest_batches: {len(job.results)}",
        f"replay_events_per_s: {total / replay_s:.0f}",
        f"ingest_noop_events_per_s: {total / noop_s:.0f}",
        f"ingest_events_per_s: {total / full_s:.0f}",
        f"ingest_vs_noop_ratio: {noop_s / full_s:.2f}",
        f"ingest_dedup_write_share: {merge_s / batch_s:.2f}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
