"""Checkpoint files, the checkpoint lock, data-loss gaps and jar naming (no Spark needed)."""

import pytest

from devstack.maven import artifact_id
from jobs.jars import coordinates
from jobs.lib.checkpoint import CheckpointInUseError, CheckpointLock, CheckpointReader
from jobs.lib.kafka_offsets import find_gaps


def write_checkpoint(root):
    (root / "offsets").mkdir(parents=True)
    (root / "commits").mkdir()
    (root / "sources" / "0").mkdir(parents=True)
    (root / "metadata").write_text('{"id":"5d2c1c9e-0000-4000-8000-000000000001"}\n')
    (root / "sources" / "0" / "0").write_text('\x00v1\n{"topic-a":{"0":0,"1":5}}')
    meta = '{"batchWatermarkMs":0,"batchTimestampMs":1,"conf":{}}'
    (root / "offsets" / "0").write_text(f'v1\n{meta}\n{{"topic-a":{{"0":10,"1":15}}}}')
    (root / "offsets" / "1").write_text(f'v1\n{meta}\n{{"topic-a":{{"1":25,"0":20}}}}')
    (root / "commits" / "0").write_text('v1\n{"nextBatchWatermarkMs":0}')


def test_reader_offsets(tmp_path):
    write_checkpoint(tmp_path)
    reader = CheckpointReader(str(tmp_path))
    assert reader.query_id() == "5d2c1c9e-0000-4000-8000-000000000001"
    assert reader.start_offsets(0) == {"topic-a": {0: 0, 1: 5}}
    assert reader.end_offsets(0) == {"topic-a": {0: 10, 1: 15}}
    assert reader.start_offsets(1) == {"topic-a": {0: 10, 1: 15}}
    assert reader.end_offsets(1) == {"topic-a": {0: 20, 1: 25}}
    assert reader.last_committed_batch() == 0
    assert reader.end_offsets(7) is None


def test_reader_empty_checkpoint(tmp_path):
    reader = CheckpointReader(str(tmp_path / "missing"))
    assert reader.query_id() is None
    assert reader.last_committed_batch() is None


def test_gaps_found_only_where_deleted():
    start = {"t": {0: 100, 1: 50}}
    gaps = find_gaps(start, {"t": {0: (150, 400), 1: (10, 300)}})
    assert len(gaps) == 1
    assert (gaps[0].partition, gaps[0].checkpointed, gaps[0].earliest, gaps[0].skipped) == (0, 100, 150, 50)
    assert "topic t partition 0: offsets 100 to 149 were deleted" in gaps[0].describe()


def test_lock_rejects_second_holder(tmp_path):
    checkpoint = str(tmp_path / "cp")
    with CheckpointLock(checkpoint):
        with pytest.raises(CheckpointInUseError, match="is in use by another job"):
            CheckpointLock(checkpoint).acquire()
    # Released: a new holder gets it.
    CheckpointLock(checkpoint).acquire().release()


def test_remote_checkpoint_not_locked(caplog):
    lock = CheckpointLock("s3a://bucket/checkpoints/ingest").acquire()
    assert "no lock against a second job" in caplog.text
    lock.release()


@pytest.mark.parametrize("name, expected", [
    ("spark-sql-kafka-0-10_2.13-4.2.0.jar", "spark-sql-kafka-0-10_2.13"),
    ("kafka-clients-3.9.2.jar", "kafka-clients"),
    ("delta-spark_4.2_2.13-4.4.0.jar", "delta-spark_4.2_2.13"),
    ("guava-33.0-jre.jar", "guava"),
])
def test_artifact_id(name, expected):
    assert artifact_id(name) == expected


def test_jar_coordinates_follow_spark_line():
    assert coordinates("4.2.0") == ["io.delta:delta-spark_4.2_2.13:4.4.0",
                                    "org.apache.spark:spark-sql-kafka-0-10_2.13:4.2.0"]
    assert coordinates("3.5.3") == ["io.delta:delta-spark_2.12:3.3.2",
                                    "org.apache.spark:spark-sql-kafka-0-10_2.12:3.5.3"]
    with pytest.raises(RuntimeError, match="Spark 2.4.8 is not supported"):
        coordinates("2.4.8")
