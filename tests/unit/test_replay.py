"""Replay tool: event ids, event-time order, selection by time and fraction, bad input."""

import json

import pytest

from jobs.replay import (DEFAULT_RATINGS, ReplayError, jsonl_records, movielens_events, movielens_record,
                         select)


@pytest.fixture(scope="module")
def ratings():
    return movielens_events(DEFAULT_RATINGS)


def test_all_ratings_read(ratings):
    assert len(ratings) == 100_836


def test_ratings_in_event_time_order(ratings):
    times = [row[0] for row in ratings]
    assert times == sorted(times)
    assert times[0] == 828124615
    assert times[-1] == 1537799250


def test_event_ids_unique_and_deterministic(ratings):
    ids = [movielens_record(*row).value for row in ratings[:1000]]
    assert ids == [movielens_record(*row).value for row in ratings[:1000]]
    all_ids = {json.loads(movielens_record(*row).value)["event_id"] for row in ratings}
    assert len(all_ids) == 100_836


def test_record_follows_contract(ratings):
    record = movielens_record(*ratings[0])
    event = json.loads(record.value)
    assert event["event_type"] == "rating"
    assert event["event_time"] == ratings[0][0] * 1000
    assert record.key == event["user_id"].encode()
    assert event["event_id"] == f"ml-{event['user_id']}-{event['item_id']}-{ratings[0][0]}"


def test_repeat_gives_new_ids():
    rows = movielens_events(DEFAULT_RATINGS, repeat=3)[:3]
    ids = [json.loads(movielens_record(*row).value)["event_id"] for row in rows]
    assert len(set(ids)) == 3
    assert ids[1].endswith("-r1")
    assert ids[2].endswith("-r2")


def test_fraction_and_complement(ratings):
    head = select(ratings, lambda row: row[0], None, None, 0.8, None)
    tail = select(ratings, lambda row: row[0], None, None, None, 0.8)
    assert len(head) + len(tail) == len(ratings)
    assert head[-1][0] <= tail[0][0]


def test_time_range(ratings):
    start, end = 1_420_070_400_000, 1_451_606_400_000  # 2015-01-01 .. 2016-01-01 UTC
    chosen = select(ratings, lambda row: row[0] * 1000, start, end, None, None)
    assert chosen
    assert all(start <= row[0] * 1000 < end for row in chosen)
    assert len(chosen) == sum(1 for row in ratings if start <= row[0] * 1000 < end)


def test_jsonl_sorted_by_event_time(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event_id": "b", "event_time": "2020-01-02T00:00:00Z", "user_id": 1}\n'
                    '\n'
                    '{"event_id": "a", "event_time": 1577836800000, "user_id": "u"}\n', encoding="utf-8")
    records = jsonl_records(path)
    assert [json.loads(record.value)["event_id"] for record in records] == ["a", "b"]
    assert records[0].key == b"u"


def test_jsonl_bad_line_named(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event_id": "a", "event_time": 1}\n{"event_id": \n', encoding="utf-8")
    with pytest.raises(ReplayError, match=r"events.jsonl:2: not valid JSON"):
        jsonl_records(path)


def test_jsonl_bad_event_time_named(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event_id": "a", "event_time": "yesterday"}\n', encoding="utf-8")
    with pytest.raises(ReplayError, match=r"events.jsonl:1: event_time 'yesterday' is invalid"):
        jsonl_records(path)


def test_bad_csv_header(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("a,b,c,d\n1,2,3,4\n", encoding="utf-8")
    with pytest.raises(ReplayError, match="is not the MovieLens ratings header"):
        movielens_events(path)
