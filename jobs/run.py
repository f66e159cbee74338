"""The driver entry point that spark-submit runs: ``run.py JOB [ARGS]`` calls that job's main()."""

from __future__ import annotations

import importlib
import logging
import os
import sys

# Job name -> module with a main(argv) -> int. spark-submit.sh --help lists these.
JOBS = {
    "ingest": ("jobs.ingest", "Kafka interactions -> Delta bronze events (streaming)"),
    "bronze-report": ("jobs.bronze_report", "Summary of bronze and quarantine: rows, time range, files"),
    "items": ("jobs.items", "Item catalogue (movies.csv) -> Delta silver/items and Redis"),
    "backfill": ("jobs.backfill", "Features from bronze -> Delta history and Redis, in batch"),
    "features-stream": ("jobs.features_stream", "New bronze events -> tiles, feature history and Redis (streaming)"),
    "parity": ("jobs.parity", "Compare stored features (Delta, Redis) with a batch recomputation"),
    "training-set": ("jobs.training_set", "Point-in-time training examples from bronze and the feature history"),
    "train": ("jobs.train", "Train, evaluate and register the LightGBM ranker; promote it when it wins"),
    "registry": ("jobs.registry", "Model aliases: show, promote a version, roll back the champion"),
    "served-ingest": ("jobs.served_ingest", "Kafka recommendations_served -> Delta served/recommendations (streaming)"),
    "online-metrics": ("jobs.online_metrics", "Online precision@k and recall@k of what was served, on event time"),
}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=os.environ.get("STREAMREC_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "py4j.clientserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] not in JOBS:
        names = ", ".join(sorted(JOBS))
        logging.getLogger("jobs.run").error("unknown job %r; known jobs: %s", argv[0] if argv else None, names)
        return 2

    pid_file = os.environ.get("STREAMREC_DRIVER_PID_FILE")
    if pid_file:
        # spark-submit.sh forwards SIGTERM to this pid, so the job can stop after its current batch.
        with open(pid_file, "w", encoding="utf-8") as handle:
            handle.write(str(os.getpid()))

    module_name, _description = JOBS[argv[0]]
    module = importlib.import_module(module_name)
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
