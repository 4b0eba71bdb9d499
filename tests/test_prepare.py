"""Preparation: k-core, chronological order, truncation, splits, combine/select, save/load."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pyarrow.parquet as pq
import pytest

from pmmcache.config import from_dict
from pmmcache.data.images import FolderImageStore
from pmmcache.data.prepare import (
    PrepareConfig,
    PreparedDataset,
    combine,
    k_core,
    prepare,
    select_sources,
)
from pmmcache.data.readers import RawDataset, read_recbole, recbole_example_dir
from pmmcache.errors import ConfigError, DataError, PmmcacheError


def raw_from(sequences: dict[str, list[str]], items=None, source="src", texts=None, times=None) -> RawDataset:
    """A RawDataset from {user: [item, ...]} in file order (timestamps optional, per user)."""
    interactions = []
    for user, sequence in sequences.items():
        for position, item in enumerate(sequence):
            timestamp = None if times is None else float(times[user][position])
            interactions.append((user, item, timestamp, len(interactions)))
    items = items or sorted({i for seq in sequences.values() for i in seq})
    texts = texts or {}
    return RawDataset(
        source=source,
        items={item: texts.get(item, f"text of {item}") for item in items},
        image_store=None,
        image_keys={},
        interactions=interactions,
        reader="test",
    )


def sequences_of(dataset: PreparedDataset) -> dict[str, list[str]]:
    keys = dataset.item_keys()
    return {
        user: [keys[i - 1] for i in items]
        for user, items in zip(dataset.users.column("key").to_pylist(), dataset.users.column("items").to_pylist())
    }


def test_k_core_needs_several_rounds_to_reach_its_fixed_point():
    # k = 2: dropping c (1 interaction) leaves u2 with one item, then a with one user, then u1 with one item.
    raw = raw_from(
        {"u1": ["a", "b"], "u2": ["a", "c"], "u3": ["b", "d", "e"], "u4": ["b", "d", "e"]},
        items=["a", "b", "c", "d", "e"],
    )
    dataset = prepare(raw, PrepareConfig(min_core=2))

    assert dataset.item_keys() == ["src/b", "src/d", "src/e"]
    assert sequences_of(dataset) == {"src/u3": ["src/b", "src/d", "src/e"], "src/u4": ["src/b", "src/d", "src/e"]}
    core = dataset.report["sources"]["src"]["k_core"]
    assert core == {"k": 2, "rounds": 5, "users": 2, "items": 3, "interactions": 6}

    # one pass over the initial counts drops only (u2, c): not yet a fixed point
    users = np.array([0, 0, 1, 1, 2, 2, 2, 3, 3, 3])
    items = np.array([0, 1, 0, 2, 1, 3, 4, 1, 3, 4])
    one_pass = (np.bincount(users)[users] >= 2) & (np.bincount(items)[items] >= 2)
    assert one_pass.sum() == 9
    keep, rounds = k_core(users, items, num_items=5, k=2)
    assert keep.tolist() == [False] * 4 + [True] * 6 and rounds == 5
    assert np.bincount(users[keep])[[2, 3]].min() >= 2 and np.bincount(items[keep])[[1, 3, 4]].min() >= 2


def test_order_is_timestamp_then_file_row():
    raw = raw_from({"u": ["x", "y", "z", "w"]}, times={"u": [10, 5, 10, 5]})
    dataset = prepare(raw, PrepareConfig(min_core=0))
    assert sequences_of(dataset)["src/u"] == ["src/y", "src/w", "src/x", "src/z"]


def test_mixed_timestamps_are_refused():
    raw = raw_from({"u": ["x", "y", "z"]})
    raw.interactions[1] = ("u", "y", 3.0, 1)
    with pytest.raises(DataError, match="every interaction or for none"):
        prepare(raw, PrepareConfig(min_core=0))


def test_truncation_short_users_and_catalogue():
    items = [f"i{n:02d}" for n in range(12)]
    raw = raw_from({"long": items[:10], "short": ["i10", "i11"], "three": ["i00", "i01", "i02"]}, items=items)
    dataset = prepare(raw, PrepareConfig(min_core=0, max_history=4, truncate=True))

    assert sequences_of(dataset) == {
        "src/long": [f"src/i{n:02d}" for n in range(5, 10)],  # last max_history + 1
        "src/three": ["src/i00", "src/i01", "src/i02"],
    }
    assert dataset.num_items == 12  # every surviving item is indexed, used or not
    assert dataset.items.column("index").to_pylist() == list(range(1, 13))
    report = dataset.report["sources"]["src"]
    assert report["users_too_short"] == 1 and report["sequences_truncated"] == 1
    assert report["prepared"] == {"users": 2, "items": 12, "interactions": 8}


def test_whole_sequences_are_kept_by_default_and_splits_see_the_same_history():
    items = [f"i{n:02d}" for n in range(12)]
    raw = raw_from({"long": items[:10], "three": ["i00", "i01", "i02"]}, items=items)
    whole = prepare(raw, PrepareConfig(min_core=0, max_history=4))
    cut = prepare(raw, PrepareConfig(min_core=0, max_history=4, truncate=True))

    assert sequences_of(whole)["src/long"] == [f"src/i{n:02d}" for n in range(10)]
    assert whole.report["sources"]["src"]["sequences_longer_than_history"] == 1
    for a, b in zip(whole.split_arrays("test"), cut.split_arrays("test")):
        assert np.array_equal(a, b)
    # Every split's history is the last max_history items before its target; a truncated copy
    # (released code) has fewer before the valid target and in the training sequence.
    assert whole.split_arrays("valid")[0][0].tolist() == [5, 6, 7, 8]
    assert cut.split_arrays("valid")[0][0].tolist() == [0, 6, 7, 8]
    assert whole.train_sequences(5)[0].tolist() == [4, 5, 6, 7, 8]
    # Popularity counts the whole training sequence, not only its last window.
    assert whole.train_item_counts()[1] == 2 and cut.train_item_counts()[1] == 1  # i00: users long + three


def test_train_windows_cover_every_training_target_once():
    items = [f"i{n}" for n in range(1, 12)]
    raw = raw_from({"a": items, "b": items[:4]}, items=items)  # train parts: 1..9 and 1..2
    dataset = prepare(raw, PrepareConfig(min_core=0))
    windows, owners, first = dataset.train_windows(4)
    assert windows.tolist() == [[6, 7, 8, 9], [3, 4, 5, 6], [0, 1, 2, 3], [0, 0, 1, 2]]
    assert owners.tolist() == [0, 0, 0, 1]
    assert first.tolist() == [0, 0, 0, 0]  # without overlap a window owns all its targets
    # Targets are the items after a window's first real item: each training target exactly once.
    targets = [t for row in windows.tolist() for t in [x for x in row if x][1:]]
    assert sorted(targets) == sorted(list(range(2, 10)) + [2])


def owned_targets(windows, first):
    """(target, history length) of every target a window owns (slot j predicts column j + 1)."""
    found = []
    for row, start in zip(windows.tolist(), first.tolist()):
        for slot in range(start, len(row) - 1):
            if row[slot] and row[slot + 1]:
                found.append((row[slot + 1], sum(1 for x in row[: slot + 1] if x)))
    return found


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_overlapping_train_windows_predict_every_target_once_with_longer_history(stride):
    items = [f"i{n}" for n in range(1, 12)]
    raw = raw_from({"a": items, "b": items[:4]}, items=items)  # train parts: 1..9 and 1..2
    dataset = prepare(raw, PrepareConfig(min_core=0))
    windows, owners, first = dataset.train_windows(4, stride=stride)
    found = owned_targets(windows, first)
    assert sorted(t for t, _ in found) == sorted(list(range(2, 10)) + [2])  # each target once
    for target, history in found:  # at least length - 1 - stride items before it, or all there are
        assert history >= min(3 - stride, target - 1), (target, history)
    if stride == 1:  # RecBole's prefixes: every target with its full (capped) history
        assert all(history == min(3, target - 1) for target, history in found)
        assert windows.tolist()[:2] == [[6, 7, 8, 9], [5, 6, 7, 8]] and first.tolist()[:2] == [2, 2]
    with pytest.raises(ConfigError, match="stride"):
        dataset.train_windows(4, stride=4)


def test_train_prefixes_give_every_target_its_own_window_ending_at_it():
    items = [f"i{n}" for n in range(1, 12)]
    raw = raw_from({"a": items, "b": items[:4]}, items=items)  # train parts: 1..9 and 1..2
    dataset = prepare(raw, PrepareConfig(min_core=0))
    windows, owners = dataset.train_prefixes(4)
    # RecBole's samples: every training item after a user's first, with the last 3 items before it.
    assert windows.tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6],
                                [4, 5, 6, 7], [5, 6, 7, 8], [6, 7, 8, 9], [0, 0, 1, 2]]
    assert owners.tolist() == [0] * 8 + [1] and windows.dtype == np.int32
    stride_one, _, first = dataset.train_windows(4, stride=1)  # the same targets, some owned by earlier slots
    assert sorted(t for t, _ in owned_targets(stride_one, first)) == sorted(windows[:, -1].tolist())
    with pytest.raises(ConfigError, match="length"):
        dataset.train_prefixes(1)


def test_split_arrays_are_left_padded_leave_one_out():
    items = [f"i{n}" for n in range(1, 9)]
    raw = raw_from({"a": items[:5], "b": items[5:]}, items=items)
    dataset = prepare(raw, PrepareConfig(min_core=0))  # indices 1..8 = i1..i8

    histories, targets = dataset.split_arrays("valid", max_len=3)
    assert histories.tolist() == [[1, 2, 3], [0, 0, 6]] and targets.tolist() == [4, 7]
    histories, targets = dataset.split_arrays("test", max_len=3)
    assert histories.tolist() == [[2, 3, 4], [0, 6, 7]] and targets.tolist() == [5, 8]
    inputs, next_items = dataset.split_arrays("train", max_len=3)
    assert inputs.tolist() == [[0, 1, 2], [0, 0, 0]] and next_items.tolist() == [[0, 2, 3], [0, 0, 0]]
    assert dataset.train_sequences(max_len=4).tolist() == [[0, 1, 2, 3], [0, 0, 0, 6]]
    assert dataset.train_item_counts().tolist() == [0, 1, 1, 1, 0, 0, 1, 0, 0]
    assert histories.dtype == np.int32 and targets.dtype == np.int32
    assert dataset.split_arrays("test")[0].shape == (2, 20)  # default max_len = max_history
    with pytest.raises(ConfigError, match="split must be"):
        dataset.split_arrays("dev")


def test_keys_texts_and_fingerprint_stability():
    raw = raw_from({"u": ["a", "b", "c"]}, texts={"b": None})
    first, second = prepare(raw, PrepareConfig(min_core=0)), prepare(raw, PrepareConfig(min_core=0))
    assert first.items.column("text").to_pylist() == ["text of a", None, "text of c"]
    assert first.report["sources"]["src"]["items_without_text"] == 1
    assert first.users.column("key").to_pylist() == ["src/u"]
    assert first.fingerprint == second.fingerprint and len(first.fingerprint) == 64
    other = prepare(raw_from({"u": ["a", "c", "b"]}), PrepareConfig(min_core=0))
    assert other.fingerprint != first.fingerprint


def test_combine_and_select_sources(tmp_path):
    (tmp_path / "covers").mkdir()
    for name in ("a.jpg", "c.jpg"):
        (tmp_path / "covers" / name).write_bytes(b"jpeg")
    raw_books = raw_from({"u": ["a", "b", "c"], "v": ["c", "a", "b"]}, source="books")
    raw_books.image_store = FolderImageStore(tmp_path / "covers")
    raw_books.image_keys = {"a": "a", "c": "c"}
    books = prepare(raw_books, PrepareConfig(min_core=0))
    covers = {"kind": "folder", "path": str((tmp_path / "covers").resolve())}
    films = prepare(raw_from({"u": ["x", "y", "z", "x"]}, source="films"), PrepareConfig(min_core=0))

    both = combine([books, films], "all")
    assert both.num_items == 6 and both.sources == ["books", "films"]
    assert both.items.column("key").to_pylist() == ["books/a", "books/b", "books/c", "films/x", "films/y", "films/z"]
    assert both.items.column("image_store").to_pylist() == [0, -1, 0, -1, -1, -1]
    assert both.image_stores == [covers]
    assert both.items.column("image_key").to_pylist() == ["a", None, "c", None, None, None]
    assert both.users.column("key").to_pylist() == ["books/u", "books/v", "films/u"]
    assert both.users.column("items").to_pylist() == [[1, 2, 3], [3, 1, 2], [4, 5, 6, 4]]
    assert set(both.report["sources"]) == {"books", "films"}

    # selecting a source back gives exactly the dataset it came from
    assert select_sources(both, ["films"]).fingerprint == films.fingerprint
    assert select_sources(both, ["books"]).fingerprint == books.fingerprint
    assert select_sources(both, ["films"]).image_stores == []
    with pytest.raises(PmmcacheError, match="unknown source"):
        select_sources(both, ["music"])
    with pytest.raises(PmmcacheError, match="item key 'books/a' is in both"):
        combine([books, books], "twice")
    with pytest.raises(ConfigError, match="cannot combine"):
        combine([books, prepare(raw_from({"w": ["q", "r", "s"]}, source="m"), PrepareConfig(min_core=0, max_history=5))], "x")


def test_save_load_round_trip_and_damage(tmp_path):
    dataset = prepare(raw_from({"u": ["a", "b", "c"], "v": ["b", "c", "a", "b"]}), PrepareConfig(min_core=0))
    target = dataset.save(tmp_path / "ds")
    assert sorted(p.name for p in target.iterdir()) == ["dataset.json", "items.parquet", "users.parquet"]
    loaded = PreparedDataset.load(target)
    assert loaded.fingerprint == dataset.fingerprint
    assert loaded.items.equals(dataset.items) and loaded.users.equals(dataset.users)
    assert loaded.config == dataset.config and loaded.report == dataset.report
    assert loaded.manifest()["counts"] == {"items": 3, "users": 2, "interactions": 7}

    changed = prepare(raw_from({"u": ["a", "b", "c"]}), PrepareConfig(min_core=0))
    changed.save(target)  # replaces the old copy
    assert PreparedDataset.load(target).fingerprint == changed.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no staging or retired folders left

    pq.write_table(dataset.users, target / "users.parquet")  # no longer matches dataset.json
    with pytest.raises(DataError, match="damaged"):
        PreparedDataset.load(target)


def test_prepare_config_is_checked():
    assert from_dict(PrepareConfig, {"min_core": 3}) == PrepareConfig(min_core=3, max_history=20)
    with pytest.raises(ConfigError, match="max_history"):
        PrepareConfig(max_history=1)
    with pytest.raises(ConfigError, match="unknown setting"):
        from_dict(PrepareConfig, {"min_cores": 3})


def test_ml100k_five_core_matches_recbole_and_sorts_by_time_then_row():
    raw = read_recbole(recbole_example_dir("ml-100k"), "ml-100k")
    dataset = prepare(raw, PrepareConfig())
    core = dataset.report["sources"]["ml-100k"]["k_core"]
    assert (core["users"], core["items"], core["interactions"]) == (943, 1349, 99_287)
    assert (dataset.num_users, dataset.num_items) == (943, 1349)

    assert dataset.report["sources"]["ml-100k"]["prepared"]["interactions"] == 99_287  # whole sequences

    # naive reference for one user with many same-second ties: sort by (timestamp, row)
    keys = dataset.item_keys()
    kept = set(keys)
    rows = [(ts, row, item) for user, item, ts, row in raw.interactions if user == "405" and f"ml-100k/{item}" in kept]
    expected = [f"ml-100k/{item}" for _, _, item in sorted(rows)]
    assert len({ts for ts, _, _ in rows}) < len(rows)  # this user really has ties
    assert sequences_of(dataset)["ml-100k/405"] == expected
