"""Stage 2: train the top encoder blocks, the fusion block and the user encoder on cached states.

`run(TrainConfig)` is what `pmmcache train` calls. The same code runs on CPU, one GPU, or many GPUs
under `accelerate launch` (DDP). In-batch negatives stay per process (each process contrasts its own
32 users' items), as in the released code; the effective batch for the optimizer is the global one.

Run directory `runs/<run>/`:
    config.json          the resolved TrainConfig (and what the cache and encoders were)
    metrics.jsonl        one line per epoch: losses, valid metrics, seconds, items/s
    checkpoints/epoch-N  accelerate state (model safetensors, optimizer, scheduler, RNG) + train state,
                         the last two epochs, sealed with checksums (see pmmcache/checkpoints.py)
    best/                model parts of the best epoch (safetensors) + metrics.json, replaced crash-safely
    eval.json            final valid/test metrics of the best epoch
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from pmmcache import cache as cache_io
from pmmcache import checkpoints as ckpt
from pmmcache.batches import Prefetcher, prepare_batch, trim_padding
from pmmcache.config import from_dict, load_file, to_dict, to_json
from pmmcache.data.prepare import PrepareConfig
from pmmcache.data.registry import resolve_dataset
from pmmcache.encoders import TextEncoder, VisionEncoder
from pmmcache.errors import ConfigError, DataError, PmmcacheError
from pmmcache.files import replace_dir, settle_dir, settled_dir, write_json, write_text_atomic
from pmmcache.evaluate import evaluate_splits, format_with_popularity, popularity_ranking
from pmmcache.items import (IdItems, ItemStore, default_cache_dataset, expected_manifest, find_cache, nonfinite_items,
                            open_item_store)
from pmmcache.model import PMMRec, PMMRecConfig, build_pmmrec
from pmmcache.model.pmmrec import read_parts_config
from pmmcache.runtime import use_cpu
from pmmcache.objectives import catalogue_dap_loss, dap_loss, masked_mean_pool, nicl_loss, nid_loss, rcl_loss


# Table VIII's ablations of pre-training, as the objective settings each one changes.
ABLATIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "no-nicl": {"nicl": 0.0},  # w/o NACL: no cross-modal contrastive term
    "vcl-only": {"nicl_variant": "vcl"},  # only VCL (eq. 6): inter-modality negatives only
    "icl-only": {"nicl_variant": "icl"},  # only ICL (eq. 7): no next-item positives
    "no-nid": {"nid": 0.0},
    "no-rcl": {"rcl": 0.0},
}


# Baselines of the paper's tables, as settings (dotted keys) trained by this same loop and evaluator.
BASELINES: dict[str, dict[str, Any]] = {
    # ID-based SASRec: one embedding per item, cross-entropy over all items (as RecBole trains it).
    "sasrec": {"model.items": "id", "objectives.negatives": "catalogue"},
    # MoRec++ (paper IV-B): multimodal towers, late fusion of the two pooled modalities, DAP only.
    "morec++": {"model.item_tower.fusion": "concat", "objectives.nicl": 0, "objectives.nid": 0, "objectives.rcl": 0},
}


@dataclass(frozen=True)
class ObjectiveConfig:
    """Loss weights (0 switches a term off) and their settings. Fine-tuning uses DAP only.

    `ablation` names one of Table VIII's variants and overrides the settings it changes (see
    ABLATIONS), so a saved config says both the variant and what it meant.
    """

    dap: float = 1.0
    nicl: float = 1.0
    nid: float = 1.0
    rcl: float = 1.0
    nicl_variant: Literal["nicl", "icl", "vcl"] = "nicl"  # VCL (eq. 6) / ICL (eq. 7) for ablation
    nicl_next_in_denominator: bool = False  # False: eq. 8 as printed
    # NICL and RCL: exp(a.b / temperature) on unit vectors. Paper: 1, where cosines in [-1, 1] give a
    # nearly flat softmax and almost no gradient (RCL sat at chance, NICL at 1/60 of DAP's gradient
    # norm); 0.1 is in CLIP's range (its learned temperature starts at 0.07).
    temperature: float = 0.1
    nid_relu: bool = False  # True: eq. 10 as printed, softmax over ReLU'd logits (cannot rule a class out)
    # DAP logits are h.e / dap_temperature. None = automatic: sqrt(d) for content items (scaled dot
    # product: post-LN vectors have norm ~sqrt(d), so raw logits have std ~sqrt(d) and the loss
    # starts saturated, 87 instead of ln #candidates at d = 768), 1 for ID items (RecBole: their
    # N(0, 0.02) embeddings start small). 1 = the paper's raw dot product.
    dap_temperature: float | None = None
    # logQ correction of sampled negatives (released code): in-batch candidates are drawn in
    # proportion to popularity, and without it the model learns a popularity-discounted score. It
    # applies to DAP with "in_batch" or "mixed" negatives (the full softmax, "catalogue", needs none)
    # and to NICL, whose negatives are always in-batch items. False = eq. 5 and 8 as printed.
    logq: bool = True
    shuffle_fraction: float = 0.15
    replace_fraction: float = 0.05
    rcl_normalize: bool = True
    # DAP candidates: "in_batch" = the paper's eq. 5 (items of the batch but the user's own);
    # "mixed" = those plus `uniform_negatives` items drawn uniformly from the catalogue per step;
    # "catalogue" = every catalogue item, cross-entropy over all items (RecBole's SASRec; with k = 0
    # the content item table is cheap enough for small catalogues).
    negatives: Literal["in_batch", "mixed", "catalogue"] = "in_batch"
    uniform_negatives: int = 256
    ablation: Literal["none", "no-nicl", "vcl-only", "icl-only", "no-nid", "no-rcl"] = "none"

    def __post_init__(self) -> None:
        for name, value in ABLATIONS[self.ablation].items():
            object.__setattr__(self, name, value)
        # `not x > 0` also refuses NaN, which would otherwise reach the loss and read as a divergence.
        if self.dap_temperature is not None and not 0 < self.dap_temperature < math.inf:
            raise ConfigError(f"objectives.dap_temperature = {self.dap_temperature}; must be a positive number "
                              "(or unset)")
        if not 0 < self.temperature < math.inf:
            raise ConfigError(f"objectives.temperature = {self.temperature}; must be a positive number")
        for name in ("dap", "nicl", "nid", "rcl"):  # a NaN or negative weight would silently switch a term off
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"objectives.{name} = {getattr(self, name)}; a weight must be >= 0 (0 = off)")
        for name in ("shuffle_fraction", "replace_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"objectives.{name} = {getattr(self, name)}; must be in [0, 1]")
        if self.uniform_negatives < 1:
            raise ConfigError(f"objectives.uniform_negatives = {self.uniform_negatives}; must be >= 1")


@dataclass(frozen=True)
class EncoderChoice:
    """Which encoders the model's top blocks come from; must match the cache's encoders."""

    text_encoder: str | None = None
    vision_encoder: str | None = None
    vision_weights: str | None = None
    top_blocks: int = 2
    max_text_length: int = 50
    image_size: int = 224
    modalities: tuple[str, ...] = ("text", "image")
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    stage: Literal["pretrain", "finetune"] = "pretrain"
    dataset: str = "demo"  # comma-separated names combine sources (multi-source pre-training)
    cache_dataset: str | None = None  # which extracted cache to read; default: the dataset's base name
    data: PrepareConfig = field(default_factory=PrepareConfig)  # how the dataset is prepared (k-core, history)
    data_dir: Path = Path("data")
    cache_dir: Path = Path("cache")
    runs_dir: Path = Path("runs")
    run_name: str | None = None  # default: <stage>-<dataset>
    init: str | None = None  # a run directory (or its best/ folder) to start from
    # What `init` transfers (paper III-E, Table V): "full" = item towers and user encoder; "item" =
    # item towers (top blocks, projections, fusion), user encoder fresh; "user" = user encoder, item
    # towers fresh from the original pretrained encoders.
    transfer: Literal["full", "item", "user"] = "full"
    # Item modalities of the model (text-only / vision-only settings); None = the model's (or init's).
    # A single-modality model transfers only that modality's tower and needs only that modality's cache.
    modalities: tuple[str, ...] | None = None
    encoders: EncoderChoice = field(default_factory=EncoderChoice)
    model: PMMRecConfig = field(default_factory=PMMRecConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    epochs: int = 5
    batch_size: int = 32  # users per process
    lr: float = 1e-4
    encoder_lr: float = 0.0  # learning rate of the top encoder blocks; 0 = lr (paper: one lr for all)
    # Learning rate of the heads loaded from `init` (projections, fusion, user encoder); 0 = lr. A lower
    # one (with warmup_steps) keeps fine-tuning from throwing the transferred start away.
    init_lr: float = 0.0
    weight_decay: float = 0.1  # projections, fusion, user encoder; encoder blocks get 0
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16 on CUDA, else no
    max_len: int = 20  # sequence positions fed to the user encoder (history length)
    # "last": each user's last max_len + 1 training items (released code); "all": every training
    # sequence cut into windows of max_len + 1, so every training item is a target once (RecBole-like).
    train_windows: Literal["last", "all"] = "last"
    # With train_windows = all: windows start every `train_window_stride` items (0 = max_len: no
    # overlap). Each target still counts once, in the window where it has the longest history, so a
    # smaller stride gives targets more history (1: all max_len items, as RecBole's prefixes) at the
    # cost of ~max_len / stride times more windows per epoch.
    train_window_stride: int = 0
    select_metric: str = "NDCG@10"
    patience: int = 3  # epochs without improvement before stopping
    ks: tuple[int, ...] = (10, 20, 50)
    mask_history: bool = True
    storage: Literal["auto", "memmap", "ram", "gpu"] = "auto"
    prefetch: bool = True  # prepare the next batch on a background thread while the step runs
    max_steps_per_epoch: int = 0  # 0 = the whole epoch
    seed: int = 42
    resume: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError("epochs must be >= 1 and batch_size >= 2 (in-batch negatives need other users)")
        if not 0 <= self.train_window_stride <= self.max_len:
            raise ConfigError(f"train_window_stride = {self.train_window_stride}; must be in [1, max_len = "
                              f"{self.max_len}] (or 0 for max_len)")
        if not (self.lr > 0 and self.init_lr >= 0 and self.encoder_lr >= 0 and math.isfinite(self.lr + self.init_lr
                                                                                             + self.encoder_lr)):
            raise ConfigError(f"lr = {self.lr}, encoder_lr = {self.encoder_lr}, init_lr = {self.init_lr}: lr must be "
                              "a positive number, encoder_lr and init_lr >= 0 (0 = lr)")
        for name in ("warmup_steps", "max_steps_per_epoch", "grad_clip", "weight_decay"):
            value = getattr(self, name)
            if not value >= 0:  # also refuses NaN
                raise ConfigError(f"{name} = {value}; must be >= 0")
        if self.patience < 1 or self.max_len < 1:
            raise ConfigError(f"patience = {self.patience}, max_len = {self.max_len}: both must be >= 1")
        if self.train_window_stride and self.train_windows != "all":
            raise ConfigError("train_window_stride needs train_windows = all")
        if self.stage == "finetune" and not self.objectives.dap > 0:
            raise ConfigError(f"objectives.dap = {self.objectives.dap}: fine-tuning trains DAP alone, so its weight "
                              "must be positive")
        if not self.weights:
            raise ConfigError("every objective weight is 0 (objectives.dap/nicl/nid/rcl): nothing to train")
        if self.select_metric not in {f"{m}@{k}" for k in self.ks for m in ("HR", "NDCG")}:
            raise ConfigError(f"select_metric {self.select_metric!r} must be HR@k or NDCG@k with k in {self.ks}")
        if self.modalities is not None and (not self.modalities or not set(self.modalities) <= {"text", "image"}
                                            or len(set(self.modalities)) != len(self.modalities)):
            raise ConfigError(f"modalities = {self.modalities}; name text and/or image, once each")

    @property
    def weights(self) -> dict[str, float]:
        o = self.objectives
        if self.stage == "finetune":
            return {"dap": o.dap}
        return {name: w for name, w in (("dap", o.dap), ("nicl", o.nicl), ("nid", o.nid), ("rcl", o.rcl)) if w > 0}


class TrainingStep(nn.Module):
    """One forward pass of the objectives; a module so that DDP sees the whole computation."""

    def __init__(self, model: PMMRec, objectives: ObjectiveConfig, weights: dict[str, float],
                 log_popularity: torch.Tensor | None, catalogue: Any = None):
        super().__init__()
        self.model = model
        self.objectives = objectives
        self.weights = weights
        self.register_buffer("log_popularity", log_popularity, persistent=False)
        # Inputs of items 1..N, for `negatives = "catalogue"`: their indices (ID model) or cached states.
        if isinstance(catalogue, torch.Tensor):
            self.register_buffer("catalogue", catalogue, persistent=False)
        else:
            self.catalogue = catalogue
        if objectives.negatives == "catalogue" and catalogue is None:
            raise ConfigError("objectives.negatives = catalogue needs the catalogue's item inputs")

    @property
    def dap_temperature(self) -> float:
        """The DAP logit divisor: the configured one, or sqrt(d) for content items and 1 for ID items."""
        if self.objectives.dap_temperature is not None:
            return self.objectives.dap_temperature
        config = self.model.config
        return 1.0 if config.items == "id" else math.sqrt(config.user_encoder.d_model)

    def forward(self, item_ids: torch.Tensor, inverse: torch.Tensor, states: cache_io.ItemStates,
                corrupted_inverse: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                predict: torch.Tensor | None = None, negative_ids: torch.Tensor | None = None,
                negative_inverse: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """item_ids (B, N) left-padded sequences (inputs + last target); inverse (B, N) positions of
        their items among the unique items whose `states` are given; corrupted_inverse / labels
        (B, N - 1) the NID-corrupted inputs, as positions among the unique items, and their labels;
        predict (B, N - 1) the targets that count; negative_ids / negative_inverse (M,) uniform
        negatives ("mixed") and their positions among the unique items."""
        o = self.objectives
        temperature = self.dap_temperature
        items = self.model.encode_items(states)  # vectors of the U unique items
        vectors = items.vector[inverse]  # (B, N, d): N - 1 input items, then the last target
        padding = item_ids == 0  # (B, N)
        # The user encoder sees the inputs only, exactly as at evaluation time (its positions count
        # back from the most recent item, so the target must not be part of its input).
        inputs, input_padding = vectors[:, :-1], padding[:, :-1]
        user_states = self.model.encode_users(inputs, input_padding)  # (B, N - 1, d), causal
        losses: dict[str, torch.Tensor] = {}
        if "dap" in self.weights and o.negatives == "catalogue":  # every item a candidate (no logQ)
            table = self.model.encode_items(self.catalogue).vector  # (N, d)
            losses["dap"] = catalogue_dap_loss(user_states, table, item_ids, None, temperature, predict)
        elif "dap" in self.weights:
            extra = items.vector[negative_inverse] if negative_inverse is not None else None  # (M, d)
            losses["dap"] = dap_loss(user_states, vectors, item_ids, self.log_popularity, temperature,
                                     extra, negative_ids if extra is not None else None, predict)
        if "nicl" in self.weights:
            if items.text_cls is None or items.image_cls is None:
                raise ConfigError("NICL needs both modalities; set objectives.nicl = 0 for a single-modality model")
            losses["nicl"] = nicl_loss(items.text_cls[inverse], items.image_cls[inverse], item_ids, o.nicl_variant,
                                       o.temperature, o.nicl_next_in_denominator, self.log_popularity)
        if corrupted_inverse is not None:  # NID / RCL on the corrupted inputs (eq. 10, 11)
            corrupted_states = self.model.encode_users(items.vector[corrupted_inverse], input_padding)
            if "nid" in self.weights:
                losses["nid"] = nid_loss(self.model.detect_noise(corrupted_states), labels, relu=o.nid_relu)
            if "rcl" in self.weights:
                keep = ~input_padding
                losses["rcl"] = rcl_loss(masked_mean_pool(user_states, keep), masked_mean_pool(corrupted_states, keep),
                                         o.temperature, o.rcl_normalize)
        return losses


def nonfinite_loss_cause(batch: Any, store: ItemStore | IdItems, model: PMMRec, keys: list[str],
                         cache_path: Path | None) -> str:
    """Why a step's loss was not finite, for the error: the batch's items whose cached states are
    not finite (the cache is damaged: re-extract them), or, when every state is finite, the
    optimisation (learning rate, precision), naming the batch's items either way and saying
    whether the item tower already turns them into non-finite vectors."""
    items = batch.items.tolist() if batch.items is not None else []
    items = [i for i in items if i > 0]  # 0 is padding

    def named(indices: list[int]) -> str:
        shown = ", ".join(keys[i - 1] for i in indices[:8])
        return shown + (f" and {len(indices) - 8} more" if len(indices) > 8 else "")

    if isinstance(store, ItemStore) and batch.items is not None:
        bad = nonfinite_items(batch.states).cpu()
        broken = [int(i) for i in batch.items[bad].tolist() if i > 0]
        if broken:
            return (f"The cache {cache_path} holds non-finite values for {len(broken)} of the batch's "
                    f"{len(items)} items: {named(broken)}. No learning rate helps: re-extract those items "
                    "(`pmmcache verify-cache` lists every damaged item; `pmmcache extract --force` rebuilds the "
                    "cache)")
        source = "their cached states are finite"
    else:
        source = "an ID-based model reads no cache"
    with torch.no_grad():
        vectors = model.encode_items(batch.states).vector  # (U, d)
    diverged = int((~torch.isfinite(vectors).all(-1)).sum())
    source += (f"; {diverged} of their item vectors are not (the item tower's weights diverged)" if diverged
               else "; their item vectors are finite")
    return (f"The batch's {len(items)} items ({named(items)}): {source}, so the optimisation diverged; "
            "try a lower --lr, --grad-clip 1.0, or bf16 instead of fp16")


def optimizer_groups(model: PMMRec, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: the pretrained encoder blocks (`encoder_lr`, no weight decay), the
    heads loaded from `init` (`init_lr`), and the heads trained from scratch (`lr`)."""
    groups = model.parameter_groups()
    loaded = set()
    if config.init and config.init_lr > 0:
        loaded = {id(p) for part in TRANSFER_PARTS[config.transfer] for p in model.part(part).parameters()}
    transferred = [p for p in groups["heads"] if id(p) in loaded]
    fresh = [p for p in groups["heads"] if id(p) not in loaded]
    result = [{"params": groups["encoder_blocks"], "weight_decay": 0.0, "lr": config.encoder_lr or config.lr},
              {"params": fresh, "weight_decay": config.weight_decay, "lr": config.lr}]
    if transferred:
        result.append({"params": transferred, "weight_decay": config.weight_decay, "lr": config.init_lr})
    return result


def objective_gradient_norms(step: TrainingStep, inputs: tuple[Any, ...]) -> dict[str, float]:
    """The norm of each weighted objective's gradient on the item tower and on the user encoder,
    for one batch (`inputs` as `TrainingStep.forward` takes them): a dead objective shows as ~0.

    Runs its own forward on the unwrapped module (no DDP hooks) and leaves `.grad` untouched.
    Returns {"grad_<objective>_item_tower": norm, "grad_<objective>_user_encoder": norm, ...}.
    """
    parts = {name: [p for p in step.model.part(name).parameters() if p.requires_grad]
             for name in ("item_tower", "user_encoder")}
    params = [p for group in parts.values() for p in group]
    losses = step(*inputs)
    norms: dict[str, float] = {}
    for objective, value in losses.items():
        grads = torch.autograd.grad(step.weights[objective] * value, params, retain_graph=True, allow_unused=True)
        start = 0
        for part, group in parts.items():
            squares = [g.float().pow(2).sum() for g in grads[start:start + len(group)] if g is not None]
            norms[f"grad_{objective}_{part}"] = math.sqrt(float(sum(squares))) if squares else 0.0
            start += len(group)
    return norms


def format_gradient_norms(norms: dict[str, float]) -> str:
    """One line: 'grad norm (item tower / user encoder): dap 1.2 / 0.3, nicl ...'."""
    objectives = [key[len("grad_"):-len("_item_tower")] for key in norms if key.endswith("_item_tower")]
    cells = [f"{o} {norms[f'grad_{o}_item_tower']:.3g} / {norms[f'grad_{o}_user_encoder']:.3g}" for o in objectives]
    return "grad norm (item tower / user encoder): " + ", ".join(cells)


def log_sampling_probability(counts: np.ndarray) -> torch.Tensor:
    """(N + 1,) log share of each item among the training occurrences: the log probability that an
    in-batch candidate is that item (logQ). Items never seen in training count once, so the
    correction stays finite; padding (index 0) is never a candidate."""
    counts = torch.from_numpy(np.asarray(counts)).double().clamp(min=1.0)
    return (counts.log() - counts[1:].sum().log()).float()


def training_sequences(dataset: Any, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sequences an epoch samples from, (W, max_len + 1) long, and which of their targets count
    ((W, max_len) bool, or None for all): windows of every training sequence or each user's last items."""
    if config.train_windows == "all":  # every training target once
        windows, _, first = dataset.train_windows(config.max_len + 1, config.train_window_stride or None)
        predict = None
        if first.any():  # overlapping windows: each predicts only the targets it owns
            predict = torch.arange(config.max_len)[None, :] >= torch.from_numpy(first)[:, None]
        return torch.from_numpy(windows).long(), predict
    return torch.from_numpy(dataset.train_sequences(config.max_len + 1)).long(), None  # each user's last items


@dataclass
class TrainState:
    """Progress that checkpoints carry besides weights and optimizer (registered with accelerate)."""

    epoch: int = 0  # epochs completed
    best_epoch: int = -1
    best_metric: float = -math.inf
    bad_epochs: int = 0

    FILE = "train_state.json"

    def write(self, checkpoint: Path) -> None:
        write_json(checkpoint / self.FILE, dict(self.__dict__))

    @classmethod
    def read(cls, checkpoint: Path) -> "TrainState":
        """The progress saved in `checkpoint`; a checkpoint without it (made by pmmcache before it
        stopped pickling progress) is refused, since its pickle is not loaded."""
        path = checkpoint / cls.FILE
        if not path.is_file():
            raise PmmcacheError(f"{path}: missing; this checkpoint keeps its progress in a pickle, which pmmcache "
                                "does not load. Start a new run (another --run-name) instead of resuming it")
        try:
            values = json.loads(path.read_text())
            return from_dict(cls, {f.name: values[f.name] for f in fields(cls)}, where=str(path))  # types checked
        except (ValueError, KeyError, TypeError, ConfigError) as err:
            raise PmmcacheError(f"{path}: not a training state written by pmmcache ({err})") from err


def epoch_batches(num_users: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """This process's user batches for one epoch: a seeded permutation, cut into global batches.

    Every process gets the same number of batches; the last global batch wraps around the
    permutation so no process is left without users.
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_users)
    global_size = batch_size * world
    steps = max(1, -(-num_users // global_size))
    order = np.resize(order, steps * global_size)  # wraps around
    return [order[s * global_size + rank * batch_size: s * global_size + (rank + 1) * batch_size] for s in range(steps)]


def load_encoders(choice: EncoderChoice, cache_dataset: str) -> tuple[TextEncoder | None, VisionEncoder | None]:
    """The encoders whose top blocks the model trains (same defaults as `pmmcache extract`)."""
    from pmmcache.extract import ExtractConfig, encoder_specs

    extract_config = ExtractConfig(dataset=cache_dataset, **{k: v for k, v in to_dict(choice).items()})
    text_spec, vision_spec = encoder_specs(extract_config)
    return (TextEncoder.load(text_spec) if text_spec else None, VisionEncoder.load(vision_spec) if vision_spec else None)


@dataclass
class Setup:
    """Everything a training or evaluation run needs, resolved from a TrainConfig."""

    config: TrainConfig
    dataset: Any
    store: ItemStore | IdItems
    model: PMMRec
    cache_path: Path | None  # None for an ID-based model (no cache)
    transfer: dict[str, Any] | None = None  # what `init` loaded into which part (see `transfer_init`)


def resolve_init_dir(init: str, runs_dir: Path) -> Path:
    """A run name, a run directory or a parts directory -> the directory holding the model parts."""
    for candidate in (Path(init), Path(runs_dir) / init):
        best = settled_dir(candidate / "best")
        if best is not None and (best / "config.json").is_file():
            return best
        if (candidate / "config.json").is_file() and (candidate / "item_tower.safetensors").is_file():
            return candidate
    raise PmmcacheError(f"--init {init}: no trained model found (looked for {init}/best/ and {runs_dir}/{init}/best/)")


def with_init_model(config: TrainConfig) -> TrainConfig:
    """The model config a run trains: with `init`, the init run's architecture (so its weights fit),
    narrowed to `modalities` when given; the NID head only when NID is trained (DDP refuses
    parameters without gradients). Idempotent, and recorded in the run's config."""
    model = to_dict(config.model)
    if model["item_tower"]["projection"] == "auto":  # decided by whether any encoder block is trained
        model["item_tower"]["projection"] = "mlp" if config.encoders.top_blocks == 0 else "linear"
    if config.init:
        init_config, _ = read_parts_config(resolve_init_dir(config.init, config.runs_dir))
        init_model = _narrowed(to_dict(init_config), config.modalities)
        if config.model.item_tower.projection == "auto":  # not a choice the user made
            model["item_tower"]["projection"] = init_model["item_tower"]["projection"]
        # nid_head follows the objectives and num_items 0 means "the dataset's": neither is an architecture choice.
        asked = {**_narrowed(model, config.modalities), "nid_head": init_model["nid_head"],
                 "num_items": model.get("num_items") or init_model["num_items"]}
        if config.model != PMMRecConfig() and asked != init_model:
            raise ConfigError(f"--init {config.init} fixes the model architecture; drop the model.* settings "
                              "(they differ from the init run's)")
        if config.modalities and not set(config.modalities) <= set(init_config.item_tower.modalities):
            raise ConfigError(f"modalities {list(config.modalities)}: the init run {config.init} has only "
                              f"{list(init_config.item_tower.modalities)}")
        model = init_model
    model = {**_narrowed(model, config.modalities), "nid_head": "nid" in config.weights}
    changes: dict[str, Any] = {"model": model}
    if model.get("items") == "id":  # an ID model reads no cache: encoder settings mean nothing to it
        changes["encoders"] = to_dict(EncoderChoice())
    return from_dict(TrainConfig, {**to_dict(config), **changes})


def _narrowed(model: dict[str, Any], modalities: tuple[str, ...] | None) -> dict[str, Any]:
    if not modalities:
        return model
    order = [m for m in ("text", "image") if m in modalities]
    return {**model, "item_tower": {**model["item_tower"], "modalities": order}}


# Which saved parts each transfer setting loads (paper III-E); the others start fresh.
TRANSFER_PARTS = {"full": ("item_tower", "user_encoder"), "item": ("item_tower",), "user": ("user_encoder",)}


def transfer_init(model: PMMRec, config: TrainConfig) -> dict[str, Any]:
    """Load what `config.transfer` transfers from `config.init`; returns a record of what was loaded.

    A single-modality model takes only its modality's tower from a multimodal run: the file's other
    keys (the other tower, the fusion block) are listed as "not used". A key the model has and the
    file lacks is always an error.
    """
    directory = resolve_init_dir(config.init, config.runs_dir)
    parts = TRANSFER_PARTS[config.transfer]
    reports = model.load_parts(directory, parts=parts, allow_unexpected=True)
    loaded = {name: sorted(k for k in model.part(name).state_dict()) for name in parts}
    return {"init": str(directory), "transfer": config.transfer, "loaded": loaded,
            "fresh": [name for name in ("item_tower", "user_encoder") if name not in parts],
            "not_used": {name: report.unexpected for name, report in reports.items() if report.unexpected}}


def trained_setup(run_dir: Path, device: torch.device, **changes: Any) -> Setup:
    """The best model of a finished run with its dataset and item store (for eval, recommend, export).

    `changes` override config fields (e.g. dataset); the whole model always comes from `run_dir/best`.
    """
    if not (best_dir(run_dir) / "config.json").is_file():
        raise PmmcacheError(f"{run_dir} has no trained model (best/); train it first with `pmmcache train`")
    path = Path(run_dir) / "config.json"
    data = load_file(path)
    data.update({"init": str(run_dir), "transfer": "full", "resume": False, **changes})
    return setup(from_dict(TrainConfig, data, where=str(path)), device)


def setup(config: TrainConfig, device: torch.device) -> Setup:
    config = with_init_model(config)
    dataset = resolve_dataset(config.dataset, Path(config.data_dir), Path(config.cache_dir), config.data)
    model_config = config.model
    if model_config.user_encoder.max_len < config.max_len + 1:
        raise ConfigError(f"model.user_encoder.max_len ({model_config.user_encoder.max_len}) must be >= max_len + 1 "
                          f"({config.max_len + 1}): the training sequence holds the history and the target")
    if model_config.items == "id":
        if model_config.num_items not in (0, dataset.num_items):
            raise ConfigError(f"the ID embeddings {'of --init ' + config.init + ' ' if config.init else ''}are for "
                              f"{model_config.num_items} items, dataset {config.dataset} has {dataset.num_items}; an "
                              "ID-based model cannot transfer to another catalogue")
        if model_config.num_items == 0:
            model_config = from_dict(PMMRecConfig, {**to_dict(model_config), "num_items": dataset.num_items})
        model = build_pmmrec(model_config, None, None)
        store: ItemStore | IdItems = IdItems(dataset.num_items)
        path = None
    else:
        cache_dataset = config.cache_dataset or default_cache_dataset(config.dataset)
        wanted = set(model_config.item_tower.modalities)
        choice = from_dict(EncoderChoice, {**to_dict(config.encoders),
                                           "modalities": [m for m in ("text", "image") if m in wanted]})
        text, vision = load_encoders(choice, cache_dataset)
        path = find_cache(Path(config.cache_dir), cache_dataset, text, vision)
        store = open_item_store(path, dataset, expected_manifest(text, vision), storage=config.storage,
                                device=device)
        model = build_pmmrec(model_config, text, vision)
    transfer = transfer_init(model, config) if config.init else None
    return Setup(config=config, dataset=dataset, store=store, model=model, cache_path=path, transfer=transfer)


def _mixed_precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return setting


def _run_dir(config: TrainConfig) -> Path:
    name = config.run_name or f"{config.stage}-{config.dataset.replace('/', '_').replace(',', '+')}"
    return Path(config.runs_dir) / name


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    metrics: dict[str, dict[str, float]]  # split -> metric -> value, of the best epoch
    history: list[dict[str, Any]]


def run(config: TrainConfig, show_progress: bool = True) -> TrainResult:
    """Train (or resume) a run; returns the best epoch's valid and test metrics."""
    # The scheduler steps once per optimizer step, as warmup_steps counts them: accelerate's default
    # steps a prepared scheduler once per process per step, which ended warmup early under `launch`.
    accelerator = Accelerator(mixed_precision=_mixed_precision(config.mixed_precision), cpu=use_cpu(),
                              step_scheduler_with_optimizer=False)
    set_seed(config.seed)
    config = with_init_model(config)
    run_dir = _run_dir(config)
    checkpoints = run_dir / "checkpoints"
    if accelerator.is_main_process:
        _prepare_run_dir(run_dir, config)
    accelerator.wait_for_everyone()

    s = setup(config, accelerator.device)
    if accelerator.is_main_process and not config.resume:  # only once setup worked: a failed start leaves nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", to_json(config) + "\n")
    accelerator.wait_for_everyone()
    model, dataset, store = s.model, s.dataset, s.store
    weights = config.weights
    log_pop = None  # in-batch DAP and NICL candidates are popularity-drawn: logQ needs their probabilities
    if config.objectives.logq and (config.objectives.negatives != "catalogue" or "nicl" in weights):
        log_pop = log_sampling_probability(dataset.train_item_counts())
    optimizer = torch.optim.AdamW(optimizer_groups(model, config), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0)
    catalogue = None
    if config.objectives.negatives == "catalogue":  # inputs of items 1..N, encoded at every step
        catalogue = store.get(torch.arange(1, store.num_items + 1))
    step_module = TrainingStep(model, config.objectives, weights, log_pop, catalogue)
    step_module, optimizer, scheduler = accelerator.prepare(step_module, optimizer, scheduler)
    # Progress is saved as JSON beside accelerate's state, never registered with accelerate: its custom
    # checkpoints are full pickle loads, so a planted file in a run directory would run code on resume.
    state = TrainState()
    if config.resume:
        start = resume_point(checkpoints, warn=accelerator.is_main_process)
        if start is not None:
            latest, state = start
            accelerator.load_state(str(latest))
            if accelerator.is_main_process and show_progress:
                print(f"resumed from {latest} (epoch {state.epoch} done)")

    sequences, predict = training_sequences(dataset, config)
    if accelerator.is_main_process and s.transfer is not None:
        write_json(run_dir / "transfer.json", s.transfer)
    history = _read_history(run_dir, state.epoch)
    needs_corruption = "nid" in weights or "rcl" in weights
    unwrapped = accelerator.unwrap_model(step_module).model
    epoch = state.epoch
    while epoch < config.epochs and state.bad_epochs < config.patience:
        batches = epoch_batches(len(sequences), config.batch_size, epoch, config.seed,
                                accelerator.process_index, accelerator.num_processes)
        if config.max_steps_per_epoch:
            batches = batches[: config.max_steps_per_epoch]
        sums: dict[str, torch.Tensor] = {}  # summed on the device: one host sync per step, not one per loss
        grad_norms: dict[str, float] = {}
        items_seen = 0
        start = time.perf_counter()
        bar = tqdm(batches, desc=f"{config.stage} epoch {epoch + 1}/{config.epochs}", unit="step", dynamic_ncols=True,
                   disable=not (show_progress and accelerator.is_local_main_process), leave=False)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 7919 + accelerator.process_index)
        corruption = ((config.objectives.shuffle_fraction, config.objectives.replace_fraction)
                      if needs_corruption else None)
        uniform = config.objectives.uniform_negatives if config.objectives.negatives == "mixed" else 0
        prepared = Prefetcher(batches, lambda users: prepare_batch(
            sequences, users, store, accelerator.device, corruption, generator, trim=_trim_padding,
            predict=predict, uniform_negatives=uniform), enabled=config.prefetch)
        for step, (users, batch) in enumerate(zip(bar, prepared)):  # the batch is ready before its step
            # (B, N) ids, (B, N) their positions among the U unique items, and those items' states
            inputs = (batch.ids.to(accelerator.device), batch.inverse.to(accelerator.device), batch.states,
                      batch.corrupted_inverse, batch.labels, batch.predict, batch.negative_ids, batch.negative_inverse)
            if step == 0:  # each objective's pull on the model, once per epoch (metrics.jsonl)
                with accelerator.autocast():
                    grad_norms = objective_gradient_norms(accelerator.unwrap_model(step_module), inputs)
            with accelerator.autocast():
                losses = step_module(*inputs)
                loss = sum(weights[name] * value for name, value in losses.items())
            loss_value = loss.item()  # the step's one host sync: the NaN guard and the progress bar need it
            if not math.isfinite(loss_value):
                raise PmmcacheError(
                    f"loss became {loss_value} at epoch {epoch + 1}, step {step + 1} "
                    f"({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}); stopped. "
                    f"The last good checkpoint is {ckpt.latest_checkpoint(checkpoints) or 'none (no epoch finished)'}. "
                    + nonfinite_loss_cause(batch, store, unwrapped, dataset.item_keys(), s.cache_path))
            accelerator.backward(loss)
            if config.grad_clip > 0:
                accelerator.clip_grad_norm_(step_module.parameters(), config.grad_clip)
            optimizer.step()
            if not optimizer.step_was_skipped:  # an fp16 overflow skips the step: the schedule waits too
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            sums["loss"] = sums.get("loss", 0.0) + loss_value
            items_seen += batch.num_items * accelerator.num_processes
            bar.set_postfix(loss=f"{loss_value:.4f}", items_s=f"{items_seen / (time.perf_counter() - start):.0f}")
        bar.close()
        seconds = time.perf_counter() - start
        metrics = evaluate_splits(unwrapped, store, dataset, ("valid",), config.ks, config.max_len,
                                  config.mask_history, accelerator)["valid"]
        epoch += 1
        state.epoch = epoch
        record = {"epoch": epoch, **{f"train_{k}": float(v) / max(1, len(batches)) for k, v in sums.items()},
                  **{f"valid_{k}": v for k, v in metrics.items()}, **grad_norms,
                  "lr": scheduler.get_last_lr()[1],  # the heads' learning rate for the next step (lr once warm)
                  "seconds": round(seconds, 2),
                  "items_per_s": round(items_seen / seconds, 1) if seconds > 0 else 0.0}
        improved = metrics[config.select_metric] > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.bad_epochs = metrics[config.select_metric], epoch, 0
        else:
            state.bad_epochs += 1
        history.append(record)
        _save_epoch(accelerator, unwrapped, run_dir, state, improved, record, history)
        if accelerator.is_main_process and show_progress:
            hr = metrics.get("HR@10", float("nan"))
            # A hit rate over n users has standard error sqrt(p (1 - p) / n): epochs closer than ~2 of
            # it are noise, which is what patience must be sized against.
            noise = math.sqrt(hr * (1 - hr) / metrics["users"]) if metrics.get("users") else float("nan")
            print(f"epoch {epoch}: loss {record.get('train_loss', float('nan')):.4f}  valid "
                  f"HR@10 {hr:.4f} (± {noise:.4f})  NDCG@10 {metrics.get('NDCG@10', float('nan')):.4f}"
                  f"{'  (best)' if improved else ''}  {seconds:.1f} s")
            if len(weights) > 1:
                print("  " + format_gradient_norms(grad_norms))
    if state.bad_epochs >= config.patience and accelerator.is_main_process and show_progress:
        print(f"early stop: {config.select_metric} did not improve for {config.patience} epochs")

    # Final numbers come from the best epoch's weights, on valid and test.
    accelerator.wait_for_everyone()
    unwrapped.load_parts(best_dir(run_dir), parts=("item_tower", "user_encoder"))
    final = evaluate_splits(unwrapped, store, dataset, ("valid", "test"), config.ks, config.max_len,
                            config.mask_history, accelerator)
    popular = popularity_ranking(dataset, ("valid", "test"), config.ks, config.max_len, config.mask_history)
    if accelerator.is_main_process:
        write_json(run_dir / "eval.json", {"best_epoch": state.best_epoch, "metrics": final,
                                            "popularity_ranking": popular,
                                            "mask_history": config.mask_history, "dataset": config.dataset})
        if show_progress:
            print(format_with_popularity(final, popular, config.ks))
            print(f"best epoch {state.best_epoch}; run directory {run_dir}")
    accelerator.wait_for_everyone()
    return TrainResult(run_dir=run_dir, best_epoch=state.best_epoch, metrics=final, history=history)


_trim_padding = trim_padding  # looked up per batch: the resume test hooks it to kill a run mid-epoch


# Settings a resumed run may change: how long it goes on and how batches reach the step, not what it trains.
RESUMABLE_CHANGES = ("epochs", "patience", "resume", "prefetch")


def _prepare_run_dir(run_dir: Path, config: TrainConfig) -> None:
    config_path = run_dir / "config.json"
    if config.resume:
        if not config_path.is_file():
            raise PmmcacheError(f"--resume: no run at {run_dir} (no config.json)")
        # Through from_dict: settings added to TrainConfig after the run was made count as their defaults.
        saved = to_dict(from_dict(TrainConfig, load_file(config_path), where=str(config_path)))
        current = to_dict(config)
        changed = sorted(k for k in saved.keys() | current.keys()
                         if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
        if changed:
            raise PmmcacheError(f"--resume: {config_path} was made with other settings ({', '.join(changed)} differ); "
                                "resume with the same options or start a new run (--run-name)")
        extended = {k: current[k] for k in RESUMABLE_CHANGES if k != "resume" and saved.get(k) != current[k]}
        if extended:  # e.g. more epochs: config.json keeps saying how the run is being trained
            write_json(config_path, {**saved, **extended})
        settle_dir(run_dir / "best")  # finish a replacement of best/ that a crash interrupted
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise PmmcacheError(f"run directory {run_dir} already exists; pass --resume to continue it, "
                            "or choose another --run-name")


def resume_point(checkpoints: Path, warn: bool = True) -> tuple[Path, "TrainState"] | None:
    """The newest intact checkpoint and its progress; None when no epoch finished. A newer one that is
    damaged is passed over with a warning naming what is wrong (`warn`: this process prints it); when
    every complete checkpoint is damaged, the error lists them all."""
    damaged: list[tuple[Path, str]] = []
    for candidate in reversed(ckpt.complete_checkpoints(checkpoints)):
        trouble = ckpt.problem(candidate)
        if trouble is None:
            try:
                state = TrainState.read(candidate)
            except PmmcacheError as err:
                trouble = str(err)
        if trouble is None:
            for path, why in damaged if warn else ():
                print(f"warning: not resuming from {path}: {why}; resuming from {candidate} instead",
                      file=sys.stderr)
            return candidate, state
        damaged.append((candidate, trouble))
    if damaged:
        raise PmmcacheError(f"--resume: no usable checkpoint in {checkpoints}: "
                            + "; ".join(f"{path.name}: {why}" for path, why in damaged)
                            + ". Start a new run (another --run-name) instead of resuming this one")
    return None


def best_dir(run_dir: Path) -> Path:
    """The run's best/ model parts, also after a crash while they were being replaced."""
    found = settled_dir(Path(run_dir) / "best")
    if found is None:
        raise PmmcacheError(f"{run_dir} has no trained model (best/); train it first with `pmmcache train`")
    return found


def _read_history(run_dir: Path, epochs_done: int) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records, number = [], None
    try:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                records.append(json.loads(line))
                if not isinstance(records[-1].get("epoch"), int):
                    raise ValueError("no epoch number")
    except (UnicodeDecodeError, ValueError, AttributeError) as err:
        raise DataError(f"not the epoch records pmmcache writes ({err}); move the file aside to resume without "
                        "the earlier epochs' records", path, number) from err
    return [r for r in records if r["epoch"] <= epochs_done]


def _save_epoch(accelerator: Accelerator, model: PMMRec, run_dir: Path, state: TrainState, improved: bool,
                record: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Checkpoint the epoch (state for --resume; parts for best/), then drop all but the last two."""
    checkpoints = run_dir / "checkpoints"
    epoch = state.epoch
    target = ckpt.checkpoint_dir(checkpoints, epoch)
    if accelerator.is_main_process:
        ckpt.remove(target)  # a damaged one resume passed over: never mix its files with the new ones
    accelerator.wait_for_everyone()
    accelerator.save_state(str(target), safe_serialization=True)
    accelerator.wait_for_everyone()  # every process's RNG state is written before the checksums
    if accelerator.is_main_process:
        state.write(target)
        if improved:
            def fill(directory: Path) -> None:
                model.save_parts(directory)
                write_json(directory / "metrics.json", record)

            replace_dir(run_dir / "best", fill)
        write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in history))
        ckpt.seal(target, epoch)  # written last: a checkpoint without it is ignored
        ckpt.prune(checkpoints)
    accelerator.wait_for_everyone()
