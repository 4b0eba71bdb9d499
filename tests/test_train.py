"""Stage 2 (`pmmcache train`): the run directory, resume equivalence, fine-tuning from a pre-trained run,
the NaN guard, config and cache errors, two processes under `accelerate launch`, and the epoch batches.

Every run trains on the toy cache (tests/helpers/toy.py, built once per session: a 2-block BERT and
the tiny ViT, top block trained) with a d = 32 model, 8 users per batch and 2 steps per epoch.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pmmcache import checkpoints as ckpt
from pmmcache import train
from pmmcache.cli import main, set_dotted
from pmmcache.config import from_dict, to_dict
from pmmcache.errors import CacheMismatchError, ConfigError, PmmcacheError
from pmmcache.evaluate import evaluate_splits
from pmmcache.extract import run as extract
from pmmcache.run_config import TrainConfig
from pmmcache.runs import setup, with_init_model, with_settings_it_predates
from pmmcache.train import epoch_batches

from helpers.tiny_models import save_tiny_bert
from helpers.toy import (LOSSES, METRICS, NAME, NUM_ITEMS, STEPS, extract_config, free_port, learned,
                         read_history, train_cli_args, train_config, train_settings)

REPO = Path(__file__).resolve().parents[1]


def model_tensors(run_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"epoch-{epoch:04d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def pretrained(toy, tmp_path_factory) -> tuple[TrainConfig, train.TrainResult]:
    """Run A: pre-training with all four losses, 3 epochs, uninterrupted."""
    config = train_config(toy, tmp_path_factory.mktemp("runs"), "pretrain")
    return config, train.run(config, show_progress=False)


# ------------------------------------------------------------------------------- 1. run directory


def test_pretrain_run_writes_config_metrics_checkpoint_best_and_eval(pretrained):
    config, result = pretrained
    run_dir = result.run_dir
    assert run_dir == Path(config.runs_dir) / "pretrain"
    assert json.loads((run_dir / "config.json").read_text()) == to_dict(with_init_model(config))  # "auto" decided

    history = read_history(run_dir)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [learned(r) for r in history] == [learned(r) for r in result.history]
    for record in history:
        losses = {name: record[f"train_{name}"] for name in LOSSES}
        assert all(math.isfinite(v) for v in losses.values()), record
        assert all(v > 0 for name, v in losses.items() if name != "nicl"), record  # eq. 8's NICL can go below 0
        scales = {name: record[f"scale_{name}"] for name in LOSSES}  # objectives.balance = grad_norm
        assert scales == {name: history[0][f"scale_{name}"] for name in LOSSES} and scales["dap"] == 1.0
        assert record["train_loss"] == pytest.approx(sum(scales[k] * v for k, v in losses.items()), rel=1e-5)
        assert all(0.0 <= record[f"valid_{m}"] <= 1.0 for m in METRICS), record
        assert record["valid_users"] == NUM_ITEMS
        assert record["lr"] == config.lr  # no warmup
        for name in LOSSES:  # every active objective pulls on the parts it reaches (a dead one shows as 0)
            for part in ("item_tower", "user_encoder"):
                norm = record[f"grad_{name}_{part}"]
                assert math.isfinite(norm) and (norm > 0) == (name != "nicl" or part == "item_tower"), (name, part)
    assert history[0]["train_loss"] != history[-1]["train_loss"]

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["epoch-0002", "epoch-0003"]  # older epochs go once the new one is complete
    for epoch in (2, 3):  # sealed with the checksum of every file
        checkpoint = run_dir / "checkpoints" / f"epoch-{epoch:04d}"
        sealed = json.loads((checkpoint / "COMPLETE").read_text())
        assert sealed["epoch"] == epoch
        assert sorted(sealed["sha256"]) == sorted(p.name for p in checkpoint.iterdir() if p.name != "COMPLETE")

    scores = [r["valid_NDCG@10"] for r in history]  # select_metric
    assert result.best_epoch == 1 + scores.index(max(scores))
    best = run_dir / "best"
    assert sorted(p.name for p in best.iterdir()) == ["config.json", "item_tower.safetensors", "metrics.json",
                                                       "nid_head.safetensors", "user_encoder.safetensors"]
    assert json.loads((best / "metrics.json").read_text()) == history[result.best_epoch - 1]

    record = json.loads((run_dir / "eval.json").read_text())
    assert record["best_epoch"] == result.best_epoch and record["mask_history"] is True
    assert sorted(record["metrics"]) == ["test", "valid"]
    for split, metrics in record["metrics"].items():
        assert metrics == pytest.approx(result.metrics[split])
        assert all(0.0 <= metrics[m] <= 1.0 for m in METRICS), metrics
        assert metrics["HR@10"] <= metrics["HR@20"] <= metrics["HR@50"] == 1.0  # 39 items < 50
        assert metrics["NDCG@10"] <= metrics["HR@10"]
    # The final valid numbers come from the best epoch's weights: the same as that epoch's evaluation.
    best_record = history[result.best_epoch - 1]
    for m in METRICS:
        assert record["metrics"]["valid"][m] == pytest.approx(best_record[f"valid_{m}"], abs=1e-6)


def test_balance_scales_level_every_objective_with_dap():
    norms = {"grad_dap_item_tower": 0.3, "grad_dap_user_encoder": 0.4,  # total 0.5
             "grad_nid_item_tower": 3.0, "grad_nid_user_encoder": 4.0,  # total 5: scaled by 0.1
             "grad_nicl_item_tower": 0.05, "grad_nicl_user_encoder": 0.0,  # total 0.05: scaled up 10x
             "grad_rcl_item_tower": 0.0, "grad_rcl_user_encoder": 0.0}  # no gradient: nothing to level
    assert train.balance_scales(norms) == pytest.approx({"dap": 1.0, "nid": 0.1, "nicl": 10.0, "rcl": 1.0})
    no_dap = {k: v for k, v in norms.items() if "dap" not in k}
    assert train.balance_scales(no_dap) == {"nid": 1.0, "nicl": 1.0, "rcl": 1.0}
    assert train.scaled_weights({"dap": 1.0, "nid": 0.5}, {"nid": 0.1}) == pytest.approx({"dap": 1.0, "nid": 0.05})


def test_balanced_pretraining_starts_with_every_pull_level_with_dap(pretrained, toy, tmp_path):
    """objectives.balance = grad_norm (default): on the first batch each auxiliary objective's gradient norm
    (item tower and user encoder together) equals DAP's; balance = none keeps eq. 12's weights (here 1)."""
    def totals(record):
        return {o: math.hypot(record[f"grad_{o}_item_tower"], record[f"grad_{o}_user_encoder"]) for o in LOSSES}

    _, result = pretrained
    first = read_history(result.run_dir)[0]
    balanced = totals(first)  # logged on the first batch, at the scales fixed on it
    for name in LOSSES:
        assert balanced[name] == pytest.approx(balanced["dap"], rel=1e-6), (name, balanced)

    plain = train.run(train_config(toy, tmp_path / "runs", "plain", epochs=1,
                                   objectives={"balance": "none"}), show_progress=False)
    (record,) = read_history(plain.run_dir)
    assert not any(k.startswith("scale_") for k in record)
    losses = {name: record[f"train_{name}"] for name in LOSSES}
    assert record["train_loss"] == pytest.approx(sum(losses.values()), rel=1e-5)  # all weights 1
    unbalanced = totals(record)  # the same first batch, unscaled: the scales are its DAP norm over its own
    for name in LOSSES:
        assert first[f"scale_{name}"] == pytest.approx(unbalanced["dap"] / unbalanced[name], rel=0.35), name
    assert max(unbalanced.values()) / min(unbalanced.values()) > 2  # the toy's pulls differ: balancing did work


def test_a_run_saved_before_balancing_existed_counts_as_unbalanced(pretrained, toy, tmp_path):
    """A pre-training config.json without objectives.balance was trained with eq. 12's weights alone: resuming
    it under today's default is refused naming the setting, and a fine-tuning run (DAP only) is unaffected."""
    _, reference = pretrained
    run_dir = tmp_path / "runs" / "pretrain"
    shutil.copytree(reference.run_dir, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    del saved["objectives"]["balance"]
    saved["runs_dir"] = str(tmp_path / "runs")  # moved with the copy
    (run_dir / "config.json").write_text(json.dumps(saved))
    assert with_settings_it_predates(saved)["objectives"]["balance"] == "none"
    finetune = {**saved, "stage": "finetune"}
    assert with_settings_it_predates(finetune) == finetune  # balancing is a no-op there
    single = {**saved, "objectives": {**saved["objectives"], "nicl": 0.0, "nid": 0.0, "rcl": 0.0}}
    assert with_settings_it_predates(single) == single
    with pytest.raises(PmmcacheError, match=r"other settings \(objectives differ\)"):
        train.run(train_config(toy, tmp_path / "runs", "pretrain", resume=True), show_progress=False)
    resumed = train.run(train_config(toy, tmp_path / "runs", "pretrain", resume=True,
                                     objectives={"balance": "none"}), show_progress=False)
    assert resumed.best_epoch == reference.best_epoch  # all epochs were done: nothing retrained


def gaussian_scores_loss(spread: float, rows: int = 64, candidates: int = 200):
    """Cross-entropy of the first candidate as a function of the temperature, for Gaussian scores."""
    scores = torch.randn(rows, candidates, generator=torch.Generator().manual_seed(0)) * spread
    return lambda t: float((torch.logsumexp(scores / t, 1) - scores[:, 0] / t).mean())


def test_calibrated_dap_temperature_is_the_smallest_within_half_a_nat_of_flat_scores():
    narrow = gaussian_scores_loss(0.5)
    assert train.calibrated_dap_temperature(narrow, 1.0) == 1.0  # already near flat: sqrt(d) stays
    wide = gaussian_scores_loss(20.0)
    flat = wide(math.inf)
    assert flat == pytest.approx(math.log(200))
    found = train.calibrated_dap_temperature(wide, 1.0)
    assert wide(found) - flat <= 0.5 < wide(found / 1.01) - flat
    assert 10 < found < 40  # spread s: loss(t) - flat ~ s^2 / 2t^2
    assert train.calibrated_dap_temperature(wide, 100.0) == 100.0  # never below the base
    assert math.isnan(train.calibrated_dap_temperature(lambda t: math.nan, 1.0))  # no finite scores


def test_the_dap_temperature_is_fixed_once_saved_and_kept_by_resume_and_fine_tuning(toy, pretrained, tmp_path,
                                                                                     monkeypatch):
    _, reference = pretrained
    history = read_history(reference.run_dir)
    fixed = history[0]["dap_temperature"]
    assert fixed >= math.sqrt(32) and all(r["dap_temperature"] == fixed for r in history)
    last = reference.run_dir / "checkpoints" / "epoch-0003"
    assert json.loads((last / "train_state.json").read_text())["dap_temperature"] == fixed
    # From here a calibration would give 2 sqrt(d): every value below shows where it came from.
    monkeypatch.setattr(train, "calibrated_dap_temperature", lambda loss_at, base, **kwargs: 2.0 * base)

    # Resume keeps the saved temperature (never recalibrates a trained model); a checkpoint saved
    # before calibration existed was trained at sqrt(d).
    for name, saved, expected in (("kept", 4.25, 4.25), ("predates", None, math.sqrt(32))):
        run_dir = tmp_path / name / "pretrain"
        shutil.copytree(reference.run_dir, run_dir)
        checkpoint = run_dir / "checkpoints" / "epoch-0003"
        state = json.loads((checkpoint / "train_state.json").read_text())
        state = {**state, "dap_temperature": saved} if saved is not None else {
            k: v for k, v in state.items() if k != "dap_temperature"}
        (checkpoint / "train_state.json").write_text(json.dumps(state))
        ckpt.seal(checkpoint, 3)
        saved_config = json.loads((run_dir / "config.json").read_text())
        (run_dir / "config.json").write_text(json.dumps({**saved_config, "runs_dir": str(tmp_path / name)}))
        resumed = train.run(train_config(toy, tmp_path / name, "pretrain", epochs=4, resume=True), show_progress=False)
        assert resumed.history[-1]["epoch"] == 4 and resumed.history[-1]["dap_temperature"] == expected, name

    # Fine-tuning scores with the temperature its init model was trained at (its best epoch's record).
    init = tmp_path / "init"
    shutil.copytree(reference.run_dir / "best", init)
    record = json.loads((init / "metrics.json").read_text())
    (init / "metrics.json").write_text(json.dumps({**record, "dap_temperature": 3.5}))
    tuned = train.run(train_config(toy, tmp_path / "runs", "tuned", stage="finetune", epochs=1, init=str(init),
                                   model={}), show_progress=False)
    assert tuned.history[0]["dap_temperature"] == 3.5
    (init / "metrics.json").unlink()  # a model saved without a record was trained at sqrt(d)
    older = train.run(train_config(toy, tmp_path / "runs", "older", stage="finetune", epochs=1, init=str(init),
                                   model={}), show_progress=False)
    assert older.history[0]["dap_temperature"] == math.sqrt(32)
    fresh_items = train.run(train_config(toy, tmp_path / "runs", "user", stage="finetune", epochs=1, init=str(init),
                                         transfer="user", model={}), show_progress=False)
    assert fresh_items.history[0]["dap_temperature"] == 2.0 * math.sqrt(32)  # a fresh item tower: calibrated
    configured = train.run(train_config(toy, tmp_path / "runs", "configured", stage="finetune", epochs=1,
                                        objectives={"dap_temperature": 2.0}), show_progress=False)
    assert configured.history[0]["dap_temperature"] == 2.0


# ------------------------------------------------------------------------------- 2. resume

KILL_CHILD = """
import json, os, signal, sys
from pmmcache import train
from pmmcache.config import from_dict
from pmmcache.run_config import TrainConfig

def die_after(epoch, step):  # called after every optimizer step
    if epoch * int(os.environ["STEPS"]) + step + 1 > int(os.environ["KILL_AFTER_STEPS"]):
        os.kill(os.getpid(), signal.SIGKILL)

train.run(from_dict(TrainConfig, json.loads(sys.argv[1])), show_progress=False, on_step=die_after)
"""


def assert_same_run(run_dir: Path, reference: train.TrainResult, reference_dir: Path, epochs: int = 3) -> None:
    """Same per-epoch losses and metrics, same final weights, same eval.json as the reference run."""
    assert [learned(r) for r in read_history(run_dir)] == [learned(r) for r in read_history(reference_dir)]
    got, want = model_tensors(run_dir, epochs), model_tensors(reference_dir, epochs)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    for part in ("item_tower", "user_encoder", "nid_head"):
        got, want = load_file(str(run_dir / "best" / f"{part}.safetensors")), \
            load_file(str(reference_dir / "best" / f"{part}.safetensors"))
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=f"{part}.{key}")
    record, expected = json.loads((run_dir / "eval.json").read_text()), json.loads((reference_dir / "eval.json").read_text())
    assert record["best_epoch"] == expected["best_epoch"] == reference.best_epoch
    for split in ("valid", "test"):
        assert record["metrics"][split] == pytest.approx(expected["metrics"][split], abs=1e-6)


def test_run_killed_after_two_epochs_resumes_to_the_uninterrupted_result(toy, pretrained, tmp_path):
    reference_config, reference = pretrained
    runs = tmp_path / "runs"
    settings = json.dumps(train_settings(toy, runs, "killed"))
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, settings], cwd=REPO, capture_output=True, text=True,
                           timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", "STEPS": str(STEPS),
                                             "KILL_AFTER_STEPS": str(2 * STEPS + 1)})
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    run_dir = runs / "killed"
    # Killed in epoch 3 after one optimizer step: epoch 2 is the last finished one.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    assert [r["epoch"] for r in read_history(run_dir)] == [1, 2] and not (run_dir / "eval.json").exists()
    config = train_config(toy, runs, "killed")
    assert json.loads((run_dir / "config.json").read_text()) == to_dict(with_init_model(config))  # "auto" decided

    resumed = train.run(train_config(toy, runs, "killed", resume=True), show_progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert_same_run(run_dir, reference, reference.run_dir)
    assert resumed.metrics["test"] == pytest.approx(reference.metrics["test"], abs=1e-6)


def test_resume_may_extend_the_epochs_and_equals_the_uninterrupted_run(toy, pretrained, tmp_path):
    _, reference = pretrained
    runs = tmp_path / "runs"
    short = train.run(train_config(toy, runs, "extended", epochs=2), show_progress=False)
    assert [r["epoch"] for r in short.history] == [1, 2]
    assert [learned(r) for r in short.history] == [learned(r) for r in reference.history[:2]]

    longer = train_config(toy, runs, "extended", epochs=3, resume=True, prefetch=False)  # prefetch may change
    extended = train.run(longer, show_progress=False)
    assert [r["epoch"] for r in extended.history] == [1, 2, 3]
    assert_same_run(runs / "extended", reference, reference.run_dir)
    saved = json.loads((runs / "extended" / "config.json").read_text())
    assert saved["epochs"] == 3  # config.json says how the run was trained in the end
    assert saved == {**to_dict(with_init_model(longer)), "resume": False}

    # What the run trains may not change on resume; the message names the setting.
    with pytest.raises(PmmcacheError, match=r"other settings \(lr differ\)"):
        train.run(train_config(toy, runs, "extended", epochs=4, lr=1e-3, resume=True), show_progress=False)
    with pytest.raises(PmmcacheError, match=r"model differ"):
        changed = train_settings(toy, runs, "extended", resume=True)
        changed["model"]["user_encoder"]["n_blocks"] = 1
        train.run(from_dict(TrainConfig, changed), show_progress=False)
    assert [r["epoch"] for r in read_history(runs / "extended")] == [1, 2, 3]  # untouched by the refusals


class _Planted:
    """Unpickling this runs code: it creates the file named at pickling time."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_unpickles_nothing_from_the_run_directory(toy, pretrained, tmp_path, capsys):
    import pickle

    runs = tmp_path / "runs"
    run_dir = train.run(train_config(toy, runs, "planted", epochs=2), show_progress=False).run_dir
    checkpoints = run_dir / "checkpoints"
    assert json.loads((checkpoints / "epoch-0002" / "train_state.json").read_text())["epoch"] == 2  # progress is JSON
    marker = tmp_path / "code-ran"
    (checkpoints / "epoch-0002" / "random_states_0.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    # The replaced file is not the one saved: resume falls back to epoch 1, saying why.
    resumed = train.run(train_config(toy, runs, "planted", epochs=3, resume=True), show_progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert ("not resuming from " + str(checkpoints / "epoch-0002") + ": random_states_0.pkl is not the file that "
            "was saved") in capsys.readouterr().err
    assert not marker.exists()
    # accelerate loads custom checkpoints with a full pickle load: such a file is refused, not loaded.
    for checkpoint in ckpt_dirs(run_dir):
        (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(PmmcacheError, match="no usable checkpoint.*custom_checkpoint_0.pkl, a pickle that pmmcache "
                                            "does not load"):
        train.run(train_config(toy, runs, "planted", epochs=4, resume=True), show_progress=False)
    # A checkpoint sealed before checksums (COMPLETE = the epoch) without its JSON progress (an old
    # pickled one) is refused too.
    for checkpoint in ckpt_dirs(run_dir):
        (checkpoint / "custom_checkpoint_0.pkl").unlink()
        (checkpoint / "train_state.json").unlink()
        (checkpoint / "COMPLETE").write_text(checkpoint.name[-1])
    with pytest.raises(PmmcacheError, match="does not load"):
        train.run(train_config(toy, runs, "planted", epochs=4, resume=True), show_progress=False)
    assert not marker.exists()


def ckpt_dirs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").iterdir())


# ------------------------------------------------------------------------------- 3. fine-tuning


def test_finetune_starts_from_the_pretrained_item_tower_and_user_encoder(toy, pretrained, tmp_path, monkeypatch):
    _, reference = pretrained
    started: dict = {}
    original_setup = train.setup

    def spy_setup(config, device):
        s = original_setup(config, device)
        started["item_tower"] = {k: v.clone() for k, v in s.model.item_tower.state_dict().items()}
        started["user_encoder"] = {k: v.clone() for k, v in s.model.user_encoder.state_dict().items()}
        started["nid_head"] = s.model.nid_head
        return s

    monkeypatch.setattr(train, "setup", spy_setup)
    config = train_config(toy, tmp_path / "runs", "finetune", stage="finetune", epochs=1,
                          init=str(reference.run_dir), model={})  # the model comes from the init run
    result = train.run(config, show_progress=False)

    assert started["nid_head"] is None
    for part in ("item_tower", "user_encoder"):
        pretrained_weights = load_file(str(reference.run_dir / "best" / f"{part}.safetensors"))
        assert started[part].keys() == pretrained_weights.keys()
        for key, value in pretrained_weights.items():
            assert torch.equal(started[part][key], value), f"{part}.{key} did not start from the pre-trained run"
        tuned = load_file(str(result.run_dir / "best" / f"{part}.safetensors"))
        assert any(not torch.equal(tuned[k], pretrained_weights[k]) for k in tuned), f"{part} was not trained"

    assert not (result.run_dir / "best" / "nid_head.safetensors").exists()
    assert sorted(k for k in read_history(result.run_dir)[0] if k.startswith("grad_")) == [
        "grad_dap_item_tower", "grad_dap_user_encoder"]
    parts_config = json.loads((result.run_dir / "best" / "config.json").read_text())["config"]
    assert parts_config["nid_head"] is False and parts_config["item_tower"]["d_model"] == 32
    (record,) = read_history(result.run_dir)
    assert sorted(k for k in record if k.startswith("train_")) == ["train_dap", "train_loss"]
    assert record["train_loss"] == pytest.approx(record["train_dap"])


# ------------------------------------------------------------------------------- 4. NaN guard


def test_a_nan_loss_stops_the_run_naming_the_last_good_checkpoint(toy, tmp_path, monkeypatch):
    original_dap = train.dap_loss
    diverged = False

    def dap_turning_nan(*args, **kwargs):
        loss = original_dap(*args, **kwargs)
        return loss * float("nan") if diverged else loss

    def diverge_after_epoch_one(epoch, step):  # called after every optimizer step
        nonlocal diverged
        diverged = diverged or (epoch == 0 and step == STEPS - 1)

    monkeypatch.setattr(train, "dap_loss", dap_turning_nan)
    config = train_config(toy, tmp_path / "runs", "nan")
    with pytest.raises(PmmcacheError) as err:
        train.run(config, show_progress=False, on_step=diverge_after_epoch_one)
    checkpoint = tmp_path / "runs" / "nan" / "checkpoints" / "epoch-0001"
    message = str(err.value)
    assert "loss became nan at epoch 2, step 1" in message and "dap=nan" in message
    assert f"last good checkpoint is {checkpoint}" in message
    assert json.loads((checkpoint / "COMPLETE").read_text())["epoch"] == 1
    assert (checkpoint / "model.safetensors").is_file()
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["epoch-0001"]
    assert [r["epoch"] for r in read_history(checkpoint.parent.parent)] == [1]


# ------------------------------------------------------------------------------- 5. config and cache errors


@pytest.mark.parametrize("setting, named", [
    ("model.item_tower.d_modle=64", "'d_modle' for ItemTowerConfig in model.item_tower"),
    ("objectives.nicl_weight=0", "'nicl_weight' for ObjectiveConfig in objectives"),
    ("batch_size=eight", "batch_size: expected an integer"),
    ("encoders.top_blocks=two", "encoders.top_blocks: expected an integer"),
    ("encoders.modalities=[text]", "encoders.modalities = ['text'] is not a training setting"),
    ("mask_history=maybe", "mask_history: expected true/false"),
    ("select_metric=HR@5", "select_metric 'HR@5'"),
    ("lr=nan", "lr must be a positive number"),
    ("lr=-1", "lr must be a positive number"),
    ("init_lr=-1e-4", "init_lr = -0.0001"),
    ("warmup_steps=-5", "warmup_steps = -5; must be >= 0"),
    ("max_steps_per_epoch=-1", "max_steps_per_epoch = -1"),
    ("patience=0", "patience = 0"),
    ("max_len=0", "max_len = 0"),
    ("objectives.temperature=0", "objectives.temperature = 0.0; must be a positive number"),
    ("objectives.temperature=-0.5", "objectives.temperature = -0.5"),
    ("objectives.temperature=nan", "objectives.temperature = nan"),
    ("objectives.temperature=inf", "objectives.temperature = inf"),
    ("objectives.dap_temperature=nan", "objectives.dap_temperature = nan"),
    ("objectives.nid=nan", "objectives.nid = nan; a weight must be >= 0"),
    ("objectives.rcl=-1", "objectives.rcl = -1.0"),
    ("objectives.shuffle_fraction=1.5", "objectives.shuffle_fraction = 1.5; must be in [0, 1]"),
])
def test_bad_settings_are_config_errors_naming_the_key(setting, named, toy, tmp_path):
    data = train_settings(toy, tmp_path / "runs", "bad")
    set_dotted(data, setting)
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, data)
    assert named in str(err.value)

    result = CliRunner().invoke(main, train_cli_args(toy, tmp_path / "runs", "bad", epochs=1) + ["--set", setting])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and named in result.stderr and "Traceback" not in result.stderr
    assert "lower --lr" not in result.stderr  # a setting error, not a diverged run
    assert not (tmp_path / "runs" / "bad").exists()


def test_select_metric_must_be_one_of_the_ks(toy, tmp_path):
    with pytest.raises(ConfigError, match="select_metric 'NDCG@10'"):
        train_config(toy, tmp_path, "bad", ks=[5, 20])
    assert train_config(toy, tmp_path, "ok", ks=[5, 20], select_metric="HR@5").select_metric == "HR@5"


def test_existing_run_without_resume_and_resume_without_run_are_refused(toy, pretrained, tmp_path):
    config, result = pretrained
    before = (result.run_dir / "metrics.jsonl").read_text()
    with pytest.raises(PmmcacheError, match="already exists; pass --resume"):
        train.run(config, show_progress=False)
    assert (result.run_dir / "metrics.jsonl").read_text() == before
    with pytest.raises(PmmcacheError, match="--resume: no run at"):
        train.run(train_config(toy, tmp_path / "runs", "never-ran", resume=True), show_progress=False)


def test_missing_cache_tells_to_run_extract(toy, tmp_path):
    config = train_config(toy, tmp_path / "runs", "no-cache", cache_dir=str(tmp_path / "empty-cache"))
    with pytest.raises(PmmcacheError, match=f"run `pmmcache extract --dataset {NAME}`"):
        train.run(config, show_progress=False)
    # Nothing was written, so the same command works once the cache exists (no "already exists").
    assert not (tmp_path / "runs" / "no-cache").exists()
    shutil.copytree(toy.cache_dir, tmp_path / "empty-cache", dirs_exist_ok=True)
    assert train.run(from_dict(TrainConfig, {**to_dict(config), "epochs": 1}), show_progress=False).best_epoch == 1


def test_cache_made_by_other_encoder_weights_is_refused(toy, tmp_path):
    bert_dir = shutil.copytree(toy.bert_dir, tmp_path / "bert")
    cache_dir = tmp_path / "cache"
    extract(extract_config(toy, bert_dir=bert_dir, cache_dir=cache_dir), show_progress=False)
    save_tiny_bert(bert_dir, layers=2, seed=1)  # other weights at the same path: same cache file name
    settings = train_settings(toy, tmp_path / "runs", "stale", cache_dir=str(cache_dir))
    settings["encoders"]["text_encoder"] = str(bert_dir)
    with pytest.raises(CacheMismatchError, match=r"text\.lower_fingerprint"):
        train.run(from_dict(TrainConfig, settings), show_progress=False)


# ------------------------------------------------------------------------------- 7. two processes


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="`accelerate launch --multi_gpu --num_processes 2` on a one-GPU machine; runs on CPU")
def test_two_processes_under_accelerate_launch_train_one_run_and_evaluate_like_one(toy, tmp_path):
    """One run, reported once; warmup counts optimizer steps (not steps x processes); the gathered
    evaluation equals one process's."""
    runs = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "pmmcache",
               *train_cli_args(toy, runs, "ddp", epochs=2), "--warmup-steps", "8"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in runs.iterdir()] == ["ddp"]
    run_dir = runs / "ddp"
    assert done.stdout.count("best epoch") == 1  # only the main process reports
    history = read_history(run_dir)
    assert [r["epoch"] for r in history] == [1, 2]
    # STEPS optimizer steps per epoch: after n of them the warmup factor is (n + 1) / 8.
    lr = TrainConfig().lr
    assert [r["lr"] for r in history] == pytest.approx([lr * (STEPS + 1) / 8, lr * (2 * STEPS + 1) / 8])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]

    record = json.loads((run_dir / "eval.json").read_text())
    for split in ("valid", "test"):
        metrics = record["metrics"][split]
        assert metrics["users"] == NUM_ITEMS
        assert all(math.isfinite(metrics[m]) and 0.0 <= metrics[m] <= 1.0 for m in METRICS), metrics

    # The same best weights evaluated by one process give the numbers the two processes gathered.
    config = from_dict(TrainConfig, {**json.loads((run_dir / "config.json").read_text()), "init": str(run_dir)})
    s = setup(config, torch.device("cpu"))
    single = evaluate_splits(s.model, s.store, s.dataset, ("valid", "test"), config.ks, config.max_len)
    for split in ("valid", "test"):
        assert record["metrics"][split] == pytest.approx(single[split], abs=1e-6), split


# ------------------------------------------------------------------------------- 8. epoch batches


@pytest.mark.parametrize("num_users, batch_size, world", [(23, 4, 3), (16, 4, 2), (5, 4, 2), (7, 3, 1)])
def test_epoch_batches_cover_every_user_once_per_epoch_over_all_ranks(num_users, batch_size, world):
    per_rank = [epoch_batches(num_users, batch_size, epoch=3, seed=7, rank=r, world=world) for r in range(world)]
    steps = -(-num_users // (batch_size * world))
    assert all(len(batches) == steps for batches in per_rank)  # every rank takes the same number of steps
    assert all(len(batch) == batch_size for batches in per_rank for batch in batches)
    # Global batch s = the ranks' batches s side by side; over the epoch a permutation plus wrap-around fill.
    order = np.concatenate([np.concatenate([per_rank[r][s] for r in range(world)]) for s in range(steps)])
    fill = steps * batch_size * world - num_users
    assert sorted(order[:num_users].tolist()) == list(range(num_users))
    assert order[num_users:].tolist() == order[:fill].tolist()  # the fill repeats the epoch's first users
    counts = np.bincount(order, minlength=num_users)
    assert counts.min() >= 1 and counts.sum() == num_users + fill and (counts > 1).sum() == min(fill, num_users)


def test_epoch_batches_are_deterministic_per_seed_and_epoch():
    def flat(**kw) -> list[int]:
        defaults = dict(num_users=48, batch_size=4, epoch=0, seed=1, rank=1, world=2)
        return np.concatenate(epoch_batches(**{**defaults, **kw})).tolist()

    assert flat() == flat()
    assert flat(epoch=1) != flat() and flat(seed=2) != flat()
    assert flat(rank=0) != flat() and not set(flat(rank=0)) & set(flat())  # 48 = 2 x 4 x 6: no wrap-around
    assert len(set(flat(rank=0)) | set(flat())) == 48


@pytest.mark.parametrize("overrides, has_nid_head", [
    ({"stage": "pretrain"}, True),
    ({"stage": "pretrain", "objectives": {"nid": 0.0}}, False),
    ({"stage": "finetune"}, False),
])
def test_nid_head_exists_only_when_nid_is_trained(overrides, has_nid_head, toy, tmp_path):
    """Under DDP a parameter that gets no gradient is an error, so an unused NID head must not exist."""
    config = train_config(toy, tmp_path, "nid", **overrides)
    model = setup(config, torch.device("cpu")).model
    assert (model.nid_head is not None) == has_nid_head


def test_train_cli_passes_every_encoder_option_into_the_encoders_table(monkeypatch, tmp_path):
    """extract and train share their encoder options; train's must reach TrainConfig.encoders to find the cache."""
    from click.testing import CliRunner

    from pmmcache.cli import main

    seen = []
    monkeypatch.setattr(train, "run", lambda config: seen.append(config))
    args = ["train", "--text-encoder", "/m/text", "--vision-encoder", "pmmcache-tiny-vit", "--vision-weights", "random",
            "-k", "1", "--max-text-length", "32", "--image-size", "64", "--encoder-seed", "3", "--epochs", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    enc = seen[0].encoders
    assert (enc.text_encoder, enc.vision_encoder, enc.vision_weights, enc.top_blocks, enc.max_text_length,
            enc.image_size, enc.seed) == ("/m/text", "pmmcache-tiny-vit", "random", 1, 32, 64, 3)
    assert seen[0].epochs == 2
