"""`train --log-with`: Accelerate's trackers get the losses and epoch metrics beside metrics.jsonl; the
TensorBoard event files are read back with TensorBoard's own reader."""
from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
from click.testing import CliRunner

from pmmcache import tracking, train
from pmmcache.cli import main
from pmmcache.errors import ConfigError, PmmcacheError

from helpers.toy import STEPS, read_history, train_cli_args, train_config


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the run's TensorBoard event files hold: tag -> [(step, value)], all files merged."""
    from tensorboard.backend.event_processing import event_accumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((run_dir / "trackers").rglob("events.out.tfevents.*")):
        reader = event_accumulator.EventAccumulator(str(events), size_guidance={event_accumulator.SCALARS: 0})
        reader.Reload()
        for tag in reader.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in reader.Scalars(tag))
    return found


def test_tensorboard_gets_every_steps_losses_and_the_epoch_records_of_metrics_jsonl(toy, tmp_path):
    runs = tmp_path / "runs"
    result = CliRunner().invoke(main, [*train_cli_args(toy, runs, "tracked", epochs=2), "--log-with", "tensorboard"])
    assert result.exit_code == 0, (result.output, result.exception)
    run_dir = runs / "tracked"
    assert json.loads((run_dir / "config.json").read_text())["log_with"] == ["tensorboard"]  # saved with the run
    logged, history = scalars(run_dir), read_history(run_dir)
    steps = [step for step, _ in logged["train/loss"]]
    assert steps == list(range(1, 2 * STEPS + 1))  # every optimizer step, counted over both epochs
    for name in ("dap", "nicl", "nid", "rcl"):
        assert len(logged[f"train/{name}"]) == 2 * STEPS
    for epoch, record in enumerate(history):
        step_losses = [value for step, value in logged["train/loss"] if epoch * STEPS < step <= (epoch + 1) * STEPS]
        assert sum(step_losses) / STEPS == pytest.approx(record["train_loss"], rel=1e-5)  # the same numbers
        assert logged["epoch/train_loss"][epoch] == ((epoch + 1) * STEPS, pytest.approx(record["train_loss"], rel=1e-6))
        assert logged["epoch/valid_NDCG@10"][epoch][1] == pytest.approx(record["valid_NDCG@10"], abs=1e-6)


def test_tracking_is_off_by_default_and_bad_trackers_are_named(toy, tmp_path, monkeypatch):
    untracked = train.run(train_config(toy, tmp_path / "runs", "plain", epochs=1), show_progress=False).run_dir
    assert (untracked / "metrics.jsonl").is_file() and not (untracked / "trackers").exists()
    with pytest.raises(ConfigError, match="tensorbored: not a tracker"):
        train_config(toy, tmp_path / "runs", "typo", log_with=["tensorbored"])
    monkeypatch.setattr(tracking, "get_available_trackers", lambda: [])  # as where tensorboard is not installed
    with pytest.raises(PmmcacheError, match=r"--log-with tensorboard: not installed; pip install 'pmmcache\[tracking\]'"):
        train.run(train_config(toy, tmp_path / "runs", "missing", log_with=["tensorboard"]), show_progress=False)
    assert not (tmp_path / "runs" / "missing").exists()  # refused before anything was written


def test_hyperparameters_are_the_config_flattened_to_tracker_types(toy, tmp_path):
    flat = tracking.hyperparameters(train_config(toy, tmp_path, "h", log_with=["tensorboard"]))
    assert flat["objectives.nicl"] == 1.0 and flat["batch_size"] == 8 and flat["log_with"] == "['tensorboard']"
    assert all(isinstance(value, (bool, int, float, str)) for value in flat.values())
