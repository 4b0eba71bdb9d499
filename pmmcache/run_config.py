"""The settings of a stage-2 run: TrainConfig and the objective settings, ablation and baseline presets.

A run directory's config.json is a TrainConfig; `pmmcache.runs` builds and loads runs from it, and
`pmmcache.train` trains them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pmmcache.data.prepare import PrepareConfig
from pmmcache.encoders.config import EncoderConfig
from pmmcache.errors import ConfigError
from pmmcache.model import PMMRecConfig
from pmmcache.tracking import check_tracker_names


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

    `ablation` names one of Table VIII's variants and sets the settings it changes (see ABLATIONS), so
    a saved config says both the variant and what it meant; another value given for one of them is an
    error naming both.
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
    # DAP logits are h.e / dap_temperature. None = automatic: for content items at least sqrt(d) (scaled
    # dot product: post-LN vectors have norm ~sqrt(d), so raw logits have std ~sqrt(d) and the loss
    # starts saturated, 87 instead of ln #candidates at d = 768), raised on the first batch until the
    # first loss is within 0.5 nats of its flat-score value (anisotropic encoder outputs; see
    # train.calibrated_dap_temperature), or with --init the init run's; 1 for ID items (RecBole: their
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
    # With "catalogue" negatives, how often a step runs the item tower. "twice": the batch's items for
    # the user encoder, then the whole catalogue as candidates (independent dropout draws; how every
    # run before this setting was trained). "once": the catalogue only, the batch's items read from
    # it, as an ID table is (one tower pass per step instead of two: the faster choice at k >= 1).
    encode_catalogue: Literal["twice", "once"] = "twice"
    # How eq. 12's weighted sum is balanced. "grad_norm" (working form): on the first batch of a
    # pre-training run each auxiliary objective (NICL, NID, RCL) is scaled so that its gradient norm on
    # the trained parameters equals DAP's, times its weight; the scales are then fixed for the run (saved
    # in its checkpoints). The working forms give each term its own logit scale (DAP / sqrt(d), cosines /
    # 0.1), so at equal weights NID and RCL pulled 10-18x harder than DAP on ml-100k and the model ranked
    # below popularity. "none" = eq. 12 as printed: the weights alone.
    balance: Literal["grad_norm", "none"] = "grad_norm"
    ablation: Literal["none", "no-nicl", "vcl-only", "icl-only", "no-nid", "no-rcl"] = "none"

    @classmethod
    def check_given(cls, given: dict[str, Any]) -> None:
        """Refuse an ablation given together with another value of a setting it sets (`config.from_dict`)."""
        ablation = given.get("ablation", "none")
        for name, value in ABLATIONS.get(ablation, {}).items():
            if name in given and given[name] != value:
                raise ConfigError(f"objectives.ablation = {ablation} sets objectives.{name} = {value}, but "
                                  f"objectives.{name} = {given[name]} is set too; drop one of them")

    def __post_init__(self) -> None:
        defaults = ObjectiveConfig.__dataclass_fields__
        for name, value in ABLATIONS[self.ablation].items():
            current = getattr(self, name)
            if current != defaults[name].default and current != value:  # explicitly set (see also check_given)
                raise ConfigError(f"objectives.ablation = {self.ablation} sets objectives.{name} = {value}, but "
                                  f"objectives.{name} = {current} is set too; drop one of them")
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
    encoders: EncoderConfig = field(default_factory=EncoderConfig)  # must match the cache's encoders
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
    # sequence cut into windows of max_len + 1, so every training item is a target once (RecBole-like);
    # "prefixes": one window per training target, ending at it (RecBole's samples): each target is
    # predicted from the last state, as at evaluation, whose positions count back from the newest
    # item (a window's earlier targets see theirs shifted), at ~max_len times the windows of "all".
    # With overlapping windows (prefixes, stride < max_len) a batch can hold several windows of one
    # user, whose items are then in-batch negatives of each other: use negatives = catalogue there.
    train_windows: Literal["last", "all", "prefixes"] = "last"
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
    # Accelerate trackers that also get the losses and metrics (tensorboard, wandb, mlflow, ..., "all");
    # () = off. metrics.jsonl is written either way; see pmmcache/tracking.py.
    log_with: tuple[str, ...] = ()

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
        if self.encoders.modalities != EncoderConfig().modalities:
            raise ConfigError(f"encoders.modalities = {list(self.encoders.modalities)} is not a training setting: "
                              "the model's modalities decide which encoders are loaded; set `modalities` "
                              "(--modalities) for a single-modality model instead")
        check_tracker_names(self.log_with)
        if self.modalities is not None and (not self.modalities or not set(self.modalities) <= {"text", "image"}
                                            or len(set(self.modalities)) != len(self.modalities)):
            raise ConfigError(f"modalities = {self.modalities}; name text and/or image, once each")

    @property
    def weights(self) -> dict[str, float]:
        o = self.objectives
        if self.stage == "finetune":
            return {"dap": o.dap}
        return {name: w for name, w in (("dap", o.dap), ("nicl", o.nicl), ("nid", o.nid), ("rcl", o.rcl)) if w > 0}
