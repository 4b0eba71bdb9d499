"""Item towers (paper III-B, eq. 1-3): top encoder blocks on cached states, projections, fusion.

Stage 1 cached the input of block n-k of each frozen encoder. Here the top k blocks run on those
states (trained), every token is projected to the model width d, and one Transformer block fuses
`[mm_cls; text tokens; image patches]` into the item vector e^cls:

    text states (N, L, d_text) --text_top--> (N, L, d_text) --text_proj--> (N, L, d) --┐
                                                                                       ├─ fusion ─► pool ─► (N, d)
    image states (N, P, d_vision) --vision_top--> (N, P, d_vision) --vision_proj--> (N, P, d) ┘

Choices (paper vs released code, ICDE24/PMMRec):
- pooling "cls": the fusion output at a learned `mm_cls` token (paper eq. 3). "mean": masked mean
  over every text and image token, with no `mm_cls` token in the sequence (released code).
  "modality_mean": the text tokens' mean and the image patches' mean, averaged, so the modality
  with more tokens (50 patches against ~12 words) does not swamp the other.
- The fusion block is post-LN, BERT style (GELU, LayerNorm eps 1e-12, init N(0, 0.02)), like the
  released code's merge-attention block and like the post-LN text encoders it sits on.
- `fuse_modality_cls`: True feeds each modality's own CLS token to the fusion too (released code
  fuses the whole last hidden state); False follows eq. 3 literally (t^1..t^p, v^1..v^q only).
- Missing modalities: a token of an unusable modality is masked out as a key (and zeroed), so an
  item without an image gets its vector from its text and vice versa.
- One modality only (paper III-E text-/vision-only): no fusion; the item vector is that
  modality's projected CLS t^cls / v^cls (`modality_vector = "cls"`, what the paper transfers and
  NICL aligns) or the masked mean of its projected tokens ("mean", released code).
- `projection = "mlp"` (the default when k = 0): a two-layer GELU adaptor instead of one linear
  map per token, since a linear map of frozen features is too weak an item model (MoRec's finding).
- `fusion = "concat"` is the MoRec++ baseline (paper IV-B): no token-level fusion; each modality is
  pooled alone (its projected CLS or token mean) and one linear layer maps the concatenation to d.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pmmcache.cache import ItemStates
from pmmcache.errors import CacheMismatchError, ConfigError

Modality = Literal["text", "image"]

ENCODER_BLOCKS = "encoder_blocks"  # parameter group: top blocks of the pretrained encoders
HEADS = "heads"  # parameter group: everything trained from scratch (projections, fusion, ...)


@dataclass(frozen=True)
class ItemTowerConfig:
    """Settings of the item side. `fusion_heads` must divide `d_model` (12 at d = 768: 64 per head, as BERT)."""

    d_model: int = 768  # d, the item vector width (and the user encoder's)
    fusion_heads: int = 12
    fusion_ffn: int | None = None  # FFN width of the fusion block; None = 4 * d_model
    dropout: float = 0.1
    # Item vector from the fusion output: "cls" = the mm_cls token (paper eq. 3); "mean" = the mean
    # over all text and image tokens (released code: with ~12 text tokens and 50 patches the image
    # dominates it); "modality_mean" = the mean of the text tokens' mean and the image tokens' mean
    # (each modality weighs half, however many tokens it has).
    pooling: Literal["cls", "mean", "modality_mean"] = "cls"
    # A single-modality item's vector (text- or vision-only, paper III-E): "cls" = the projected
    # t^cls / v^cls, the vectors NICL aligns and the paper transfers; "mean" = the mean of the
    # modality's projected tokens (released code; suits a frozen encoder trained for mean pooling).
    modality_vector: Literal["cls", "mean"] = "cls"
    modalities: tuple[Modality, ...] = ("text", "image")
    fuse_modality_cls: bool = True  # feed the text / image CLS tokens to the fusion block too
    # Layer-norm placement in the fusion block: False = post-LN (BERT, the released code); True =
    # pre-LN, whose residual path starts as the plain token mean and trains faster from few steps.
    fusion_norm_first: bool = False
    # "attention": PMMRec's merge-attention block over all tokens; "concat": MoRec++ late fusion.
    fusion: Literal["attention", "concat"] = "attention"
    # Per-token map from an encoder's width to d: "linear" (paper, released code) or "mlp"
    # (Linear -> GELU -> dropout -> Linear), an adaptor for frozen features that a linear map of a
    # frozen encoder cannot bend to the task. "auto": "mlp" when no encoder block is trained (k = 0),
    # else "linear"; stage 2 resolves it when the run is made, so saved configs hold the concrete choice.
    projection: Literal["auto", "linear", "mlp"] = "auto"
    projection_hidden: int | None = None  # hidden width of the "mlp" projection; None = 4 * d_model
    # Where a pooled item vector is projected (one modality with modality_vector "mean", or concat
    # fusion with token means): "tokens" = project every token, then average (released code);
    # "pooled" = average the encoder states, then project the mean (and the CLS, for t^cls / v^cls).
    # With a linear projection the two are the same vector and "pooled" is only cheaper (2 rows per
    # item instead of L); with the MLP adaptor "pooled" is the MLP of the frozen encoder's mean
    # embedding (how a mean-pooled sentence encoder is meant to be read), at 1/L of the cost.
    project: Literal["tokens", "pooled"] = "tokens"
    # The vision encoder's final norm (CLIP's post_layernorm) on every image token after the top blocks:
    # True = pmmcache's cache contract; False = the released code, whose cv_proj reads CLIP's
    # last_hidden_state, before that norm (import-checkpoint sets it, to compute what the released model did).
    vision_final_norm: bool = True

    def __post_init__(self) -> None:
        if self.d_model < 1:
            raise ConfigError(f"item_tower.d_model = {self.d_model}; must be positive")
        if self.fusion_heads < 1 or self.d_model % self.fusion_heads:
            raise ConfigError(f"item_tower.fusion_heads = {self.fusion_heads} must divide d_model = {self.d_model}")
        if self.fusion_ffn is not None and self.fusion_ffn < 1:
            raise ConfigError(f"item_tower.fusion_ffn = {self.fusion_ffn}; must be positive (or unset for 4 * d)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"item_tower.dropout = {self.dropout}; must be in [0, 1)")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"item_tower.modalities = {self.modalities}; name text and/or image, once each")
        unknown = set(self.modalities) - {"text", "image"}
        if unknown:
            raise ConfigError(f"item_tower.modalities: unknown {sorted(unknown)}; use text and/or image")
        if self.projection_hidden is not None and self.projection_hidden < 1:
            raise ConfigError(f"item_tower.projection_hidden = {self.projection_hidden}; must be positive")

    @property
    def ffn_size(self) -> int:
        return self.fusion_ffn if self.fusion_ffn is not None else 4 * self.d_model

    def resolved(self, top_blocks: int) -> "ItemTowerConfig":
        """This config with `projection = "auto"` decided for encoders with `top_blocks` trained blocks."""
        if self.projection != "auto":
            return self
        return dataclasses.replace(self, projection="mlp" if top_blocks == 0 else "linear")

    def check_project(self) -> None:
        """`project = "pooled"` fits only a tower that pools each modality's tokens by their mean.

        Checked when the tower is built, since a run's modalities are set after its item_tower section.
        """
        if self.project != "pooled":
            return
        if self.fuses and self.fusion == "attention":
            raise ConfigError("item_tower.project = pooled needs one modality or fusion = concat: "
                              "the attention fusion block reads every projected token")
        if self.pooled_how == "cls":
            raise ConfigError("item_tower.project = pooled averages the tokens, but this config takes the CLS "
                              "(modality_vector = cls with one modality, or pooling = cls with concat fusion); "
                              "set it to mean, or project = tokens")

    @property
    def pooled_how(self) -> str:
        """How a modality is pooled on its own (one modality, or concat fusion): "cls" or "mean"."""
        if self.fuses:
            return "cls" if self.pooling == "cls" else "mean"
        return self.modality_vector

    @property
    def fuses(self) -> bool:
        """Whether items are built by the fusion block (both modalities) or from one modality alone."""
        return len(self.modalities) == 2


@dataclass(frozen=True)
class ItemOutput:
    """What the item tower returns for N items."""

    vector: Tensor  # (N, d) item representation e^cls, fed to the user encoder and scored
    text_cls: Tensor | None  # (N, d) projected text CLS t^cls (for NICL), zeros where unusable; None without text
    image_cls: Tensor | None  # (N, d) projected image CLS v^cls (for NICL), zeros where unusable; None without image
    modality: Tensor  # (N, 2) bool [text usable, image usable]: where text_cls / image_cls mean something

    def rows(self, index: Tensor, keep: Tensor | None = None) -> "ItemOutput":
        """The items at `index` (M,) long, every field; rows where `keep` (M,) bool is False are zeroed
        (and not usable)."""
        def take(field: Tensor | None) -> Tensor | None:
            if field is None:
                return None
            picked = field[index]
            return picked if keep is None else picked * keep.view(-1, *([1] * (picked.dim() - 1))).to(picked.dtype)
        modality = self.modality[index] if keep is None else self.modality[index] & keep[:, None]
        return ItemOutput(vector=take(self.vector), text_cls=take(self.text_cls), image_cls=take(self.image_cls),
                          modality=modality)


@dataclass(frozen=True)
class ModalityTokens:
    """One modality after its top blocks and projection."""

    tokens: Tensor  # (N, T, d), zeros where the modality is unusable; (N, 1, d) = the CLS alone with project "pooled"
    keep: Tensor  # (N, T) bool: token may be attended to / pooled
    pooled: Tensor | None = None  # (N, d) projection of the masked mean state (project "pooled"), else None


def _ensure_one_key(keep: Tensor) -> Tensor:
    """`keep` (N, T) with position 0 switched on in rows that keep nothing, so attention stays finite."""
    first = torch.zeros_like(keep)
    first[:, 0] = True
    return keep | (first & ~keep.any(dim=1, keepdim=True))


def _first_weight(projection: nn.Module) -> Tensor:
    """The first weight of a projection (linear or MLP): where and in which dtype it computes."""
    return next(projection.parameters())


def masked_mean(tokens: Tensor, keep: Tensor) -> Tensor:
    """Mean of `tokens` (N, T, d) over positions where `keep` (N, T) is true -> (N, d); zeros if none."""
    weights = keep.to(tokens.dtype).unsqueeze(-1)  # (N, T, 1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class ItemTower(nn.Module):
    """Top encoder blocks + projections + fusion: cached ItemStates (N, ...) -> ItemOutput.

    `text_top(hidden (N, L, d_text), attention_mask (N, L)) -> (N, L, d_text)` and
    `vision_top(hidden (N, P, d_vision)) -> (N, P, d_vision)` are the standalone top-block modules
    of the pretrained encoders (`TextEncoder.top_module()`, `VisionEncoder.top_module()`).
    """

    def __init__(
        self,
        config: ItemTowerConfig,
        text_top: nn.Module | None = None,
        vision_top: nn.Module | None = None,
        *,
        d_text: int | None = None,
        d_vision: int | None = None,
    ):
        super().__init__()
        config.check_project()
        self.config = config
        self.has_text = "text" in config.modalities
        self.has_image = "image" in config.modalities
        d = config.d_model
        for name, wanted, top, width in (
            ("text", self.has_text, text_top, d_text),
            ("vision", self.has_image, vision_top, d_vision),
        ):
            if wanted and (top is None or width is None):
                raise ConfigError(f"item tower modalities {config.modalities} need {name}_top and d_{name}")
            if not wanted and top is not None:
                raise ConfigError(f"a {name} top module was given, but item tower modalities are {config.modalities}")
        self.d_text = d_text if self.has_text else None
        self.d_vision = d_vision if self.has_image else None

        if config.projection == "auto":  # frozen encoders (no trained top block) get the MLP adaptor
            trained = any(p.numel() for top in (text_top, vision_top) if top is not None for p in top.parameters())
            config = config.resolved(top_blocks=1 if trained else 0)
            self.config = config
        if self.has_text:
            self.text_top = text_top
            self.text_proj = self._projection(d_text)
        if self.has_image:
            self.vision_top = vision_top
            self.vision_proj = self._projection(d_vision)
        if config.fuses and config.fusion == "concat":
            self.concat_fusion = nn.Linear(2 * d, d)
        elif config.fuses:
            if config.pooling == "cls":
                self.mm_cls = nn.Parameter(torch.empty(1, 1, d))
            self.fusion = nn.TransformerEncoderLayer(
                d_model=d,
                nhead=config.fusion_heads,
                dim_feedforward=config.ffn_size,
                dropout=config.dropout,
                activation="gelu",
                layer_norm_eps=1e-12,
                norm_first=config.fusion_norm_first,
                batch_first=True,
            )
        self.reset_head_parameters()

    def _projection(self, width: int) -> nn.Module:
        """Token projection width -> d: one linear layer, or a two-layer GELU MLP (frozen features)."""
        d = self.config.d_model
        if self.config.projection == "linear":
            return nn.Linear(width, d)
        hidden = self.config.projection_hidden or 4 * d
        return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(self.config.dropout), nn.Linear(hidden, d))

    def reset_head_parameters(self) -> None:
        """Initialise what is trained from scratch (released code: xavier-normal projections, BERT-init fusion).

        The top blocks keep their pretrained weights.
        """
        for proj in (getattr(self, "text_proj", None), getattr(self, "vision_proj", None)):
            for layer in ([] if proj is None else [proj] if isinstance(proj, nn.Linear) else proj):
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_normal_(layer.weight)
                    nn.init.zeros_(layer.bias)
        if self.config.fuses and self.config.fusion == "concat":
            nn.init.xavier_normal_(self.concat_fusion.weight)
            nn.init.zeros_(self.concat_fusion.bias)
        elif self.config.fuses:
            if self.config.pooling == "cls":
                nn.init.normal_(self.mm_cls, std=0.02)
            for name, param in self.fusion.named_parameters():
                if name.startswith("norm") and name.endswith("weight"):
                    nn.init.ones_(param)
                elif name.endswith("bias"):
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, std=0.02)

    # ---- parameters ----------------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: "encoder_blocks" (pretrained top blocks) and "heads" (the rest).

        The released code puts weight decay 0.1 on the heads and 0 on the encoder blocks.
        """
        groups: dict[str, list[nn.Parameter]] = {ENCODER_BLOCKS: [], HEADS: []}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            is_block = name.startswith(("text_top.", "vision_top."))
            groups[ENCODER_BLOCKS if is_block else HEADS].append(param)
        return groups

    # ---- per modality --------------------------------------------------------------------------------
    def _usable(self, states: ItemStates, num_items: int, device: torch.device) -> Tensor:
        """(N, 2) bool [text usable, image usable]; a modality absent from the states is unusable."""
        if states.modality is not None:
            usable = states.modality.to(device=device, dtype=torch.bool).clone()
        else:
            usable = torch.ones(num_items, 2, dtype=torch.bool, device=device)
        if states.text is None:
            usable[:, 0] = False
        if states.image is None:
            usable[:, 1] = False
        return usable

    def _encode_text(self, states: ItemStates, usable: Tensor) -> ModalityTokens:
        weight = _first_weight(self.text_proj)
        hidden = states.text.to(device=weight.device, dtype=weight.dtype)  # (N, L, d_text)
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_text:
            raise CacheMismatchError(
                f"cached text states have shape {tuple(hidden.shape)}; the text tower expects (N, L, {self.d_text})")
        if states.text_mask is None:
            raise ValueError("text states come without their attention mask")
        token_mask = states.text_mask.to(device=weight.device, dtype=torch.bool)  # (N, L)
        # Rows with no token at all (the padding item) still get a key, so attention cannot go NaN.
        hidden = self.text_top(hidden, _ensure_one_key(token_mask).long())  # (N, L, d_text)
        return self._project(self.text_proj, hidden, token_mask & usable[:, None], usable)

    def _encode_image(self, states: ItemStates, usable: Tensor) -> ModalityTokens:
        weight = _first_weight(self.vision_proj)
        hidden = states.image.to(device=weight.device, dtype=weight.dtype)  # (N, P, d_vision)
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_vision:
            raise CacheMismatchError(
                f"cached image states have shape {tuple(hidden.shape)}; the vision tower expects (N, P, {self.d_vision})")
        if self.config.vision_final_norm:
            hidden = self.vision_top(hidden)  # (N, P, d_vision)
        else:
            hidden = self.vision_top(hidden, final_norm=False)  # (N, P, d_vision)
        keep = usable[:, None].expand(-1, hidden.shape[1])  # (N, P): every patch of a usable image
        return self._project(self.vision_proj, hidden, keep, usable)

    def _project(self, projection: nn.Module, hidden: Tensor, keep: Tensor, usable: Tensor) -> ModalityTokens:
        """States (N, T, width) -> ModalityTokens: every token projected, or (project "pooled") only
        the CLS and the masked mean state; unusable rows are zeros."""
        unusable = ~usable[:, None, None]  # (N, 1, 1)
        if self.config.project == "tokens":
            return ModalityTokens(projection(hidden).masked_fill(unusable, 0.0), keep)  # (N, T, d)
        both = projection(torch.stack([hidden[:, 0], masked_mean(hidden, keep)], dim=1))  # (N, 2, d)
        both = both.masked_fill(unusable, 0.0)
        return ModalityTokens(both[:, :1], keep[:, :1], pooled=both[:, 1])

    def encode_modalities(self, states: ItemStates) -> tuple[ModalityTokens | None, ModalityTokens | None, Tensor]:
        """Top blocks + projection per modality -> (text tokens or None, image tokens or None, usable (N, 2))."""
        present = states.text if states.text is not None else states.image
        if present is None:
            raise ValueError("item states hold neither text nor image states")
        device = _first_weight(self.text_proj if self.has_text else self.vision_proj).device
        usable = self._usable(states, present.shape[0], device)
        text = self._encode_text(states, usable[:, 0]) if self.has_text and states.text is not None else None
        image = self._encode_image(states, usable[:, 1]) if self.has_image and states.image is not None else None
        if text is None and image is None:
            raise ValueError(f"item states hold none of the tower's modalities {self.config.modalities}")
        return text, image, usable

    # ---- fusion --------------------------------------------------------------------------------------
    def fusion_sequence(
        self, text: ModalityTokens | None, image: ModalityTokens | None
    ) -> tuple[Tensor, Tensor]:
        """The fusion block's input [mm_cls ("cls" pooling only); text tokens; image tokens] and its keep mask.

        Returns tokens (N, T, d) and keep (N, T) bool (True = a real, usable token).
        """
        parts = [m for m in (text, image) if m is not None]
        start = self._first_fused
        tokens = [m.tokens[:, start:] for m in parts]
        keep = [m.keep[:, start:] for m in parts]
        if self.config.pooling == "cls":
            count = parts[0].tokens.shape[0]
            tokens.insert(0, self.mm_cls.to(parts[0].tokens.dtype).expand(count, -1, -1))  # (N, 1, d)
            keep.insert(0, torch.ones(count, 1, dtype=torch.bool, device=parts[0].keep.device))
        return torch.cat(tokens, dim=1), torch.cat(keep, dim=1)  # (N, T, d), (N, T)

    @property
    def _first_fused(self) -> int:
        """The first token of each modality that the fusion sees: 0, or 1 to leave out its CLS."""
        return 0 if self.config.fuse_modality_cls else 1

    def fuse(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """One fusion block over `tokens` (N, T, d) attending only to kept keys -> (N, T, d)."""
        return self.fusion(tokens, src_key_padding_mask=~_ensure_one_key(keep))

    def pool(self, fused: Tensor, keep: Tensor, text_tokens: int = 0) -> Tensor:
        """Item vectors (N, d) from fusion outputs (N, T, d): the mm_cls output, the masked token
        mean, or ("modality_mean") the average of the text part's and the image part's masked means,
        the first `text_tokens` positions being text; an item with one usable modality gets its mean."""
        if self.config.pooling == "cls":
            return fused[:, 0]
        if self.config.pooling == "mean":
            return masked_mean(fused, keep)
        parts = [(fused[:, :text_tokens], keep[:, :text_tokens]), (fused[:, text_tokens:], keep[:, text_tokens:])]
        means = [(masked_mean(tokens, kept), kept.any(dim=1, keepdim=True).to(fused.dtype))
                 for tokens, kept in parts if tokens.shape[1] > 0]
        present = sum(weight for _, weight in means).clamp(min=1.0)  # (N, 1): usable modalities
        return sum(mean * weight for mean, weight in means) / present

    def pool_modality(self, single: ModalityTokens, how: str) -> Tensor:
        """One modality's vector (N, d): its projected CLS ("cls") or its masked token mean ("mean")."""
        if how == "cls":
            return single.tokens[:, 0]
        return single.pooled if single.pooled is not None else masked_mean(single.tokens, single.keep)

    # ---- the tower -----------------------------------------------------------------------------------
    def forward(self, states: ItemStates) -> ItemOutput:
        """Cached states of N items (flat, de-duplicated by the caller) -> ItemOutput."""
        text, image, usable = self.encode_modalities(states)
        if self.config.fuses and self.config.fusion == "concat":
            how = self.config.pooled_how
            pooled = [self.pool_modality(m, how) if m is not None else None for m in (text, image)]
            present = next(p for p in pooled if p is not None)
            # A modality missing from the states counts as unusable: zeros, like an unusable one.
            pooled = [p if p is not None else torch.zeros_like(present) for p in pooled]
            vector = self.concat_fusion(torch.cat(pooled, dim=-1))  # (N, d)
        elif self.config.fuses:
            tokens, keep = self.fusion_sequence(text, image)  # (N, T, d), (N, T)
            text_tokens = tokens.shape[1] - (image.tokens.shape[1] - self._first_fused if image is not None else 0)
            vector = self.pool(self.fuse(tokens, keep), keep, text_tokens)  # (N, d)
        else:
            vector = self.pool_modality(text if text is not None else image, self.config.modality_vector)
        return ItemOutput(
            vector=vector,
            text_cls=text.tokens[:, 0] if text is not None else None,
            image_cls=image.tokens[:, 0] if image is not None else None,
            modality=usable,
        )
