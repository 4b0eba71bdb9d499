"""Training-step benchmark: the stage-2 step on cached states vs the same model trained end to end.

Every variant trains the same PMMRec (random encoders of `ModelSize`, top k blocks + fusion + user
encoder) with the same objectives, batch (users x positions) and precision, in one process:

- end_to_end: the released PMMRec code's way: the lower encoder blocks recomputed from token ids and
  pixels (already on the device, no image decoding) for the batch's unique items every step;
- cached_<storage>: the step on states read through `ItemStore` / `CacheReader` from a memory map,
  RAM or GPU memory, with the batch prepared in the step (`plain`) or one step ahead on a background
  thread (`prefetch`, what `pmmcache train` does);
- compute_only: the same step with every batch already prepared on the device (no data path).

Then, at each of `negatives_batches` users per batch, the compute-only step with DAP and NICL as they
were before the per-user bitmap (`pmmcache.bench.pairwise`: the (B, N, B*N) comparison mask and dense
masks over the logits) and as `pmmcache.objectives` computes them now, taking turns over `rounds`.

Last, the compute-only step with every catalogue item a DAP candidate (`objectives.negatives =
catalogue`), the item tower run twice per step (the batch's items, then the catalogue) and once
(`encode_catalogue = once`: the batch's items read from the catalogue's vectors), taking turns.

With fp32 precision (a CPU's default), also the compute-only step in fp32 and under bf16 autocast
(`--mixed-precision bf16`), taking turns: on a CPU with native bf16 (AVX512-BF16, AMX) the matmuls
run faster (about 3x on an AVX512-BF16 EPYC), so training there may gain from bf16 even without a GPU.

Every variant's step is `pmmcache.train.train_step`, the trainer's own: forward under accelerate's
autocast, backward through the accelerator, clipping at GRAD_CLIP, AdamW and scheduler step.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator

from pmmcache import cache as cache_io
from pmmcache.batches import Batch, Prefetcher, prepare_batch
from pmmcache.bench.common import (bench_keys, build_encoders, build_model, default_size, gpu_peak_mb,
                                   host_peak_rss_mb, machine, median_ms, reset_gpu_peak, resolve_device, synchronize,
                                   write_synthetic_cache)
from pmmcache.bench.pairwise import pairwise_dap_loss, pairwise_nicl_loss, pairwise_objectives
from pmmcache.objectives import dap_loss, nicl_loss
from pmmcache.items import ItemStore
from pmmcache.run_config import TrainConfig
from pmmcache.train import TrainingStep, make_optimizer, step_inputs, train_step


GRAD_CLIP = 1.0  # clipping is timed too (the trainer clips when --grad-clip > 0)


class RecomputingStore:
    """`ItemStore.get` for the end-to-end baseline: states from the lower blocks, every call."""

    def __init__(self, text: Any, vision: Any, token_ids: torch.Tensor, token_mask: torch.Tensor,
                 pixels: torch.Tensor, autocast: Callable[[], Any]):
        self.text, self.vision, self.autocast = text, vision, autocast
        self.token_ids, self.token_mask, self.pixels = token_ids, token_mask, pixels  # on the device

    def get(self, indices: torch.Tensor) -> cache_io.ItemStates:
        index = indices.to(self.token_ids.device)
        with torch.no_grad(), self.autocast():
            text = self.text.lower(self.token_ids[index], self.token_mask[index])  # (U, L, d)
            image = self.vision.lower(self.pixels[index % len(self.pixels)])  # (U, P, d)
        modality = torch.ones(len(index), 2, dtype=torch.bool, device=index.device)
        return cache_io.ItemStates(text=text, text_mask=self.token_mask[index].bool(), image=image, modality=modality)


def objectives_ms(item_ids: torch.Tensor, dim: int, dap: Callable[..., torch.Tensor], nicl: Callable[..., torch.Tensor],
                  repeats: int = 3) -> float:
    """Median ms of DAP + NICL forward and backward alone (logQ on, random vectors of width `dim`) on
    the batch's (B, N) ids: the part of the step the negative mask is in."""
    generator = torch.Generator().manual_seed(0)
    batch, length = item_ids.shape
    device = item_ids.device
    leaves = [torch.randn(batch, length, dim, generator=generator).to(device).requires_grad_(True) for _ in range(4)]
    log_popularity = torch.full((int(item_ids.max()) + 1,), -math.log(max(1, int(item_ids.max())))).to(device)

    def once() -> None:
        states, vectors, texts, images = leaves
        loss = dap(states[:, :-1], vectors, item_ids, log_popularity) + nicl(texts, images, item_ids,
                                                                               log_popularity=log_popularity)
        loss.backward()
        synchronize(device)

    return median_ms(once, repeats)


def run_step_bench(users: int = 32, positions: int = 21, steps: int | None = None, warmup: int | None = None, rounds: int = 3,
                   catalogue: int | None = None, device: str = "auto", precision: str = "auto",
                   stage: str = "pretrain", storages: tuple[str, ...] | None = None, work_dir: str | None = None,
                   seed: int = 0, negatives_batches: tuple[int, ...] = (32, 128, 256), negatives_steps: int | None = None,
                   catalogue_ways: bool = True, precision_ways: bool = True, **size_options: Any) -> dict[str, Any]:
    """ms per step of each variant (see the module docstring) and their ratios; one JSON-able dict.

    Each variant runs `rounds` times, the variants taking turns, `warmup` + `steps` steps each; a
    variant's figure is the median over its rounds, so a load change on a shared machine hits all
    variants alike instead of the one that happened to run then."""
    dev = resolve_device(device)
    size = default_size(dev, **size_options)
    precision = ("bf16" if dev.type == "cuda" else "fp32") if precision == "auto" else precision
    steps = steps or (20 if dev.type == "cuda" else 5)
    warmup = (2 if dev.type == "cuda" else 1) if warmup is None else warmup
    catalogue = catalogue or (4000 if dev.type == "cuda" else 2000)
    storages = storages or (("memmap", "ram") + (("gpu",) if dev.type == "cuda" else ()))
    negatives_steps = negatives_steps or (5 if dev.type == "cuda" else 2)
    # The trainer's step (pmmcache.train.train_step): its optimizer, schedule, clipping and accelerator.
    config = TrainConfig(stage=stage, lr=1e-5, grad_clip=GRAD_CLIP)
    accelerator = Accelerator(mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(precision, "no"),
                              cpu=dev.type != "cuda", device_placement=False,  # everything is placed on `dev` here
                              step_scheduler_with_optimizer=False)  # as the trainer: once per optimizer step
    autocast = accelerator.autocast
    weights = config.weights
    corruption = (0.15, 0.05) if stage == "pretrain" else None

    text, vision = build_encoders(size, seed)
    model = build_model(size, text, vision, positions, nid_head="nid" in weights).to(dev)
    text, vision = text.to(dev), vision.to(dev)  # the lower blocks, for the end-to-end baseline
    step_module = TrainingStep(model, config.objectives, weights, None).to(dev)
    optimizer, scheduler = make_optimizer(model, config)
    step_module, optimizer, scheduler = accelerator.prepare(step_module, optimizer, scheduler)

    rng = np.random.default_rng(seed)
    total = warmup + steps
    sequences = torch.from_numpy(rng.integers(1, catalogue + 1, size=(users * total, positions)))  # (U, N), no padding

    def reading(store: Any, sequences: torch.Tensor = sequences, users: int = users
                ) -> Callable[[torch.Generator], Callable[[int], Batch]]:
        """Batches of `users` users prepared from `store` the way `pmmcache train` prepares them."""
        return lambda generator: lambda step: prepare_batch(sequences, np.arange(step * users, (step + 1) * users),
                                                            store, dev, corruption, generator)

    def timed(prepare_for: Callable[[torch.Generator], Callable[[int], Batch]], prefetch: bool,
              timed_steps: int = steps, module: Any = None) -> dict[str, Any]:
        """ms per step over `timed_steps` steps (after `warmup` untimed ones), and the peak GPU memory."""
        prepare = prepare_for(torch.Generator().manual_seed(seed))  # the same corruption in every variant
        reset_gpu_peak(dev)
        start = 0.0
        for step, batch in enumerate(Prefetcher(range(warmup + timed_steps), prepare, enabled=prefetch)):
            if step == warmup:
                synchronize(dev)
                start = time.perf_counter()
            train_step(step_module if module is None else module, step_inputs(batch, dev), weights, accelerator, optimizer, scheduler,
                       GRAD_CLIP)
        synchronize(dev)
        return {"ms": round((time.perf_counter() - start) * 1e3 / timed_steps, 2), "gpu_peak_mb": gpu_peak_mb(dev)}

    def negatives_before_after(store: Any) -> dict[str, dict[str, Any]]:
        """Compute-only ms per step at each batch size, DAP and NICL before / after the bitmap."""
        figures: dict[str, dict[str, Any]] = {}
        for batch_users in negatives_batches:
            count = warmup + negatives_steps
            drawn = torch.from_numpy(rng.integers(1, catalogue + 1, size=(batch_users * count, positions)))
            prepare = reading(store, drawn, batch_users)(torch.Generator().manual_seed(seed))
            ready = [prepare(step) for step in range(count)]  # on the device before the clock starts
            done: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
            for _ in range(rounds):
                for name, done_so_far in done.items():
                    with pairwise_objectives() if name == "before" else nullcontext():
                        done_so_far.append(timed(lambda _, ready=ready: ready.__getitem__, False, negatives_steps))
            ms = {name: statistics.median(r["ms"] for r in runs) for name, runs in done.items()}
            losses = {name: round(objectives_ms(ready[0].ids.to(dev), size.dim, *pair, repeats=rounds), 2)
                      for name, pair in (("before", (pairwise_dap_loss, pairwise_nicl_loss)), ("after", (dap_loss, nicl_loss)))}
            figures[str(batch_users)] = {
                "ms_before": ms["before"], "ms_after": ms["after"], "speedup": round(ms["before"] / ms["after"], 2),
                "dap_nicl_ms": losses, "dap_nicl_speedup": round(losses["before"] / losses["after"], 2),
                "spread_ms": {name: [min(r["ms"] for r in runs), max(r["ms"] for r in runs)] for name, runs in done.items()},
                "gpu_peak_mb": {name: max((r["gpu_peak_mb"] or 0) for r in runs) or None for name, runs in done.items()},
                "unique_items_per_batch": round(statistics.mean(len(b.states.text) for b in ready), 1)}
        return figures

    def taking_turns(ways: dict[str, Callable[[], dict[str, Any]]]) -> tuple[dict[str, float], dict[str, list[float]]]:
        """Each way's median ms over `rounds` rounds, the ways taking turns, and its [min, max] spread."""
        done: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(rounds):
            for way, run in ways.items():
                done[way].append(run()["ms"])
        return ({way: statistics.median(ms) for way, ms in done.items()},
                {way: [min(ms), max(ms)] for way, ms in done.items()})

    def catalogue_twice_once(store: Any, ready: list[Batch]) -> dict[str, Any]:
        """Compute-only ms per step with catalogue negatives, the item tower run twice vs once per step."""
        items = store.get(torch.arange(1, catalogue + 1))
        ways = {way: accelerator.prepare(TrainingStep(model, dataclasses.replace(
            config.objectives, negatives="catalogue", encode_catalogue=way), weights, None, items).to(dev))
            for way in ("twice", "once")}
        ms, spread = taking_turns({way: lambda module=module: timed(lambda _: ready.__getitem__, False, module=module)
                                   for way, module in ways.items()})
        return {"ms_twice": ms["twice"], "ms_once": ms["once"], "speedup": round(ms["twice"] / ms["once"], 2),
                "spread_ms": spread,
                "what": f"compute-only step, every one of the {catalogue} items a DAP candidate; twice = the batch's "
                        "items and the catalogue through the item tower, once = objectives.encode_catalogue=once"}

    def fp32_bf16(ready: list[Batch]) -> dict[str, Any]:
        """Compute-only ms per step in fp32 and under bf16 autocast, taking turns (fp32 runs only: an
        accelerator already in bf16 or fp16 would re-enable its own autocast inside an fp32 context)."""
        def timed_under(context: Any) -> dict[str, Any]:
            with context:
                return timed(lambda _: ready.__getitem__, False)

        ms, spread = taking_turns({"fp32": lambda: timed_under(nullcontext()),
                                   "bf16": lambda: timed_under(torch.autocast(dev.type, dtype=torch.bfloat16))})
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported() if dev.type == "cpu" else torch.cuda.is_bf16_supported()
        return {"ms_fp32": ms["fp32"], "ms_bf16": ms["bf16"], "speedup": round(ms["fp32"] / ms["bf16"], 2),
                "spread_ms": spread, "native_bf16": bool(native),
                "what": "compute-only step, fp32 vs bf16 autocast (what --mixed-precision bf16 runs)"}

    variants: dict[str, tuple[Callable[[torch.Generator], Callable[[int], Batch]], bool]] = {}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = Path(tmp) / "bench-step.h5"
        write_synthetic_cache(path, catalogue, size.text_tokens, size.image_tokens, size.dim, seed=seed)
        cache_mb = round(path.stat().st_size / 1e6, 1)

        # End to end: token ids (every token real, as in the cache) and a pool of pixels, on the device.
        token_ids = torch.from_numpy(rng.integers(5, size.vocab, size=(catalogue + 1, size.text_tokens))).to(dev)
        pixels = torch.randn(min(catalogue + 1, 256), 3, size.image_size, size.image_size, device=dev)
        recomputing = RecomputingStore(text, vision, token_ids, torch.ones_like(token_ids), pixels, autocast)
        variants["end_to_end"] = (reading(recomputing), False)

        prepared_ahead: list[Batch] = []
        for storage in storages:
            store = ItemStore(cache_io.CacheReader(path, storage=storage, device=dev), bench_keys(catalogue))
            variants[f"cached_{storage}_plain"] = (reading(store), False)
            variants[f"cached_{storage}_prefetch"] = (reading(store), True)
            if not prepared_ahead:  # every batch's states on the device before the clock starts
                prepare = reading(store)(torch.Generator().manual_seed(seed))
                prepared_ahead = [prepare(step) for step in range(total)]
        variants["compute_only"] = (lambda _: prepared_ahead.__getitem__, False)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (prepare_for, prefetch) in variants.items():
                runs[name].append(timed(prepare_for, prefetch))
        negatives = negatives_before_after(store)  # the last storage: GPU on CUDA, RAM on a CPU
        catalogue_negatives = catalogue_twice_once(store, prepared_ahead) if catalogue_ways else None
        precisions = fp32_bf16(prepared_ahead) if precision_ways and precision == "fp32" else None
    figures = {name: {"ms": statistics.median(r["ms"] for r in done),
                      "gpu_peak_mb": max((r["gpu_peak_mb"] or 0) for r in done) or None,
                      "spread_ms": [min(r["ms"] for r in done), max(r["ms"] for r in done)]}
               for name, done in runs.items()}

    compute = figures["compute_only"]["ms"]
    e2e = figures["end_to_end"]["ms"]
    cached = {name: f["ms"] for name, f in figures.items() if name.startswith("cached_")}
    return {
        "bench": "step", "machine": machine(), "device": str(dev), "precision": precision, "stage": stage,
        "losses": sorted(weights), "batch": {"users": users, "positions": positions, "items": users * positions},
        "size": size.__dict__ | {"image_tokens": size.image_tokens}, "catalogue": catalogue, "cache_mb": cache_mb,
        "steps_timed": steps, "rounds": rounds,
        "spread_ms": {name: f["spread_ms"] for name, f in figures.items()},
        "ms_per_step": {name: f["ms"] for name, f in figures.items()},
        "gpu_peak_mb": {name: f["gpu_peak_mb"] for name, f in figures.items()} if dev.type == "cuda" else None,
        "speedup_vs_end_to_end": {name: round(e2e / ms, 2) for name, ms in cached.items()}
        | {"compute_only": round(e2e / compute, 2)},
        "cached_vs_compute_only": {name: round(ms / compute, 3) for name, ms in cached.items()},
        "in_batch_negatives": {"steps_timed": negatives_steps, "batches": negatives,
                               "what": "compute-only step; before = DAP and NICL through the (B, N, B*N) comparison "
                                       "mask and dense masks over the logits (pmmcache.bench.pairwise), after = "
                                       "the per-user bitmap and logit bias of pmmcache.objectives; dap_nicl_ms = "
                                       "those two losses alone, forward + backward, logQ on"},
        "catalogue_negatives": catalogue_negatives,
        "fp32_vs_bf16": precisions,
        "host_peak_rss_mb": host_peak_rss_mb(),
        "note": "random weights and synthetic states (speed does not depend on them); end to end recomputes the "
                "lower blocks from token ids and pixels already on the device (no image decoding), for the "
                "batch's unique items; cached_vs_compute_only = data-path overhead (1.0 = none)",
    }

