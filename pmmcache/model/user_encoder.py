"""User encoder (paper eq. 4): a SASRec Transformer over item vectors, causal, with learned positions.

Layout follows the released code (ICDE24/PMMRec `TransformerEncoder`): LayerNorm(e + p) and dropout
on the input, then post-LN blocks (attention, then a ReLU FFN, each residual + LayerNorm eps 1e-6).
Initialisation follows RecBole's SASRec (N(0, 0.02)) by default; the released code's xavier is an option.

Padding. Sequences from `pmmcache.data.prepare` are LEFT-padded with item 0 (the most recent item
sits in the last column), so `padding_side="left"` is the default. Positions are counted back from
the most recent item: it always gets position max_len - 1, whatever the padding side or the input
length, so a left-padded and a right-padded copy of one sequence give the same states. With
`positions="oldest"` (RecBole) the oldest item gets 0 instead, again whatever the padding side.
A query may attend to earlier real items and to itself, never to padding; the "itself" keeps rows
that are all padding finite (their outputs mean nothing and are never used).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pmmcache.errors import ConfigError


@dataclass(frozen=True)
class UserEncoderConfig:
    """SASRec settings; defaults are the released code's (2 blocks, 2 heads, FFN 4 d = 3072 at d = 768)."""

    d_model: int = 768
    n_blocks: int = 2
    n_heads: int = 2
    ffn: int | None = None  # FFN width; None = 4 * d_model
    dropout: float = 0.1
    # Dropout between the FFN's two linear layers: None = `dropout`, as the released code (PyTorch's
    # encoder layer); 0 = RecBole's SASRec, whose FFN drops out only its output.
    ffn_dropout: float | None = None
    max_len: int = 21  # position embeddings: 20 history items + the target
    padding_side: Literal["left", "right"] = "left"  # data layer convention (prepare.py left-pads)
    # Position ids: "newest" counts back from the most recent item (released code: it always sits at
    # max_len - 1); "oldest" counts up from the oldest item of the window (RecBole's SASRec).
    positions: Literal["newest", "oldest"] = "newest"
    # "normal": N(0, init_std) for positions and every linear weight (RecBole's SASRec, BERT);
    # "xavier": the released code's xavier-normal, whose ~0.12-0.15 per weight at d = 64 learns ~6x
    # slower under Adam (measured: an ID model sat at popularity level for 13 epochs on MovieLens).
    init: Literal["normal", "xavier"] = "normal"
    init_std: float = 0.02
    # FFN activation: "relu" as the released code, "gelu" as RecBole's SASRec and BERT.
    activation: Literal["relu", "gelu"] = "relu"

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.n_blocks < 1 or self.max_len < 1:
            raise ConfigError(
                f"user_encoder: d_model {self.d_model}, n_blocks {self.n_blocks}, max_len {self.max_len} must be positive")
        if self.n_heads < 1 or self.d_model % self.n_heads:
            raise ConfigError(f"user_encoder.n_heads = {self.n_heads} must divide d_model = {self.d_model}")
        if self.ffn is not None and self.ffn < 1:
            raise ConfigError(f"user_encoder.ffn = {self.ffn}; must be positive (or unset for 4 * d)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"user_encoder.dropout = {self.dropout}; must be in [0, 1)")
        if self.ffn_dropout is not None and not 0.0 <= self.ffn_dropout < 1.0:
            raise ConfigError(f"user_encoder.ffn_dropout = {self.ffn_dropout}; must be in [0, 1) (or unset for dropout)")
        if self.positions not in ("newest", "oldest"):
            raise ConfigError(f"user_encoder.positions = {self.positions!r}; must be 'newest' or 'oldest'")
        if self.activation not in ("relu", "gelu"):
            raise ConfigError(f"user_encoder.activation = {self.activation!r}; must be 'relu' or 'gelu'")
        if self.init_std <= 0:
            raise ConfigError(f"user_encoder.init_std = {self.init_std}; must be positive")

    @property
    def ffn_size(self) -> int:
        return self.ffn if self.ffn is not None else 4 * self.d_model


class UserEncoder(nn.Module):
    """Item vectors (B, L, d) + padding mask (B, L) -> user states h (B, L, d); state t has seen items <= t."""

    def __init__(self, config: UserEncoderConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.position_embedding = nn.Embedding(config.max_len, d)
        self.input_norm = nn.LayerNorm(d, eps=1e-6)
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=d,
                nhead=config.n_heads,
                dim_feedforward=config.ffn_size,
                dropout=config.dropout,
                activation=config.activation,
                layer_norm_eps=1e-6,
                batch_first=True,
                norm_first=False,
            )
            for _ in range(config.n_blocks)
        )
        if config.ffn_dropout is not None:
            for block in self.blocks:
                block.dropout = nn.Dropout(config.ffn_dropout)  # the FFN's inner dropout (dropout1/2: residuals)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero biases, unit LayerNorms; weights N(0, init_std) ("normal", RecBole) or xavier-normal with
        each of Q, K, V on its own ("xavier", released code)."""
        def weight_init(tensor: Tensor) -> None:
            if self.config.init == "xavier":
                nn.init.xavier_normal_(tensor)
            else:
                nn.init.normal_(tensor, std=self.config.init_std)

        d = self.config.d_model
        for name, param in self.named_parameters():
            if "norm" in name and name.endswith("weight"):
                nn.init.ones_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            elif name.endswith("in_proj_weight"):  # Q, K, V stacked: (3 d, d)
                for chunk in param.data.split(d, dim=0):
                    weight_init(chunk)
            elif param.dim() == 2:  # position embeddings and the other linear weights
                weight_init(param)

    # ---- masks and positions -------------------------------------------------------------------------
    def position_ids(self, padding_mask: Tensor) -> Tensor:
        """(B, L) position of each column: the most recent real item gets max_len - 1 ("newest"), or the
        oldest gets 0 ("oldest"); padding columns get whatever is in range (they are never attended to)."""
        batch, length = padding_mask.shape
        columns = torch.arange(length, device=padding_mask.device)  # (L,)
        if self.config.positions == "oldest":
            if self.config.padding_side == "right":  # the real items are columns [0, len)
                return columns.clamp(max=self.config.max_len - 1).expand(batch, -1)
            first = length - (~padding_mask).sum(dim=1, keepdim=True)  # (B, 1): column of the oldest item
            return (columns[None, :] - first).clamp(0, self.config.max_len - 1)
        if self.config.padding_side == "left":
            return (columns + self.config.max_len - length).expand(batch, -1)
        lengths = (~padding_mask).sum(dim=1, keepdim=True)  # (B, 1)
        # Right padding: the real items are columns [0, len); columns after them are padding.
        return (columns[None, :] + self.config.max_len - lengths).clamp(0, self.config.max_len - 1)

    def attention_blocked(self, padding_mask: Tensor) -> Tensor:
        """(B * heads, L, L) bool, True = query may not see key: later keys and padding keys (but never itself)."""
        batch, length = padding_mask.shape
        rows = torch.arange(length, device=padding_mask.device)
        later = rows[None, :] > rows[:, None]  # (L, L): key after query
        itself = torch.eye(length, dtype=torch.bool, device=padding_mask.device)  # (L, L)
        blocked = later[None] | (padding_mask[:, None, :] & ~itself[None])  # (B, L, L)
        return blocked.repeat_interleave(self.config.n_heads, dim=0)  # (B * heads, L, L), batch-major

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, item_vectors: Tensor, padding_mask: Tensor) -> Tensor:
        """item_vectors (B, L, d), padding_mask (B, L) bool (True = padding) -> states (B, L, d)."""
        batch, length, width = item_vectors.shape
        if length > self.config.max_len:
            raise ValueError(f"sequence length {length} exceeds the user encoder's max_len {self.config.max_len}")
        if width != self.config.d_model or padding_mask.shape != (batch, length):
            raise ValueError(
                f"item_vectors {tuple(item_vectors.shape)} and padding_mask {tuple(padding_mask.shape)} "
                f"do not fit (B, L, {self.config.d_model}) and (B, L)")
        padding_mask = padding_mask.to(device=item_vectors.device, dtype=torch.bool)
        positions = self.position_embedding(self.position_ids(padding_mask))  # (B, L, d)
        hidden = self.input_dropout(self.input_norm(item_vectors + positions.to(item_vectors.dtype)))  # (B, L, d)
        blocked = self.attention_blocked(padding_mask)  # (B * heads, L, L)
        for block in self.blocks:
            hidden = block(hidden, src_mask=blocked)  # (B, L, d)
        return hidden

    def gather_last(self, states: Tensor, padding_mask: Tensor) -> Tensor:
        """The state at each row's most recent real item: states (B, L, d) -> (B, d).

        Rows that are all padding return the last (left) or first (right) column's state.
        """
        if self.config.padding_side == "left":
            return states[:, -1]
        lengths = (~padding_mask.to(torch.bool)).sum(dim=1)  # (B,)
        last = (lengths - 1).clamp(min=0).to(states.device)  # (B,)
        return states[torch.arange(states.shape[0], device=states.device), last]

    def last_state(self, item_vectors: Tensor, padding_mask: Tensor) -> Tensor:
        """User vector: forward, then the state at the last real position -> (B, d)."""
        return self.gather_last(self(item_vectors, padding_mask), padding_mask)
