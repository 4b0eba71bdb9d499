"""`pmmcache import-checkpoint`: the authors' pre-trained PMMRec checkpoint (ICDE24/PMMRec `epoch-N.pt`)
as a pmmcache run directory that `train --init` and `eval --run` take.

The released trainer saves `torch.save({"model_state_dict": model.module.state_dict(), "optimizer",
"rng_state", "cuda_rng_state", "scaler_state"})` (src/data_utils/utils.py). It is read with
`torch.load(weights_only=True)`: tensors and plain containers only, nothing unpickled that runs code.
Only `model_state_dict` is imported; its names are mapped onto pmmcache's parts by
`pmmcache.model.released_names` (table: docs/released-checkpoint.md).

The lower blocks are not imported (they live in the cache): they are compared with the encoders the
cache is made with, tensor by tensor, by fingerprint, and a difference is an error naming the tensors.
The imported item tower computes what the released one did: projections of every token, one post-LN
merge-attention block over [text tokens; image patches], the masked mean of its outputs
(`pooling = mean`), and no CLIP post_layernorm on the image tokens (`vision_final_norm = false`: the
released cv_proj reads CLIP's last_hidden_state; the post_layernorm weights are carried, unused).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pmmcache.config import from_dict, to_dict
from pmmcache.data.prepare import PrepareConfig
from pmmcache.encoders.config import EncoderConfig
from pmmcache.encoders.text import fingerprint_tensors
from pmmcache.errors import ConfigError, PmmcacheError
from pmmcache.files import replace_dir, write_json
from pmmcache.items import default_cache_dataset, find_cache
from pmmcache.model import PMMRecConfig, build_pmmrec
from pmmcache.model.released_names import (FUSION, TEXT, TEXT_PROJ, USER, VISION, VISION_PROJ, ImportReport,
                                           load_released, lower_tensors)
from pmmcache.run_config import TrainConfig
from pmmcache.runs import load_encoders


# ---------------------------------------------------------------- lower blocks: checked, not imported


def check_lower(tensors: dict[str, Tensor], text: Any, vision: Any) -> dict[str, str]:
    """Compare the checkpoint's lower blocks with the encoders', by fingerprint per modality; returns
    {modality: fingerprint}. A difference is a PmmcacheError naming the first tensors that differ."""
    fingerprints = {}
    for modality, encoder, prefix in (("text", text, TEXT), ("image", vision, VISION)):
        if encoder is None:
            continue
        wanted = {prefix + key: value for key, value in encoder.lower_named_tensors()}
        given = {key: tensors[key] for key in wanted if key in tensors}
        kind = {"kind": "pmmcache.released.lower", "modality": modality}
        mine = fingerprint_tensors(kind, [(k, v.float()) for k, v in wanted.items()])
        theirs = fingerprint_tensors(kind, [(k, v.float()) for k, v in given.items()])
        if mine != theirs:
            missing = sorted(set(wanted) - set(given))
            differ = sorted(k for k in given if given[k].shape != wanted[k].shape
                            or not torch.equal(given[k].float(), wanted[k].float()))
            raise PmmcacheError(
                f"the checkpoint's {modality} lower blocks are not those of the cache's {modality} encoder "
                f"({encoder.spec.name}, split at block {encoder.split_index}): "
                f"{len(differ)} tensors differ (e.g. {', '.join(differ[:3]) or 'none'}), {len(missing)} missing "
                f"(e.g. {', '.join(missing[:3]) or 'none'}); pass the encoder the checkpoint was trained from "
                "(--text-encoder / --vision-encoder) and the same -k")
        fingerprints[modality] = mine
    return fingerprints


# ---------------------------------------------------------------- reading the checkpoint


def read_checkpoint(path: Path) -> dict[str, Tensor]:
    """`model_state_dict` of a released checkpoint (or a bare state dict), read weights-only, with any
    DDP `module.` prefix dropped."""
    path = Path(path)
    if not path.is_file():
        raise PmmcacheError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several kinds; all mean "not loadable weights-only"
        lines = str(err).splitlines() or [""]
        detail = next((line.strip() for line in lines if "unsupported global" in line.lower()), lines[0])[:300]
        raise PmmcacheError(f"{path}: not loadable as plain tensors (torch.load weights_only=True: "
                            f"{type(err).__name__}: {detail}); pmmcache never unpickles a checkpoint in full") from err
    tensors = state.get("model_state_dict", state) if isinstance(state, dict) else None
    if not isinstance(tensors, dict) or not tensors or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise PmmcacheError(f"{path}: holds no 'model_state_dict' of tensors (keys: "
                            f"{', '.join(map(str, state)) if isinstance(state, dict) else type(state).__name__})")
    return {_canonical(key.removeprefix("module.")): value for key, value in tensors.items()}


def _canonical(key: str) -> str:
    """Released names as transformers 4 wrote them: its CLIPVisionModel nests the tower under
    `vision_model.`, which transformers 5 dropped from the state dict (a checkpoint saved under 5)."""
    image_net = "cv_encoder.image_net."
    if key.startswith(image_net) and not key.startswith(VISION):
        return VISION + key[len(image_net):]
    return key


def released_architecture(tensors: dict[str, Tensor], fusion_heads: int, user_heads: int,
                          dropout: float) -> PMMRecConfig:
    """The pmmcache model config the released checkpoint's shapes describe."""
    has_text, has_image = any(k.startswith(TEXT_PROJ) for k in tensors), any(k.startswith(VISION_PROJ) for k in tensors)
    if "id_encoder.weight" in tensors or not (has_text or has_image):
        raise PmmcacheError("the checkpoint is not a content-based PMMRec model (no text_proj / cv_proj); "
                            "ID-based released models do not transfer")
    fusion_layers = {k.split(".")[2] for k in tensors if k.startswith("fusion_module.MergeAtt_layers.")}
    if has_text and has_image and fusion_layers != {"0"}:
        found = sorted(k for k in tensors if k.startswith("fusion_module."))[:5]
        raise PmmcacheError(f"the checkpoint fuses with {len(fusion_layers)} merge-attention layers (fusion keys "
                            f"{', '.join(found) or 'none'}); pmmcache's item tower has one (fusion_method merge_attn, "
                            "num_merge_attn_fuse_layers 1)")
    d = (tensors[TEXT_PROJ + "weight"] if has_text else tensors[VISION_PROJ + "weight"]).shape[0]
    blocks = sorted({int(k.split(".")[3]) for k in tensors if k.startswith(USER + "transformer_blocks.")})
    if not blocks or USER + "position_embedding.weight" not in tensors:
        raise PmmcacheError("the checkpoint has no SASRec user encoder (user_encoder.transformer_encoder.*)")
    item_tower: dict[str, Any] = {
        "d_model": d, "fusion_heads": fusion_heads, "dropout": dropout, "pooling": "mean", "modality_vector": "mean",
        "modalities": [m for m, present in (("text", has_text), ("image", has_image)) if present],
        "fuse_modality_cls": True, "fusion_norm_first": False, "fusion": "attention", "projection": "linear",
        "vision_final_norm": False}
    if has_text and has_image:
        item_tower["fusion_ffn"] = tensors[FUSION + "inter.dense.weight"].shape[0]
    user = {"d_model": d, "n_blocks": len(blocks), "n_heads": user_heads, "dropout": dropout, "init": "xavier",
            "ffn": tensors[USER + "transformer_blocks.0.feed_forward.w_1.weight"].shape[0],
            "max_len": tensors[USER + "position_embedding.weight"].shape[0] + 1}
    return from_dict(PMMRecConfig, {"item_tower": item_tower, "user_encoder": user, "nid_head": False})


# ---------------------------------------------------------------- the verb


@dataclass(frozen=True)
class ImportConfig:
    """`pmmcache import-checkpoint`: a released checkpoint -> a run directory `train --init` accepts."""

    checkpoint: Path = Path("epoch-0.pt")
    run: Path = Path("runs/pmmrec-released")
    dataset: str = "demo"  # the dataset the run is evaluated on and whose cache it reads (and encoder defaults)
    data_dir: Path = Path("data")
    cache_dir: Path = Path("cache")
    data: PrepareConfig = field(default_factory=PrepareConfig)  # how the dataset is prepared (as for extract)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)  # those the cache is made with
    fusion_heads: int = 12  # the released fusion block's heads (its config is bert-base-uncased's: 12)
    user_heads: int = 2  # the released SASRec's num_attention_heads (default 2)
    dropout: float = 0.1  # the released drop_rate; matters only when the run is trained further

    def __post_init__(self) -> None:
        if self.fusion_heads < 1 or self.user_heads < 1:
            raise ConfigError(f"fusion_heads = {self.fusion_heads}, user_heads = {self.user_heads}: must be >= 1")


def _cache_of(config: ImportConfig, text: Any, vision: Any) -> str | None:
    """The cache these encoders made for the dataset (its manifest records the same lower blocks), if any."""
    try:
        return str(find_cache(Path(config.cache_dir), default_cache_dataset(config.dataset), text, vision))
    except PmmcacheError:
        return None  # not extracted yet: import can come first


def run(config: ImportConfig, show: Callable[[str], None] = print) -> ImportReport:
    """Read the checkpoint, check its lower blocks against the cache's encoders, map its parameters
    onto pmmcache's parts and write `config.run` (config.json, best/, import.json); returns the report."""
    run_dir = Path(config.run)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise PmmcacheError(f"run directory {run_dir} already exists; choose another --run")
    tensors = read_checkpoint(config.checkpoint)
    model_config = released_architecture(tensors, config.fusion_heads, config.user_heads, config.dropout)
    modalities = tuple(m for m in ("text", "image") if m in model_config.item_tower.modalities)
    encoders = EncoderConfig(**{**to_dict(config.encoders), "modalities": modalities})
    text, vision = load_encoders(encoders, config.dataset)
    if vision is not None and vision.source.get("library") != "transformers":
        raise PmmcacheError(f"the released model's images go through a transformers CLIPVisionModel; the vision encoder "
                            f"{vision.spec.name} is {vision.source.get('library')}'s: pass --vision-encoder DIR, a "
                            "local transformers CLIP checkpoint (clip-vit-base-patch32 in the released scripts)")
    fingerprints = check_lower(tensors, text, vision)
    cache = _cache_of(config, text, vision)
    model = build_pmmrec(model_config, text, vision)
    report = load_released(model, tensors, set(lower_tensors(text, vision)))
    report.lower_fingerprints = fingerprints
    train = TrainConfig(stage="finetune", dataset=config.dataset, data=config.data, data_dir=config.data_dir,
                        cache_dir=config.cache_dir,
                        runs_dir=run_dir.parent, run_name=run_dir.name, encoders=config.encoders, model=model.config,
                        max_len=model_config.user_encoder.max_len - 1, epochs=1)
    run_dir.mkdir(parents=True, exist_ok=True)
    replace_dir(run_dir / "best", model.save_parts)
    write_json(run_dir / "config.json", to_dict(train))
    write_json(run_dir / "import.json", {"checkpoint": str(Path(config.checkpoint).resolve()), "cache": cache,
                                         "config": to_dict(config), **to_dict(report)})
    show(f"imported {len(report.mapped)} tensors into {run_dir}/best (item_tower, user_encoder); "
         f"{len(report.lower)} lower-block tensors match the cache's encoders "
         f"({', '.join(f'{m} {f[:12]}' for m, f in fingerprints.items())})")
    show(f"the cache of these encoders: {cache}" if cache else f"no cache of these encoders for {config.dataset} in "
         f"{config.cache_dir} yet: run `pmmcache extract --dataset {config.dataset}` with the same options first")
    show(f"filled with zeros (the released model has no such parameter): {', '.join(report.filled) or 'none'}")
    for key, why in report.ignored.items():
        show(f"not imported: {key} ({why})")
    show(f"unmapped keys ({len(report.unmapped)}): {', '.join(report.unmapped) or 'none'}")
    show(f"fine-tune it with: pmmcache train --stage finetune --dataset {config.dataset} --init {run_dir} "
         "--transfer full|item|user (with the same encoder options)")
    return report
