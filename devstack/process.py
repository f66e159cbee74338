"""Processes that the local stack starts: pid files, detached start, loopback ports and stop by pid.

Every service runs in its own session (``start_new_session=True``), so it outlives the command that
started it and is the leader of its own process group. A pid file records the pid together with the
process start time from ``/proc/<pid>/stat``. A pid that the kernel has reused for another process
therefore never counts as ours, and ``stop`` never signals a process that the stack did not start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
POLL_INTERVAL_SECONDS = 0.2


class StackError(RuntimeError):
    """A failed local stack operation. The message names the service, the value and what to do."""


@dataclass(frozen=True)
class PidRecord:
    """The content of a pid file: a process that the stack started."""

    pid: int
    start_ticks: int | None
    """Start time of the process in clock ticks after boot (``/proc/<pid>/stat`` field 22)."""
    command: list
    address: str
    """Listening address of the service, as host:port."""
    started_at: str
    """Wall-clock start time, ISO-8601 UTC."""


def write_pid_file(path: Path, record: PidRecord) -> None:
    """Write ``record`` to ``path`` atomically (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(asdict(record)) + "\n", encoding="utf-8")
    partial.replace(path)


def read_pid_file(path: Path) -> PidRecord | None:
    """Return the record in ``path``, or None when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return PidRecord(pid=int(data["pid"]), start_ticks=data.get("start_ticks"),
                         command=list(data.get("command", [])), address=str(data.get("address", "")),
                         started_at=str(data.get("started_at", "")))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:
        log.warning("ignoring invalid pid file %s: %s", path, error)
        return None


def remove_pid_file(path: Path) -> None:
    """Delete ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Return the fields of ``/proc/<pid>/stat`` after the command name, or None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    return raw.rsplit(")", 1)[1].split()


def process_start_ticks(pid: int) -> int | None:
    """Return the start time of ``pid`` in clock ticks after boot, or None without /proc."""
    fields = _proc_stat_fields(pid)
    # After the name, index 0 is field 3 (state), so field 22 (starttime) is index 19.
    return int(fields[19]) if fields and len(fields) > 19 else None


def is_alive(pid: int) -> bool:
    """Return whether ``pid`` exists and is not a zombie (exited but not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat_fields(pid)
    return not (fields and fields[0] in ("Z", "X"))


def is_running(record: PidRecord) -> bool:
    """Return whether the process of ``record`` still runs and is the one the stack started."""
    if not is_alive(record.pid):
        return False
    if record.start_ticks is None:
        return True
    return process_start_ticks(record.pid) == record.start_ticks


def spawn(command: Sequence[str], log_path: Path, address: str, cwd: Path,
          env: Mapping[str, str] | None = None) -> PidRecord:
    """Start ``command`` detached in its own session, appending stdout and stderr to ``log_path``.

    NOTE: the log file is never rotated; it grows across starts until it is deleted while the
    service is stopped.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n===== {started_at} starting: {' '.join(command)}\n".encode())
        log_file.flush()
        process = subprocess.Popen(list(command), cwd=cwd, env=dict(env) if env is not None else None,
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True, close_fds=True)
    return PidRecord(pid=process.pid, start_ticks=process_start_ticks(process.pid), command=list(command),
                     address=address, started_at=started_at)


def _reap(pid: int) -> None:
    """Collect the exit status of ``pid`` when it is a child of this process, so it is no zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _group_alive(pgid: int) -> bool:
    """Return whether a process of group ``pgid`` that is not a zombie still exists."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat_fields(int(entry.name))
        # Index 2 is field 5, the process group id.
        if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _signal(record: PidRecord, group: bool, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(record.pid, signum)
        else:
            os.kill(record.pid, signum)


def stop(record: PidRecord, timeout_seconds: float) -> str:
    """Stop the process of ``record`` and its process group: SIGTERM, a bounded wait, then SIGKILL.

    Returns "not running", "stopped" or "killed". A process whose start time differs from the
    record (the pid was reused) is left alone and counts as not running.
    """
    if not is_running(record):
        _reap(record.pid)
        return "not running"

    # The service was started with start_new_session=True, so it leads a group of its own. Signal
    # the whole group, so that workers it forked (MLflow's uvicorn process) stop with it.
    try:
        group = os.getpgid(record.pid) == record.pid
    except ProcessLookupError:
        return "not running"

    def gone() -> bool:
        _reap(record.pid)
        return not is_alive(record.pid) and not (group and _group_alive(record.pid))

    _signal(record, group, signal.SIGTERM)
    if wait_until(gone, timeout_seconds):
        return "stopped"

    log.warning("pid %d did not exit %.0f s after SIGTERM; sending SIGKILL", record.pid, timeout_seconds)
    _signal(record, group, signal.SIGKILL)
    if not wait_until(gone, 10.0):
        raise StackError(f"pid {record.pid} is still alive 10 s after SIGKILL; check it with ps -o stat -p "
                         f"{record.pid} (a process stuck in uninterruptible sleep cannot be killed)")
    return "killed"


def wait_until(condition: Callable[[], bool], timeout_seconds: float,
               interval_seconds: float = POLL_INTERVAL_SECONDS) -> bool:
    """Poll ``condition`` until it returns True or ``timeout_seconds`` pass, and return its last result."""
    deadline = time.monotonic() + timeout_seconds
    max_polls = int(timeout_seconds / interval_seconds) + 2
    for _ in range(max_polls):
        if condition():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(interval_seconds)
    return condition()


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """Return whether binding ``host:port`` fails because another socket already uses the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR lets the bind succeed over connections in TIME_WAIT left by a stopped service.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def port_accepts(port: int, host: str = LOOPBACK, timeout_seconds: float = 1.0) -> bool:
    """Return whether a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_seconds):
            return True
    except OSError:
        return False


def port_owner(port: int) -> str | None:
    """Describe the process listening on TCP ``port`` as "pid N (name)", or None if not found.

    Reads /proc/net/tcp{,6} and the open sockets of each process, so it finds only processes that
    this user may inspect.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            columns = line.split()
            # Column 1 is the local address as hex ip:port, column 3 the state (0A is LISTEN) and
            # column 9 the socket inode.
            if len(columns) > 9 and columns[3] == "0A" and int(columns[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{columns[9]}]")
    if not inodes:
        return None

    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    name = (entry / "comm").read_text(encoding="utf-8").strip()
                    return f"pid {entry.name} ({name})"
        except OSError:
            continue
    return None


def log_tail(path: Path, max_lines: int = 20, from_offset: int = 0) -> str:
    """Return the last ``max_lines`` lines of ``path`` written after byte ``from_offset``."""
    try:
        with open(path, "rb") as handle:
            handle.seek(from_offset)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError as error:
        return f"(cannot read {path}: {error.strerror})"
    lines = text.rstrip("\n").splitlines()[-max_lines:]
    return "\n".join(lines) if lines else "(the log is empty)"


def file_size(path: Path) -> int:
    """Return the size of ``path`` in bytes, 0 when it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@contextlib.contextmanager
def exclusive_lock(path: Path, timeout_seconds: float = 300.0) -> Iterator[None]:
    """Hold an exclusive flock on ``path``, so that two commands never start or stop one stack at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:

        def acquired() -> bool:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        if not wait_until(acquired, timeout_seconds, interval_seconds=0.5):
            raise StackError(f"another streamrec-stack command has held {path} for {timeout_seconds:.0f} s; "
                             "wait for it to finish and retry")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
