"""The model the scorer serves: loaded by registry alias, polled, swapped without a restart.

Each worker keeps one ``ServedModel``: the native LightGBM booster, its feature order, the
feature-set version it was trained on (the model version's tag) and the artifacts logged with it:
the popularity snapshot (the fallback ranking when Redis is out of reach) and the item
co-occurrence lists (candidates). A background thread asks the registry every
``serving.model_poll_seconds`` which version the alias points at, loads a new one completely, then
replaces the reference in one assignment, so a request sees either the old model or the new one,
never a mix.

``predictor`` is what scores: the native booster at first, then, with ``serving.compiled_predictor``,
the version compiled by lleaves (``serving.compiled``). A thread of the holder's own builds it after
the swap, so a new version never waits for its compile. When it is ready, ``current`` is replaced by
a copy whose predictor is the compiled one (again one assignment). When the build fails, the error
is logged with the model version and the native booster goes on serving that version.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from serving.compiled import NativePredictor, PredictorCompiler

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
    # NativePredictor(booster) or, once built, a CompiledPredictor of the same version.
    predictor: object


class ModelHolder:
    """Keep the model behind ``alias`` loaded; ``current`` is None until a first load succeeds.

    With a ``compiler``, each version served gets its compiled predictor built in the background.
    ``compile_listener(outcome, seconds)``, when set, is called once per build with the outcome
    "compiled", "cache" or "failed".
    """

    def __init__(self, tracking_uri: str, name: str, alias: str, poll_seconds: float,
                 compiler: Optional[PredictorCompiler] = None):
        self.tracking_uri = tracking_uri
        self.name = name
        self.alias = alias
        self.poll_seconds = poll_seconds
        self.compiler = compiler
        self.compile_listener: Optional[Callable[[str, float], None]] = None
        self.current: Optional[ServedModel] = None
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._compile_queue: queue.Queue = queue.Queue()
        self._compile_thread: Optional[threading.Thread] = None

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
            self._serve(loaded)
            self.error = None
            return True

    def serve(self, model: ServedModel) -> None:
        """Serve ``model`` from now on and build its compiled predictor in the background."""
        with self._lock:
            self._serve(model)

    def _serve(self, model: ServedModel) -> None:
        previous = self.current.version if self.current else None
        self.current = model
        _refreeze()
        log.info("serving model %s version %s (feature set %s, %s predictor), was %s", model.name, model.version,
                 model.feature_set_version, model.predictor.kind, previous)
        if self.compiler is not None and model.predictor.kind == "native":
            if self._compile_thread is None:
                self._compile_thread = threading.Thread(target=self._compile_loop, name="predictor-compile",
                                                        daemon=True)
                self._compile_thread.start()
            self._compile_queue.put(model)

    def _compile_loop(self) -> None:
        """Build the compiled predictor of each model queued, one at a time, skipping versions already replaced."""
        while not self._stop.is_set():
            model = self._compile_queue.get()
            if model is None or self._stop.is_set():
                return
            if self.current is not model:
                log.info("model %s version %s: no longer served; its predictor is not compiled", model.name,
                         model.version)
                continue
            self._build_compiled(model)

    def _build_compiled(self, model: ServedModel) -> None:
        started = time.monotonic()
        try:
            built = self.compiler.build(model.name, model.version, model.booster)
        except Exception as error:  # noqa: BLE001 - any failure leaves the native booster serving
            # NOTE: not retried. The native booster serves this version in this worker until the
            # worker restarts or the alias moves, also after a passing cause such as a full disk.
            seconds = time.monotonic() - started
            log.error("model %s version %s: compiled predictor failed after %.1f s (%s); the native booster "
                      "keeps serving", model.name, model.version, seconds, error)
            self._notify("failed", seconds)
            return
        self._notify(built.outcome, built.seconds)
        with self._lock:
            if self.current is not model:
                log.info("model %s version %s: compiled predictor ready but version %s is served now; discarded",
                         model.name, model.version, self.current.version if self.current else None)
                return
            self.current = dataclasses.replace(model, predictor=built.predictor)
        _refreeze()
        log.info("model %s version %s: the compiled predictor serves now", model.name, model.version)

    def _notify(self, outcome: str, seconds: float) -> None:
        if self.compile_listener is None:
            return
        try:
            self.compile_listener(outcome, seconds)
        except Exception:  # noqa: BLE001 - a metrics failure must not stop the compile thread
            log.exception("compile listener failed for outcome %s", outcome)

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
                           {item: [pair[0] for pair in pairs] for item, pairs in cooccurrence.items()}, time.time(),
                           NativePredictor(booster))

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
        """Stop polling and compiling; a compile child process already started runs to its end."""
        self._stop.set()
        self._compile_queue.put(None)


def _artifact_json(run_id: str, path: str, tracking_uri: str) -> dict:
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=tracking_uri)
    with open(local, encoding="utf-8") as handle:
        return json.load(handle)


def _refreeze() -> None:
    """Keep a frozen heap frozen: move the objects of a newly served model out of the collector's walks.

    conf/gunicorn.conf.py freezes each worker's heap once the app is loaded (``gc.freeze``), because
    full collections over the 260,000 objects of the imports took 90 to 600 ms and pushed requests
    past their budget. A model loaded later would be walked again; freezing is cheap (no walk).
    Processes that never froze (tests, scripts) are left alone.
    NOTE: cyclic garbage alive at the moment of freezing (parts of the model replaced) is never freed.
    """
    if gc.get_freeze_count():
        gc.freeze()
