"""Streaming checkpoints: the one-job-per-checkpoint lock and reading Spark's offset and commit logs.

Spark's Kafka source never commits offsets to Kafka, so the checkpoint is the only record of what
a query has read. Its layout (stable across Spark 3.x and 4.x):

    metadata            {"id": "<query id>"}; a new id when the checkpoint is recreated
    offsets/<batch>     "v1", a JSON line of batch metadata, then one JSON line per source:
                        {"<topic>": {"<partition>": <next offset to read>}}
    commits/<batch>     present once the batch's sink write finished
    sources/0/0         the Kafka source's initial offsets (the start of batch 0)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


class CheckpointInUseError(RuntimeError):
    """Another process runs a query on the same checkpoint."""


def is_local(path: str) -> bool:
    """Return whether ``path`` is on the local file system (no scheme, or file:)."""
    return "://" not in path or path.startswith("file:")


def local_path(path: str) -> Path:
    """Return ``path`` without a ``file:`` scheme."""
    if path.startswith("file://"):
        return Path(path[len("file://"):])
    if path.startswith("file:"):
        return Path(path[len("file:"):])
    return Path(path)


class CheckpointLock:
    """An exclusive lock that keeps a second job off a checkpoint while the first one runs.

    On a local file system this is an flock on ``<checkpoint>.lock``, which the kernel releases when
    the process dies, even by SIGKILL. On object stores there is no such primitive: the lock is
    skipped with a warning, and the scheduler must run one instance per checkpoint.
    """

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint
        self._handle = None

    def acquire(self) -> "CheckpointLock":
        if not is_local(self.checkpoint):
            # NOTE: no cross-process lock on object stores; one scheduler instance per checkpoint.
            log.warning("checkpoint %s is not on a local file system: no lock against a second job; "
                        "make sure the scheduler runs one instance of this job", self.checkpoint)
            return self
        lock_path = local_path(self.checkpoint).with_name(local_path(self.checkpoint).name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise CheckpointInUseError(
                f"checkpoint {self.checkpoint} is in use by another job ({owner}); stop that job first, "
                "or give this one its own checkpoint") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "CheckpointLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


class CheckpointReader:
    """Read a query's checkpoint files, locally or through Hadoop's FileSystem (s3a://, hdfs://)."""

    def __init__(self, checkpoint: str, spark=None):
        self.checkpoint = checkpoint.rstrip("/")
        self._spark = spark

    def read_text(self, relative: str) -> Optional[str]:
        """Return a checkpoint file's text, or None when it does not exist."""
        if is_local(self.checkpoint):
            path = local_path(self.checkpoint) / relative
            try:
                return path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
        jvm = self._spark._jvm
        hadoop_path = jvm.org.apache.hadoop.fs.Path(f"{self.checkpoint}/{relative}")
        fs = hadoop_path.getFileSystem(self._spark._jsc.hadoopConfiguration())
        if not fs.exists(hadoop_path):
            return None
        stream = fs.open(hadoop_path)
        try:
            return jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8")
        finally:
            stream.close()

    def list_batches(self, folder: str) -> list[int]:
        """Return the batch ids present in ``offsets`` or ``commits``, ascending."""
        if is_local(self.checkpoint):
            directory = local_path(self.checkpoint) / folder
            names = [entry.name for entry in directory.iterdir()] if directory.is_dir() else []
        else:
            jvm = self._spark._jvm
            hadoop_path = jvm.org.apache.hadoop.fs.Path(f"{self.checkpoint}/{folder}")
            fs = hadoop_path.getFileSystem(self._spark._jsc.hadoopConfiguration())
            names = [status.getPath().getName() for status in fs.listStatus(hadoop_path)] \
                if fs.exists(hadoop_path) else []
        return sorted(int(name) for name in names if name.isdigit())

    def query_id(self) -> Optional[str]:
        """Return the query id stored in ``metadata``, or None before the query first started."""
        text = self.read_text("metadata")
        if not text:
            return None
        return json.loads(text.strip().splitlines()[0])["id"]

    def end_offsets(self, batch_id: int) -> Optional[dict]:
        """Return ``{topic: {partition: offset}}`` that batch ``batch_id`` read up to (exclusive)."""
        text = self.read_text(f"offsets/{batch_id}")
        if text is None:
            return None
        lines = [line for line in text.splitlines() if line.strip()]
        # Line 0 is the log version, line 1 the batch metadata, then one line per source.
        return _parse_offsets(lines[2]) if len(lines) > 2 else None

    def start_offsets(self, batch_id: int) -> Optional[dict]:
        """Return the offsets batch ``batch_id`` started from: the previous end, or the initial ones."""
        if batch_id > 0:
            previous = self.end_offsets(batch_id - 1)
            if previous is not None:
                return previous
        text = self.read_text("sources/0/0")
        if text is None:
            return None
        # The file starts with a version line ("v1"); old Spark versions wrote a leading NUL byte.
        return _parse_offsets(text[text.index("{"):]) if "{" in text else None

    def last_committed_batch(self) -> Optional[int]:
        """Return the newest batch id in the commit log."""
        batches = self.list_batches("commits")
        return batches[-1] if batches else None


def _parse_offsets(line: str) -> dict:
    raw = json.loads(line)
    return {topic: {int(partition): int(offset) for partition, offset in partitions.items()}
            for topic, partitions in raw.items()}
