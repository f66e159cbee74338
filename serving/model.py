"""The model the scorer serves: loaded by registry alias, polled, swapped without a restart.

Each worker keeps one ``ServedModel``: the native LightGBM booster, its feature order, the
feature-set version it was trained on (the model version's tag) and the artifacts logged with it:
the popularity snapshot (the fallback ranking when Redis is out of reach) and the item
co-occurrence lists (candidates). A background thread asks the registry every
``serving.model_poll_seconds`` which version the alias points at, loads a new one completely, then
replaces the reference in one assignment, so a request sees either the old model or the new one,
never a mix.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger("serving.model")


@dataclass(frozen=True)
class ServedModel:
    """One loaded model version and what came with it."""

    name: str
    version: str
    feature_set_version: str
    booster: object
    feature_names: tuple
    popularity: tuple
    cooccurrence: dict
    loaded_at: float


class ModelHolder:
    """Keep the model behind ``alias`` loaded; ``current`` is None until a first load succeeds."""

    def __init__(self, tracking_uri: str, name: str, alias: str, poll_seconds: float):
        self.tracking_uri = tracking_uri
        self.name = name
        self.alias = alias
        self.poll_seconds = poll_seconds
        self.current: Optional[ServedModel] = None
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def refresh(self) -> bool:
        """Load the alias's version when it differs from the one served; return whether it changed."""
        with self._lock:
            try:
                client = self._client()
                version = client.get_model_version_by_alias(self.name, self.alias)
            except Exception as error:  # noqa: BLE001 - any registry failure keeps the served model
                self.error = (f"model {self.name!r} alias {self.alias!r} is not available from the tracking "
                              f"server {self.tracking_uri}: {str(error).splitlines()[0][:200]}")
                if self.current is None:
                    log.warning("%s", self.error)
                return False
            if self.current is not None and self.current.version == str(version.version):
                self.error = None
                return False
            try:
                loaded = self._load(client, version)
            except Exception as error:  # noqa: BLE001 - a broken version must not take down the served one
                self.error = f"model {self.name} version {version.version} could not be loaded: {error}"
                log.error("%s", self.error)
                return False
            previous = self.current.version if self.current else None
            self.current = loaded
            self.error = None
            log.info("serving model %s version %s (feature set %s), was %s", self.name, loaded.version,
                     loaded.feature_set_version, previous)
            return True

    def _load(self, client, version) -> ServedModel:
        import mlflow
        import mlflow.lightgbm

        mlflow.set_tracking_uri(self.tracking_uri)
        booster = mlflow.lightgbm.load_model(f"models:/{self.name}/{version.version}")
        feature_set_version = version.tags.get("feature_set_version")
        if not feature_set_version:
            raise ValueError(f"model version {version.version} has no feature_set_version tag")
        popularity = _artifact_json(version.run_id, "popularity.json", self.tracking_uri)
        cooccurrence = _artifact_json(version.run_id, "cooccurrence.json", self.tracking_uri)
        ranked = sorted(popularity.get("events", {}).items(), key=lambda pair: (-pair[1], pair[0]))
        return ServedModel(self.name, str(version.version), feature_set_version, booster,
                           tuple(booster.feature_name()), tuple(item for item, _count in ranked),
                           {item: [pair[0] for pair in pairs] for item, pairs in cooccurrence.items()}, time.time())

    def start(self) -> None:
        """Load once now, then poll in a daemon thread (call in each worker, after the fork)."""
        self.refresh()
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="model-poll", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()


def _artifact_json(run_id: str, path: str, tracking_uri: str) -> dict:
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=tracking_uri)
    with open(local, encoding="utf-8") as handle:
        return json.load(handle)
