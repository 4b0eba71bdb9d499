"""Registry: layout detection, on-disk caching, rebuild on change, demo names, concurrency."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import multiprocessing
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pmmcache.data.prepare import PrepareConfig, PreparedDataset
from pmmcache.data.registry import cached_dataset_dir, demo_domains, detect_layout, resolve_dataset
from pmmcache.errors import PmmcacheError

SMALL = PrepareConfig(min_core=2, max_history=5)


def write_shop(directory, name="shop", users="u1\ta b c\nu2\tb c a\nu3\tc a b\n"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}_users.tsv").write_text(users)
    (directory / f"{name}_items_texts.tsv").write_text("a\tApple\nb\tBanana\nc\tCherry\n")
    (directory / f"{name}_images").mkdir(exist_ok=True)
    (directory / f"{name}_images" / "a.jpg").write_bytes(b"jpeg-a")
    return directory


def bump(path, text):
    """Rewrite a file with a new mtime even on coarse-clock file systems."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


def test_builds_once_then_loads_then_rebuilds_on_change(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_shop(data / "shop")

    first = resolve_dataset("shop", data, cache, SMALL)
    manifest_path = cached_dataset_dir("shop", cache) / "dataset.json"
    assert manifest_path == cache / "shop" / "dataset" / "dataset.json"
    assert (first.name, first.sources, first.num_items, first.num_users) == ("shop", ["shop"], 3, 3)
    assert first.items.column("image_key").to_pylist() == ["a", None, None]
    built_at = manifest_path.stat().st_mtime_ns

    again = resolve_dataset("shop", data, cache, SMALL)
    assert again.fingerprint == first.fingerprint
    assert manifest_path.stat().st_mtime_ns == built_at  # loaded, not rebuilt

    bump(data / "shop" / "shop_users.tsv", "u1\ta b c\nu2\tb c a\nu3\tc a b\nu4\ta c b\n")
    changed = resolve_dataset("shop", data, cache, SMALL)
    assert changed.num_users == 4 and changed.fingerprint != first.fingerprint
    assert PreparedDataset.load(manifest_path.parent).fingerprint == changed.fingerprint

    stricter = resolve_dataset("shop", data, cache, PrepareConfig(min_core=3, max_history=5))
    assert stricter.config.min_core == 3
    saved = json.loads(manifest_path.read_text())["config"]
    assert {k: saved[k] for k in ("min_core", "max_history", "truncate")} == {"min_core": 3, "max_history": 5,
                                                                           "truncate": False}

    (data / "shop" / "shop_images" / "b.png").write_bytes(b"png-b")  # new image: folder mtime moves
    os.utime(data / "shop" / "shop_images", ns=(time.time_ns() + 4_000_000_000,) * 2)
    with_image = resolve_dataset("shop", data, cache, PrepareConfig(min_core=3, max_history=5))
    assert with_image.items.column("image_key").to_pylist() == ["a", "b", None]


def test_damaged_copy_is_rebuilt(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_shop(data / "shop")
    first = resolve_dataset("shop", data, cache, SMALL)
    (cache / "shop" / "dataset" / "items.parquet").write_bytes(b"garbage")
    assert resolve_dataset("shop", data, cache, SMALL).fingerprint == first.fingerprint
    assert PreparedDataset.load(cache / "shop" / "dataset").fingerprint == first.fingerprint


def test_layout_detection_recbole_and_parquet(tmp_path):
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "rec.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "".join(
        f"u{u}\t{i}\t{u * 10 + i}\n" for u in range(3) for i in range(3)
    ))
    (rec / "rec.item").write_text("item_id:token\ttitle:token_seq\n0\tZero\n1\tOne\n2\tTwo\n")
    assert detect_layout(rec, "rec").kind == "recbole"
    dataset = resolve_dataset("rec", tmp_path, tmp_path / "cache", SMALL)
    assert dataset.items.column("text").to_pylist() == ["Zero", "One", "Two"]

    par = tmp_path / "par"
    par.mkdir()
    pq.write_table(pa.table({"user_id": [1, 1, 1, 2, 2, 2], "item_id": ["x", "y", "z"] * 2}), par / "interactions.parquet")
    pq.write_table(pa.table({"item_id": ["x", "y", "z"], "text": ["X", "Y", "Z"]}), par / "items.parquet")
    assert detect_layout(par, "par").kind == "parquet"
    assert resolve_dataset("par", tmp_path, tmp_path / "cache", SMALL).users.column("key").to_pylist() == ["par/1", "par/2"]


def test_clear_errors_when_nothing_is_found(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PmmcacheError, match=r"looked for: PMMRec \*_users.tsv.*RecBole empty.inter.*parquet"):
        resolve_dataset("empty", tmp_path, tmp_path / "cache")
    with pytest.raises(PmmcacheError, match="does not exist"):
        resolve_dataset("absent", tmp_path, tmp_path / "cache")
    with pytest.raises(PmmcacheError, match="must be letters"):
        resolve_dataset("../etc", tmp_path, tmp_path / "cache")
    with pytest.raises(PmmcacheError, match="names a dataset twice"):
        resolve_dataset("a,a", tmp_path, tmp_path / "cache")


def test_comma_separated_names_are_combined(tmp_path):
    write_shop(tmp_path / "shop")
    write_shop(tmp_path / "shop2", name="shop2")
    both = resolve_dataset("shop, shop2", tmp_path, tmp_path / "cache", SMALL)
    assert both.name == "shop+shop2" and both.sources == ["shop", "shop2"]
    assert both.num_items == 6 and both.users.column("items").to_pylist()[3] == [4, 5, 6]
    assert (tmp_path / "cache" / "shop2" / "dataset" / "dataset.json").is_file()


def write_fake_demo(data):
    root = data / "demo"
    for domain in ("north", "south"):
        write_shop(root / domain, name=domain)
    roles = [{"name": "north", "role": "source"}, {"name": "south", "role": "target"}]
    (root / "demo.json").write_text(json.dumps({"format": 1, "domains": roles}))


def test_demo_names_with_a_hand_made_demo(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_fake_demo(data)
    assert [d["name"] for d in demo_domains(data)] == ["north", "south"]

    demo = resolve_dataset("demo", data, cache, SMALL)
    assert demo.name == "demo" and demo.sources == ["north", "south"]
    assert demo.item_keys() == ["north/a", "north/b", "north/c", "south/a", "south/b", "south/c"]
    assert len(demo.image_stores) == 2

    south = resolve_dataset("demo/south", data, cache, SMALL)
    assert south.name == "demo/south" and south.item_keys() == ["south/a", "south/b", "south/c"]
    assert (cache / "demo" / "south" / "dataset" / "dataset.json").is_file()
    with pytest.raises(PmmcacheError, match="no domain 'east'; domains: north, south"):
        resolve_dataset("demo/east", data, cache, SMALL)

    bump(data / "demo" / "south" / "south_items_texts.tsv", "a\tAvocado\nb\tBanana\nc\tCherry\n")
    assert resolve_dataset("demo", data, cache, SMALL).items.column("text").to_pylist()[3] == "Avocado"


def test_ml100k_through_the_registry(tmp_path):
    dataset = resolve_dataset("ml-100k", tmp_path / "no-data-needed", tmp_path / "cache")
    assert (dataset.num_users, dataset.num_items) == (943, 1349)
    assert dataset.report["sources"]["ml-100k"]["k_core"]["interactions"] == 99_287
    assert dataset.image_stores == []


def _resolve_in_child(args):
    data, cache = args
    return resolve_dataset("shop", data, cache, SMALL).fingerprint


def test_concurrent_processes_share_one_build(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_shop(data / "shop")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        prints = pool.map(_resolve_in_child, [(data, cache)] * 2)
    assert prints[0] == prints[1] == resolve_dataset("shop", data, cache, SMALL).fingerprint
    assert sorted(p.name for p in (cache / "shop").iterdir()) == [".lock", "dataset"]


def test_real_demo_generates_on_first_use(tmp_path):
    pytest.importorskip("pmmcache.data.demo")
    data, cache = tmp_path / "data", tmp_path / "cache"
    demo = resolve_dataset("demo", data, cache)
    domains = [d["name"] for d in demo_domains(data)]
    assert demo.sources == domains and len(domains) >= 4
    assert {d["role"] for d in demo_domains(data)} == {"source", "target"}
    assert demo.report["sources"][domains[0]]["items_without_image"] == 0
    store = demo.open_image_stores()[0]
    assert store.get_bytes(demo.items.column("image_key")[0].as_py())[:2] == b"\xff\xd8"  # JPEG
    one = resolve_dataset(f"demo/{domains[-1]}", data, cache)
    assert set(one.item_keys()) < set(demo.item_keys())
