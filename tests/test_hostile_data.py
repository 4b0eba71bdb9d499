"""Hostile input on the data/cache side: stale states after items change, damaged caches, a full disk,
misread input files, and two processes at once. Each probe runs on a 10-item dataset with a 2-block
BERT and the tiny ViT; it fails loudly where pmmcache used to go on silently."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pmmcache import cache as cache_io
from pmmcache import extract as extract_module
from pmmcache import integrity
from pmmcache import train
from pmmcache.cli import main
from pmmcache.config import from_dict
from pmmcache.data.registry import resolve_dataset
from pmmcache.encoders.config import EncoderConfig
from pmmcache.errors import CacheCorruptError, CacheMismatchError, DataError, PmmcacheError
from pmmcache.extract import ExtractConfig
from pmmcache.extract import run as extract
from pmmcache.items import ItemStore
from pmmcache.locks import exclusive_lock
from pmmcache.runs import Setup, setup

from helpers.extraction import rewrite_line
from helpers.tiny_models import save_tiny_bert

NAME = "tiny"
ITEMS = 10
USERS = 10


# ------------------------------------------------------------------------------- a tiny dataset


def sequence(user: int) -> list[str]:
    """5 distinct items per user; every item occurs 5 times, so the default 5-core keeps all."""
    return [f"i{(user + 2 * j) % ITEMS}" for j in range(5)]


def write_image(path: Path, i: int, shade: int = 0) -> None:
    image = Image.new("RGB", (40, 32), ((i * 25 + shade) % 256, (90 + 37 * i) % 256, 200 - 9 * i))
    image.paste((255 - i * 20, 40 + shade % 200, 90), (4 + i, 5, 24 + i, 15))  # patches differ
    image.save(path)


def make_data(data_dir: Path, users: list[str] | None = None, texts: list[str] | None = None) -> Path:
    """The PMMRec layout in `data_dir/tiny/`: users tsv, items tsv and one png per item."""
    root = data_dir / NAME
    (root / f"{NAME}_images").mkdir(parents=True, exist_ok=True)
    if users is None:
        users = [f"u{u}\t{' '.join(sequence(u))}" for u in range(USERS)]
    if texts is None:
        texts = [f"i{i}\tthe item number {i}" for i in range(ITEMS)]
    (root / f"{NAME}_users.tsv").write_text("".join(line + "\n" for line in users))
    (root / f"{NAME}_items_texts.tsv").write_text("".join(line + "\n" for line in texts))
    for i in range(ITEMS):
        write_image(image_file(data_dir, i), i)
    return root


def image_file(data_dir: Path, i: int) -> Path:
    return data_dir / NAME / f"{NAME}_images" / f"i{i}.png"


def set_text(data_dir: Path, item: int, text: str) -> None:
    rewrite_line(data_dir / NAME / f"{NAME}_items_texts.tsv", item + 1, f"i{item}\t{text}")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("models") / "bert", layers=2)


def extract_config(data_dir: Path, cache_dir: Path, bert_dir: Path, **overrides) -> ExtractConfig:
    encoders = EncoderConfig(text_encoder=str(bert_dir), vision_encoder="pmmcache-tiny-vit", vision_weights="random",
                             top_blocks=1, max_text_length=8, image_size=64)
    settings = dict(dataset=NAME, data_dir=data_dir, cache_dir=cache_dir, encoders=encoders, batch_size=4,
                    num_workers=0, device="cpu")
    return ExtractConfig(**{**settings, **overrides})


def train_config(data_dir: Path, cache_dir: Path, bert_dir: Path, runs_dir: Path) -> train.TrainConfig:
    return from_dict(train.TrainConfig, {
        "dataset": NAME, "data_dir": str(data_dir), "cache_dir": str(cache_dir), "runs_dir": str(runs_dir),
        "encoders": {"text_encoder": str(bert_dir), "vision_encoder": "pmmcache-tiny-vit", "vision_weights": "random",
                     "top_blocks": 1, "max_text_length": 8, "image_size": 64},
        "model": {"item_tower": {"d_model": 32, "fusion_heads": 2}, "user_encoder": {"d_model": 32}},
        "batch_size": 4, "epochs": 1, "max_steps_per_epoch": 1, "mixed_precision": "no"})


@pytest.fixture
def extracted(tmp_path, bert_dir):
    """A fresh dataset and its complete cache: (data_dir, cache_dir, cache file)."""
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    make_data(data_dir)
    result = extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False)
    return data_dir, cache_dir, result.path


def open_store(data_dir: Path, cache_dir: Path, bert_dir: Path, tmp_path: Path) -> Setup:
    """What every stage-2 command does first: resolve the dataset and open its cache."""
    return setup(train_config(data_dir, cache_dir, bert_dir, tmp_path / "runs"), torch.device("cpu"))


def damage(path: Path, row: int, name: str = "image/states", value: float = 7.0) -> None:
    maps = cache_io.open_maps(path, mode="r+", names={name})
    maps[name][row] = value
    maps[name].flush()


# ------------------------------------------------------------------------------- 1. stale states


def test_stage_2_refuses_states_of_a_changed_text_naming_it_until_extract_refreshes(
        extracted, bert_dir, tmp_path, monkeypatch):
    data_dir, cache_dir, path = extracted
    set_text(data_dir, 3, "a different item entirely")
    with pytest.raises(CacheMismatchError) as err:
        open_store(data_dir, cache_dir, bert_dir, tmp_path)
    message = str(err.value)
    assert str(path) in message and "1 item(s)" in message and "tiny/i3" in message
    assert f"pmmcache extract --dataset {NAME}" in message

    result = extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False)
    assert result.path == path and result.items == 1  # one row encoded, and the store below finds every
    assert open_store(data_dir, cache_dir, bert_dir, tmp_path).store.num_items == ITEMS  # item current: i3's


def test_an_image_replaced_under_the_same_name_is_noticed_and_re_encoded_alone(extracted, bert_dir,
                                                                               tmp_path, capsys):
    data_dir, cache_dir, path = extracted
    before = resolve_dataset(NAME, data_dir, cache_dir).fingerprint
    folder_mtime = image_file(data_dir, 6).parent.stat().st_mtime_ns
    write_image(image_file(data_dir, 6), 6, shade=120)  # overwritten in place: the folder's mtime stays
    assert image_file(data_dir, 6).parent.stat().st_mtime_ns == folder_mtime
    assert resolve_dataset(NAME, data_dir, cache_dir).fingerprint != before

    old = cache_io.CacheReader(path).get(torch.arange(ITEMS + 1))
    result = extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False)
    assert "1 item(s) changed since they were extracted (tiny/i6)" in capsys.readouterr().out
    assert result.items == 1  # and the one row that changed is i6's, row 7:
    new = cache_io.CacheReader(path).get(torch.arange(ITEMS + 1))
    changed = (new.image.float() - old.image.float()).abs().amax(dim=(1, 2)) > 1e-3
    assert changed.nonzero().flatten().tolist() == [7]
    fresh = extract(extract_config(data_dir, tmp_path / "fresh", bert_dir), show_progress=False)
    torch.testing.assert_close(new.image, cache_io.CacheReader(fresh.path).get(torch.arange(ITEMS + 1)).image)


def test_a_refresh_killed_mid_way_loses_nothing_and_finishes_on_the_rerun(extracted, bert_dir, monkeypatch):
    data_dir, cache_dir, path = extracted
    for item in (1, 5, 8):
        set_text(data_dir, item, f"renamed item {item}")
    original = cache_io.CacheWriter.write
    calls = []

    def die_after_one_batch(self, rows, arrays):
        if calls:
            raise KeyboardInterrupt  # as a kill between two batches
        calls.append(list(rows))
        original(self, rows, arrays)

    monkeypatch.setattr(cache_io.CacheWriter, "write", die_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(extract_config(data_dir, cache_dir, bert_dir, batch_size=2), show_progress=False)
    monkeypatch.undo()
    assert calls == [[2, 6]] and not cache_io.is_complete(path)  # an interrupted refresh is never read as whole
    check = integrity.check_rows(path)
    assert check.pending == [9] and check.ok  # pending rows of an interrupted run are not damage

    assert extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False).items == 1  # row 9 alone:
    # the rows re-encoded before the kill are kept
    fresh = extract(extract_config(data_dir, cache_dir.parent / "fresh", bert_dir), show_progress=False)
    a, b = (cache_io.CacheReader(p).get(torch.arange(ITEMS + 1)) for p in (path, fresh.path))
    torch.testing.assert_close(a.text, b.text, atol=1e-3, rtol=1e-3)
    assert integrity.check_rows(path).ok


def test_a_changed_item_set_is_refused_saying_what_changed_and_that_force_re_extracts(extracted, bert_dir):
    data_dir, cache_dir, path = extracted
    texts = data_dir / NAME / f"{NAME}_items_texts.tsv"
    texts.write_text(texts.read_text() + "i10\ta new item\n")
    users = data_dir / NAME / f"{NAME}_users.tsv"
    users.write_text("".join(f"{line} i10\n" for line in users.read_text().splitlines()))
    with pytest.raises(CacheMismatchError) as err:
        extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False)
    assert "1 added (tiny/i10)" in str(err.value) and "--force" in str(err.value)
    result = extract(extract_config(data_dir, cache_dir, bert_dir, force=True), show_progress=False)
    assert result.items == ITEMS + 1


# ------------------------------------------------------------------------------- 2. damaged caches


def test_verify_cache_names_a_damaged_row_exits_non_zero_and_reencode_repairs_it(extracted, bert_dir, monkeypatch):
    data_dir, cache_dir, path = extracted
    runner = CliRunner()
    assert runner.invoke(main, ["verify-cache", str(cache_dir)]).exit_code == 0
    damage(path, 5)
    result = runner.invoke(main, ["verify-cache", str(path)])
    assert result.exit_code != 0 and "DAMAGED" in result.output
    assert "1 row(s) whose bytes do not match their checksum: 5 (tiny/i4)" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(main, ["verify-cache", "--reencode", str(path)])
    assert result.exit_code != 0 and "marked 1 row(s) for re-encoding" in result.output
    assert extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False).items == 1  # the marked row
    assert runner.invoke(main, ["verify-cache", str(path)]).exit_code == 0


@pytest.mark.parametrize("manifest", ['{"dataset": ', '[1, 2]', None], ids=["truncated", "not-an-object", "missing"])
def test_a_damaged_cache_manifest_is_one_error_naming_the_file(extracted, manifest):
    import h5py

    _, cache_dir, path = extracted
    with h5py.File(path, "r+") as f:
        if manifest is None:
            del f.attrs["manifest"]
        else:
            f.attrs["manifest"] = manifest
    result = CliRunner().invoke(main, ["verify-cache", str(path)])
    assert result.exit_code == 2 and f"error: {path}: its manifest is missing or damaged" in result.output, \
        result.output
    assert "re-extract with --force" in result.output and "Traceback" not in result.output


def test_non_finite_states_are_reported_even_with_a_matching_checksum(extracted):
    _, _, path = extracted
    damage(path, 2, "text/states", np.nan)
    maps = cache_io.open_maps(path, mode="r+")
    maps["checksum"][2] = cache_io.row_checksums(maps, np.array([2]))[0]  # written NaN, checksum "fine"
    maps["checksum"].flush()
    check = integrity.check_rows(path)
    assert check.non_finite == [2] and check.bad_checksum == []
    assert "1 row(s) with NaN or infinite values: 2 (tiny/i1)" in check.problems()


def test_train_start_up_check_fails_on_a_damaged_cache_naming_the_file(extracted, bert_dir, tmp_path):
    data_dir, cache_dir, path = extracted
    damage(path, 8, "text/mask", 0)
    with pytest.raises(CacheCorruptError) as err:
        open_store(data_dir, cache_dir, bert_dir, tmp_path)
    assert str(path) in str(err.value) and "tiny/i7" in str(err.value) and "verify-cache" in str(err.value)


def test_an_old_cache_without_checksums_or_item_hashes_is_read_with_a_note(tmp_path, capsys):
    path = tmp_path / "old.h5"
    layout = [s for s in cache_io.cache_layout(4, (3, 8), None) if s.name not in ("checksum", "item_hash")]
    cache_io.create_cache(path, {"dataset": {"name": "x"}}, ["", "x/a", "x/b", "x/c"], layout)
    writer = cache_io.CacheWriter(path)
    writer.write(np.arange(4), {"text/states": np.ones((4, 3, 8), np.float16), "text/mask": np.ones((4, 3), np.uint8),
                                "modality": np.ones((4, 2), np.uint8), "flags": np.zeros(4, np.uint8)})
    writer.mark_complete()
    writer.close()

    result = CliRunner().invoke(main, ["verify-cache", str(path)])
    assert result.exit_code == 0 and "has no row checksums" in result.output and "--force" in result.output
    integrity.check_sample(path)  # a warning, no error
    store = ItemStore(cache_io.CacheReader(path), ["x/a", "x/b", "x/c"])
    store.check_current(np.zeros((3, cache_io.ITEM_HASH_BYTES), np.uint8))
    err = capsys.readouterr().err
    assert "no row checksums" in err and "no per-item fingerprints" in err


# ------------------------------------------------------------------------------- 3. disk full


def disk_full(*args) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path, bert_dir, monkeypatch):
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    make_data(data_dir)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=20_000))
    with pytest.raises(PmmcacheError, match=r"not enough disk space for the cache .* needs [\d.]+ MB, .* has 0.0 MB"):
        extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False)
    assert not [p for p in (cache_dir / NAME).iterdir() if ".h5" in p.name and not p.name.endswith(".lock")]
    monkeypatch.undo()
    result = extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False)
    stat = result.path.stat()
    assert stat.st_blocks * 512 >= stat.st_size  # allocated, not sparse: a memory-mapped write cannot SIGBUS


def test_disk_full_while_allocating_says_how_much_and_where_and_resume_works(tmp_path, bert_dir, monkeypatch):
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    make_data(data_dir)
    original = cache_io.CacheWriter.write

    def stop_after_one_batch(self, rows, arrays):
        original(self, rows, arrays)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_io.CacheWriter, "write", stop_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False)

    monkeypatch.setattr(os, "posix_fallocate", disk_full)
    with pytest.raises(PmmcacheError, match=r"disk full while writing .*\.h5 .*needs [\d.]+ MB on .*rerun"):
        extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False)
    monkeypatch.undo()
    result = extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False)
    assert cache_io.is_complete(result.path) and result.items == ITEMS - 3  # rows 4..ITEMS: 1..3 were written


def test_disk_full_while_writing_the_report_says_so_and_the_rerun_completes(tmp_path, bert_dir, monkeypatch):
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    make_data(data_dir)

    monkeypatch.setattr(extract_module, "write_json", disk_full)
    with pytest.raises(PmmcacheError, match=r"disk full while writing .*\.report\.json"):
        extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False)
    monkeypatch.undo()
    result = extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False)
    assert cache_io.is_complete(result.path) and result.items == 0 and result.path.with_suffix(".report.json").is_file()


# ------------------------------------------------------------------------------- 4. wrong or empty input


def test_a_comma_separated_sequence_column_is_an_error_naming_the_file_and_the_cause(tmp_path, bert_dir):
    data_dir = tmp_path / "data"
    make_data(data_dir, users=[f"u{u}\t{','.join(sequence(u))}" for u in range(USERS)])
    with pytest.raises(DataError, match="looks comma-separated") as err:
        extract(extract_config(data_dir, tmp_path / "cache", bert_dir), show_progress=False)
    assert err.value.path == str(data_dir / NAME / f"{NAME}_users.tsv") and err.value.line == 1
    assert not list((tmp_path / "cache").rglob("*.h5"))


def test_an_empty_items_file_is_an_error_naming_it(tmp_path, bert_dir):
    data_dir = tmp_path / "data"
    make_data(data_dir, texts=[])
    with pytest.raises(DataError, match="lists no items") as err:
        extract(extract_config(data_dir, tmp_path / "cache", bert_dir), show_progress=False)
    assert Path(err.value.path).name == f"{NAME}_items_texts.tsv"


def test_data_that_k_core_filtering_empties_is_an_error_saying_what_to_lower(tmp_path, bert_dir):
    data_dir = tmp_path / "data"
    make_data(data_dir, users=[f"u{u}\t{' '.join(sequence(u)[:4])}" for u in range(USERS)])  # 4 items per user
    with pytest.raises(DataError, match=r"nothing is left after 5-core filtering.*min.core") as err:
        extract(extract_config(data_dir, tmp_path / "cache", bert_dir), show_progress=False)
    assert Path(err.value.path).name == f"{NAME}_users.tsv"


def test_dropped_interactions_and_bad_images_are_counted_on_the_screen(tmp_path, bert_dir, capsys):
    data_dir = tmp_path / "data"
    users = [f"u{u}\t{' '.join(sequence(u))}" for u in range(USERS)]
    users[0] += " ghost"
    make_data(data_dir, users=users + ["lonely\ti0 i1"])
    image_file(data_dir, 2).write_bytes(b"not a png")
    extract(extract_config(data_dir, tmp_path / "cache", bert_dir), show_progress=False)
    out = capsys.readouterr().out
    assert "tiny: 1 unknown item problem(s) (first: tiny_users.tsv line 1: item 'ghost'" in out
    assert "tiny: 5-core filtering dropped 2 of 52 interactions (1 users, 0 items)" in out
    assert "warning: 1 item(s) with unreadable image: tiny/i2" in out


# ------------------------------------------------------------------------------- 5. two processes at once


def test_create_cache_leaves_the_temporary_file_of_a_running_process_alone(tmp_path):
    path = tmp_path / "c.h5"
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        theirs = path.with_name(f"{path.name}.tmp{running.pid}-abcd1234")
        theirs.write_bytes(b"being written")
        dead = path.with_name(f"{path.name}.tmp{2 ** 22 + 12345}-deadbeef")  # above pid_max: no such process
        dead.write_bytes(b"left by a killed process")
        cache_io.create_cache(path, {}, ["", "a"], cache_io.cache_layout(2, (2, 4), None))
        assert theirs.exists() and not dead.exists() and cache_io.read_keys(path) == ["", "a"]
    finally:
        running.kill()
        running.wait()


def test_a_held_dataset_lock_says_who_holds_it_and_gives_up_after_the_timeout(tmp_path, monkeypatch, capsys):
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    make_data(data_dir)
    monkeypatch.setenv("PMMCACHE_LOCK_TIMEOUT", "0.3")
    with exclusive_lock(cache_dir / NAME / ".lock", "a test"):  # held here, through another file handle
        with pytest.raises(PmmcacheError, match=rf"gave up after 0.3 s waiting for .* held by pid {os.getpid()}"):
            resolve_dataset(NAME, data_dir, cache_dir)
    assert "waiting for the prepared dataset" in capsys.readouterr().err
    assert resolve_dataset(NAME, data_dir, cache_dir).num_items == ITEMS


def test_a_second_extract_of_the_same_cache_waits_for_the_first(extracted, bert_dir, monkeypatch, capsys):
    data_dir, cache_dir, path = extracted
    monkeypatch.setenv("PMMCACHE_LOCK_TIMEOUT", "0.3")
    with exclusive_lock(path.with_name(path.name + ".lock"), "a test"):
        with pytest.raises(PmmcacheError, match=f"waiting for the cache {re.escape(str(path))}"):
            extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False)
    holder = json.loads(path.with_name(path.name + ".lock").read_text())
    assert holder["pid"] == os.getpid()
    assert extract(extract_config(data_dir, cache_dir, bert_dir), show_progress=False).already_complete
