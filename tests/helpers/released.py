"""A tiny dataset and a tiny checkpoint exactly as the released PMMRec code (ICDE24/PMMRec) writes them.

Dataset (`write_released_dataset`), as the released `bili_food/` example is packaged:
    bili_tiny/bilibili_tiny_users.tsv          user<TAB>item item ...   (prefix != folder name)
    bili_tiny/bilibili_tiny_items_texts.tsv    item<TAB>Title           (mixed case: lower-cased there)
    bili_tiny/bilibili_tiny_items_images.lmdb  LMDB dir; key b"<item number>" (v0042 -> b"42"),
                                               value pickle.dumps(LMDB_Image(pixels, id)): raw uint8
                                               height x width x channels, not an encoded image
Checkpoint (`write_released_checkpoint`): torch.save({"model_state_dict", "optimizer", "rng_state",
"cuda_rng_state", "scaler_state"}) with the released parameter names, spelled out here from the
released model code independently of pmmcache/released.py, at a small width.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

FOLDER = "bili_tiny"  # the dataset name pmmcache is given
PREFIX = "bilibili_tiny"  # the file prefix, as bili_food/ holds bilibili_food_*
NUM_ITEMS = 30
MAX_SEQ_LEN = 6  # the released max_seq_len of the tiny checkpoint (position rows)
D = 16  # embedding_dim
WORDS = "Red Blue Green Big Small New".split()
THINGS = "Cat Dog Movie Song Game".split()


class LMDB_Image:  # noqa: N801 - the released class name, which the restricted unpickler looks for
    """The released record (src/data_utils/dataset.py): raw pixels and their shape."""

    def __init__(self, image: np.ndarray, id: str):  # noqa: A002 - the released field name
        self.channels = image.shape[2]
        self.size = image.shape[:2]
        self.image = image.tobytes()
        self.id = id


def item_name(i: int) -> str:
    """v0001 ... : the released item names (keys drop the v and the leading zeros)."""
    return f"v{i + 1:04d}"


def item_pixels(i: int) -> np.ndarray:
    """(24, 32, 3) uint8 pixels of item i, distinct per item."""
    pixels = np.zeros((24, 32, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = (i * 8) % 256, (40 + 13 * i) % 256, (200 - 5 * i) % 256
    pixels[4:12, (i % 16):(i % 16) + 8] = (255 - (i * 8) % 256, 30, 90)
    return pixels


def sequences() -> dict[str, list[str]]:
    """Users: 40 of 7 or 12 items (longer than MAX_SEQ_LEN + 3), 2 of 2 items (dropped: < 3)."""
    users = {f"u{u}": [item_name((u + 7 * j) % NUM_ITEMS) for j in range(7 if u % 2 else 12)] for u in range(40)}
    users.update({"short1": [item_name(0), item_name(1)], "short2": [item_name(2), item_name(3)]})
    return users


def write_released_dataset(data_dir: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    """The dataset folder `data_dir/bili_tiny/` (see the module docstring); returns it."""
    import lmdb

    root = Path(data_dir) / FOLDER
    root.mkdir(parents=True)
    with open(root / f"{PREFIX}_users.tsv", "w") as f:
        for user, items in sequences().items():
            f.write(f"{user}\t{' '.join(items)}\n")
    with open(root / f"{PREFIX}_items_texts.tsv", "w") as f:
        for i in range(NUM_ITEMS):
            f.write(f"{item_name(i)}\tThe {WORDS[i % 6]} {THINGS[i % 5]} {i}\n")
    env = lmdb.open(str(root / f"{PREFIX}_items_images.lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(NUM_ITEMS):
            key = "{}".format(int(item_name(i).replace("v", ""))).encode("ascii")  # as released read_images
            txn.put(key, pickle.dumps(LMDB_Image(item_pixels(i), item_name(i)), protocol=protocol))
    env.close()
    return root


def write_released_checkpoint(path: Path, text_dir: Path, vision_dir: Path, top_blocks: int, *,
                              max_seq_len: int = MAX_SEQ_LEN, d: int = D, seed: int = 0) -> dict[str, torch.Tensor]:
    """A released-style checkpoint whose encoders are the saved tiny ones in `text_dir` / `vision_dir`
    (lower blocks equal to them; top blocks changed, as fine-tuning changes them) and whose
    projections, fusion block and user encoder are random. Returns its model_state_dict."""
    from transformers import AutoModel, CLIPVisionModel

    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    state: dict[str, torch.Tensor] = {}
    for prefix, model, blocks in (("text_encoder.bert_model.", AutoModel.from_pretrained(text_dir), "encoder.layer."),
                                  ("cv_encoder.image_net.vision_model.", CLIPVisionModel.from_pretrained(vision_dir),
                                   "encoder.layers.")):
        n = model.config.num_hidden_layers
        for key, value in model.state_dict().items():
            top = any(key.startswith(f"{blocks}{i}.") for i in range(n - top_blocks, n))
            state[prefix + key.removeprefix("vision_model.")] = value + rand(*value.shape) if top else value.clone()
        width = model.config.hidden_size
        state[("text_encoder.text_proj." if "text" in prefix else "cv_encoder.cv_proj.") + "weight"] = rand(d, width)
        state[("text_encoder.text_proj." if "text" in prefix else "cv_encoder.cv_proj.") + "bias"] = rand(d)
    fusion = "fusion_module.MergeAtt_layers.0."
    for name, shape in (("self_att.self.query", (d, d)), ("self_att.self.key", (d, d)), ("self_att.self.value", (d, d)),
                        ("self_att.output.dense", (d, d)), ("inter.dense", (4 * d, d)), ("output.dense", (d, 4 * d))):
        state[f"{fusion}{name}.weight"], state[f"{fusion}{name}.bias"] = rand(*shape), rand(shape[0])
    for name in ("self_att.output.LayerNorm", "output.LayerNorm"):
        state[f"{fusion}{name}.weight"], state[f"{fusion}{name}.bias"] = 1 + rand(d), rand(d)
    state["fusion_module.token_type_embeddings.weight"] = rand(2, d)
    user = "user_encoder.transformer_encoder."
    state[user + "position_embedding.weight"] = rand(max_seq_len, d)
    state[user + "layer_norm.weight"], state[user + "layer_norm.bias"] = 1 + rand(d), rand(d)
    for block in range(2):
        b = f"{user}transformer_blocks.{block}."
        for name in ("w_Q", "w_K", "w_V", "fc"):
            state[f"{b}multi_head_attention.{name}.weight"] = rand(d, d)
        for norm in ("multi_head_attention.layer_norm", "feed_forward.layer_norm"):
            state[f"{b}{norm}.weight"], state[f"{b}{norm}.bias"] = 1 + rand(d), rand(d)
        state[f"{b}feed_forward.w_1.weight"], state[f"{b}feed_forward.w_1.bias"] = rand(4 * d, d), rand(4 * d)
        state[f"{b}feed_forward.w_2.weight"], state[f"{b}feed_forward.w_2.bias"] = rand(d, 4 * d), rand(d)
    torch.save({"model_state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "rng_state": torch.get_rng_state(), "cuda_rng_state": [],
                "scaler_state": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                 "growth_interval": 2000, "_growth_tracker": 0}}, path)
    return state


# ------------------------------------------------------------------------------- the released forward


def _layer_norm(x: torch.Tensor, state: dict, name: str, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)


def _linear(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    return torch.nn.functional.linear(x, state[name + ".weight"], state.get(name + ".bias"))


def _attention(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
               additive_mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention over (B, T, d) projections, heads split, mask (B, 1, T or 1, T) added."""
    b, t, d = x.shape
    split = [z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v)]  # (B, h, T, d / h)
    scores = split[0] @ split[1].transpose(-1, -2) / (d // heads) ** 0.5 + additive_mask
    return (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(b, t, d)  # (B, T, d)


def released_item_vectors(state: dict, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                          image_tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """What the released item tower (model.py `Model.forward`, "modal" + merge_attn) computes from the
    encoders' last hidden states, written from its code: text_proj / cv_proj on every token, one BERT
    merge-attention block over their concatenation (padding keys masked with -10000), the masked mean."""
    text = _linear(text_tokens, state, "text_encoder.text_proj")  # (N, L, d)
    image = _linear(image_tokens, state, "cv_encoder.cv_proj")  # (N, P, d)
    x = torch.cat([text, image], dim=1)  # (N, T, d)
    keep = torch.cat([text_mask.float(), torch.ones(image.shape[:2])], dim=1)  # (N, T)
    additive = ((1.0 - keep) * -10000.0)[:, None, None, :]
    f = "fusion_module.MergeAtt_layers.0."
    context = _attention(x, *(_linear(x, state, f"{f}self_att.self.{n}") for n in ("query", "key", "value")),
                         heads, additive)
    attended = _layer_norm(_linear(context, state, f"{f}self_att.output.dense") + x, state,
                           f"{f}self_att.output.LayerNorm", 1e-12)
    inner = torch.nn.functional.gelu(_linear(attended, state, f"{f}inter.dense"))
    out = _layer_norm(_linear(inner, state, f"{f}output.dense") + attended, state, f"{f}output.LayerNorm", 1e-12)
    return (out * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)  # (N, d)


def released_user_vectors(state: dict, item_vectors: torch.Tensor, heads: int) -> torch.Tensor:
    """What the released SASRec (modules.py `TransformerEncoder`) gives at the last position of full-length
    histories (B, max_seq_len, d): LN(items + positions), then post-LN blocks of bias-free attention
    (causal mask) and a ReLU feed-forward."""
    u = "user_encoder.transformer_encoder."
    length = item_vectors.shape[1]
    x = _layer_norm(item_vectors + state[u + "position_embedding.weight"][:length], state, u + "layer_norm", 1e-6)
    causal = torch.full((length, length), -1e9).triu(1)[None, None]  # a query sees itself and earlier items
    for block in sorted({int(k.split(".")[3]) for k in state if k.startswith(u + "transformer_blocks.")}):
        b = f"{u}transformer_blocks.{block}."
        m = b + "multi_head_attention."
        context = _attention(x, *(_linear(x, state, m + n) for n in ("w_Q", "w_K", "w_V")), heads, causal)
        x = _layer_norm(x + _linear(context, state, m + "fc"), state, m + "layer_norm", 1e-6)
        inner = torch.relu(_linear(x, state, b + "feed_forward.w_1"))
        x = _layer_norm(x + _linear(inner, state, b + "feed_forward.w_2"), state, b + "feed_forward.layer_norm", 1e-6)
    return x[:, -1]  # (B, d)
