"""The broker's generated files and jar coordinates, without starting Kafka."""

import base64
from pathlib import Path

import yaml

from devstack import kafka


def parse_properties(text: str) -> dict:
    pairs = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            pairs[key] = value
    return pairs


def test_server_properties_single_node_kraft():
    properties = parse_properties(kafka.render_server_properties(19092, 19093, Path("/srv/kafka/data")))

    assert properties["process.roles"] == "broker,controller"
    assert properties["node.id"] == "1"
    assert properties["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert properties["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert properties["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert properties["controller.listener.names"] == "CONTROLLER"
    assert properties["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert properties["log.dirs"] == "/srv/kafka/data"
    assert properties["group.initial.rebalance.delay.ms"] == "0"


def test_server_properties_internal_topics_one_replica():
    properties = parse_properties(kafka.render_server_properties(19092, 19093, Path("/data")))

    assert properties["offsets.topic.replication.factor"] == "1"
    assert properties["transaction.state.log.replication.factor"] == "1"
    assert properties["transaction.state.log.min.isr"] == "1"


def test_cluster_id_is_kafka_uuid_form():
    cluster_ids = {kafka.new_cluster_id() for _ in range(200)}

    assert len(cluster_ids) == 200
    for cluster_id in cluster_ids:
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_broker_coordinates_pin_slf4j_2():
    coordinates = kafka.broker_coordinates("4.1.1")

    assert coordinates[0] == "org.apache.kafka:kafka_2.13:4.1.1"
    assert "org.slf4j:slf4j-api:2.0.16" in coordinates
    assert any(item.startswith("org.apache.logging.log4j:log4j-slf4j2-impl:") for item in coordinates)


def test_resolve_broker_jars_default_version(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(kafka.maven, "resolve", lambda name, coordinates: calls.append((name, coordinates)) or tmp_path)
    monkeypatch.setenv("STREAMREC__STACK__KAFKA_VERSION", "4.0.9")

    assert kafka.resolve_broker_jars() == tmp_path
    assert calls == [("kafka-broker-4.0.9", kafka.broker_coordinates("4.0.9"))]


def test_resolve_broker_jars_explicit_version(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(kafka.maven, "resolve", lambda name, coordinates: calls.append(name) or tmp_path)

    kafka.resolve_broker_jars("3.9.1")

    assert calls == ["kafka-broker-3.9.1"]


def test_log4j2_config_is_valid_yaml():
    config = yaml.safe_load(kafka.LOG4J2_CONFIG)["Configuration"]

    assert config["Appenders"]["Console"]["target"] == "SYSTEM_OUT"
    assert config["Loggers"]["Root"]["level"] == "INFO"
