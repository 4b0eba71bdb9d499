"""`pmmcache demo`: the main job on the embedded dataset, end to end, sized for a 2-core CPU.

extract (all demo domains) -> pre-train on the source domains -> fine-tune on a target domain, once
from scratch and once from the pre-trained run -> full-rank test metrics side by side with random
ranking. Model and run lengths are small so that it finishes in minutes on a CPU; the paper's sizes
are the defaults of `pmmcache train`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmmcache import cache as cache_io
from pmmcache import extract, train
from pmmcache.config import from_dict, to_dict
from pmmcache.data.registry import demo_domains
from pmmcache.encoders.config import EncoderConfig
from pmmcache.errors import PmmcacheError
from pmmcache.evaluate import random_ranking_hr
from pmmcache.run_config import TrainConfig


@dataclass(frozen=True)
class DemoJobConfig:
    data_dir: Path = Path("data")
    cache_dir: Path = Path("cache")
    runs_dir: Path = Path("runs/demo")
    target: str | None = None  # a target domain of the demo; default: the first one
    # Sized for a 2-core CPU and a few hundred optimizer steps (the paper's settings are the defaults
    # of `pmmcache train`): one trained block per encoder, a narrow model, per-modality mean pooling
    # (each modality weighs half; the released code's plain token mean is ~80 % image patches) with
    # a pre-LN fusion block, a higher learning rate for the new layers than for the pretrained
    # encoder blocks (which drift at 1e-3 before the new layers have learned anything).
    top_blocks: int = 1
    d_model: int = 128
    heads: int = 4
    pooling: str = "modality_mean"
    fusion_norm_first: bool = True
    pretrain_epochs: int = 3
    finetune_epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    encoder_lr: float = 1e-5
    seed: int = 42
    max_steps_per_epoch: int = 0  # 0 = whole epochs; small values make a smoke run


def train_config(job: DemoJobConfig, **fields: Any) -> TrainConfig:
    """The TrainConfig of one of the demo's runs: the job's shared settings plus `fields`."""
    d = job.d_model
    data = {
        "data_dir": job.data_dir, "cache_dir": job.cache_dir, "runs_dir": job.runs_dir, "cache_dataset": "demo",
        "encoders": {"top_blocks": job.top_blocks},
        "model": {"item_tower": {"d_model": d, "fusion_heads": job.heads, "pooling": job.pooling,
                                 "fusion_norm_first": job.fusion_norm_first},
                  "user_encoder": {"d_model": d, "n_heads": 2}},
        "batch_size": job.batch_size, "lr": job.lr, "encoder_lr": job.encoder_lr, "seed": job.seed,
        "patience": max(job.pretrain_epochs, job.finetune_epochs),  # runs this short never stop early
        "max_steps_per_epoch": job.max_steps_per_epoch, "train_windows": "all",  # every training item a target
        **fields,
    }
    return from_dict(TrainConfig, data)


def run(job: DemoJobConfig) -> dict[str, Any]:
    start = time.perf_counter()
    print("== 1/4 extract: every demo item through the frozen lower encoder blocks")
    extracted = extract.run(extract.ExtractConfig(dataset="demo", data_dir=job.data_dir, cache_dir=job.cache_dir,
                                                  encoders=EncoderConfig(top_blocks=job.top_blocks)))
    domains = demo_domains(job.data_dir)
    sources = [d["name"] for d in domains if d["role"] == "source"]
    targets = [d["name"] for d in domains if d["role"] == "target"]
    target = job.target or targets[0]
    if target not in targets:
        raise PmmcacheError(f"--target {target!r} is not a target domain of the demo ({', '.join(targets)})")
    source_spec = ",".join(f"demo/{s}" for s in sources)
    target_spec = f"demo/{target}"

    def fresh_or_resumed(config: TrainConfig) -> train.TrainResult:
        run_dir = Path(config.runs_dir) / config.run_name
        resume = (run_dir / "config.json").is_file()
        return train.run(from_dict(TrainConfig, {**to_dict(config), "resume": resume}))

    print(f"== 2/4 pre-train on the source domains {', '.join(sources)} (DAP + NICL + NID + RCL)")
    pretrained = fresh_or_resumed(train_config(job, stage="pretrain", dataset=source_spec, run_name="pretrain",
                                                epochs=job.pretrain_epochs))
    print(f"== 3/4 fine-tune on the target domain {target}: from scratch, then from the pre-trained run")
    scratch = fresh_or_resumed(train_config(job, stage="finetune", dataset=target_spec, run_name=f"scratch-{target}",
                                             epochs=job.finetune_epochs))
    transferred = fresh_or_resumed(train_config(job, stage="finetune", dataset=target_spec,
                                                 run_name=f"pretrained-{target}", epochs=job.finetune_epochs,
                                                 init=str(pretrained.run_dir)))
    print("== 4/4 full-rank test metrics on", target_spec)
    manifest = cache_io.read_manifest(extracted.path)
    num_items = len([k for k in cache_io.read_keys(extracted.path) if k.startswith(f"{target}/")])
    rows = {
        "random ranking": {"HR@10": random_ranking_hr(num_items, 10), "NDCG@10": float("nan")},
        "from scratch": scratch.metrics["test"],
        "pre-trained on sources": transferred.metrics["test"],
    }
    print(f"{'':<26}{'HR@10':>8}{'NDCG@10':>9}")
    for name, metrics in rows.items():
        ndcg = metrics["NDCG@10"]
        print(f"{name:<26}{metrics['HR@10']:>8.4f}{('' if ndcg != ndcg else f'{ndcg:.4f}'):>9}")
    curves = {"from scratch": [r["valid_NDCG@10"] for r in scratch.history],
              "pre-trained on sources": [r["valid_NDCG@10"] for r in transferred.history]}
    print("valid NDCG@10 after each fine-tuning epoch (convergence, paper Fig. 3):")
    for name, values in curves.items():
        print(f"  {name:<24}" + " ".join(f"{v:.4f}" for v in values))
    text, image = manifest.get("text") or {}, manifest.get("image") or {}
    print(f"encoders: text = {text.get('resolved_path', text.get('spec', {}).get('name'))} "
          f"({'real pretrained weights' if text else 'absent'}); "
          f"vision = {image.get('architecture')} ({'pretrained' if image.get('pretrained') else 'RANDOM weights'})")
    seconds = time.perf_counter() - start
    print(f"demo finished in {seconds:.0f} s; runs in {job.runs_dir}")
    summary = {"target": target, "test": rows, "valid_ndcg_by_epoch": curves, "seconds": round(seconds, 1),
               "encoders": {"text": text.get("spec"), "image": image.get("spec"),
                            "image_pretrained": bool(image.get("pretrained"))}}
    (Path(job.runs_dir) / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
