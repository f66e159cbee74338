"""Start, report and stop the local services, each tracked by its pid file under the stack home.

``up`` leaves a service that already runs from its pid file alone and starts the others. It checks
every port first, and starts nothing while a process that the stack did not start uses one of them.
``down`` signals only the processes recorded in the pid files, never a process found by name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from reccore.config import StackConfig

from devstack.kafka import KafkaBroker
from devstack.mlflow_server import MlflowServer
from devstack.process import (LOOPBACK, PidRecord, StackError, exclusive_lock, file_size, is_running,
                              log_tail, port_in_use, port_owner, read_pid_file, remove_pid_file, spawn, stop,
                              write_pid_file)
from devstack.redis_server import RedisServer
from devstack.service import PORT_VARIABLES, Service, stack_home

log = logging.getLogger(__name__)

SERVICE_CLASSES = {"kafka": KafkaBroker, "redis": RedisServer, "mlflow": MlflowServer}
SERVICE_NAMES = tuple(SERVICE_CLASSES)
# MLflow is spawned first because it takes the longest to become ready, so the readiness waits overlap.
SPAWN_ORDER = ("mlflow", "kafka", "redis")
READY_POLL_INTERVAL_SECONDS = 0.5
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class ServiceStatus:
    """One row of the status table: a service, its process, address, state and log file."""

    service: str
    state: str
    """running, not ready (the process runs but does not respond yet), stopped or failed."""
    pid: int | None
    address: str
    log_path: Path
    note: str = ""
    """A one-line remark, for example "started" or "already running"."""
    error: str = ""
    """The reason the service failed, with the last lines of its log (empty while it is healthy)."""

    @property
    def is_up(self) -> bool:
        """Return whether the service runs and responds."""
        return self.state == "running"


def build_services(stack: StackConfig, names: Iterable[str] | None = None) -> list[Service]:
    """Return the services called ``names`` (default: all), in the order of SERVICE_NAMES."""
    selected = list(SERVICE_NAMES) if names is None else list(names)
    unknown = sorted(set(selected) - set(SERVICE_NAMES))
    if unknown:
        raise StackError(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(SERVICE_NAMES)}")
    return [SERVICE_CLASSES[name](stack) for name in SERVICE_NAMES if name in selected]


def lock_path(stack: StackConfig) -> Path:
    """Return the lock file that serializes ``up`` and ``down`` on one stack home."""
    return stack_home(stack) / "stack.lock"


def running_record(service: Service) -> PidRecord | None:
    """Return the pid record of ``service`` if the process it names still runs, else None."""
    record = read_pid_file(service.pid_path)
    return record if record is not None and is_running(record) else None


def busy_ports(service: Service) -> list[tuple[str, int, str]]:
    """Return (StackConfig field, port, owner) for each port of ``service`` that another process uses."""
    busy = []
    for field_name, port in service.ports().items():
        if port_in_use(port):
            busy.append((field_name, port, port_owner(port) or "a process this user cannot inspect"))
    return busy


def port_conflicts(service: Service) -> list[str]:
    """Describe each port of ``service`` that another process uses, with the setting that moves it."""
    conflicts = []
    for field_name, port, owner in busy_ports(service):
        variable = PORT_VARIABLES.get(field_name)
        remedy = f"set {variable} (stack.{field_name}) to a free port" if variable else f"change stack.{field_name}"
        conflicts.append(f"{service.name}: port {port} on {LOOPBACK} is already in use by {owner}, which this "
                         f"stack did not start; stop that process or {remedy}")
    return conflicts


def status(services: list[Service]) -> list[ServiceStatus]:
    """Report each service: running and responding, running but not ready, or stopped."""
    rows = []
    for service in services:
        record = running_record(service)
        if record is not None:
            state = "running" if service.probe() else "not ready"
            rows.append(ServiceStatus(service.name, state, record.pid, record.address, service.log_path,
                                      note=_address_note(service, record)))
            continue

        stale = read_pid_file(service.pid_path)
        notes = [f"stale pid file (pid {stale.pid} has exited)"] if stale is not None else []
        notes += [f"port {port} is in use by {owner}" for _, port, owner in busy_ports(service)]
        rows.append(ServiceStatus(service.name, "stopped", None, service.address(), service.log_path,
                                  note="; ".join(notes)))
    return rows


def up(stack: StackConfig, services: list[Service]) -> list[ServiceStatus]:
    """Start the services that do not run yet and wait until each one responds.

    Raises StackError, before starting anything, when a process that the stack did not start uses
    one of the ports, or when a running service listens on another address than the config names.
    A service that fails to start gets state "failed" with the reason and its log tail, and the
    other services are still started.
    """
    with exclusive_lock(lock_path(stack)):
        already_running = {}
        conflicts = []
        for service in services:
            record = running_record(service)
            if record is not None and record.address != service.address():
                conflicts.append(f"{service.name}: pid {record.pid} runs on {record.address}, but the config now "
                                 f"names {service.address()}; stop it first with `python -m devstack down "
                                 f"--only {service.name}`")
                continue
            if record is not None:
                already_running[service.name] = record
                continue
            if service.pid_path.exists():
                log.info("%s: removing the stale pid file %s", service.name, service.pid_path)
                remove_pid_file(service.pid_path)
            conflicts += port_conflicts(service)
        if conflicts:
            raise StackError("\n".join(conflicts))

        started: dict[str, tuple[PidRecord, int]] = {}
        failed: dict[str, ServiceStatus] = {}
        for service in sorted(services, key=_spawn_rank):
            if service.name in already_running:
                continue
            try:
                started[service.name] = _spawn(service)
            except (StackError, RuntimeError, OSError) as error:
                message = str(error)
                if not message.startswith(f"{service.name}:"):
                    message = f"{service.name}: {message}"
                log.error("%s: failed to start: %s", service.name, error)
                failed[service.name] = ServiceStatus(service.name, "failed", None, service.address(),
                                                     service.log_path, error=message)

        rows = []
        for service in services:
            if service.name in failed:
                rows.append(failed[service.name])
            elif service.name in already_running:
                rows.append(_wait_ready(service, already_running[service.name], log_offset=None))
            else:
                record, offset = started[service.name]
                rows.append(_wait_ready(service, record, log_offset=offset))
        return rows


def _spawn_rank(service: Service) -> int:
    return SPAWN_ORDER.index(service.name) if service.name in SPAWN_ORDER else len(SPAWN_ORDER)


def _spawn(service: Service) -> tuple[PidRecord, int]:
    service.folder.mkdir(parents=True, exist_ok=True)
    offset = file_size(service.log_path)
    service.prepare()
    record = spawn(service.command(), service.log_path, service.address(), cwd=service.folder,
                   env=service.environment())
    write_pid_file(service.pid_path, record)
    log.info("%s: started pid %d on %s, logging to %s", service.name, record.pid, record.address,
             service.log_path)
    return record, offset


def _wait_ready(service: Service, record: PidRecord, log_offset: int | None) -> ServiceStatus:
    """Poll ``service`` until it responds, its process exits, or its start timeout passes.

    ``log_offset`` is where this start began writing the log, or None for a service that was
    already running. A service that this call started and that never responds is stopped again.
    """
    note = "started" if log_offset is not None else "already running"
    timeout_seconds = service.start_timeout_seconds
    deadline = time.monotonic() + timeout_seconds
    max_polls = int(timeout_seconds / READY_POLL_INTERVAL_SECONDS) + 2
    problem = f"did not respond within {timeout_seconds:.0f} s"
    for _ in range(max_polls):
        if service.probe():
            address_note = _address_note(service, record)
            return ServiceStatus(service.name, "running", record.pid, record.address, service.log_path,
                                 note="; ".join(filter(None, [note, address_note])))
        if not is_running(record):
            problem = "exited before it was ready"
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(READY_POLL_INTERVAL_SECONDS)

    started_here = log_offset is not None
    if started_here and is_running(record):
        stop(record, service.stop_timeout_seconds)
    if started_here:
        remove_pid_file(service.pid_path)
    tail = log_tail(service.log_path, LOG_TAIL_LINES, from_offset=log_offset or 0)
    error = (f"{service.name} (pid {record.pid}) {problem}; read {service.log_path}. "
             f"Its last lines:\n{tail}")
    log.error("%s: %s; see %s", service.name, problem, service.log_path)
    # A service that was already running and still runs is left alone: it may only be slow.
    still_running = not started_here and is_running(record)
    return ServiceStatus(service.name, "not ready" if still_running else "failed",
                         record.pid if still_running else None, record.address, service.log_path,
                         note=note, error=error)


def _address_note(service: Service, record: PidRecord) -> str:
    if record.address == service.address():
        return ""
    return f"runs on {record.address} but the config names {service.address()}; run down and up to apply"


def down(stack: StackConfig, services: list[Service]) -> list[ServiceStatus]:
    """Stop each service from its pid file: SIGTERM to its process group, a bounded wait, then SIGKILL."""
    rows = []
    with exclusive_lock(lock_path(stack)):
        for service in services:
            record = read_pid_file(service.pid_path)
            if record is None:
                rows.append(ServiceStatus(service.name, "stopped", None, service.address(), service.log_path,
                                          note="was not running"))
                continue
            try:
                outcome = stop(record, service.stop_timeout_seconds)
            except StackError as error:
                rows.append(ServiceStatus(service.name, "failed", record.pid, record.address, service.log_path,
                                          error=f"{service.name}: {error}"))
                continue
            remove_pid_file(service.pid_path)
            note = {"stopped": "stopped", "killed": "killed after the stop timeout",
                    "not running": "was not running (stale pid file removed)"}[outcome]
            log.info("%s: %s (pid %d)", service.name, note, record.pid)
            rows.append(ServiceStatus(service.name, "stopped", None, record.address, service.log_path, note=note))
    return rows
