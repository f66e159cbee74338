"""Crash safety of the ingest job, run the way users run it: ./spark-submit.sh in its own process group.

Every scenario ends with the same check: each event id exactly once in bronze, each bad record
exactly once in quarantine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from jobs.ingest import EXIT_AFTER_COMMIT_ENV
from jobs.lib.checkpoint import CheckpointReader
from reccore.config import PROJECT_ROOT
from tests.conftest import produce, project_env

pytestmark = [pytest.mark.integration, pytest.mark.spark, pytest.mark.fault]

BAD_VALUES = ['{"broken', json.dumps({"event_id": "bad-value", "event_time": 1537799250000, "user_id": "u",
                                      "item_id": "i", "event_type": "rating", "value": 9})]


def events(prefix: str, count: int) -> list[str]:
    return [json.dumps({"event_id": f"{prefix}-{n}", "event_time": 1537799250000 + n * 1000,
                        "user_id": f"u{n % 37}", "item_id": f"i{n % 101}", "event_type": "rating",
                        "value": 1 + n % 5}) for n in range(count)]


class IngestRun:
    """One ``./spark-submit.sh ingest`` process group with its log file."""

    def __init__(self, env: dict, log_path: Path, *args: str):
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(["./spark-submit.sh", "ingest", *args], cwd=PROJECT_ROOT, env=env,
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self._log.close()

    def kill_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@pytest.fixture
def fault_env(make_topic, tmp_path):
    """A topic, lake and checkpoint for one scenario, and the environment that points the job at them."""

    def build(partitions: int = 2, **ingest) -> tuple[str, dict, Path]:
        topic = make_topic(partitions=partitions)
        overrides = {"kafka.interactions_topic": topic, "lake.root": tmp_path / "lake",
                     "lake.checkpoint_root": tmp_path / "checkpoints", "ingest.metrics_port": 0}
        overrides.update({f"ingest.{key}": value for key, value in ingest.items()})
        return topic, project_env(overrides), tmp_path

    return build


def assert_exactly_once(spark, root: Path, expected_ids: set, expected_bad: int) -> None:
    events_df = spark.read.format("delta").load(str(root / "lake" / "bronze" / "events"))
    ids = [row.event_id for row in events_df.select("event_id").collect()]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} event ids written twice"
    assert set(ids) == expected_ids
    quarantine = spark.read.format("delta").load(str(root / "lake" / "bronze" / "events_quarantine"))
    keys = [(row.kafka_partition, row.kafka_offset) for row in quarantine.collect()]
    assert len(keys) == len(set(keys)), "a bad record was quarantined twice"
    assert len(keys) == expected_bad


def test_exit_between_delta_and_checkpoint_commit(spark, fault_env, kafka_settings, tmp_path):
    topic, env, root = fault_env(max_offsets_per_trigger=50)
    produce(kafka_settings, topic, events("x", 300) + BAD_VALUES)

    crashing = IngestRun({**env, EXIT_AFTER_COMMIT_ENV: "2"}, tmp_path / "crash.log", "--trigger", "available_now")
    assert crashing.wait(300) == 75, crashing.log_text()[-4000:]
    reader = CheckpointReader(str(root / "checkpoints" / "ingest_bronze_events"))
    assert reader.end_offsets(2) is not None, "batch 2 was planned"
    assert reader.last_committed_batch() == 1, "batch 2 must not be in the commit log"

    restart = IngestRun(env, tmp_path / "restart.log", "--trigger", "available_now")
    assert restart.wait(300) == 0, restart.log_text()[-4000:]
    assert "batch 2: already in bronze" in restart.log_text()
    assert_exactly_once(spark, root, {f"x-{n}" for n in range(300)}, expected_bad=2)


def test_sigkill_at_random_points(spark, fault_env, kafka_settings, tmp_path):
    seed = int(os.environ.get("STREAMREC_FAULT_SEED", time.time()))
    chooser = random.Random(seed)
    topic, env, root = fault_env(max_offsets_per_trigger=150, trigger="processing_time",
                                 trigger_interval_seconds=0.5)
    expected = set()
    for round_number in range(3):
        batch = events(f"k{round_number}", 700)
        produce(kafka_settings, topic, batch)
        expected |= {json.loads(value)["event_id"] for value in batch}
        run = IngestRun(env, tmp_path / f"killed-{round_number}.log")
        delay_s = chooser.uniform(6.0, 25.0)
        time.sleep(delay_s)
        run.kill_group(signal.SIGKILL)
        run.wait(60)
        print(f"seed {seed}: round {round_number} killed after {delay_s:.1f} s")

    produce(kafka_settings, topic, BAD_VALUES)
    final = IngestRun(env, tmp_path / "final.log", "--trigger", "available_now")
    assert final.wait(600) == 0, final.log_text()[-4000:]
    assert_exactly_once(spark, root, expected, expected_bad=2)


@pytest.mark.parametrize("target", ["process_group", "wrapper_only"])
def test_sigterm_stops_after_committed_batch(spark, fault_env, kafka_settings, tmp_path, target):
    topic, env, root = fault_env(max_offsets_per_trigger=100, trigger="processing_time",
                                 trigger_interval_seconds=0.5)
    produce(kafka_settings, topic, events("t", 2000))
    run = IngestRun(env, tmp_path / "term.log")
    reader = CheckpointReader(str(root / "checkpoints" / "ingest_bronze_events"))

    deadline = time.monotonic() + 180
    while reader.last_committed_batch() is None and time.monotonic() < deadline and run.process.poll() is None:
        time.sleep(0.2)
    assert reader.last_committed_batch() is not None, run.log_text()[-4000:]

    if target == "process_group":
        run.kill_group(signal.SIGTERM)
    else:
        run.process.send_signal(signal.SIGTERM)
    assert run.wait(180) == 0, run.log_text()[-4000:]
    assert "stopping after the current micro-batch" in run.log_text()

    # Whatever the job wrote belongs to committed batches: bronze contains exactly the events up to
    # the last committed offsets. A batch planned after the signal wrote nothing.
    committed = reader.last_committed_batch()
    end = reader.end_offsets(committed)[topic]
    written = spark.read.format("delta").load(str(root / "lake" / "bronze" / "events")).count()
    assert written == sum(end.values())
    assert written < 2000, "the job should have stopped long before it drained the topic"
