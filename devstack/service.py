"""The base class of the local services: a folder under the stack home, a pid file, a log file and ports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from reccore.config import PROJECT_ROOT, StackConfig

from devstack.process import LOOPBACK

# The conf/local.yaml placeholder that sets each port, so that a port conflict names the variable to change.
PORT_VARIABLES = {
    "kafka_port": "STREAMREC_KAFKA_PORT",
    "kafka_controller_port": "STREAMREC_KAFKA_CONTROLLER_PORT",
    "redis_port": "STREAMREC_REDIS_PORT",
    "mlflow_port": "STREAMREC_MLFLOW_PORT",
}


def stack_home(stack: StackConfig) -> Path:
    """Return the stack home as an absolute path. A relative ``stack.home`` is under the project root."""
    home = Path(stack.home).expanduser()
    return home if home.is_absolute() else PROJECT_ROOT / home


class Service:
    """A process of the local stack. Subclasses set ``name`` and the timeouts and implement the hooks."""

    name: ClassVar[str] = ""
    start_timeout_seconds: float = 30.0
    stop_timeout_seconds: float = 15.0

    def __init__(self, stack: StackConfig):
        self.stack = stack
        self.folder = stack_home(stack) / self.name
        self.pid_path = self.folder / f"{self.name}.pid"
        self.log_path = self.folder / f"{self.name}.log"

    def ports(self) -> dict[str, int]:
        """Return the ports the service listens on, keyed by their StackConfig field name."""
        raise NotImplementedError

    def address(self) -> str:
        """Return host:port of the service's client endpoint."""
        return f"{LOOPBACK}:{next(iter(self.ports().values()))}"

    def prepare(self) -> None:
        """Install what is missing and write config files before each start. Raise StackError on failure."""

    def command(self) -> list[str]:
        """Return the argv that runs the service in the foreground."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Return the environment of the service process."""
        return dict(os.environ)

    def probe(self) -> bool:
        """Return whether the service is ready to serve requests now (one bounded check)."""
        raise NotImplementedError
