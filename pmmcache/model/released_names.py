"""The released PMMRec model's parameter names (ICDE24/PMMRec) and where they go in pmmcache's parts.

Built from the released model code: src/model/model.py (`Model`), text_encoders.py, img_encoders.py,
modules.py (`TransformerEncoder`), and the merge-attention block of model/modeling.py, which
src/model/model.py imports as `Attention_Fusion`. Two files are not in the release as source:
`src/model/Attention_Fusion.py` (assumed the same as model/modeling.py's `MergedAttention`, which
src/model/model.py builds with the same arguments) and `src/model/user_encoders.py` (assumed to hold
`self.transformer_encoder = TransformerEncoder(...)` of src/model/modules.py, as in the same authors'
other releases of this trainer). The full table is in docs/released-checkpoint.md; in short
(R = released name, P = pmmcache part.key):

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
live in the cache, not in the parts: `lower_tensors` names the encoders' under the released names.
What the released model has no parameter for is filled and reported: the user encoder's attention
biases (its Q/K/V/output maps have none) are 0, and position row 0 (pmmcache keeps one more position
than the history; a history of max_len items never reads row 0) is 0.
Not imported and reported: `fusion_module.token_type_embeddings` (the released forward computes the
typed tokens but fuses the untyped ones), the text pooler (the released item tower reads the last
hidden state), `position_ids` buffers. Any other key is listed as unmapped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pmmcache.errors import PmmcacheError
from pmmcache.model.pmmrec import PMMRec

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


def lower_tensors(text: Any, vision: Any) -> dict[str, Tensor]:
    """The encoders' lower-block tensors under their released names."""
    out: dict[str, Tensor] = {}
    if text is not None:
        out.update({TEXT + key: value for key, value in text.lower_named_tensors()})
    if vision is not None:
        out.update({VISION + key: value for key, value in vision.lower_named_tensors()})
    return out


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
