"""The authors' own data and checkpoints: the released PMMRec layout (prefix != folder, `v`-keys, pickled
raw-pixel LMDB records), the released preprocessing, `convert-images`, and `import-checkpoint` of a
released `epoch-N.pt` into a run that `train --init` and `eval` take.

The data and checkpoint come from tests/helpers/released.py, written the released code's way at a small
width; the encoders are a tiny XLM-R and a tiny transformers CLIP vision model (the released code's kinds).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pmmcache import train
from pmmcache.cli import main
from pmmcache.config import from_dict
from pmmcache.data.images import LmdbImageStore
from pmmcache.data.lmdb_records import is_pickle, record_png, released_key
from pmmcache.data.prepare import PrepareConfig
from pmmcache.data.readers import read_pmmrec
from pmmcache.data.registry import resolve_dataset
from pmmcache.errors import DataError, PmmcacheError
from pmmcache.evaluate import item_table
from pmmcache.extract import ExtractConfig
from pmmcache.extract import run as extract
from pmmcache.model import PMMRecConfig, build_pmmrec
from pmmcache.model.released_names import lower_tensors, released_state_dict
from pmmcache.released import ImportConfig
from pmmcache.released import run as import_checkpoint
from pmmcache.run_config import TrainConfig
from pmmcache.runs import load_encoders, load_run, setup

from helpers.released import (FOLDER, MAX_SEQ_LEN, NUM_ITEMS, PREFIX, LMDB_Image, item_pixels,
                              released_item_vectors, released_user_vectors, sequences, write_released_checkpoint,
                              write_released_dataset)
from helpers.tiny_models import save_tiny_hf_clip_vision, save_tiny_xlmr

K = 1
DATA = {"min_core": 0}  # the released code filters no k-core (users with < 3 items are always dropped)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The released-layout dataset, its tiny encoders, its cache (extracted once) and a released checkpoint."""
    root = tmp_path_factory.mktemp("released")
    write_released_dataset(root / "data")
    encoders = {"text_encoder": str(save_tiny_xlmr(root / "xlmr", layers=2)),
                "vision_encoder": str(save_tiny_hf_clip_vision(root / "clip", layers=2)),
                "top_blocks": K, "max_text_length": 16, "image_size": 64}
    extract(from_dict(ExtractConfig, {"dataset": FOLDER, "data_dir": str(root / "data"), "cache_dir": str(root / "cache"),
                                      "encoders": encoders, "data": DATA, "batch_size": 16, "num_workers": 0,
                                      "device": "cpu"}), show_progress=False)
    checkpoint = root / "epoch-0.pt"
    state = write_released_checkpoint(checkpoint, Path(encoders["text_encoder"]), Path(encoders["vision_encoder"]), K)
    return {"root": root, "data": root / "data", "cache": root / "cache", "encoders": encoders,
            "checkpoint": checkpoint, "state": state}


def cli(*args: object, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def encoder_args(released) -> list[str]:
    e = released["encoders"]
    return ["--text-encoder", e["text_encoder"], "--vision-encoder", e["vision_encoder"], "-k", str(K),
            "--max-text-length", str(e["max_text_length"]), "--image-size", str(e["image_size"])]


def import_config(released, run: Path, checkpoint: Path | None = None) -> ImportConfig:
    return from_dict(ImportConfig, {"checkpoint": str(checkpoint or released["checkpoint"]), "run": str(run),
                                    "dataset": FOLDER, "data_dir": str(released["data"]),
                                    "cache_dir": str(released["cache"]), "data": DATA,
                                    "encoders": released["encoders"], "fusion_heads": 2})


def train_settings(released, runs: Path, name: str, **overrides) -> dict:
    return {"stage": "finetune", "dataset": FOLDER, "data": DATA, "data_dir": str(released["data"]),
            "cache_dir": str(released["cache"]), "runs_dir": str(runs), "run_name": name,
            "encoders": released["encoders"], "batch_size": 8, "epochs": 1, "max_steps_per_epoch": 2,
            "max_len": MAX_SEQ_LEN, "mixed_precision": "no", **overrides}


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


class Planted:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------------------- the LMDB records


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_record_of_any_protocol_loads_as_its_pixels(protocol, tmp_path):
    pixels = item_pixels(3)
    value = pickle.dumps(LMDB_Image(pixels, "v0004"), protocol=protocol)
    assert is_pickle(value)
    assert np.array_equal(decoded(record_png(value, "4", tmp_path)), pixels)
    grey = pickle.dumps(LMDB_Image(pixels[:, :, :1], "g"), protocol=protocol)
    assert np.array_equal(decoded(record_png(grey, "g", tmp_path)), pixels[:, :, 0])


def test_a_pickle_naming_any_other_global_is_refused_and_nothing_runs(tmp_path):
    import lmdb

    marker = tmp_path / "ran"
    nested = LMDB_Image(item_pixels(0), "v0001")
    nested.id = Planted(marker)  # a record carrying a payload is refused too
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"7", pickle.dumps(Planted(marker)))
        txn.put(b"8", pickle.dumps(nested, protocol=0))
    env.close()
    store = LmdbImageStore(tmp_path / "db")
    for key in ("7", "8"):
        with pytest.raises(DataError, match=rf"value for '{key}' is a Python pickle naming (posix|os)\.system; "
                                            r"pmmcache unpickles only LMDB_Image records \(refused, nothing was run\)"):
            store.get_bytes(key)
    assert not marker.exists()
    with pytest.raises(DataError, match="value for 'x' is a Python pickle of a dict"):
        record_png(pickle.dumps({"image": b"..."}), "x", tmp_path)
    bad = LMDB_Image(item_pixels(0), "v0001")
    bad.image = bad.image[:-1]
    with pytest.raises(DataError, match=r"record of key 'b' holds 2303 bytes, not height x width x channels"):
        record_png(pickle.dumps(bad), "b", tmp_path)
    store.close()


def test_the_key_scheme_both_ways(tmp_path):
    assert [released_key(name) for name in ("v12345", "v0042", "12", "v", "abc", "v1x")] == [
        "12345", "42", "12", None, None, None]
    import lmdb

    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "shop_users.tsv").write_text("u\tv0042 plain v0007\n")
    (folder / "shop_items_texts.tsv").write_text("v0042\tA\nplain\tB\nv0007\tC\n")
    env = lmdb.open(str(folder / "shop.lmdb"), map_size=1 << 22)
    png = record_png(pickle.dumps(LMDB_Image(item_pixels(1), "x")), "x", tmp_path)
    with env.begin(write=True) as txn:
        txn.put(b"42", pickle.dumps(LMDB_Image(item_pixels(1), "v0042")))  # released: number without the v
        txn.put(b"plain", png)  # other tools: the item name itself
    env.close()
    raw = read_pmmrec(folder, "shop")
    assert raw.image_keys == {"v0042": "42", "plain": "plain"}  # v0007 has no image under either key
    assert raw.image_store.get_bytes("42") == png  # the record is served as the same PNG bytes


# ------------------------------------------------------------------------------- layout and preprocessing


def test_layout_is_found_by_suffix_whatever_the_prefix_and_can_be_named(released, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(released["data"], data)
    dataset = resolve_dataset(FOLDER, data, tmp_path / "cache", PrepareConfig(**DATA))
    assert dataset.item_keys()[:2] == [f"{FOLDER}/v0001", f"{FOLDER}/v0002"]  # the source is the folder's name
    report = dataset.report["sources"][FOLDER]
    assert report["items_without_image"] == 0 and report["users_too_short"] == 2
    assert dataset.items.column("image_key").to_pylist()[:2] == ["1", "2"]

    shutil.copy(data / FOLDER / f"{PREFIX}_users.tsv", data / FOLDER / "other_users.tsv")
    with pytest.raises(PmmcacheError, match=r"more than one users file \(\*_users.tsv\) \(bilibili_tiny_users.tsv, "
                                            r"other_users.tsv\); name the one to read with --users"):
        resolve_dataset(FOLDER, data, tmp_path / "cache2", PrepareConfig(**DATA))
    (data / FOLDER / "other_users.tsv").write_text("w\tv0001 v0002 v0003\n")
    named = cli("prepare", "--dataset", FOLDER, "--data-dir", data, "--cache-dir", tmp_path / "cache3",
                "--min-core", "0", "--users", "other_users.tsv", "--texts", data / FOLDER / f"{PREFIX}_items_texts.tsv")
    assert json.loads(named.stdout)["counts"]["users"] == 1
    result = cli("prepare", "--dataset", FOLDER, "--data-dir", data, "--cache-dir", tmp_path / "cache3",
                 "--users", "nope.tsv", code=2)
    assert "nope.tsv: users file not found" in result.stderr
    result = cli("prepare", "--dataset", "demo", "--data-dir", data, "--users", "x.tsv", code=2)
    assert "name the files of a dataset folder; 'demo' has its own" in result.stderr


def test_the_released_preprocessing_options(released, tmp_path):
    keep = MAX_SEQ_LEN + 3  # the released code's cut
    plain = resolve_dataset(FOLDER, released["data"], tmp_path / "a", PrepareConfig(**DATA))
    cut = resolve_dataset(FOLDER, released["data"], tmp_path / "b",
                          PrepareConfig(min_core=0, keep_last=keep, lowercase_text=True))
    raw = sequences()
    keys = cut.item_keys()
    stored = {user: [keys[i - 1].split("/")[1] for i in items]
              for user, items in zip(cut.users.column("key").to_pylist(), cut.users.column("items").to_pylist())}
    assert stored == {f"{FOLDER}/{u}": items[-keep:] for u, items in raw.items() if len(items) >= 3}
    assert cut.items.column("text").to_pylist()[0] == "the red cat 0"  # released: title.lower()
    assert plain.items.column("text").to_pylist()[0] == "The Red Cat 0"
    assert cut.report["sources"][FOLDER]["interactions_cut_by_keep_last"] == sum(max(0, len(s) - keep)
                                                                               for s in raw.values())
    # Items that only the cut part held leave the catalogue, as in the released code.
    folder = tmp_path / "raw" / "mini"
    folder.mkdir(parents=True)
    (folder / "mini_users.tsv").write_text("a\tx y z w q\nb\tz w q\n")
    (folder / "mini_items_texts.tsv").write_text("x\tX\ny\tY\nz\tZ\nw\tW\nq\tQ\n")
    mini = resolve_dataset("mini", tmp_path / "raw", tmp_path / "c", PrepareConfig(min_core=0, keep_last=3))
    assert mini.item_keys() == ["mini/z", "mini/w", "mini/q"]
    assert resolve_dataset("mini", tmp_path / "raw", tmp_path / "c", PrepareConfig(min_core=0)).num_items == 5


def test_convert_images_rewrites_records_as_png_once(released, tmp_path):
    source = released["data"] / FOLDER / f"{PREFIX}_items_images.lmdb"
    target = tmp_path / "images.lmdb"
    out = cli("convert-images", source, target)
    assert f"{NUM_ITEMS} keys, {NUM_ITEMS} records re-encoded as PNG" in out.stdout
    converted, original = LmdbImageStore(target), LmdbImageStore(source)
    assert converted.keys() == original.keys() == {str(i + 1) for i in range(NUM_ITEMS)}
    values = dict(converted.stored_values())
    for i in range(NUM_ITEMS):
        value = values[str(i + 1).encode()]
        assert value[:8] == b"\x89PNG\r\n\x1a\n" and np.array_equal(decoded(value), item_pixels(i))
    # The same bytes the record store serves: a dataset read from either has the same fingerprint.
    again = resolve_dataset(FOLDER, released["data"], tmp_path / "c1", PrepareConfig(**DATA, images=str(target)))
    assert again.fingerprint == resolve_dataset(FOLDER, released["data"], tmp_path / "c2", PrepareConfig(**DATA)).fingerprint
    assert "already exists" in cli("convert-images", source, target, code=2).stderr
    converted.close()
    original.close()


# ------------------------------------------------------------------------------- the whole pipeline


def test_the_released_layout_goes_through_extract_train_and_eval(released, tmp_path):
    from pmmcache import cache as cache_io

    (path,) = (released["cache"] / FOLDER).glob("*.h5")
    manifest = cache_io.read_manifest(path)
    assert manifest["dataset"]["num_items"] == NUM_ITEMS
    modality = np.asarray(cache_io.open_maps(path, names={"modality"})["modality"])
    assert modality[1:].all()  # every item has its text and its (pickled, raw-pixel) image
    run_dir = train.run(from_dict(TrainConfig, train_settings(
        released, tmp_path, "scratch", model={"item_tower": {"d_model": 16, "fusion_heads": 2},
                                              "user_encoder": {"d_model": 16, "max_len": MAX_SEQ_LEN + 1}})),
        show_progress=False).run_dir
    out = cli("eval", "--full-rank", "--run", run_dir)
    assert "valid" in out.stdout and "test" in out.stdout
    assert json.loads((run_dir / "eval-full-rank.json").read_text())


# ------------------------------------------------------------------------------- import-checkpoint


def test_import_maps_every_released_key_and_fine_tunes_with_each_transfer(released, tmp_path):
    run = tmp_path / "runs" / "pmmrec-released"
    out = cli("import-checkpoint", released["checkpoint"], "--run", run, "--dataset", FOLDER, "--data-dir",
              released["data"], "--cache-dir", released["cache"], *encoder_args(released), "--fusion-heads", "2",
              "--set", "data.min_core=0")
    assert "unmapped keys (0): none" in out.stdout
    record = json.loads((run / "import.json").read_text())
    assert set(record["ignored"]) == {"fusion_module.token_type_embeddings.weight",
                                      "text_encoder.bert_model.pooler.dense.weight",
                                      "text_encoder.bert_model.pooler.dense.bias"}
    state = released["state"]
    assert set(state) == ({k for keys in record["mapped"].values() for k in keys} | set(record["lower"])
                          | set(record["ignored"]))  # every checkpoint key is accounted for
    assert record["lower_fingerprints"].keys() == {"text", "image"}
    assert Path(record["cache"]).parent == released["cache"] / FOLDER  # the cache these encoders made
    assert f"the cache of these encoders: {record['cache']}" in out.stdout

    s, _ = load_run(run)  # eval and recommend read it as a trained run
    tower, users = s.model.item_tower, s.model.user_encoder
    assert torch.equal(tower.text_proj.weight, state["text_encoder.text_proj.weight"])
    assert torch.equal(tower.text_top.blocks["1"].attention.self.query.weight,
                       state["text_encoder.bert_model.encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(tower.vision_top.final_norm.weight, state["cv_encoder.image_net.vision_model.post_layernorm.weight"])
    fusion = "fusion_module.MergeAtt_layers.0.self_att."
    assert torch.equal(tower.fusion.self_attn.in_proj_bias,
                       torch.cat([state[f"{fusion}self.{n}.bias"] for n in ("query", "key", "value")]))
    block = "user_encoder.transformer_encoder.transformer_blocks.1.multi_head_attention."
    assert torch.equal(users.blocks[1].self_attn.in_proj_weight,
                       torch.cat([state[f"{block}{n}.weight"] for n in ("w_Q", "w_K", "w_V")]))
    assert torch.equal(users.position_embedding.weight[1:],
                       state["user_encoder.transformer_encoder.position_embedding.weight"])
    assert not users.blocks[0].self_attn.in_proj_bias.any() and not users.position_embedding.weight[0].any()
    assert s.model.config.item_tower.pooling == "mean" and s.model.config.user_encoder.max_len == MAX_SEQ_LEN + 1
    title = cli("recommend", "--run", run, "--history", f"{FOLDER}/v0001 {FOLDER}/v0008", "--top", "3").stdout
    assert "The " in title.splitlines()[1]  # the item's title beside its key

    tuned = train.run(from_dict(TrainConfig, train_settings(released, tmp_path / "runs", "full", init=str(run))),
                      show_progress=False).run_dir
    assert json.loads((tuned / "transfer.json").read_text())["transfer"] == "full"
    for transfer, same, fresh in (("item", "item_tower", "user_encoder"), ("user", "user_encoder", "item_tower")):
        part = setup(from_dict(TrainConfig, train_settings(released, tmp_path / "runs", transfer, init=str(run),
                                                           transfer=transfer)), torch.device("cpu"))
        assert part.transfer["fresh"] == [fresh]
        for key, value in getattr(part.model, same).state_dict().items():
            assert torch.equal(value, getattr(s.model, same).state_dict()[key]), (transfer, key)
        key = next(iter(getattr(s.model, fresh).state_dict()))  # starts fresh: not the imported tensor
        assert not torch.equal(getattr(part.model, fresh).state_dict()[key], getattr(s.model, fresh).state_dict()[key])


def test_the_imported_model_computes_what_the_released_code_computes(released, tmp_path):
    """Item and user vectors of the imported run against the released forward written from its code
    (tests/helpers/released.py) on the released tensors: the map puts every tensor where that code reads it."""
    import_checkpoint(import_config(released, tmp_path / "run"), show=lambda _: None)
    s, _ = load_run(tmp_path / "run")
    state, tower = released["state"], s.model.item_tower
    items = torch.arange(1, NUM_ITEMS + 1)
    states = s.store.get(items, trim_text=False)
    with torch.no_grad():
        text = tower.text_top(states.text.float(), states.text_mask.long())  # the encoder's own top blocks
        image = tower.vision_top(states.image.float(), final_norm=False)  # released: CLIP's last_hidden_state
        reference = released_item_vectors(state, text, states.text_mask, image, heads=2)
        vectors = s.model.encode_items(states).vector
        torch.testing.assert_close(vectors, reference, rtol=1e-4, atol=1e-5)
        histories, _ = s.dataset.split_arrays("test", MAX_SEQ_LEN)
        full = torch.from_numpy(histories[(histories > 0).all(1)]).long()  # users with a whole history
        table = torch.cat([torch.zeros(1, vectors.shape[1]), vectors])
        torch.testing.assert_close(s.model.user_vectors(table[full], full == 0),
                                   released_user_vectors(state, table[full], heads=2), rtol=1e-4, atol=1e-5)
    assert len(full) >= 10


def test_a_text_only_checkpoint_imports_as_a_text_tower_of_mean_projected_tokens(released, tmp_path):
    """The released "text-only" item tower: the masked mean of text_proj over the last hidden state."""
    state = {k: v for k, v in released["state"].items() if not k.startswith(("cv_encoder.", "fusion_module."))}
    checkpoint = tmp_path / "text-only.pt"
    torch.save({"model_state_dict": state}, checkpoint)
    shown: list[str] = []
    config = import_config(released, tmp_path / "run", checkpoint)
    report = import_checkpoint(config, show=shown.append)
    assert report.unmapped == [] and set(report.lower_fingerprints) == {"text"}
    assert any("the cache of these encoders" in line for line in shown)  # a text-only model reads the text+image cache
    s, _ = load_run(tmp_path / "run")
    assert s.model.config.item_tower.modalities == ("text",)
    states = s.store.get(torch.arange(1, NUM_ITEMS + 1), trim_text=False)
    with torch.no_grad():
        tokens = torch.nn.functional.linear(s.model.item_tower.text_top(states.text.float(), states.text_mask.long()),
                                            state["text_encoder.text_proj.weight"], state["text_encoder.text_proj.bias"])
        mask = states.text_mask.float()[..., None]
        torch.testing.assert_close(s.model.encode_items(states).vector, (tokens * mask).sum(1) / mask.sum(1),
                                   rtol=1e-4, atol=1e-5)


def test_import_may_come_before_extraction_and_says_so(released, tmp_path):
    shown: list[str] = []
    config = dataclasses.replace(import_config(released, tmp_path / "run"), cache_dir=tmp_path / "empty")
    import_checkpoint(config, show=shown.append)
    assert any(f"no cache of these encoders for {FOLDER} in {tmp_path / 'empty'} yet: run `pmmcache extract "
               f"--dataset {FOLDER}`" in line for line in shown)
    assert json.loads((tmp_path / "run" / "import.json").read_text())["cache"] is None


def test_lower_blocks_that_are_not_the_caches_encoders_are_refused(released, tmp_path):
    state = dict(released["state"])
    key = "text_encoder.bert_model.embeddings.word_embeddings.weight"
    state[key] = state[key] + 1e-3
    checkpoint = tmp_path / "other.pt"
    torch.save({"model_state_dict": state}, checkpoint)
    with pytest.raises(PmmcacheError, match=rf"text lower blocks are not those of the cache's text encoder .*"
                                            rf"1 tensors differ \(e.g. {key}\)"):
        import_checkpoint(import_config(released, tmp_path / "run", checkpoint), show=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_names_saved_under_transformers_5_and_ddp_read_the_same(released, tmp_path):
    """transformers 5 drops CLIPVisionModel's `vision_model.` from the keys; DDP adds `module.`."""
    vision = "cv_encoder.image_net.vision_model."
    state = {"module." + (k.replace(vision, "cv_encoder.image_net.") if k.startswith(vision) else k): v
             for k, v in released["state"].items()}
    checkpoint = tmp_path / "renamed.pt"
    torch.save({"model_state_dict": state}, checkpoint)
    report = import_checkpoint(import_config(released, tmp_path / "run", checkpoint), show=lambda _: None)
    assert report.unmapped == [] and "item_tower.vision_top.final_norm.weight" in report.mapped


def test_a_checkpoint_that_needs_unpickling_code_is_refused(released, tmp_path):
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "planted.pt"
    torch.save({"model_state_dict": released["state"], "optimizer": Planted(marker)}, checkpoint)
    with pytest.raises(PmmcacheError, match=r"not loadable as plain tensors \(torch.load weights_only=True: UnpicklingError: Trying to load "
                                            r"unsupported GLOBAL posix.system.*never unpickles a checkpoint"):
        import_checkpoint(import_config(released, tmp_path / "run", checkpoint), show=lambda _: None)
    assert not marker.exists()


def test_a_known_model_written_under_released_names_imports_back_exactly(released, tmp_path):
    """pmmcache model -> released names (the inverse map) -> import-checkpoint -> the same tensors and item vectors."""
    e = released["encoders"]
    config = from_dict(PMMRecConfig, {
        "item_tower": {"d_model": 16, "fusion_heads": 2, "fusion_ffn": 64, "pooling": "mean", "modality_vector": "mean",
                       "fuse_modality_cls": True, "projection": "linear", "vision_final_norm": False},
        "user_encoder": {"d_model": 16, "n_heads": 2, "ffn": 64, "max_len": MAX_SEQ_LEN + 1, "init": "xavier"},
        "nid_head": False})
    text, vision = load_encoders(from_dict(TrainConfig, {"encoders": e}).encoders, FOLDER)
    known = build_pmmrec(config, text, vision).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in known.named_parameters():
            if "blocks" in name and "_top." in name:
                continue  # the top blocks keep the encoder's weights
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        for block in known.user_encoder.blocks:  # the released attention has no biases
            block.self_attn.in_proj_bias.zero_()
            block.self_attn.out_proj.bias.zero_()
        known.user_encoder.position_embedding.weight[0].zero_()  # a position the released model does not have
    checkpoint = tmp_path / "known.pt"
    torch.save({"model_state_dict": released_state_dict(known, lower_tensors(text, vision))}, checkpoint)

    report = import_checkpoint(import_config(released, tmp_path / "run", checkpoint), show=lambda _: None)
    assert report.unmapped == [] and report.ignored == {}
    s, _ = load_run(tmp_path / "run")
    assert s.model.config == known.config  # the architecture too
    for part in ("item_tower", "user_encoder"):
        mine, theirs = known.part(part).state_dict(), s.model.part(part).state_dict()
        assert mine.keys() == theirs.keys()
        assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == [], part
    with torch.no_grad():
        assert torch.equal(item_table(known, s.store), item_table(s.model, s.store))
    known.user_encoder.blocks[0].self_attn.out_proj.bias.data[0] = 1.0
    with pytest.raises(PmmcacheError, match="out_proj.bias is not zero; the released model has no such parameter"):
        released_state_dict(known, {})


def test_import_refuses_an_open_clip_vision_encoder(released, tmp_path):
    other = from_dict(ImportConfig, {"checkpoint": str(released["checkpoint"]), "run": str(tmp_path / "run"),
                                     "dataset": FOLDER, "fusion_heads": 2,
                                     "encoders": {**released["encoders"], "vision_encoder": "pmmcache-tiny-vit",
                                                  "vision_weights": "random"}})
    with pytest.raises(PmmcacheError, match="transformers CLIPVisionModel.*pass --vision-encoder DIR"):
        import_checkpoint(other, show=lambda _: None)
