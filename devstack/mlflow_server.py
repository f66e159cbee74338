"""The MLflow tracking server from the project's Python environment, on loopback.

Runs and registered models go to a SQLite database, and artifacts to a folder that the server
itself serves (``--serve-artifacts``), so clients need only the one HTTP tracking URI.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import urllib.error
import urllib.request

from devstack.process import LOOPBACK, StackError
from devstack.service import Service

HEALTH_TIMEOUT_SECONDS = 2.0


def mlflow_command(python: str, port: int, database: str, artifacts_dir: str) -> list[str]:
    """Return the ``mlflow server`` argv: SQLite backend, proxied local artifacts, one worker."""
    return [python, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", str(port),
            "--backend-store-uri", f"sqlite:///{database}",
            "--serve-artifacts", "--artifacts-destination", artifacts_dir,
            # One worker is enough for the jobs and the scorer on one machine, and spares memory.
            "--workers", "1"]


def mlflow_health(port: int, host: str = LOOPBACK, timeout_seconds: float = HEALTH_TIMEOUT_SECONDS) -> bool:
    """Return whether ``http://host:port/health`` replies 200."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=timeout_seconds) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class MlflowServer(Service):
    """The tracking server, with mlflow.db and the artifacts folder under the stack home."""

    name = "mlflow"
    stop_timeout_seconds = 15.0

    def __init__(self, stack):
        super().__init__(stack)
        self.start_timeout_seconds = float(stack.mlflow_start_timeout_seconds)
        self.database_path = self.folder / "mlflow.db"
        self.artifacts_dir = self.folder / "artifacts"

    def ports(self) -> dict[str, int]:
        return {"mlflow_port": self.stack.mlflow_port}

    def prepare(self) -> None:
        if importlib.util.find_spec("mlflow") is None:
            raise StackError(f"mlflow: the mlflow package is not installed for {sys.executable}; "
                             "install the project with its serving extra (pip install -e '.[serving]')")
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return mlflow_command(sys.executable, self.stack.mlflow_port, str(self.database_path),
                              str(self.artifacts_dir))

    def environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        # MLflow 3 also starts a job runner for its GenAI jobs (prompt optimization, trace rollups),
        # seven huey worker processes with mlflow 3.17.2, which the recommender does not use. An
        # explicit setting in the caller's environment still wins.
        environment.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        return environment

    def probe(self) -> bool:
        return mlflow_health(self.stack.mlflow_port)
