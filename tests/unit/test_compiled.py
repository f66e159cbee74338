"""The compiled predictor: same scores as the booster, one compile per machine, native on failure.

Real LightGBM boosters trained on random data with missing values, compiled by real lleaves in
real child processes; no services.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import lightgbm
import numpy as np
import pytest

from reccore.config import PROJECT_ROOT, load_config
from reccore.features import load_feature_set
from reccore.ranking import ManifestLayout
from reccore.store import Stamp, pack
from serving.compiled import CompileError, NativePredictor, PredictorCompiler, compile_once
from serving.model import ModelHolder, ServedModel
from serving.scoring import rank
from tests.unit.test_ranking import synthetic_booster

FEATURES = 12
# Compiled and native scores agree to a few ulp: lleaves adds the trees in another order.
TOLERANCE = 1e-12
BUILD_TIMEOUT_S = 120.0


def train_booster(seed: int = 0, **params) -> lightgbm.Booster:
    """Train a small binary model on random data where a fifth of the values are NaN (missing)."""
    generator = np.random.default_rng(seed)
    rows = generator.normal(size=(4000, FEATURES))
    rows[generator.random(rows.shape) < 0.2] = np.nan
    # A missing first feature means a high score, so the missing branches matter.
    signal = np.nan_to_num(rows[:, 0], nan=2.0) + 0.5 * np.nan_to_num(rows[:, 1]) + generator.normal(size=len(rows))
    data = lightgbm.Dataset(rows, label=(signal > 0).astype(int), feature_name=[f"f{i}" for i in range(FEATURES)])
    settings = {"objective": "binary", "num_leaves": 15, "min_data_in_leaf": 20, "verbosity": -1,
                "num_threads": 1, "seed": seed, **params}
    return lightgbm.train(settings, data, num_boost_round=60)


@pytest.fixture(scope="module")
def booster() -> lightgbm.Booster:
    return train_booster()


def sample_rows(count: int = 500, seed: int = 7) -> np.ndarray:
    """Rows to score: a fifth of the values missing, and the first ten rows missing everything."""
    generator = np.random.default_rng(seed)
    rows = generator.normal(size=(count, FEATURES))
    rows[generator.random(rows.shape) < 0.2] = np.nan
    rows[:10] = np.nan
    return rows


def served_model(booster, version: str = "1") -> ServedModel:
    return ServedModel("ranker", version, "fs1", booster, tuple(booster.feature_name()), (), {}, time.time(),
                       NativePredictor(booster))


def wait_until(condition, timeout_s: float = BUILD_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_compiled_scores_equal_native(booster, tmp_path, caplog):
    rows = sample_rows()
    with caplog.at_level(logging.INFO, logger="serving.compiled"):
        built = PredictorCompiler(str(tmp_path), BUILD_TIMEOUT_S).build("ranker", "1", booster)

    assert built.outcome == "compiled"
    assert built.predictor.kind == "compiled"
    assert built.predictor.feature_name() == booster.feature_name()
    compiled = built.predictor.predict(rows)
    native = booster.predict(rows)
    np.testing.assert_allclose(compiled, native, rtol=0, atol=TOLERANCE)
    # The all-missing rows take the missing branches, and the scores are not all alike.
    assert native[0] == pytest.approx(compiled[0], abs=TOLERANCE)
    assert np.ptp(native) > 0.5
    assert [path.suffix for path in sorted(tmp_path.iterdir())] == [".lock", ".o", ".txt"]
    assert "model ranker version 1: compiling the predictor with lleaves" in caplog.text
    assert "model ranker version 1: predictor compiled in" in caplog.text


def test_second_worker_loads_cache(booster, tmp_path, caplog):
    first = PredictorCompiler(str(tmp_path), BUILD_TIMEOUT_S).build("ranker", "1", booster)
    compiled_file = tmp_path / os.path.basename(first.predictor.path)
    written_ns = compiled_file.stat().st_mtime_ns

    with caplog.at_level(logging.INFO, logger="serving.compiled"):
        second = PredictorCompiler(str(tmp_path), BUILD_TIMEOUT_S).build("ranker", "1", booster)

    assert second.outcome == "cache"
    assert second.predictor.path == first.predictor.path
    assert compiled_file.stat().st_mtime_ns == written_ns
    assert "compiling" not in caplog.text
    assert "model ranker version 1: compiled predictor loaded from cache" in caplog.text
    rows = sample_rows()
    np.testing.assert_allclose(second.predictor.predict(rows), booster.predict(rows), rtol=0, atol=TOLERANCE)


def build_in_worker(model_text: str, cache_dir: str, results) -> None:
    """A scorer worker of its own (spawned process): build version 1's predictor and report the outcome."""
    booster = lightgbm.Booster(model_str=model_text)
    try:
        results.put(PredictorCompiler(cache_dir, BUILD_TIMEOUT_S).build("ranker", "1", booster).outcome)
    except CompileError as error:
        results.put(f"error: {error}")


def test_two_workers_compile_once(booster, tmp_path):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=build_in_worker, args=(booster.model_to_string(), str(tmp_path), results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        outcomes = sorted(results.get(timeout=BUILD_TIMEOUT_S) for _ in workers)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()

    assert outcomes == ["cache", "compiled"]
    assert len(list(tmp_path.glob("*.o"))) == 1
    assert not list(tmp_path.glob("*.tmp"))


def compile_command(paths, timeout_s: float) -> list:
    return [sys.executable, "-m", "serving.compiled", "--model-file", str(paths.model_text),
            "--output", str(paths.compiled), "--timeout-seconds", str(timeout_s)]


def test_waiting_compile_takes_finished_file(booster, tmp_path):
    # A finished object of the same model, compiled elsewhere, stands for the other worker's work.
    finished = PredictorCompiler(str(tmp_path / "elsewhere"), BUILD_TIMEOUT_S).build("ranker", "1", booster)
    paths = PredictorCompiler(str(tmp_path / "cache"), BUILD_TIMEOUT_S).paths("ranker", "1", booster.model_to_string())
    paths.model_text.parent.mkdir()
    paths.model_text.write_text(booster.model_to_string(), encoding="utf-8")

    with open(paths.compiled.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        child = subprocess.Popen(compile_command(paths, 60), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.5)
            assert child.poll() is None, child.communicate()
            paths.compiled.write_bytes(open(finished.predictor.path, "rb").read())
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        stdout, stderr = child.communicate(timeout=60)

    assert child.returncode == 0, stderr
    outcome = json.loads(stdout)
    assert outcome["outcome"] == "cache"
    assert outcome["wait_seconds"] >= 1.0
    assert outcome["compile_seconds"] == 0.0


def test_lock_wait_is_bounded(booster, tmp_path):
    compiler = PredictorCompiler(str(tmp_path), 2.0)
    paths = compiler.paths("ranker", "1", booster.model_to_string())
    paths.model_text.write_text(booster.model_to_string(), encoding="utf-8")

    with open(paths.compiled.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="still locked by another compile after 1 s"):
            compile_once(paths.model_text, paths.compiled, 1.0)
        assert time.monotonic() - started < 5
        with pytest.raises(CompileError, match="still locked|did not finish within 2 s"):
            compiler.build("ranker", "1", booster)
        assert time.monotonic() - started < 15

    assert not paths.compiled.exists()


def test_broken_model_file_fails_compile(booster, tmp_path):
    paths = PredictorCompiler(str(tmp_path), BUILD_TIMEOUT_S).paths("ranker", "1", booster.model_to_string())
    paths.model_text.write_text(booster.model_to_string()[:3000], encoding="utf-8")

    child = subprocess.run(compile_command(paths, 60), capture_output=True, text=True, timeout=120)

    assert child.returncode == 1
    assert "Ill formatted model file" in child.stderr
    assert not paths.compiled.exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_damaged_cache_file_fails_build(booster, tmp_path):
    compiler = PredictorCompiler(str(tmp_path), BUILD_TIMEOUT_S)
    paths = compiler.paths("ranker", "1", booster.model_to_string())
    paths.compiled.write_bytes(np.random.default_rng(0).bytes(5000))

    # LLVM aborts the process that loads it: the child, never this one.
    with pytest.raises(CompileError, match=r"killed by signal SIGABRT: LLVM ERROR: .*delete it to have it compiled again"):
        compiler.build("ranker", "1", booster)


def test_unsupported_model_rejected(tmp_path):
    # lleaves compiles linear trees without their linear models: the scores must not be served.
    linear = train_booster(seed=1, linear_tree=True)

    with pytest.raises(CompileError, match="differ from the native booster's by up to"):
        PredictorCompiler(str(tmp_path), BUILD_TIMEOUT_S).build("ranker", "1", linear)


class TruncatedModelText:
    """A working booster whose saved model text is cut short, as a broken model file would be."""

    def __init__(self, booster):
        self.booster = booster

    def model_to_string(self) -> str:
        return self.booster.model_to_string()[:3000]

    def feature_name(self) -> list:
        return self.booster.feature_name()

    def predict(self, rows, **options):
        return self.booster.predict(rows, **options)


def test_failed_compile_keeps_native(booster, tmp_path, caplog):
    holder = ModelHolder("http://127.0.0.1:1", "ranker", "champion", 3600,
                         PredictorCompiler(str(tmp_path), BUILD_TIMEOUT_S))
    outcomes = []
    holder.compile_listener = lambda outcome, seconds: outcomes.append(outcome)
    broken = TruncatedModelText(booster)
    model = ServedModel("ranker", "7", "fs1", broken, tuple(booster.feature_name()), (), {}, time.time(),
                        NativePredictor(broken))

    with caplog.at_level(logging.INFO):
        holder.serve(model)
        assert wait_until(lambda: outcomes)
    holder.stop()

    assert outcomes == ["failed"]
    assert holder.current is model
    assert holder.current.predictor.kind == "native"
    rows = sample_rows()
    np.testing.assert_array_equal(holder.current.predictor.predict(rows), booster.predict(rows))
    failure = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(failure) == 1
    assert "model ranker version 7: compiled predictor failed" in failure[0].getMessage()
    assert "Ill formatted model file" in failure[0].getMessage()
    assert "the native booster keeps serving" in failure[0].getMessage()


def test_holder_switches_to_compiled(booster, tmp_path, caplog):
    holder = ModelHolder("http://127.0.0.1:1", "ranker", "champion", 3600,
                         PredictorCompiler(str(tmp_path), BUILD_TIMEOUT_S))
    ready = threading.Event()
    holder.compile_listener = lambda outcome, seconds: ready.set()
    model = served_model(booster)

    with caplog.at_level(logging.INFO):
        holder.serve(model)
        # The compile takes a child process and over a second: the swap did not wait for it.
        assert holder.current is model
        assert holder.current.predictor.kind == "native"
        assert ready.wait(BUILD_TIMEOUT_S)
        assert wait_until(lambda: "model ranker version 1: the compiled predictor serves now" in caplog.text, 5)
    holder.stop()

    assert holder.current.version == "1"
    assert holder.current.booster is booster
    rows = sample_rows()
    assert holder.current.predictor.kind == "compiled"
    np.testing.assert_allclose(holder.current.predictor.predict(rows), booster.predict(rows), rtol=0, atol=TOLERANCE)


def test_new_version_during_compile_wins(booster, tmp_path, caplog):
    holder = ModelHolder("http://127.0.0.1:1", "ranker", "champion", 3600,
                         PredictorCompiler(str(tmp_path), BUILD_TIMEOUT_S))
    outcomes = []
    holder.compile_listener = lambda outcome, seconds: outcomes.append(outcome)
    newer = train_booster(seed=2)

    with caplog.at_level(logging.INFO):
        holder.serve(served_model(booster, "1"))
        assert wait_until(lambda: "model ranker version 1: compiling the predictor" in caplog.text)
        holder.serve(served_model(newer, "2"))
        assert wait_until(lambda: "model ranker version 2: the compiled predictor serves now" in caplog.text)
    holder.stop()

    assert holder.current.version == "2"
    assert holder.current.booster is newer
    assert holder.current.predictor.kind == "compiled"
    rows = sample_rows()
    np.testing.assert_allclose(holder.current.predictor.predict(rows), newer.predict(rows), rtol=0, atol=TOLERANCE)
    assert outcomes == ["compiled", "compiled"]
    assert "model ranker version 1: compiled predictor ready but version 2 is served now; discarded" in caplog.text


class RecordingPredictor:
    """Pass calls to ``predictor`` and keep each input matrix."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.inputs = []

    def feature_name(self) -> list:
        return self.predictor.feature_name()

    def predict(self, rows):
        self.inputs.append(rows)
        return self.predictor.predict(rows)


def test_ranking_same_with_compiled(tmp_path):
    booster = synthetic_booster()[0]
    compiled = RecordingPredictor(PredictorCompiler(str(tmp_path), BUILD_TIMEOUT_S).build("ranker", "1", booster).predictor)
    feature_set = load_feature_set()
    layout = ManifestLayout(feature_set.manifest())
    generator = np.random.default_rng(5)
    candidates = [f"i{number}" for number in range(200)]
    item_packed = [pack(Stamp(1_500_000, 3), generator.random(len(feature_set.names("item"))).astype(np.float32))
                   if number % 7 else None for number in range(200)]
    codes = [[int(code)] for code in generator.integers(0, len(feature_set.categories), 200)]
    user_packed = pack(Stamp(1_000_000, 5), generator.random(len(feature_set.names("user"))).astype(np.float32))

    for user in (user_packed, None):
        native = rank(booster, layout, candidates, user, item_packed, codes, 2_000_000, k=200)
        fast = rank(compiled, layout, candidates, user, item_packed, codes, 2_000_000, k=200)
        assert [item.item_id for item in fast.items] == [item.item_id for item in native.items]
        np.testing.assert_allclose([item.score for item in fast.items], [item.score for item in native.items],
                                   rtol=0, atol=TOLERANCE)

    rows = compiled.inputs[0]
    assert rows.dtype == np.float64
    assert rows.flags.c_contiguous
    assert rows.shape == (200, booster.num_feature())
    assert np.isnan(rows[0]).sum() > 0


def test_compiler_from_settings():
    settings = load_config("local", environ={"STREAMREC_HOME": "/srv/rec"}).serving
    compiler = PredictorCompiler.from_settings(settings)
    assert str(compiler.cache_dir) == "/srv/rec/compiled-models"
    assert compiler.timeout_seconds == 600.0
    relative = PredictorCompiler.from_settings(dataclasses.replace(settings, compiled_cache_dir=".work/compiled"))
    assert relative.cache_dir == PROJECT_ROOT / ".work" / "compiled"
    assert PredictorCompiler.from_settings(dataclasses.replace(settings, compiled_predictor=False)) is None
