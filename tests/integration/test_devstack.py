"""The local stack end to end: a second stack with its own home and free loopback ports.

Starts the real Kafka broker, redis-server and MLflow server through the command line, uses each
one as a client would, and stops them again. Needs java, the broker jars (resolved on first use
from Maven Central), redis-server and the mlflow package; takes about a minute.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from devstack import process

pytestmark = pytest.mark.integration

COMMAND_TIMEOUT_SECONDS = 300
CONSUME_TIMEOUT_SECONDS = 30.0


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            sockets.append(probe)
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def run_stack(environment: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "devstack", *args], env=environment, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False)


def parse_status(stdout: str) -> dict:
    """Map service name to (pid, address, state) from the first table of the command's output."""
    rows = {}
    lines = stdout.split("\n\n")[0].splitlines()
    assert lines[0].split()[:5] == ["SERVICE", "PID", "ADDRESS", "STATE", "LOG"], stdout
    for line in lines[1:]:
        service, pid, address, state = line.split()[:4]
        rows[service] = (None if pid == "-" else int(pid), address, state)
    return rows


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def stack_environment(tmp_path):
    """Environment of a stack under tmp_path on free ports, never the default 9092/9093/6379/5000."""
    kafka_port, controller_port, redis_port, mlflow_port = free_ports(4)
    environment = {name: value for name, value in os.environ.items() if not name.startswith("STREAMREC")}
    environment.update(STREAMREC_HOME=str(tmp_path), STREAMREC_KAFKA_PORT=str(kafka_port),
                       STREAMREC_KAFKA_CONTROLLER_PORT=str(controller_port), STREAMREC_REDIS_PORT=str(redis_port),
                       STREAMREC_MLFLOW_PORT=str(mlflow_port))
    yield environment
    # Stops only what this stack's pid files name, whatever the test left running.
    run_stack(environment, "down")


def produce_and_consume(bootstrap_servers: str, topic: str) -> bytes:
    from confluent_kafka import Consumer, Producer

    value = f"event-{uuid.uuid4()}".encode()
    producer = Producer({"bootstrap.servers": bootstrap_servers})
    producer.produce(topic, key=b"user-1", value=value)
    assert producer.flush(10) == 0

    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": f"test-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + CONSUME_TIMEOUT_SECONDS
        for _ in range(int(CONSUME_TIMEOUT_SECONDS)):
            message = consumer.poll(1.0)
            if message is not None and message.error() is None and message.value() == value:
                return message.value()
            if time.monotonic() > deadline:
                break
    finally:
        consumer.close()
    pytest.fail(f"no message on {topic} within {CONSUME_TIMEOUT_SECONDS:.0f} s")


def test_stack_lifecycle(stack_environment, tmp_path):
    import redis
    from confluent_kafka.admin import AdminClient

    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        started = run_stack(stack_environment, "up")
        assert started.returncode == 0, started.stderr
        rows = parse_status(started.stdout)
        assert {name: row[2] for name, row in rows.items()} == {"kafka": "running", "redis": "running",
                                                              "mlflow": "running"}
        assert "created" in started.stdout

        status = run_stack(stack_environment, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert parse_status(status.stdout) == rows

        again = run_stack(stack_environment, "up")
        assert again.returncode == 0, again.stderr
        assert parse_status(again.stdout) == rows
        assert again.stdout.count("already running") == 3
        assert "created" not in again.stdout

        kafka_address = rows["kafka"][1]
        assert kafka_address == f"127.0.0.1:{stack_environment['STREAMREC_KAFKA_PORT']}"
        topics = AdminClient({"bootstrap.servers": kafka_address}).list_topics(timeout=10).topics
        assert len(topics["interactions"].partitions) == 2
        assert len(topics["recommendations_served"].partitions) == 2
        assert produce_and_consume(kafka_address, "interactions").startswith(b"event-")

        client = redis.Redis(host="127.0.0.1", port=int(stack_environment["STREAMREC_REDIS_PORT"]),
                             socket_timeout=5)
        client.set("streamrec:test", "kept")
        assert client.get("streamrec:test") == b"kept"
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("dir")["dir"] == str(tmp_path / "stack" / "redis" / "data")
        client.close()

        mlflow_url = f"http://{rows['mlflow'][1]}"
        with urllib.request.urlopen(f"{mlflow_url}/health", timeout=10) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=5",
                                    timeout=10) as response:
            experiments = json.loads(response.read())["experiments"]
        assert [experiment["name"] for experiment in experiments] == ["Default"]
        assert (tmp_path / "stack" / "mlflow" / "mlflow.db").is_file()

        stopped = run_stack(stack_environment, "down")
        assert stopped.returncode == 0, stopped.stderr
        for name, (pid, _, _) in rows.items():
            assert process.wait_until(lambda: group_gone(pid), 10.0), f"{name} pid {pid} is still running"
        assert bystander.poll() is None

        after = run_stack(stack_environment, "status")
        assert after.returncode == 1
        assert {row[2] for row in parse_status(after.stdout).values()} == {"stopped"}
    finally:
        bystander.kill()
        bystander.wait(timeout=10)


def test_topics_created_and_mismatch_reported(stack_environment):
    from confluent_kafka.admin import AdminClient, ConfigResource

    started = run_stack(stack_environment, "up", "--only", "kafka")
    assert started.returncode == 0, started.stderr
    environment = dict(stack_environment, STREAMREC__KAFKA__TOPICS=(
        "[{name: interactions, partitions: 3}, {name: audit_events, partitions: 1, retention_ms: 3600000}]"))

    created = run_stack(environment, "topics")

    assert created.returncode == 0, created.stderr
    assert "has 2 partitions but the config asks for 3" in created.stdout
    bootstrap = f"127.0.0.1:{stack_environment['STREAMREC_KAFKA_PORT']}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = admin.list_topics(timeout=10).topics
    assert len(topics["interactions"].partitions) == 2
    assert len(topics["audit_events"].partitions) == 1
    resource = ConfigResource(ConfigResource.Type.TOPIC, "audit_events")
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    assert config["retention.ms"].value == "3600000"


def test_redis_data_survives_restart(stack_environment):
    import redis

    port = int(stack_environment["STREAMREC_REDIS_PORT"])
    assert run_stack(stack_environment, "up", "--only", "redis").returncode == 0
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    client.set("streamrec:durable", "yes")
    client.close()
    assert run_stack(stack_environment, "down", "--only", "redis").returncode == 0

    restarted = run_stack(stack_environment, "up", "--only", "redis")

    assert restarted.returncode == 0, restarted.stderr
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    assert client.get("streamrec:durable") == b"yes"
    client.close()
