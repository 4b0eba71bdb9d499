"""`pmmcache eval --run RUN`: full-ranking evaluation of a run's best model from the command line."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
from click.testing import CliRunner

from pmmcache import train
from pmmcache.cli import main

from helpers.toy import KS, METRICS, NUM_ITEMS, train_config


@pytest.fixture(scope="module")
def trained_run(toy, tmp_path_factory) -> Path:
    """A 2-epoch pre-training run on the tiny toy cache (its eval.json is the reference)."""
    root = tmp_path_factory.mktemp("eval-cli")
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


# ------------------------------------------------------------------------------- --cold-start
# Every toy item occurs 8 times, 6 of them in the training parts seq[:-2]: at threshold 6 no item is
# cold, at 7 every item is, and every position but a user's first (39 users x 7) ends a case.


def naive_cold_start_metrics(run_dir: Path, threshold: int) -> tuple[int, dict[str, float]]:
    """Reference: ranks counted by hand one case at a time (history masked, ties pessimistic); the user
    vectors come from one batched call of the model (its per-case equivalence is the model's tests')."""
    import torch

    from pmmcache.coldstart import cold_start_cases
    from pmmcache.evaluate import item_table
    from pmmcache.runs import load_run

    s, _ = load_run(run_dir)
    cases = cold_start_cases(s.dataset, threshold, s.config.max_len)
    table = item_table(s.model, s.store)
    sums = dict.fromkeys(METRICS, 0.0)
    with torch.no_grad():
        ids = torch.from_numpy(cases.histories).long()
        users = s.model.user_vectors(table[ids], ids == 0)  # (C, d)
        for history, target, user in zip(cases.histories.tolist(), cases.targets.tolist(), users):
            scores = table @ user
            others = torch.ones(len(table), dtype=torch.bool)  # candidates other than the target
            others[[0, target, *history]] = False
            rank = int((others & (scores >= scores[target])).sum())
            for k in KS:
                sums[f"HR@{k}"] += rank < k
                sums[f"NDCG@{k}"] += (rank < k) / math.log2(rank + 2)
    return cases.cases, {name: value / cases.cases for name, value in sums.items()}


def test_cold_start_scores_every_prefix_ending_in_a_cold_item_like_a_naive_loop(trained_run):
    result = invoke("--run", str(trained_run), "--cold-start", "--cold-threshold", "7")

    record = json.loads((trained_run / "eval-cold-start.json").read_text())
    cases, expected = naive_cold_start_metrics(trained_run, 7)
    assert record["cases"] == cases == NUM_ITEMS * 7
    assert record["cold_items"] == record["cold_targets"] == NUM_ITEMS
    assert record["threshold"] == 7 and record["mask_history"] is True and record["items"] == NUM_ITEMS
    assert record["config"] == json.loads((trained_run / "config.json").read_text())
    assert record["metrics"] == pytest.approx(expected, abs=1e-6)
    lines = result.stdout.splitlines()
    assert not any(line.startswith(("valid", "test")) for line in lines)  # --cold-start alone: no full-rank
    assert lines[0].split() == ["split", *METRICS]
    assert lines[1].split() == ["cold", *(f"{record['metrics'][m]:.4f}" for m in METRICS)]
    assert f"{NUM_ITEMS * 7} cold-start cases ending in {NUM_ITEMS} of {NUM_ITEMS} cold items (< 7" in result.stdout


def test_cold_start_threshold_is_strict_and_the_pipeline_entry_point_returns_the_record(trained_run, tmp_path):
    from pmmcache.evaluate import EvalConfig, run

    def cold_start(**settings):
        return run(EvalConfig(run=trained_run, full_rank=False, cold_start=True, **settings), show=False)["cold_start"]

    warm = cold_start(cold_threshold=6, output=tmp_path / "warm.json")  # 6 occurrences: not cold
    assert warm["cases"] == 0 and warm["cold_items"] == 0
    record = cold_start(cold_threshold=7, mask_history=False, output=tmp_path / "cold.json")
    assert record == json.loads((tmp_path / "cold.json").read_text())
    assert record["mask_history"] is False and 0 <= record["metrics"]["HR@10"] <= 1
    assert set(record["metrics"]) == set(METRICS)


def test_full_rank_and_cold_start_together_write_both_and_output_needs_one_mode(trained_run, tmp_path):
    for name in ("eval-full-rank.json", "eval-cold-start.json"):
        (trained_run / name).unlink(missing_ok=True)
    result = invoke("--run", str(trained_run), "--full-rank", "--cold-start", "--cold-threshold", "7")
    assert (trained_run / "eval-full-rank.json").is_file() and (trained_run / "eval-cold-start.json").is_file()
    assert [line.split()[0] for line in result.stdout.splitlines() if line.split()[0] in ("valid", "test", "cold")] \
        == ["valid", "test", "cold"]

    both = CliRunner().invoke(main, ["eval", "--run", str(trained_run), "--full-rank", "--cold-start",
                                     "--output", str(tmp_path / "x.json")])
    assert both.exit_code == 2 and "--output names one file" in both.stderr


def test_a_trained_run_loads_strictly(trained_run, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from pmmcache.errors import PmmcacheError
    from pmmcache.runs import load_run

    copy = Path(shutil.copytree(trained_run, tmp_path / "run"))
    path = copy / "best" / "user_encoder.safetensors"
    tensors = load_file(str(path))
    save_file({**tensors, "left_over.weight": torch.zeros(2)}, str(path))  # a key the model lacks
    with pytest.raises(PmmcacheError, match=r"does not fit this model's user_encoder: .*unexpected left_over.weight"):
        load_run(copy)


def test_a_run_that_recorded_the_ignored_encoders_modalities_still_loads(trained_run, tmp_path):
    import shutil

    from pmmcache.runs import load_run

    copy = Path(shutil.copytree(trained_run, tmp_path / "run"))
    config = json.loads((copy / "config.json").read_text())
    config["encoders"]["modalities"] = ["text"]  # what `--set encoders.modalities=[text]` recorded (and training ignored)
    (copy / "config.json").write_text(json.dumps(config))
    s, _ = load_run(copy)
    assert s.model.config.item_tower.modalities == ("text", "image")


def test_eval_on_another_dataset_reads_that_datasets_cache_unless_told_otherwise(trained_run, tmp_path):
    """A run trained on a cache of another dataset (as demo/<domain> runs read the `demo` cache) evaluated
    with --dataset X reads X's own cache, not the run's; --cache-dataset names one explicitly."""
    import shutil

    from pmmcache.runs import load_run

    copy = Path(shutil.copytree(trained_run, tmp_path / "run"))
    config = json.loads((copy / "config.json").read_text())
    config["cache_dataset"] = "elsewhere"  # the run's items came from another dataset's cache
    (copy / "config.json").write_text(json.dumps(config))
    s, _ = load_run(copy, dataset=config["dataset"])
    assert s.config.cache_dataset is None and s.cache_path.parent.name == config["dataset"]
    result = CliRunner().invoke(main, ["eval", "--run", str(copy), "--dataset", config["dataset"],
                                       "--cache-dataset", "elsewhere"])
    assert result.exit_code == 2 and "elsewhere" in result.output, result.output


def test_eval_takes_config_and_set_like_the_other_verbs(trained_run, tmp_path):
    settings = tmp_path / "eval.toml"
    settings.write_text(f'run = "{trained_run}"\ncold_start = true\nfull_rank = false\n')
    result = CliRunner().invoke(main, ["eval", "--config", str(settings), "--set", "cold_threshold=3",
                                       "--output", str(tmp_path / "cold.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cold.json").read_text())["threshold"] == 3
    missing = CliRunner().invoke(main, ["eval"])
    assert missing.exit_code == 2 and "eval needs the run to evaluate: --run" in missing.output


def test_valid_test_and_cold_start_share_one_item_table(trained_run, monkeypatch):
    """Every item goes through the item tower once per evaluation, whichever modes are asked for
    (counted by a forward hook on the item tower, not timed)."""
    from pmmcache import evaluate

    encoded = []
    real_load_run = evaluate.load_run

    def load_run_counting(*args, **kwargs):
        s, accelerator = real_load_run(*args, **kwargs)
        s.model.item_tower.register_forward_hook(lambda module, inputs, output: encoded.append(len(output.vector)))
        return s, accelerator

    monkeypatch.setattr(evaluate, "load_run", load_run_counting)
    records = evaluate.run(evaluate.EvalConfig(run=trained_run, full_rank=True, cold_start=True, cold_threshold=7,
                                               output=None), show=False)
    assert sum(encoded) == NUM_ITEMS and set(records) == {"full_rank", "cold_start"}
    assert records["full_rank"]["precision"] == "fp32" == records["cold_start"]["precision"]  # CPU


def test_the_precision_chooses_the_autocast_of_the_model_passes(trained_run, monkeypatch):
    """bf16 on CUDA unless fp32 is asked for, plain fp32 on a CPU; `eval --precision` reaches every
    pass of the item tower and the user encoder (a CPU bf16 autocast stands in for CUDA's here)."""
    import torch

    from pmmcache import evaluate
    from pmmcache.errors import ConfigError

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert evaluate.autocast_dtype(cuda) == torch.bfloat16 == evaluate.autocast_dtype(cuda, "bf16")
    assert evaluate.autocast_dtype(cuda, "fp32") is None and evaluate.autocast_dtype(cpu, "bf16") is None
    assert evaluate.EvalConfig(run=trained_run).precision == "bf16"
    with pytest.raises(ConfigError, match="fp16"):
        evaluate.EvalConfig(run=trained_run, precision="fp16")

    asked, inside = [], []
    monkeypatch.setattr(evaluate, "eval_autocast", lambda device, precision: asked.append(precision) or torch.autocast(
        "cpu", dtype=torch.bfloat16, enabled=precision == "bf16"))
    real_load_run = evaluate.load_run

    def load_run_watching(*args, **kwargs):
        s, accelerator = real_load_run(*args, **kwargs)
        for part in (s.model.item_tower, s.model.user_encoder):
            part.register_forward_hook(lambda *_: inside.append(torch.is_autocast_enabled("cpu")))
        return s, accelerator

    monkeypatch.setattr(evaluate, "load_run", load_run_watching)
    for precision, expected in (("bf16", True), ("fp32", False)):
        asked.clear(), inside.clear()
        invoke("--run", str(trained_run), "--precision", precision, "--output", str(trained_run / "p.json"))
        assert asked and set(asked) == {precision} and inside and set(inside) == {expected}
