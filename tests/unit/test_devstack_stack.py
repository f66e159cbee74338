"""up / status / down of the local stack, driven with small Python processes in place of the services."""

import dataclasses
import re
import socket
import sys

import pytest

from devstack import cli, process, stack
from devstack.process import StackError
from devstack.service import Service
from reccore.config import StackConfig


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ListenerService(Service):
    """A stand-in service: a Python process that listens on redis_port until it is stopped."""

    name = "listener"
    start_timeout_seconds = 10.0
    stop_timeout_seconds = 5.0

    def ports(self):
        return {"redis_port": self.stack.redis_port}

    def command(self):
        code = ("import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                f"s.bind(('127.0.0.1', {self.stack.redis_port})); s.listen(); time.sleep(60)")
        return [sys.executable, "-c", code]

    def probe(self):
        return process.port_accepts(self.stack.redis_port, timeout_seconds=0.5)


class CrashingService(ListenerService):
    name = "crashing"

    def command(self):
        return [sys.executable, "-c", "import sys; print('invalid setting maxmemory'); sys.exit(3)"]


class SilentService(ListenerService):
    """A stand-in that runs but never passes its readiness probe."""

    name = "silent"
    start_timeout_seconds = 1.0

    def command(self):
        return [sys.executable, "-c", "import time; time.sleep(60)"]

    def probe(self):
        return False


@pytest.fixture
def stack_config(tmp_path):
    return StackConfig(home=str(tmp_path / "stack"), redis_port=free_port())


@pytest.fixture
def started(stack_config):
    """Collect the services a test starts, and stop them all when it ends."""
    services = []
    yield services
    stack.down(stack_config, services)


def test_up_starts_and_down_stops(stack_config, started):
    service = ListenerService(stack_config)
    started.append(service)

    [row] = stack.up(stack_config, [service])
    pid = row.pid

    assert row.state == "running"
    assert row.note == "started"
    assert row.address == f"127.0.0.1:{stack_config.redis_port}"
    assert process.read_pid_file(service.pid_path).pid == pid

    [row] = stack.down(stack_config, [service])

    assert row.state == "stopped"
    assert row.note == "stopped"
    assert not process.is_alive(pid)
    assert not service.pid_path.exists()


def test_up_again_keeps_same_pid(stack_config, started):
    service = ListenerService(stack_config)
    started.append(service)

    [first] = stack.up(stack_config, [service])
    [second] = stack.up(stack_config, [service])

    assert second.state == "running"
    assert second.note == "already running"
    assert second.pid == first.pid


def test_status_reports_running_and_stopped(stack_config, started):
    service = ListenerService(stack_config)
    started.append(service)

    [before] = stack.status([service])
    stack.up(stack_config, [service])
    [after] = stack.status([service])

    assert before.state == "stopped"
    assert not before.is_up
    assert after.state == "running"
    assert after.is_up
    assert after.log_path == service.log_path


def test_status_notes_stale_pid_file(stack_config):
    service = ListenerService(stack_config)
    dead = process.spawn([sys.executable, "-c", "pass"], service.log_path, "127.0.0.1:1", cwd=service.log_path.parent)
    process.write_pid_file(service.pid_path, dead)
    assert process.wait_until(lambda: not process.is_running(dead), 10.0)

    [row] = stack.status([service])

    assert row.state == "stopped"
    assert f"stale pid file (pid {dead.pid}" in row.note


def test_crash_reports_log_tail(stack_config, started):
    service = CrashingService(stack_config)
    started.append(service)

    [row] = stack.up(stack_config, [service])

    assert row.state == "failed"
    assert "crashing" in row.error
    assert "exited before it was ready" in row.error
    assert str(service.log_path) in row.error
    assert "invalid setting maxmemory" in row.error
    assert not service.pid_path.exists()


def test_unanswered_start_times_out_and_stops(stack_config, started):
    service = SilentService(stack_config)
    started.append(service)

    [row] = stack.up(stack_config, [service])

    assert row.state == "failed"
    assert "did not respond within 1 s" in row.error
    assert not service.pid_path.exists()
    pid = int(re.search(r"\(pid (\d+)\)", row.error).group(1))
    assert not process.is_alive(pid)


def test_taken_port_starts_nothing(stack_config):
    service = ListenerService(stack_config)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", stack_config.redis_port))
        squatter.listen()

        with pytest.raises(StackError) as raised:
            stack.up(stack_config, [service])
        [row] = stack.status([service])

    message = str(raised.value)
    assert f"port {stack_config.redis_port}" in message
    assert "STREAMREC_REDIS_PORT" in message
    assert not service.pid_path.exists()
    assert row.state == "stopped"
    assert f"port {stack_config.redis_port} is in use" in row.note


def test_up_rejects_changed_port(stack_config, started):
    service = ListenerService(stack_config)
    started.append(service)
    [row] = stack.up(stack_config, [service])
    moved = ListenerService(dataclasses.replace(stack_config, redis_port=free_port()))

    with pytest.raises(StackError) as raised:
        stack.up(stack_config, [moved])

    assert f"pid {row.pid} runs on {row.address}" in str(raised.value)
    assert "down --only listener" in str(raised.value)
    assert process.is_alive(row.pid)


def test_down_without_pid_file(stack_config):
    [row] = stack.down(stack_config, [ListenerService(stack_config)])

    assert row.state == "stopped"
    assert row.note == "was not running"


def test_build_services_rejects_unknown_name():
    with pytest.raises(StackError, match="unknown service"):
        stack.build_services(StackConfig(), ["kafka", "zookeeper"])


def test_build_services_keeps_canonical_order():
    services = stack.build_services(StackConfig(), ["mlflow", "kafka"])

    assert [service.name for service in services] == ["kafka", "mlflow"]


def test_relative_home_under_project_root():
    [service] = stack.build_services(StackConfig(home=".work/stack"), ["redis"])

    assert service.folder.is_absolute()
    assert service.folder.parts[-3:] == (".work", "stack", "redis")


def test_cli_rejects_unknown_service(capsys):
    assert cli.main(["status", "--only", "kafka,nope"]) == 1
    assert "unknown service(s) nope" in capsys.readouterr().err


def test_format_table_aligns_columns():
    table = cli.format_table(("SERVICE", "PID"), [("kafka", 12), ("mlflow", None)])

    assert table.splitlines() == ["SERVICE  PID", "kafka    12", "mlflow   -"]
