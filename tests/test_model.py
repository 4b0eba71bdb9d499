"""The stage-2 model on cached states: item towers, fusion masks, pooling, user encoder, per-part checkpoints.

Top blocks come from tiny encoders saved by `tests/helpers/tiny_models.py` and loaded through the real
loading path (BERT d 32 with L = 6 tokens; CLIP ViT d 32, 32 px / 16 px patches -> P = 5 tokens).
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file, save_file

from pmmcache.cache import ItemStates
from pmmcache.config import from_dict
from pmmcache.encoders import TextEncoder, TextEncoderSpec, VisionEncoder, VisionEncoderSpec
from pmmcache.errors import ConfigError, PmmcacheError
from pmmcache.model import (
    ItemTowerConfig,
    PMMRec,
    PMMRecConfig,
    UserEncoder,
    UserEncoderConfig,
    build_pmmrec,
    read_parts_config,
)
from helpers.tiny_models import save_tiny_bert, save_tiny_hf_clip_vision

D, L, P = 32, 6, 5


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    text = TextEncoder.load(TextEncoderSpec(name=str(save_tiny_bert(root / "bert")), top_blocks=2, max_length=L))
    vision_dir = save_tiny_hf_clip_vision(root / "clip", image_size=32, patch_size=16)
    vision_spec = VisionEncoderSpec(name=str(vision_dir), weights="checkpoint", top_blocks=2, image_size=32)
    vision = VisionEncoder.load(vision_spec)
    assert vision.num_tokens == P and text.d_model == vision.d_model == D
    return text, vision


def tiny_config(**item_overrides) -> PMMRecConfig:
    item = {"d_model": D, "fusion_heads": 2, "fusion_ffn": 64, **item_overrides}
    return PMMRecConfig(ItemTowerConfig(**item), UserEncoderConfig(d_model=D, n_heads=2, ffn=64, max_len=6))


def build(encoders, seed: int = 0, **item_overrides) -> PMMRec:
    torch.manual_seed(seed)
    config = tiny_config(**item_overrides)
    modalities = config.item_tower.modalities
    text, vision = encoders
    model = build_pmmrec(config, text if "text" in modalities else None, vision if "image" in modalities else None)
    return model.eval()


def make_states(seed: int = 0) -> ItemStates:
    """5 items: both modalities; image missing; text unusable; both (short text); the padding item."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([4, 6, 3, 2, 0])
    text_mask = torch.arange(L)[None, :] < lengths[:, None]  # (5, L)
    text = torch.randn(5, L, D, generator=gen).half()
    image = torch.randn(5, P, D, generator=gen).half()
    text[4], image[4] = 0, 0  # row 0 of a cache: zeros, no modality
    modality = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.bool)
    return ItemStates(text=text, text_mask=text_mask, image=image, modality=modality)


def replaced(states: ItemStates, **fields) -> ItemStates:
    values = {"text": states.text, "text_mask": states.text_mask, "image": states.image, "modality": states.modality}
    values.update(fields)
    return ItemStates(**{k: v.clone() for k, v in values.items()})


# ---- item tower -------------------------------------------------------------------------------------------


def test_item_tower_shapes_and_fp16_input(encoders):
    model = build(encoders)
    with torch.no_grad():
        out = model.encode_items(make_states())
    assert out.vector.shape == out.text_cls.shape == out.image_cls.shape == (5, D)
    assert out.vector.dtype == torch.float32
    assert torch.isfinite(out.vector).all()  # including the padding item with no modality at all
    assert out.modality.tolist() == make_states().modality.tolist()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_fusion_ignores_padded_text_and_masked_out_modalities(encoders, pooling):
    model = build(encoders, pooling=pooling)
    states = make_states()
    with torch.no_grad():
        base = model.encode_items(states).vector
        text = states.text.clone()
        text[~states.text_mask] = torch.randn(int((~states.text_mask).sum()), D).half()  # padded text tokens
        text[2] = torch.randn(L, D).half()  # item 2's text is unusable
        image = states.image.clone()
        image[1] = torch.randn(P, D).half()  # item 1's image is missing
        noisy = model.encode_items(replaced(states, text=text, image=image)).vector
        real_text = states.text.clone()
        real_text[1, 0] += 1.0  # a real token of item 1: its only modality
        moved = model.encode_items(replaced(states, text=real_text)).vector
    torch.testing.assert_close(noisy, base, rtol=0, atol=1e-5)
    assert (moved[1] - base[1]).abs().max() > 1e-3  # item 1 is built from its text alone
    torch.testing.assert_close(moved[[0, 2, 3]], base[[0, 2, 3]], rtol=0, atol=1e-5)


def test_mean_pooling_is_the_masked_mean_of_fusion_outputs_and_differs_from_cls(encoders):
    cls_model = build(encoders, pooling="cls")
    mean_model = build(encoders, pooling="mean")
    loading = mean_model.item_tower.load_state_dict(cls_model.item_tower.state_dict(), strict=False)
    assert loading.missing_keys == [] and loading.unexpected_keys == ["mm_cls"]  # only mm_cls differs
    states = make_states()
    with torch.no_grad():
        tower = mean_model.item_tower
        text, image, _ = tower.encode_modalities(states)
        tokens, keep = tower.fusion_sequence(text, image)
        fused = tower.fuse(tokens, keep)
        out = mean_model.encode_items(states).vector
        cls_out = cls_model.encode_items(states).vector
        cls_tokens, cls_keep = cls_model.item_tower.fusion_sequence(*cls_model.item_tower.encode_modalities(states)[:2])
        cls_fused = cls_model.item_tower.fuse(cls_tokens, cls_keep)
    # [text L tokens; image P tokens]; kept: real text of usable text, all patches of usable images
    assert tokens.shape == (5, L + P, D)
    assert keep.sum(1).tolist() == [4 + P, 6, P, 2 + P, 0]
    expected = torch.stack([
        fused[i][keep[i]].mean(0) if keep[i].any() else torch.zeros(D) for i in range(5)
    ])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out[4] == 0).all()  # the padding item pools to zeros
    torch.testing.assert_close(cls_out, cls_fused[:, 0], rtol=0, atol=1e-6)  # cls = mm_cls output
    assert cls_tokens.shape[1] == 1 + L + P
    assert (cls_out[:4] - out[:4]).abs().max() > 1e-2


@pytest.mark.parametrize("fuse_cls", [True, False])
def test_modality_mean_pooling_weighs_each_modality_half(encoders, fuse_cls):
    model = build(encoders, pooling="modality_mean", fuse_modality_cls=fuse_cls)
    assert not hasattr(model.item_tower, "mm_cls")
    states = make_states()
    with torch.no_grad():
        tower = model.item_tower
        tokens, keep = tower.fusion_sequence(*tower.encode_modalities(states)[:2])
        fused = tower.fuse(tokens, keep)
        out = model.encode_items(states).vector
    text_len = L - (0 if fuse_cls else 1)
    assert tokens.shape[1] == text_len + P - (0 if fuse_cls else 1)

    def mean(i, part):
        rows = fused[i, :text_len] if part == "text" else fused[i, text_len:]
        kept = keep[i, :text_len] if part == "text" else keep[i, text_len:]
        return rows[kept].mean(0) if kept.any() else None

    for i in range(5):
        means = [m for m in (mean(i, "text"), mean(i, "image")) if m is not None]
        expected = torch.stack(means).mean(0) if means else torch.zeros(D)  # one usable modality: its mean
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)
    # Item 0 has 4 text tokens and 5 patches: not the plain token mean.
    assert (out[0] - fused[0][keep[0]].mean(0)).abs().max() > 1e-3


def test_fusion_can_leave_out_the_modality_cls_tokens(encoders):
    model = build(encoders, fuse_modality_cls=False)
    tower = model.item_tower
    with torch.no_grad():
        tokens, keep = tower.fusion_sequence(*tower.encode_modalities(make_states())[:2])
    assert tokens.shape == (5, 1 + (L - 1) + (P - 1), D)  # eq. 3: mm_cls, t^1..t^p, v^1..v^q
    assert keep.sum(1).tolist() == [1 + 3 + 4, 1 + 5, 1 + 4, 1 + 1 + 4, 1]


@pytest.mark.parametrize("modality", ["text", "image"])
def test_single_modality_item_is_its_projected_cls(encoders, modality):
    model = build(encoders, modalities=(modality,))
    assert not hasattr(model.item_tower, "fusion")
    states = make_states()
    with torch.no_grad():
        out = model.encode_items(states)
    own = out.text_cls if modality == "text" else out.image_cls
    other = out.image_cls if modality == "text" else out.text_cls
    assert other is None
    torch.testing.assert_close(out.vector, own, rtol=0, atol=0)
    top = model.item_tower.text_top if modality == "text" else model.item_tower.vision_top
    proj = model.item_tower.text_proj if modality == "text" else model.item_tower.vision_proj
    with torch.no_grad():
        hidden = top(states.text.float(), states.text_mask.long()) if modality == "text" else top(states.image.float())
        by_hand = proj(hidden[:, 0])
    usable = states.modality[:, 0 if modality == "text" else 1]
    torch.testing.assert_close(out.vector[usable], by_hand[usable], rtol=1e-5, atol=1e-5)


def test_single_modality_mean_vector_is_the_token_mean(encoders):
    model = build(encoders, modalities=("text",), modality_vector="mean")
    states = make_states()
    with torch.no_grad():
        out = model.encode_items(states)
        hidden = model.item_tower.text_top(states.text.float(), states.text_mask.long())
        tokens = model.item_tower.text_proj(hidden)
    usable = states.modality[:, 0]
    for i in usable.nonzero().flatten().tolist():
        torch.testing.assert_close(out.vector[i], tokens[i][states.text_mask[i]].mean(0), rtol=1e-5, atol=1e-5)
    assert (out.vector[0] - out.text_cls[0]).abs().max() > 1e-3


@pytest.mark.parametrize("modalities, fusion", [(("text",), "attention"), (("image",), "attention"),
                                                 (("text", "image"), "concat")])
def test_pooled_projection_equals_the_token_mean_for_a_linear_map(encoders, modalities, fusion):
    """project = pooled averages the states before a linear projection: the same vectors, 1/L the work."""
    settings = {"modalities": modalities, "modality_vector": "mean", "pooling": "mean", "fusion": fusion,
                "projection": "linear"}
    states = make_states()
    with torch.no_grad():
        per_token = build(encoders, **settings).encode_items(states)
        pooled = build(encoders, project="pooled", **settings).encode_items(states)
    torch.testing.assert_close(pooled.vector, per_token.vector, rtol=1e-5, atol=1e-5)
    for name in ("text_cls", "image_cls"):
        if getattr(per_token, name) is not None:
            torch.testing.assert_close(getattr(pooled, name), getattr(per_token, name), rtol=1e-5, atol=1e-5)


def test_pooled_projection_puts_the_mlp_after_the_mean(encoders):
    model = build(encoders, modalities=("text",), modality_vector="mean", projection="mlp", project="pooled")
    states = make_states()
    with torch.no_grad():
        out = model.encode_items(states)
        hidden = model.item_tower.text_top(states.text.float(), states.text_mask.long())
        per_token = build(encoders, modalities=("text",), modality_vector="mean", projection="mlp").encode_items(states)
    usable = states.modality[:, 0]
    proj = model.item_tower.text_proj
    for i in usable.nonzero().flatten().tolist():
        with torch.no_grad():
            by_hand = proj(hidden[i][states.text_mask[i]].mean(0))
        torch.testing.assert_close(out.vector[i], by_hand, rtol=1e-5, atol=1e-5)
    assert (out.vector[usable] - per_token.vector[usable]).abs().max() > 1e-3  # a different model than mean∘MLP
    assert not out.vector[~usable].any() and not out.text_cls[~usable].any()


@pytest.mark.parametrize("settings", [{"project": "pooled"},  # attention fusion reads every token
                                      {"project": "pooled", "modalities": ("text",)}])  # CLS vector
def test_pooled_projection_refuses_configs_that_need_tokens(encoders, settings):
    with pytest.raises(ConfigError, match="project = pooled"):
        build(encoders, **settings)


def test_text_only_states_feed_a_two_modality_tower(encoders):
    model = build(encoders)
    states = make_states()
    with torch.no_grad():
        out = model.encode_items(ItemStates(text=states.text, text_mask=states.text_mask, image=None,
                                            modality=states.modality))
    assert out.image_cls is None and not out.modality[:, 1].any()
    assert torch.isfinite(out.vector).all()


# ---- user encoder -----------------------------------------------------------------------------------------


def user_encoder(padding_side: str = "left", seed: int = 0) -> UserEncoder:
    torch.manual_seed(seed)
    config = UserEncoderConfig(d_model=D, n_heads=2, ffn=64, max_len=6, padding_side=padding_side)
    return UserEncoder(config).eval()


def test_user_encoder_is_causal():
    encoder = user_encoder()
    items = torch.randn(2, 5, D)
    padding = torch.tensor([[True, False, False, False, False], [False] * 5])
    with torch.no_grad():
        base = encoder(items, padding)
        changed = items.clone()
        changed[:, 3] += torch.randn(2, D)  # not a constant shift: LayerNorm would remove that
        after = encoder(changed, padding)
    torch.testing.assert_close(after[:, :3], base[:, :3], rtol=0, atol=1e-6)
    assert (after[:, 3:] - base[:, 3:]).abs().amax(dim=(1, 2)).min() > 1e-3


def test_user_encoder_ignores_padding_and_survives_empty_rows():
    encoder = user_encoder()
    items = torch.randn(3, 5, D)
    padding = torch.tensor([[True, True, False, False, False], [True] * 5, [False] * 5])
    with torch.no_grad():
        base = encoder(items, padding)
        noisy = items.clone()
        noisy[padding] = torch.randn(int(padding.sum()), D) * 10
        after = encoder(noisy, padding)
    torch.testing.assert_close(after[~padding], base[~padding], rtol=0, atol=1e-6)
    assert torch.isfinite(base).all() and torch.isfinite(after).all()  # row 1 is all padding


def test_left_and_right_padding_give_the_same_user_states():
    left, right = user_encoder("left"), user_encoder("right")
    right.load_state_dict(left.state_dict())
    items = torch.randn(2, 3, D)  # two users: 3 items and 2 items
    lengths = [3, 2]
    left_items, right_items = torch.zeros(2, 5, D), torch.zeros(2, 5, D)
    left_pad, right_pad = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    for u, n in enumerate(lengths):
        left_items[u, 5 - n:], left_pad[u, 5 - n:] = items[u, :n], False
        right_items[u, :n], right_pad[u, :n] = items[u, :n], False
    with torch.no_grad():
        left_states, right_states = left(left_items, left_pad), right(right_items, right_pad)
        left_last, right_last = left.last_state(left_items, left_pad), right.last_state(right_items, right_pad)
    torch.testing.assert_close(left_states[~left_pad], right_states[~right_pad], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left_last, right_last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left_last, left_states[:, -1], rtol=0, atol=0)
    torch.testing.assert_close(right_last[1], right_states[1, 1], rtol=0, atol=0)


def test_positions_from_the_oldest_item_make_a_prefix_state_independent_of_what_follows():
    states = {}
    for positions in ("newest", "oldest"):
        for side in ("left", "right"):
            torch.manual_seed(0)
            encoder = UserEncoder(UserEncoderConfig(d_model=D, n_heads=2, ffn=64, max_len=6, padding_side=side,
                                                    positions=positions)).eval()
            items = torch.randn(3, D)
            batch, padding = torch.zeros(2, 5, D), torch.ones(2, 5, dtype=torch.bool)
            for u, n in enumerate((3, 2)):  # user 1's history is user 0's without its newest item
                columns = slice(5 - n, 5) if side == "left" else slice(0, n)
                batch[u, columns], padding[u, columns] = items[:n], False
            with torch.no_grad():
                out = encoder(batch, padding)
            states[positions, side] = out[~padding].split([3, 2])  # each user's real states, oldest first
    for positions in ("newest", "oldest"):  # either way, the padding side does not matter
        for a, b in zip(states[positions, "left"], states[positions, "right"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    user0, user1 = states["oldest", "left"]
    torch.testing.assert_close(user0[:2], user1, rtol=1e-5, atol=1e-5)  # same items at the same positions
    user0, user1 = states["newest", "left"]
    assert not torch.allclose(user0[:2], user1, atol=1e-3)  # counted back from the newest: shifted
    with pytest.raises(ConfigError, match="positions"):
        UserEncoderConfig(positions="forward")


def test_user_encoder_ffn_activation_is_the_configured_one():
    relu = user_encoder()
    gelu = UserEncoder(UserEncoderConfig(d_model=D, n_heads=2, ffn=64, max_len=6, activation="gelu")).eval()
    gelu.load_state_dict(relu.state_dict())
    assert all(block.activation is torch.nn.functional.gelu for block in gelu.blocks)
    assert all(block.activation is torch.nn.functional.relu for block in relu.blocks)
    items, padding = torch.randn(2, 5, D), torch.zeros(2, 5, dtype=torch.bool)
    with torch.no_grad():
        assert not torch.allclose(relu(items, padding), gelu(items, padding))  # same weights, other FFN
    with pytest.raises(ConfigError, match="activation"):
        UserEncoderConfig(activation="tanh")


def test_user_encoder_ffn_dropout_drops_only_inside_the_ffn():
    recbole = UserEncoder(UserEncoderConfig(d_model=D, n_heads=2, ffn=64, max_len=6, dropout=0.5, ffn_dropout=0.0))
    released = UserEncoder(UserEncoderConfig(d_model=D, n_heads=2, ffn=64, max_len=6, dropout=0.5))
    assert [(b.dropout.p, b.dropout1.p, b.dropout2.p) for b in recbole.blocks] == [(0.0, 0.5, 0.5)] * 2
    assert [b.dropout.p for b in released.blocks] == [0.5, 0.5]  # unset: the layer's one dropout
    # Only the FFN's inner dropout on: train mode is random, and switching it off makes train = eval.
    items, padding = torch.randn(2, 5, D), torch.zeros(2, 5, dtype=torch.bool)
    inner = UserEncoder(UserEncoderConfig(d_model=D, n_heads=2, ffn=64, max_len=6, dropout=0.0, ffn_dropout=0.9)).train()
    assert not torch.allclose(inner(items, padding), inner(items, padding))
    off = UserEncoder(UserEncoderConfig(d_model=D, n_heads=2, ffn=64, max_len=6, dropout=0.0, ffn_dropout=0.0))
    off.load_state_dict(inner.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(off.train()(items, padding), off.eval()(items, padding))
    with pytest.raises(ConfigError, match="ffn_dropout"):
        UserEncoderConfig(ffn_dropout=1.0)


def test_user_encoder_rejects_sequences_longer_than_its_positions():
    with pytest.raises(ValueError, match="max_len"):
        user_encoder()(torch.randn(1, 7, D), torch.zeros(1, 7, dtype=torch.bool))


# ---- parameters and gradients -----------------------------------------------------------------------------


def test_parameter_groups_cover_every_trainable_parameter_once(encoders):
    model = build(encoders)
    groups = model.parameter_groups()
    assert set(groups) == {"encoder_blocks", "heads"}
    grouped = [id(p) for params in groups.values() for p in params]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) == len(trainable)
    assert set(grouped) == trainable
    tops = list(model.item_tower.text_top.parameters()) + list(model.item_tower.vision_top.parameters())
    assert {id(p) for p in groups["encoder_blocks"]} == {id(p) for p in tops}
    assert id(model.item_tower.mm_cls) in {id(p) for p in groups["heads"]}


def test_every_parameter_gets_a_gradient(encoders):
    model = build(encoders).train()
    states = make_states()
    out = model.encode_items(states)
    user_states = model.encode_users(out.vector[:4].reshape(2, 2, D), torch.zeros(2, 2, dtype=torch.bool))
    loss = out.vector.sum() + out.text_cls.sum() + out.image_cls.sum() + model.detect_noise(user_states).sum()
    loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


# ---- checkpoints by part ----------------------------------------------------------------------------------


def forward_all(model: PMMRec, states: ItemStates) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        items = model.encode_items(states).vector  # (5, d)
        padding = torch.tensor([[True, False, False, False], [False] * 4])
        users = model.encode_users(items[[0, 0, 1, 2, 3, 1, 2, 3]].reshape(2, 4, D), padding)
        return items, users, model.detect_noise(users)


def test_save_parts_load_parts_round_trip(encoders, tmp_path):
    source, target = build(encoders, seed=0), build(encoders, seed=1)
    states = make_states()
    source.save_parts(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json", "item_tower.safetensors", "nid_head.safetensors", "user_encoder.safetensors"]
    before = forward_all(target, states)
    assert (before[0] - forward_all(source, states)[0]).abs().max() > 1e-3  # heads differ before loading
    reports = target.load_parts(tmp_path / "ckpt", parts=("item_tower", "user_encoder", "nid_head"))
    assert all(not r.missing and not r.unexpected for r in reports.values())
    for got, want in zip(forward_all(target, states), forward_all(source, states)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    config, encoder_record = read_parts_config(tmp_path / "ckpt")
    assert config == source.config
    assert encoder_record["text"]["split_index"] == 2 and encoder_record["vision"]["num_tokens"] == P


def test_loading_only_the_user_encoder_leaves_the_item_tower(encoders, tmp_path):
    source, target = build(encoders, seed=0), build(encoders, seed=1)
    source.save_parts(tmp_path)
    tower_before = {k: v.clone() for k, v in target.item_tower.state_dict().items()}
    target.load_parts(tmp_path, parts=("user_encoder",))
    for key, value in target.item_tower.state_dict().items():
        torch.testing.assert_close(value, tower_before[key], rtol=0, atol=0)
    assert not torch.equal(target.item_tower.text_proj.weight, source.item_tower.text_proj.weight)
    for key, value in target.user_encoder.state_dict().items():
        torch.testing.assert_close(value, source.user_encoder.state_dict()[key], rtol=0, atol=0)


def test_a_missing_or_unexpected_key_is_an_error(encoders, tmp_path):
    source, target = build(encoders, seed=0), build(encoders, seed=1)
    source.save_parts(tmp_path)
    tensors = load_file(str(tmp_path / "user_encoder.safetensors"))
    del tensors["position_embedding.weight"]
    save_file(tensors, str(tmp_path / "user_encoder.safetensors"))
    before = target.item_tower.text_proj.weight.clone()
    with pytest.raises(PmmcacheError, match="missing position_embedding.weight"):
        target.load_parts(tmp_path, parts=("item_tower", "user_encoder"))
    assert torch.equal(target.item_tower.text_proj.weight, before)  # nothing loaded when a part is bad
    reports = target.load_parts(tmp_path, parts=("user_encoder",), strict=False)
    assert reports["user_encoder"].missing == ["position_embedding.weight"]
    mean_model = build(encoders, pooling="mean")  # has no mm_cls: the cls checkpoint has one too many
    with pytest.raises(PmmcacheError, match="unexpected mm_cls"):
        mean_model.load_parts(tmp_path, parts=("item_tower",))
    wide = PMMRec(PMMRecConfig(ItemTowerConfig(d_model=16, fusion_heads=2),
                               UserEncoderConfig(d_model=16, n_heads=2, max_len=6)), d_text=D, d_vision=D,
                  text_top=torch.nn.Identity(), vision_top=torch.nn.Identity())
    with pytest.raises(PmmcacheError, match=r"shapes differ for blocks.0.linear1.weight \(64, 32\) vs \(64, 16\)"):
        wide.load_parts(tmp_path, parts=("user_encoder",), strict=False)
    with pytest.raises(PmmcacheError, match="unknown model part"):
        target.load_parts(tmp_path, parts=("fusion",))


# ---- building -----------------------------------------------------------------------------------------------


def test_build_pmmrec_copies_the_pretrained_top_blocks(encoders):
    text, vision = encoders
    model = build(encoders)
    text_layer = text.model.encoder.layer[3]
    copied = model.item_tower.text_top.blocks["3"]
    torch.testing.assert_close(copied.output.dense.weight, text_layer.output.dense.weight, rtol=0, atol=0)
    assert sorted(model.item_tower.text_top.blocks) == ["2", "3"]
    with torch.no_grad():
        copied.output.dense.weight.add_(1.0)
    assert not torch.equal(copied.output.dense.weight, text_layer.output.dense.weight)  # not shared
    hidden = torch.randn(2, P, D)
    with torch.no_grad():
        torch.testing.assert_close(model.item_tower.vision_top(hidden), vision.top(hidden), rtol=0, atol=0)
    fresh = build_pmmrec(tiny_config(), text, vision)
    assert fresh.training and fresh.item_tower.vision_top.training  # the encoders are held in eval mode
    with pytest.raises(ConfigError, match="does not use a vision encoder"):
        build_pmmrec(tiny_config(modalities=("text",)), text, vision)
    with pytest.raises(ConfigError, match="needs a vision encoder"):
        build_pmmrec(tiny_config(), text, None)


def test_configs_are_strict():
    config = from_dict(PMMRecConfig, {"item_tower": {"d_model": 64, "fusion_heads": 4, "pooling": "mean"},
                                      "user_encoder": {"d_model": 64}, "nid_head": False})
    assert config.item_tower.ffn_size == 256 and config.user_encoder.ffn_size == 256
    with pytest.raises(ConfigError, match="fusion_heads"):
        ItemTowerConfig(d_model=32, fusion_heads=5)
    with pytest.raises(ConfigError, match="must be equal"):
        PMMRecConfig(ItemTowerConfig(d_model=32, fusion_heads=2), UserEncoderConfig(d_model=64))
    with pytest.raises(ConfigError, match="poolng"):
        from_dict(ItemTowerConfig, {"poolng": "mean"})
    with pytest.raises(ConfigError, match="modalities"):
        from_dict(ItemTowerConfig, {"modalities": ["text", "audio"]})
