"""Helpers shared by the Spark jobs: session, checkpoints, Kafka offsets and metrics."""
