"""The in-process steps of bench/scorer.py: which users to send, and where one request's time goes.

Both call the real scorer app (``serving.app.create_app``, with the benchmark's model and Redis
prefix) through Flask's test client, so no HTTP server is involved. The profile wraps the
functions that the recommendation view calls with timers: ``OnlineStore.user_state`` and
``items``, ``rank`` and the steps of ``serving.scoring.score``, the predictor's ``predict``, the
served log and ``jsonify``. The serving code itself is left unchanged. A stage that is no function
of its own (candidate generation, category codes, building the response) is the gap between the
calls around it.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import statistics
import time
from collections import Counter, defaultdict

from reccore.config import Config
from serving.store import OnlineStore

log = logging.getLogger("bench.scorer_profile")

# In-process runs only: a machine busy with other work must not turn a slow Redis reply into a fallback.
IN_PROCESS_REDIS_TIMEOUT_MS = 2000.0
IN_PROCESS_BUDGET_MS = 5000.0
WARMUP_REQUESTS = 100
PREDICT_REPEATS = 200


class RecordingStore(OnlineStore):
    """The scorer's store, remembering the item ids of the last ``items`` call (a request's candidates)."""

    last_items: list = []

    def items(self, version, item_ids):
        self.last_items = list(item_ids)
        return super().items(version, item_ids)


@dataclasses.dataclass
class InProcessScorer:
    """The scorer app in this process, with its model holder and store."""

    app: object
    holder: object
    store: RecordingStore

    def stop(self) -> None:
        self.holder.stop()


def start_scorer(config: Config) -> InProcessScorer:
    """Build the scorer app with the production settings, load the champion, and return it (no polling thread).

    Only the Redis timeout and the request budget are raised, so that a busy machine cannot turn
    a request into a fallback here. The predictor is the one the settings choose: with
    ``serving.compiled_predictor`` the compile starts in the background (see ``wait_for_compiled``).
    """
    from serving.app import create_app

    serving = dataclasses.replace(config.serving, redis_timeout_ms=IN_PROCESS_REDIS_TIMEOUT_MS)
    if hasattr(serving, "request_budget_ms"):
        serving = dataclasses.replace(serving, request_budget_ms=IN_PROCESS_BUDGET_MS)
    config = dataclasses.replace(config, serving=serving)
    store = RecordingStore(config.redis, config.serving)
    app = create_app(config, store=store, start_polling=False)
    holder = app.extensions["streamrec"]["holder"]
    holder.refresh()
    if holder.current is None:
        holder.stop()
        raise RuntimeError(f"the scorer could not load its model: {holder.error}")
    return InProcessScorer(app, holder, store)


def predictor_kind(holder) -> str:
    """Return "compiled" or "native": what scores the requests of ``holder``'s current model."""
    predictor = getattr(holder.current, "predictor", None)
    return getattr(predictor, "kind", "native")


def wait_for_compiled(scorer: InProcessScorer, config: Config) -> str:
    """Wait until the compiled predictor serves, when the settings ask for one; return the predictor kind.

    Raises TimeoutError after ``serving.compile_timeout_seconds`` (plus a margin for the load).
    """
    if not getattr(config.serving, "compiled_predictor", False):
        return predictor_kind(scorer.holder)
    timeout_s = config.serving.compile_timeout_seconds + 30
    deadline = time.monotonic() + timeout_s
    while predictor_kind(scorer.holder) != "compiled":
        if time.monotonic() > deadline:
            raise TimeoutError(f"the compiled predictor did not serve within {timeout_s:.0f} s; "
                               "see the serving.compiled log lines above")
        time.sleep(0.5)
    return "compiled"


def movielens_users() -> list[str]:
    from jobs.replay import DEFAULT_RATINGS

    with open(DEFAULT_RATINGS, newline="", encoding="utf-8") as handle:
        return sorted({row["userId"] for row in csv.DictReader(handle)}, key=int)


def collect_candidates(scorer: InProcessScorer, config: Config, k: int) -> tuple[dict, str, Counter]:
    """Request every MovieLens user once; return the kept users' candidates, the feature-set version, exclusions.

    A user is kept when the response is a 200 with k scored items, no fallback, and the scorer
    generated ``serving.candidates`` candidates for it. The others are counted by reason.
    """
    client = scorer.app.test_client()
    wanted = config.serving.candidates
    kept: dict = {}
    excluded: Counter = Counter()
    for user in movielens_users():
        scorer.store.last_items = []
        response = client.get(f"/v1/users/{user}/recommendations?k={k}")
        body = response.get_json()
        if response.status_code != 200:
            excluded[f"status {response.status_code}"] += 1
        elif body["fallback"]:
            excluded[f"fallback {body['fallback_reason']}"] += 1
        elif len(body["items"]) != k:
            excluded[f"fewer than {k} items"] += 1
        elif len(scorer.store.last_items) != wanted:
            excluded[f"fewer than {wanted} candidates"] += 1
        else:
            kept[user] = scorer.store.last_items
    return kept, scorer.holder.current.feature_set_version, excluded


class StageTimer:
    """Time spent in wrapped functions during one request, and the start and end of each one's last call."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.spent: dict = defaultdict(float)
        self.spans: dict = {}
        self.counts: dict = defaultdict(int)

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                self.spent[name] += ended - began
                self.spans[name] = (began, ended)
        return timed


class TimedPredictor:
    """A predictor (or booster) whose ``predict`` is timed, keeping the rows of its last call."""

    def __init__(self, predictor, timer: StageTimer, captured: dict):
        self.predictor = predictor
        self.predict = timer.wrap("predict", self._predict)
        self.captured = captured

    def feature_name(self):
        return self.predictor.feature_name()

    def _predict(self, rows):
        self.captured["rows"] = rows
        return self.predictor.predict(rows)


def profile_requests(scorer: InProcessScorer, users: list[str], k: int, requests: int) -> dict:
    """Time ``requests`` recommendation requests stage by stage; return the mean milliseconds per stage.

    The keys are ``profile_<stage>_ms``. Their sum is ``profile_request_ms``, where
    ``flask_and_rest`` is what no timer covers: Flask's routing, hooks and metrics, and the test
    client. Also returned: the mean number of item vectors read from Redis per request, where the
    rest came from the worker's item cache. Last, the median predict time on the last request's
    rows with the served predictor, the native booster, and the native booster on one thread.
    """
    import serving.app
    import serving.scoring

    client = scorer.app.test_client()
    timer = StageTimer()
    captured: dict = {}
    store = scorer.store
    original_rank = serving.app.rank

    def rank_with_timed_predictor(predictor, *args, **kwargs):
        return original_rank(TimedPredictor(predictor, timer, captured), *args, **kwargs)

    def counted_mget(keys, *args):
        timer.counts["item_vectors_from_redis"] += len(keys)
        return original_mget(keys, *args)

    original_mget = store.client.mget
    store.client.mget = counted_mget
    store.user_state = timer.wrap("redis_user_state", store.user_state)
    store.items = timer.wrap("redis_items", store.items)
    served_log = scorer.app.extensions["streamrec"].get("served_log")
    if served_log is not None:
        served_log.publish = timer.wrap("served_log", served_log.publish)
    replaced = [(serving.app, "rank", "rank", rank_with_timed_predictor), (serving.app, "jsonify", "json", None),
                (serving.scoring, "unpack_many", "unpack", None),
                (serving.scoring, "category_matrix", "category_matrix", None),
                (serving.scoring, "model_rows", "model_rows", None),
                (serving.scoring, "reorder_columns", "reorder_columns", None)]
    originals = [(module, name, getattr(module, name)) for module, name, _stage, _function in replaced]
    for module, name, stage, function in replaced:
        setattr(module, name, timer.wrap(stage, function or getattr(module, name)))
    rows = []
    try:
        for number in range(WARMUP_REQUESTS + requests):
            timer.reset()
            path = f"/v1/users/{users[number % len(users)]}/recommendations?k={k}"
            began = time.perf_counter()
            response = client.get(path)
            total = time.perf_counter() - began
            body = response.get_json()
            if response.status_code != 200 or body["fallback"] or len(body["items"]) != k:
                raise RuntimeError(f"profile request {path} was not scored: {response.status_code} {body}")
            if number >= WARMUP_REQUESTS:
                rows.append(stage_times(timer, total))
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
        store.client.mget = original_mget

    profile = {f"profile_{name}_ms": statistics.fmean(row[name] for row in rows) * 1000.0 for name in rows[0]
               if name != "item_vectors_from_redis"}
    profile["profile_item_vectors_from_redis"] = statistics.fmean(row["item_vectors_from_redis"] for row in rows)
    model = scorer.holder.current
    predictor = getattr(model, "predictor", model.booster)
    profile["profile_predict_repeated_ms"] = median_predict_ms(predictor.predict, captured["rows"])
    profile["profile_predict_native_ms"] = median_predict_ms(model.booster.predict, captured["rows"])
    profile["profile_predict_native_one_thread_ms"] = median_predict_ms(model.booster.predict, captured["rows"],
                                                                        num_threads=1)
    return profile


def stage_times(timer: StageTimer, total: float) -> dict:
    """Return one request's seconds per stage; the gaps between timed calls are stages of their own."""
    spent, spans = timer.spent, timer.spans
    scoring_steps = ("unpack", "category_matrix", "model_rows", "reorder_columns", "predict")
    times = {
        "request": total,
        "redis_user_state": spent["redis_user_state"],
        "candidates": spans["redis_items"][0] - spans["redis_user_state"][1],
        "redis_items": spent["redis_items"],
        "category_codes": spans["rank"][0] - spans["redis_items"][1],
        **{step: spent[step] for step in scoring_steps},
        # The float64 copy for the predictor, the top-k sort and the result objects.
        "rank_rest": spent["rank"] - sum(spent[step] for step in scoring_steps),
        "served_log": spent["served_log"],
        "response": spans["json"][0] - spans["rank"][1] - spent["served_log"],
        "json": spent["json"],
    }
    times["flask_and_rest"] = total - sum(value for name, value in times.items() if name != "request")
    times["item_vectors_from_redis"] = timer.counts["item_vectors_from_redis"]
    return times


def median_predict_ms(predict, rows, **kwargs) -> float:
    """Return the median milliseconds of ``PREDICT_REPEATS`` predict calls on the same rows."""
    durations = []
    for _repeat in range(PREDICT_REPEATS):
        began = time.perf_counter()
        predict(rows, **kwargs)
        durations.append(time.perf_counter() - began)
    return statistics.median(durations) * 1000.0


def worker_heap(users: list[str], k: int, repeats: int = 5) -> dict:
    """Build the app as each gunicorn worker does (``serving.wsgi``), serve ``users``, then time full collections.

    Returns the objects the garbage collector tracks and the median milliseconds of a full
    (generation 2) collection: the pause a worker takes whenever CPython runs one.
    """
    import gc

    import serving.wsgi

    client = serving.wsgi.app.test_client()
    for user in users:
        client.get(f"/v1/users/{user}/recommendations?k={k}")
    serving.wsgi.app.extensions["streamrec"]["holder"].stop()
    gc.collect()
    durations = []
    for _repeat in range(repeats):
        began = time.perf_counter()
        gc.collect()
        durations.append(time.perf_counter() - began)
    return {"tracked_objects": len(gc.get_objects()), "full_collection_ms": statistics.median(durations) * 1000.0}


def main() -> int:
    """Print ``worker_heap`` as JSON for the users and k given as JSON on stdin (run by bench/scorer.py)."""
    import json
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.load(sys.stdin)
    json.dump(worker_heap(spec["users"], spec["k"]), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
