"""Pid files, detached processes, loopback ports and locks of the local stack, with throwaway processes."""

import os
import socket
import subprocess
import sys
import time

import pytest

from devstack import process
from devstack.process import PidRecord, StackError

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def record_for(pid: int, start_ticks: int | None = None, address: str = "127.0.0.1:1") -> PidRecord:
    ticks = process.process_start_ticks(pid) if start_ticks is None else start_ticks
    return PidRecord(pid=pid, start_ticks=ticks, command=["test"], address=address, started_at="2026-01-01T00:00:00")


@pytest.fixture
def spawned(tmp_path):
    """Spawn throwaway processes through process.spawn and kill whatever is left of their groups."""
    records = []

    def start(command, log_name="child.log"):
        record = process.spawn(command, tmp_path / log_name, "127.0.0.1:0", cwd=tmp_path)
        records.append(record)
        return record

    yield start
    for record in records:
        if process.is_running(record):
            os.killpg(record.pid, 9)
        process.wait_until(lambda: not process.is_alive(record.pid), 5.0)


def test_pid_file_round_trip(tmp_path):
    path = tmp_path / "run" / "kafka.pid"
    record = PidRecord(pid=4321, start_ticks=99, command=["java", "kafka.Kafka"], address="127.0.0.1:9092",
                       started_at="2026-01-01T00:00:00+00:00")

    process.write_pid_file(path, record)

    assert process.read_pid_file(path) == record


def test_pid_file_missing_or_invalid(tmp_path):
    invalid = tmp_path / "invalid.pid"
    invalid.write_text("not json", encoding="utf-8")

    assert process.read_pid_file(tmp_path / "missing.pid") is None
    assert process.read_pid_file(invalid) is None


def test_is_running_rejects_reused_pid():
    own_ticks = process.process_start_ticks(os.getpid())

    assert process.is_running(record_for(os.getpid()))
    assert not process.is_running(record_for(os.getpid(), start_ticks=own_ticks + 1))


def test_stop_leaves_reused_pid_alone(spawned):
    record = spawned(SLEEPER)
    other_process = record_for(record.pid, start_ticks=record.start_ticks + 1)

    assert process.stop(other_process, timeout_seconds=1.0) == "not running"
    assert process.is_alive(record.pid)


def test_spawn_survives_in_own_session(spawned):
    record = spawned(SLEEPER)

    assert process.is_running(record)
    assert os.getsid(record.pid) == record.pid
    assert os.getpgid(record.pid) == record.pid


def test_stop_terminates_process_group(spawned, tmp_path):
    child_pid_file = tmp_path / "child.pid"
    record = spawned(["sh", "-c", f"sleep 60 & echo $! > {child_pid_file}; wait"])
    child_pid_written = process.wait_until(lambda: child_pid_file.is_file() and child_pid_file.read_text().strip(), 5.0)
    assert child_pid_written
    child_pid = int(child_pid_file.read_text())
    assert process.is_alive(child_pid)

    assert process.stop(record, timeout_seconds=5.0) == "stopped"
    assert not process.is_alive(record.pid)
    assert not process.is_alive(child_pid)


def test_stop_kills_after_timeout(spawned, tmp_path):
    ignore_term = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "print('term', 'ignored', flush=True); time.sleep(60)")
    record = spawned([sys.executable, "-c", ignore_term])
    # The log's header line repeats the command, so wait for the printed form, which differs from it.
    assert process.wait_until(lambda: "term ignored" in (tmp_path / "child.log").read_text(), 10.0)

    started = time.monotonic()
    outcome = process.stop(record, timeout_seconds=0.5)

    assert outcome == "killed"
    assert not process.is_alive(record.pid)
    assert time.monotonic() - started < 10.0


def test_spawn_appends_output_to_log(spawned, tmp_path):
    record = spawned([sys.executable, "-c", "print('first line'); print('second line')"])
    assert process.wait_until(lambda: not process.is_running(record), 10.0)

    text = (tmp_path / "child.log").read_text()
    assert "starting:" in text
    assert text.rstrip().endswith("second line")


def test_port_in_use_and_owner():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        assert process.port_in_use(port)
        assert process.port_accepts(port)
        assert process.port_owner(port) == f"pid {os.getpid()} ({open('/proc/self/comm').read().strip()})"

    assert not process.port_in_use(port)
    assert not process.port_accepts(port)


def test_log_tail_from_offset(tmp_path):
    path = tmp_path / "service.log"
    path.write_text("old run\n", encoding="utf-8")
    offset = process.file_size(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(f"line {number}\n" for number in range(30)))

    tail = process.log_tail(path, max_lines=3, from_offset=offset)

    assert tail == "line 27\nline 28\nline 29"
    assert "old run" not in process.log_tail(path, max_lines=100, from_offset=offset)
    assert process.log_tail(tmp_path / "missing.log").startswith("(cannot read")


def test_wait_until_is_bounded():
    calls = []
    started = time.monotonic()

    def never_true() -> bool:
        calls.append(1)
        return False

    assert not process.wait_until(never_true, timeout_seconds=0.3, interval_seconds=0.05)
    assert time.monotonic() - started < 2.0
    assert len(calls) <= 0.3 / 0.05 + 3


def test_exclusive_lock_times_out(tmp_path):
    path = tmp_path / "stack.lock"
    with process.exclusive_lock(path):
        with pytest.raises(StackError, match="stack.lock"):
            with process.exclusive_lock(path, timeout_seconds=0.3):
                pass

    with process.exclusive_lock(path, timeout_seconds=0.3):
        pass


def test_is_alive_false_for_zombie():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert process.wait_until(lambda: open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
                              10.0)

    assert not process.is_alive(child.pid)
    child.wait(timeout=5)
