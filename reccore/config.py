"""Typed configuration: one YAML file per environment in conf/, overridden by the environment.

Precedence, lowest first:
1. the file ``conf/<env>.yaml``; inside it ``${NAME}`` and ``${NAME:default}`` take values from the
   environment (``STREAMREC_HOME`` defaults to ``.work`` in the project);
2. environment variables ``STREAMREC__<SECTION>__<FIELD>`` (for example
   ``STREAMREC__INGEST__TRIGGER=available_now``); a dictionary field takes a YAML mapping;
3. explicit overrides passed by a job's command line, in the same dotted form.

Unknown keys and values of the wrong type raise ConfigError naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "STREAMREC__"
SECRET_KEY_PATTERN = re.compile(r"password|secret|token|jaas|credential|api_key", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


# Java Kafka client settings that librdkafka rejects; they reach Spark's source but not Python clients.
JAVA_ONLY_KAFKA_OPTIONS = frozenset({"sasl.jaas.config", "sasl.client.callback.handler.class",
                                     "sasl.login.callback.handler.class", "ssl.endpoint.identification.algorithm"})


class ConfigError(ValueError):
    """Invalid configuration: the message names the key, the value and the source."""


@dataclass(frozen=True)
class TopicConfig:
    """A Kafka topic the local stack creates."""

    name: str
    partitions: int = 2
    retention_ms: int = 604_800_000


@dataclass(frozen=True)
class KafkaConfig:
    """Kafka connection and topic names."""

    bootstrap_servers: str = "127.0.0.1:9092"
    interactions_topic: str = "interactions"
    served_topic: str = "recommendations_served"
    # Client settings (SASL, TLS, ...), passed to Spark as kafka.<key> and to Python clients as is.
    options: dict = field(default_factory=dict)
    # Topics the local stack creates: name, partitions, retention_ms.
    topics: list = field(default_factory=list)

    def client_options(self) -> dict:
        """Return settings for the Python clients (confluent-kafka/librdkafka).

        ``options`` is written for Spark's Java client; the keys librdkafka does not know are left
        out here (SASL/SCRAM credentials go in ``sasl.username``/``sasl.password`` for it).
        """
        settings = {key: str(value) for key, value in self.options.items() if key not in JAVA_ONLY_KAFKA_OPTIONS}
        settings["bootstrap.servers"] = self.bootstrap_servers
        return settings

    def topic_configs(self) -> list:
        """Return ``topics`` as TopicConfig objects."""
        configs = []
        for entry in self.topics:
            if not isinstance(entry, dict) or "name" not in entry:
                raise ConfigError(f"kafka.topics entries need at least a name, found {entry!r}")
            configs.append(TopicConfig(name=str(entry["name"]), partitions=int(entry.get("partitions", 2)),
                                       retention_ms=int(entry.get("retention_ms", 604_800_000))))
        return configs


@dataclass(frozen=True)
class LakeConfig:
    """Locations of the Delta tables and streaming checkpoints (a folder, s3a:// or s3://)."""

    root: str = ".work/lake"
    checkpoint_root: str = ".work/checkpoints"

    def table(self, name: str) -> str:
        """Return the path of a table given as ``layer/name``, for example ``bronze/events``."""
        return f"{self.root.rstrip('/')}/{name}"

    def checkpoint(self, name: str) -> str:
        """Return the checkpoint folder of the streaming query ``name``."""
        return f"{self.checkpoint_root.rstrip('/')}/{name}"


@dataclass(frozen=True)
class SparkConfig:
    """Spark master and settings applied to every session the jobs build."""

    master: str = "local[2]"
    shuffle_partitions: int = 2
    conf: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EventsConfig:
    """Validation rules of interaction events, applied by reccore.events."""

    event_types: list = field(default_factory=lambda: ["view", "click", "add_to_cart", "purchase", "rating"])
    # Inclusive [min, max] of ``value`` per event type; a type not listed takes no value.
    value_ranges: dict = field(default_factory=lambda: {"rating": [0.5, 5.0], "purchase": [0.0, 1e6]})
    value_required: list = field(default_factory=lambda: ["rating"])
    event_time_floor: str = "1995-01-01T00:00:00Z"
    max_future_seconds: int = 86_400


@dataclass(frozen=True)
class IngestConfig:
    """The streaming ingest job: topic ``interactions`` to Delta bronze ``events``."""

    trigger: str = "processing_time"
    trigger_interval_seconds: float = 5.0
    starting_offsets: str = "earliest"
    max_offsets_per_trigger: int = 200_000
    fail_on_data_loss: bool = True
    # An event older than the newest event time seen so far by this much counts as late.
    late_threshold_seconds: int = 600
    # The part of bronze the dedup merge compares a batch with. "event_month" reads only the months
    # the batch touches, because a copy of an event has the same event time and so the same month.
    # "table" reads every event id in bronze, at a cost that grows with the table.
    dedup_scope: str = "event_month"
    write_retries: int = 5
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9108


@dataclass(frozen=True)
class FeaturesConfig:
    """The streaming features job: bronze to tiles, feature history and Redis."""

    trigger: str = "processing_time"
    trigger_interval_seconds: float = 5.0
    # Events older than the newest event time seen minus this are late: counted, and left to the
    # next backfill.
    watermark_seconds: int = 600
    # Consecutive restarts from the checkpoint after a failed micro-batch before giving up, and the
    # delay before the first one (it doubles with each consecutive failure).
    max_restarts: int = 5
    restart_delay_seconds: float = 10.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9109


@dataclass(frozen=True)
class TrainingConfig:
    """Labels, the training set, the model and the promotion gate."""

    # Labels from bronze. A rating gets the relevance of the highest threshold it reaches (below
    # the lowest one: 0, a negative). Events of the positive types get 1, of the negative types 0;
    # other types are not labelled.
    relevance_by_rating: dict = field(default_factory=lambda: {4.0: 1, 5.0: 2})
    positive_event_types: list = field(default_factory=lambda: ["purchase", "add_to_cart"])
    negative_event_types: list = field(default_factory=list)
    # Sampled negatives per labelled positive: items the user had not touched as of the label,
    # drawn by popularity before it, with this seed.
    negatives_per_positive: float = 1.0
    seed: int = 42
    # Time split of the labelled events: the last test_fraction of them (by event time) is the
    # test period and the validation_fraction before it the validation period.
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    k: int = 10
    # The quality gate refuses a training set with fewer examples.
    min_examples: int = 1000
    # Feature rows and labels ingested after this instant (ISO-8601) are left out; empty means the
    # time the training-set build starts.
    ingest_cutoff: str = ""
    experiment: str = "streamrec-ranking"
    model_name: str = "streamrec-ranker"
    # Registration needs NDCG@k on warm users at least (1 + baseline_margin) times popularity's.
    # Promotion needs promotion_metric ("auc": over the test period's examples; "ndcg": warm
    # NDCG@k) at least (1 + promotion_margin) times the champion's on the same split.
    baseline_margin: float = 0.0
    promotion_metric: str = "auc"
    promotion_margin: float = 0.005
    lightgbm: dict = field(default_factory=lambda: {
        "objective": "binary", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 50,
        "feature_fraction": 0.9, "num_threads": 2})
    max_rounds: int = 500
    early_stopping_rounds: int = 30


@dataclass(frozen=True)
class ServingConfig:
    """The scorer: model alias, candidates, budgets and limits."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_alias: str = "champion"
    # How often each worker checks the registry for a move of the alias.
    model_poll_seconds: float = 10.0
    # Score with the model version compiled by lleaves once it is built. The native booster serves
    # until then, and goes on serving a version whose build failed.
    compiled_predictor: bool = True
    # Compiled models, shared by the workers of one machine so that each version is compiled once.
    # A relative path is under the project root.
    compiled_cache_dir: str = ".work/compiled-models"
    # The maximum wait, in seconds, for a version's compile, a worker's own or another worker's.
    compile_timeout_seconds: float = 600.0
    # Candidates generated when the caller gives none, before the user's consumed items are removed.
    candidates: int = 200
    max_k: int = 100
    max_candidates: int = 1000
    # Room for max_candidates ids of the longest length (128 characters) and the rest of the body.
    max_body_bytes: int = 262144
    # Features older than this (by the user's newest event) are served but flagged stale.
    max_feature_age_seconds: float = 2_592_000
    # Item vectors are cached in each worker this long, up to this many items.
    item_cache_seconds: float = 5.0
    item_cache_size: int = 50_000
    # A Redis call slower than this makes the request use the fallback ranking.
    redis_timeout_ms: float = 50.0
    # "now" for the recency inputs and the feature age: "wall" (live traffic) or "event_time" (the
    # stream's event-time clock, for a replay of history: the scale training saw).
    clock: str = "wall"
    # A request still fetching features after this long gets the fallback ranking (over_budget).
    request_budget_ms: float = 100.0
    # Publish what was served to kafka.served_topic; beyond this many messages waiting in the
    # producer's buffer a record is dropped and counted, never waited for.
    served_log: bool = True
    served_log_buffer: int = 10_000
    # Name of the environment variable with comma-separated API keys; empty or unset: no keys needed.
    api_keys_env: str = "STREAMREC_API_KEYS"
    workers: int = 2
    threads: int = 4


@dataclass(frozen=True)
class MonitoringConfig:
    """Settings of the served log's ingest to Delta and of the online accuracy computed from it."""

    # The served-log ingest (Kafka served_topic -> Delta served/recommendations).
    served_trigger: str = "processing_time"
    served_trigger_interval_seconds: float = 10.0
    # Online precision@k and recall@k: a served list is judged against the user's positive events
    # (training's relevance rules) in this much event time after it was served.
    online_k: int = 10
    online_horizon_seconds: int = 604_800
    # Whether fallback responses (popularity) count in the online metrics.
    online_include_fallbacks: bool = False


@dataclass(frozen=True)
class RedisConfig:
    """Online store connection."""

    host: str = "127.0.0.1"
    port: int = 6379
    password: str = ""
    # Every key starts with this prefix; feature keys also carry the feature-set version.
    key_prefix: str = "streamrec"
    # Refreshed on every write; long enough that expiry never removes the last good value while
    # the pipeline is down (staleness is judged at read time).
    ttl_seconds: int = 7_776_000
    # Also keep each entity's values as a hash of named fields, for people and tools. The scorer
    # reads only the packed vectors, and without the hash a write costs about a quarter as much.
    readable_hash: bool = True


@dataclass(frozen=True)
class MlflowConfig:
    """Tracking server and model registry."""

    tracking_uri: str = "http://127.0.0.1:5000"


@dataclass(frozen=True)
class StackConfig:
    """The local stack (devstack): service ports, versions and its state folder."""

    home: str = ".work/stack"
    """Folder for the services' data, pid files and logs; a relative path is under the project root."""
    kafka_version: str = "4.1.1"
    """Version of the org.apache.kafka:kafka_2.13 broker fetched from Maven Central."""
    kafka_port: int = 9092
    """Loopback port of the broker's PLAINTEXT listener (clients)."""
    kafka_controller_port: int = 9093
    """Loopback port of the KRaft controller listener; fixed once the storage is formatted."""
    kafka_heap_mb: int = 512
    """Maximum JVM heap of the broker (-Xmx), in MiB."""
    kafka_start_timeout_seconds: float = 60.0
    """How long ``up`` waits for the broker to return metadata before it fails."""
    redis_port: int = 6379
    """Loopback port of redis-server."""
    redis_maxmemory_mb: int = 1024
    """Redis maxmemory in MiB; with the noeviction policy, writes past it fail instead of evicting keys."""
    mlflow_port: int = 5000
    """Loopback port of the MLflow tracking server."""
    mlflow_start_timeout_seconds: float = 120.0
    """How long ``up`` waits for MLflow's /health endpoint before it fails."""


@dataclass(frozen=True)
class Config:
    """The resolved configuration of one environment."""

    environment: str = "local"
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    lake: LakeConfig = field(default_factory=LakeConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    stack: StackConfig = field(default_factory=StackConfig)

    def masked(self) -> dict:
        """Return the configuration as a dictionary with every secret replaced by ``***``."""
        return _mask(dataclasses.asdict(self))


def default_home() -> str:
    """Return STREAMREC_HOME, the folder for local state (default: .work in the project)."""
    return os.environ.get("STREAMREC_HOME") or str(PROJECT_ROOT / ".work")


def config_path(env: str, environ: Mapping[str, str] | None = None) -> Path:
    """Return the YAML file of environment ``env`` (STREAMREC_CONF_DIR overrides conf/)."""
    environ = os.environ if environ is None else environ
    conf_dir = Path(environ.get("STREAMREC_CONF_DIR") or PROJECT_ROOT / "conf")
    path = conf_dir / f"{env}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in conf_dir.glob("*.yaml"))
        raise ConfigError(f"environment {env!r} has no config file {path}; known environments: {known}")
    return path


def load_config(env: str | None = None, overrides: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Load ``conf/<env>.yaml``, apply environment and explicit overrides, and type-check it.

    ``env`` defaults to STREAMREC_ENV, then ``local``. ``overrides`` maps dotted keys
    (``ingest.trigger``) to values.
    """
    environ = dict(os.environ if environ is None else environ)
    environ.setdefault("STREAMREC_HOME", default_home())
    env = env or environ.get("STREAMREC_ENV") or "local"
    path = config_path(env, environ)

    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, found {type(raw).__name__}")
    raw = _interpolate(raw, environ, str(path))

    for name, value in environ.items():
        if name.startswith(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
            _set_dotted(raw, dotted, yaml.safe_load(value) if value != "" else "", f"environment {name}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, "command line")

    return _build(Config, raw, str(path))


def log_config(config: Config, logger: logging.Logger | None = None) -> None:
    """Log the resolved configuration on one line, secrets masked."""
    (logger or log).info("resolved config (%s): %s", config.environment, config.masked())


def _mask(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, key) for v in value]
    if key and SECRET_KEY_PATTERN.search(key) and value not in ("", None):
        return "***"
    return value


def _interpolate(value: Any, environ: Mapping[str, str], source: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, environ, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, environ, source) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is None:
            raise ConfigError(f"{source}: ${{{name}}} is not set in the environment and has no default; "
                              f"set {name} or write ${{{name}:default}}")
        return default

    return _PLACEHOLDER.sub(replace, value)


def _set_dotted(raw: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set {dotted!r} because {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section {prefix or '<top>'!r} must be a mapping, found {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section {prefix!r}" if prefix else "the top level"
        raise ConfigError(f"{source}: unknown key(s) {unknown} in {where}; known keys: {sorted(fields)}")

    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _coerce(hints[name], value, source, key)
    return cls(**values)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, source, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is dict:
        if isinstance(value, dict):
            return dict(value)
        if value in (None, ""):
            return {}
    elif hint is list:
        if isinstance(value, list):
            return list(value)
    expected = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{source}: {key} must be {expected}, found {value!r}")


def main(argv: list[str] | None = None) -> int:
    """Print one resolved config value: ``python -m reccore.config [--env NAME] KEY``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m reccore.config", description=main.__doc__)
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml)")
    parser.add_argument("key", help="dotted key, e.g. spark.master")
    args = parser.parse_args(argv)
    try:
        value: Any = dataclasses.asdict(load_config(args.env))
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    walked = []
    for part in args.key.split("."):
        if not isinstance(value, dict) or part not in value:
            known = sorted(value) if isinstance(value, dict) else []
            where = ".".join(walked) or "the top level"
            sys.stderr.write(f"error: {args.key!r} is not a config key; keys under {where}: {known}\n")
            return 2
        value = value[part]
        walked.append(part)
    if isinstance(value, (dict, list)):
        sys.stdout.write(yaml.safe_dump(value, sort_keys=False))
    else:
        sys.stdout.write(f"{value}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
