"""The benchmarks run at a tiny size and report every figure and ratio they promise; the reader's fast
paths return what the plain reads return. No timing is asserted."""
from __future__ import annotations

import json
import statistics

import h5py
import numpy as np
import pytest
import torch

from pmmcache import bench
from pmmcache import cache as cache_io

from helpers.tiny_models import save_tiny_bert
from helpers.toy import NAME, NUM_ITEMS, make_toy

ITEMS, TOKENS, DIM = 256, 20, 32  # 10 text + 10 image tokens per item; big enough that no figure rounds to 0


def test_reader_bench_reports_every_read_path(tmp_path):
    result = bench.reader_bench(tmp_path, items=ITEMS, tokens=TOKENS, dim=DIM, batch_items=64, repeats=3,
                                device=torch.device("cpu"))
    paths = {"memmap", "ram", "memmap_int8", "ram_int8", "h5py_chunked_fancy", "h5py_contiguous_fancy"}
    assert set(result["ms_per_batch"]) == paths  # no "gpu" figure without CUDA
    assert all(ms > 0 for ms in result["ms_per_batch"].values())
    assert set(result["speedup_vs_naive_h5py"]) == paths
    assert result["speedup_vs_naive_h5py"]["h5py_chunked_fancy"] == 1.0
    assert all(ratio > 0 for ratio in result["speedup_vs_naive_h5py"].values())
    assert (result["items"], result["tokens_per_item"], result["dim"], result["batch_items"]) == (ITEMS, TOKENS, DIM, 64)
    assert result["cache_mb"] == round((tmp_path / "bench-reader.h5").stat().st_size / 1e6, 1) > 0
    assert 0 < result["cache_mb_int8"] < result["cache_mb"]

    # The naive layout really is chunked one item per chunk, the cache contiguous.
    with h5py.File(tmp_path / "bench-reader-chunked.h5", "r") as f:
        assert f["image/states"].chunks == (1, TOKENS - TOKENS // 2, DIM)
    with h5py.File(tmp_path / "bench-reader.h5", "r") as f:
        assert f["image/states"].chunks is None


def test_memmap_and_ram_readers_return_what_h5py_reads(tmp_path):
    path = tmp_path / "synthetic.h5"
    bench.write_synthetic_cache(path, items=ITEMS, text_tokens=6, image_tokens=4, dim=DIM, chunk=7)
    index = torch.tensor([[5, 1, ITEMS], [5, 0, 17]])  # repeats, padding row, last row, any order
    flat = index.reshape(-1).numpy()
    with h5py.File(path, "r") as f:  # the plain path: h5py reads of the whole datasets
        plain = {name: f[name][:][flat] for name in ("text/states", "text/mask", "image/states", "modality")}
        assert f["done"][:].all() and f["complete"][0] == 1
    assert np.abs(plain["text/states"]).max() > 0.5  # random states, not zeros

    results = {}
    for storage in ("memmap", "ram"):
        reader = cache_io.CacheReader(path, storage=storage)
        assert reader.storage == storage
        results[storage] = reader.get(index)
    fast, slow = results["memmap"], results["ram"]
    for got in (fast, slow):
        assert got.text.shape == (2, 3, 6, DIM) and got.image.shape == (2, 3, 4, DIM)
        np.testing.assert_array_equal(got.text.reshape(-1, 6, DIM).numpy(), plain["text/states"])
        np.testing.assert_array_equal(got.image.reshape(-1, 4, DIM).numpy(), plain["image/states"])
        np.testing.assert_array_equal(got.text_mask.reshape(-1, 6).numpy(), plain["text/mask"].astype(bool))
        np.testing.assert_array_equal(got.modality.reshape(-1, 2).numpy(), plain["modality"].astype(bool))
    assert torch.equal(fast.text, slow.text) and torch.equal(fast.image, slow.image)


def invoke_json(args: list[str], tmp_path) -> dict:
    from click.testing import CliRunner

    from pmmcache.cli import main

    output = tmp_path / "bench.json"
    result = CliRunner().invoke(main, [*args, "--output", str(output)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed == json.loads(output.read_text())  # one JSON object, printed and written
    return printed


TINY = ["--dim", "16", "--blocks", "2", "--top-blocks", "1", "--heads", "2", "--text-tokens", "6",
        "--image-size", "64", "--device", "cpu"]


def test_step_bench_times_every_variant_side_by_side(tmp_path, monkeypatch):
    from pmmcache import train
    from pmmcache.bench import pairwise

    calls = {"before": 0, "after": 0, "catalogue": 0}
    autocast_on: list[bool] = []  # per in-batch DAP call: did it run under bf16 autocast

    def counting(name, loss):
        def counted(*args, **kwargs):
            calls[name] += 1
            if name == "after":
                autocast_on.append(torch.is_autocast_enabled("cpu"))
            return loss(*args, **kwargs)
        return counted

    monkeypatch.setattr(pairwise, "pairwise_dap_loss", counting("before", pairwise.pairwise_dap_loss))
    monkeypatch.setattr(train, "dap_loss", counting("after", train.dap_loss))
    monkeypatch.setattr(train, "catalogue_dap_loss", counting("catalogue", train.catalogue_dap_loss))
    result = invoke_json(["bench", "step", "--batch-size", "4", "--positions", "5", "--steps", "1", "--rounds", "1", "--warmup", "0",
                          "--catalogue", "30", "--negatives-batches", "3,6", "--negatives-steps", "2", *TINY], tmp_path)
    negatives = result["in_batch_negatives"]
    assert negatives["steps_timed"] == 2 and set(negatives["batches"]) == {"3", "6"}
    for figures in negatives["batches"].values():
        assert figures["ms_before"] > 0 and figures["ms_after"] > 0 and figures["speedup"] > 0
        assert figures["dap_nicl_ms"]["before"] > 0 and figures["dap_nicl_ms"]["after"] > 0
    # The trainer's step: 6 variants x 1 step, then per batch size 2 steps after; the old path only before
    # ... and, with catalogue negatives, 1 step each way; then 1 step in each precision (in-batch)
    assert calls == {"before": 2 * 2, "after": 6 + 2 * 2 + 2, "catalogue": 2}
    catalogue = result["catalogue_negatives"]
    assert catalogue["ms_twice"] > 0 and catalogue["ms_once"] > 0 and catalogue["speedup"] > 0
    precisions = result["fp32_vs_bf16"]  # fp32 (a CPU's auto) and bf16 autocast, 1 step each
    assert precisions["ms_fp32"] > 0 and precisions["ms_bf16"] > 0 and precisions["speedup"] > 0
    assert isinstance(precisions["native_bf16"], bool) and set(precisions["spread_ms"]) == {"fp32", "bf16"}
    assert autocast_on == [False] * (6 + 2 * 2 + 1) + [True]  # only the bf16 turn runs under autocast
    variants = {"end_to_end", "cached_memmap_plain", "cached_memmap_prefetch", "cached_ram_plain",
                "cached_ram_prefetch", "compute_only"}
    assert result["bench"] == "step" and result["device"] == "cpu" and result["precision"] == "fp32"
    assert set(result["ms_per_step"]) == variants and all(ms > 0 for ms in result["ms_per_step"].values())
    assert set(result["speedup_vs_end_to_end"]) == variants - {"end_to_end"}
    assert set(result["cached_vs_compute_only"]) == variants - {"end_to_end", "compute_only"}
    assert result["size"]["dim"] == 16 and result["size"]["image_tokens"] == 5 and result["batch"]["items"] == 20
    assert result["losses"] == ["dap", "nicl", "nid", "rcl"] and result["gpu_peak_mb"] is None
    assert result["host_peak_rss_mb"] > 0 and result["rounds"] == 1


def test_eval_bench_reports_item_table_scoring_and_total_seconds(tmp_path):
    result = invoke_json(["bench", "eval", "--catalogue", "50", "--users", "40", "--cache-rows", "7",
                          "--item-batch-size", "16", "--score-batch-size", "16", "--scoring-items", "3000", *TINY],
                         tmp_path)
    assert (result["items"], result["users"], result["cache_rows"]) == (50, 40, 7)
    assert result["precision"] == "fp32"  # auto on a CPU: as `pmmcache eval` runs there
    scale = result["scoring_at_scale"]
    assert (scale["items"], scale["users"]) == (3000, 40) and scale["seconds"] > 0 and scale["user_items_per_s"] > 0
    assert set(result["seconds"]) == {"item_table", "user_vectors", "scores_and_ranks", "total"}
    assert result["seconds"]["total"] >= result["seconds"]["item_table"] > 0
    for figure in ("item_table_items_per_s", "user_vectors_users_per_s", "scoring_user_items_per_s", "host_peak_rss_mb"):
        assert result[figure] > 0, figure


def test_cyclic_store_maps_a_large_catalogue_onto_the_cache_rows(tmp_path):
    from pmmcache.bench.evaluation import CyclicStore

    path = tmp_path / "c.h5"
    bench.write_synthetic_cache(path, items=5, text_tokens=3, image_tokens=2, dim=4)
    reader = cache_io.CacheReader(path, storage="ram")
    store = CyclicStore(reader, num_items=12)
    got = store.get(torch.tensor([0, 1, 5, 6, 12]))
    want = reader.get(torch.tensor([0, 1, 5, 1, 2]))
    assert store.num_items == 12 and torch.equal(got.image, want.image) and torch.equal(got.text, want.text)


def test_extract_bench_compares_end_to_end_with_encoding_alone(tmp_path):

    make_toy(tmp_path / "data")
    result = bench.run_extract_bench(dataset=NAME, items=64, tokens=8, dim=16, batch_items=16, repeats=1,
                                     device="cpu", data_dir=tmp_path / "data", text_encoder=str(save_tiny_bert(tmp_path / "bert")),
                                     vision_encoder="pmmcache-tiny-vit", vision_weights="random", image_size=64,
                                     max_text_length=16, num_workers=0, batch_size=8, rounds=2)
    extraction = result["extraction"]
    assert extraction["items"] == NUM_ITEMS and extraction["items_per_s"] > 0
    rounds = extraction["rounds"]  # the two take turns: one figure of each per round
    assert len(rounds["end_to_end_items_per_s"]) == len(rounds["encode_only_items_per_s"]) == 2
    median = statistics.median(rounds["encode_only_items_per_s"])  # of two rounds: their mean, rounded to 0.1
    assert extraction["encode_only_items_per_s"] == pytest.approx(median, abs=0.051) and median > 0
    assert extraction["end_to_end_vs_encode_only"] > 0 and extraction["image_decoder"] == "cpu"
    assert {"memmap_int8", "ram_int8"} <= set(result["reader"]["ms_per_batch"]) and result["host_peak_rss_mb"] > 0


def test_the_step_bench_times_the_trainers_own_step():
    from pmmcache import train
    from pmmcache.bench import step

    assert step.train_step is train.train_step and step.step_inputs is train.step_inputs
