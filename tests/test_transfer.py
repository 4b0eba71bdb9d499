"""Transfer settings (paper III-E, Table V), ablation switches (Table VIII) and the baselines that share
PMMRec's loop and evaluator: SASRec with item IDs and MoRec++ (late-fusion multimodal towers).

Runs reuse the tiny toy dataset and cache of test_train.py (2-block BERT + tiny ViT, d = 32).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pmmcache import train
from pmmcache.batches import prepare_batch
from pmmcache.config import from_dict, to_dict
from pmmcache.corruption import corrupt_sequences
from pmmcache.encoders.config import EncoderConfig
from pmmcache.errors import ConfigError
from pmmcache.extract import run as extract
from pmmcache.items import ItemStore
from pmmcache.objectives import catalogue_dap_loss
from pmmcache.run_config import ObjectiveConfig, TrainConfig
from pmmcache.runs import Setup, setup, trained_setup

from helpers.toy import Toy, extract_config, train_config


@pytest.fixture(scope="module")
def source_run(toy, tmp_path_factory) -> Path:
    """A multimodal pre-training run whose every part has moved away from its initial values."""
    config = train_config(toy, tmp_path_factory.mktemp("runs"), "source", epochs=1, lr=1e-2)
    return train.run(config, show_progress=False).run_dir


def saved(run_dir: Path, part: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "best" / f"{part}.safetensors"))


def assert_equal_to(module: torch.nn.Module, tensors: dict[str, torch.Tensor], keys: list[str]) -> None:
    own = module.state_dict()
    assert keys, "nothing to compare"
    for key in keys:
        assert torch.equal(own[key], tensors[key]), key


def assert_differs_from(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    own = {k: v for k, v in module.state_dict().items() if k.startswith(prefix)}
    assert own
    assert any(not torch.equal(v, tensors[k]) for k, v in own.items() if v.is_floating_point()), prefix


def finetune_setup(toy: Toy, source: Path, tmp_path: Path, **overrides) -> Setup:
    config = train_config(toy, tmp_path, "target", stage="finetune", init=str(source), **overrides)
    return setup(config, torch.device("cpu"))


def test_full_transfer_loads_item_towers_and_user_encoder(toy, source_run, tmp_path):
    s = finetune_setup(toy, source_run, tmp_path, transfer="full")
    items, users = saved(source_run, "item_tower"), saved(source_run, "user_encoder")
    assert_equal_to(s.model.item_tower, items, list(items))
    assert_equal_to(s.model.user_encoder, users, list(users))
    assert s.model.nid_head is None  # fine-tuning trains DAP only
    assert s.transfer["loaded"].keys() == {"item_tower", "user_encoder"} and s.transfer["fresh"] == []


def test_item_transfer_keeps_a_fresh_user_encoder(toy, source_run, tmp_path):
    s = finetune_setup(toy, source_run, tmp_path, transfer="item")
    items = saved(source_run, "item_tower")
    assert_equal_to(s.model.item_tower, items, list(items))
    assert_differs_from(s.model.user_encoder, saved(source_run, "user_encoder"), "")
    assert s.transfer["fresh"] == ["user_encoder"]


def test_user_transfer_takes_item_towers_from_the_original_encoders(toy, source_run, tmp_path):
    s = finetune_setup(toy, source_run, tmp_path, transfer="user")
    users = saved(source_run, "user_encoder")
    assert_equal_to(s.model.user_encoder, users, list(users))
    scratch = setup(train_config(toy, tmp_path, "scratch", stage="finetune"), torch.device("cpu")).model
    tops = [k for k in scratch.item_tower.state_dict() if k.startswith(("text_top.", "vision_top."))]
    assert_equal_to(s.model.item_tower, scratch.item_tower.state_dict(), tops)  # the pretrained encoders' blocks
    assert_differs_from(s.model.item_tower, saved(source_run, "item_tower"), "text_top.")  # not the source run's


@pytest.mark.parametrize("modality, prefixes", [("text", ("text_top.", "text_proj.")),
                                                ("image", ("vision_top.", "vision_proj."))])
def test_single_modality_transfer_loads_only_that_tower(modality, prefixes, toy, source_run, tmp_path):
    s = finetune_setup(toy, source_run, tmp_path, modalities=[modality])
    assert s.model.config.item_tower.modalities == (modality,)
    own = list(s.model.item_tower.state_dict())
    assert own and all(k.startswith(prefixes) for k in own)  # no other tower, no fusion block
    assert_equal_to(s.model.item_tower, saved(source_run, "item_tower"), own)
    assert_equal_to(s.model.user_encoder, saved(source_run, "user_encoder"), list(saved(source_run, "user_encoder")))
    not_used = s.transfer["not_used"]["item_tower"]
    assert any(k.startswith("fusion.") for k in not_used) and not any(k.startswith(prefixes) for k in not_used)


MEAN_MODEL = {"item_tower": {"d_model": 32, "fusion_heads": 2, "pooling": "modality_mean"}, "user_encoder": {"d_model": 32}}


@pytest.fixture(scope="module")
def mean_source_run(toy, tmp_path_factory) -> Path:
    """A multimodal pre-training run whose item vector is not a CLS token (modality-mean pooling)."""
    config = train_config(toy, tmp_path_factory.mktemp("runs"), "mean-source", epochs=1, lr=1e-2, model=MEAN_MODEL)
    return train.run(config, show_progress=False).run_dir


@pytest.mark.parametrize("modality", ["text", "image"])
def test_single_modality_transfer_vector_is_the_pretrained_cls(modality, toy, mean_source_run, tmp_path):
    # Paper III-E: a text-only (vision-only) transfer represents an item by t^cls (v^cls), the
    # vector NICL aligned in pre-training, whatever the multimodal run pooled its items with.
    source = trained_setup(mean_source_run, torch.device("cpu"))
    single = finetune_setup(toy, mean_source_run, tmp_path, modalities=[modality], model=MEAN_MODEL)
    states = source.store.get(torch.arange(1, 9))
    with torch.no_grad():
        pretrained = source.model.eval().encode_items(states)
        vector = single.model.eval().encode_items(states).vector
    expected = pretrained.text_cls if modality == "text" else pretrained.image_cls
    torch.testing.assert_close(vector, expected, rtol=1e-5, atol=1e-5)
    assert (pretrained.vector - expected).abs().max() > 1e-3  # the fused vector is something else


def test_a_text_only_model_needs_only_the_text_cache(toy, source_run, tmp_path):
    config = extract_config(toy, cache_dir=tmp_path / "cache")
    extract(dataclasses.replace(config, encoders=dataclasses.replace(config.encoders, modalities=("text",))),
            show_progress=False)
    assert len(list((tmp_path / "cache").rglob("*.h5"))) == 1
    config = train_config(toy, tmp_path / "runs", "text-only", stage="finetune", init=str(source_run),
                          modalities=["text"], cache_dir=str(tmp_path / "cache"), epochs=1)
    result = train.run(config, show_progress=False)
    assert result.metrics["test"]["users"] > 0
    record = json.loads((result.run_dir / "transfer.json").read_text())
    assert record["transfer"] == "full" and "vision_proj.weight" in record["not_used"]["item_tower"]


def test_text_only_from_scratch_and_a_modality_the_init_lacks(toy, source_run, tmp_path):
    scratch = setup(train_config(toy, tmp_path, "t", stage="finetune", modalities=["text"]), torch.device("cpu"))
    assert scratch.model.config.item_tower.modalities == ("text",) and scratch.transfer is None
    text_run = train.run(train_config(toy, tmp_path, "text-run", epochs=1, modalities=["text"],
                                      objectives={"nicl": 0.0}), show_progress=False).run_dir
    with pytest.raises(ConfigError, match="has only"):
        finetune_setup(toy, text_run, tmp_path, modalities=["image"])


# ------------------------------------------------------------------------------------------ ablations


def step_losses(model: train.PMMRec, objectives: ObjectiveConfig, store, weights) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[1, 2, 3, 4], [0, 5, 6, 7], [8, 9, 10, 11]])
    unique, inverse = torch.unique(ids, return_inverse=True)
    corrupted, labels = corrupt_sequences(ids[:, :-1], 0.3, 0.2, torch.Generator().manual_seed(0))
    step = train.TrainingStep(model, objectives, weights, None)
    return step(ids, inverse, store.get(unique), torch.searchsorted(unique, corrupted), labels)


@pytest.mark.parametrize("ablation, terms, variant", [
    ("none", {"dap", "nicl", "nid", "rcl"}, "nicl"),
    ("no-nicl", {"dap", "nid", "rcl"}, "nicl"),
    ("vcl-only", {"dap", "nicl", "nid", "rcl"}, "vcl"),
    ("icl-only", {"dap", "nicl", "nid", "rcl"}, "icl"),
    ("no-nid", {"dap", "nicl", "rcl"}, "nicl"),
    ("no-rcl", {"dap", "nicl", "nid"}, "nicl"),
])
def test_ablation_switches_change_the_loss_terms(ablation, terms, variant, toy, tmp_path, monkeypatch):
    config = train_config(toy, tmp_path, "ablation", objectives={"ablation": ablation})
    assert config.objectives.nicl_variant == variant and set(config.weights) == terms
    assert from_dict(TrainConfig, to_dict(config)) == config  # a saved ablation reloads as itself
    variants = []
    real = train.nicl_loss
    monkeypatch.setattr(train, "nicl_loss", lambda *a, **k: variants.append(a[3]) or real(*a, **k))
    s = setup(config, torch.device("cpu"))
    losses = step_losses(s.model, config.objectives, s.store, config.weights)
    assert set(losses) == terms and all(torch.isfinite(v) for v in losses.values())
    assert variants == ([variant] if "nicl" in terms else [])


def test_an_ablation_with_another_value_of_a_setting_it_sets_is_an_error_naming_both():
    with pytest.raises(ConfigError, match=r"objectives.ablation = no-nicl sets objectives.nicl = 0.0, but "
                                          r"objectives.nicl = 1.0 is set too"):
        from_dict(ObjectiveConfig, {"ablation": "no-nicl", "nicl": 1})  # explicitly the default value
    with pytest.raises(ConfigError, match=r"objectives.nicl_variant = vcl, but objectives.nicl_variant = icl"):
        ObjectiveConfig(ablation="vcl-only", nicl_variant="icl")
    assert from_dict(ObjectiveConfig, {"ablation": "no-nicl", "nicl": 0}).nicl == 0  # the same value agrees


def test_pretraining_without_dap_trains_the_other_objectives_and_finetuning_needs_dap(toy, tmp_path):
    config = train_config(toy, tmp_path, "no-dap", objectives={"dap": 0.0})
    assert set(config.weights) == {"nicl", "nid", "rcl"}
    s = setup(config, torch.device("cpu"))
    losses = step_losses(s.model, config.objectives, s.store, config.weights)
    assert set(losses) == {"nicl", "nid", "rcl"} and all(torch.isfinite(v) for v in losses.values())
    # A whole run (step, gradient norms, evaluation, checkpoint) records the three and no DAP.
    result = train.run(from_dict(TrainConfig, {**to_dict(config), "epochs": 1}), show_progress=False)
    record = json.loads((result.run_dir / "metrics.jsonl").read_text())
    assert {"train_nicl", "train_nid", "train_rcl"} <= set(record) and not any("dap" in key for key in record)
    assert record["train_loss"] == pytest.approx(record["train_nicl"] + record["train_nid"] + record["train_rcl"],
                                                 rel=1e-5)
    with pytest.raises(ConfigError, match="fine-tuning trains DAP alone"):
        train_config(toy, tmp_path, "no-dap", stage="finetune", objectives={"dap": 0.0})
    with pytest.raises(ConfigError, match="nothing to train"):
        train_config(toy, tmp_path, "none", objectives={"dap": 0.0, "nicl": 0.0, "nid": 0.0, "rcl": 0.0})


def test_the_step_passes_each_objective_its_settings(toy, tmp_path, monkeypatch):
    # Working forms by default: NICL/RCL at temperature 0.1, NID over plain logits, logQ in NICL.
    assert (ObjectiveConfig().temperature, ObjectiveConfig().nid_relu, ObjectiveConfig().logq) == (0.1, False, True)
    seen: dict = {}
    for name in ("nicl_loss", "nid_loss", "rcl_loss"):
        real = getattr(train, name)
        monkeypatch.setattr(train, name, lambda *a, _real=real, _name=name, **k: seen.setdefault(_name, (a, k)) and _real(*a, **k))
    config = train_config(toy, tmp_path, "settings", objectives={"temperature": 0.25, "nid_relu": True})
    s = setup(config, torch.device("cpu"))
    log_pop = train.log_sampling_probability(s.dataset.train_item_counts())
    ids = torch.tensor([[1, 2, 3, 4], [0, 5, 6, 7], [8, 9, 10, 11]])
    unique, inverse = torch.unique(ids, return_inverse=True)
    corrupted, labels = corrupt_sequences(ids[:, :-1], 0.3, 0.2, torch.Generator().manual_seed(0))
    step = train.TrainingStep(s.model, config.objectives, config.weights, log_pop)
    step(ids, inverse, s.store.get(unique), torch.searchsorted(unique, corrupted), labels)
    nicl_args, rcl_args, nid_kwargs = seen["nicl_loss"][0], seen["rcl_loss"][0], seen["nid_loss"][1]
    assert nicl_args[4] == 0.25 and nicl_args[6] is step.log_popularity and rcl_args[2] == 0.25
    assert nid_kwargs == {"relu": True}


# ------------------------------------------------------------------------------------------ baselines


def test_catalogue_dap_loss_is_cross_entropy_over_every_item():
    torch.manual_seed(0)
    states, table = torch.randn(2, 3, 4), torch.randn(6, 4)
    ids = torch.tensor([[0, 2, 5, 1], [3, 4, 6, 6]])
    loss = catalogue_dap_loss(states, table, ids)
    rows = [(0, 1, 5), (0, 2, 1), (1, 0, 4), (1, 1, 6), (1, 2, 6)]  # (user, position, target) with real input
    expected = torch.stack([torch.nn.functional.cross_entropy((states[u, t] @ table.T)[None], torch.tensor([y - 1]))
                            for u, t, y in rows]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    log_pop = torch.log(torch.arange(1.0, 8.0))
    assert not torch.allclose(catalogue_dap_loss(states, table, ids, log_pop), loss)


def test_encoding_the_catalogue_once_is_the_same_step_with_one_item_tower_pass(toy, tmp_path):
    config = train_config(toy, tmp_path, "once", objectives={"negatives": "catalogue", "logq": False})
    s = setup(config, torch.device("cpu"))
    s.model.eval()  # no dropout: the two ways must then agree exactly
    catalogue = s.store.get(torch.arange(1, s.store.num_items + 1))
    ids = torch.tensor([[1, 2, 3, 4], [0, 5, 6, 7], [8, 9, 10, 11]])  # padding included
    unique, inverse = torch.unique(ids, return_inverse=True)
    corrupted, labels = corrupt_sequences(ids[:, :-1], 0.3, 0.2, torch.Generator().manual_seed(0))
    inputs = (ids, inverse, s.store.get(unique), torch.searchsorted(unique, corrupted), labels)
    passes = []
    hook = s.model.item_tower.register_forward_hook(lambda module, args, out: passes.append(len(out.vector)))
    results = {}
    for way in ("twice", "once"):
        passes.clear()
        objectives = dataclasses.replace(config.objectives, encode_catalogue=way)
        step = train.TrainingStep(s.model, objectives, config.weights, None, catalogue)
        # once: the batch's own states are not needed (`prepare_batch(read_states=False)` leaves them None)
        losses = step(*inputs) if way == "twice" else step(inputs[0], inputs[1], None, *inputs[3:])
        s.model.zero_grad()
        sum(losses.values()).backward()
        grads = {name: p.grad.clone() for name, p in s.model.named_parameters() if p.grad is not None}
        results[way] = (losses, grads, list(passes))
    hook.remove()
    (twice, twice_grads, twice_passes), (once, once_grads, once_passes) = results["twice"], results["once"]
    assert set(twice) == set(once) == {"dap", "nicl", "nid", "rcl"}
    for name in twice:
        torch.testing.assert_close(once[name], twice[name], rtol=1e-5, atol=1e-6)
    assert set(once_grads) == set(twice_grads)
    for name in twice_grads:
        torch.testing.assert_close(once_grads[name], twice_grads[name], rtol=1e-4, atol=1e-6)
    assert twice_passes == [len(unique), s.store.num_items] and once_passes == [s.store.num_items]


def test_training_with_the_catalogue_encoded_once_reads_no_batch_states(toy, tmp_path, monkeypatch):
    batches = []

    def spy(*args, **kwargs):
        batches.append(prepare_batch(*args, **kwargs))
        return batches[-1]

    monkeypatch.setattr(train, "prepare_batch", spy)
    reads = []
    get = ItemStore.get
    monkeypatch.setattr(ItemStore, "get", lambda self, ids: reads.append(len(ids)) or get(self, ids))
    for way in ("twice", "once"):
        batches.clear()
        reads.clear()
        config = train_config(toy, tmp_path, way, epochs=1, objectives={"negatives": "catalogue",
                                                                        "encode_catalogue": way})
        result = train.run(config, show_progress=False)
        assert batches and math.isfinite(result.metrics["valid"]["NDCG@10"])
        if way == "twice":
            assert all(b.states is not None for b in batches)
        else:  # the step takes the batch's items from the catalogue's vectors: the cache is not read for them
            assert all(b.states is None and b.items is not None for b in batches)
            num_items = setup(config, torch.device("cpu")).store.num_items
            assert reads and set(reads) <= {num_items}, reads  # the catalogue, and evaluation's item table


def test_sasrec_id_baseline_trains_and_evaluates_in_the_same_loop(toy, tmp_path):
    config = train_config(toy, tmp_path, "sasrec", stage="finetune", model={
        "items": "id", "item_tower": {"d_model": 32, "fusion_heads": 2}, "user_encoder": {"d_model": 32}},
        objectives={"negatives": "catalogue"}, train_windows="all", epochs=2, lr=1e-2)
    result = train.run(config, show_progress=False)
    run_config = json.loads((result.run_dir / "config.json").read_text())
    assert run_config["encoders"] == to_dict(EncoderConfig())  # unused by an ID model: not part of what it is
    parts = json.loads((result.run_dir / "best" / "config.json").read_text())["config"]
    assert parts["items"] == "id" and parts["num_items"] == 39
    assert set(saved(result.run_dir, "item_tower")) == {"embedding.weight"}
    assert set(result.metrics) == {"valid", "test"} and result.metrics["test"]["users"] == 39
    reloaded = trained_setup(result.run_dir, torch.device("cpu"))  # what eval / recommend / export load
    assert torch.equal(reloaded.model.item_tower.embedding.weight, saved(result.run_dir, "item_tower")["embedding.weight"])
    # Another catalogue (the toy without its last 9 items) cannot take the ID embeddings.
    other = tmp_path / "other" / "toy"
    shutil.copytree(toy.data_dir / "toy", other)
    titles = other / "toy_items_texts.tsv"
    titles.write_text("".join(titles.read_text().splitlines(keepends=True)[:30]))
    with pytest.raises(ConfigError, match="cannot transfer to another catalogue"):
        setup(train_config(toy, tmp_path, "x", stage="finetune", init=str(result.run_dir),
                                 model={}, data_dir=str(other.parent), cache_dir=str(tmp_path / "other-cache")),
                    torch.device("cpu"))


def test_morec_plus_plus_fuses_pooled_modalities_with_one_linear_layer(toy, tmp_path):
    config = train_config(toy, tmp_path, "morec", stage="finetune", model={
        "item_tower": {"d_model": 32, "fusion_heads": 2, "fusion": "concat"}, "user_encoder": {"d_model": 32}})
    s = setup(config, torch.device("cpu"))
    tower = s.model.item_tower
    names = {k.split(".")[0] for k in tower.state_dict()}
    assert names == {"text_top", "text_proj", "vision_top", "vision_proj", "concat_fusion"}
    out = tower(s.store.get(torch.arange(1, 6)))
    expected = tower.concat_fusion(torch.cat([out.text_cls, out.image_cls], dim=-1))
    assert torch.allclose(out.vector, expected, atol=1e-6)
    assert train.run(config, show_progress=False).metrics["test"]["users"] == 39


def test_training_windows_make_every_training_item_a_target(toy, tmp_path):
    config = train_config(toy, tmp_path, "windows", train_windows="all", max_len=3, epochs=1,
                          model={"item_tower": {"d_model": 32, "fusion_heads": 2},
                                 "user_encoder": {"d_model": 32, "max_len": 4}})
    sequences, _ = train.training_sequences(train.setup(config, torch.device("cpu")).dataset, config)
    assert len(sequences) == 39 * 2  # 6 training items per user: windows of 4 items, overlapping by one
    prefixes = dataclasses.replace(config, train_windows="prefixes")
    sequences, predict = train.training_sequences(train.setup(prefixes, torch.device("cpu")).dataset, prefixes)
    assert len(sequences) == 39 * 5  # one window per training item after the first
    assert predict.shape == (39 * 5, 3) and predict[:, -1].all() and not predict[:, :-1].any()
    result = train.run(dataclasses.replace(prefixes, run_name="prefixes"), show_progress=False)
    assert math.isfinite(result.history[0]["train_dap"])


@pytest.mark.parametrize("args, check", [
    (["--baseline", "sasrec"], lambda c: c.model.items == "id" and c.objectives.negatives == "catalogue"),
    (["--baseline", "morec++", "--stage", "pretrain"],
     lambda c: c.model.item_tower.fusion == "concat" and set(c.weights) == {"dap"}),
    (["--baseline", "sasrec", "--set", "objectives.negatives=in_batch"], lambda c: c.objectives.negatives == "in_batch"),
    (["--ablation", "vcl-only"], lambda c: c.objectives.nicl_variant == "vcl"),
    (["--init", "runs/x", "--transfer", "user", "--modalities", "text"],
     lambda c: c.transfer == "user" and c.modalities == ("text",)),
])
def test_train_cli_settings_for_baselines_ablations_and_transfer(args, check, monkeypatch):
    from click.testing import CliRunner

    from pmmcache.cli import main

    seen = []
    monkeypatch.setattr(train, "run", lambda config: seen.append(config))
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code == 0, result.output
    assert check(seen[0])


def test_preparation_settings_reach_training(toy, tmp_path):
    """`data.*` (k-core, truncation) is part of the train config, so training sees the prepared copy it asks for."""
    loose = setup(train_config(toy, tmp_path, "loose", data={"min_core": 0, "truncate": True}), torch.device("cpu"))
    assert loose.dataset.config.min_core == 0 and loose.dataset.config.truncate  # not the defaults (5, False)


def test_a_run_made_before_a_setting_existed_resumes_with_that_setting_at_its_default(toy, tmp_path):
    train.run(train_config(toy, tmp_path, "old", epochs=1), show_progress=False)
    path = tmp_path / "old" / "config.json"
    saved = json.loads(path.read_text())
    del saved["data"], saved["model"]["items"]  # as written by a version without these settings
    path.write_text(json.dumps(saved))
    resumed = train.run(train_config(toy, tmp_path, "old", epochs=2, resume=True), show_progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert json.loads(path.read_text())["data"] == to_dict(train_config(toy, tmp_path, "old").data)


@pytest.mark.parametrize("transfer", ["full", "item", "user"])
def test_transferred_heads_get_init_lr_and_fresh_ones_lr(transfer, toy, source_run, tmp_path):
    s = finetune_setup(toy, source_run, tmp_path, transfer=transfer, lr=1e-3, init_lr=1e-5, encoder_lr=1e-4)
    groups = train.optimizer_groups(s.model, s.config)
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in groups}
    assert sum(len(group["params"]) for group in groups) == len([p for p in s.model.parameters() if p.requires_grad])
    loaded = {id(p) for part in train.TRANSFER_PARTS[transfer] for p in s.model.part(part).parameters()}
    blocks = {id(p) for p in s.model.parameter_groups()["encoder_blocks"]}
    assert by_lr[1e-4] == blocks  # the pretrained encoder blocks keep encoder_lr
    assert by_lr[1e-5] == loaded - blocks
    assert not by_lr[1e-3] & loaded
    assert bool(by_lr[1e-3]) == (transfer != "full")  # the fresh part
    scratch = setup(train_config(toy, tmp_path, "plain", stage="finetune", init_lr=1e-5), torch.device("cpu"))
    assert sorted(g["lr"] for g in train.optimizer_groups(scratch.model, scratch.config)) == [scratch.config.lr] * 2
