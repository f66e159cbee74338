"""Feature definitions and the online-store format (no services)."""

import math
from array import array
import re

import pytest

from reccore.config import ConfigError
from reccore.features import build_feature_set, load_feature_set, slug
from reccore.store import HEADER, KeyLayout, Stamp, pack, readable_fields, unpack

NAME_PATTERN = re.compile(r"(?:[a-z0-9_]+_)?(count|mean|share|popularity|vs)_[0-9]+[hd]_(user|item)")


@pytest.fixture(scope="module")
def feature_set():
    return load_feature_set()


def raw_definitions(**changes):
    raw = {"version": "t1", "windows": {"1h": 3600, "30d": 2592000}, "event_types": ["view", "rating"],
           "positive": {"rating_min": 4.0, "event_types": []}, "categories": ["Drama", "Sci-Fi"],
           "user": [{"aggregation": "count", "per": "event_type", "windows": ["1h", "30d"]},
                    {"aggregation": "category_share", "per": "category", "windows": ["30d"]}],
           "item": [{"aggregation": "rating_mean", "windows": ["30d"]},
                    {"aggregation": "trend", "short": "1h", "long": "30d"}]}
    raw.update(changes)
    return raw


def test_windows_cover_required(feature_set):
    assert {"1h", "24h", "7d", "30d"} <= set(feature_set.windows)
    assert feature_set.windows["30d"] == 30 * 86400


def test_names_say_aggregation_window_entity(feature_set):
    for entity in ("user", "item"):
        for name in feature_set.names(entity):
            assert NAME_PATTERN.fullmatch(name), name
            assert name.endswith(f"_{entity}")


def test_required_features_present(feature_set):
    user, item = feature_set.names("user"), feature_set.names("item")
    assert "rating_count_30d_user" in user
    assert "rating_mean_30d_user" in user
    assert "positive_share_30d_user" in user
    assert "sci_fi_share_30d_user" in user
    assert "rating_mean_30d_item" in item
    assert "popularity_7d_item" in item
    assert "trend_24h_vs_7d_item" in item


def test_expansion_order():
    names = build_feature_set(raw_definitions()).names("user")
    assert names == ["view_count_1h_user", "rating_count_1h_user", "view_count_30d_user", "rating_count_30d_user",
                     "drama_share_30d_user", "sci_fi_share_30d_user"]


def test_manifest_lists_order_and_codes(feature_set):
    manifest = feature_set.manifest()
    assert manifest["version"] == feature_set.version
    assert manifest["user"] == feature_set.names("user")
    assert manifest["dtype"] == "float32"
    assert manifest["category_codes"]["Action"] == 0


def test_fingerprint_changes_with_order():
    first = build_feature_set(raw_definitions())
    reordered = raw_definitions(user=list(reversed(raw_definitions()["user"])))
    assert build_feature_set(reordered).fingerprint() != first.fingerprint()
    assert build_feature_set(raw_definitions()).fingerprint() == first.fingerprint()


def test_unknown_window_rejected():
    raw = raw_definitions(item=[{"aggregation": "popularity", "windows": ["2d"]}])
    with pytest.raises(ConfigError, match=r"item\[0\]: window '2d' is not in windows"):
        build_feature_set(raw)


def test_unknown_aggregation_rejected():
    with pytest.raises(ConfigError, match="aggregation 'median' is unknown"):
        build_feature_set(raw_definitions(user=[{"aggregation": "median", "windows": ["1h"]}]))


def test_repeated_names_rejected():
    group = {"aggregation": "rating_mean", "windows": ["1h"]}
    with pytest.raises(ConfigError, match="user feature names repeat"):
        build_feature_set(raw_definitions(user=[group, group]))


def test_slug():
    assert slug("Sci-Fi") == "sci_fi"
    assert slug("(no genres listed)") == "no_genres_listed"


def test_pack_round_trip():
    stamp = Stamp(1537799250000, 42, 1796416765000)
    packed = pack(stamp, [1.0, None, 0.1, float("nan")])
    assert len(packed) == HEADER.size + 16
    read_stamp, values = unpack(packed, 4)
    assert read_stamp == stamp
    assert values[0] == 1.0
    assert math.isnan(values[1])
    assert math.isnan(values[3])
    assert values[2] == pytest.approx(0.1, rel=1e-7)
    assert values[2] != 0.1, "values are stored as float32"


def test_unpack_wrong_length():
    with pytest.raises(ValueError, match="has 36 bytes, expected 40 for 4 features"):
        unpack(pack(Stamp(1, 1), [1.0, 2.0, 3.0]), 4)


def test_readable_fields_match_vector():
    stamp = Stamp(10, 2, 3)
    fields = readable_fields(["a_user", "b_user"], [0.1, None], stamp)
    _, values = unpack(pack(stamp, [0.1, None]), 2)
    assert fields["a_user"] == "0.100000001"
    assert array("f", [float(fields["a_user"])])[0] == values[0]
    assert fields["b_user"] == "nan"
    assert (fields["_newest_event_ms"], fields["_events_counted"], fields["_ingest_ms"]) == ("10", "2", "3")


def test_stamp_order():
    assert Stamp(2, 1) > Stamp(1, 100)
    assert Stamp(2, 3) > Stamp(2, 2)


def test_key_layout():
    layout = KeyLayout("streamrec", "v1")
    assert layout.vector("user", "42") == "streamrec:v1:user:42:vec"
    assert layout.fields("item", "7") == "streamrec:v1:item:7"
    assert layout.popularity("7d") == "streamrec:v1:popularity:7d"
    with pytest.raises(ValueError, match="must not contain ':'"):
        KeyLayout("streamrec", "v:1")
