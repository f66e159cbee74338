"""The demo's services: the local stack (only what the demo starts is stopped again), its ports and namespace.

A run owns a namespace: two Kafka topics, a Redis key prefix, a registered model and a lake folder,
all named after ``--name``. The next run clears them first, so every run starts from nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from reccore.config import Config, TopicConfig

from demo.console import DemoError

log = logging.getLogger("demo.services")

# How long a deleted Kafka topic may take to disappear before the demo creates it again.
TOPIC_DELETE_TIMEOUT_SECONDS = 60.0
TOPIC_PARTITIONS = 2
TOPIC_RETENTION_MS = 7 * 86_400_000
REDIS_DELETE_BATCH = 5000


@dataclass(frozen=True)
class Port:
    """A loopback port the demo binds, with the setting and environment variable that move it."""

    port: int
    purpose: str
    setting: str

    @property
    def variable(self) -> str:
        section, name = self.setting.split(".")
        return f"STREAMREC__{section.upper()}__{name.upper()}"


def check_ports(ports: list[Port]) -> None:
    """Raise DemoError naming each port that another process uses (port 0 picks a free one, so it is skipped)."""
    from devstack.process import LOOPBACK, port_in_use, port_owner

    problems = []
    for entry in ports:
        if entry.port and port_in_use(entry.port):
            owner = port_owner(entry.port) or "a process this user cannot inspect"
            problems.append(f"port {entry.port} on {LOOPBACK} ({entry.purpose}, {entry.setting}) is in use by "
                            f"{owner}; stop that process or set {entry.variable} to a free port")
    if problems:
        raise DemoError("\n".join(problems))


@dataclass
class StackRun:
    """The outcome of ``start_stack``: services it started (to stop again) and services already running."""

    started: list = field(default_factory=list)
    already_running: list = field(default_factory=list)
    addresses: dict = field(default_factory=dict)


def start_stack(config: Config, run: StackRun) -> None:
    """Start the stack's services that are not running; record in ``run`` which ones this call started.

    ``run`` is filled in place, so the caller can stop what was started even when this raises.
    """
    from devstack import stack
    from devstack.process import StackError

    services = stack.build_services(config.stack)
    try:
        rows = stack.up(config.stack, services)
    except StackError as error:
        raise DemoError(f"the local stack did not start: {error}") from None
    failures = []
    for row in rows:
        run.addresses[row.service] = row.address
        if row.note.startswith("started") and row.is_up:
            run.started.append(row.service)
        elif row.is_up:
            run.already_running.append(row.service)
        else:
            failures.append(row.error or f"{row.service} is {row.state}; read {row.log_path}")
    if failures:
        raise DemoError("\n".join(failures))


def stop_stack(config: Config, names: list[str]) -> list[str]:
    """Stop the named services by their pid files; return one line per service."""
    from devstack import stack

    if not names:
        return []
    rows = stack.down(config.stack, stack.build_services(config.stack, names))
    return [f"{row.service}: {row.note or row.state}" + (f" ({row.error})" if row.error else "") for row in rows]


def reset_topics(config: Config) -> list[str]:
    """Delete the run's two topics when they exist, wait until they are gone, and create them empty."""
    from confluent_kafka.admin import AdminClient

    from devstack.topics import ensure_topics

    names = [config.kafka.interactions_topic, config.kafka.served_topic]
    admin = AdminClient(config.kafka.client_options())
    existing = [name for name in names if name in admin.list_topics(timeout=30).topics]
    if existing:
        for name, future in admin.delete_topics(existing, operation_timeout=30).items():
            future.result(timeout=60)
            log.info("deleted topic %s of an earlier run", name)
        deadline = time.monotonic() + TOPIC_DELETE_TIMEOUT_SECONDS
        while set(existing) & set(admin.list_topics(timeout=30).topics):
            if time.monotonic() > deadline:
                raise DemoError(f"Kafka still lists the deleted topics {existing} after "
                                f"{TOPIC_DELETE_TIMEOUT_SECONDS:.0f} s; rerun the demo, or use another --name")
            time.sleep(0.5)
    options = config.kafka.client_options()
    bootstrap = options.pop("bootstrap.servers")
    results = ensure_topics(bootstrap, [TopicConfig(name, TOPIC_PARTITIONS, TOPIC_RETENTION_MS) for name in names],
                            options=options)
    not_created = [result.name for result in results if result.outcome != "created"]
    if not_created:
        raise DemoError(f"Kafka topics {not_created} existed again right after their deletion; another process "
                        "may be using them. Use another --name")
    return names


def delete_redis_prefix(config: Config) -> int:
    """Delete every Redis key under the run's prefix; return how many were deleted."""
    from jobs.lib.redis_writer import connect

    client = connect(config.redis)
    deleted = 0
    try:
        batch = []
        for key in client.scan_iter(f"{config.redis.key_prefix}:*", count=REDIS_DELETE_BATCH):
            batch.append(key)
            if len(batch) == REDIS_DELETE_BATCH:
                deleted += client.unlink(*batch)
                batch = []
        if batch:
            deleted += client.unlink(*batch)
    finally:
        client.close()
    log.info("deleted %d Redis keys under %s:", deleted, config.redis.key_prefix)
    return deleted


def delete_registered_model(config: Config) -> bool:
    """Delete the run's registered model (all its versions) when it exists; return whether it existed.

    Its training runs stay in the experiment, so earlier runs remain visible in the MLflow UI.
    """
    from mlflow.exceptions import MlflowException

    from jobs.registry import RegistryError, client_for

    name = config.training.model_name
    try:
        client = client_for(config)
    except RegistryError as error:
        raise DemoError(str(error)) from None
    try:
        client.get_registered_model(name)
    except MlflowException:
        return False
    client.delete_registered_model(name)
    log.info("deleted registered model %s of an earlier run", name)
    return True
