"""Sharded caches (`pmmcache extract --shards`): every shard file written by one process, read as one
cache equal to the single-file cache (every row of every dataset), resumable per shard, transparent
to stage 2 and covered by the integrity checks; two processes of two "machines" shard by default."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pmmcache import cache as cache_io
from pmmcache import integrity
from pmmcache.data.registry import resolve_dataset
from pmmcache.errors import CacheCorruptError, PmmcacheError
from pmmcache.extract import run, shard_count
from pmmcache.items import open_item_store
from pmmcache.shards import RowConcat

from helpers.extraction import write_spy_module
from helpers.toy import NAME, NUM_ITEMS, extract_config, free_port

REPO = Path(__file__).resolve().parents[1]
BATCH = 4  # divides both shards' row ranges (0-19, 20-39): every layout encodes the same batches


@pytest.fixture(scope="module")
def one_file(toy, tmp_path_factory):
    """The toy cache in one file, encoded in batches of BATCH."""
    config = dataclasses.replace(extract_config(toy, cache_dir=tmp_path_factory.mktemp("one-file")), batch_size=BATCH)
    return run(config, show_progress=False).path


def sharded_config(toy, cache_dir, **overrides):
    return dataclasses.replace(extract_config(toy, cache_dir=cache_dir), batch_size=BATCH, **overrides)


def assert_equal_caches(path: Path, reference: Path) -> None:
    """Every dataset, every row, bit for bit; the same keys and manifest (but the layout)."""
    assert cache_io.read_keys(path) == cache_io.read_keys(reference)
    got, want = cache_io.open_maps(path), cache_io.open_maps(reference)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name][:]) if name != "complete" else got[name][0],
                                      np.asarray(want[name][:]) if name != "complete" else want[name][0], err_msg=name)


def test_the_shards_read_back_as_the_single_file_cache(toy, one_file, tmp_path):
    result = run(sharded_config(toy, tmp_path / "cache", shards=2), show_progress=False)
    index = result.path
    assert index.name == one_file.name and result.items == NUM_ITEMS
    shards = cache_io.read_shards(index)
    assert [(s.first_row, s.rows) for s in shards] == [(0, 20), (20, 20)]
    assert sorted(p.name for p in index.parent.iterdir() if p.suffix in (".h5", ".h5shard")) == sorted(
        [index.name] + [s.file for s in shards])
    assert cache_io.is_complete(index) and all(cache_io.is_complete(index.with_name(s.file)) for s in shards)
    assert_equal_caches(index, one_file)

    dataset = resolve_dataset(NAME, toy.data_dir, toy.cache_dir)
    expected = cache_io.fitting_manifest(cache_io.read_manifest(one_file), ("text", "image"))
    for storage in ("memmap", "ram"):  # stage 2's reader, through open_item_store (its start-up checks included)
        got = open_item_store(index, dataset, expected, storage=storage).get(torch.arange(NUM_ITEMS + 1))
        want = open_item_store(one_file, dataset, expected, storage=storage).get(torch.arange(NUM_ITEMS + 1))
        for field in ("text", "text_mask", "image", "modality"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (storage, field)
    assert isinstance(cache_io.open_maps(index)["done"], RowConcat)


def test_an_interrupted_sharded_extraction_resumes_shard_by_shard(toy, one_file, tmp_path, monkeypatch):
    config = sharded_config(toy, tmp_path / "cache", shards=2)
    original = cache_io.CacheWriter.write
    calls = []

    def die_after_two_batches(self, rows, arrays):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(list(rows))
        original(self, rows, arrays)

    monkeypatch.setattr(cache_io.CacheWriter, "write", die_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run(config, show_progress=False)
    monkeypatch.undo()
    index = next((tmp_path / "cache" / NAME).glob("*.h5"))
    shards = cache_io.read_shards(index)
    first, second = (cache_io.CacheWriter(index.with_name(s.file)) for s in shards)
    assert len(first.pending_rows()) == 20 - 2 * BATCH and len(second.pending_rows()) == 20
    first.close(), second.close()
    assert not cache_io.is_complete(index)
    assert run(config, show_progress=False).items == NUM_ITEMS + 1 - 2 * BATCH
    assert_equal_caches(index, one_file)


def test_integrity_checks_cover_every_shard(toy, tmp_path, capsys):
    index = run(sharded_config(toy, tmp_path / "cache", shards=2), show_progress=False).path
    shard = index.with_name(cache_io.read_shards(index)[1].file)
    damaged = cache_io.open_maps(shard, mode="r+", names={"image/states"})["image/states"]
    damaged[3, 0, 0] += 1  # shard row 3 = cache row 23
    damaged.flush()
    with pytest.raises(CacheCorruptError, match=rf"(?s){re.escape(str(index))}.*1 row\(s\) whose bytes do not match .*: 23 \(toy/"):
        integrity.check_sample(index)
    with pytest.raises(CacheCorruptError):
        integrity.run(integrity.VerifyConfig(paths=(index.parent,), reencode=True))
    out = capsys.readouterr().out
    assert f"DAMAGED: {index}" in out and "marked 1 row(s) for re-encoding" in out and ".h5shard" not in out
    assert not cache_io.is_complete(index) and cache_io.CacheWriter(shard).pending_rows().tolist() == [3]
    assert run(sharded_config(toy, tmp_path / "cache", shards=2), show_progress=False).items == 1
    assert integrity.check_rows(index).ok

    shard.unlink()
    with pytest.raises(PmmcacheError, match=rf"its shard {re.escape(shard.name)} \(rows 20-39\) is missing"):
        cache_io.CacheReader(index)


def test_shards_by_default_only_when_the_processes_span_machines(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert shard_count("auto", 1) == 0 and shard_count("auto", 4) == 0  # one machine (no torchrun variable)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert shard_count("auto", 4) == 0  # all four processes on this machine
    assert shard_count("auto", 8) == 8 and shard_count("one-file", 8) == 0  # two machines of four
    assert shard_count("per-process", 3) == 3 and shard_count(5, 1) == 5


SPY = write_spy_module()


@pytest.mark.slow  # two interpreters forming a gloo group: ~30 s on 2 cores, like test_extract's accelerate test
def test_two_processes_on_two_machines_write_a_shard_each(toy, one_file, tmp_path):
    """Two ranks with the variables `accelerate launch` (torchrun) sets, one process per machine."""
    (tmp_path / "spy.py").write_text(SPY)
    logs, cache_dir = tmp_path / "logs", tmp_path / "cache"
    logs.mkdir()
    config = extract_config(toy)
    args = ["extract", "--dataset", NAME, "--data-dir", str(toy.data_dir), "--cache-dir", str(cache_dir),
            "--text-encoder", config.encoders.text_encoder, "--vision-encoder", "pmmcache-tiny-vit",
            "--vision-weights", "random", "-k", str(config.encoders.top_blocks),
            "--max-text-length", str(config.encoders.max_text_length), "--image-size", str(config.encoders.image_size),
            "--batch-size", str(BATCH), "--num-workers", "0", "--device", "cpu"]
    port = free_port()
    children = []
    for rank in (0, 1):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SPY_LOG_DIR": str(logs),
               "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
        children.append(subprocess.Popen([sys.executable, "-m", "spy", *args], cwd=tmp_path, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [child.communicate(timeout=180) for child in children]
    for child, (_, err) in zip(children, outputs):
        assert child.returncode == 0, err[-3000:]
    assert f"extracted {NUM_ITEMS} items" in outputs[0][0]

    index = cache_dir / NAME / one_file.name
    shards = cache_io.read_shards(index)
    assert len(shards) == 2 and cache_io.is_complete(index)
    for rank, shard in enumerate(shards):  # each process wrote its own shard's rows, and only those
        rows = [int(r) for r in (logs / f"rank{rank}.txt").read_text().split()]
        assert sorted(rows) == list(range(shard.first_row, shard.stop))
    assert_equal_caches(index, one_file)
