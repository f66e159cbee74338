"""The training commands' --dry-run and argument checks: no Spark, no services."""

from __future__ import annotations

import logging

import pytest

from jobs import train, training_set


def test_training_set_dry_run(caplog):
    with caplog.at_level(logging.INFO, logger="jobs.training_set"):
        assert training_set.main(["--dry-run", "--ingest-cutoff", "2026-12-01T00:00:00Z"]) == 0
    assert "dry run: would read" in caplog.text
    assert "gold/training_examples" in caplog.text
    assert "2026-12-01T00:00:00Z" in caplog.text


def test_training_set_rejects_bad_cutoff(caplog):
    assert training_set.main(["--dry-run", "--ingest-cutoff", "yesterday"]) == 2
    assert "ingest cut-off 'yesterday' is not an ISO-8601 instant" in caplog.text


def test_parse_instant_without_offset_is_utc():
    assert training_set.parse_instant_ms("2026-12-01T00:00:00") == 1_796_083_200_000
    assert training_set.parse_instant_ms("2026-12-01T01:00:00+01:00") == 1_796_083_200_000


def test_train_dry_run(caplog):
    with caplog.at_level(logging.INFO, logger="jobs.train"):
        assert train.main(["--dry-run", "--training-set-version", "3"]) == 0
    assert "dry run: would train on" in caplog.text
    assert "(version 3)" in caplog.text


def test_train_rejects_sample_fraction():
    with pytest.raises(SystemExit):
        train.main(["--dry-run", "--sample-fraction", "1.5"])
