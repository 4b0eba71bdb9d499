"""`pmmcache eval --run RUN`: full-ranking evaluation of a run's best model from the command line."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
from click.testing import CliRunner

from pmmcache import train
from pmmcache.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_train import METRICS, NUM_ITEMS, build_toy, train_config  # noqa: E402


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 2-epoch pre-training run on the tiny toy cache (its eval.json is the reference)."""
    root = tmp_path_factory.mktemp("eval-cli")
    toy = build_toy(root)
    return train.run(train_config(toy, root / "runs", "pretrain", epochs=2), show_progress=False).run_dir


def invoke(*args: str):
    result = CliRunner().invoke(main, ["eval", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_eval_prints_the_table_and_writes_the_training_runs_final_numbers(trained_run):
    expected = json.loads((trained_run / "eval.json").read_text())
    result = invoke("--run", str(trained_run))

    record = json.loads((trained_run / "eval-full-rank.json").read_text())
    assert record["mask_history"] is True and record["items"] == NUM_ITEMS and record["dataset"] == "toy"
    assert record["run"] == str(trained_run)
    assert record["random_HR@10"] == pytest.approx(10 / NUM_ITEMS)
    assert sorted(record["metrics"]) == ["test", "valid"]
    for split in ("valid", "test"):
        # The best model rebuilt from best/ scores exactly what training reported for it.
        assert record["metrics"][split] == pytest.approx(expected["metrics"][split], abs=1e-6), split

    lines = result.stdout.splitlines()
    assert lines[0].split() == ["split", *METRICS]
    for split, line in zip(("valid", "test"), lines[1:3]):
        values = line.split()
        assert values[0] == split
        assert values[1:] == [f"{record['metrics'][split][m]:.4f}" for m in METRICS]
    assert f"{NUM_ITEMS} items, history masked" in result.stdout and "eval-full-rank.json" in result.stdout


def test_no_mask_history_is_recorded_and_can_only_lower_the_numbers(trained_run, tmp_path):
    masked = invoke("--run", str(trained_run), "--output", str(tmp_path / "masked.json"))
    assert "history masked" in masked.stdout
    output = tmp_path / "unmasked.json"
    result = invoke("--run", str(trained_run), "--no-mask-history", "--output", str(output))
    assert "history not masked" in result.stdout and str(output) in result.stdout

    unmasked = json.loads(output.read_text())
    reference = json.loads((tmp_path / "masked.json").read_text())
    assert unmasked["mask_history"] is False and reference["mask_history"] is True
    # A user's history never holds its target here, so showing the history items can only push the
    # target down the ranking; with 6-8 history items out of 39 it does for some users.
    for split in ("valid", "test"):
        got, masked_metrics = unmasked["metrics"][split], reference["metrics"][split]
        assert all(got[m] <= masked_metrics[m] + 1e-7 for m in METRICS), (got, masked_metrics)
        assert got["NDCG@10"] < masked_metrics["NDCG@10"] - 1e-4
    assert not (trained_run / "eval-full-rank.json").exists() or \
        json.loads((trained_run / "eval-full-rank.json").read_text())["mask_history"] is True


def test_eval_of_a_directory_without_a_trained_model_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["eval", "--run", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path} has no trained model (best/); train it first with `pmmcache train`"
