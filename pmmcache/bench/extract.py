"""Extraction benchmark: items/s end to end (decode, tokenise, encode, write) vs encoding alone."""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pmmcache.bench.common import gpu_peak_mb, host_peak_rss_mb, machine, reset_gpu_peak, resolve_device, synchronize
from pmmcache.bench.reader import reader_bench
from pmmcache.encoders.config import EncoderConfig, encoder_specs


def encode_only_items_per_s(config: Any, device: torch.device, max_items: int = 1024) -> dict[str, Any]:
    """Items/s of the lower blocks alone on batches already decoded, tokenised and on the device
    (the same encoders, batch size and compute dtype as the extraction; nothing written)."""
    from pmmcache import extract
    from pmmcache.data.registry import resolve_dataset
    from pmmcache.encoders import TextEncoder, VisionEncoder

    dataset = resolve_dataset(config.dataset, Path(config.data_dir), Path(config.cache_dir))
    text_spec, vision_spec = encoder_specs(config.encoders, config.dataset)
    dtype = extract.DTYPES[config.dtype]
    text = TextEncoder.load(text_spec).to(device=device, dtype=dtype) if text_spec else None
    vision = VisionEncoder.load(vision_spec).to(device=device, dtype=dtype) if vision_spec and dataset.image_stores else None
    count = min(dataset.num_items, max_items)
    rows = torch.arange(1, count + 1).numpy()
    batches = [rows[i:i + config.batch_size] for i in range(0, count, config.batch_size)]
    loader = extract.ItemRows(batches, *extract.item_columns(dataset), dataset.image_stores, text, vision)
    loaded = [loader[i] for i in range(len(batches))]  # decoding and tokenising: not timed here
    inputs = [(b.input_ids.to(device) if text else None, b.attention_mask.to(device) if text else None,
               b.pixels.to(device=device, dtype=dtype) if vision else None) for b in loaded]

    def encode_all() -> None:
        with torch.no_grad():
            for ids, mask, pixels in inputs:
                if text is not None:
                    text.lower(ids, mask)
                if vision is not None:
                    vision.lower(pixels)
        synchronize(device)

    encode_all()  # warm-up
    start = time.perf_counter()
    encode_all()
    seconds = time.perf_counter() - start
    return {"items": count, "seconds": round(seconds, 3), "items_per_s": round(count / seconds, 1)}


def run_extract_bench(dataset: str = "demo", items: int = 4000, tokens: int = 100, dim: int = 768,
                      batch_items: int = 672, repeats: int = 5, device: str = "auto",
                      work_dir: str | None = None, **extract_options: Any) -> dict[str, Any]:
    """Extraction throughput on `dataset` (end to end and encoding alone) and the reader comparison on a
    synthetic cache. `extract_options` are ExtractConfig fields (batch_size, dtype, ...) and, beside
    them, EncoderConfig fields (text_encoder, top_blocks, ...), as the bench's flags give them."""
    from pmmcache import extract

    dev = resolve_device(device)
    options = {k: v for k, v in extract_options.items() if v is not None}
    encoder_fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    encoders = EncoderConfig(**{k: options.pop(k) for k in list(options) if k in encoder_fields})
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        work = Path(tmp)
        config = extract.ExtractConfig(dataset=dataset, cache_dir=work / "cache", device=str(dev), force=True,
                                       encoders=encoders, **options)
        reset_gpu_peak(dev)
        result = extract.run(config, show_progress=False)
        extraction = {"dataset": dataset, "items": result.items, "seconds": round(result.seconds, 2),
                      "items_per_s": round(result.items_per_second, 1),
                      "mb_written": round(result.bytes_written / 1e6, 1), "cache": result.path.name,
                      "batch_size": config.batch_size, "num_workers": config.num_workers, "dtype": config.dtype,
                      "cache_dtype": config.cache_dtype, "gpu_peak_mb": gpu_peak_mb(dev)}
        encode_only = encode_only_items_per_s(config, dev)
        extraction["encode_only"] = encode_only
        extraction["end_to_end_vs_encode_only"] = round(extraction["items_per_s"] / encode_only["items_per_s"], 3)
        reader = reader_bench(work, items, tokens, dim, batch_items, repeats, dev)
    return {"bench": "extract", "machine": machine(), "device": str(dev), "extraction": extraction, "reader": reader,
            "host_peak_rss_mb": host_peak_rss_mb(),
            "note": "end to end = decode + tokenise (loader workers) + lower blocks + write, timed by extract.run "
                    "(model loading excluded); encode only = the lower blocks on prepared batches"}
