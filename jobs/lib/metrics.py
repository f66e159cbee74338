"""Prometheus metrics of the streaming jobs, served from the driver."""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_lock = threading.Lock()
_ingest_metrics = None
_features_metrics = None
_servers: dict = {}


class IngestMetrics:
    """Counters and gauges of the ingest job (one set per process)."""

    def __init__(self):
        self.batches = Counter("streamrec_ingest_batches_total", "Micro-batches processed")
        self.records_read = Counter("streamrec_ingest_records_read_total", "Kafka records read")
        self.events_written = Counter("streamrec_ingest_events_written_total", "Events inserted into bronze")
        self.quarantined = Counter("streamrec_ingest_quarantined_total",
                                   "Records written to quarantine, by reason code", ["reason"])
        self.duplicates = Counter("streamrec_ingest_duplicates_total",
                                  "Valid events not written because their event_id was already in bronze "
                                  "or earlier in the same micro-batch")
        self.late_events = Counter("streamrec_ingest_late_events_total",
                                   "Valid events older than the newest event time seen by more than the "
                                   "late threshold (they still land in bronze)")
        self.offsets_skipped = Counter("streamrec_ingest_offsets_skipped_total",
                                       "Kafka offsets deleted before they were read (failOnDataLoss off)",
                                       ["topic", "partition"])
        self.delta_retries = Counter("streamrec_ingest_delta_write_retries_total",
                                     "Delta writes retried after a concurrent-modification conflict")
        self.batch_duration = Histogram("streamrec_ingest_batch_duration_seconds", "Micro-batch duration",
                                        buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
        self.kafka_lag = Gauge("streamrec_ingest_kafka_lag_records",
                               "Latest Kafka offset minus the offset the checkpoint has committed",
                               ["topic", "partition"])
        self.last_batch_time = Gauge("streamrec_ingest_last_batch_timestamp_seconds",
                                     "Wall-clock time of the last completed micro-batch")
        self.max_event_time = Gauge("streamrec_ingest_max_event_time_seconds",
                                    "Newest event time written to bronze (event-time clock)")


def ingest_metrics() -> IngestMetrics:
    """Return the process's ingest metrics, creating them on first use."""
    global _ingest_metrics
    with _lock:
        if _ingest_metrics is None:
            _ingest_metrics = IngestMetrics()
        return _ingest_metrics


class FeaturesMetrics:
    """Counters and gauges of the streaming features job (one set per process)."""

    def __init__(self):
        self.batches = Counter("streamrec_features_batches_total", "Micro-batches folded into features")
        self.events = Counter("streamrec_features_events_total", "Bronze events read by the features stream")
        self.late_events = Counter("streamrec_features_late_events_total",
                                   "Events older than the batch's watermark: left out of the streamed windows "
                                   "until the next backfill")
        self.entities_written = Counter("streamrec_features_redis_entities_written_total",
                                        "Entities whose values were replaced in Redis", ["entity"])
        self.entities_kept = Counter("streamrec_features_redis_entities_kept_total",
                                     "Entities not replaced because Redis held newer values", ["entity"])
        self.batch_failures = Counter("streamrec_features_batch_failures_total",
                                      "Micro-batches that failed and were rerun from the checkpoint, by cause "
                                      "(redis or other)", ["cause"])
        self.batch_duration = Histogram("streamrec_features_batch_duration_seconds", "Micro-batch duration",
                                        buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
        self.last_redis_write = Gauge("streamrec_features_last_redis_write_timestamp_seconds",
                                      "Wall-clock time of the last micro-batch whose Redis writes all succeeded")
        self.max_event_time = Gauge("streamrec_features_max_event_time_seconds",
                                    "Newest event time folded into the features (event-time clock)")


def features_metrics() -> FeaturesMetrics:
    """Return the process's features-stream metrics, creating them on first use."""
    global _features_metrics
    with _lock:
        if _features_metrics is None:
            _features_metrics = FeaturesMetrics()
        return _features_metrics


def serve_metrics(host: str, port: int) -> int:
    """Serve /metrics on ``host:port`` once per process; port 0 picks a free port. Returns the port."""
    with _lock:
        if (host, port) in _servers:
            return _servers[(host, port)]
        server, _thread = start_http_server(port, addr=host)
        bound = server.server_address[1]
        _servers[(host, port)] = bound
    log.info("metrics served at http://%s:%d/metrics", host, bound)
    return bound
