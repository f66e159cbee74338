"""Replay a dataset into Kafka as interaction events, in event-time order.

Sources:
  movielens   the MovieLens ratings CSV: each rating becomes a 'rating' event whose event_id is
              derived from user, movie and timestamp (ml-<user>-<movie>-<timestamp>), so a
              second replay of the same rows publishes the same ids
  jsonl FILE  one event per line, already in the contract

Examples:
  python -m jobs.replay movielens                        # all 100,836 ratings, as fast as possible
  python -m jobs.replay movielens --fraction 0.8         # the first 80% by event time
  python -m jobs.replay movielens --from-fraction 0.8    # the remaining 20%
  python -m jobs.replay movielens --from 2015-01-01 --to 2016-01-01 --speedup 86400
  python -m jobs.replay jsonl events.jsonl --topic interactions
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional, TextIO

import orjson

from reccore.config import PROJECT_ROOT, load_config
from reccore.events import parse_iso_timestamp

log = logging.getLogger("jobs.replay")

DEFAULT_RATINGS = PROJECT_ROOT / "data" / "movielens-ml-latest-small" / "ratings.csv"
RATINGS_COLUMNS = ["userId", "movieId", "rating", "timestamp"]


class ReplayError(ValueError):
    """Input the replay tool cannot publish; the message names the file, line and value."""


@dataclass(frozen=True)
class Record:
    """One message to publish: event time (ms) for ordering and pacing, the key and the value."""

    event_time_ms: int
    key: Optional[bytes]
    value: bytes


def movielens_events(path: Path, repeat: int = 1) -> list[tuple[int, str, str, float, int]]:
    """Read the ratings CSV into (timestamp, user, movie, rating, copy) tuples sorted by event time.

    ``repeat`` > 1 adds copies with new event ids (for load tests); copies keep the event time.
    """
    if repeat < 1:
        raise ReplayError(f"--repeat {repeat} is invalid; it must be 1 or more")
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != RATINGS_COLUMNS:
            raise ReplayError(f"{path}: header {header} is not the MovieLens ratings header {RATINGS_COLUMNS}")
        for line_number, row in enumerate(reader, start=2):
            try:
                user, movie, rating, timestamp = row
                rows.append((int(timestamp), user, movie, float(rating)))
            except ValueError as error:
                raise ReplayError(f"{path}:{line_number}: row {row} is not userId,movieId,rating,timestamp "
                                  f"({error})") from None
    rows.sort()
    return [(timestamp, user, movie, rating, copy)
            for timestamp, user, movie, rating in rows for copy in range(repeat)]


def movielens_record(timestamp: int, user: str, movie: str, rating: float, copy: int) -> Record:
    """Build the contract event for one rating."""
    event_id = f"ml-{user}-{movie}-{timestamp}" + (f"-r{copy}" if copy else "")
    event = {"event_id": event_id, "event_time": timestamp * 1000, "user_id": user, "item_id": movie,
             "event_type": "rating", "value": rating}
    return Record(timestamp * 1000, user.encode(), orjson.dumps(event))


def jsonl_records(path: Path, keep_order: bool = False) -> list[Record]:
    """Read a JSON-lines file of contract events; sorted by event time unless ``keep_order``."""
    records = []
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError as error:
                raise ReplayError(f"{path}:{line_number}: not valid JSON ({error})") from None
            if not isinstance(event, dict):
                raise ReplayError(f"{path}:{line_number}: a JSON object was expected, found {line[:60]!r}")
            event_time = event.get("event_time")
            try:
                if isinstance(event_time, str):
                    event_time_ms = int(parse_iso_timestamp(event_time).timestamp() * 1000)
                elif isinstance(event_time, (int, float)) and not isinstance(event_time, bool):
                    event_time_ms = int(event_time)
                else:
                    raise ValueError("it must be ISO-8601 with an offset or epoch milliseconds")
            except ValueError as error:
                raise ReplayError(f"{path}:{line_number}: event_time {event_time!r} is invalid ({error})") from None
            user = event.get("user_id")
            key = str(user).encode() if isinstance(user, (str, int)) and not isinstance(user, bool) else None
            records.append(Record(event_time_ms, key, line.rstrip(b"\r\n")))
    if not keep_order:
        records.sort(key=lambda record: record.event_time_ms)
    return records


def select(records: list, time_of, start_ms: Optional[int], end_ms: Optional[int],
           fraction: Optional[float], from_fraction: Optional[float]) -> list:
    """Keep records in [start_ms, end_ms), then the leading ``fraction`` or the part after ``from_fraction``."""
    if start_ms is not None or end_ms is not None:
        records = [record for record in records
                   if (start_ms is None or time_of(record) >= start_ms)
                   and (end_ms is None or time_of(record) < end_ms)]
    if fraction is not None:
        records = records[:math.ceil(len(records) * fraction)]
    if from_fraction is not None:
        records = records[math.ceil(len(records) * from_fraction):]
    return records


class Publisher:
    """Publish to one topic with confluent-kafka, counting deliveries and failures."""

    def __init__(self, settings: dict, topic: str):
        from confluent_kafka import Producer

        self.topic = topic
        self.delivered = 0
        self.failed = 0
        self.first_error: Optional[str] = None
        # librdkafka's own log goes through logging. Its retries while a fresh broker loads its
        # coordinator are routine, and a real failure reaches the delivery callback and the exit code.
        client_log = logging.getLogger("jobs.replay.librdkafka")
        client_log.setLevel(logging.ERROR)
        self.producer = Producer({**settings, "enable.idempotence": True, "acks": "all", "linger.ms": 20,
                                  "batch.num.messages": 10000, "queue.buffering.max.messages": 500000,
                                  "logger": client_log})

    def _on_delivery(self, error, _message) -> None:
        if error is None:
            self.delivered += 1
        else:
            self.failed += 1
            self.first_error = self.first_error or str(error)

    def publish(self, record: Record) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value=record.value, key=record.key, on_delivery=self._on_delivery)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self, timeout_s: float) -> int:
        return self.producer.flush(timeout_s)


def publish(records: Iterable[Record], publisher: Publisher, total: int, speedup: float,
            progress: bool, bar_file: Optional[TextIO] = None) -> None:
    """Publish in order; with ``speedup`` > 0 pace by event time (speedup event seconds per second).

    The progress bar goes to ``bar_file`` (default: standard error).
    """
    from tqdm import tqdm

    first_event_ms: Optional[int] = None
    started = time.monotonic()
    with tqdm(total=total, unit="ev", disable=not progress, mininterval=1.0, file=bar_file or sys.stderr,
              desc=f"replay -> {publisher.topic}") as bar:
        for index, record in enumerate(records):
            if speedup > 0:
                first_event_ms = record.event_time_ms if first_event_ms is None else first_event_ms
                due = started + (record.event_time_ms - first_event_ms) / 1000.0 / speedup
                delay = due - time.monotonic()
                if delay > 0:
                    publisher.producer.poll(min(delay, 1.0))
                    time.sleep(max(0.0, due - time.monotonic()))
            publisher.publish(record)
            if index % 5000 == 4999:
                bar.update(5000)
        bar.update(total - bar.n)


def _parse_time(text: Optional[str], option: str) -> Optional[int]:
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ReplayError(f"{option} {text!r} is not an ISO-8601 date or time (e.g. 2015-01-01)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int(parsed.timestamp() * 1000)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1]")
    return value


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.replay", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("source", choices=("movielens", "jsonl"),
                        help="movielens: the ratings CSV; jsonl: one contract event per line")
    parser.add_argument("path", nargs="?", help="input file (default for movielens: the bundled ratings.csv)")
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml)")
    parser.add_argument("--topic", help="Kafka topic (default: kafka.interactions_topic from config)")
    parser.add_argument("--from", dest="start", help="first event time to publish, inclusive (ISO-8601; UTC if no offset)")
    parser.add_argument("--to", dest="end", help="event time to stop before, exclusive (ISO-8601)")
    parser.add_argument("--fraction", type=_fraction, help="publish only this leading fraction of the events by time")
    parser.add_argument("--from-fraction", type=_fraction,
                        help="publish only the events after this leading fraction (the complement of --fraction)")
    parser.add_argument("--speedup", type=float, default=0.0,
                        help="event-time seconds per wall-clock second; 0 (default) publishes as fast as possible")
    parser.add_argument("--repeat", type=int, default=1, help="movielens: publish N copies with new event ids")
    parser.add_argument("--keep-order", action="store_true", help="jsonl: publish in file order, not by event time")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Publish the selected events; exit 0 when every one was acknowledged by Kafka, 2 on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return _replay(args)
    except (ReplayError, OSError) as error:
        log.error("%s", error)
        return 2


def _replay(args: argparse.Namespace) -> int:
    config = load_config(args.env)
    topic = args.topic or config.kafka.interactions_topic
    start_ms, end_ms = _parse_time(args.start, "--from"), _parse_time(args.end, "--to")
    if args.speedup < 0:
        raise ReplayError(f"--speedup {args.speedup} is invalid; use 0 (as fast as possible) or a positive factor")

    if args.source == "movielens":
        path = Path(args.path) if args.path else DEFAULT_RATINGS
        rows = select(movielens_events(path, args.repeat), lambda row: row[0] * 1000, start_ms, end_ms,
                      args.fraction, args.from_fraction)
        records: Iterable[Record] = (movielens_record(*row) for row in rows)
        total = len(rows)
    else:
        if not args.path:
            raise ReplayError("jsonl needs a file: python -m jobs.replay jsonl FILE")
        path = Path(args.path)
        selected = select(jsonl_records(path, args.keep_order), lambda record: record.event_time_ms,
                          start_ms, end_ms, args.fraction, args.from_fraction)
        records, total = selected, len(selected)

    publisher = Publisher(config.kafka.client_options(), topic)
    log.info("replaying %d events from %s to topic %s on %s", total, path, topic, config.kafka.bootstrap_servers)
    started = time.monotonic()
    publish(records, publisher, total, args.speedup, progress=not args.no_progress)
    pending = publisher.flush(120.0)
    elapsed = time.monotonic() - started

    rate = publisher.delivered / elapsed if elapsed > 0 else 0.0
    log.info("published %d of %d events to %s in %.1f s (%.0f events/s)", publisher.delivered, total, topic,
             elapsed, rate)
    if publisher.failed or pending:
        log.error("%d events failed and %d were still unacknowledged after 120 s; first error: %s",
                  publisher.failed, pending, publisher.first_error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
