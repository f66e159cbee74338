"""The compiled predictor: each model version compiled by lleaves once per machine, then loaded by every worker.

lleaves turns a LightGBM model into machine code that returns the same scores several times faster
than the native booster. A model version is compiled on the first worker that serves it and written
to ``serving.compiled_cache_dir``. Every other worker of the machine, and every later start, loads
that file in a fraction of a second.

How one worker builds its predictor (``PredictorCompiler.build``, run off the request path):

1. The model text goes to ``<cache>/<model>-<version>-<key>.txt``. The key is a digest of the
   model text, the lleaves and llvmlite versions and the host CPU, because the object code is
   specific to all of them and a recreated registry can reuse a version number for another model.
2. A child process (``python -m serving.compiled``) takes an exclusive flock on ``<stem>.lock``.
   Unless ``<stem>.o`` exists, it compiles to a temporary name and renames the file to
   ``<stem>.o``, so a reader never sees half a file. A second worker's child waits for the lock
   and finds the file. Each child then loads the file and scores probe rows with it. The worker
   loads the file only after its child did so and exited normally, because LLVM aborts the whole
   process on a damaged object file. The child runs at a lower CPU priority and in an interpreter
   of its own, because lleaves builds the LLVM IR in Python, which would otherwise hold the
   worker's GIL for seconds. A crash or timeout of the child fails only this build.
3. The loaded predictor must give the native booster's scores on probe rows (within
   ``SCORE_TOLERANCE``), or it is rejected: lleaves compiles some models it does not support,
   linear trees for example, into code that returns other scores.

The ``.o`` file is an ELF relocatable object (LLVM's MCJIT object cache), not a shared library.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np

from reccore.config import PROJECT_ROOT

log = logging.getLogger("serving.compiled")

# The largest absolute difference accepted between compiled and native scores on the probe rows.
# lleaves adds the trees in another order, so float64 results differ by a few ulp. A wrong branch
# moves a score by a leaf value, many orders of magnitude more.
SCORE_TOLERANCE = 1e-9
PROBE_ROWS = 256
LOCK_POLL_SECONDS = 0.1
# The compile child's CPU priority increment (nice), so that serving workers keep the cores.
CHILD_NICE = 10
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
# NOTE: whether llvmlite's global LLVM state allows two loads at once is not established, so the
# loads of one process take turns.
_LLVM_LOCK = threading.Lock()


class CompileError(RuntimeError):
    """A compiled predictor that could not be built or loaded, or that scores differently."""


@dataclass(frozen=True)
class NativePredictor:
    """The LightGBM booster itself, behind the interface that scoring uses."""

    booster: object
    kind: ClassVar[str] = "native"

    def feature_name(self) -> list:
        """Return the booster's feature names, in its column order."""
        return self.booster.feature_name()

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """Return the booster's scores of ``rows`` (float64, the booster's column order, NaN for missing)."""
        # One thread: the worker's other threads serve other requests, and OpenMP threads fighting
        # over 2 cores made a 200-row call 20 times slower on a busy machine.
        return self.booster.predict(rows, num_threads=1)


@dataclass(frozen=True)
class CompiledPredictor:
    """A model version compiled by lleaves, taking the same rows as its native booster."""

    model: object
    feature_names: tuple
    path: str
    kind: ClassVar[str] = "compiled"

    def feature_name(self) -> list:
        """Return the native booster's feature names, in its column order."""
        return list(self.feature_names)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """Return the scores of ``rows`` on the calling thread (float64, booster column order, NaN for missing)."""
        # n_jobs=1: lleaves would otherwise start a thread pool per call, slower than the call itself
        # for a few hundred rows, while the worker's other threads serve other requests.
        return self.model.predict(rows, n_jobs=1)


@dataclass(frozen=True)
class BuildResult:
    """A compiled predictor ready to serve and how it was obtained."""

    predictor: CompiledPredictor
    # "compiled": this build's child process compiled it; "cache": another process had, or was.
    outcome: str
    seconds: float


@dataclass(frozen=True)
class CachePaths:
    """The files of one model version in the cache folder (``compile_once`` adds ``<stem>.lock``)."""

    model_text: Path
    compiled: Path


class PredictorCompiler:
    """Build compiled predictors in ``cache_dir``, each model version compiled once per machine.

    NOTE: nothing deletes old files from ``cache_dir``: each model version leaves its ``.txt``,
    ``.o`` and ``.lock`` there.
    """

    def __init__(self, cache_dir: str, timeout_seconds: float):
        path = Path(cache_dir)
        self.cache_dir = path if path.is_absolute() else PROJECT_ROOT / path
        self.timeout_seconds = timeout_seconds

    @classmethod
    def from_settings(cls, settings) -> Optional["PredictorCompiler"]:
        """Return a compiler built from the ``serving`` settings, or None when ``compiled_predictor`` is off."""
        if not settings.compiled_predictor:
            return None
        return cls(settings.compiled_cache_dir, settings.compile_timeout_seconds)

    def paths(self, name: str, version: str, model_text: str) -> CachePaths:
        """Return the cache files of this model text, named by model, version and cache key."""
        stem = f"{_SAFE_NAME.sub('_', name)}-{_SAFE_NAME.sub('_', version)}-{cache_key(model_text)}"
        return CachePaths(self.cache_dir / f"{stem}.txt", self.cache_dir / f"{stem}.o")

    def build(self, name: str, version: str, booster) -> BuildResult:
        """Compile (or load from the cache) the predictor of ``booster``, check it, and return it.

        Blocks for the compile, up to ``timeout_seconds``: call it off the request path. Raises
        CompileError when the predictor cannot be built or its scores differ from the booster's.
        """
        started = time.monotonic()
        model_text = booster.model_to_string()
        paths = self.paths(name, version, model_text)
        try:
            paths.model_text.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(paths.model_text, model_text.encode("utf-8"))
        except OSError as error:
            raise CompileError(f"cannot write the model text to the cache folder {self.cache_dir}: {error}") from error

        found = paths.compiled.exists()
        if not found:
            log.info("model %s version %s: compiling the predictor with lleaves into %s, or waiting for the "
                     "process that already is", name, version, paths.compiled)
        outcome = self._compile_in_child(paths)
        predictor = load_compiled(paths, tuple(booster.feature_name()))
        check_scores(predictor, booster, model_text)

        seconds = time.monotonic() - started
        if outcome == "compiled":
            log.info("model %s version %s: predictor compiled in %.1f s (%s)", name, version, seconds,
                     paths.compiled)
        elif found:
            log.info("model %s version %s: compiled predictor loaded from cache in %.2f s (%s)", name, version,
                     seconds, paths.compiled)
        else:
            log.info("model %s version %s: compiled predictor loaded from cache in %.1f s, after another "
                     "process compiled it (%s)", name, version, seconds, paths.compiled)
        return BuildResult(predictor, outcome, seconds)

    def _compile_in_child(self, paths: CachePaths) -> str:
        """Run ``compile_once`` and a trial load in a child process; return the outcome ("compiled" or "cache")."""
        command = [sys.executable, "-m", "serving.compiled", "--model-file", str(paths.model_text),
                   "--output", str(paths.compiled), "--timeout-seconds", str(self.timeout_seconds)]
        environment = dict(os.environ)
        # The child must import this same serving package, also when it is run from a checkout
        # that is not installed and the worker's working directory is elsewhere.
        package_root = str(Path(__file__).resolve().parent.parent)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
        # A child whose worker exits carries on and leaves a finished file for the next worker.
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=environment) as child:
            try:
                stdout, stderr = child.communicate(timeout=self.timeout_seconds)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                paths.compiled.with_name(f"{paths.compiled.name}.{child.pid}.tmp").unlink(missing_ok=True)
                raise CompileError(f"the compile process did not finish within {self.timeout_seconds:.0f} s "
                                   "(serving.compile_timeout_seconds) and was killed") from None
        if child.returncode != 0:
            lines = stderr.strip().splitlines()
            detail = lines[-1][:500] if lines else "no error output"
            if child.returncode > 0:
                raise CompileError(f"the compile process exited with status {child.returncode}: {detail}")
            hint = f"; if {paths.compiled} is damaged, delete it to have it compiled again" if paths.compiled.exists() else ""
            raise CompileError(f"the compile process was killed by signal {signal.Signals(-child.returncode).name}: "
                               f"{detail}{hint}")
        try:
            return json.loads(stdout.strip().splitlines()[-1])["outcome"]
        except (IndexError, ValueError, KeyError) as error:
            raise CompileError(f"the compile process returned no outcome (output {stdout[-200:]!r})") from error


def compile_once(model_file: Path, output: Path, timeout_seconds: float) -> dict:
    """Compile ``model_file`` to ``output`` unless another process did; return the outcome.

    Several processes may call this at once for the same output: an exclusive flock on
    ``<output stem>.lock`` lets one compile while the others wait, up to ``timeout_seconds``, and
    then find the file. The object is written to a temporary name and renamed, so ``output`` is
    either absent or complete. The lock is released by the kernel if the holder dies.
    """
    started = time.monotonic()
    deadline = started + timeout_seconds
    lock_path = output.with_suffix(".lock")
    with open(lock_path, "a+b") as lock:
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{lock_path} was still locked by another compile after "
                                       f"{timeout_seconds:.0f} s") from None
                time.sleep(LOCK_POLL_SECONDS)
        waited = time.monotonic() - started
        if output.exists():
            return {"outcome": "cache", "wait_seconds": round(waited, 3), "compile_seconds": 0.0}

        import lleaves

        temporary = output.with_name(f"{output.name}.{os.getpid()}.tmp")
        # lleaves loads an existing cache file instead of compiling: never let it find a stale one.
        temporary.unlink(missing_ok=True)
        try:
            compiling = time.monotonic()
            lleaves.Model(model_file=str(model_file)).compile(cache=str(temporary))
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, output)
        finally:
            temporary.unlink(missing_ok=True)
        return {"outcome": "compiled", "wait_seconds": round(waited, 3),
                "compile_seconds": round(time.monotonic() - compiling, 3)}


def load_compiled(paths: CachePaths, feature_names: tuple) -> CompiledPredictor:
    """Load a compiled model file into this process; raise CompileError when lleaves rejects it.

    LLVM aborts the process on a damaged file: load a file here only after a child process did.
    """
    model = _load_object(paths)
    if model.num_feature() != len(feature_names):
        raise CompileError(f"{paths.compiled} takes {model.num_feature()} features, the booster "
                           f"{len(feature_names)}")
    return CompiledPredictor(model, feature_names, str(paths.compiled))


def _load_object(paths: CachePaths):
    import lleaves

    try:
        with _LLVM_LOCK:
            model = lleaves.Model(model_file=str(paths.model_text))
            # With an existing cache file lleaves loads the object code and compiles nothing.
            model.compile(cache=str(paths.compiled))
    except Exception as error:  # noqa: BLE001 - lleaves and llvmlite raise several types; each is a failed load
        raise CompileError(f"lleaves could not load {paths.compiled} ({type(error).__name__}: {error}); "
                           "delete the file to have it compiled again") from error
    return model


def check_scores(predictor: CompiledPredictor, booster, model_text: str) -> float:
    """Return the largest score difference on probe rows; raise CompileError above ``SCORE_TOLERANCE``."""
    rows = probe_rows(model_text, len(predictor.feature_names))
    compiled = np.asarray(predictor.predict(rows), dtype=np.float64)
    native = np.asarray(booster.predict(rows), dtype=np.float64)
    if compiled.shape != native.shape:
        raise CompileError(f"compiled scores have shape {compiled.shape}, native ones {native.shape}")
    difference = float(np.max(np.abs(compiled - native), initial=0.0))
    if not difference <= SCORE_TOLERANCE:
        raise CompileError(f"compiled scores differ from the native booster's by up to {difference:.3g} on "
                           f"{len(rows)} probe rows (tolerance {SCORE_TOLERANCE:g}); lleaves does not support "
                           "this model")
    return difference


def probe_rows(model_text: str, feature_count: int, seed: int = 0) -> np.ndarray:
    """Return rows spread over each feature's training range (from ``feature_infos``), with NaN and zeros.

    Values reach past both ends of the range, so both sides of the outermost splits are taken.
    """
    generator = np.random.default_rng(seed)
    low, high = np.zeros(feature_count), np.zeros(feature_count)
    match = re.search(r"^feature_infos=(.*)$", model_text, re.MULTILINE)
    infos = match.group(1).split(" ") if match else []
    for index, info in enumerate(infos[:feature_count]):
        bounds = re.fullmatch(r"\[(.+):(.+)\]", info)
        if bounds:
            low[index], high[index] = float(bounds.group(1)), float(bounds.group(2))
    margin = (high - low) * 0.25 + 1.0
    rows = generator.uniform(low - margin, high + margin, size=(PROBE_ROWS, feature_count))
    draw = generator.random(rows.shape)
    rows[draw < 0.2] = np.nan
    rows[(draw >= 0.2) & (draw < 0.3)] = 0.0
    return rows


@functools.lru_cache(maxsize=1)
def _target_description() -> str:
    import llvmlite
    import llvmlite.binding as llvm
    from importlib.metadata import version

    with _LLVM_LOCK:
        llvm.initialize()
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        try:
            features = llvm.get_host_cpu_features().flatten()
        except RuntimeError:  # LLVM raises when it cannot detect them; lleaves then compiles without them
            features = ""
    return "|".join([version("lleaves"), llvmlite.__version__, llvm.get_process_triple(),
                     llvm.get_host_cpu_name(), features])


def cache_key(model_text: str) -> str:
    """Return a 16-hex-digit digest of the model text and of what the object code depends on."""
    digest = hashlib.sha256(model_text.encode("utf-8"))
    digest.update(_target_description().encode("utf-8"))
    return digest.hexdigest()[:16]


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def main(argv: Optional[list] = None) -> int:
    """Compile one model file unless another process did, then load it once: ``PredictorCompiler``'s child process."""
    parser = argparse.ArgumentParser(prog="python -m serving.compiled", description=main.__doc__)
    parser.add_argument("--model-file", required=True, type=Path, help="LightGBM model text file")
    parser.add_argument("--output", required=True, type=Path, help="compiled object file to write")
    parser.add_argument("--timeout-seconds", required=True, type=float,
                        help="maximum wait, in seconds, for another process's compile of the same file")
    args = parser.parse_args(argv)
    os.nice(CHILD_NICE)
    try:
        outcome = compile_once(args.model_file, args.output, args.timeout_seconds)
        # A damaged file makes LLVM abort the process: better this one than the worker.
        model = _load_object(CachePaths(args.model_file, args.output))
        model.predict(probe_rows(args.model_file.read_text(encoding="utf-8"), model.num_feature()), n_jobs=1)
    except Exception as error:  # noqa: BLE001 - the parent logs this line with the model version
        sys.stderr.write(f"error: compiling {args.model_file} failed: {type(error).__name__}: {error}\n")
        return 1
    sys.stdout.write(json.dumps(outcome) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
