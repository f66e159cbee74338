"""The local stack: a KRaft Kafka broker, Redis and an MLflow server on loopback, started by pid."""
