"""The scorer under gunicorn, started by the demo in a process group of its own, and a small HTTP client for it."""

from __future__ import annotations

import http.client
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from reccore.config import PROJECT_ROOT

from demo.console import DemoError

log = logging.getLogger("demo.scorer")

READY_POLL_SECONDS = 0.5
STOP_TIMEOUT_SECONDS = 30.0
REQUEST_TIMEOUT_SECONDS = 10.0


class Scorer:
    """``gunicorn -c conf/gunicorn.conf.py serving.wsgi:app`` with the demo's settings in STREAMREC__* variables."""

    def __init__(self, host: str, port: int, settings: dict, log_path: Path, metrics_dir: Path):
        self.host = host
        self.port = port
        self.log_path = log_path
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        for dotted, value in settings.items():
            self.env["STREAMREC__" + dotted.upper().replace(".", "__")] = str(value)
        self.record = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float) -> dict:
        """Start gunicorn and wait until /readyz returns 200; return its body."""
        from devstack.process import is_running, log_tail, spawn

        gunicorn = Path(sys.executable).with_name("gunicorn")
        command = [str(gunicorn), "-c", "conf/gunicorn.conf.py", "serving.wsgi:app"]
        self.record = spawn(command, self.log_path, f"{self.host}:{self.port}", cwd=PROJECT_ROOT, env=self.env)
        log.info("scorer: started gunicorn pid %d on %s", self.record.pid, self.url)
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        for _ in range(int(timeout_s / READY_POLL_SECONDS) + 2):
            if not is_running(self.record):
                raise DemoError(f"the scorer (gunicorn pid {self.record.pid}) exited before it was ready; read "
                                f"{self.log_path}. Its last lines:\n{log_tail(self.log_path, 15)}")
            try:
                status, body = self.get("/readyz")
            except OSError as error:
                last = str(error)
            else:
                if status == 200:
                    return body
                last = "; ".join(body.get("reasons", [])) or f"HTTP {status}"
            if time.monotonic() > deadline:
                break
            time.sleep(READY_POLL_SECONDS)
        raise DemoError(f"the scorer at {self.url} was not ready within {timeout_s:.0f} s ({last}); read "
                        f"{self.log_path}")

    def get(self, path: str) -> tuple[int, dict]:
        """Send GET ``path`` and return the status and the JSON body; raise OSError when the server is unreachable."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_SECONDS)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        try:
            body = json.loads(data) if data else {}
        except ValueError:
            body = {"error": {"message": data[:200].decode(errors="replace")}}
        return response.status, body

    def recommend(self, user_id: str, k: int) -> dict:
        """Return the scorer's response for the user's top ``k``; raise DemoError on an error status."""
        status, body = self.get(f"/v1/users/{user_id}/recommendations?k={k}")
        if status != 200:
            message = body.get("error", {}).get("message", body)
            raise DemoError(f"GET /v1/users/{user_id}/recommendations failed with status {status}: {message}")
        return body

    def stop(self) -> str:
        """Stop gunicorn and its workers (SIGTERM to the group, then SIGKILL after a bounded wait)."""
        from devstack.process import stop

        if self.record is None:
            return "not started"
        outcome = stop(self.record, STOP_TIMEOUT_SECONDS)
        self.record = None
        return outcome

    @property
    def pid(self) -> Optional[int]:
        return self.record.pid if self.record is not None else None
