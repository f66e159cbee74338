"""The three streaming queries of the demo in one Spark session: ingest, the served log and the features stream.

One session saves a JVM start per job (10 to 30 s each on 2 cores) and lets the demo read each
job's batch results directly. Ingest and the served log start first. The features stream starts
after the backfill, because it continues from the bronze version the backfill read. It runs in a
thread under its own supervisor, which restarts it from the checkpoint after a failed micro-batch.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from pyspark.sql import SparkSession

from jobs.features_stream import FeaturesStream
from jobs.ingest import IngestJob
from jobs.lib.metrics import serve_metrics
from jobs.served_ingest import ServedIngest
from reccore.config import Config
from reccore.features import FeatureSet

from demo.console import DemoError

log = logging.getLogger("demo.streams")

POLL_SECONDS = 1.0
STOP_TIMEOUT_SECONDS = 600.0


class Streams:
    """Start, watch and stop the demo's streaming queries."""

    def __init__(self, spark: SparkSession, config: Config, feature_set: FeatureSet, log_path: str):
        self.spark = spark
        self.config = config
        self.feature_set = feature_set
        self.log_path = log_path
        self.ingest: Optional[IngestJob] = None
        self.served: Optional[ServedIngest] = None
        self.features: Optional[FeaturesStream] = None
        self.metrics_ports: dict = {}
        self._features_thread: Optional[threading.Thread] = None
        self._features_exit: Optional[int] = None
        self._stopping = False

    def start_ingest_and_served_log(self) -> None:
        self.ingest = IngestJob(self.spark, self.config)
        self.ingest.start()
        self.served = ServedIngest(self.spark, self.config)
        self.served.start()
        settings = self.config.ingest
        self.metrics_ports["ingest"] = serve_metrics(settings.metrics_host, settings.metrics_port)

    def start_features(self) -> None:
        """Start the features stream in a thread; it waits for the ingest job's next bronze commit."""
        settings = self.config.features
        self.features = FeaturesStream(self.spark, self.config, self.feature_set, settings.watermark_seconds,
                                       settings.trigger, settings.trigger_interval_seconds)
        self.metrics_ports["features"] = serve_metrics(settings.metrics_host, settings.metrics_port)

        def supervise() -> None:
            try:
                self._features_exit = self.features.run_supervised(settings.max_restarts,
                                                                   settings.restart_delay_seconds)
            except Exception:  # noqa: BLE001 - logged here, reported by check() as a failed stream
                log.exception("the features stream stopped with an error")
                self._features_exit = 1

        self._features_thread = threading.Thread(target=supervise, name="features-stream", daemon=True)
        self._features_thread.start()

    # -- watching ----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise DemoError when a query has stopped without being asked to."""
        if self._stopping:
            return
        for name, job in (("ingest", self.ingest), ("served-log ingest", self.served)):
            query = job.query if job is not None else None
            if query is not None and not query.isActive:
                error = query.exception()
                raise DemoError(f"the {name} query stopped: {error or 'no error reported'}; read {self.log_path}")
        if self._features_thread is not None and not self._features_thread.is_alive():
            raise DemoError(f"the features stream stopped (exit code {self._features_exit}); read {self.log_path}")

    def events_read(self) -> int:
        return sum(result.records_read for result in self.ingest.results) if self.ingest else 0

    def served_records_read(self) -> int:
        return self.served.totals["written"] + self.served.totals["quarantined"] if self.served else 0

    def features_clock_ms(self) -> Optional[int]:
        """Return the features stream's event-time clock after its last micro-batch (None before the first)."""
        clocks = [result.clock_ms for result in self.features.results if result.clock_ms is not None] \
            if self.features else []
        return max(clocks) if clocks else None

    def features_batches(self) -> int:
        return len(self.features.results) if self.features else 0

    def wait(self, condition: Callable[[], bool], timeout_s: float, what: str,
             on_poll: Optional[Callable[[], None]] = None) -> float:
        """Poll ``condition`` until it holds; return the seconds waited. Raise DemoError on a timeout or a failed query."""
        started = time.monotonic()
        for _ in range(int(timeout_s / POLL_SECONDS) + 2):
            self.check()
            if on_poll is not None:
                on_poll()
            if condition():
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                break
            time.sleep(POLL_SECONDS)
        raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}; read {self.log_path}")

    # -- stopping ----------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stop every query between micro-batches and release the checkpoints; return what was stopped."""
        self._stopping = True
        stopped = []
        if self.features is not None:
            self.features.stop_requested.set()
            if self._features_thread is not None:
                self._features_thread.join(STOP_TIMEOUT_SECONDS)
                if self._features_thread.is_alive():
                    log.warning("the features stream did not stop within %.0f s", STOP_TIMEOUT_SECONDS)
            stopped.append("features")
        if self.ingest is not None and self.ingest.query is not None:
            self.ingest.stop_gracefully()
            self.ingest.close()
            stopped.append("ingest")
        if self.served is not None and self.served.query is not None:
            query = self.served.query
            deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
            # Between micro-batches, so the last batch's Delta write is whole.
            while query.isActive and query.status["isTriggerActive"] and time.monotonic() < deadline:
                time.sleep(0.05)
            query.stop()
            self.served.close()
            stopped.append("served log")
        return stopped
