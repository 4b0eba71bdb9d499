"""Vision encoder (a CLIP ViT from open_clip or transformers), split at a named block.

lower = patch embedding + class token + positions + pre-norm + blocks [0, n-k)   (frozen, stage 1)
top   = blocks [n-k, n) + final norm (open_clip `ln_post`, transformers `post_layernorm`) on every token
CLIP applies its final norm only after the last block, so it belongs to the top part for every k
(for k = 0 the top is the final norm alone). Output: (B, P, d) with P = patches + CLS.

Sources, chosen by `VisionEncoderSpec.name`:
- "pmmcache-tiny-vit": a tiny open_clip VisionTransformer (width 64, 4 blocks, 4 heads, patch 32) for demos/tests;
- a local dir holding a transformers CLIPVisionModel or CLIPModel checkpoint (or a cached hub id of one);
  `weights` "random" re-initialises it from its config (seeded), "openai"/"checkpoint" use the dir's weights;
- an open_clip architecture name ("ViT-B-32"), with `weights` an open_clip tag, a weights file, or "random".
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from pmmcache.config import to_dict
from pmmcache.encoders.hub import read_hf_config, resolve_hf_model_dir, resolve_open_clip_weights
from pmmcache.encoders.text import architecture_of, fingerprint_tensors
from pmmcache.errors import ConfigError, PmmcacheError

TINY_VIT_NAME = "pmmcache-tiny-vit"
TINY_VIT_CONFIG = {"patch_size": 32, "width": 64, "layers": 4, "heads": 4, "mlp_ratio": 4.0}

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Keys of `VisionEncoder.source` that say where files are, not what lower() computes.
_LOCATION_KEYS = ("weights_file", "resolved_path", "pretrained")
# `weights` values that, for a transformers checkpoint dir, mean "the weights stored in the dir".
_CHECKPOINT_WEIGHTS = ("openai", "checkpoint")


@dataclass(frozen=True)
class VisionEncoderSpec:
    """What the cache manifest records about the vision encoder."""

    name: str = "ViT-B-32"  # open_clip architecture, transformers CLIP dir (or cached hub id), or TINY_VIT_NAME
    weights: str = "openai"  # open_clip tag, weights file, or "random" (seeded init); see module docstring
    top_blocks: int = 2  # k: blocks trained in stage 2
    image_size: int = 224
    seed: int = 0  # random init: same seed -> identical weights -> same fingerprint


# ---- preprocessing -----------------------------------------------------------------------------------

_PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class ImagePreprocessing:
    """PIL image -> normalised (3, S, S) tensor, the way the encoder was trained to see images."""

    size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resize_mode: str = "shortest"  # "shortest": shorter side to size, then center crop; "squash": to size x size
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "squash"):
            raise PmmcacheError(f"unsupported image resize mode {self.resize_mode!r} (shortest, squash)")
        if self.interpolation not in _PIL_RESAMPLE:
            raise PmmcacheError(f"unsupported image interpolation {self.interpolation!r} ({', '.join(_PIL_RESAMPLE)})")

    def resize(self, image: Image.Image) -> Image.Image:
        """RGB image of exactly size x size."""
        image = image.convert("RGB")
        resample = _PIL_RESAMPLE[self.interpolation]
        size = self.size
        if self.resize_mode == "squash":
            return image.resize((size, size), resample)
        width, height = image.size
        if width <= height:
            new_width, new_height = size, int(size * height / width)
        else:
            new_width, new_height = int(size * width / height), size
        image = image.resize((new_width, new_height), resample)
        left = int(round((new_width - size) / 2.0))
        top = int(round((new_height - size) / 2.0))
        return image.crop((left, top, left + size, top + size))

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        """A list of PIL images -> (B, 3, S, S) float32."""
        return self.normalize(self.to_uint8(images))

    def to_uint8(self, images: Sequence[Image.Image]) -> Tensor:
        """A list of PIL images -> (B, 3, S, S) uint8, resized and cropped: a quarter of the float bytes,
        so loader processes hand this over and the extraction process normalises it on its device."""
        arrays = [np.asarray(self.resize(image), dtype=np.uint8) for image in images]  # (S, S, 3) each
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, S, S)

    def normalize(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) uint8 -> float32 scaled to [0, 1] and standardised, on the tensor's device."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def resize_tensor(self, image: Tensor) -> Tensor:
        """(3, H, W) uint8 on any device (an image decoded there) -> (3, S, S) uint8, with the geometry of
        `resize` (shorter side to S then centre crop, or squash) and torch's antialiased interpolation,
        which differs from PIL's by about one grey level per pixel."""
        size = self.size
        height, width = image.shape[1:]
        if self.resize_mode == "squash":
            new_height, new_width = size, size
        elif width <= height:
            new_width, new_height = size, int(size * height / width)
        else:
            new_width, new_height = int(size * width / height), size
        resized = torch.nn.functional.interpolate(image[None].float(), size=(new_height, new_width),
                                                  mode=self.interpolation, antialias=True, align_corners=False)[0]
        left = int(round((new_width - size) / 2.0))
        top = int(round((new_height - size) / 2.0))
        return resized[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)

    def describe(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "resize_mode": self.resize_mode,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }


# ---- the standalone top ------------------------------------------------------------------------------


class VisionTopBlocks(nn.Module):
    """The top k blocks + final norm of a ViT as a standalone module: m(hidden (B, P, d)) -> (B, P, d).

    state_dict keys are `blocks.<i>.<library block key>` (i = index in the full encoder) and `final_norm.*`.
    """

    def __init__(self, blocks: dict[int, nn.Module], final_norm: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleDict({str(index): block for index, block in blocks.items()})
        self.final_norm = final_norm

    @staticmethod
    def run_block(block: nn.Module, hidden: Tensor) -> Tensor:
        """One block of this library: (B, P, d) -> (B, P, d)."""
        raise NotImplementedError

    def forward(self, hidden: Tensor, final_norm: bool = True) -> Tensor:
        """hidden (B, P, d) -> (B, P, d); `final_norm=False` stops before the final norm (the released
        PMMRec code reads CLIP's last_hidden_state, which transformers leaves un-normalised)."""
        for block in self.blocks.values():
            hidden = self.run_block(block, hidden)  # (B, P, d)
        return self.final_norm(hidden) if final_norm else hidden  # (B, P, d)


class OpenClipTopBlocks(VisionTopBlocks):
    @staticmethod
    def run_block(block: nn.Module, hidden: Tensor) -> Tensor:
        return block(hidden)  # batch-first residual attention block, no mask


class ClipTopBlocks(VisionTopBlocks):
    @staticmethod
    def run_block(block: nn.Module, hidden: Tensor) -> Tensor:
        return block(hidden, None)  # CLIPEncoderLayer(hidden, attention_mask): images attend to every token


# ---- the encoder -------------------------------------------------------------------------------------


class VisionEncoder(nn.Module):
    """A ViT split into lower (frozen, cached) and top (trained) blocks. Build with `VisionEncoder.load`."""

    top_class: type[VisionTopBlocks] = VisionTopBlocks

    def __init__(
        self,
        spec: VisionEncoderSpec,
        tower: nn.Module,
        preprocessing: ImagePreprocessing,
        source: dict[str, Any],
    ):
        super().__init__()
        self.spec = spec
        self.tower = tower
        self.preprocessing = preprocessing
        self.source = source  # JSON-able: library, architecture config, where the weights came from
        self.n_blocks: int = len(self.blocks)
        if not 0 <= spec.top_blocks <= self.n_blocks:
            raise ConfigError(
                f"vision top_blocks = {spec.top_blocks}, but {spec.name} has {self.n_blocks} blocks "
                f"(allowed 0..{self.n_blocks})"
            )

    @classmethod
    def load(cls, spec: VisionEncoderSpec) -> "VisionEncoder":
        """Build the encoder named by `spec` on the CPU in fp32; never downloads (see module docstring)."""
        if spec.name == TINY_VIT_NAME:
            return OpenClipVisionEncoder.build_tiny(spec)
        if Path(spec.name).expanduser().is_dir():
            model_dir = resolve_hf_model_dir(spec.name, what="vision encoder", option="--vision-encoder")
            return ClipVisionEncoder.from_dir(spec, model_dir)

        import open_clip

        arch = spec.name.replace("/", "-")  # open_clip accepts "ViT-B/32" for "ViT-B-32"
        if arch in open_clip.list_models():
            return OpenClipVisionEncoder.build(spec, arch)
        if "/" in spec.name:  # a hub id: a transformers CLIP checkpoint, if cached
            model_dir = resolve_hf_model_dir(spec.name, what="vision encoder", option="--vision-encoder")
            return ClipVisionEncoder.from_dir(spec, model_dir)
        raise PmmcacheError(
            f"unknown vision encoder {spec.name!r}: pass --vision-encoder with an open_clip architecture "
            f"(e.g. ViT-B-32), a local transformers CLIP dir, or {TINY_VIT_NAME}"
        )

    # ---- what each library provides -------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def embed(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) -> (B, P, d): patches + CLS + positions, pre-norm applied."""
        raise NotImplementedError

    def reference_forward(self, pixels: Tensor) -> Tensor:
        """The library's own unsplit forward, final norm on all tokens: (B, 3, H, W) -> (B, P, d)."""
        raise NotImplementedError

    def is_lower_key(self, key: str) -> bool:
        """Whether a `tower.state_dict()` key is read by lower()."""
        raise NotImplementedError

    @property
    def d_model(self) -> int:
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        raise NotImplementedError

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def split_index(self) -> int:
        """n - k: index of the first top block."""
        return self.n_blocks - self.spec.top_blocks

    @property
    def num_tokens(self) -> int:
        """P = patches + CLS, e.g. 50 for ViT-B/32 at 224."""
        return (self.preprocessing.size // self.patch_size) ** 2 + 1

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    # ---- images ------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images -> (B, 3, S, S) float32 with this model's resize, crop and mean/std."""
        return self.preprocessing(images)

    def preprocessing_description(self) -> dict[str, Any]:
        return self.preprocessing.describe()

    # ---- the split ---------------------------------------------------------------------------------
    def lower(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) -> (B, P, d): the input of block n-k."""
        hidden = self.embed(pixels.to(self.dtype))  # (B, P, d)
        for block in self.blocks[: self.split_index]:
            hidden = self.top_class.run_block(block, hidden)  # (B, P, d)
        return hidden

    def top_module(self) -> VisionTopBlocks:
        """The top k blocks + final norm as a standalone module sharing this encoder's parameters."""
        chosen = {index: self.blocks[index] for index in range(self.split_index, self.n_blocks)}
        return self.top_class(chosen, self.final_norm)

    def top(self, hidden: Tensor) -> Tensor:
        """hidden (B, P, d) from lower() -> final token states (B, P, d), final norm on every token."""
        return self.top_module()(hidden)

    def forward(self, pixels: Tensor) -> Tensor:
        """The unsplit encoder through the library's own code (reference path): (B, 3, H, W) -> (B, P, d)."""
        return self.reference_forward(pixels.to(self.dtype))

    # ---- identity ----------------------------------------------------------------------------------
    def lower_named_tensors(self) -> list[tuple[str, Tensor]]:
        """Every parameter and persistent buffer that lower() reads, with the library's key names."""
        return [(key, value) for key, value in self.tower.state_dict().items() if self.is_lower_key(key)]

    def lower_fingerprint(self) -> str:
        """sha256 over the architecture, split point, preprocessing and every tensor lower() reads."""
        architecture = {
            "kind": "pmmcache.vision.lower",
            "source": {key: value for key, value in self.source.items() if key not in _LOCATION_KEYS},
            "split_index": self.split_index,
            "preprocessing": self.preprocessing.describe(),
        }
        return fingerprint_tensors(architecture, self.lower_named_tensors())

    def describe(self) -> dict[str, Any]:
        """JSON-ready record for the cache manifest."""
        return {
            "spec": to_dict(self.spec),
            **self.source,
            "n_blocks": self.n_blocks,
            "d_model": self.d_model,
            "num_tokens": self.num_tokens,
            "split_index": self.split_index,
            "dtype": str(self.dtype).removeprefix("torch."),
            "preprocessing": self.preprocessing.describe(),
            "lower_fingerprint": self.lower_fingerprint(),
        }


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a random init without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class OpenClipVisionEncoder(VisionEncoder):
    """open_clip `VisionTransformer`: conv1, class_embedding, positional_embedding, ln_pre,
    transformer.resblocks, ln_post (the projection `proj` is not used: fusion has its own)."""

    top_class = OpenClipTopBlocks

    def __init__(self, spec, tower, preprocessing, source):
        from open_clip.transformer import VisionTransformer

        if not isinstance(tower, VisionTransformer):
            raise PmmcacheError(f"{spec.name}: only open_clip ViTs can be split, not {type(tower).__name__}")
        if tower.attn_pool is not None:
            raise PmmcacheError(f"{spec.name}: ViTs with attentional pooling are not supported")
        if not tower.transformer.batch_first:
            raise PmmcacheError(f"{spec.name}: expected a batch-first open_clip transformer")
        super().__init__(spec, tower, preprocessing, source)

    @classmethod
    def build_tiny(cls, spec: VisionEncoderSpec) -> "OpenClipVisionEncoder":
        """The tiny demo ViT: random (seeded) init, or a file holding its state_dict."""
        from open_clip.transformer import VisionTransformer

        if spec.weights in _CHECKPOINT_WEIGHTS:
            raise PmmcacheError(
                f"{TINY_VIT_NAME} has no pretrained weights; pass --vision-weights random or a weights file"
            )
        config = dict(TINY_VIT_CONFIG, image_size=spec.image_size)
        with _seeded(spec.seed):
            tower = VisionTransformer(**config, output_dim=TINY_VIT_CONFIG["width"])
        weights_file = resolve_open_clip_weights(TINY_VIT_NAME, spec.weights)
        if weights_file is not None:
            tower.load_state_dict(_read_state_dict(weights_file), strict=True)
        source = {
            "library": "open_clip",
            "architecture": TINY_VIT_NAME,
            "vision_cfg": config,
            "pretrained": weights_file is not None,
            "weights_file": str(weights_file.resolve()) if weights_file else None,
        }
        return cls(spec, tower.eval(), ImagePreprocessing(size=spec.image_size), source)

    @classmethod
    def build(cls, spec: VisionEncoderSpec, arch: str) -> "OpenClipVisionEncoder":
        """An open_clip architecture with tag / file / seeded random weights; only its visual tower is kept."""
        import open_clip

        weights_file = resolve_open_clip_weights(arch, spec.weights)
        tag_cfg = open_clip.get_pretrained_cfg(arch, spec.weights) if weights_file is not None else {}
        model_cfg = open_clip.get_model_config(arch)
        quick_gelu = bool(tag_cfg.get("quick_gelu", model_cfg.get("quick_gelu", False)))
        vision_cfg = dict(model_cfg["vision_cfg"], image_size=spec.image_size)
        try:
            with _seeded(spec.seed):
                model = open_clip.create_model(
                    arch,
                    pretrained=str(weights_file) if weights_file else None,
                    force_quick_gelu=quick_gelu,
                    force_image_size=spec.image_size,
                    precision="fp32",
                    device="cpu",
                )
        except RuntimeError as err:  # e.g. a weights file for another architecture
            raise PmmcacheError(f"cannot build open_clip {arch} with weights {spec.weights!r}: {err}") from err
        tower = model.visual
        defaults = getattr(tower, "preprocess_cfg", {})
        preprocessing = ImagePreprocessing(
            size=spec.image_size,
            mean=tuple(tag_cfg.get("mean", defaults.get("mean", OPENAI_CLIP_MEAN))),
            std=tuple(tag_cfg.get("std", defaults.get("std", OPENAI_CLIP_STD))),
            resize_mode=tag_cfg.get("resize_mode", defaults.get("resize_mode", "shortest")),
            interpolation=tag_cfg.get("interpolation", defaults.get("interpolation", "bicubic")),
        )
        source = {
            "library": "open_clip",
            "architecture": arch,
            "vision_cfg": vision_cfg,
            "quick_gelu": quick_gelu,
            "pretrained": weights_file is not None,
            "weights_file": str(weights_file.resolve()) if weights_file else None,
        }
        return cls(spec, tower.eval(), preprocessing, source)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.tower.transformer.resblocks

    @property
    def final_norm(self) -> nn.Module:
        return self.tower.ln_post

    @property
    def d_model(self) -> int:
        return self.tower.transformer.width

    @property
    def patch_size(self) -> int:
        return self.tower.patch_size[0]

    def embed(self, pixels: Tensor) -> Tensor:
        # Patch dropout (a training-time augmentation) is left out: the cache must hold every patch.
        tower = self.tower
        patches = tower.conv1(pixels)  # (B, d, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, P-1, d)
        cls_token = tower.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)  # (B, 1, d)
        tokens = torch.cat([cls_token, patches], dim=1) + tower.positional_embedding.to(patches.dtype)  # (B, P, d)
        return tower.ln_pre(tokens)

    def reference_forward(self, pixels: Tensor) -> Tensor:
        if self.n_blocks == 0:
            raise PmmcacheError("a ViT without blocks has no reference forward")
        out = self.tower.forward_intermediates(
            pixels,
            indices=[self.n_blocks - 1],
            normalize_intermediates=True,  # ln_post on every token of the last block's output
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        cls_token = out["image_intermediates_prefix"][0]  # (B, 1, d)
        return torch.cat([cls_token, out["image_intermediates"][0]], dim=1)  # (B, P, d)

    def is_lower_key(self, key: str) -> bool:
        if key in ("class_embedding", "positional_embedding") or key.startswith(("conv1.", "ln_pre.")):
            return True
        return any(key.startswith(f"transformer.resblocks.{i}.") for i in range(self.split_index))


class ClipVisionEncoder(VisionEncoder):
    """transformers `CLIPVisionModel`: embeddings, pre_layrnorm, encoder.layers, post_layernorm."""

    top_class = ClipTopBlocks

    @classmethod
    def from_dir(cls, spec: VisionEncoderSpec, model_dir: Path) -> "ClipVisionEncoder":
        """Load a CLIPVisionModel or the vision tower of a CLIPModel from a local checkpoint dir."""
        from transformers import CLIPModel, CLIPVisionModel

        config = read_hf_config(model_dir, "vision encoder")
        if config.model_type not in ("clip", "clip_vision_model"):
            raise PmmcacheError(
                f"vision encoder dir {model_dir} holds a {config.model_type!r} model; expected a transformers "
                "CLIP (CLIPVisionModel or CLIPModel) checkpoint"
            )
        vision_config = config.vision_config if config.model_type == "clip" else config
        if vision_config.image_size != spec.image_size:
            raise ConfigError(
                f"vision image_size = {spec.image_size}, but {model_dir} was built for {vision_config.image_size}"
            )
        if spec.weights == "random":
            with _seeded(spec.seed):
                tower = CLIPVisionModel(vision_config)
        elif spec.weights in _CHECKPOINT_WEIGHTS:
            model_class = CLIPModel if config.model_type == "clip" else CLIPVisionModel
            model, loading = model_class.from_pretrained(
                model_dir, local_files_only=True, dtype=torch.float32, output_loading_info=True
            )
            if loading["missing_keys"]:  # these would silently be random: refuse
                raise PmmcacheError(f"{model_dir} lacks weights for {', '.join(sorted(loading['missing_keys'])[:5])}")
            tower = model.vision_model if config.model_type == "clip" else model
        else:
            raise PmmcacheError(
                f"vision weights {spec.weights!r} do not apply to a transformers CLIP dir; pass "
                "--vision-weights random, or leave the default to use the dir's own weights"
            )
        source = {
            "library": "transformers",
            "architecture": config.model_type,
            "config": architecture_of(vision_config),
            "pretrained": spec.weights != "random",
            "resolved_path": str(Path(model_dir).resolve()),
        }
        return cls(spec, tower.eval(), _hf_preprocessing(model_dir, spec.image_size), source)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.tower.encoder.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.tower.post_layernorm

    @property
    def d_model(self) -> int:
        return self.tower.config.hidden_size

    @property
    def patch_size(self) -> int:
        return self.tower.config.patch_size

    def embed(self, pixels: Tensor) -> Tensor:
        return self.tower.pre_layrnorm(self.tower.embeddings(pixels))  # (B, P, d)

    def reference_forward(self, pixels: Tensor) -> Tensor:
        # transformers applies post_layernorm to the pooled CLS only; the cache contract wants every token.
        return self.tower.post_layernorm(self.tower(pixel_values=pixels).last_hidden_state)

    def is_lower_key(self, key: str) -> bool:
        if key.startswith(("embeddings.", "pre_layrnorm.")):
            return True
        return any(key.startswith(f"encoder.layers.{i}.") for i in range(self.split_index))


def _hf_preprocessing(model_dir: Path, size: int) -> ImagePreprocessing:
    """Mean/std/resample from the dir's preprocessor_config.json if present, else OpenAI CLIP's."""
    import json

    path = Path(model_dir) / "preprocessor_config.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    resample = {2: "bilinear", 3: "bicubic"}.get(settings.get("resample", 3))
    if resample is None:
        raise PmmcacheError(f"{path}: unsupported resample {settings['resample']!r} (2 bilinear, 3 bicubic)")
    return ImagePreprocessing(
        size=size,
        mean=tuple(settings.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(settings.get("image_std", OPENAI_CLIP_STD)),
        interpolation=resample,
    )


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state_dict from a .safetensors file or a torch checkpoint (optionally under 'state_dict')."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
