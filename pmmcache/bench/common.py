"""What every benchmark shares: timing, machine and peak-memory records, synthetic caches, random models.

Speed does not depend on the weights, so the benchmarks build encoders of the real shapes with random
weights (XLM-R/BERT-base-shaped text, ViT-B/32-shaped vision at full size; d = 64 on a CPU) and a
synthetic cache of random states written through the real writer.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pmmcache import cache as cache_io


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` in milliseconds (after `warmup` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def machine() -> dict[str, Any]:
    info = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2)}  # other processes share the cores
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def host_peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last `reset_gpu_peak` (None without CUDA)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def write_synthetic_cache(path: Path, items: int, text_tokens: int, image_tokens: int, dim: int,
                          seed: int = 0, chunk: int = 256, states_dtype: str = "float16") -> None:
    """A complete cache of random states (every text token real), written through the real writer."""
    layout = cache_io.cache_layout(items + 1, (text_tokens, dim), (image_tokens, dim), states_dtype)
    cache_io.create_cache(path, {"synthetic": True, "storage_dtype": states_dtype},
                          [""] + bench_keys(items), layout)
    writer = cache_io.CacheWriter(path)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, items + 1, chunk):
        rows = np.arange(start, min(start + chunk, items + 1))
        arrays = {"text/mask": np.ones((len(rows), text_tokens), dtype=np.uint8),
                  "modality": np.ones((len(rows), 2), dtype=np.uint8)}
        for name, tokens in (("text", text_tokens), ("image", image_tokens)):
            states = torch.randn(len(rows), tokens, dim, generator=generator)  # torch: ~5x faster than numpy here
            if states_dtype == "int8":
                q, scale = cache_io.quantize_int8(states)
                arrays[f"{name}/states"], arrays[f"{name}/scale"] = q.numpy(), scale.numpy()
            else:
                arrays[f"{name}/states"] = states.to(torch.float16).numpy()
        writer.write(rows, arrays)
    writer.mark_complete()
    writer.close()


def bench_keys(items: int) -> list[str]:
    return [f"bench/{i}" for i in range(items)]


@dataclass(frozen=True)
class ModelSize:
    """Shapes of the random encoders and of the stage-2 model built on them."""

    dim: int = 768  # d of both encoders and of the item tower / user encoder
    blocks: int = 12  # encoder blocks (text and vision)
    top_blocks: int = 2  # k: trained in stage 2, recomputed end to end
    heads: int = 12
    text_tokens: int = 50
    image_size: int = 224
    patch_size: int = 32
    vocab: int = 30000  # embedding rows of the text encoder (its speed hardly depends on it)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


FULL_SIZE = ModelSize()
TINY_SIZE = ModelSize(dim=64, blocks=4, top_blocks=2, heads=4, vocab=1000)


def default_size(device: torch.device, **overrides: Any) -> ModelSize:
    """Full size on a GPU, tiny on a CPU; options given (not None) override the fields."""
    base = FULL_SIZE if device.type == "cuda" else TINY_SIZE
    fields = {**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
    return ModelSize(**fields)


def build_encoders(size: ModelSize, seed: int = 0) -> tuple[Any, Any]:
    """A random XLM-R-shaped TextEncoder and a random ViT (open_clip) VisionEncoder, CPU, fp32, eval."""
    from open_clip.transformer import VisionTransformer
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from pmmcache.encoders import TextEncoder, TextEncoderSpec, VisionEncoderSpec
    from pmmcache.encoders.vision import ImagePreprocessing, OpenClipVisionEncoder

    torch.manual_seed(seed)
    text_config = XLMRobertaConfig(vocab_size=size.vocab, hidden_size=size.dim, num_hidden_layers=size.blocks,
                                   num_attention_heads=size.heads, intermediate_size=4 * size.dim,
                                   max_position_embeddings=size.text_tokens + 2)
    text = TextEncoder(TextEncoderSpec(name="random-xlmr", top_blocks=size.top_blocks, max_length=size.text_tokens),
                       XLMRobertaModel(text_config, add_pooling_layer=False).eval(), tokenizer=None,
                       model_dir=Path("random-xlmr"))
    tower = VisionTransformer(image_size=size.image_size, patch_size=size.patch_size, width=size.dim,
                              layers=size.blocks, heads=size.heads, mlp_ratio=4.0, output_dim=size.dim)
    vision_spec = VisionEncoderSpec(name="random-vit", weights="random", top_blocks=size.top_blocks,
                                    image_size=size.image_size)
    vision = OpenClipVisionEncoder(vision_spec, tower.eval(), ImagePreprocessing(size=size.image_size),
                                   {"library": "open_clip", "random": True})
    return text, vision


def build_model(size: ModelSize, text: Any, vision: Any, max_len: int, nid_head: bool = True) -> Any:
    """The stage-2 PMMRec on `text` / `vision` (top blocks copied), paper defaults at width `size.dim`."""
    from pmmcache.model import PMMRecConfig, build_pmmrec
    from pmmcache.model.item_tower import ItemTowerConfig
    from pmmcache.model.user_encoder import UserEncoderConfig

    config = PMMRecConfig(item_tower=ItemTowerConfig(d_model=size.dim, fusion_heads=size.heads),
                          user_encoder=UserEncoderConfig(d_model=size.dim, max_len=max(21, max_len)),
                          nid_head=nid_head)
    return build_pmmrec(config, text, vision)
