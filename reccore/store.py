"""The online store's layout in Redis: keys, the packed vector format and the version stamp.

Both the writer (jobs) and the reader (the scorer) use this module, so they cannot disagree about
a key or a feature's position. Keys live under ``<prefix>:<feature-set version>:``, so values of a
new feature definition never mix with old ones:

    <p>:<v>:manifest               JSON manifest of the feature set (names, order, dtype, codes)
    <p>:<v>:user:<id>:vec          stamp + packed float32 vector, in manifest order
    <p>:<v>:user:<id>              hash of the same values by name, plus the stamp fields
    <p>:<v>:item:<id>:vec / <p>:<v>:item:<id>
    <p>:<v>:popularity:<window>    sorted set: item id -> events in the window
    <p>:<v>:popularity_as_of_ms    event time (ms) the popularity windows end at
    <p>:<v>:consumed:<user id>     set of the item ids the user has interacted with

A packed value is a 24-byte header (three little-endian int64: newest event time in ms, events
counted, ingest time in ms) followed by one little-endian float32 per feature; NaN marks a missing
value. One MGET of packed values fetches a user and all candidates in a single round trip.
"""

from __future__ import annotations

import math
import struct
from array import array
from dataclasses import dataclass
from typing import Iterable, Sequence

HEADER = struct.Struct("<qqq")
STAMP_FIELDS = ("_newest_event_ms", "_events_counted", "_ingest_ms")


@dataclass(frozen=True, order=True)
class Stamp:
    """The version of an entity's values: a write replaces the stored values only when newer.

    Compared by newest event time, then by events counted; a backfill also wins a tie, so it can
    correct aggregates (a late event) without moving the newest event time. The ingest time is
    carried along for freshness and point-in-time checks but takes no part in the order.
    """

    newest_event_ms: int
    events_counted: int
    ingest_ms: int = 0


class KeyLayout:
    """Key names under one prefix and feature-set version."""

    def __init__(self, prefix: str, version: str):
        if ":" in version:
            raise ValueError(f"feature-set version {version!r} must not contain ':'")
        self.base = f"{prefix}:{version}"

    def manifest(self) -> str:
        return f"{self.base}:manifest"

    def vector(self, entity: str, entity_id: str) -> str:
        return f"{self.base}:{entity}:{entity_id}:vec"

    def fields(self, entity: str, entity_id: str) -> str:
        return f"{self.base}:{entity}:{entity_id}"

    def popularity(self, window: str) -> str:
        return f"{self.base}:popularity:{window}"

    def popularity_as_of(self) -> str:
        return f"{self.base}:popularity_as_of_ms"

    def consumed(self, user_id: str) -> str:
        return f"{self.base}:consumed:{user_id}"


def pack(stamp: Stamp, values: Sequence[float]) -> bytes:
    """Return the stamp header followed by ``values`` as little-endian float32 (None becomes NaN)."""
    vector = array("f", (math.nan if value is None else value for value in values))
    if vector.itemsize != 4:  # pragma: no cover - every CPython platform has a 4-byte float
        raise RuntimeError("this platform's array('f') is not float32")
    if struct.pack("=H", 1) != struct.pack("<H", 1):  # big-endian host: store little-endian anyway
        vector.byteswap()
    return HEADER.pack(stamp.newest_event_ms, stamp.events_counted, stamp.ingest_ms) + vector.tobytes()


def unpack(packed: bytes, size: int) -> tuple[Stamp, list[float]]:
    """Return the stamp and the ``size`` values of a packed value; raise ValueError on a wrong length."""
    expected = HEADER.size + 4 * size
    if len(packed) != expected:
        raise ValueError(f"packed vector has {len(packed)} bytes, expected {expected} for {size} features; "
                         "the writer and reader use different feature sets")
    newest, counted, ingest = HEADER.unpack_from(packed)
    vector = array("f")
    vector.frombytes(packed[HEADER.size:])
    if struct.pack("=H", 1) != struct.pack("<H", 1):
        vector.byteswap()
    return Stamp(newest, counted, ingest), vector.tolist()


def readable_fields(names: Iterable[str], values: Sequence[float], stamp: Stamp) -> dict[str, str]:
    """Return the hash of an entity as the writer stores it: each feature by name, and the stamp.

    A value is its float32 printed with 9 significant digits, which reads back as the same float32;
    'nan' marks a missing value.
    """
    as_float32 = array("f", (math.nan if value is None else value for value in values))
    fields = {name: ("nan" if math.isnan(value) else format(value, ".9g")) for name, value in zip(names, as_float32)}
    fields.update(zip(STAMP_FIELDS, (str(stamp.newest_event_ms), str(stamp.events_counted), str(stamp.ingest_ms))))
    return fields
