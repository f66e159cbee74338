"""Prometheus metrics of the streaming jobs, served from the driver."""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_lock = threading.Lock()
_ingest_metrics = None
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
