"""PMMRec (paper III-B): item tower + SASRec user encoder + noised-item-detection head, saved by part.

Each part is saved alone (`item_tower.safetensors`, `user_encoder.safetensors`, `nid_head.safetensors`
plus `config.json`), so the transfer settings of paper III-E load only what they transfer:
full (all parts), item encoders only ("item_tower"), user encoder only ("user_encoder").
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn

from pmmcache.cache import ItemStates
from pmmcache.config import from_dict, to_dict
from pmmcache.errors import ConfigError, PmmcacheError
from pmmcache.model.id_tower import IdItemTower
from pmmcache.model.item_tower import HEADS, ItemOutput, ItemTower, ItemTowerConfig
from pmmcache.model.user_encoder import UserEncoder, UserEncoderConfig

if TYPE_CHECKING:
    from pmmcache.encoders import TextEncoder, VisionEncoder

PARTS = ("item_tower", "user_encoder", "nid_head")
CONFIG_FILE = "config.json"
CHECKPOINT_KIND = "pmmcache.pmmrec.parts"
NID_CLASSES = 3  # unchanged / shuffled / replaced (eq. 10)


@dataclass(frozen=True)
class PMMRecConfig:
    """The stage-2 model: item tower, user encoder, and whether the NID classifier exists."""

    item_tower: ItemTowerConfig = field(default_factory=ItemTowerConfig)
    user_encoder: UserEncoderConfig = field(default_factory=UserEncoderConfig)
    nid_head: bool = True  # the NID classifier (pre-training); fine-tuning does not need it
    # "content": items from their text and image (PMMRec, MoRec++); "id": one learned embedding per
    # item (the SASRec baseline; item_tower then only gives d_model).
    items: Literal["content", "id"] = "content"
    num_items: int = 0  # catalogue size of an "id" model (set from the dataset at training time)

    def __post_init__(self) -> None:
        if self.num_items < 0:
            raise ConfigError(f"num_items = {self.num_items}; must be >= 0 (0 = the dataset's)")
        if self.item_tower.d_model != self.user_encoder.d_model:
            raise ConfigError(
                f"item_tower.d_model = {self.item_tower.d_model} and user_encoder.d_model = "
                f"{self.user_encoder.d_model} must be equal")


@dataclass(frozen=True)
class PartReport:
    """Keys a part's file and the model disagree on."""

    missing: list[str]  # in the model, not in the file
    unexpected: list[str]  # in the file, not in the model


class PMMRec(nn.Module):
    """Items (cached states) -> item vectors -> user states; see `build_pmmrec` to make one from encoders."""

    def __init__(
        self,
        config: PMMRecConfig,
        text_top: nn.Module | None = None,
        vision_top: nn.Module | None = None,
        *,
        d_text: int | None = None,
        d_vision: int | None = None,
        encoders: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.config = config
        self.encoders = encoders or {}  # JSON-able record of the encoders the top blocks came from
        if config.items == "id":
            users = config.user_encoder
            self.item_tower: ItemTower | IdItemTower = IdItemTower(
                config.num_items, config.item_tower.d_model, users.init_std if users.init == "normal" else None)
        else:
            self.item_tower = ItemTower(config.item_tower, text_top, vision_top, d_text=d_text, d_vision=d_vision)
            self.config = config = dataclasses.replace(config, item_tower=self.item_tower.config)  # "auto" decided
        self.user_encoder = UserEncoder(config.user_encoder)
        self.nid_head = nn.Linear(config.user_encoder.d_model, NID_CLASSES) if config.nid_head else None

    # ---- computation ---------------------------------------------------------------------------------
    def encode_items(self, states: ItemStates | Tensor) -> ItemOutput:
        """Cached states of N items (flat; item indices for an ID model) -> ItemOutput
        (vector, text_cls, image_cls, modality)."""
        return self.item_tower(states)

    def encode_users(self, item_vectors: Tensor, padding_mask: Tensor) -> Tensor:
        """item_vectors (B, L, d), padding_mask (B, L) bool True = padding -> user states (B, L, d)."""
        return self.user_encoder(item_vectors, padding_mask)

    def user_vectors(self, item_vectors: Tensor, padding_mask: Tensor) -> Tensor:
        """The user vector for ranking: the state at the last real position -> (B, d)."""
        return self.user_encoder.last_state(item_vectors, padding_mask)

    def detect_noise(self, user_states: Tensor) -> Tensor:
        """NID classifier hW + b on user states (B, L, d) -> (B, L, 3).

        Eq. 10's ReLU is applied by `objectives.nid_loss`, which takes these logits.
        """
        if self.nid_head is None:
            raise ConfigError("this model was built with nid_head = false; enable it for NID pre-training")
        return self.nid_head(user_states)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """"encoder_blocks" (pretrained top blocks) and "heads" (projections, fusion, user encoder, NID head)."""
        groups = self.item_tower.parameter_groups()
        for module in (self.user_encoder, self.nid_head):
            if module is not None:
                groups[HEADS] += [p for p in module.parameters() if p.requires_grad]
        return groups

    # ---- checkpoints by part -------------------------------------------------------------------------
    def part(self, name: str) -> nn.Module:
        """The submodule saved as part `name` (one of PARTS)."""
        if name not in PARTS:
            raise PmmcacheError(f"unknown model part {name!r}; parts are {', '.join(PARTS)}")
        module = getattr(self, name)
        if module is None:
            raise PmmcacheError(f"this model has no {name} (it was built with {name} = false)")
        return module

    def save_parts(self, directory: str | Path) -> Path:
        """Write each part as `<part>.safetensors` plus `config.json`, each file atomically; returns the dir."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in PARTS:
            module = getattr(self, name)
            if module is None:
                continue
            tensors = {key: value.detach().to("cpu").contiguous() for key, value in module.state_dict().items()}
            path = directory / f"{name}.safetensors"
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            save_file(tensors, str(tmp), metadata={"kind": CHECKPOINT_KIND, "part": name})
            os.replace(tmp, path)
        record = {"kind": CHECKPOINT_KIND, "config": to_dict(self.config), "encoders": self.encoders}
        path = directory / CONFIG_FILE
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return directory

    def load_parts(
        self,
        directory: str | Path,
        parts: Sequence[str] = ("item_tower", "user_encoder"),
        strict: bool = True,
        allow_unexpected: bool = False,
    ) -> dict[str, PartReport]:
        """Load the named parts from a `save_parts` directory; the other parts are left as they are.

        strict=True: any missing or unexpected key is a PmmcacheError naming them, raised before
        any part is loaded; `allow_unexpected` lets the file hold keys this model does not have
        (a single-modality model loading its tower from a multimodal run). strict=False: matching keys are loaded and the disagreements are
        returned for the caller to judge. A shape mismatch is always an error, also raised first.
        """
        directory = Path(directory)
        loaded: dict[str, tuple[nn.Module, dict[str, Tensor], PartReport]] = {}
        for name in parts:  # read and check every part first, so a bad one leaves the model untouched
            module = self.part(name)
            path = directory / f"{name}.safetensors"
            if not path.is_file():
                raise PmmcacheError(f"{path}: no saved {name} in {directory}")
            tensors = read_tensors(path)
            own = module.state_dict()
            expected = set(own)
            wrong_shape = [f"{key} {tuple(tensors[key].shape)} vs {tuple(own[key].shape)}"
                           for key in sorted(expected & set(tensors)) if tensors[key].shape != own[key].shape]
            if wrong_shape:
                raise PmmcacheError(f"{path} does not fit this model's {name}: shapes differ for {_preview(wrong_shape)}")
            report = PartReport(missing=sorted(expected - set(tensors)), unexpected=sorted(set(tensors) - expected))
            if strict and (report.missing or (report.unexpected and not allow_unexpected)):
                raise PmmcacheError(
                    f"{path} does not fit this model's {name}: missing {_preview(report.missing)}; "
                    f"unexpected {_preview(report.unexpected)}")
            loaded[name] = (module, tensors, report)
        for module, tensors, _ in loaded.values():
            module.load_state_dict(tensors, strict=False)  # keys and shapes were checked above
        return {name: report for name, (_, _, report) in loaded.items()}


def read_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file; a damaged or foreign file is a PmmcacheError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise PmmcacheError(f"{path}: not a readable safetensors file ({err}); it is damaged or was not written "
                            "by pmmcache") from err


def _preview(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_parts_config(directory: str | Path) -> tuple[PMMRecConfig, dict[str, Any]]:
    """The PMMRecConfig and the encoder record stored by `save_parts` in `directory`."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise PmmcacheError(f"{path}: not found; is {directory} a directory written by save_parts?")
    try:
        record = json.loads(path.read_text())
    except ValueError as err:  # also a UnicodeDecodeError
        raise PmmcacheError(f"{path}: not readable as JSON ({err}); the model parts' record is damaged") from err
    if not isinstance(record, dict) or record.get("kind") != CHECKPOINT_KIND:
        kind = record.get("kind") if isinstance(record, dict) else None
        raise PmmcacheError(f"{path}: kind {kind!r}, expected {CHECKPOINT_KIND!r}")
    config = record.get("config")
    if not isinstance(config, dict):
        raise PmmcacheError(f"{path}: its 'config' is not a table of model settings")
    tower = config.get("item_tower")
    if isinstance(tower, dict):  # settings added since: what a model saved before them computed
        tower = {"projection": "linear", "modality_vector": "cls" if tower.get("pooling", "cls") == "cls" else "mean",
                 **tower}
        config = {**config, "item_tower": tower}
    return from_dict(PMMRecConfig, config, where=str(path)), record.get("encoders", {})


def build_pmmrec(
    config: PMMRecConfig,
    text_encoder: "TextEncoder | None",
    vision_encoder: "VisionEncoder | None",
) -> PMMRec:
    """A PMMRec whose top blocks start from the loaded encoders' pretrained weights.

    The top modules are copied, so the model owns (and trains) its blocks and the encoders stay as
    loaded. Pass an encoder exactly for each modality in `config.item_tower.modalities`.
    """
    if config.items == "id":
        if text_encoder is not None or vision_encoder is not None:
            raise ConfigError("an ID-based model (items = id) uses no text or vision encoder")
        if config.num_items < 1:
            raise ConfigError("an ID-based model (items = id) needs num_items >= 1 (the catalogue size)")
        return PMMRec(config).train()
    modalities = config.item_tower.modalities
    for name, modality, encoder in (("text", "text", text_encoder), ("vision", "image", vision_encoder)):
        if (modality in modalities) != (encoder is not None):
            wanted = "needs" if modality in modalities else "does not use"
            raise ConfigError(f"item tower modalities {modalities}: the model {wanted} a {name} encoder")
    text_top = vision_top = None
    encoders: dict[str, Any] = {}
    if text_encoder is not None:
        text_top = copy.deepcopy(text_encoder.top_module()).requires_grad_(True)
        encoders["text"] = {"spec": to_dict(text_encoder.spec), "d_model": text_encoder.d_model,
                            "n_blocks": text_encoder.n_blocks, "split_index": text_encoder.split_index}
    if vision_encoder is not None:
        vision_top = copy.deepcopy(vision_encoder.top_module()).requires_grad_(True)
        encoders["vision"] = {"spec": to_dict(vision_encoder.spec), "d_model": vision_encoder.d_model,
                              "n_blocks": vision_encoder.n_blocks, "split_index": vision_encoder.split_index,
                              "num_tokens": vision_encoder.num_tokens}
    return PMMRec(
        config,
        text_top,
        vision_top,
        d_text=text_encoder.d_model if text_encoder is not None else None,
        d_vision=vision_encoder.d_model if vision_encoder is not None else None,
        encoders=encoders,
    ).train()  # the copied top blocks come from encoders held in eval mode
