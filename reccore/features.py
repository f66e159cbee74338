"""Feature definitions, declared once as data in conf/features.yaml, and their manifest.

The streaming job, the batch backfill, the training join and the scorer all read the same
FeatureSet, so they agree on every name, window and position. Names follow
``<what>_<aggregation>_<window>_<entity>``, for example ``rating_count_30d_user``.

Missing values are NaN: a mean or a share over no events has no value.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from reccore.config import PROJECT_ROOT, ConfigError

ENTITIES = ("user", "item")
AGGREGATIONS = ("count", "rating_mean", "positive_share", "category_share", "popularity", "trend")
DTYPE = "float32"


@dataclass(frozen=True)
class Feature:
    """One feature: its name, entity, aggregation and window (with the event type or category it counts)."""

    name: str
    entity: str
    aggregation: str
    window: Optional[str] = None
    window_seconds: Optional[int] = None
    event_type: Optional[str] = None
    category: Optional[str] = None
    # For a trend: the short and long windows whose event rates are compared.
    short_window: Optional[str] = None
    long_window: Optional[str] = None


@dataclass(frozen=True)
class FeatureSet:
    """The versioned feature definitions of both entities, in vector order."""

    version: str
    windows: dict
    event_types: tuple
    positive_rating_min: float
    positive_event_types: tuple
    categories: tuple
    user: tuple = field(default_factory=tuple)
    item: tuple = field(default_factory=tuple)

    def features(self, entity: str) -> tuple:
        """Return the features of ``entity`` ('user' or 'item') in vector order."""
        if entity not in ENTITIES:
            raise ValueError(f"entity {entity!r} is unknown; expected one of {ENTITIES}")
        return self.user if entity == "user" else self.item

    def names(self, entity: str) -> list[str]:
        """Return the feature names of ``entity`` in vector order."""
        return [feature.name for feature in self.features(entity)]

    @property
    def longest_window_seconds(self) -> int:
        return max(self.windows.values())

    def fingerprint(self) -> str:
        """Return a hash of the definitions; a change of values or order changes it."""
        canonical = json.dumps({"windows": self.windows, "event_types": self.event_types,
                                "positive": [self.positive_rating_min, self.positive_event_types],
                                "categories": self.categories,
                                "user": [asdict(f) for f in self.user], "item": [asdict(f) for f in self.item]},
                               sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def category_share_names(self) -> dict[str, str]:
        """Return, per category, the name of the user's longest-window share of it (for the affinity)."""
        shares: dict[str, tuple[int, str]] = {}
        for feature in self.user:
            if feature.aggregation == "category_share":
                seconds = feature.window_seconds or 0
                if feature.category not in shares or seconds > shares[feature.category][0]:
                    shares[feature.category] = (seconds, feature.name)
        return {category: name for category, (_seconds, name) in shares.items()}

    def manifest(self) -> dict:
        """Return the manifest stored with the values: version, names and order, dtype, category codes."""
        return {
            "version": self.version,
            "fingerprint": self.fingerprint(),
            "dtype": DTYPE,
            "missing": "NaN",
            "user": self.names("user"),
            "item": self.names("item"),
            "category_codes": {category: code for code, category in enumerate(self.categories)},
            "category_shares": self.category_share_names(),
            "windows": dict(self.windows),
        }


def slug(text: str) -> str:
    """Return ``text`` as a lower-case name part: ``Sci-Fi`` -> ``sci_fi``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def features_path() -> Path:
    """Return conf/features.yaml (STREAMREC_CONF_DIR overrides conf/)."""
    return Path(os.environ.get("STREAMREC_CONF_DIR") or PROJECT_ROOT / "conf") / "features.yaml"


def load_feature_set(path: Optional[Path] = None) -> FeatureSet:
    """Read and expand the feature definitions; raise ConfigError naming the entry at fault."""
    path = Path(path) if path else features_path()
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle) or {}
    return build_feature_set(raw, str(path))


def build_feature_set(raw: dict, source: str = "features") -> FeatureSet:
    """Expand a definitions dictionary (the YAML's content) into a FeatureSet."""
    for key in ("version", "windows", "event_types", "positive", "categories", "user", "item"):
        if key not in raw:
            raise ConfigError(f"{source}: missing key {key!r}")
    windows = {str(name): int(seconds) for name, seconds in raw["windows"].items()}
    base = dict(
        version=str(raw["version"]), windows=windows, event_types=tuple(raw["event_types"]),
        positive_rating_min=float(raw["positive"].get("rating_min", 4.0)),
        positive_event_types=tuple(raw["positive"].get("event_types", [])),
        categories=tuple(raw["categories"]),
    )
    expanded = {entity: tuple(_expand(entity, raw[entity], base, source)) for entity in ENTITIES}
    feature_set = FeatureSet(**base, **expanded)
    for entity in ENTITIES:
        names = feature_set.names(entity)
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"{source}: {entity} feature names repeat: {duplicates}")
    return feature_set


def _expand(entity: str, groups: list, base: dict, source: str) -> list[Feature]:
    features = []
    windows = base["windows"]
    for index, group in enumerate(groups):
        where = f"{source}: {entity}[{index}]"
        aggregation = group.get("aggregation")
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"{where}: aggregation {aggregation!r} is unknown; expected one of {AGGREGATIONS}")

        if aggregation == "trend":
            short, long = group.get("short"), group.get("long")
            for name in (short, long):
                if name not in windows:
                    raise ConfigError(f"{where}: trend window {name!r} is not in windows {sorted(windows)}")
            features.append(Feature(f"trend_{short}_vs_{long}_{entity}", entity, aggregation,
                                    short_window=short, long_window=long))
            continue

        for window in group.get("windows", []):
            if window not in windows:
                raise ConfigError(f"{where}: window {window!r} is not in windows {sorted(windows)}")
            seconds = windows[window]
            per = group.get("per")
            if per == "event_type":
                features += [Feature(f"{event_type}_count_{window}_{entity}", entity, aggregation, window, seconds,
                                     event_type=event_type) for event_type in base["event_types"]]
            elif per == "category":
                features += [Feature(f"{slug(category)}_share_{window}_{entity}", entity, aggregation, window,
                                     seconds, category=category) for category in base["categories"]]
            elif per is None:
                features.append(Feature(f"{aggregation}_{window}_{entity}", entity, aggregation, window, seconds))
            else:
                raise ConfigError(f"{where}: per {per!r} is unknown; expected event_type or category")
    return features


def describe(feature_set: FeatureSet) -> dict[str, Any]:
    """Return the counts of features per entity, for logs."""
    return {entity: len(feature_set.features(entity)) for entity in ENTITIES}
