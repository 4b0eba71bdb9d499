"""Extraction benchmark: items/s end to end (decode, tokenise, encode, write) vs encoding alone."""
from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pmmcache.bench.common import gpu_peak_mb, host_peak_rss_mb, machine, reset_gpu_peak, resolve_device, synchronize
from pmmcache.bench.reader import reader_bench
from pmmcache.encoders.config import EncoderConfig, encoder_specs


def encode_only_round(config: Any, device: torch.device, max_items: int = 1024) -> Any:
    """A function timing one pass of the lower blocks alone over up to `max_items` items, on batches
    already decoded, tokenised, normalised and on the device (the same encoders, batch size and compute
    dtype as the extraction; nothing written). Returns {"items", "seconds", "items_per_s"} per call."""
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
    with torch.no_grad():  # decoding, tokenising and moving to the device: not timed here
        inputs = [extract.model_inputs(loader[i], text, vision, device) for i in range(len(batches))]

    def encode_all() -> None:
        with torch.no_grad():
            for ids, mask, pixels in inputs:
                if text is not None:
                    text.lower(ids, mask)
                if vision is not None:
                    vision.lower(pixels)
        synchronize(device)

    def timed() -> dict[str, Any]:
        start = time.perf_counter()
        encode_all()
        seconds = time.perf_counter() - start
        return {"items": count, "seconds": round(seconds, 3), "items_per_s": round(count / seconds, 1)}

    encode_all()  # warm-up
    return timed


def extraction_rounds(config: Any, device: torch.device, work: Path, rounds: int) -> dict[str, Any]:
    """End to end (`extract.run` into a fresh cache) and encoding alone, taking turns for `rounds` rounds,
    so that a change of load on a shared machine hits both alike; medians and every round's figure."""
    from pmmcache import extract

    encode_only = encode_only_round(config, device)
    ends, encodes, result = [], [], None
    for round_ in range(rounds):
        cache_dir = work / f"cache-{round_}"
        reset_gpu_peak(device)
        result = extract.run(dataclasses.replace(config, cache_dir=cache_dir), show_progress=False)
        ends.append(result.items_per_second)
        encodes.append(encode_only()["items_per_s"])
        if round_ < rounds - 1:
            shutil.rmtree(cache_dir)
    end_to_end, encoding = statistics.median(ends), statistics.median(encodes)
    return {"dataset": config.dataset, "items": result.items, "seconds": round(result.seconds, 2),
            "items_per_s": round(end_to_end, 1), "encode_only_items_per_s": round(encoding, 1),
            "end_to_end_vs_encode_only": round(end_to_end / encoding, 3),
            "rounds": {"end_to_end_items_per_s": [round(v, 1) for v in ends], "encode_only_items_per_s": encodes},
            "mb_written": round(result.bytes_written / 1e6, 1), "cache": result.path.name,
            "batch_size": config.batch_size, "num_workers": config.num_workers,
            "image_decoder": extract.image_decoder(config.image_decode, device), "dtype": config.dtype,
            "cache_dtype": config.cache_dtype, "gpu_peak_mb": gpu_peak_mb(device)}


def run_extract_bench(dataset: str = "demo", items: int = 4000, tokens: int = 100, dim: int = 768,
                      batch_items: int = 672, repeats: int = 5, device: str = "auto", rounds: int = 3,
                      work_dir: str | None = None, reader: bool = True, **extract_options: Any) -> dict[str, Any]:
    """Extraction throughput on `dataset` (end to end and encoding alone, `rounds` turns each) and the
    reader comparison on a synthetic cache (`reader=False` skips it). `extract_options` are ExtractConfig
    fields (batch_size, dtype, ...) and, beside them, EncoderConfig fields (text_encoder, top_blocks, ...),
    as the bench's flags give them."""
    from pmmcache import extract

    dev = resolve_device(device)
    options = {k: v for k, v in extract_options.items() if v is not None}
    encoder_fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    encoders = EncoderConfig(**{k: options.pop(k) for k in list(options) if k in encoder_fields})
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        work = Path(tmp)
        config = extract.ExtractConfig(dataset=dataset, cache_dir=work / "cache", device=str(dev), force=True,
                                       encoders=encoders, **options)
        extraction = extraction_rounds(config, dev, work, rounds)
        readers = reader_bench(work, items, tokens, dim, batch_items, repeats, dev) if reader else None
    return {"bench": "extract", "machine": machine(), "device": str(dev), "extraction": extraction, "reader": readers,
            "host_peak_rss_mb": host_peak_rss_mb(),
            "note": "end to end = decode + tokenise (loaders) + lower blocks + write (writer thread), timed by "
                    "extract.run (model loading excluded); encode only = the lower blocks on batches already on "
                    "the device; the two take turns, medians over the rounds"}
