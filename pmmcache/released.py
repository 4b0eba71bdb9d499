"""Import the authors' pre-trained PMMRec checkpoint (ICDE24/PMMRec `epoch-N.pt`) as a pmmcache run.

The released trainer saves `torch.save({"model_state_dict": model.module.state_dict(), "optimizer",
"rng_state", "cuda_rng_state", "scaler_state"})` (src/data_utils/utils.py). It is read with
`torch.load(weights_only=True)`: tensors and plain containers only, nothing unpickled that runs code.
Only `model_state_dict` is imported. The parameter names come from the released model code
(src/model/model.py `Model`, text_encoders.py, img_encoders.py, modules.py; the merge-attention block
of model/modeling.py, which src/model/model.py imports as `Attention_Fusion`). Two files are not in
the release as source: `src/model/Attention_Fusion.py` (assumed the same as model/modeling.py's
`MergedAttention`, which src/model/model.py builds with the same arguments) and
`src/model/user_encoders.py` (assumed to hold `self.transformer_encoder = TransformerEncoder(...)`
of src/model/modules.py, as in the same authors' other releases of this trainer). The full table is in
docs/released-checkpoint.md; in short (R = released name, P = pmmcache part.key):

    R text_encoder.bert_model.encoder.layer.<i>.*          P item_tower.text_top.blocks.<i>.*  (i >= n - k)
    R text_encoder.text_proj.*                             P item_tower.text_proj.*
    R cv_encoder.image_net.vision_model.encoder.layers.<i>.* P item_tower.vision_top.blocks.<i>.*
    R cv_encoder.image_net.vision_model.post_layernorm.*   P item_tower.vision_top.final_norm.*
    R cv_encoder.cv_proj.*                                 P item_tower.vision_proj.*
    R fusion_module.MergeAtt_layers.0.self_att.self.{query,key,value}  P item_tower.fusion.self_attn.in_proj_*
    R ....self_att.output.dense / .LayerNorm               P ...fusion.self_attn.out_proj / .norm1
    R ....inter.dense / .output.dense / .output.LayerNorm   P ...fusion.linear1 / .linear2 / .norm2
    R user_encoder.transformer_encoder.position_embedding  P user_encoder.position_embedding (rows 1..)
    R ....layer_norm                                       P user_encoder.input_norm
    R ....transformer_blocks.<i>.multi_head_attention.{w_Q,w_K,w_V}  P ...blocks.<i>.self_attn.in_proj_weight
    R ....multi_head_attention.fc / .layer_norm            P ...self_attn.out_proj.weight / .norm1
    R ....feed_forward.w_1 / .w_2 / .layer_norm            P ...linear1 / .linear2 / .norm2

The lower blocks (text embeddings + layers < n - k; CLIP embeddings, pre_layrnorm, layers < n - k)
are not imported: they live in the cache. They are compared with the encoders the cache is made
with, tensor by tensor, by fingerprint, and a difference is an error naming the tensors.
The imported item tower computes what the released one did: projections of every token, one post-LN
merge-attention block over [text tokens; image patches], the masked mean of its outputs
(`pooling = mean`), and no CLIP post_layernorm on the image tokens (`vision_final_norm = false`: the
released cv_proj reads CLIP's last_hidden_state; the post_layernorm weights are carried, unused).
What the released model has no parameter for is filled and reported: the user encoder's attention
biases (its Q/K/V/output maps have none) are 0, and position row 0 (pmmcache keeps one more
position than the history; a history of max_len items never reads row 0) is 0.
Not imported and reported: `fusion_module.token_type_embeddings` (the released forward computes the
typed tokens but fuses the untyped ones), the text pooler (the released item tower reads the last
hidden state), `position_ids` buffers. Any other key is listed as unmapped.
"""
from __future__ import annotations

import re
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
from pmmcache.model import PMMRec, PMMRecConfig, build_pmmrec
from pmmcache.run_config import TrainConfig
from pmmcache.runs import load_encoders

TEXT = "text_encoder.bert_model."
TEXT_PROJ = "text_encoder.text_proj."
VISION = "cv_encoder.image_net.vision_model."
VISION_PROJ = "cv_encoder.cv_proj."
FUSION = "fusion_module.MergeAtt_layers.0."
USER = "user_encoder.transformer_encoder."
IGNORED = {  # released keys that exist but carry nothing the released forward uses
    "fusion_module.token_type_embeddings.weight": "the released forward fuses the untyped tokens",
}
IGNORED_PREFIXES = {TEXT + "pooler.": "the released item tower reads the last hidden state, not the pooler"}
FUSION_NAMES = {  # pmmcache nn.TransformerEncoderLayer -> released BERT-style MergedAttBolck
    "self_attn.out_proj.": "self_att.output.dense.", "norm1.": "self_att.output.LayerNorm.",
    "linear1.": "inter.dense.", "linear2.": "output.dense.", "norm2.": "output.LayerNorm.",
}
USER_BLOCK_NAMES = {  # pmmcache nn.TransformerEncoderLayer -> released TransformerBlock (modules.py)
    "self_attn.out_proj.weight": "multi_head_attention.fc.weight", "norm1.": "multi_head_attention.layer_norm.",
    "linear1.": "feed_forward.w_1.", "linear2.": "feed_forward.w_2.", "norm2.": "feed_forward.layer_norm.",
}
QKV = (("query", "key", "value"), ("w_Q", "w_K", "w_V"))


@dataclass(frozen=True)
class Source:
    """Where one pmmcache tensor comes from: released keys joined along dim 0 (Q, K, V), position rows
    shifted by `skip_rows`, or (no keys) zeros: the released model has no such parameter."""

    keys: tuple[str, ...] = ()
    skip_rows: int = 0


def _rename(key: str, table: dict[str, str]) -> str | None:
    for mine, theirs in table.items():
        if key.startswith(mine):
            return theirs + key[len(mine):]
    return None


def item_tower_source(key: str) -> Source | None:
    """The released source of item_tower `key`; None when the key has none (unknown part)."""
    for pattern, released in ((r"text_top\.blocks\.(\d+)\.(.+)", TEXT + "encoder.layer.{0}.{1}"),
                              (r"vision_top\.blocks\.(\d+)\.(.+)", VISION + "encoder.layers.{0}.{1}"),
                              (r"vision_top\.final_norm\.(.+)", VISION + "post_layernorm.{0}"),
                              (r"text_proj\.(.+)", TEXT_PROJ + "{0}"), (r"vision_proj\.(.+)", VISION_PROJ + "{0}")):
        match = re.fullmatch(pattern, key)
        if match:
            return Source((released.format(*match.groups()),))
    if key.startswith("fusion.self_attn.in_proj_"):
        kind = key.rsplit("_", 1)[1]  # weight / bias
        return Source(tuple(f"{FUSION}self_att.self.{name}.{kind}" for name in QKV[0]))
    if key.startswith("fusion."):
        renamed = _rename(key[len("fusion."):], FUSION_NAMES)
        return Source((FUSION + renamed,)) if renamed else None
    return None


def user_encoder_source(key: str, rows: int) -> Source | None:
    """The released source of user_encoder `key` (`rows` = pmmcache positions); None when it has none."""
    if key == "position_embedding.weight":
        return Source((USER + "position_embedding.weight",), skip_rows=1)
    if key.startswith("input_norm."):
        return Source((USER + "layer_norm." + key[len("input_norm."):],))
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if not match:
        return None
    block, rest = USER + f"transformer_blocks.{match.group(1)}.", match.group(2)
    if rest == "self_attn.in_proj_weight":
        return Source(tuple(f"{block}multi_head_attention.{name}.weight" for name in QKV[1]))
    if rest in ("self_attn.in_proj_bias", "self_attn.out_proj.bias"):
        return Source()  # the released attention has no biases
    renamed = _rename(rest, USER_BLOCK_NAMES)
    return Source((block + renamed,)) if renamed else None


def part_sources(model: PMMRec) -> dict[tuple[str, str], Source]:
    """(part, key) -> its released source, for every tensor of the item tower and the user encoder."""
    rows = model.user_encoder.config.max_len
    sources: dict[tuple[str, str], Source] = {}
    for part, find in (("item_tower", item_tower_source), ("user_encoder", lambda k: user_encoder_source(k, rows))):
        for key in model.part(part).state_dict():
            source = find(key)
            if source is None:
                raise PmmcacheError(f"pmmcache's {part}.{key} has no place in the released model; import-checkpoint "
                                    "builds the released architecture (merge-attention fusion, mean pooling)")
            sources[part, key] = source
    return sources


def released_state_dict(model: PMMRec, lower: dict[str, Tensor]) -> dict[str, Tensor]:
    """`model` under the released names (the inverse of the import), plus the `lower` tensors (released
    names, from `lower_tensors`). A value the released model cannot hold (a non-zero attention bias or
    position row 0) is an error rather than lost."""
    out = dict(lower)
    for (part, key), source in part_sources(model).items():
        tensor = model.part(part).state_dict()[key].detach().cpu()
        if not source.keys:
            if tensor.any():
                raise PmmcacheError(f"{part}.{key} is not zero; the released model has no such parameter")
            continue
        if source.skip_rows:
            if tensor[: source.skip_rows].any():
                raise PmmcacheError(f"{part}.{key} rows < {source.skip_rows} are not zero; the released model has "
                                    "no such positions")
            tensor = tensor[source.skip_rows:]
        for name, piece in zip(source.keys, tensor.chunk(len(source.keys), dim=0)):
            out[name] = piece.clone()
    return out


# ---------------------------------------------------------------- lower blocks: checked, not imported


def lower_tensors(text: Any, vision: Any) -> dict[str, Tensor]:
    """The encoders' lower-block tensors under their released names."""
    out: dict[str, Tensor] = {}
    if text is not None:
        out.update({TEXT + key: value for key, value in text.lower_named_tensors()})
    if vision is not None:
        out.update({VISION + key: value for key, value in vision.lower_named_tensors()})
    return out


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


def _assemble(source: Source, tensors: dict[str, Tensor], like: Tensor) -> Tensor:
    if not source.keys:
        return torch.zeros_like(like)
    joined = torch.cat([tensors[k] for k in source.keys], dim=0) if len(source.keys) > 1 else tensors[source.keys[0]]
    if source.skip_rows:
        joined = torch.cat([torch.zeros_like(like[: source.skip_rows]), joined], dim=0)
    return joined.to(like.dtype)


@dataclass
class ImportReport:
    """What import-checkpoint did with every key of the checkpoint."""

    mapped: dict[str, list[str]] = field(default_factory=dict)  # pmmcache part.key -> released keys
    filled: list[str] = field(default_factory=list)  # pmmcache keys the released model has no value for (zeros)
    lower: list[str] = field(default_factory=list)  # released keys checked against the cache's encoders
    ignored: dict[str, str] = field(default_factory=dict)  # released key -> why it is not imported
    unmapped: list[str] = field(default_factory=list)  # released keys pmmcache has no place for
    lower_fingerprints: dict[str, str] = field(default_factory=dict)  # modality -> fingerprint of its lower blocks


def load_released(model: PMMRec, tensors: dict[str, Tensor], lower_keys: set[str]) -> ImportReport:
    """Copy the released tensors into `model`'s item tower and user encoder; shapes checked first, so
    a mismatch leaves the model as it was. Returns what happened to every checkpoint key."""
    report = ImportReport()
    values: dict[tuple[str, str], Tensor] = {}
    for (part, key), source in part_sources(model).items():
        own = model.part(part).state_dict()[key]
        absent = [k for k in source.keys if k not in tensors]
        if absent:
            raise PmmcacheError(f"the checkpoint lacks {', '.join(absent[:3])} (for pmmcache's {part}.{key}): a top "
                                "block of the encoders (check -k and the encoders) or a part the model needs")
        value = _assemble(source, tensors, own)
        if value.shape != own.shape:
            raise PmmcacheError(f"{', '.join(source.keys)} {tuple(value.shape)} does not fit pmmcache's {part}.{key} "
                                f"{tuple(own.shape)}")
        values[part, key] = value
        if source.keys:
            report.mapped[f"{part}.{key}"] = list(source.keys)
        else:
            report.filled.append(f"{part}.{key}")
        if source.skip_rows:
            report.filled.append(f"{part}.{key}[:{source.skip_rows}]")
    for part in ("item_tower", "user_encoder"):
        model.part(part).load_state_dict({k: v for (p, k), v in values.items() if p == part}, strict=True)
    used = {k for keys in report.mapped.values() for k in keys}
    for key in sorted(tensors):
        if key in used:
            continue
        if key in lower_keys:
            report.lower.append(key)
        elif key in IGNORED:
            report.ignored[key] = IGNORED[key]
        elif key.endswith("position_ids"):
            report.ignored[key] = "a buffer of positions, not a weight"
        elif any(key.startswith(p) for p in IGNORED_PREFIXES):
            report.ignored[key] = next(why for p, why in IGNORED_PREFIXES.items() if key.startswith(p))
        else:
            report.unmapped.append(key)
    return report


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
