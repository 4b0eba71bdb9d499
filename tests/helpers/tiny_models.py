"""Tiny transformers models (random, seeded) saved with save_pretrained into a dir, for tests.

Each helper writes config.json + model.safetensors (+ tokenizer files) and returns the dir, so tests
load them through the same path real checkpoints take. Tokenizers are built from small in-code
vocabularies with the `tokenizers`-backed transformers classes: no downloads.
"""
from __future__ import annotations

from pathlib import Path

import torch

# Words the tiny tokenizers know; anything else falls back to sub-words or characters.
_WORDS = (
    "the a an of and to in is for on with movie film song video music game cat dog red blue green "
    "big small new old best love story war star night day world man woman life time home"
).split()
_LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")


def _bert_vocab() -> dict[str, int]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_LETTERS, *_WORDS]
    tokens += [f"##{c}" for c in _LETTERS] + ["!", ",", ".", "?", "'", "-"]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


def _unigram_vocab() -> list[tuple[str, float]]:
    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = [(f"\u2581{w}", -2.0 - 0.01 * i) for i, w in enumerate(_WORDS)]
    pieces = [(c, -6.0) for c in _LETTERS] + [(f"\u2581{c}", -6.5) for c in _LETTERS]
    pieces += [(p, -7.0) for p in ("\u2581", "!", ",", ".", "?", "'", "-")]
    return specials + words + pieces + [("<mask>", 0.0)]


def save_tiny_bert(directory: str | Path, *, layers: int = 4, seed: int = 0, hidden: int = 32) -> Path:
    """A BERT with d = `hidden` (32), `layers` blocks, 4 heads, and a WordPiece tokenizer; returns the dir."""
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = Path(directory)
    tokenizer = BertTokenizer(vocab=_bert_vocab(), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_xlmr(directory: str | Path, *, layers: int = 4, seed: int = 0) -> Path:
    """An XLM-RoBERTa with d = 32, `layers` blocks, 4 heads, and a Unigram tokenizer; returns the dir."""
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    directory = Path(directory)
    tokenizer = XLMRobertaTokenizer(vocab=_unigram_vocab())
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,  # positions start at pad_token_id + 1 = 2: room for 64 tokens
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    XLMRobertaModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_hf_clip_vision(
    directory: str | Path, *, layers: int = 3, image_size: int = 64, patch_size: int = 16, seed: int = 0,
    hidden: int = 32,
) -> Path:
    """A transformers CLIPVisionModel with d = `hidden` (32), `layers` blocks, 4 heads; returns the dir.

    64 px / 16 px patches -> 16 patches + CLS = 17 tokens.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    directory = Path(directory)
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPVisionModel(config).save_pretrained(directory)
    return directory


def save_tiny_hf_clip(
    directory: str | Path, *, layers: int = 2, image_size: int = 64, patch_size: int = 16, seed: int = 0
) -> Path:
    """A full transformers CLIPModel (tiny text + vision towers), to test loading the vision tower from it."""
    from transformers import CLIPConfig, CLIPModel

    directory = Path(directory)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
            "image_size": image_size, "patch_size": patch_size,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    return directory
