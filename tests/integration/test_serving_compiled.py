"""The compiled predictor in the scorer, with the real MovieLens champion, Redis and the tracking server."""

from __future__ import annotations

import dataclasses
import logging
import re
import time

import numpy as np
import pytest

from serving.app import create_app
from tests.conftest import with_overrides

pytestmark = [pytest.mark.integration, pytest.mark.spark]

# The compile of the MovieLens champion takes seconds on 2 cores; this bounds a stuck one.
READY_TIMEOUT_S = 300.0
# Compiled and native scores agree to a few ulp: lleaves adds the trees in another order.
TOLERANCE = 1e-12


class RecordingPredictor:
    """Pass calls to ``predictor`` and keep each input matrix and output."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.kind = predictor.kind
        self.calls = []

    def feature_name(self) -> list:
        return self.predictor.feature_name()

    def predict(self, rows):
        scores = self.predictor.predict(rows)
        self.calls.append((rows, scores))
        return scores


def wait_for_compiled(holder, timeout_s: float = READY_TIMEOUT_S) -> float:
    """Wait until the holder serves a compiled predictor; return the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if holder.current is not None and holder.current.predictor.kind == "compiled":
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"no compiled predictor after {timeout_s} s; native still serves")


def metric_value(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_compiled_scores_served_equal_native(movielens_champion, tmp_path, caplog):
    config = with_overrides(movielens_champion, serving={"compiled_cache_dir": str(tmp_path / "compiled")})
    # MovieLens items, then ten ids without features, whose rows are all NaN (missing).
    candidates = [str(number) for number in range(1, 191)] + [str(number) for number in range(999990, 1000000)]
    with caplog.at_level(logging.INFO, logger="serving"):
        app = create_app(config)
        holder = app.extensions["streamrec"]["holder"]
        try:
            assert holder.current is not None
            assert holder.current.predictor.kind == "native"
            wait_for_compiled(holder)

            # Wrap the served predictor to see the exact matrix each request scores.
            recorder = RecordingPredictor(holder.current.predictor)
            holder.current = dataclasses.replace(holder.current, predictor=recorder)
            client = app.test_client()
            recommended = client.get("/v1/users/414/recommendations?k=50")
            ranked = client.post("/v1/rank", json={"user_id": "414", "candidates": candidates, "k": 100})
            metrics = client.get("/metrics").get_data(as_text=True)
        finally:
            holder.stop()

    booster = holder.current.booster
    assert recommended.status_code == 200, recommended.json
    assert ranked.status_code == 200, ranked.json
    assert recommended.json["fallback"] is False
    assert ranked.json["fallback"] is False
    assert len(recorder.calls) == 2
    for rows, compiled in recorder.calls:
        assert rows.shape[1] == booster.num_feature()
        np.testing.assert_allclose(compiled, booster.predict(rows), rtol=0, atol=TOLERANCE)

    rows, _compiled = recorder.calls[0]
    native = booster.predict(rows)
    served = [item["score"] for item in recommended.json["items"]]
    assert len(served) == 50
    np.testing.assert_allclose(served, np.sort(native)[::-1][:50], rtol=0, atol=TOLERANCE)

    rows, _compiled = recorder.calls[1]
    assert rows.shape[0] == len(candidates)
    assert np.isnan(rows[-10:]).any(axis=1).all()
    native = booster.predict(rows)
    expected = sorted(range(len(candidates)), key=lambda index: (-native[index], candidates[index]))[:100]
    assert [item["item_id"] for item in ranked.json["items"]] == [candidates[index] for index in expected]
    np.testing.assert_allclose([item["score"] for item in ranked.json["items"]], native[expected], rtol=0, atol=TOLERANCE)

    assert metric_value(metrics, "streamrec_scorer_predictions_total", 'predictor="compiled"') == 2.0
    assert metric_value(metrics, "streamrec_scorer_predictions_total", 'predictor="native"') == 0.0
    assert metric_value(metrics, "streamrec_scorer_predictor_compile_seconds_count", 'outcome="compiled"') == 1.0
    assert f"version {recommended.json['model_version']}: predictor compiled in" in caplog.text

    # A second worker on the machine loads the file instead of compiling it again.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="serving"):
        second = create_app(config)
        second_holder = second.extensions["streamrec"]["holder"]
        try:
            wait_for_compiled(second_holder, 60)
            metrics = second.test_client().get("/metrics").get_data(as_text=True)
        finally:
            second_holder.stop()
    assert metric_value(metrics, "streamrec_scorer_predictor_compile_seconds_count", 'outcome="cache"') == 1.0
    assert metric_value(metrics, "streamrec_scorer_predictor_compile_seconds_count", 'outcome="compiled"') == 0.0
    assert "compiled predictor loaded from cache" in caplog.text
    assert "compiling the predictor" not in caplog.text
