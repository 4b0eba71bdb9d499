"""Runs: building a model, its dataset and its item store from a TrainConfig, loading a trained run,
transferring an earlier run's parts (`--init`), and the run directory's files.

`pmmcache.train` trains what `setup` builds; `pmmcache.evaluate` and `pmmcache.recommend` read what
`load_run` loads. Run directory `runs/<run>/`:
    config.json          the resolved TrainConfig (`with_init_model`), what every loader rebuilds from
    metrics.jsonl        one line per epoch (`read_history`)
    checkpoints/epoch-N  written by `pmmcache.train` (see pmmcache/checkpoints.py)
    best/                model parts of the best epoch (`best_dir`), loaded strictly
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from pmmcache.config import from_dict, load_file, to_dict
from pmmcache.data.registry import resolve_dataset
from pmmcache.encoders import TextEncoder, VisionEncoder
from pmmcache.encoders.config import MODALITIES, EncoderConfig, encoder_specs
from pmmcache.errors import ConfigError, DataError, PmmcacheError
from pmmcache.files import settle_dir, settled_dir, write_json
from pmmcache.items import (IdItems, ItemStore, default_cache_dataset, expected_manifest, find_cache,
                            open_item_store)
from pmmcache.model import PMMRec, PMMRecConfig, build_pmmrec
from pmmcache.model.pmmrec import read_parts_config
from pmmcache.run_config import TrainConfig
from pmmcache.runtime import use_cpu


def load_encoders(encoders: EncoderConfig, cache_dataset: str) -> tuple[TextEncoder | None, VisionEncoder | None]:
    """The encoders whose top blocks the model trains (same defaults as `pmmcache extract`)."""
    text_spec, vision_spec = encoder_specs(encoders, cache_dataset)
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


def init_dap_temperature(parts_dir: Path, default: float) -> float:
    """The DAP temperature the model in `parts_dir` (`resolve_init_dir`) was trained with: its best epoch's
    record (metrics.json, `dap_temperature`), or `default` (sqrt(d), what pmmcache used before it
    calibrated) for a model saved without one. A fine-tuning run keeps it: recalibrating a trained model
    would flatten the scores it learned."""
    path = Path(parts_dir) / "metrics.json"
    if not path.is_file():
        return default
    value = load_file(path).get("dap_temperature")  # a damaged file: a ConfigError naming it
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise PmmcacheError(f"{path}: dap_temperature = {value!r}; expected a positive number")
    return float(value)


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
        changes["encoders"] = to_dict(EncoderConfig())
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


def saved_settings(path: Path) -> dict[str, Any]:
    """A run's config.json as TrainConfig settings. `encoders.modalities`, which training once ignored
    (the model's modalities decide), is dropped: a run that recorded it still loads. Settings the run
    predates get the value it was trained with (`with_settings_it_predates`)."""
    data = load_file(path)
    if isinstance(data.get("encoders"), dict):
        data["encoders"] = {k: v for k, v in data["encoders"].items() if k != "modalities"}
    return with_settings_it_predates(data)


def with_settings_it_predates(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the settings added after it was written filled in as the run was really
    trained, where that is not today's default: `objectives.balance` (default grad_norm) did not exist,
    so a pre-training run with several objectives summed them by their weights alone ("none"). Elsewhere
    a missing setting counts as its default."""
    objectives = saved.get("objectives")
    if saved.get("stage", "pretrain") == "pretrain" and isinstance(objectives, dict) and "balance" not in objectives:
        weights = [objectives.get(name, 1.0) for name in ("dap", "nicl", "nid", "rcl")]
        if objectives.get("dap", 1.0) and sum(1 for w in weights if w) > 1:  # balancing would have changed it
            return {**saved, "objectives": {**objectives, "balance": "none"}}
    return saved


def trained_setup(run_dir: Path, device: torch.device, **changes: Any) -> Setup:
    """The best model of a finished run with its dataset and item store (for eval, recommend, export).

    `changes` override config fields (e.g. dataset, cache_dataset, storage). The architecture is the
    one saved in `run_dir/best`, and its parts load strictly: a key missing or left over is an error.
    """
    best = best_dir(run_dir)
    if not (best / "config.json").is_file():
        raise PmmcacheError(f"{run_dir} has no trained model (best/); train it first with `pmmcache train`")
    path = Path(run_dir) / "config.json"
    data = saved_settings(path)
    data.update({"init": None, "resume": False, "model": to_dict(read_parts_config(best)[0]), **changes})
    s = setup(from_dict(TrainConfig, data, where=str(path)), device)
    s.model.load_parts(best, parts=("item_tower", "user_encoder"))
    return s


def load_run(run_dir: Path, dataset: str | None = None, mask_history: bool = True,
             accelerator: Accelerator | None = None, storage: str | None = None,
             cache_dataset: str | None = None) -> tuple[Setup, Accelerator]:
    """A trained run's best model (on the device, in eval mode), item store and dataset, rebuilt from
    its config.json (`trained_setup`). `dataset` / `cache_dataset` read another dataset or cache than
    the run's; `storage` overrides where the cache is read from (memmap: no copy, for one pass)."""
    changes: dict[str, Any] = {"mask_history": mask_history}
    for name, value in (("dataset", dataset), ("storage", storage), ("cache_dataset", cache_dataset)):
        if value:
            changes[name] = value
    if dataset and not cache_dataset:  # another dataset's items are in its own cache, not the run's
        changes["cache_dataset"] = None
    accelerator = accelerator or Accelerator(cpu=use_cpu())
    s = trained_setup(Path(run_dir), accelerator.device, **changes)
    s.model.to(accelerator.device).eval()
    return s, accelerator


def setup(config: TrainConfig, device: torch.device) -> Setup:
    """The dataset, item store (the cache, checked against the encoders) and model `config` asks for;
    with `init`, the parts `transfer` names loaded from that run (`transfer_init`)."""
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
        wanted = set(model_config.item_tower.modalities)  # only the encoders of the model's modalities
        encoders = dataclasses.replace(config.encoders, modalities=tuple(m for m in MODALITIES if m in wanted))
        text, vision = load_encoders(encoders, cache_dataset)
        path = find_cache(Path(config.cache_dir), cache_dataset, text, vision)
        store = open_item_store(path, dataset, expected_manifest(text, vision), storage=config.storage,
                                device=device)
        model = build_pmmrec(model_config, text, vision)
    transfer = transfer_init(model, config) if config.init else None
    return Setup(config=config, dataset=dataset, store=store, model=model, cache_path=path, transfer=transfer)


def run_directory(config: TrainConfig) -> Path:
    name = config.run_name or f"{config.stage}-{config.dataset.replace('/', '_').replace(',', '+')}"
    return Path(config.runs_dir) / name


# Settings a resumed run may change: how long it goes on, how batches reach the step and where its curves go,
# not what it trains.
RESUMABLE_CHANGES = ("epochs", "patience", "resume", "prefetch", "log_with")


def prepare_run_dir(run_dir: Path, config: TrainConfig) -> None:
    config_path = run_dir / "config.json"
    if config.resume:
        if not config_path.is_file():
            raise PmmcacheError(f"--resume: no run at {run_dir} (no config.json)")
        # Through from_dict: settings added to TrainConfig after the run was made count as their defaults.
        saved = to_dict(from_dict(TrainConfig, saved_settings(config_path), where=str(config_path)))
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


def best_dir(run_dir: Path) -> Path:
    """The run's best/ model parts, also after a crash while they were being replaced."""
    found = settled_dir(Path(run_dir) / "best")
    if found is None:
        raise PmmcacheError(f"{run_dir} has no trained model (best/); train it first with `pmmcache train`")
    return found


def read_history(run_dir: Path, epochs_done: int) -> list[dict[str, Any]]:
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


