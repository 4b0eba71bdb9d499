"""The stage-2 model: item towers on cached states, fusion, SASRec user encoder (paper III-B).

    item_tower.py    top encoder blocks + projections + fusion -> item vectors (eq. 1-3)
    user_encoder.py  causal Transformer over item vectors -> user states (eq. 4)
    pmmrec.py        the assembled model, its NID head, per-part checkpoints, build from encoders
    released_names.py  the released PMMRec code's parameter names -> these parts (import-checkpoint)
"""
from pmmcache.model.item_tower import ItemOutput, ItemTower, ItemTowerConfig, ModalityTokens, masked_mean
from pmmcache.model.pmmrec import (
    PARTS,
    PartReport,
    PMMRec,
    PMMRecConfig,
    build_pmmrec,
    read_parts_config,
)
from pmmcache.model.user_encoder import UserEncoder, UserEncoderConfig

__all__ = [
    "PARTS",
    "ItemOutput",
    "ItemTower",
    "ItemTowerConfig",
    "ModalityTokens",
    "PMMRec",
    "PMMRecConfig",
    "PartReport",
    "UserEncoder",
    "UserEncoderConfig",
    "build_pmmrec",
    "masked_mean",
    "read_parts_config",
]
