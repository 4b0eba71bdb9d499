"""Text encoder (a transformers BERT / RoBERTa / XLM-R), split at a named block.

lower = embeddings + blocks [0, n-k)  -> frozen, run once per item in stage 1 ("extract")
top   = blocks [n-k, n)               -> trained in stage 2 on the cached input of block n-k
These models are post-LN, so there is no final norm after the last block. Running lower then top
equals the model's own forward; `lower(...)` equals `hidden_states[n-k]` of the transformers output.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pmmcache.config import to_dict
from pmmcache.encoders.hub import read_hf_config, resolve_text_model_dir
from pmmcache.errors import ConfigError, PmmcacheError

# model_type -> how many leading position slots the embeddings never use for tokens
# (RoBERTa-style models number positions from padding_idx + 1).
_SUPPORTED_TEXT_MODELS = {"bert": 0, "roberta": None, "xlm-roberta": None}

# Config keys that say where or how a model was saved, not what it computes.
_BOOKKEEPING_CONFIG_KEYS = {"transformers_version", "architectures", "dtype", "torch_dtype", "name_or_path"}


@dataclass(frozen=True)
class TextEncoderSpec:
    """What the cache manifest records about the text encoder."""

    name: str = "xlm-roberta-base"  # hub id (must be in the local HF cache) or local model dir
    top_blocks: int = 2  # k: blocks trained in stage 2
    max_length: int = 50  # tokens incl. CLS/SEP; every text is padded/truncated to exactly this


def fingerprint_tensors(architecture: dict[str, Any], tensors: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over a JSON architecture description and the names, dtypes, shapes and bytes of tensors.

    Tensors are hashed in name order, from CPU copies, so the digest depends only on values.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(architecture, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"\n{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy())  # hashed in place: no copy of large embeddings
    return digest.hexdigest()


def architecture_of(config: Any) -> dict[str, Any]:
    """The transformers config as a dict, without keys that depend on where the model was saved."""
    return {
        key: value
        for key, value in config.to_dict().items()
        if not key.startswith("_") and key not in _BOOKKEEPING_CONFIG_KEYS
    }


def _bidirectional_mask(config: Any, hidden: Tensor, attention_mask: Tensor | None) -> Tensor | None:
    """The 4-D mask the model's own forward would build (its form depends on the attention implementation)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)


class TextTopBlocks(nn.Module):
    """The top k blocks of a text encoder as a standalone module: m(hidden, attention_mask) -> states.

    state_dict keys are `blocks.<i>.<transformers layer key>` with i the block's index in the full
    encoder (e.g. `blocks.11.attention.self.query.weight`), so they map back to `encoder.layer.<i>.`.
    """

    def __init__(self, config: Any, blocks: dict[int, nn.Module]):
        super().__init__()
        self.config = config  # read only to build the attention mask the way the model does
        self.blocks = nn.ModuleDict({str(index): block for index, block in blocks.items()})

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """hidden (B, L, d): input of the first top block; attention_mask (B, L), 1 = token. -> (B, L, d)."""
        if len(self.blocks) == 0:
            return hidden
        mask = _bidirectional_mask(self.config, hidden, attention_mask)
        for block in self.blocks.values():
            hidden = block(hidden, mask)  # (B, L, d)
        return hidden


class TextEncoder(nn.Module):
    """A transformers text encoder with its tokenizer, split into lower (frozen) and top (trained) blocks."""

    def __init__(self, spec: TextEncoderSpec, model: nn.Module, tokenizer: Any, model_dir: Path):
        super().__init__()
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.model_dir = Path(model_dir)
        config = model.config
        self.model_type: str = config.model_type
        self.n_blocks: int = len(model.encoder.layer)
        self.d_model: int = config.hidden_size
        if not 0 <= spec.top_blocks <= self.n_blocks:
            raise ConfigError(
                f"text top_blocks = {spec.top_blocks}, but {spec.name} has {self.n_blocks} blocks "
                f"(allowed 0..{self.n_blocks})"
            )
        if spec.max_length < 2 or spec.max_length > self.max_positions():
            raise ConfigError(
                f"text max_length = {spec.max_length}; {spec.name} takes 2..{self.max_positions()} tokens"
            )

    @classmethod
    def load(cls, spec: TextEncoderSpec) -> "TextEncoder":
        """Load model and tokenizer from a local dir or the local HF cache, in fp32; never downloads."""
        model_dir = resolve_text_model_dir(spec.name)  # first: a missing model fails before slow imports
        from transformers import AutoModel, AutoTokenizer

        config = read_hf_config(model_dir, "text encoder")
        if config.model_type not in _SUPPORTED_TEXT_MODELS:
            raise PmmcacheError(
                f"text encoder {spec.name} is a {config.model_type!r} model; supported: "
                f"{', '.join(sorted(_SUPPORTED_TEXT_MODELS))}"
            )
        # The pooler is kept (unused) so checkpoints that carry one load without an "unexpected keys" report.
        model, loading = AutoModel.from_pretrained(
            model_dir, config=config, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
        missing = [key for key in loading["missing_keys"] if not key.startswith("pooler.")]
        if missing:  # these would silently be random: refuse
            raise PmmcacheError(f"text encoder {model_dir} lacks weights for {', '.join(sorted(missing)[:5])}")
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return cls(spec, model, tokenizer, model_dir)

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def split_index(self) -> int:
        """n - k: index of the first top block (= index into transformers' hidden_states of lower's output)."""
        return self.n_blocks - self.spec.top_blocks

    def max_positions(self) -> int:
        """The longest token sequence the position embeddings cover."""
        config = self.model.config
        reserved = _SUPPORTED_TEXT_MODELS[self.model_type]
        if reserved is None:  # RoBERTa-style positions start at padding_idx + 1
            reserved = config.pad_token_id + 1
        return config.max_position_embeddings - reserved

    # ---- tokenization ------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenize to exactly max_length tokens (CLS first, padded or truncated).

        Returns input_ids (B, L) long, attention_mask (B, L) long (1 = token), n_tokens (B,) long: the
        length each text would have untruncated (incl. special tokens), and truncated (B,) bool.
        """
        texts = list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise PmmcacheError(f"text #{index} is a {type(text).__name__}, not a string")
        length = self.spec.max_length
        encoded = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        # A second pass without truncation counts what was cut, so over-long texts can be reported.
        full_ids = self.tokenizer(texts, truncation=False, padding=False, verbose=False)["input_ids"]
        n_tokens = torch.tensor([len(ids) for ids in full_ids], dtype=torch.long)
        return {
            "input_ids": encoded["input_ids"],  # (B, L)
            "attention_mask": encoded["attention_mask"],  # (B, L)
            "n_tokens": n_tokens,  # (B,)
            "truncated": n_tokens > length,  # (B,)
        }

    def truncation_report(self, texts: Sequence[str]) -> dict[str, Any]:
        """Which texts are longer than max_length: counts, the longest length and their indices."""
        n_tokens = self.tokenize(texts)["n_tokens"]
        over = (n_tokens > self.spec.max_length).nonzero().flatten().tolist()
        return {
            "max_length": self.spec.max_length,
            "n_texts": len(n_tokens),
            "n_truncated": len(over),
            "longest": int(n_tokens.max()) if len(n_tokens) else 0,
            "truncated_indices": over,
        }

    # ---- the split ---------------------------------------------------------------------------------
    def lower(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask (B, L) -> (B, L, d): the input of block n-k (embeddings + blocks < n-k)."""
        hidden = self.model.embeddings(input_ids=input_ids)  # (B, L, d)
        lower_blocks = self.model.encoder.layer[: self.split_index]
        if len(lower_blocks) == 0:
            return hidden
        mask = _bidirectional_mask(self.model.config, hidden, attention_mask)
        for block in lower_blocks:
            hidden = block(hidden, mask)  # (B, L, d)
        return hidden

    def top_module(self) -> TextTopBlocks:
        """The top k blocks as a standalone module sharing this encoder's parameters (no copy)."""
        layers = self.model.encoder.layer
        return TextTopBlocks(self.model.config, {i: layers[i] for i in range(self.split_index, self.n_blocks)})

    def top(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """hidden (B, L, d) from lower(), attention_mask (B, L) -> final token states (B, L, d)."""
        return self.top_module()(hidden, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The unsplit encoder through transformers' own forward (reference path): (B, L) -> (B, L, d)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # ---- identity ----------------------------------------------------------------------------------
    def lower_named_tensors(self) -> list[tuple[str, Tensor]]:
        """Every parameter and persistent buffer that lower() reads, with the model's own key names."""
        named = list(self.model.embeddings.state_dict(prefix="embeddings.").items())
        for index in range(self.split_index):
            block = self.model.encoder.layer[index]
            named += list(block.state_dict(prefix=f"encoder.layer.{index}.").items())
        return named

    def tokenizer_fingerprint(self) -> str:
        """sha256 of the tokenizer's full behaviour (serialized pipeline + vocab + special tokens)."""
        digest = hashlib.sha256()
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            digest.update(backend.to_str().encode())
        vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda item: item[1])
        digest.update(json.dumps(vocab, ensure_ascii=False).encode())
        digest.update(json.dumps(sorted(self.tokenizer.all_special_tokens)).encode())
        return digest.hexdigest()

    def lower_fingerprint(self) -> str:
        """sha256 over the architecture, split point, tokenizer and every tensor lower() reads."""
        architecture = {
            "kind": "pmmcache.text.lower",
            "config": architecture_of(self.model.config),
            "split_index": self.split_index,
            "tokenizer": self.tokenizer_fingerprint(),
        }
        return fingerprint_tensors(architecture, self.lower_named_tensors())

    def describe(self) -> dict[str, Any]:
        """JSON-ready record for the cache manifest."""
        return {
            "spec": to_dict(self.spec),
            "resolved_path": str(self.model_dir.resolve()),
            "model_type": self.model_type,
            "n_blocks": self.n_blocks,
            "d_model": self.d_model,
            "split_index": self.split_index,
            "dtype": str(self.model.embeddings.word_embeddings.weight.dtype).removeprefix("torch."),
            "tokenizer": type(self.tokenizer).__name__,
            "vocab_size": len(self.tokenizer),
            "lower_fingerprint": self.lower_fingerprint(),
        }
