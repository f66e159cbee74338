"""The demo's pure parts: the slice and its users, list comparisons, freshness figures, formats, the run folder."""

from __future__ import annotations

import socket

import pytest

from demo import data as demo_data
from demo.cli import RunFolderError, parse_args, prepare_work_dir
from demo.console import DemoError, duration
from demo.live import FreshnessProbe, Served, list_changes, lists_with_rated_items
from demo.services import Port, check_ports
from jobs.replay import DEFAULT_RATINGS, movielens_events, select

RATINGS = """userId,movieId,rating,timestamp
1,10,4.0,100
2,10,3.0,200
1,11,5.0,300
3,12,4.5,400
2,13,2.0,500
1,14,4.0,600
2,15,5.0,700
4,16,1.0,800
2,17,4.0,900
1,18,3.5,1000
"""


@pytest.fixture
def ratings_csv(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text(RATINGS, encoding="utf-8")
    return path


def test_slice_split_matches_replay_tool(ratings_csv):
    data = demo_data.load_slice(ratings_csv, 200_000, None, 0.5)
    events = movielens_events(ratings_csv)
    in_range = select(events, lambda row: row[0] * 1000, 200_000, None, None, None)
    assert data.first == select(events, lambda row: row[0] * 1000, 200_000, None, 0.5, None)
    assert data.rest == select(events, lambda row: row[0] * 1000, 200_000, None, None, 0.5)
    assert data.events == in_range
    assert [row[0] for row in data.first] == [200, 300, 400, 500, 600]
    assert data.split_clock_ms == 600_000
    assert data.last_event_ms == 1_000_000


def test_slice_without_remainder_is_rejected(ratings_csv):
    with pytest.raises(demo_data.SliceError, match="leaves 1 before and 0 after"):
        demo_data.load_slice(ratings_csv, 950_000, None, 0.8)


def test_followed_users_most_active_first(ratings_csv):
    data = demo_data.load_slice(ratings_csv, None, None, 0.5)
    # Before the split (t <= 500): users 1, 2, 3. After: 1 (600, 1000), 2 (700, 900), 4 (800).
    assert demo_data.followed_users(data) == ["1", "2"]


def test_rated_highly_newest_first(ratings_csv):
    data = demo_data.load_slice(ratings_csv, None, None, 0.7)
    assert demo_data.rated_highly(data.first, "1", 4.0, 5) == [("14", 4.0), ("11", 5.0), ("10", 4.0)]
    assert demo_data.rated_highly(data.first, "1", 4.0, 2) == [("14", 4.0), ("11", 5.0)]
    assert demo_data.rated_highly(data.first, "4", 4.0, 5) == []


def test_positive_threshold_from_relevance_rules():
    assert demo_data.positive_threshold({4.0: 1, 5.0: 2}) == 4.0
    assert demo_data.positive_threshold({"3.5": 1, "2.0": 0}) == 3.5
    with pytest.raises(ValueError, match="no rating a relevance above 0"):
        demo_data.positive_threshold({2.0: 0})


def test_bundled_ratings_have_followed_users():
    data = demo_data.load_slice(DEFAULT_RATINGS, None, None, 0.8)
    users = demo_data.followed_users(data)
    before = {row[1] for row in data.first}
    after = {row[1] for row in data.rest}
    assert users and set(users) == before & after


def served(user: str, items: list[str], round_number: int = 0) -> Served:
    return Served(round_number, user, f"r-{user}-{round_number}", items, items, [0.5] * len(items), "1", None,
                  10.0, True)


def test_list_changes_counts_replaced_items():
    before = {"1": served("1", ["a", "b", "c"]), "2": served("2", ["a", "b", "c"]), "3": served("3", ["x"])}
    after = {"1": served("1", ["a", "b", "c"]), "2": served("2", ["c", "d", "e"]), "4": served("4", ["y"])}
    changes = list_changes(before, after)
    assert changes["users"] == 2
    assert changes["changed"] == 1
    assert changes["replaced"] == {"1": 0, "2": 2}
    assert changes["mean_replaced"] == 1.0


def test_list_changes_counts_reordering_as_change():
    changes = list_changes({"1": served("1", ["a", "b"])}, {"1": served("1", ["b", "a"])})
    assert changes["changed"] == 1
    assert changes["replaced"] == {"1": 0}


def test_lists_with_rated_items():
    lists = {"1": served("1", ["a", "b"]), "2": served("2", ["c"]), "3": served("3", ["d"])}
    assert lists_with_rated_items(lists, {"1": {"b"}, "2": {"x"}}) == ["1"]


def test_freshness_counts_unseen_as_slowest():
    probe = FreshnessProbe(client=None, layout=_Layout(), users=["1"])
    for number in range(4):
        probe.record_send("1", number, 0.0)
    probe.latencies = [3.0, 1.0]
    summary = probe.summary()
    assert (summary["events"], summary["visible"], summary["unseen"]) == (4, 2, 2)
    assert summary["p50_s"] is None  # the median event was never visible
    assert summary["max_s"] is None
    probe.latencies = [3.0, 1.0, 2.0, 4.0]
    summary = probe.summary()
    assert (summary["p50_s"], summary["p95_s"], summary["max_s"]) == (3.0, 4.0, 4.0)


class _Layout:
    def vector(self, entity: str, entity_id: str) -> str:
        return f"{entity}:{entity_id}"


@pytest.mark.parametrize("seconds, text", [
    (None, "n/a"), (12.34, "12.3 s"), (90, "1.5 min"), (7200, "2.0 h"), (3 * 86400, "3.0 days"),
    (2 * 365.25 * 86400, "2.0 years"),
])
def test_duration_units(seconds, text):
    assert duration(seconds) == text


def test_busy_port_named_with_its_variable():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(DemoError, match=f"port {port} .*serving.port.*STREAMREC__SERVING__PORT"):
            check_ports([Port(port, "the scorer", "serving.port")])
    check_ports([Port(0, "ingest metrics", "ingest.metrics_port")])


def test_foreign_folder_is_not_cleared(tmp_path):
    (tmp_path / "notes.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(RunFolderError, match="no demo run folder"):
        prepare_work_dir(tmp_path)
    assert (tmp_path / "notes.txt").exists()


def test_run_folder_cleared_and_locked(tmp_path):
    work = tmp_path / "run"
    lock = prepare_work_dir(work)
    try:
        (work / "lake" / "bronze").mkdir(parents=True)
        (work / "demo.log").write_text("old", encoding="utf-8")
        with pytest.raises(RunFolderError, match="another demo is running"):
            prepare_work_dir(work)
    finally:
        lock.close()
    lock = prepare_work_dir(work)
    lock.close()
    assert not (work / "lake").exists()


@pytest.mark.parametrize("argv, message", [
    (["--name", "Demo_1"], "is not a valid name"),
    (["--split", "1.0"], "is not a fraction"),
    (["--replay-seconds", "0"], "must be above 0"),
    (["--from", "yesterday"], "is not an ISO-8601 date"),
])
def test_invalid_options_rejected(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err
