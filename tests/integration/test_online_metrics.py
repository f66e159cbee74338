"""Online precision@k and recall@k on a hand-built served log and later events, against hand-computed values."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pytest

from jobs import bronze
from jobs.online_metrics import METRICS_TABLE, compute_online_metrics
from jobs.served_ingest import SERVED_TABLE
from tests.conftest import with_overrides

pytestmark = [pytest.mark.spark]

CLOCK = 1_000_000  # ms: the stream's event-time clock when r1, r3, r4 and r5 were served


def served(request_id, user_id, items, clock_ms, version="1", fallback=None):
    return {"request_id": request_id, "user_id": user_id, "items": items, "scores": [0.5] * len(items),
            "model_name": "ranker", "model_version": version, "feature_set_version": "v1",
            "fallback_reason": fallback, "k": 3, "served_at_ms": 1_800_000_000_000, "event_time_ms": clock_ms}


# The served lists, and the reasoning per list (k = 3, horizon 100 s after the clock):
SERVED = [
    # u1 later positives in (1,000,000, 1,100,000]: a (rating 4), d (purchase). Not b (past the
    # horizon), not c (rating 2), not the a before the clock. Hits {a}: precision 1/3, recall 1/2.
    served("r1", "u1", ["a", "b", "c"], CLOCK),
    # u1 served again later: in (1,100,000, 1,200,000] only b (exactly at the horizon's end). Hits 0.
    served("r2", "u1", ["d", "e", "f"], CLOCK + 100_000),
    # u2 (model version 2): later positives b (add_to_cart) and a (rating 5); the rating 5 of e at the
    # clock itself is not later. Hits {a, b}: precision 2/3, recall 1.
    served("r3", "u2", ["a", "b", "x"], CLOCK, version="2"),
    # u3 has no later positive: not judged.
    served("r4", "u3", ["a", "b", "c"], CLOCK),
    # A fallback list of u2: judged only with fallbacks included. Hits {b}: precision 1/3, recall 1/2.
    served("r5", "u2", ["b", "z", "y"], CLOCK, version="2", fallback="unknown_user"),
    # No event-time clock: cannot be judged.
    served("r6", "u1", ["a", "d", "b"], None),
]

EVENTS = [
    ("u1", "a", "rating", 3.0, CLOCK - 1_000),
    ("u1", "a", "rating", 4.0, CLOCK + 500),
    ("u1", "d", "purchase", None, CLOCK + 1_000),
    ("u1", "c", "rating", 2.0, CLOCK + 600),
    ("u1", "b", "rating", 5.0, CLOCK + 200_000),
    ("u2", "b", "add_to_cart", None, CLOCK + 1),
    ("u2", "a", "rating", 5.0, CLOCK + 50_000),
    ("u2", "e", "rating", 5.0, CLOCK),
    ("u3", "a", "view", None, CLOCK + 10),
]


@pytest.fixture
def lake_config(spark, base_config, tmp_path):
    config = with_overrides(base_config, lake={"root": str(tmp_path / "lake"),
                                               "checkpoint_root": str(tmp_path / "checkpoints")},
                            monitoring={"online_k": 3, "online_horizon_seconds": 100})
    # r2's window ends at 1,200,000 ms: b's rating there is inside it (the window is (clock, clock + horizon]).
    rows = [dataclasses.asdict(bronze_row(*event, number)) for number, event in enumerate(EVENTS)]
    spark.createDataFrame(rows, bronze.EVENTS_SCHEMA).write.format("delta").save(config.lake.table(bronze.EVENTS_TABLE))
    spark.createDataFrame(SERVED, "request_id string, user_id string, items array<string>, scores array<double>, "
                                  "model_name string, model_version string, feature_set_version string, "
                                  "fallback_reason string, k int, served_at_ms long, event_time_ms long") \
        .write.format("delta").save(config.lake.table(SERVED_TABLE))
    return config


@dataclasses.dataclass
class BronzeRow:
    event_id: str
    event_time: datetime
    user_id: str
    item_id: str
    event_type: str
    value: float | None
    session_id: str | None
    context: dict | None
    extra_fields: dict | None
    ingest_time: datetime
    kafka_topic: str | None
    kafka_partition: int | None
    kafka_offset: int | None


def bronze_row(user, item, event_type, value, event_ms, number) -> BronzeRow:
    when = datetime.fromtimestamp(event_ms / 1000, tz=timezone.utc).replace(tzinfo=None)
    return BronzeRow(f"e{number}", when, user, item, event_type, value, None, None, None, when, None, None, None)


def test_precision_and_recall_by_hand(spark, lake_config):
    overall, version_1, version_2 = compute_online_metrics(spark, lake_config)
    # u1: lists r1 (1/3, 1/2) and r2 (0, 0) -> (1/6, 1/4); u2: r3 (2/3, 1). Users averaged.
    assert (overall.users, overall.lists) == (2, 3)
    assert overall.precision_at_k == pytest.approx((1 / 6 + 2 / 3) / 2)
    assert overall.recall_at_k == pytest.approx((1 / 4 + 1) / 2)
    assert (version_1.model_version, version_1.users, version_1.lists) == ("1", 1, 2)
    assert version_1.precision_at_k == pytest.approx(1 / 6)
    assert version_1.recall_at_k == pytest.approx(1 / 4)
    assert (version_2.model_version, version_2.users) == ("2", 1)
    assert version_2.precision_at_k == pytest.approx(2 / 3)
    assert version_2.recall_at_k == pytest.approx(1.0)
    stored = spark.read.format("delta").load(lake_config.lake.table(METRICS_TABLE))
    assert stored.count() == 3
    assert {row["model_version"] for row in stored.collect()} == {"all", "1", "2"}


def test_fallbacks_included_when_asked(spark, lake_config):
    overall = compute_online_metrics(spark, lake_config, include_fallbacks=True, write=False)[0]
    # u2 now has r3 (2/3, 1) and r5 (1/3, 1/2) -> (1/2, 3/4); u1 as before (1/6, 1/4).
    assert (overall.users, overall.lists) == (2, 4)
    assert overall.precision_at_k == pytest.approx((1 / 6 + 1 / 2) / 2)
    assert overall.recall_at_k == pytest.approx((1 / 4 + 3 / 4) / 2)


def test_missing_served_log_is_named(spark, base_config, tmp_path):
    config = with_overrides(base_config, lake={"root": str(tmp_path / "empty")})
    with pytest.raises(FileNotFoundError, match="run served-ingest first"):
        compute_online_metrics(spark, config)
