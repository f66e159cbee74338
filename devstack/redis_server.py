"""redis-server from the OS packages, run on loopback with append-only persistence and no eviction."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess

from devstack.process import LOOPBACK, StackError
from devstack.service import Service

log = logging.getLogger(__name__)

APT_PACKAGE = "redis-server"
INSTALL_TIMEOUT_SECONDS = 600.0
PING_TIMEOUT_SECONDS = 1.0


def ensure_redis_server() -> str:
    """Return the path of redis-server, installing the Debian package when it is missing and the user is root."""
    path = shutil.which("redis-server")
    if path:
        return path
    if os.geteuid() != 0:
        raise StackError("redis: redis-server is not on PATH and this user cannot install it; "
                         f"run `sudo apt-get install -y --no-install-recommends {APT_PACKAGE}` and retry")

    # NOTE: on a machine with an init system, the package's post-install script may also start a
    # system-wide redis on port 6379. `up` then reports that port as taken when the stack uses it.
    install = ["apt-get", "install", "-y", "--no-install-recommends", APT_PACKAGE]
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log.info("redis: redis-server is missing; running %s", " ".join(install))
    try:
        result = subprocess.run(install, env=environment, capture_output=True, text=True,
                                timeout=INSTALL_TIMEOUT_SECONDS, check=False)
        if result.returncode != 0:
            # A fresh machine may have no package lists yet, so fetch them once and retry.
            log.info("redis: apt-get install failed (exit %d); running apt-get update and retrying",
                     result.returncode)
            subprocess.run(["apt-get", "update", "-qq"], env=environment, capture_output=True,
                           timeout=INSTALL_TIMEOUT_SECONDS, check=False)
            result = subprocess.run(install, env=environment, capture_output=True, text=True,
                                    timeout=INSTALL_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise StackError(f"redis: `{' '.join(install)}` timed out after {INSTALL_TIMEOUT_SECONDS:.0f} s") from None
    if result.returncode != 0:
        raise StackError(f"redis: `{' '.join(install)}` failed (exit {result.returncode}):\n"
                         f"{(result.stdout + result.stderr).strip()[-2000:]}")

    path = shutil.which("redis-server")
    if not path:
        raise StackError(f"redis: {APT_PACKAGE} was installed but redis-server is still not on PATH")
    return path


def redis_command(executable: str, port: int, data_dir: str, maxmemory_mb: int) -> list[str]:
    """Return the redis-server argv: loopback only, append-only file, noeviction, in the foreground."""
    return [executable, "--bind", LOOPBACK, "--port", str(port), "--dir", data_dir,
            "--appendonly", "yes", "--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", "noeviction",
            # The stack records the pid and sends stdout to the log file, so redis stays in the foreground.
            "--daemonize", "no", "--protected-mode", "yes"]


def redis_ping(port: int, host: str = LOOPBACK, timeout_seconds: float = PING_TIMEOUT_SECONDS) -> bool:
    """Return whether the server at ``host:port`` replies +PONG to an inline PING."""
    try:
        with socket.create_connection((host, port), timeout=timeout_seconds) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer(Service):
    """The online store's redis-server, with its data folder under the stack home."""

    name = "redis"
    start_timeout_seconds = 15.0
    stop_timeout_seconds = 15.0

    def __init__(self, stack):
        super().__init__(stack)
        self.data_dir = self.folder / "data"
        self._executable: str | None = None

    def ports(self) -> dict[str, int]:
        return {"redis_port": self.stack.redis_port}

    def prepare(self) -> None:
        self._executable = ensure_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        executable = self._executable or ensure_redis_server()
        return redis_command(executable, self.stack.redis_port, str(self.data_dir), self.stack.redis_maxmemory_mb)

    def probe(self) -> bool:
        return redis_ping(self.stack.redis_port)
