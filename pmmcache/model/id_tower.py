"""The ID-based item side of the SASRec baseline: one learned embedding per catalogue item.

It stands where the item tower stands, so the baseline shares PMMRec's user encoder, objectives,
training loop, evaluator and early stopping, and its numbers are comparable. Its "states" are the
item indices themselves (`pmmcache.items.IdItems`). Embeddings exist only for the items of the
dataset it was trained on: an ID model can neither transfer to another dataset nor take new items.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pmmcache.model.item_tower import HEADS, ItemOutput


class IdItemTower(nn.Module):
    """Item indices (N,) -> ItemOutput with the learned embedding as the item vector (0 = padding)."""

    def __init__(self, num_items: int, d_model: int, init_std: float | None = 0.02):
        super().__init__()
        self.embedding = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        # At the scale of the user encoder's position embeddings, so neither drowns the other after
        # the input LayerNorm: N(0, 0.02) as RecBole (`init_std`), or d^-1/2 (None) beside xavier positions.
        nn.init.normal_(self.embedding.weight, std=init_std if init_std is not None else d_model ** -0.5)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    @property
    def num_items(self) -> int:
        return self.embedding.num_embeddings - 1

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"encoder_blocks": [], HEADS: [self.embedding.weight]}

    def forward(self, indices: Tensor) -> ItemOutput:
        indices = indices.to(self.embedding.weight.device).long()
        usable = torch.zeros(len(indices), 2, dtype=torch.bool, device=indices.device)
        return ItemOutput(vector=self.embedding(indices), text_cls=None, image_cls=None, modality=usable)
