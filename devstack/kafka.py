"""A single-node Apache Kafka broker in KRaft mode, run from Maven Central jars.

Maven Central publishes Kafka's jars but not its shell scripts, so the broker runs as the
``kafka.Kafka`` main class on a classpath resolved once by ``devstack.maven``. Storage is formatted
once, on the first start, as a standalone KRaft quorum of this one node (broker and controller).
"""

from __future__ import annotations

import base64
import logging
import shutil
import subprocess
import uuid
from pathlib import Path

from reccore.config import load_config

from devstack import maven
from devstack.process import LOOPBACK, StackError, file_size, log_tail, port_accepts
from devstack.service import Service

log = logging.getLogger(__name__)

# slf4j-api 2.x is listed because kafka_2.13 4.1 depends on slf4j-api 1.7.36, which cannot find
# the log4j2 provider of log4j-slf4j2-impl. Maven prefers a version declared directly in the pom
# over a transitive one.
SLF4J_API = "org.slf4j:slf4j-api:2.0.16"
LOG4J_SLF4J2 = "org.apache.logging.log4j:log4j-slf4j2-impl:2.24.3"
LOG4J_CORE = "org.apache.logging.log4j:log4j-core:2.24.3"

FORMAT_TIMEOUT_SECONDS = 120.0
METADATA_TIMEOUT_SECONDS = 3.0

# Broker-side log levels: INFO for the broker's own steps, WARN for the per-request loggers that
# would otherwise write a line for every request or partition state change.
LOG4J2_CONFIG = """\
Configuration:
  name: streamrec-kafka
  Appenders:
    Console:
      name: STDOUT
      target: SYSTEM_OUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.request.logger
        level: WARN
      - name: kafka.network.RequestChannel$
        level: WARN
      - name: state.change.logger
        level: WARN
      - name: org.apache.kafka.controller
        level: INFO
      - name: kafka.log.LogCleaner
        level: WARN
"""


def broker_coordinates(version: str) -> list[str]:
    """Return the Maven coordinates of the broker ``version`` and its logging backend."""
    return [f"org.apache.kafka:kafka_2.13:{version}", SLF4J_API, LOG4J_SLF4J2, LOG4J_CORE]


def resolve_broker_jars(version: str | None = None) -> Path:
    """Resolve (once) the broker's jars into the jar cache and return their folder.

    ``version`` defaults to ``stack.kafka_version`` of the configured environment (STREAMREC_ENV,
    else local).
    """
    version = version or load_config().stack.kafka_version
    return maven.resolve(f"kafka-broker-{version}", broker_coordinates(version))


def render_server_properties(port: int, controller_port: int, log_dir: Path) -> str:
    """Return the server.properties of a one-node KRaft cluster (broker and controller) on loopback."""
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{LOOPBACK}:{controller_port}",
        "listeners": f"PLAINTEXT://{LOOPBACK}:{port},CONTROLLER://{LOOPBACK}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        # One broker: internal topics cannot have more than one replica.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # A consumer group starts consuming at once instead of waiting 3 s for more members.
        "group.initial.rebalance.delay.ms": "0",
    }
    lines = ["# Written by devstack on every start; edit reccore StackConfig or conf/*.yaml instead."]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def new_cluster_id() -> str:
    """Return a random KRaft cluster id: 16 random bytes as URL-safe base64 without padding.

    Kafka's own ``Uuid.randomUuid`` uses the same form and skips ids that start with '-', which a
    command line would read as an option.
    """
    for _ in range(100):
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cluster_id.startswith("-"):
            return cluster_id
    raise StackError("could not draw a Kafka cluster id that does not start with '-' in 100 tries")


class KafkaBroker(Service):
    """The KRaft broker: PLAINTEXT clients on ``kafka_port``, the controller on ``kafka_controller_port``."""

    name = "kafka"
    stop_timeout_seconds = 30.0

    def __init__(self, stack):
        super().__init__(stack)
        self.start_timeout_seconds = float(stack.kafka_start_timeout_seconds)
        self.data_dir = self.folder / "data"
        self.properties_path = self.folder / "server.properties"
        self.log4j_path = self.folder / "log4j2.yaml"
        self._classpath: str | None = None

    def ports(self) -> dict[str, int]:
        return {"kafka_port": self.stack.kafka_port, "kafka_controller_port": self.stack.kafka_controller_port}

    def prepare(self) -> None:
        if shutil.which("java") is None:
            raise StackError("kafka: java is not on PATH; install a Java 17 runtime "
                             "(apt-get install openjdk-17-jre-headless) and retry")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.properties_path.write_text(render_server_properties(self.stack.kafka_port,
                                                                 self.stack.kafka_controller_port, self.data_dir),
                                        encoding="utf-8")
        self.log4j_path.write_text(LOG4J2_CONFIG, encoding="utf-8")
        self._format_storage_once()

    @property
    def classpath(self) -> str:
        """Return the broker's classpath, resolving the jars on first use."""
        if self._classpath is None:
            folder = resolve_broker_jars(self.stack.kafka_version)
            self._classpath = ":".join(str(jar) for jar in maven.jars_in(folder))
        return self._classpath

    def _format_storage_once(self) -> None:
        if (self.data_dir / "meta.properties").is_file():
            return

        cluster_id = new_cluster_id()
        log.info("kafka: formatting storage in %s (cluster id %s)", self.data_dir, cluster_id)
        command = ["java", "-cp", self.classpath, f"-Dlog4j2.configurationFile={self.log4j_path}",
                   "kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id,
                   "-c", str(self.properties_path)]
        offset = file_size(self.log_path)
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"\n===== formatting storage: {' '.join(command[:1] + command[3:])}\n".encode())
            log_file.flush()
            try:
                result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                        stderr=subprocess.STDOUT, timeout=FORMAT_TIMEOUT_SECONDS, check=False)
            except subprocess.TimeoutExpired:
                raise StackError(f"kafka: formatting storage timed out after {FORMAT_TIMEOUT_SECONDS:.0f} s; "
                                 f"see {self.log_path}") from None
        if result.returncode != 0:
            raise StackError(f"kafka: formatting storage in {self.data_dir} failed (exit {result.returncode}); "
                             f"see {self.log_path}:\n{log_tail(self.log_path, from_offset=offset)}")

    def command(self) -> list[str]:
        return ["java", f"-Xmx{self.stack.kafka_heap_mb}m", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.log4j_path}", "-cp", self.classpath,
                "kafka.Kafka", str(self.properties_path)]

    def probe(self) -> bool:
        if not port_accepts(self.stack.kafka_port):
            return False
        return broker_metadata_ready(self.address())


def broker_metadata_ready(bootstrap_servers: str, timeout_seconds: float = METADATA_TIMEOUT_SECONDS) -> bool:
    """Return whether the cluster at ``bootstrap_servers`` returns metadata with a broker and a controller."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap_servers,
                         "socket.connection.setup.timeout.ms": int(timeout_seconds * 1000),
                         "logger": logging.getLogger("devstack.kafka.librdkafka")})
    try:
        metadata = admin.list_topics(timeout=timeout_seconds)
    except KafkaException as error:
        log.debug("kafka: no metadata from %s yet: %s", bootstrap_servers, error)
        return False
    return bool(metadata.brokers) and metadata.controller_id >= 0
