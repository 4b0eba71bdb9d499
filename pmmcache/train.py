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
    trackers/            with --log-with tensorboard: its event files (pmmcache/tracking.py)
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from tqdm.auto import tqdm

from pmmcache import cache as cache_io
from pmmcache import checkpoints as ckpt
from pmmcache.batches import Batch, Prefetcher, prepare_batch, trim_padding
from pmmcache.config import from_dict, to_json
from pmmcache.errors import ConfigError, PmmcacheError
from pmmcache.evaluate import evaluate_splits, format_with_popularity, popularity_ranking
from pmmcache.files import replace_dir, write_json, write_text_atomic
from pmmcache.items import IdItems, ItemStore, nonfinite_items
from pmmcache.model import PMMRec
from pmmcache.objectives import catalogue_dap_loss, dap_loss, masked_mean_pool, nicl_loss, nid_loss, rcl_loss
from pmmcache.run_config import ObjectiveConfig, TrainConfig
from pmmcache.runs import (TRANSFER_PARTS, best_dir, init_dap_temperature, prepare_run_dir, read_history,
                           resolve_init_dir, run_directory, setup, with_init_model)
from pmmcache.runtime import use_cpu
from pmmcache.tracking import RunTrackers, require_installed, tracker_dir


class TrainingStep(nn.Module):
    """One forward pass of the objectives; a module so that DDP sees the whole computation."""

    def __init__(self, model: PMMRec, objectives: ObjectiveConfig, weights: dict[str, float],
                 log_popularity: torch.Tensor | None, catalogue: Any = None):
        super().__init__()
        self.model = model
        self.objectives = objectives
        self.weights = weights
        self.register_buffer("log_popularity", log_popularity, persistent=False)
        self.calibrated_temperature: float | None = None  # content items' DAP temperature, once fixed
        # Inputs of items 1..N, for `negatives = "catalogue"`: their indices (ID model) or cached states.
        if isinstance(catalogue, torch.Tensor):
            self.register_buffer("catalogue", catalogue, persistent=False)
        else:
            self.catalogue = catalogue
        if objectives.negatives == "catalogue" and catalogue is None:
            raise ConfigError("objectives.negatives = catalogue needs the catalogue's item inputs")

    @property
    def calibrates(self) -> bool:
        """Whether this run's DAP temperature is fixed on its first batch (`calibrated_dap_temperature`):
        content items, DAP on, no temperature configured."""
        return (self.objectives.dap_temperature is None and self.model.config.items != "id"
                and "dap" in self.weights)

    @property
    def sqrt_d(self) -> float:
        return math.sqrt(self.model.config.user_encoder.d_model)

    @property
    def dap_temperature(self) -> float:
        """The DAP logit divisor: the configured one; 1 for ID items; for content items the one fixed on
        the first batch (`calibrated_temperature`), sqrt(d) until then."""
        if self.objectives.dap_temperature is not None:
            return self.objectives.dap_temperature
        if self.model.config.items == "id":
            return 1.0
        return self.calibrated_temperature or self.sqrt_d

    @property
    def encodes_catalogue_once(self) -> bool:
        return self.objectives.negatives == "catalogue" and self.objectives.encode_catalogue == "once"

    def _encode(self, item_ids: torch.Tensor, inverse: torch.Tensor, states: cache_io.ItemStates | None) -> tuple[Any, ...]:
        """(the U unique items' ItemOutput, (B, N, d) their vectors per position, (B, N - 1, d) user states,
        (B, N - 1) input padding, the catalogue's ItemOutput (items 1..N) when encoded once, else None)."""
        table = None
        if self.encodes_catalogue_once:  # one tower pass: the batch's items are rows of the catalogue's
            table = self.model.encode_items(self.catalogue)  # items 1..N
            # (U,) the item id of each unique item; every one of them is in item_ids ("catalogue" adds none)
            unique = torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=item_ids.device)
            unique.scatter_(0, inverse.reshape(-1), item_ids.reshape(-1).long())
            items = table.rows((unique - 1).clamp(min=0), keep=unique > 0)  # padding (0): zeros
        else:
            items = self.model.encode_items(states)  # vectors of the U unique items
        vectors = items.vector[inverse]  # (B, N, d): N - 1 input items, then the last target
        padding = item_ids == 0  # (B, N)
        # The user encoder sees the inputs only, exactly as at evaluation time (its positions count
        # back from the most recent item, so the target must not be part of its input).
        inputs, input_padding = vectors[:, :-1], padding[:, :-1]
        return items, vectors, self.model.encode_users(inputs, input_padding), input_padding, table

    def _dap_at(self, items: Any, vectors: torch.Tensor, user_states: torch.Tensor, item_ids: torch.Tensor,
                predict: torch.Tensor | None, negative_ids: torch.Tensor | None,
                negative_inverse: torch.Tensor | None, table: Any = None) -> Callable[[float], torch.Tensor]:
        """DAP as a function of its temperature (the candidates encoded once); `table`: the catalogue's
        ItemOutput if `_encode` made it."""
        if self.objectives.negatives == "catalogue":  # every item a candidate (no logQ)
            candidates = (table if table is not None else self.model.encode_items(self.catalogue)).vector  # (N, d)
            return lambda t: catalogue_dap_loss(user_states, candidates, item_ids, None, t, predict)
        extra = items.vector[negative_inverse] if negative_inverse is not None else None  # (M, d)
        extra_ids = negative_ids if extra is not None else None
        return lambda t: dap_loss(user_states, vectors, item_ids, self.log_popularity, t, extra, extra_ids, predict)

    def dap_at(self, item_ids: torch.Tensor, inverse: torch.Tensor, states: cache_io.ItemStates | None,
               corrupted_inverse: torch.Tensor | None = None, labels: torch.Tensor | None = None,
               predict: torch.Tensor | None = None, negative_ids: torch.Tensor | None = None,
               negative_inverse: torch.Tensor | None = None) -> Callable[[float], torch.Tensor]:
        """This batch's DAP loss (`forward`'s arguments) as a function of the temperature, the model
        run once in its current mode."""
        items, vectors, user_states, _, table = self._encode(item_ids, inverse, states)
        return self._dap_at(items, vectors, user_states, item_ids, predict, negative_ids, negative_inverse, table)

    @torch.no_grad()
    def first_batch_temperature(self, *inputs: Any) -> float:
        """`calibrated_dap_temperature` of this batch (`forward`'s arguments), the model in eval mode:
        dropout off draws no random numbers, so a run that stays at sqrt(d) trains as it did before."""
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            loss_at = self.dap_at(*inputs)
            return calibrated_dap_temperature(lambda t: float(loss_at(t)), self.sqrt_d)
        finally:
            for module, training in modes.items():
                module.training = training

    def forward(self, item_ids: torch.Tensor, inverse: torch.Tensor, states: cache_io.ItemStates | None,
                corrupted_inverse: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                predict: torch.Tensor | None = None, negative_ids: torch.Tensor | None = None,
                negative_inverse: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """item_ids (B, N) left-padded sequences (inputs + last target); inverse (B, N) positions of
        their items among the unique items whose `states` are given (None when the catalogue is encoded
        once: its vectors give the batch's items); corrupted_inverse / labels
        (B, N - 1) the NID-corrupted inputs, as positions among the unique items, and their labels;
        predict (B, N - 1) the targets that count; negative_ids / negative_inverse (M,) uniform
        negatives ("mixed") and their positions among the unique items."""
        o = self.objectives
        items, vectors, user_states, input_padding, table = self._encode(item_ids, inverse, states)
        losses: dict[str, torch.Tensor] = {}
        if "dap" in self.weights:
            losses["dap"] = self._dap_at(items, vectors, user_states, item_ids, predict, negative_ids,
                                         negative_inverse, table)(self.dap_temperature)
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


def step_inputs(batch: Batch, device: torch.device) -> tuple[Any, ...]:
    """`TrainingStep.forward`'s arguments from a prepared batch: (B, N) ids and (B, N) their positions
    among the U unique items (on `device`), those items' states, then the NID and negative inputs."""
    return (batch.ids.to(device), batch.inverse.to(device), batch.states, batch.corrupted_inverse, batch.labels,
            batch.predict, batch.negative_ids, batch.negative_inverse)


def make_optimizer(model: PMMRec, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over `optimizer_groups` and its learning-rate schedule (linear warmup over `warmup_steps`)."""
    optimizer = torch.optim.AdamW(optimizer_groups(model, config), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0)
    return optimizer, scheduler


def train_step(step_module: nn.Module, inputs: tuple[Any, ...], weights: dict[str, float], accelerator: Accelerator,
               optimizer: Any, scheduler: Any, grad_clip: float = 0.0) -> tuple[float, dict[str, torch.Tensor]]:
    """One optimizer step, as `run` takes it and `pmmcache bench step` times it: the objectives under
    the accelerator's autocast, their weighted sum read back once (the step's one host sync), backward
    through the accelerator, gradient clipping (`grad_clip` > 0), optimizer and scheduler step.

    `step_module`, `optimizer`, `scheduler` as `accelerator.prepare` returned them. Returns the loss and
    each objective's loss; a non-finite loss takes no step (the caller decides: `run` stops naming the batch)."""
    with accelerator.autocast():
        losses = step_module(*inputs)
        loss = sum(weights[name] * value for name, value in losses.items())
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        return loss_value, losses
    accelerator.backward(loss)
    if grad_clip > 0:
        accelerator.clip_grad_norm_(step_module.parameters(), grad_clip)
    optimizer.step()
    if not optimizer.step_was_skipped:  # an fp16 overflow skips the step: the schedule waits too
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, losses


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

    states = batch.states
    if states is None and batch.items is not None:  # not read for the step (the catalogue was encoded once)
        states = store.get(batch.items)
    if isinstance(store, ItemStore) and batch.items is not None:
        bad = nonfinite_items(states).cpu()
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
        vectors = model.encode_items(states).vector  # (U, d)
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


def objective_gradient_norms(step: TrainingStep, inputs: tuple[Any, ...],
                             weights: dict[str, float] | None = None) -> dict[str, float]:
    """The norm of each weighted objective's gradient on the item tower and on the user encoder,
    for one batch (`inputs` as `TrainingStep.forward` takes them): a dead objective shows as ~0.

    `weights`: the weights the gradients are taken with; default the step's own. Runs its own forward
    on the unwrapped module (no DDP hooks) and leaves `.grad` untouched.
    Returns {"grad_<objective>_item_tower": norm, "grad_<objective>_user_encoder": norm, ...}.
    """
    weights = step.weights if weights is None else weights
    parts = {name: [p for p in step.model.part(name).parameters() if p.requires_grad]
             for name in ("item_tower", "user_encoder")}
    params = [p for group in parts.values() for p in group]
    losses = step(*inputs)
    norms: dict[str, float] = {}
    for objective, value in losses.items():
        grads = torch.autograd.grad(weights[objective] * value, params, retain_graph=True, allow_unused=True)
        start = 0
        for part, group in parts.items():
            squares = [g.float().pow(2).sum() for g in grads[start:start + len(group)] if g is not None]
            norms[f"grad_{objective}_{part}"] = math.sqrt(float(sum(squares))) if squares else 0.0
            start += len(group)
    return norms


def calibrated_dap_temperature(loss_at: Callable[[float], float], base: float, excess: float = 0.5,
                               steps: int = 20) -> float:
    """The smallest temperature >= `base` (sqrt(d)) at which the first DAP loss `loss_at(t)` is within
    `excess` nats of its value with every score equal (t = inf: what the candidates and logQ alone give),
    found by bisection in log t; NaN if the scores are not finite (no temperature helps).

    sqrt(d) is the scale for isotropic vectors, where it leaves logits of unit spread (loss about ln
    #candidates + 0.5). Encoder outputs are anisotropic (items share a large common direction), so at
    the paper's width d = 768 sqrt(d) alone left the first loss 2.4 nats above ln #candidates on the test
    fixture, saturated from the first step; for logits of spread s, loss(t) - loss(inf) ~ s^2 / 2t^2, so
    the default 0.5 nats is unit spread again. Never below sqrt(d): a narrow, isotropic model keeps it."""
    flat, at_base = loss_at(math.inf), loss_at(base)
    if not (math.isfinite(flat) and math.isfinite(at_base)):
        return math.nan
    if at_base - flat <= excess:
        return base
    low, high = base, 2.0 * base
    while loss_at(high) - flat > excess:
        low, high = high, 2.0 * high
        if high > base * 2.0 ** 40:
            return math.nan
    for _ in range(steps):
        middle = math.sqrt(low * high)
        low, high = (low, middle) if loss_at(middle) - flat <= excess else (middle, high)
    return high


def calibrated_start(step: TrainingStep, inputs: tuple[Any, ...], accelerator: Accelerator) -> float:
    """`TrainingStep.first_batch_temperature` on this first batch; under DDP the largest over the
    processes (it satisfies every process's batch). If any process's scores are not finite, every
    process keeps sqrt(d): the first step's loss is then not finite either, and its guard names the cause
    (damaged cached states or diverged weights)."""
    with accelerator.autocast():
        temperature = step.first_batch_temperature(*inputs)
    every = accelerator.gather(torch.tensor([temperature], dtype=torch.float64, device=accelerator.device))
    return float(every.max().item()) if torch.isfinite(every).all() else step.sqrt_d


def starting_dap_temperature(state: "TrainState", step: TrainingStep, config: TrainConfig) -> float | None:
    """The DAP temperature a run starts with: the one its checkpoint saved; sqrt(d) for a checkpoint saved
    before calibration existed; with --init and the item tower transferred, the init model's (recalibrating
    a trained model would flatten the scores it learned); None = calibrate on the first batch (also for a
    run that does not calibrate: configured temperature or ID items)."""
    if not step.calibrates or state.dap_temperature is not None:
        return state.dap_temperature
    if state.epoch > 0:
        return step.sqrt_d
    if config.init and "item_tower" in TRANSFER_PARTS[config.transfer]:
        return init_dap_temperature(resolve_init_dir(config.init, Path(config.runs_dir)), step.sqrt_d)
    return None


def balance_scales(norms: dict[str, float]) -> dict[str, float]:
    """Per-objective factors that make each objective's gradient norm (item tower and user encoder
    together, from `objective_gradient_norms` at weight 1) equal DAP's: `objectives.balance = grad_norm`.

    DAP keeps 1; an objective without gradient keeps 1 (nothing to level); without DAP every factor is 1."""
    objectives = [key[len("grad_"):-len("_item_tower")] for key in norms if key.endswith("_item_tower")]
    total = {o: math.hypot(norms[f"grad_{o}_item_tower"], norms[f"grad_{o}_user_encoder"]) for o in objectives}
    reference = total.get("dap", 0.0)
    return {o: reference / total[o] if reference > 0 and total[o] > 0 else 1.0 for o in objectives}


def scaled_weights(weights: dict[str, float], scales: dict[str, float]) -> dict[str, float]:
    """The objective weights times their `balance_scales` (an objective without a scale keeps its weight)."""
    return {name: w * scales.get(name, 1.0) for name, w in weights.items()}


def balanced_start(step: TrainingStep, inputs: tuple[Any, ...], accelerator: Accelerator,
                   weights: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """`balance_scales` on this first batch, the gradient norms averaged over the processes so that
    every process scales its objectives alike; and those norms at the scaled `weights` (what
    `objective_gradient_norms` would log for this batch: a gradient is linear in its weight)."""
    with accelerator.autocast():
        norms = objective_gradient_norms(step, inputs, {name: 1.0 for name in weights})
    keys = sorted(norms)
    averaged = dict(zip(keys, accelerator.reduce(torch.tensor([norms[k] for k in keys], device=accelerator.device),
                                                 "mean").tolist()))
    scales = balance_scales(averaged)
    scaled = scaled_weights(weights, scales)
    return scales, {key: value * scaled[key.split("_")[1]] for key, value in averaged.items()}


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
    if config.train_windows == "prefixes":  # every training target once, predicted from the last state
        windows, _ = dataset.train_prefixes(config.max_len + 1)
        last = torch.arange(config.max_len).eq(config.max_len - 1)  # (max_len,): the last target slot only
        return torch.from_numpy(windows).long(), last.expand(len(windows), -1)
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
    # `objectives.balance = grad_norm`: the factor of each objective's weight, fixed on the first batch
    # (empty until then, and for a run without balancing).
    objective_scales: dict[str, float] = field(default_factory=dict)
    # Content items' DAP temperature (`calibrated_dap_temperature`), fixed on the first batch or taken
    # from --init; None until then, and for a run whose temperature is configured or 1 (ID items).
    dap_temperature: float | None = None

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
            optional = {"objective_scales", "dap_temperature"}  # newer than the first checkpoints
            state = from_dict(cls, {f.name: values[f.name] for f in fields(cls)
                                    if f.name in values or f.name not in optional}, where=str(path))  # types checked
            scales = state.objective_scales
            if not isinstance(scales, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                       and math.isfinite(v) and v > 0 for k, v in scales.items()):
                raise ValueError(f"objective_scales = {scales!r} must map objectives to positive numbers")
            temperature = state.dap_temperature
            if temperature is not None and not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
                raise ValueError(f"dap_temperature = {temperature!r} must be a positive number or null")
            return state
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


def _mixed_precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return setting


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    metrics: dict[str, dict[str, float]]  # split -> metric -> value, of the best epoch
    history: list[dict[str, Any]]


def run(config: TrainConfig, show_progress: bool = True,
        on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train (or resume) a run; returns the best epoch's valid and test metrics.

    `on_step(epoch, step)` (both counted from 0) is called after every optimizer step, e.g. to log or
    to stop the run from outside."""
    # The scheduler steps once per optimizer step, as warmup_steps counts them: accelerate's default
    # steps a prepared scheduler once per process per step, which ended warmup early under `launch`.
    config = with_init_model(config)
    run_dir = run_directory(config)
    require_installed(config.log_with)
    accelerator = Accelerator(mixed_precision=_mixed_precision(config.mixed_precision), cpu=use_cpu(),
                              step_scheduler_with_optimizer=False, log_with=list(config.log_with) or None,
                              project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                                  logging_dir=str(tracker_dir(run_dir))))
    set_seed(config.seed)
    checkpoints = run_dir / "checkpoints"
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, config)
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
    optimizer, scheduler = make_optimizer(model, config)
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

    weights = scaled_weights(weights, state.objective_scales)  # a resumed run keeps its first batch's scales
    training_step = accelerator.unwrap_model(step_module)
    training_step.weights = weights
    calibrate = training_step.calibrates
    state.dap_temperature = training_step.calibrated_temperature = starting_dap_temperature(state, training_step,
                                                                                            config)
    sequences, predict = training_sequences(dataset, config)
    if accelerator.is_main_process and s.transfer is not None:
        write_json(run_dir / "transfer.json", s.transfer)
    history = read_history(run_dir, state.epoch)
    needs_corruption = "nid" in weights or "rcl" in weights
    balance = config.objectives.balance == "grad_norm" and len(weights) > 1 and "dap" in weights
    eval_precision = "bf16" if accelerator.mixed_precision == "bf16" else "fp32"  # validation as it trains
    unwrapped = training_step.model
    # No-op unless config.log_with; each log call is flushed, so a run that stops keeps what it logged.
    trackers = RunTrackers(accelerator, config, run_dir)
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
            sequences, users, store, accelerator.device, corruption, generator, trim=trim_padding,
            predict=predict, uniform_negatives=uniform, read_states=not training_step.encodes_catalogue_once),
            enabled=config.prefetch)
        for step, (users, batch) in enumerate(zip(bar, prepared)):  # the batch is ready before its step
            inputs = step_inputs(batch, accelerator.device)
            if calibrate and state.dap_temperature is None:  # before the first step and before balancing
                state.dap_temperature = training_step.calibrated_temperature = calibrated_start(
                    training_step, inputs, accelerator)
                if accelerator.is_main_process and show_progress:
                    print(f"DAP temperature {state.dap_temperature:.4g} (sqrt(d) = {training_step.sqrt_d:.4g}), "
                          "fixed on the first batch")
            if balance and not state.objective_scales:  # before the first step: level every pull with DAP's
                state.objective_scales, grad_norms = balanced_start(training_step, inputs,
                                                                    accelerator, config.weights)
                weights = scaled_weights(config.weights, state.objective_scales)
                training_step.weights = weights
                if accelerator.is_main_process and show_progress:
                    print("objectives balanced on the first batch (objectives.balance = grad_norm): "
                          + ", ".join(f"{k} x{v:.3g}" for k, v in state.objective_scales.items()))
            elif step == 0:  # each objective's pull on the model, once per epoch (metrics.jsonl)
                with accelerator.autocast():
                    grad_norms = objective_gradient_norms(training_step, inputs)
            loss_value, losses = train_step(step_module, inputs, weights, accelerator, optimizer, scheduler,
                                            config.grad_clip)
            if not math.isfinite(loss_value):  # no step was taken
                raise PmmcacheError(
                    f"loss became {loss_value} at epoch {epoch + 1}, step {step + 1} "
                    f"({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}); stopped. "
                    f"The last good checkpoint is {ckpt.latest_checkpoint(checkpoints) or 'none (no epoch finished)'}. "
                    + nonfinite_loss_cause(batch, store, unwrapped, dataset.item_keys(), s.cache_path))
            trackers.log_step(epoch * len(batches) + step + 1, loss_value, losses)
            if on_step is not None:
                on_step(epoch, step)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            sums["loss"] = sums.get("loss", 0.0) + loss_value
            items_seen += batch.num_items * accelerator.num_processes
            bar.set_postfix(loss=f"{loss_value:.4f}", items_s=f"{items_seen / (time.perf_counter() - start):.0f}")
        bar.close()
        seconds = time.perf_counter() - start
        metrics = evaluate_splits(unwrapped, store, dataset, ("valid",), config.ks, config.max_len,
                                  config.mask_history, accelerator, precision=eval_precision)["valid"]
        epoch += 1
        state.epoch = epoch
        record = {"epoch": epoch, **{f"train_{k}": float(v) / max(1, len(batches)) for k, v in sums.items()},
                  **{f"valid_{k}": v for k, v in metrics.items()}, **grad_norms,
                  **{f"scale_{k}": v for k, v in state.objective_scales.items()},
                  **({"dap_temperature": training_step.dap_temperature} if "dap" in weights else {}),
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
        trackers.log_epoch(epoch * len(batches), record)
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
                            config.mask_history, accelerator, precision=eval_precision)
    popular = popularity_ranking(dataset, ("valid", "test"), config.ks, config.max_len, config.mask_history)
    if accelerator.is_main_process:
        write_json(run_dir / "eval.json", {"best_epoch": state.best_epoch, "metrics": final,
                                            "popularity_ranking": popular,
                                            "mask_history": config.mask_history, "dataset": config.dataset})
        if show_progress:
            print(format_with_popularity(final, popular, config.ks))
            print(f"best epoch {state.best_epoch}; run directory {run_dir}")
    accelerator.wait_for_everyone()
    trackers.finish()
    return TrainResult(run_dir=run_dir, best_epoch=state.best_epoch, metrics=final, history=history)


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


def _save_epoch(accelerator: Accelerator, model: PMMRec, run_dir: Path, state: TrainState, improved: bool,
                record: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Checkpoint the epoch (state for --resume; parts for best/), then drop all but the last two."""
    checkpoints = run_dir / "checkpoints"
    epoch = state.epoch
    target = ckpt.checkpoint_dir(checkpoints, epoch)
    if accelerator.is_main_process:
        ckpt.remove(target)  # a damaged one resume passed over: never mix its files with the new ones
    accelerator.wait_for_everyone()
    with ckpt.explain_disk_full(target, ckpt.latest_checkpoint(checkpoints)):
        _write_epoch(accelerator, model, run_dir, state, improved, record, history, target)
    accelerator.wait_for_everyone()


def _write_epoch(accelerator: Accelerator, model: PMMRec, run_dir: Path, state: TrainState, improved: bool,
                 record: dict[str, Any], history: list[dict[str, Any]], target: Path) -> None:
    """The files of one epoch's checkpoint, best/ when it improved, metrics.jsonl; then the seal."""
    checkpoints = run_dir / "checkpoints"
    epoch = state.epoch
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
