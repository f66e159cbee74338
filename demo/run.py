"""The demo's six steps, their report lines and the shutdown of what the demo started."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from reccore.config import Config

from demo import data as demo_data
from demo.console import Console, DemoError, Stopwatch, clip, count, day, duration, instant, ratio
from demo.live import (FreshnessProbe, RequestLog, RequestRounds, TimedPublisher, list_changes,
                       lists_with_rated_items, request_round)
from demo.scorer import Scorer
from demo.services import (Port, StackRun, check_ports, delete_redis_prefix, delete_registered_model, reset_topics,
                           start_stack, stop_stack)
from demo.streams import Streams

log = logging.getLogger("demo.run")

STEPS = 6
K = 10
SHOWN_ITEMS = 5
TITLE_WIDTH = 38
# Bounds of the demo's waits, in seconds; they allow for a slow, shared 2-core machine.
INGEST_TIMEOUT_S = 900.0
CATCH_UP_TIMEOUT_S = 1200.0
SERVED_LOG_TIMEOUT_S = 300.0
SCORER_READY_TIMEOUT_S = 300.0
FRESHNESS_DRAIN_S = 5.0
# Scorer settings of the demo. Spark's micro-batches share the two cores with the scorer, so the
# production budgets (50 ms for Redis, 100 ms a request) would turn slow requests into fallbacks.
# The lleaves compile is off so that its minute of CPU goes to Spark; the native booster scores.
# On replayed history "now" is the stream's event-time clock, so recency and feature age have the
# scale training saw (the wall clock would make every user and item look years idle).
DEMO_SCORER_SETTINGS = {"serving.redis_timeout_ms": 1000, "serving.request_budget_ms": 2000,
                        "serving.compiled_predictor": "false", "serving.clock": "event_time"}


@dataclass(frozen=True)
class Options:
    """The command-line options of a run (see demo.cli)."""

    name: str
    work_dir: Path
    start_ms: Optional[int]
    end_ms: Optional[int]
    split: float
    replay_seconds: float
    request_interval_seconds: float
    show_users: int
    keep_running: bool
    progress: bool
    env: Optional[str]
    summary_json: Optional[Path]


class StepFailed(Exception):
    """A step that raised; carries the step's number and title for the report."""

    def __init__(self, number: int, title: str, message: str, seconds: float = 0.0):
        super().__init__(message)
        self.number, self.title, self.message, self.seconds = number, title, message, seconds


def with_sections(config: Config, **sections) -> Config:
    """Return ``config`` with fields of its sections replaced: ``with_sections(c, redis={...})``."""
    changes = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(config, **changes)


# The registration gate of the demo's training, unless STREAMREC__TRAINING__BASELINE_MARGIN sets one.
# On the first 80% of MovieLens the test period holds only 11 warm users, too few for warm NDCG@10
# to judge the model against popularity (0.025 to 0.038 against 0.116 in our runs, while test AUC
# is about 0.70 against 0.53). The demo registers the model anyway, and step 3 prints the numbers
# and this setting.
DEMO_BASELINE_MARGIN = -1.0
BASELINE_MARGIN_ENV = "STREAMREC__TRAINING__BASELINE_MARGIN"


def demo_config(base: Config, name: str, work_dir: Path) -> Config:
    """Return ``base`` with the run's namespace (topics, Redis prefix, model, lake) and the streams' triggers."""
    prefix = f"streamrec-{name}"
    training = {"model_name": f"{prefix}-ranker", "experiment": prefix}
    if BASELINE_MARGIN_ENV not in os.environ:
        training["baseline_margin"] = DEMO_BASELINE_MARGIN
    return with_sections(
        base,
        kafka={"interactions_topic": f"{prefix}-interactions", "served_topic": f"{prefix}-served"},
        lake={"root": str(work_dir / "lake"), "checkpoint_root": str(work_dir / "checkpoints")},
        redis={"key_prefix": prefix},
        training=training,
        ingest={"trigger": "processing_time", "trigger_interval_seconds": 2.0},
        features={"trigger": "processing_time", "trigger_interval_seconds": 1.0},
        # The served log is not on the path of a recommendation, so it commits less often and leaves
        # more of the two cores to the features stream.
        monitoring={"served_trigger": "processing_time", "served_trigger_interval_seconds": 15.0})


class Demo:
    """One run of the demo: the steps in order, then the shutdown of what it started."""

    def __init__(self, options: Options, config: Config, console: Console, log_path: Path):
        self.options = options
        self.config = config
        self.console = console
        self.log_path = log_path
        self.stack_run = StackRun()
        self.spark = None
        self.streams: Optional[Streams] = None
        self.scorer: Optional[Scorer] = None
        self.rounds: Optional[RequestRounds] = None
        self.probe: Optional[FreshnessProbe] = None
        self.requests = RequestLog()
        self.slice: Optional[demo_data.DemoSlice] = None
        self.users: list = []
        self.titles: dict = {}
        self.feature_set = None
        self.shut_down = False
        self.current_step = "before the first step"
        self.summary: dict = {"name": options.name, "work_dir": str(options.work_dir), "log": str(log_path),
                              "kafka_topics": [config.kafka.interactions_topic, config.kafka.served_topic],
                              "served_topic": config.kafka.served_topic, "redis_prefix": config.redis.key_prefix,
                              "model_name": config.training.model_name, "experiment": config.training.experiment,
                              "lake_root": config.lake.root, "k": K, "steps": {}}

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> int:
        """Run every step; return 0, 1 after a failed step, or 130 after an interrupt."""
        steps = [
            ("Local stack and streaming jobs", self.step_stack),
            (f"Catalogue, the first {self.options.split:.0%} of the ratings, feature backfill", self.step_load),
            ("Parity check, training set, training and promotion", self.step_train),
            ("Scorer and the first recommendations", self.step_first_recommendations),
            (f"The remaining {1 - self.options.split:.0%} replayed while the streams run", self.step_live),
            ("Where to look next", self.step_next),
        ]
        whole = Stopwatch()
        code = 0
        try:
            self.introduce()
            for number, (title, action) in enumerate(steps, start=1):
                self.run_step(number, title, action)
            if self.options.keep_running:
                self.wait_for_interrupt()
        except StepFailed as failure:
            code = 1
            self.summary["failed_step"] = {"number": failure.number, "title": failure.title,
                                           "message": failure.message}
            self.console.line(f"FAILED at step {failure.number}/{STEPS} ({failure.title}) after {failure.seconds:.0f} s: "
                              f"{failure.message}")
            self.console.line(f"The demo's log (Spark and the jobs): {self.log_path}")
            if self.scorer is not None:
                self.console.line(f"The scorer's log: {self.scorer.log_path}")
        except KeyboardInterrupt:
            code = 130
            self.console.line(f"Interrupted {self.current_step}: stopping what the demo started.")
        finally:
            self.shutdown()
            self.summary["wall_s"] = round(whole.seconds(), 1)
            self.write_summary()
        if code == 0:
            self.console.line(f"demo finished in {whole.seconds():.0f} s")
        return code

    def run_step(self, number: int, title: str, action) -> None:
        self.console.step(number, title)
        self.current_step = f"at step {number}/{STEPS} ({title})"
        watch = Stopwatch()
        try:
            action()
        except DemoError as error:
            log.error("step %d (%s) failed: %s", number, title, error)
            raise StepFailed(number, title, str(error), watch.seconds()) from None
        except (KeyboardInterrupt, StepFailed):
            raise
        except Exception as error:  # noqa: BLE001 - any other error ends the run, named with its step
            log.exception("step %d (%s) failed", number, title)
            raise StepFailed(number, title, f"{type(error).__name__}: {error}", watch.seconds()) from None
        seconds = watch.seconds()
        self.summary["steps"][str(number)] = {"title": title, "seconds": round(seconds, 1)}
        log.info("step %d (%s) done in %.1f s", number, title, seconds)
        self.console.done(seconds)
        self.current_step = f"after step {number}/{STEPS}"

    def introduce(self) -> None:
        from jobs.replay import DEFAULT_RATINGS

        options = self.options
        try:
            self.slice = demo_data.load_slice(DEFAULT_RATINGS, options.start_ms, options.end_ms, options.split)
        except demo_data.SliceError as error:
            raise StepFailed(0, "choosing the ratings", str(error)) from None
        events = self.slice.events
        self.summary["slice"] = {"start_ms": options.start_ms, "end_ms": options.end_ms, "split": options.split,
                                 "ratings": len(events), "first": len(self.slice.first), "rest": len(self.slice.rest),
                                 "split_clock_ms": self.slice.split_clock_ms,
                                 "last_event_ms": self.slice.last_event_ms}
        self.console.line(f"streamrec demo: {count(len(events))} MovieLens ratings from {day(events[0][0] * 1000)} "
                          f"to {day(events[-1][0] * 1000)}, split at {options.split:.0%} by event time "
                          f"({instant(self.slice.split_clock_ms)})")
        self.console.detail(f"run folder {options.work_dir}, log {self.log_path}")

    # -- step 1 --------------------------------------------------------------------------------

    def step_stack(self) -> None:
        config = self.config
        check_ports([Port(config.serving.port, "the scorer", "serving.port"),
                     Port(config.ingest.metrics_port, "ingest metrics", "ingest.metrics_port"),
                     Port(config.features.metrics_port, "features-stream metrics", "features.metrics_port")])
        start_stack(config, self.stack_run)
        self.summary["stack"] = {"started": list(self.stack_run.started),
                                 "already_running": list(self.stack_run.already_running)}
        groups = [(self.stack_run.started, "started (the demo stops them at the end)"),
                  (self.stack_run.already_running, "already running (left running at the end)")]
        self.console.detail("local stack: " + "; ".join(
            ", ".join(f"{name} {self.stack_run.addresses[name]}" for name in names) + f" {state}"
            for names, state in groups if names))

        topics = reset_topics(config)
        deleted_keys = delete_redis_prefix(config)
        deleted_model = delete_registered_model(config)
        cleared = []
        if deleted_keys:
            cleared.append(f"{count(deleted_keys)} Redis keys")
        if deleted_model:
            cleared.append(f"model {config.training.model_name}")
        self.console.detail(f"namespace: topics {', '.join(topics)}; Redis prefix {config.redis.key_prefix}; "
                            f"model {config.training.model_name}"
                            + (f" (cleared from an earlier run: {', '.join(cleared)})" if cleared else ""))

        from jobs.lib.session import build_spark
        from reccore.features import load_feature_set

        self.spark = build_spark(config, f"streamrec-{self.options.name}")
        self.feature_set = load_feature_set()
        self.streams = Streams(self.spark, config, self.feature_set, str(self.log_path))
        self.streams.start_ingest_and_served_log()
        self.console.detail(f"Spark {self.spark.version} ({self.spark.sparkContext.master}): one session for the "
                            "batch steps and the streaming queries")
        self.console.detail(f"streaming: ingest ({config.kafka.interactions_topic} -> bronze/events, metrics on "
                            f"port {self.streams.metrics_ports['ingest']}), served log ({config.kafka.served_topic} "
                            "-> served/recommendations); the features stream starts after the backfill")

    # -- step 2 --------------------------------------------------------------------------------

    def step_load(self) -> None:
        from jobs.backfill import run_backfill
        from jobs.items import DEFAULT_MOVIES, read_catalog, write_catalog

        config, spark, first = self.config, self.spark, self.slice.first
        catalog = read_catalog(DEFAULT_MOVIES)
        self.titles = {item_id: title for item_id, title, _genres in catalog}
        write_catalog(spark, config, catalog)
        self.console.detail(f"catalogue: {count(len(catalog))} items -> silver/items and Redis")

        replay = Stopwatch()
        self.publish(first, speedup=0.0)
        self.console.detail(f"replay: {count(len(first))} ratings -> {config.kafka.interactions_topic} in "
                            f"{replay.seconds():.1f} s, in event-time order")
        self.streams.wait(lambda: self.streams.events_read() >= len(first), INGEST_TIMEOUT_S,
                          f"the ingest job to read {len(first)} events")
        stats = self.bronze_stats()
        self.summary["bronze_after_first"] = stats
        self.console.detail(f"bronze/events: {count(stats['rows'])} events of {count(stats['users'])} users on "
                            f"{count(stats['items'])} items, {instant(stats['min_ms'])} to {instant(stats['max_ms'])}")
        if stats["rows"] != len(first):
            raise DemoError(f"bronze contains {stats['rows']} events, expected {len(first)} after the replay; read "
                            f"{self.log_path} for the ingest job's batches")

        result = run_backfill(spark, config, self.feature_set)
        self.summary["backfill"] = {"bronze_version": result.bronze_version, "events": result.events,
                                    "history_rows": result.history_rows, "redis_written": result.redis_written}
        self.console.detail(f"backfill: feature history of {count(result.history_rows['user'])} user rows and "
                            f"{count(result.history_rows['item'])} item rows; Redis: "
                            f"{count(result.redis_written['user'])} users, {count(result.redis_written['item'])} items")
        self.streams.start_features()
        self.console.detail(f"features stream: continues after bronze version {result.bronze_version} (metrics on "
                            f"port {self.streams.metrics_ports['features']})")

    def publish(self, rows: list, speedup: float, probe: Optional[FreshnessProbe] = None) -> None:
        """Replay ``rows`` into the interactions topic with a progress bar; raise DemoError unless Kafka took all."""
        from jobs.replay import Publisher, movielens_record, publish

        settings, topic = self.config.kafka.client_options(), self.config.kafka.interactions_topic
        publisher = TimedPublisher(settings, topic, probe.record_send) if probe else Publisher(settings, topic)
        publish((movielens_record(*row) for row in rows), publisher, len(rows), speedup, self.console.progress,
                bar_file=self.console.stream)
        pending = publisher.flush(120.0)
        if pending or publisher.failed or publisher.delivered != len(rows):
            raise DemoError(f"Kafka acknowledged {publisher.delivered} of {len(rows)} events ({pending} still "
                            f"pending, first error: {publisher.first_error}); read {self.log_path}")

    def bronze_stats(self) -> dict:
        from pyspark.sql import functions as F

        from jobs import bronze

        row = (self.spark.read.format("delta").load(self.config.lake.table(bronze.EVENTS_TABLE))
               .agg(F.count(F.lit(1)).alias("rows"), F.count_distinct("user_id").alias("users"),
                    F.count_distinct("item_id").alias("items"),
                    (F.unix_micros(F.min("event_time")) / 1000).cast("long").alias("min_ms"),
                    (F.unix_micros(F.max("event_time")) / 1000).cast("long").alias("max_ms"))
               .first())
        return row.asDict()

    # -- step 3 --------------------------------------------------------------------------------

    def step_train(self) -> None:
        from jobs.parity import check
        from jobs.train import TRAINING_PHASES, run_training
        from jobs.training_set import TRAINING_TABLE, build_training_set

        config, spark = self.config, self.spark
        reports = check(spark, config, self.feature_set)
        self.summary["parity"] = {report.entity: dataclasses.asdict(report) | {"ok": report.ok} for report in reports}
        failed = [report for report in reports if not report.ok]
        if failed:
            raise DemoError("parity: stored features differ from a recomputation from bronze: "
                            + "; ".join(f"{report.entity}: {report}" for report in failed))
        by_entity = {report.entity: report for report in reports}
        redis_checked = sum(report.redis_checked for report in reports)
        self.console.detail(f"parity: Delta history and Redis match a recomputation from bronze "
                            f"({count(by_entity['user'].rows_expected)} user rows, "
                            f"{count(by_entity['item'].rows_expected)} item rows, {count(redis_checked)} Redis "
                            "vectors and sets)")

        built = build_training_set(spark, config, self.feature_set)
        self.summary["training_set"] = {"version": built.version, "examples": built.examples,
                                        "positives": built.positives, "sampled_negatives": built.sampled_negatives}
        self.console.detail(f"training set: {count(built.examples)} examples ({count(built.positives)} positive, "
                            f"{count(built.sampled_negatives)} sampled negatives) -> {TRAINING_TABLE} version "
                            f"{built.version}")

        with self.console.bar(len(TRAINING_PHASES), "training", unit="phase") as bar:
            def advance(phase: str) -> None:
                bar.set_postfix_str(phase)
                bar.update(1)

            result = run_training(spark, config, self.feature_set, progress=advance)
        metrics = result.metrics
        self.summary["training"] = {"run_id": result.run_id, "registered_version": result.registered_version,
                                    "promoted": result.promoted, "reasons": result.reasons,
                                    "metrics": {name: value for name, value in metrics.items()
                                                if isinstance(value, (int, float))}}
        k = config.training.k
        quality = (f"test AUC {metrics['model_auc']:.3f}, warm NDCG@{k} {metrics[f'model_ndcg_at_{k}']:.3f} "
                   f"against popularity's {metrics[f'popularity_ndcg_at_{k}']:.3f} over "
                   f"{metrics.get('users', 0):.0f} warm users")
        if not result.registered_version:
            raise DemoError(f"the model was not registered ({quality}). The registration gate is "
                            f"training.baseline_margin ({config.training.baseline_margin}; environment variable "
                            f"STREAMREC__TRAINING__BASELINE_MARGIN): {'; '.join(result.reasons)}")
        if not result.promoted:
            raise DemoError(f"version {result.registered_version} was registered but not promoted: "
                            f"{'; '.join(result.reasons)}")
        self.console.detail(f"model {config.training.model_name} version {result.registered_version}: {quality}; "
                            f"registered and promoted to champion (MLflow run {result.run_id})")
        if config.training.baseline_margin < 0:
            self.console.detail(f"note: training.baseline_margin is {config.training.baseline_margin:g} in the demo, so "
                                "the registration gate also lets through a model below the popularity baseline; "
                                f"{BASELINE_MARGIN_ENV}=0 applies the production gate")

    # -- step 4 --------------------------------------------------------------------------------

    def step_first_recommendations(self) -> None:
        config = self.config
        self.options.work_dir.joinpath("scorer-metrics").mkdir(exist_ok=True)
        settings = {"serving.host": config.serving.host, "serving.port": config.serving.port,
                    "kafka.served_topic": config.kafka.served_topic, "redis.key_prefix": config.redis.key_prefix,
                    "training.model_name": config.training.model_name, **DEMO_SCORER_SETTINGS}
        self.scorer = Scorer(config.serving.host, config.serving.port, settings,
                             self.options.work_dir / "scorer.log", self.options.work_dir / "scorer-metrics")
        ready = self.scorer.start(SCORER_READY_TIMEOUT_S)
        version = ready["model"]["version"]
        expected = self.summary["training"]["registered_version"]
        if str(version) != str(expected):
            raise DemoError(f"the scorer serves model version {version}, not the champion {expected}")
        self.console.detail(f"scorer: gunicorn, {config.serving.workers} workers at {self.scorer.url}, model "
                            f"{config.training.model_name} version {version} (log {self.scorer.log_path})")
        self.console.detail(f"scorer settings for a machine shared with Spark: Redis timeout "
                            f"{DEMO_SCORER_SETTINGS['serving.redis_timeout_ms']} ms, request budget "
                            f"{DEMO_SCORER_SETTINGS['serving.request_budget_ms']} ms, native LightGBM predictor, "
                            "the event-time clock as now")

        self.users = demo_data.followed_users(self.slice)
        if not self.users:
            raise DemoError("no user has ratings on both sides of the split; widen --from/--to")
        first_round = request_round(self.recommend, self.users, self.requests)
        rated_before = demo_data.items_by_user(self.slice.first)
        leaks = lists_with_rated_items(first_round, rated_before)
        fallbacks = sum(1 for served in first_round.values() if served.fallback_reason)
        self.summary["first_round"] = {"users": len(self.users), "responses": len(first_round),
                                       "request_ids": [served.request_id for served in first_round.values()],
                                       "errors": self.requests.errors, "fallbacks": fallbacks,
                                       "lists_with_rated_items": leaks}
        self.console.detail(f"{len(self.users)} users rated before and after the split; one request each: "
                            f"{len(first_round)} lists, {fallbacks} fallbacks, {self.requests.errors} errors, "
                            f"{len(leaks)} lists with an item the user had rated")
        if not first_round:
            raise DemoError(f"every request failed; first error: {self.requests.first_error}")
        if leaks:
            raise DemoError(f"lists of users {leaks[:5]} hold items they had rated")
        for user in self.users[:self.options.show_users]:
            if user in first_round:
                self.show_user(user, first_round[user])
        self.console.detail("feature age = the stream's event-time clock - the user's newest event "
                            "(serving.clock: event_time, as for any replay of history)")

    def recommend(self, user: str) -> dict:
        return self.scorer.recommend(user, K)

    def show_user(self, user: str, served) -> None:
        threshold = demo_data.positive_threshold(self.config.training.relevance_by_rating)
        liked = demo_data.rated_highly(self.slice.first, user, threshold, SHOWN_ITEMS)
        self.console.detail(f"user {user}: model version {served.model_version}, feature age "
                            f"{duration(served.feature_age_seconds)}"
                            + (f", fallback {served.fallback_reason}" if served.fallback_reason else ""))
        left_title = f"rated {threshold:g}+ before (newest first)"
        self.console.detail(f"  {left_title:<{TITLE_WIDTH + 6}}recommended (score)")
        for index in range(SHOWN_ITEMS):
            left = ""
            if index < len(liked):
                item, stars = liked[index]
                left = f"{stars:3.1f}  {clip(self.titles.get(item), TITLE_WIDTH)}"
            right = ""
            if index < len(served.items):
                score = served.scores[index]
                right = f"{score:.3f}  " if score is not None else "  -    "
                right += clip(served.titles[index], TITLE_WIDTH)
            self.console.detail(f"  {left:<{TITLE_WIDTH + 6}}{right}")

    # -- step 5 --------------------------------------------------------------------------------

    def step_live(self) -> None:
        from jobs.lib.redis_writer import connect
        from reccore.store import KeyLayout

        config, rest = self.config, self.slice.rest
        first_lists = {served.user_id: served for served in self.requests.responses if served.round == 0}
        span_s = max(1.0, (self.slice.last_event_ms - rest[0][0] * 1000) / 1000)
        speedup = span_s / self.options.replay_seconds
        rest_users = sorted({row[1] for row in rest})
        self.probe = FreshnessProbe(connect(config.redis), KeyLayout(config.redis.key_prefix, self.feature_set.version),
                                    rest_users)
        self.rounds = RequestRounds(self.recommend, self.users, self.requests,
                                    self.options.request_interval_seconds)
        self.probe.start()
        self.rounds.start()

        replay = Stopwatch()
        self.publish(rest, speedup, self.probe)
        self.console.detail(f"{duration(span_s)} of event time replayed in {replay.seconds():.0f} s "
                            f"(x{speedup:,.0f}); requests every {self.options.request_interval_seconds:g} s meanwhile")
        self.catch_up(len(rest))
        self.rounds.stop()
        self.rounds.join(60)
        self.rounds = None
        last_lists = request_round(self.recommend, self.users, self.requests)
        self.probe.stop(FRESHNESS_DRAIN_S)
        self.probe.join(FRESHNESS_DRAIN_S + 30)
        freshness = self.probe.summary()
        self.probe = None

        served_rows = self.wait_for_served_log()
        final = self.bronze_stats()
        self.summary["bronze_final"] = final
        if final["rows"] != len(self.slice.events):
            raise DemoError(f"bronze contains {final['rows']} events, expected {len(self.slice.events)} after the "
                            f"replay; read {self.log_path}")
        online = self.online_metrics()
        self.report_live(first_lists, last_lists, freshness, served_rows, online)

    def catch_up(self, sent: int) -> None:
        """Wait until the features stream's event-time clock reaches the newest replayed event."""
        last_ms = self.slice.last_event_ms
        with self.console.bar(sent, "visible in Redis") as bar:
            def show() -> None:
                bar.update(self.probe.visible - bar.n)

            waited = self.streams.wait(lambda: (self.streams.features_clock_ms() or 0) >= last_ms,
                                       CATCH_UP_TIMEOUT_S,
                                       f"the features stream's clock to reach {instant(last_ms)}", on_poll=show)
            show()
        log.info("features stream caught up %.1f s after the replay ended", waited)
        self.summary["catch_up_s"] = round(waited, 1)

    def wait_for_served_log(self) -> int:
        """Wait until served-ingest has read every record the scorer published; return the rows it wrote."""
        from confluent_kafka import Consumer, TopicPartition

        responses = len(self.requests.responses)
        topic = self.config.kafka.served_topic
        consumer = Consumer({**self.config.kafka.client_options(), "group.id": "streamrec-demo-offsets",
                             "enable.auto.commit": False})
        try:
            partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions

            def published() -> int:
                return sum(consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
                           for partition in partitions)

            self.streams.wait(lambda: published() >= responses, SERVED_LOG_TIMEOUT_S,
                              f"the scorer's {responses} served records to reach topic {topic}")
            in_topic = published()
        finally:
            consumer.close()
        self.streams.wait(lambda: self.streams.served_records_read() >= in_topic, SERVED_LOG_TIMEOUT_S,
                          f"served-ingest to land {in_topic} records")
        written = self.streams.served.totals["written"]
        self.summary["served_log"] = {"responses": responses, "in_topic": in_topic, "rows": written,
                                      "quarantined": self.streams.served.totals["quarantined"]}
        return written

    def online_metrics(self) -> dict:
        from jobs.online_metrics import METRICS_TABLE, compute_online_metrics

        horizon_s = math.ceil((self.slice.last_event_ms - self.slice.split_clock_ms) / 1000) + 1
        results = compute_online_metrics(self.spark, self.config, k=K, horizon_s=horizon_s, include_fallbacks=False)
        overall = results[0]
        online = {"k": K, "horizon_s": horizon_s, "users": overall.users, "lists": overall.lists,
                  "precision_at_k": overall.precision_at_k, "recall_at_k": overall.recall_at_k,
                  "include_fallbacks": False, "table": METRICS_TABLE}
        self.summary["online"] = online
        return online

    def report_live(self, first_lists: dict, last_lists: dict, freshness: dict, served_rows: int,
                    online: dict) -> None:
        requests = self.requests
        fallbacks = requests.fallbacks()
        self.console.detail(f"requests: {count(len(requests.responses))} lists in {requests.rounds} rounds to "
                            f"{len(self.users)} users, {requests.errors} errors, fallbacks: "
                            + (", ".join(f"{reason} {number}" for reason, number in sorted(fallbacks.items()))
                               or "none"))
        self.console.detail(f"features stream: {self.streams.features_batches()} micro-batches, clock "
                            f"{instant(self.streams.features_clock_ms())}; served log: {count(served_rows)} rows in "
                            "served/recommendations")
        unseen = f", {count(freshness['unseen'])} never visible" if freshness["unseen"] else ""
        self.console.detail(f"freshness (sent to Kafka -> the user's features in Redis): p50 "
                            f"{duration(freshness['p50_s'])}, p95 {duration(freshness['p95_s'])}, max "
                            f"{duration(freshness['max_s'])} over {count(freshness['events'])} events{unseen}")

        rated = demo_data.items_by_user(self.slice.events)
        leaks = lists_with_rated_items(last_lists, rated)
        changes = list_changes(first_lists, last_lists)
        self.summary["live"] = {"requests": len(requests.responses), "rounds": requests.rounds,
                                "errors": requests.errors, "first_error": requests.first_error,
                                "fallbacks": dict(fallbacks), "freshness": freshness,
                                "features_batches": self.streams.features_batches(),
                                "features_clock_ms": self.streams.features_clock_ms(),
                                "changed_users": changes["changed"], "compared_users": changes["users"],
                                "mean_replaced": changes["mean_replaced"], "last_lists_with_rated_items": leaks,
                                "last_round_request_ids": [served.request_id for served in last_lists.values()]}
        replaced = "n/a" if changes["mean_replaced"] is None else f"{changes['mean_replaced']:.1f}"
        self.console.detail(f"changed: {changes['changed']} of {changes['users']} users have a different top "
                            f"{K} than before the replay (on average {replaced} of {K} items replaced); "
                            f"{len(leaks)} lists hold an item the user has rated")
        for user in self.users[:self.options.show_users]:
            if user in first_lists and user in last_lists:
                self.show_change(user, first_lists[user], last_lists[user])
        if leaks:
            raise DemoError(f"after the replay, lists of users {leaks[:5]} hold items they had rated")

        self.console.detail(f"online accuracy, on the event-time clock: each list is judged against the user's "
                            f"ratings of {demo_data.positive_threshold(self.config.training.relevance_by_rating):g}+ "
                            f"after the clock it was served at, within {duration(online['horizon_s'])}")
        self.console.detail(f"  (a horizon that covers the replayed remainder; live traffic uses "
                            f"{duration(self.config.monitoring.online_horizon_seconds)}); fallback lists left out")
        self.console.detail(f"  precision@{K} {ratio(online['precision_at_k'])}, recall@{K} "
                            f"{ratio(online['recall_at_k'])} over {online['users']} users ({count(online['lists'])} "
                            f"lists) with later positive ratings -> {online['table']}")

    def show_change(self, user: str, before, after) -> None:
        gained = [title for item, title in zip(after.items, after.titles) if item not in set(before.items)]
        lost = [title for item, title in zip(before.items, before.titles) if item not in set(after.items)]
        if not gained:
            self.console.detail(f"  user {user}: the same {len(after.items)} items")
            return
        self.console.detail(f"  user {user}: {len(gained)} of {len(after.items)} replaced; new "
                            + ", ".join(clip(title, 28) for title in gained[:2]) + "; gone "
                            + ", ".join(clip(title, 28) for title in lost[:2]))

    # -- step 6 --------------------------------------------------------------------------------

    def step_next(self) -> None:
        config, lake = self.config, self.config.lake.root
        user = self.users[0] if self.users else "1"
        self.console.detail(f"MLflow UI: {config.mlflow.tracking_uri} (experiment {config.training.experiment}, "
                            f"model {config.training.model_name})")
        self.console.detail(f"Delta tables under {lake}: bronze/events, silver/user_features, silver/item_features, "
                            "gold/training_examples, served/recommendations, gold/online_metrics")
        self.console.detail(f"logs: {self.log_path} (Spark and the jobs), {self.scorer.log_path} (scorer); "
                            f"run summary: {self.options.summary_json or 'add --summary-json FILE'}")
        ports = self.streams.metrics_ports
        endpoints = (f"{self.scorer.url}/metrics (scorer), http://127.0.0.1:{ports['ingest']}/metrics (ingest), "
                     f"http://127.0.0.1:{ports['features']}/metrics (features stream)")
        if self.options.keep_running:
            self.console.detail(f"recommendations: curl -s '{self.scorer.url}/v1/users/{user}/recommendations?k=10'")
            self.console.detail(f"metrics: {endpoints}")
            self.console.detail(f"more events: .venv/bin/python -m jobs.replay jsonl FILE --topic "
                                f"{config.kafka.interactions_topic}")
            self.console.detail("the stack, the streams and the scorer keep running; Ctrl-C stops what the demo "
                                "started")
            return
        self.console.detail(f"while running (make demo DEMO_ARGS=--keep-running): {endpoints}")
        self.shutdown()

    def wait_for_interrupt(self) -> None:
        """Keep the services up until SIGINT or SIGTERM, checking the streams every few seconds."""
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
        try:
            while not stop.wait(5.0):
                self.streams.check()
        except KeyboardInterrupt:
            pass
        except DemoError as error:
            self.console.line(f"A streaming query stopped: {error}")

    # -- shutdown ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop what the demo started, each part even when another fails; report one line per part."""
        if self.shut_down:
            return
        self.shut_down = True
        lines = []
        for thread in (self.rounds, self.probe):
            if thread is not None and thread.is_alive():
                thread.stop(0.0) if isinstance(thread, FreshnessProbe) else thread.stop()
                thread.join(60)
        if self.scorer is not None:
            lines.append(self._stop_part("scorer", lambda: f"scorer: {self.scorer.stop()}"))
        if self.streams is not None:
            lines.append(self._stop_part("streams", lambda: "streaming queries stopped: "
                                         + ", ".join(self.streams.stop())))
        if self.spark is not None:
            lines.append(self._stop_part("spark", lambda: (self.spark.stop(), "Spark session stopped")[1]))
        if self.stack_run.started:
            lines.append(self._stop_part("stack", lambda: "stack: " + "; ".join(
                stop_stack(self.config, self.stack_run.started))))
        if self.stack_run.already_running:
            lines.append(f"left running (up before the demo): {', '.join(self.stack_run.already_running)}")
        if lines:
            self.console.detail("stopping what the demo started:")
            for line in lines:
                self.console.detail("  " + line)
        self.summary["stopped"] = lines

    def _stop_part(self, part: str, stop) -> str:
        try:
            return stop()
        except Exception as error:  # noqa: BLE001 - the other parts still have to stop
            log.exception("stopping %s failed", part)
            return f"{part}: failed to stop ({type(error).__name__}: {error}); read {self.log_path}"

    def write_summary(self) -> None:
        path = self.options.summary_json
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary, indent=2, default=str) + "\n", encoding="utf-8")


def stdout_console(progress: bool) -> Console:
    return Console(sys.stdout, STEPS, progress)
