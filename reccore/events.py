"""The interaction event contract: id grammar, field rules and the validator shared by every part.

An event is a UTF-8 JSON object (the Kafka message value; the key is user_id):

    event_id     string or integer, required; the dedup key; id grammar
    event_time   required; ISO-8601 with a UTC offset, or epoch milliseconds as a number
    user_id      string or integer, required; id grammar; stored as a string
    item_id      string or integer, required; id grammar; stored as a string
    event_type   required; one of the configured types
    value        number; required for some types (rating), range per type, absent for the others
    session_id   string, optional
    context      object whose values are strings (numbers and booleans are kept as their text)

Fields the contract does not name are kept as their JSON text in ``extra_fields``.

``validate`` never raises on bad input: it returns a Rejection with a reason code (a small fixed
set, used as a metric label), the field at fault and a message that names the value.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

try:  # orjson is about 3x faster; the stdlib parser is the fallback where it is not installed.
    import orjson

    def _loads(raw: bytes) -> Any:
        return orjson.loads(raw)

    _DECODE_ERRORS: tuple = (orjson.JSONDecodeError, UnicodeDecodeError)

    def _dumps(value: Any) -> str:
        return orjson.dumps(value).decode()
except ImportError:  # pragma: no cover - exercised only without orjson
    def _loads(raw: bytes) -> Any:
        return json.loads(raw)

    _DECODE_ERRORS = (json.JSONDecodeError, UnicodeDecodeError)

    def _dumps(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
ID_GRAMMAR = "1 to 128 characters of letters, digits and _.:@-"
KNOWN_FIELDS = ("event_id", "event_time", "user_id", "item_id", "event_type", "value", "session_id",
                "context")

# Reason codes: a closed set, so they can label a metric.
INVALID_JSON = "invalid_json"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
INVALID_ID = "invalid_id"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
VALUE_OUT_OF_RANGE = "value_out_of_range"
VALUE_NOT_ALLOWED = "value_not_allowed"
INVALID_EVENT_TIME = "invalid_event_time"
EVENT_TIME_IN_FUTURE = "event_time_in_future"
EVENT_TIME_BEFORE_FLOOR = "event_time_before_floor"
REASON_CODES = (INVALID_JSON, MISSING_FIELD, WRONG_TYPE, INVALID_ID, UNKNOWN_EVENT_TYPE,
                VALUE_OUT_OF_RANGE, VALUE_NOT_ALLOWED, INVALID_EVENT_TIME, EVENT_TIME_IN_FUTURE,
                EVENT_TIME_BEFORE_FLOOR)


def is_valid_id(value: str) -> bool:
    """Return whether ``value`` follows the id grammar shared by ingest and the scorer."""
    return ID_PATTERN.fullmatch(value) is not None


def parse_iso_timestamp(text: str) -> datetime:
    """Parse an ISO-8601 timestamp that carries a UTC offset (``Z`` or ``+hh:mm``)."""
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError("it has no UTC offset; add Z or +hh:mm")
    return parsed


@dataclass(frozen=True)
class EventRules:
    """Validation settings, built once from the ``events`` config section."""

    event_types: frozenset
    value_ranges: dict
    value_required: frozenset
    floor_ms: int
    max_future_ms: int

    @classmethod
    def from_config(cls, events_config: Any) -> "EventRules":
        """Build the rules from an EventsConfig (or any object with the same attributes)."""
        floor = parse_iso_timestamp(events_config.event_time_floor)
        ranges = {}
        for event_type, bounds in events_config.value_ranges.items():
            if len(bounds) != 2 or not bounds[0] <= bounds[1]:
                raise ValueError(f"events.value_ranges.{event_type} must be [min, max], found {bounds!r}")
            ranges[event_type] = (float(bounds[0]), float(bounds[1]))
        return cls(
            event_types=frozenset(events_config.event_types),
            value_ranges=ranges,
            value_required=frozenset(events_config.value_required),
            floor_ms=int(floor.timestamp() * 1000),
            max_future_ms=int(events_config.max_future_seconds) * 1000,
        )


@dataclass
class Event:
    """A valid event, with ids as strings and event_time as epoch milliseconds (UTC)."""

    event_id: str
    event_time_ms: int
    user_id: str
    item_id: str
    event_type: str
    value: float | None = None
    session_id: str | None = None
    context: dict = field(default_factory=dict)
    extra_fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    """Why a record was quarantined: a reason code, the field at fault and a readable message."""

    code: str
    field: str
    message: str


class _Reject(Exception):
    def __init__(self, code: str, field_name: str, message: str):
        super().__init__(message)
        self.rejection = Rejection(code, field_name, message)


def _describe(value: Any) -> str:
    text = _dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _check_id(record: dict, name: str) -> str:
    value = record.get(name)
    if value is None:
        raise _Reject(MISSING_FIELD, name, f"{name} is missing; every event needs one")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Reject(WRONG_TYPE, name,
                      f"{name} {_describe(value)} is a {_json_type(value)}; ids are strings or integers")
    text = value if isinstance(value, str) else str(value)
    if not ID_PATTERN.fullmatch(text):
        raise _Reject(INVALID_ID, name, f"{name} {_describe(value)} breaks the id grammar ({ID_GRAMMAR})")
    return text


def _check_event_time(record: dict, rules: EventRules, now_ms: int) -> int:
    value = record.get("event_time")
    if value is None:
        raise _Reject(MISSING_FIELD, "event_time", "event_time is missing; every event needs one")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Reject(WRONG_TYPE, "event_time",
                      f"event_time {_describe(value)} is a {_json_type(value)}; "
                      "send ISO-8601 with an offset or epoch milliseconds")
    if isinstance(value, str):
        try:
            event_time_ms = int(parse_iso_timestamp(value).timestamp() * 1000)
        except ValueError as error:
            raise _Reject(INVALID_EVENT_TIME, "event_time",
                          f"event_time {_describe(value)} is not ISO-8601 with an offset "
                          f"or epoch milliseconds ({error})") from None
    else:
        if not math.isfinite(value):
            raise _Reject(INVALID_EVENT_TIME, "event_time", f"event_time {value!r} is not a finite number")
        event_time_ms = int(value)

    if event_time_ms > now_ms + rules.max_future_ms:
        raise _Reject(EVENT_TIME_IN_FUTURE, "event_time",
                      f"event_time {_describe(value)} ({_format_ms(event_time_ms)}) is more than "
                      f"{rules.max_future_ms // 1000} s in the future")
    if event_time_ms < rules.floor_ms:
        hint = "; epoch seconds? send milliseconds" if isinstance(value, (int, float)) else ""
        raise _Reject(EVENT_TIME_BEFORE_FLOOR, "event_time",
                      f"event_time {_describe(value)} ({_format_ms(event_time_ms)}) is before the floor "
                      f"{_format_ms(rules.floor_ms)}{hint}")
    return event_time_ms


def _format_ms(epoch_ms: int) -> str:
    try:
        return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return f"{epoch_ms} ms"


def _check_value(record: dict, event_type: str, rules: EventRules) -> float | None:
    value = record.get("value")
    if value is None:
        if event_type in rules.value_required:
            raise _Reject(MISSING_FIELD, "value", f"value is missing; a {event_type} event needs one")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Reject(WRONG_TYPE, "value", f"value {_describe(value)} is a {_json_type(value)}; it must be a number")
    bounds = rules.value_ranges.get(event_type)
    if bounds is None:
        raise _Reject(VALUE_NOT_ALLOWED, "value", f"value {_describe(value)} is not allowed on a {event_type} event")
    number = float(value)
    if not (math.isfinite(number) and bounds[0] <= number <= bounds[1]):
        raise _Reject(VALUE_OUT_OF_RANGE, "value",
                      f"value {_describe(value)} is outside [{bounds[0]:g}, {bounds[1]:g}] for {event_type}")
    return number


def _check_optional_string(record: dict, name: str) -> str | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Reject(WRONG_TYPE, name, f"{name} {_describe(value)} is a {_json_type(value)}; it must be a string")
    return value if isinstance(value, str) else str(value)


def _check_context(record: dict) -> dict:
    value = record.get("context")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Reject(WRONG_TYPE, "context", f"context {_describe(value)} is a {_json_type(value)}; it must be an object")
    context = {}
    for key, item in value.items():
        if isinstance(item, str):
            context[key] = item
        elif item is None:
            continue
        elif isinstance(item, (bool, int, float)):
            context[key] = _dumps(item)
        else:
            raise _Reject(WRONG_TYPE, "context",
                          f"context.{key} {_describe(item)} is a {_json_type(item)}; context values are strings")
    return context


def validate_record(record: Any, rules: EventRules, now_ms: int) -> Event | Rejection:
    """Validate a decoded JSON value against the contract."""
    if not isinstance(record, dict):
        return Rejection(INVALID_JSON, "value", f"the message is a JSON {_json_type(record)}, not an object")
    try:
        event_id = _check_id(record, "event_id")
        event_time_ms = _check_event_time(record, rules, now_ms)
        user_id = _check_id(record, "user_id")
        item_id = _check_id(record, "item_id")

        event_type = record.get("event_type")
        if event_type is None:
            raise _Reject(MISSING_FIELD, "event_type", "event_type is missing; every event needs one")
        if not isinstance(event_type, str):
            raise _Reject(WRONG_TYPE, "event_type", f"event_type {_describe(event_type)} is a "
                          f"{_json_type(event_type)}; it must be a string")
        if event_type not in rules.event_types:
            raise _Reject(UNKNOWN_EVENT_TYPE, "event_type",
                          f"event_type {event_type!r} is unknown; expected one of {sorted(rules.event_types)}")

        value = _check_value(record, event_type, rules)
        session_id = _check_optional_string(record, "session_id")
        context = _check_context(record)
    except _Reject as reject:
        return reject.rejection

    extra = {key: _dumps(item) for key, item in record.items() if key not in KNOWN_FIELDS}
    return Event(event_id, event_time_ms, user_id, item_id, event_type, value, session_id, context, extra)


def validate(raw: bytes | None, rules: EventRules, now_ms: int) -> Event | Rejection:
    """Decode and validate one Kafka message value."""
    if raw is None:
        return Rejection(INVALID_JSON, "value", "the message has no value (a tombstone or an empty record)")
    try:
        record = _loads(raw)
    except _DECODE_ERRORS as error:
        preview = bytes(raw[:60]).decode("utf-8", "replace")
        return Rejection(INVALID_JSON, "value", f"the message is not valid UTF-8 JSON ({error}): {preview!r}")
    return validate_record(record, rules, now_ms)


def encode_event(event: dict) -> bytes:
    """Encode an event dictionary as the UTF-8 JSON message value."""
    return _dumps(event).encode()

