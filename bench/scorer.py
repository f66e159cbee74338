"""Scorer latency and throughput under gunicorn, against an endpoint that only does the same Redis reads.

    .venv/bin/python bench/scorer.py [--rate 200] [--seconds 30] [--max-seconds 10] [--rounds 2]

Needs the stack (make stack-up: Kafka, Redis, MLflow). Steps:

1. Set-up, as bench/training.py does it: in a fresh topic, lake and Redis prefix, MovieLens is
   replayed, ingested and backfilled. Then the training set is built and a model is trained under
   a name of its own, which must become its champion. ``--keep`` leaves all of it in place and
   logs the flags with which ``--reuse-prefix`` and ``--reuse-model`` skip this step next time.
   What the scorer serves goes to a Kafka topic of the run's own (``kafka.served_topic``).
2. In this process, the scorer app (``create_app``, production settings) serves every MovieLens
   user once. The users kept are those whose response has k items and no fallback, and for whom
   the scorer generated ``serving.candidates`` candidates. Their candidate lists go to a file for the
   fetch-only app. Once the configured predictor serves (the compiled one, when
   ``serving.compiled_predictor`` is on), ``--profile-requests`` requests are timed stage by stage
   (see bench/scorer_profile.py). A separate process built like a scorer worker then times a full
   garbage collection of its heap.
3. Two gunicorn servers start on free loopback ports with ``--gunicorn-conf`` and the configured
   ``serving.workers`` and ``serving.threads``: the scorer (``serving.wsgi:app``) and the
   fetch-only app (bench/fetch_only.py: the same ``user_state`` pipeline and item MGET through
   ``OnlineStore``, then a small JSON). Each is warmed up until a round of requests has no error
   and, for the scorer, was scored by the configured predictor only.
4. Load comes from bench/loadgen.py in a process of its own (see its docstring for the design).
   The scorer gets ``GET /v1/users/<id>/recommendations?k=10`` at a fixed ``--rate`` for
   ``--seconds`` (open loop: latency from each request's scheduled send time). Then, ``--rounds``
   times, scorer and fetch-only app in turn get closed-loop load from ``--connections``
   connections for ``--max-seconds``. The figures are medians over the rounds, so a burst of
   other work on the machine moves them less. During these phases the CPU time of the servers,
   Redis, Kafka, MLflow, the load generator and the whole machine is read from /proc, per request.
   Last, ``/healthz`` shows the cost of Flask and gunicorn alone.

Every response is checked: a status other than 200, a fallback or fewer than k items is an error.
Any error makes the run exit with status 1 after the figures. Prints ``name: value`` lines. The
servers are stopped and the served topic deleted on exit, also after a failure or Ctrl-C. So are
the Redis prefix, topic, lake, model and compiled model files of the set-up, unless ``--keep``
or ``--reuse-prefix`` was given. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Optional

from movielens_setup import bench_config, delete_topic, drop_bench_data, with_sections
from reccore.config import PROJECT_ROOT, Config, load_config
from scorer_profile import collect_candidates, profile_requests, start_scorer, wait_for_compiled

log = logging.getLogger("bench.scorer")

BENCH = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 120
WARMUP_ROUND_S = 3
# Beyond serving.compile_timeout_seconds, the longest warm-up before the benchmark gives up.
WARMUP_MARGIN_S = 60
PREDICTIONS_METRIC = "streamrec_scorer_predictions_total"
WORKER_HEAP_USERS = 200


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second of the fixed-rate phase")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the fixed-rate phase, in seconds")
    parser.add_argument("--max-seconds", type=float, default=10.0,
                        help="measured length of each maximum-throughput phase, in seconds")
    parser.add_argument("--max-warmup-seconds", type=float, default=2.0,
                        help="unmeasured start of each maximum-throughput phase, in seconds")
    parser.add_argument("--rounds", type=int, default=2,
                        help="maximum-throughput phases per server, taken in turn; figures are their median")
    parser.add_argument("--connections", type=int, default=0,
                        help="connections of the closed-loop phases (default: one per server thread)")
    parser.add_argument("--open-connections", type=int, default=64,
                        help="maximum connections of the fixed-rate phase; a request beyond them waits for a free one")
    parser.add_argument("--k", type=int, default=10, help="items per recommendation request")
    parser.add_argument("--users", type=int, default=0,
                        help="maximum number of users to spread requests over (0: every user kept)")
    parser.add_argument("--profile-requests", type=int, default=500, help="requests timed stage by stage in process")
    parser.add_argument("--timeout-seconds", type=float, default=10.0, help="per-request timeout of the load generator")
    parser.add_argument("--reuse-prefix", help="Redis prefix of an earlier --keep run: skip the set-up")
    parser.add_argument("--reuse-model", help="registered model of an earlier --keep run (with --reuse-prefix)")
    parser.add_argument("--keep", action="store_true", help="leave the Redis prefix, lake and model in place")
    parser.add_argument("--gunicorn-conf", default="conf/gunicorn.conf.py",
                        help="gunicorn config file of both servers, relative to the project root")
    args = parser.parse_args(argv)
    if bool(args.reuse_prefix) != bool(args.reuse_model):
        parser.error("--reuse-prefix and --reuse-model go together")
    return args


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """An app under gunicorn (conf/gunicorn.conf.py unless ``conf`` names another) on a free loopback port."""

    def __init__(self, name: str, app: str, folder: Path, overrides: dict, extra_env: Optional[dict] = None,
                 conf: str = "conf/gunicorn.conf.py"):
        self.name = name
        self.app = app
        self.conf = conf
        self.port = free_port()
        self.env = dict(os.environ)
        for dotted, value in {**overrides, "serving.host": "127.0.0.1", "serving.port": self.port}.items():
            self.env["STREAMREC__" + dotted.upper().replace(".", "__")] = str(value)
        # Each server gets its own metrics folder: gunicorn.conf.py empties it when the server starts.
        self.env["PROMETHEUS_MULTIPROC_DIR"] = str(folder / f"{name}-metrics")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.update(extra_env or {})
        self.log_path = folder / f"{name}-gunicorn.log"
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        gunicorn = Path(sys.executable).with_name("gunicorn")
        with open(self.log_path, "w", encoding="utf-8") as output:
            self.process = subprocess.Popen([str(gunicorn), "-c", self.conf, self.app],
                                            cwd=PROJECT_ROOT, env=self.env, stdout=output, stderr=subprocess.STDOUT)
        log.info("%s: gunicorn pid %d on 127.0.0.1:%d, log %s", self.name, self.process.pid, self.port, self.log_path)

    def wait_ready(self) -> None:
        import http.client

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name}: gunicorn exited with status {self.process.returncode}; "
                                   f"see {self.log_path}")
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                connection.request("GET", "/readyz")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                connection.close()
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} was not ready within {READY_TIMEOUT_S} s; see {self.log_path}")

    def predictions(self) -> dict:
        """Return the scorer's scored requests by predictor ("native", "compiled") from /metrics."""
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        finally:
            connection.close()
        counts = {}
        for line in text.splitlines():
            if line.startswith(PREDICTIONS_METRIC + "{"):
                labels, value = line.rsplit(" ", 1)
                kind = labels.split('predictor="', 1)[1].split('"', 1)[0]
                counts[kind] = counts.get(kind, 0.0) + float(value)
        return counts

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.warning("%s: gunicorn pid %d did not stop within 30 s of SIGTERM; killing it", self.name,
                        self.process.pid)
            self.process.kill()
            self.process.wait(timeout=10)
        log.info("%s: gunicorn stopped", self.name)


def run_load(server: Server, mode: str, paths: list[str], check: dict, seconds: float, connections: int,
             timeout_s: float, rate: float = 0.0, warmup_seconds: float = 0.0) -> dict:
    """Run one phase of bench/loadgen.py against ``server`` and return its result."""
    spec = {"host": "127.0.0.1", "port": server.port, "paths": paths, "mode": mode, "rate": rate,
            "seconds": seconds, "warmup_seconds": warmup_seconds, "connections": connections,
            "timeout_seconds": timeout_s, "check": check}
    limit_s = warmup_seconds + seconds + 2 * timeout_s + 60
    finished = subprocess.run([sys.executable, str(BENCH / "loadgen.py")], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=limit_s, cwd=PROJECT_ROOT)
    if finished.returncode != 0:
        raise RuntimeError(f"the load generator failed (status {finished.returncode}): {finished.stderr[-2000:]}")
    return json.loads(finished.stdout)


def machine_cpu_seconds() -> tuple[float, float]:
    """Return the busy and the total CPU seconds of all cores so far, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(value) for value in handle.readline().split()[1:9]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields) - idle) / CLOCK_TICKS, sum(fields) / CLOCK_TICKS


def cpu_busy_share(seconds: float) -> Optional[float]:
    """Return the share of all cores busy over ``seconds``, or None where /proc/stat is missing."""
    try:
        busy_before, total_before = machine_cpu_seconds()
        time.sleep(seconds)
        busy_after, total_after = machine_cpu_seconds()
    except OSError:
        return None
    return (busy_after - busy_before) / max(1e-9, total_after - total_before)


def process_tree_cpu_seconds(roots: list[int]) -> float:
    """Return the CPU seconds (user and system) used so far by ``roots`` and their descendants, from /proc."""
    ticks: dict = {}
    children: dict = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError:
            continue  # the process exited while the folder was read
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
        children[int(fields[1])].append(int(entry))
    total, pending, seen = 0, [root for root in roots if root in ticks], set()
    while pending:
        pid = pending.pop()
        if pid not in seen:
            seen.add(pid)
            total += ticks.get(pid, 0)
            pending.extend(children[pid])
    return total / CLOCK_TICKS


class CpuMeter:
    """CPU seconds of named process groups (each root with its descendants) and of the whole machine."""

    def __init__(self, groups: dict):
        self.groups = groups

    def sample(self) -> dict:
        used = {name: process_tree_cpu_seconds(pids) for name, pids in self.groups.items()}
        used["machine"] = machine_cpu_seconds()[0]
        return used

    @staticmethod
    def per_request_ms(before: dict, after: dict, loadgen_cpu_s: float, requests: int) -> dict:
        """Return CPU milliseconds per request by group; "other" is the machine's rest (other users' work too)."""
        spent = {name: after[name] - before[name] for name in before}
        spent["loadgen"] = loadgen_cpu_s
        machine = spent.pop("machine")
        spent["other"] = max(0.0, machine - sum(spent.values()))
        spent["machine"] = machine
        return {name: seconds * 1000.0 / max(1, requests) for name, seconds in spent.items()}


def stack_processes(config: Config) -> dict:
    """Return the pids of the local stack's services (redis, kafka, mlflow) that run, by name; {} off the stack."""
    try:
        from devstack import stack

        rows = stack.status(stack.build_services(config.stack))
    except Exception as error:  # noqa: BLE001 - without the local stack, only the servers are measured
        log.info("no local stack processes to measure (%s)", error)
        return {}
    return {row.service: [row.pid] for row in rows if row.pid and row.state == "running"}


def prepare(args: argparse.Namespace, base: Config) -> tuple[Config, bool]:
    """Return the config of the benchmark's data and model, and whether this run created them."""
    if args.reuse_prefix:
        log.info("set-up: reusing Redis prefix %s and model %s", args.reuse_prefix, args.reuse_model)
        return with_sections(base, redis={"key_prefix": args.reuse_prefix},
                             training={"model_name": args.reuse_model}), False

    from jobs.train import run_training
    from jobs.training_set import build_training_set
    from movielens_setup import load_movielens

    suffix = uuid.uuid4().hex[:8]
    config = bench_config(base, "scorer", suffix,
                          training={"model_name": f"bench-scorer-{suffix}", "experiment": f"bench-scorer-{suffix}"})
    log.info("set-up: MovieLens into topic %s, lake %s, Redis prefix %s", config.kafka.interactions_topic,
             config.lake.root, config.redis.key_prefix)
    spark = None
    try:
        spark, feature_set = load_movielens(config, "streamrec-bench-scorer")
        build_training_set(spark, config, feature_set)
        result = run_training(spark, config, feature_set)
        if not result.promoted:
            raise RuntimeError(f"the benchmark's model was not made champion: {result.reasons}")
    except BaseException:
        if not args.keep:
            drop_bench_data(config)
        raise
    finally:
        if spark is not None:
            spark.stop()
    log.info("set-up: model %s version %s is the champion", config.training.model_name, result.registered_version)
    return config, True


def median_of(results: list[dict], key: str) -> float:
    return statistics.median(result[key] for result in results)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # SIGTERM ends the run through the same cleanup as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda _signal, _frame: sys.exit(143))

    base = load_config("local")
    config, created = prepare(args, base)
    folder = Path(tempfile.mkdtemp(prefix="streamrec-bench-scorer-run-"))
    servers: list[Server] = []
    served_topic = None
    try:
        # What the scorer serves goes to a topic of the run's own, never to the stack's served topic.
        served_topic = create_served_topic(config)
        config = with_sections(config, kafka={"served_topic": served_topic})
        return measure(args, config, folder, servers)
    finally:
        for server in servers:
            server.stop()
        if served_topic:
            delete_topic(config, served_topic)
        if created and not args.keep:
            drop_bench_data(config)
            drop_compiled_models(config)
        elif created:
            log.info("kept the data; rerun with --reuse-prefix %s --reuse-model %s (lake %s)",
                     config.redis.key_prefix, config.training.model_name, config.lake.root)
        log.info("server logs are in %s", folder)


def create_served_topic(config: Config) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"bench-served-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(config.kafka.client_options())
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(timeout=30)
    return topic


def drop_compiled_models(config: Config) -> None:
    """Delete the compiled predictor files of the benchmark's model from ``serving.compiled_cache_dir``."""
    cache = getattr(config.serving, "compiled_cache_dir", None)
    if not cache:
        return
    folder = Path(cache) if Path(cache).is_absolute() else PROJECT_ROOT / cache
    for path in folder.glob(f"{config.training.model_name}-*"):
        path.unlink(missing_ok=True)


def measure(args: argparse.Namespace, config: Config, folder: Path, servers: list) -> int:
    settings = config.serving
    log.info("in process: loading the champion (predictor: %s)",
             "compiled" if getattr(settings, "compiled_predictor", False) else "native")
    scorer_in_process = start_scorer(config)
    try:
        log.info("users: requesting every MovieLens user once")
        candidates, version, excluded = collect_candidates(scorer_in_process, config, args.k)
        users = sorted(candidates, key=int)
        random.Random(7).shuffle(users)
        if args.users:
            users = users[:args.users]
        if not users:
            raise RuntimeError(f"no MovieLens user got a response with {args.k} items from {settings.candidates} "
                               f"candidates; left out: {dict(excluded)}")
        log.info("users: %d kept, %d left out %s", len(users), sum(excluded.values()), dict(excluded))
        predictor = wait_for_compiled(scorer_in_process, config)
        log.info("profile: %d requests in process with the %s predictor, stage by stage", args.profile_requests,
                 predictor)
        profile = profile_requests(scorer_in_process, users, args.k, args.profile_requests)
    finally:
        scorer_in_process.stop()
    candidates_path = folder / "candidates.json"
    candidates_path.write_text(json.dumps({"feature_set_version": version,
                                           "candidates": {user: candidates[user] for user in users}}),
                               encoding="utf-8")

    overrides = {"redis.key_prefix": config.redis.key_prefix, "training.model_name": config.training.model_name,
                 "kafka.served_topic": config.kafka.served_topic}
    scorer = Server("scorer", "serving.wsgi:app", folder, overrides, conf=args.gunicorn_conf)
    fetch_only = Server("fetch-only", "bench.fetch_only:app", folder, overrides,
                        {"STREAMREC_BENCH_CANDIDATES": str(candidates_path)}, conf=args.gunicorn_conf)
    log.info("worker heap: a process built like a scorer worker serves %d users, then a full collection is timed",
             min(len(users), WORKER_HEAP_USERS))
    heap = worker_heap(scorer.env, users[:WORKER_HEAP_USERS], args.k)
    for server in (scorer, fetch_only):
        servers.append(server)
        server.start()
    for server in (scorer, fetch_only):
        server.wait_ready()
    log.info("servers ready: %d workers x %d threads each", settings.workers, settings.threads)

    score_paths = [f"/v1/users/{user}/recommendations?k={args.k}" for user in users]
    fetch_paths = [f"/v1/users/{user}/fetch" for user in users]
    score_check = {"kind": "recommendations", "k": args.k}
    fetch_check = {"kind": "fetch", "items": settings.candidates}
    connections = args.connections or settings.workers * settings.threads
    timeout_s = args.timeout_seconds
    warmup_limit_s = getattr(settings, "compile_timeout_seconds", 0) + WARMUP_MARGIN_S

    warm_up(scorer, score_paths, score_check, connections, timeout_s, warmup_limit_s,
            wants_compiled=getattr(settings, "compiled_predictor", False))
    warm_up(fetch_only, fetch_paths, fetch_check, connections, timeout_s, warmup_limit_s, wants_compiled=False)

    busy_share = cpu_busy_share(5.0)
    load_before = os.getloadavg()
    log.info("machine before the load: %s of the CPU busy over 5 s, load average %.2f %.2f %.2f",
             "unknown share" if busy_share is None else f"{busy_share:.0%}", *load_before)
    predictions_before = scorer.predictions()

    log.info("fixed rate: %.0f requests/s for %.0f s on the scorer", args.rate, args.seconds)
    fixed = run_load(scorer, "open", score_paths, score_check, args.seconds, args.open_connections, timeout_s,
                     rate=args.rate)
    log_phase("fixed rate", fixed)
    if fixed["send_lag_ms"]["p99"] > 5.0:
        log.warning("the load generator sent 1%% of requests more than %.1f ms late; their latency still counts "
                    "from the scheduled time", fixed["send_lag_ms"]["p99"])

    meter = CpuMeter({"scorer": [scorer.process.pid], "fetch_only": [fetch_only.process.pid],
                      **stack_processes(config)})
    score_rounds, fetch_rounds = [], []
    for number in range(1, args.rounds + 1):
        for name, server, paths, check, results in (("scorer", scorer, score_paths, score_check, score_rounds),
                                                    ("fetch-only", fetch_only, fetch_paths, fetch_check,
                                                     fetch_rounds)):
            log.info("max throughput, round %d of %d: %s, %d connections, %.0f s", number, args.rounds, name,
                     connections, args.max_seconds)
            before = meter.sample()
            result = run_load(server, "closed", paths, check, args.max_seconds, connections, timeout_s,
                              warmup_seconds=args.max_warmup_seconds)
            result["cpu_ms_per_request"] = CpuMeter.per_request_ms(before, meter.sample(), result["cpu_s"],
                                                                   result["all_requests"])
            log_phase(f"max throughput {name}", result)
            log.info("max throughput %s: CPU ms per request %s", name,
                     ", ".join(f"{group} {ms:.3f}" for group, ms in result["cpu_ms_per_request"].items()))
            results.append(result)
    served_by = predictor_used(predictions_before, scorer.predictions())

    log.info("max throughput: /healthz on the scorer, %d connections, %.0f s", connections, args.max_seconds)
    healthz = run_load(scorer, "closed", ["/healthz"], {"kind": "status"}, args.max_seconds, connections, timeout_s,
                       warmup_seconds=args.max_warmup_seconds)
    log_phase("max throughput /healthz", healthz)
    load_after = os.getloadavg()

    phases = [fixed, *score_rounds, *fetch_rounds, healthz]
    errors = sum(phase["errors"] for phase in phases)
    score_max = median_of(score_rounds, "rate_per_s")
    fetch_max = median_of(fetch_rounds, "rate_per_s")
    lines = [
        f"score_users: {len(users)}",
        f"score_candidates_per_request: {settings.candidates}",
        f"score_k: {args.k}",
        f"score_predictor: {served_by}",
        f"server_workers: {settings.workers}",
        f"server_threads: {settings.threads}",
        f"score_fixed_rate_req_per_s: {args.rate:.0f}",
        f"score_fixed_rate_requests: {fixed['requests']}",
        f"score_p50_ms: {fixed['latency_ms']['p50']:.2f}",
        f"score_p99_ms: {fixed['latency_ms']['p99']:.2f}",
        f"score_fixed_rate_max_ms: {fixed['latency_ms']['max']:.2f}",
        f"score_max_req_per_s: {score_max:.0f}",
        f"fetch_only_max_req_per_s: {fetch_max:.0f}",
        f"score_vs_fetch_only_ratio: {score_max / fetch_max:.3f}",
        f"healthz_max_req_per_s: {healthz['rate_per_s']:.0f}",
        f"closed_loop_connections: {connections}",
        f"loadgen_core_share_score_max: {median_of(score_rounds, 'cpu_s') / median_of(score_rounds, 'elapsed_s'):.2f}",
        f"loadgen_core_share_fetch_only_max: "
        f"{median_of(fetch_rounds, 'cpu_s') / median_of(fetch_rounds, 'elapsed_s'):.2f}",
        f"cpu_busy_share_before_load: {'nan' if busy_share is None else f'{busy_share:.2f}'}",
        f"load_average_1m_before_load: {load_before[0]:.2f}",
        f"load_average_1m_after_load: {load_after[0]:.2f}",
        *cpu_lines("score_max", score_rounds, idle_group="fetch_only"),
        *cpu_lines("fetch_only_max", fetch_rounds, idle_group="scorer"),
        *(f"{name}: {value:.3f}" for name, value in profile.items()),
        f"worker_gc_tracked_objects: {heap['tracked_objects']}",
        f"worker_gc_full_collection_ms: {heap['full_collection_ms']:.1f}",
        f"errors: {errors}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    if errors:
        for phase in phases:
            for sample in phase["error_samples"]:
                log.error("%s phase: %s", phase["mode"], sample)
        log.error("%d requests failed or were not scored; the figures above do not count", errors)
        return 1
    return 0


def cpu_lines(prefix: str, rounds: list[dict], idle_group: str) -> list[str]:
    """Return ``<prefix>_cpu_ms_per_request_<group>`` lines (medians over the rounds), without the idle server."""
    groups = [group for group in rounds[0]["cpu_ms_per_request"] if group != idle_group]
    return [f"{prefix}_cpu_ms_per_request_{group}: "
            f"{statistics.median(result['cpu_ms_per_request'][group] for result in rounds):.3f}" for group in groups]


def worker_heap(env: dict, users: list[str], k: int) -> dict:
    """Run bench/scorer_profile.py's ``worker_heap`` in a process with the scorer's environment; return its result."""
    # Without the multiprocess folder the app keeps its metrics in memory, as a single process does.
    env = {name: value for name, value in env.items() if name != "PROMETHEUS_MULTIPROC_DIR"}
    finished = subprocess.run([sys.executable, str(BENCH / "scorer_profile.py")],
                              input=json.dumps({"users": users, "k": k}), capture_output=True, text=True,
                              timeout=READY_TIMEOUT_S + 60, cwd=PROJECT_ROOT, env=env)
    if finished.returncode != 0:
        raise RuntimeError(f"the worker heap measurement failed (status {finished.returncode}): "
                           f"{finished.stderr[-2000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def predictor_used(before: dict, after: dict) -> str:
    """Return which predictors scored requests between two readings of ``Server.predictions`` ("none" if none)."""
    used = sorted(kind for kind, count in after.items() if count > before.get(kind, 0.0))
    return "+".join(used) or "none"


def warm_up(server: Server, paths: list[str], check: dict, connections: int, timeout_s: float, limit_s: float,
            wants_compiled: bool) -> None:
    """Send closed-loop load until a round has no error and, when ``wants_compiled``, only compiled predictions.

    Gives up after ``limit_s``: the scorer's workers compile or load the predictor in the background.
    """
    deadline = time.monotonic() + limit_s
    number = 0
    while True:
        number += 1
        before = server.predictions() if wants_compiled else {}
        result = run_load(server, "closed", paths, check, WARMUP_ROUND_S, connections, timeout_s)
        used = predictor_used(before, server.predictions()) if wants_compiled else "any"
        if result["errors"] == 0 and used in ("any", "compiled"):
            log.info("%s: warmed up in %d rounds of %d s (%.0f requests/s in the last, predictor %s)", server.name,
                     number, WARMUP_ROUND_S, result["rate_per_s"], used)
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} was not warmed up within {limit_s:.0f} s (last round: "
                               f"{result['errors']} errors, predictor {used}); see {server.log_path}")
        log.info("%s: warm-up round %d: %d errors (for example %s), predictor %s", server.name, number,
                 result["errors"], result["error_samples"][:1], used)
        time.sleep(2)


def log_phase(name: str, result: dict) -> None:
    latency = result["latency_ms"]
    log.info("%s: %d requests, %.0f/s, %d errors, latency p50 %.2f ms p99 %.2f ms max %.2f ms, "
             "load generator %.2f s CPU in %.1f s", name, result["requests"], result["rate_per_s"], result["errors"],
             latency["p50"], latency["p99"], latency["max"], result["cpu_s"], result["elapsed_s"])


if __name__ == "__main__":
    sys.exit(main())
