"""Config loading: file, placeholders, environment overrides, type errors and secret masking."""

import logging

import pytest

from reccore.config import ConfigError, load_config, log_config


def write_conf(tmp_path, text: str) -> dict:
    (tmp_path / "test.yaml").write_text(text, encoding="utf-8")
    return {"STREAMREC_CONF_DIR": str(tmp_path), "STREAMREC_HOME": "/srv/rec"}


def test_local_config_loads():
    config = load_config("local", environ={"STREAMREC_HOME": "/srv/rec"})
    assert config.environment == "local"
    assert config.lake.root == "/srv/rec/lake"
    assert config.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert [topic.name for topic in config.kafka.topic_configs()] == ["interactions", "recommendations_served"]


def test_emr_config_loads():
    config = load_config("emr", environ={"STREAMREC_HOME": "/srv/rec"})
    assert config.spark.master == "yarn"
    assert config.lake.root.startswith("s3://")


def test_placeholder_default_and_environment():
    environ = {"STREAMREC_HOME": "/h", "STREAMREC_KAFKA_PORT": "19092"}
    assert load_config("local", environ=environ).kafka.bootstrap_servers == "127.0.0.1:19092"


def test_environment_override_typed():
    environ = {"STREAMREC_HOME": "/h", "STREAMREC__INGEST__MAX_OFFSETS_PER_TRIGGER": "1000",
               "STREAMREC__INGEST__FAIL_ON_DATA_LOSS": "false", "STREAMREC__INGEST__TRIGGER": "available_now"}
    ingest = load_config("local", environ=environ).ingest
    assert ingest.max_offsets_per_trigger == 1000
    assert ingest.fail_on_data_loss is False
    assert ingest.trigger == "available_now"


def test_explicit_override_wins_over_environment():
    environ = {"STREAMREC_HOME": "/h", "STREAMREC__INGEST__TRIGGER": "available_now"}
    config = load_config("local", overrides={"ingest.trigger": "processing_time"}, environ=environ)
    assert config.ingest.trigger == "processing_time"


def test_unknown_key_rejected(tmp_path):
    environ = write_conf(tmp_path, "ingest:\n  trigerr: available_now\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['trigerr'\] in section 'ingest'"):
        load_config("test", environ=environ)


def test_wrong_type_rejected(tmp_path):
    environ = write_conf(tmp_path, "ingest:\n  max_offsets_per_trigger: lots\n")
    with pytest.raises(ConfigError, match="ingest.max_offsets_per_trigger must be int, found 'lots'"):
        load_config("test", environ=environ)


def test_missing_placeholder_rejected(tmp_path):
    environ = write_conf(tmp_path, "lake:\n  root: ${NOT_SET_ANYWHERE}/lake\n")
    with pytest.raises(ConfigError, match=r"NOT_SET_ANYWHERE\} is not set"):
        load_config("test", environ=environ)


def test_unknown_environment_lists_known():
    with pytest.raises(ConfigError, match="known environments: .*'local'"):
        load_config("nowhere", environ={"STREAMREC_HOME": "/h"})


def test_secrets_masked_in_log(caplog):
    environ = {"STREAMREC_HOME": "/h", "STREAMREC__REDIS__PASSWORD": "hunter2",
               "STREAMREC__KAFKA__OPTIONS": "{sasl.jaas.config: 'user=\"u\" password=\"p\"', security.protocol: SSL}"}
    config = load_config("local", environ=environ)
    assert config.redis.password == "hunter2"
    with caplog.at_level(logging.INFO):
        log_config(config)
    assert "hunter2" not in caplog.text
    assert 'password="p"' not in caplog.text
    assert "'security.protocol': 'SSL'" in caplog.text
    assert "***" in caplog.text


def test_default_body_limit_holds_the_largest_valid_rank_request():
    import json

    serving = load_config("local", environ={"STREAMREC_HOME": "/tmp/streamrec-test"}).serving
    largest = {"user_id": "u" * 128, "candidates": [f"{number:0>128}" for number in range(serving.max_candidates)],
               "k": serving.max_k}
    assert len(json.dumps(largest).encode()) <= serving.max_body_bytes


def test_compiled_predictor_settings():
    for env in ("local", "emr"):
        serving = load_config(env, environ={"STREAMREC_HOME": "/srv/rec"}).serving
        assert serving.compiled_predictor is True
        assert serving.compiled_cache_dir == "/srv/rec/compiled-models"
        assert serving.compile_timeout_seconds == 600.0
    environ = {"STREAMREC_HOME": "/h", "STREAMREC__SERVING__COMPILED_PREDICTOR": "false"}
    assert load_config("local", environ=environ).serving.compiled_predictor is False
