"""The event contract: every rule, with the value that breaks it."""

import json
import time

import pytest

from reccore.config import EventsConfig
from reccore.events import (EVENT_TIME_BEFORE_FLOOR, EVENT_TIME_IN_FUTURE, INVALID_EVENT_TIME, INVALID_ID,
                            INVALID_JSON, MISSING_FIELD, UNKNOWN_EVENT_TYPE, VALUE_NOT_ALLOWED,
                            VALUE_OUT_OF_RANGE, WRONG_TYPE, Event, EventRules, Rejection, is_valid_id,
                            validate)

RULES = EventRules.from_config(EventsConfig())
NOW_MS = int(time.time() * 1000)
GOOD = {"event_id": "e-1", "event_time": "2018-09-24T14:27:30+00:00", "user_id": "42", "item_id": "7",
        "event_type": "rating", "value": 4.5}


def check(record) -> Event | Rejection:
    raw = record if isinstance(record, bytes) else json.dumps(record).encode()
    return validate(raw, RULES, NOW_MS)


def with_fields(**changes):
    record = dict(GOOD)
    for key, value in changes.items():
        if value is ...:
            record.pop(key)
        else:
            record[key] = value
    return record


def test_valid_rating_parsed():
    event = check(GOOD)
    assert isinstance(event, Event)
    assert event.event_time_ms == 1537799250000
    assert (event.user_id, event.item_id, event.value) == ("42", "7", 4.5)


@pytest.mark.parametrize("raw, code, field", [
    (b'{"user_id": {, "item_id": 3}', INVALID_JSON, "value"),
    (b"[1, 2]", INVALID_JSON, "value"),
    (b"\xff\xfe", INVALID_JSON, "value"),
    (with_fields(event_time="yesterday"), INVALID_EVENT_TIME, "event_time"),
    (with_fields(event_time="2018-09-24T14:27:30"), INVALID_EVENT_TIME, "event_time"),
    (with_fields(item_id=...), MISSING_FIELD, "item_id"),
    (with_fields(event_id=None), MISSING_FIELD, "event_id"),
    (with_fields(event_type="hover"), UNKNOWN_EVENT_TYPE, "event_type"),
    (with_fields(event_type=3), WRONG_TYPE, "event_type"),
    (with_fields(event_time="2226-01-01T00:00:00Z"), EVENT_TIME_IN_FUTURE, "event_time"),
    (with_fields(event_time=964982703), EVENT_TIME_BEFORE_FLOOR, "event_time"),
    (with_fields(user_id={"x": 1}), WRONG_TYPE, "user_id"),
    (with_fields(user_id=True), WRONG_TYPE, "user_id"),
    (with_fields(user_id=1.5), WRONG_TYPE, "user_id"),
    (with_fields(user_id="abc!"), INVALID_ID, "user_id"),
    (with_fields(item_id="x" * 129), INVALID_ID, "item_id"),
    (with_fields(value="4.5"), WRONG_TYPE, "value"),
    (with_fields(value=7), VALUE_OUT_OF_RANGE, "value"),
    (with_fields(value=0.0), VALUE_OUT_OF_RANGE, "value"),
    (with_fields(value=...), MISSING_FIELD, "value"),
    (with_fields(event_type="view"), VALUE_NOT_ALLOWED, "value"),
    (with_fields(context="mobile"), WRONG_TYPE, "context"),
    (with_fields(context={"page": {"a": 1}}), WRONG_TYPE, "context"),
    (with_fields(session_id=["s"]), WRONG_TYPE, "session_id"),
])
def test_invalid_record_rejected(raw, code, field):
    result = check(raw)
    assert isinstance(result, Rejection), result
    assert result.code == code
    assert result.field == field
    assert field in result.message or code == INVALID_JSON


def test_rejection_message_names_value():
    result = check(with_fields(value=7))
    assert result.message == "value 7 is outside [0.5, 5] for rating"


def test_epoch_seconds_hint():
    result = check(with_fields(event_time=964982703))
    assert "epoch seconds? send milliseconds" in result.message


def test_tombstone_rejected():
    result = validate(None, RULES, NOW_MS)
    assert isinstance(result, Rejection) and result.code == INVALID_JSON


def test_numeric_user_id_stored_as_string():
    event = check(with_fields(user_id=123456, item_id=99))
    assert isinstance(event, Event)
    assert event.user_id == "123456"
    assert event.item_id == "99"


def test_epoch_millis_accepted():
    event = check(with_fields(event_time=1537799250000))
    assert event.event_time_ms == 1537799250000


def test_offset_normalised_to_utc():
    event = check(with_fields(event_time="2018-09-24T16:27:30+02:00"))
    assert event.event_time_ms == 1537799250000


def test_extra_fields_kept_as_json():
    event = check(with_fields(campaign="spring-sale", score={"a": 1}))
    assert event.extra_fields == {"campaign": '"spring-sale"', "score": '{"a":1}'}


def test_context_scalars_kept_as_text():
    event = check(with_fields(context={"device": "ios", "position": 3, "ad": True, "none": None}))
    assert event.context == {"device": "ios", "position": "3", "ad": "true"}


def test_purchase_value_optional():
    event = check(with_fields(event_type="purchase", value=...))
    assert isinstance(event, Event) and event.value is None


@pytest.mark.parametrize("value, expected", [
    ("u-1", True), ("a.b:c@d_e", True), ("x" * 128, True), ("", False), ("x" * 129, False),
    ("abc!", False), ("with space", False), ("ü", False),
])
def test_id_grammar(value, expected):
    assert is_valid_id(value) is expected


def test_rules_reject_inverted_range():
    with pytest.raises(ValueError, match="rating"):
        EventRules.from_config(EventsConfig(value_ranges={"rating": [5, 1]}))
