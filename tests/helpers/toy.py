"""The toy dataset most stage-2 tests train on: 39 users x 8 distinct items in the PMMRec layout, a
2-block BERT and the tiny ViT (top block trained), a d = 32 model, 8 users per batch, 2 steps per
epoch. `build_toy` extracts its cache; the session fixture `toy` in conftest.py builds it once."""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from helpers.tiny_models import save_tiny_bert
from pmmcache.config import from_dict
from pmmcache.encoders.config import EncoderConfig
from pmmcache.extract import ExtractConfig
from pmmcache.extract import run as extract
from pmmcache.train import TrainConfig

NAME = "toy"
NUM_ITEMS = 39  # odd, so two processes get item and user shards of unequal size
TEXT_TOKENS = 16
IMAGE_SIZE = 64  # tiny ViT, patch 32: 4 patches + CLS
K = 1  # top blocks trained (of the 2-block BERT and the 4-block tiny ViT)
STEPS = 2  # max_steps_per_epoch
WORDS = "red blue green big small new old best".split()
THINGS = "cat dog movie song game film story video".split()
KS = (10, 20, 50)
METRICS = [f"{m}@{k}" for k in KS for m in ("HR", "NDCG")]
LOSSES = ("dap", "nicl", "nid", "rcl")


@dataclass(frozen=True)
class Toy:
    """A PMMRec-layout dataset, a tiny text model, and the cache extracted from them.

    Shared by every test of a session: a test that changes any of it works on a copy."""

    data_dir: Path
    cache_dir: Path
    bert_dir: Path


def make_toy(data_dir: Path) -> None:
    """`toy_users.tsv` (39 users x 8 distinct items; every item occurs 8 times), titles and images."""
    root = data_dir / NAME
    (root / f"{NAME}_images").mkdir(parents=True)
    with open(root / f"{NAME}_users.tsv", "w") as f:
        for user in range(NUM_ITEMS):
            f.write(f"u{user}\t{' '.join(f'i{(user + 5 * j) % NUM_ITEMS}' for j in range(8))}\n")
    with open(root / f"{NAME}_items_texts.tsv", "w") as f:
        for i in range(NUM_ITEMS):
            f.write(f"i{i}\tthe {WORDS[i % 8]} {THINGS[(i // 8) % 8]} {i}\n")
    for i in range(NUM_ITEMS):
        colour = (i * 6 % 256, (100 + 37 * i) % 256, (200 - 4 * i) % 256)
        image = Image.new("RGB", (48, 40), colour)
        image.paste((255 - colour[0], 40, 90), (4 + i % 20, 5, 24 + i % 20, 15))  # patches differ
        image.save(root / f"{NAME}_images" / f"i{i}.png")


def extract_config(toy: Toy, bert_dir: Path | None = None, cache_dir: Path | None = None) -> ExtractConfig:
    return ExtractConfig(dataset=NAME, data_dir=toy.data_dir, cache_dir=cache_dir or toy.cache_dir,
                         encoders=EncoderConfig(text_encoder=str(bert_dir or toy.bert_dir),
                                                vision_encoder="pmmcache-tiny-vit", vision_weights="random",
                                                top_blocks=K, max_text_length=TEXT_TOKENS, image_size=IMAGE_SIZE),
                         batch_size=16, num_workers=0, device="cpu")


def build_toy(root: Path) -> Toy:
    toy = Toy(data_dir=root / "data", cache_dir=root / "cache", bert_dir=save_tiny_bert(root / "bert", layers=2))
    make_toy(toy.data_dir)
    extract(extract_config(toy), show_progress=False)
    return toy


def train_settings(toy: Toy, runs_dir: Path, run_name: str, **overrides) -> dict:
    """TrainConfig fields (nested dicts) of a tiny run; `overrides` replace top-level fields."""
    return {
        "dataset": NAME, "data_dir": str(toy.data_dir), "cache_dir": str(toy.cache_dir), "runs_dir": str(runs_dir),
        "run_name": run_name,
        "encoders": {"text_encoder": str(toy.bert_dir), "vision_encoder": "pmmcache-tiny-vit",
                     "vision_weights": "random", "top_blocks": K, "max_text_length": TEXT_TOKENS,
                     "image_size": IMAGE_SIZE},
        "model": {"item_tower": {"d_model": 32, "fusion_heads": 2}, "user_encoder": {"d_model": 32}},
        "batch_size": 8, "epochs": 3, "max_steps_per_epoch": STEPS, "mixed_precision": "no", **overrides,
    }


def train_config(toy: Toy, runs_dir: Path, run_name: str, **overrides) -> TrainConfig:
    return from_dict(TrainConfig, train_settings(toy, runs_dir, run_name, **overrides))


def train_cli_args(toy: Toy, runs_dir: Path, run_name: str, epochs: int) -> list[str]:
    """The same run as `train_config(toy, runs_dir, run_name, epochs=epochs)`, as `pmmcache train` options."""
    return ["train", "--dataset", NAME, "--data-dir", str(toy.data_dir), "--cache-dir", str(toy.cache_dir),
            "--runs-dir", str(runs_dir), "--run-name", run_name, "--text-encoder", str(toy.bert_dir),
            "--vision-encoder", "pmmcache-tiny-vit", "--vision-weights", "random", "-k", str(K),
            "--epochs", str(epochs), "--batch-size", "8", "--mixed-precision", "no",
            "--set", f"encoders.max_text_length={TEXT_TOKENS}", "--set", f"encoders.image_size={IMAGE_SIZE}",
            "--set", "model.item_tower.d_model=32", "--set", "model.item_tower.fusion_heads=2",
            "--set", "model.user_encoder.d_model=32", "--set", f"max_steps_per_epoch={STEPS}"]


def read_history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def learned(record: dict) -> dict:
    """A metrics.jsonl record without its timings."""
    return {k: v for k, v in record.items() if k not in ("seconds", "items_per_s")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
