"""Item encoders split at a named block: lower part (frozen, run once in stage 1) and top part (trained).

Text: a transformers BERT / RoBERTa / XLM-R (`text.TextEncoder`).
Vision: a CLIP ViT from open_clip or transformers (`vision.VisionEncoder`).
Names resolve offline (`hub`): a missing model is a PmmcacheError saying what to pass, never a hub retry.
"""
from pmmcache.encoders.hub import packaged_text_model_path, resolve_hf_model_dir, resolve_open_clip_weights
from pmmcache.encoders.text import TextEncoder, TextEncoderSpec, TextTopBlocks
from pmmcache.encoders.vision import TINY_VIT_NAME, VisionEncoder, VisionEncoderSpec, VisionTopBlocks

__all__ = [
    "TINY_VIT_NAME",
    "TextEncoder",
    "TextEncoderSpec",
    "TextTopBlocks",
    "VisionEncoder",
    "VisionEncoderSpec",
    "VisionTopBlocks",
    "packaged_text_model_path",
    "resolve_hf_model_dir",
    "resolve_open_clip_weights",
]
