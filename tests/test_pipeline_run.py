"""`pmmcache pipeline`: recipe validation, the results table on hand-made numbers, and a tiny recipe
end to end (pre-train -> two fine-tuning cells -> results.md/csv/png), rerun (skips), resume,
changed settings, and cold-start evaluation added to finished runs.

The tiny recipe trains on the toy cache of tests/test_train.py (2-block BERT, tiny ViT, d = 32,
8 users per batch, 2 steps per epoch).
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pmmcache import checkpoints as ckpt
from pmmcache import train
from pmmcache.cli import main
from pmmcache.errors import ConfigError
from pmmcache.pipeline import build_table, load_recipe, parse_recipe, plan, run_state
from pmmcache.pipeline.report import RunRecord, format_csv, format_markdown
from pmmcache.pipeline.runner import config_differences

from helpers.toy import NAME, learned, read_history, train_settings

# ------------------------------------------------------------------------------- the table, by hand


def hand_recipe(**overrides) -> dict:
    return {"recipe": 2, "name": "hand", "datasets": ["d1", "d2"], "seeds": [1, 2], "metrics": ["HR@10", "NDCG@10"],
            "cells": [{"name": "ID", "baseline": True}, {"name": "MoRec", "baseline": True},
                      {"name": "Ours", "datasets": ["d1"]}],
            "main": "Ours", **overrides}


def test_table_has_the_paper_layout_means_std_and_improvement_over_the_best_baseline():
    recipe = parse_recipe(hand_recipe(evaluate=["full_rank", "cold_start"]), "hand.yaml")
    records = [
        RunRecord("ID", "d1", 1, {"HR@10": 0.10, "NDCG@10": 0.05}, {"HR@10": 0.01, "NDCG@10": 0.005}),
        RunRecord("ID", "d1", 2, {"HR@10": 0.12, "NDCG@10": 0.07}, {"HR@10": 0.03, "NDCG@10": 0.007}),
        RunRecord("MoRec", "d1", 1, {"HR@10": 0.15, "NDCG@10": 0.05}),
        RunRecord("MoRec", "d1", 2, {"HR@10": 0.15, "NDCG@10": 0.05}),
        RunRecord("Ours", "d1", 1, {"HR@10": 0.18, "NDCG@10": 0.09}, {"HR@10": 0.04, "NDCG@10": 0.02}),
        RunRecord("Ours", "d1", 2, {"HR@10": 0.20, "NDCG@10": 0.11}, {"HR@10": 0.06, "NDCG@10": 0.02}),
        RunRecord("ID", "d2", 1, {"HR@10": 0.30, "NDCG@10": 0.20}),  # seed 2 missing: n = 1
    ]
    table = build_table(recipe, records)
    assert table.columns == ("ID", "MoRec", "Ours")
    assert [(r.dataset, r.metric) for r in table.rows] == [
        ("d1", "HR@10"), ("d1", "NDCG@10"), ("d1", "cold HR@10"), ("d1", "cold NDCG@10"),
        ("d2", "HR@10"), ("d2", "NDCG@10"), ("d2", "cold HR@10"), ("d2", "cold NDCG@10")]
    hr = table.rows[0]
    assert hr.values["ID"].mean == pytest.approx(0.11) and hr.values["ID"].std == pytest.approx(0.0141421, rel=1e-4)
    assert hr.improvement == pytest.approx((0.19 - 0.15) / 0.15 * 100)  # best baseline is MoRec here
    assert table.rows[1].improvement == pytest.approx((0.10 - 0.06) / 0.06 * 100)  # and ID here
    assert table.rows[2].improvement == pytest.approx((0.05 - 0.02) / 0.02 * 100)  # cold: only ID has numbers
    assert table.rows[4].improvement is None and "Ours" not in table.rows[4].values  # Ours not run on d2
    assert table.rows[4].values["ID"].n == 1

    markdown = format_markdown(table, ["# hand"])
    lines = markdown.splitlines()
    assert lines[2] == "| Dataset | Metric | ID | MoRec | Ours | Improv. (%) |"
    assert lines[4] == "| d1 | HR@10 | 11.00 ± 1.41 | 15.00 ± 0.00 | **19.00 ± 1.41** | +26.67 |"
    assert lines[6] == "|  | cold HR@10 | 2.00 ± 1.41 | – | **5.00 ± 1.41** | +150.00 |"
    assert lines[8] == "| d2 | HR@10 | 30.00 (n=1) | – | – |  |"

    rows = list(csv.reader(io.StringIO(format_csv(table))))
    assert rows[0] == ["dataset", "metric", "ID", "MoRec", "Ours", "Improv. (%)", "ID std", "MoRec std", "Ours std",
                       "ID n", "MoRec n", "Ours n"]
    assert rows[1][:6] == ["d1", "HR@10", "11.0000", "15.0000", "19.0000", "26.6667"]
    assert rows[5][2:6] == ["30.0000", "", "", ""] and rows[5][-3:] == ["1", "0", "0"]


def test_one_seed_shows_no_spread_and_no_baseline_leaves_the_improvement_blank():
    recipe = parse_recipe(hand_recipe(seeds=[7], datasets=["d1"], cells=[{"name": "A"}, {"name": "B"}], main="B"),
                          "hand.yaml")
    table = build_table(recipe, [RunRecord("A", "d1", 7, {"HR@10": 0.5, "NDCG@10": 0.25}),
                                 RunRecord("B", "d1", 7, {"HR@10": 0.25, "NDCG@10": 0.5})])
    assert format_markdown(table, []).splitlines()[3] == "| d1 | HR@10 | **50.00** | 25.00 |  |"
    assert list(csv.reader(io.StringIO(format_csv(table))))[0] == ["dataset", "metric", "A", "B", "Improv. (%)"]


# ------------------------------------------------------------------------------- strict recipes


@pytest.mark.parametrize("change, message", [
    ({"cellz": []}, "unknown setting(s) 'cellz' for Recipe"),
    ({"cells": [{"name": "A", "baselin": True}]}, "unknown setting(s) 'baselin' for Cell in cells[0]"),
    ({"cells": [{"name": "A", "init": "nope"}]}, "cells[0] ('A').init: 'nope' is not a pretrain run"),
    ({"cells": [{"name": "A", "settings": {"run_name": "x"}}]}, "cells[0] ('A').settings: run_name cannot be set"),
    ({"cells": [{"name": "A", "settings": {"dataset": "x"}}]}, "cells[0] ('A').settings: dataset cannot be set"),
    ({"cells": [{"name": "A"}, {"name": "a"}]}, "share the directory 'a'"),
    ({"main": "Nope"}, "main: 'Nope' is not a cell"),
    ({"main": "ID"}, "main: 'ID' is marked baseline"),
    ({"convergence": ["X"]}, "convergence: 'X' is not a cell"),
    ({"metrics": ["MRR@10"]}, "metrics: 'MRR@10' is not HR@k or NDCG@k"),
    ({"evaluate": ["cold"]}, "evaluate[0]: 'cold' is not one of"),
    ({"pretrain": {"src": {"stage": "pretrain"}}}, "pretrain.src: needs a `dataset`"),
    ({"seeds": "x"}, "seeds[0]: expected an integer"),
    ({"recipe": 3}, "recipe: 3 is not one of [2]"),
])
def test_recipe_errors_name_the_file_and_the_key(change, message):
    with pytest.raises(ConfigError) as err:
        parse_recipe(hand_recipe(**change), "pipelines/hand.yaml")
    assert str(err.value).startswith("pipelines/hand.yaml: ") and message in str(err.value), str(err.value)


def test_settings_are_checked_as_train_configs_when_the_grid_is_planned(tmp_path):
    bad_default = parse_recipe(hand_recipe(defaults={"epoch": 1}), "r.yaml")
    with pytest.raises(ConfigError, match=r"r.yaml: defaults: unknown setting\(s\) 'epoch' for TrainConfig"):
        plan(bad_default, tmp_path, source="r.yaml")
    bad_cell = parse_recipe(hand_recipe(cells=[{"name": "A", "settings": {"model": {"item_tower": {"d_modl": 3}}}}],
                                        main=None), "r.yaml")
    with pytest.raises(ConfigError, match=r"r.yaml: cell 'A' on d1: unknown setting\(s\) 'd_modl' .* in model.item_tower"):
        plan(bad_cell, tmp_path, source="r.yaml")
    with pytest.raises(ConfigError, match="--only Z: not a cell"):
        plan(parse_recipe(hand_recipe(), "r.yaml"), tmp_path, only=("Z",), source="r.yaml")


def test_a_plain_train_config_is_not_taken_for_a_recipe(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("stage: finetune\n")
    with pytest.raises(ConfigError, match="not a pipeline recipe .*`pmmcache train --config"):
        load_recipe(path)


def test_settings_merge_defaults_then_cell_then_runner_fields(tmp_path):
    recipe = parse_recipe(hand_recipe(
        seeds=[3], datasets=["d1"], defaults={"epochs": 2, "model": {"item_tower": {"fusion_heads": 2}}},
        pretrain={"src": {"stage": "pretrain", "dataset": "s1,s2"}},
        cells=[{"name": "Ours", "init": "src", "settings": {
            "stage": "finetune", "model": {"item_tower": {"d_model": 32}, "user_encoder": {"d_model": 32}}}}]),
        "r.yaml")
    pretrain, cell = plan(recipe, tmp_path / "runs")
    assert pretrain.run_dir == tmp_path / "runs" / "hand" / "pretrain" / "src" / "seed-3"
    assert cell.run_dir == tmp_path / "runs" / "hand" / "ours" / "d1" / "seed-3"
    assert cell.config.init == str(pretrain.run_dir) and cell.config.seed == 3 and cell.config.dataset == "d1"
    assert (cell.config.epochs, cell.config.model.item_tower.d_model, cell.config.model.item_tower.fusion_heads) == (2, 32, 2)
    assert pretrain.config.stage == "pretrain" and pretrain.config.dataset == "s1,s2"


def test_config_differences_name_nested_fields_and_treat_absent_fields_as_defaults():
    saved = {"lr": 0.1, "model": {"item_tower": {"d_model": 32}}, "resume": False}
    current = {"lr": 0.2, "model": {"item_tower": {"d_model": 64}}, "resume": True, "prefetch": True}
    assert config_differences(saved, current) == ["lr", "model.item_tower.d_model"]  # prefetch: default
    assert config_differences(saved, {**current, "prefetch": False}) == ["lr", "model.item_tower.d_model", "prefetch"]


# ------------------------------------------------------------------------------- a tiny recipe end to end


def make_tiny(toy, root: Path):
    """The toy cache, a tiny recipe file (one pre-training run, two cells) and the pipeline run once."""
    defaults = train_settings(toy, root, "unused", epochs=2, patience=5)
    for key in ("dataset", "runs_dir", "run_name"):
        defaults.pop(key)
    recipe = {"recipe": 2, "name": "tiny", "description": "two cells on the toy data", "datasets": [NAME],
              "seeds": [42], "defaults": defaults,
              "pretrain": {"src": {"stage": "pretrain", "dataset": NAME, "epochs": 1}},
              "cells": [{"name": "From scratch", "baseline": True, "settings": {"stage": "finetune"}},
                        {"name": "Pre-trained", "init": "src", "settings": {"stage": "finetune"}}],
              "main": "Pre-trained", "convergence": ["From scratch", "Pre-trained"]}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    runs = root / "runs"
    first = pipeline_cli("run", str(path), "--runs-dir", str(runs))
    return path, runs, first


@pytest.fixture(scope="module")
def tiny(toy, tmp_path_factory):
    return make_tiny(toy, tmp_path_factory.mktemp("pipeline"))


def pipeline_cli(*args: str, code: int = 0):
    result = CliRunner().invoke(main, ["pipeline", *args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def cell_dir(runs: Path, cell: str) -> Path:
    return runs / "tiny" / cell / NAME / "seed-42"


def test_a_tiny_recipe_runs_every_cell_and_writes_the_results(tiny):
    path, runs, first = tiny
    assert "[1/3] train    pretrain src (toy), seed 42" in first.output
    assert "[3/3] done     Pre-trained / toy / seed 42" in first.output
    assert "3 runs: 3 trained, 0 resumed, 0 evaluated, 0 skipped" in first.output
    scratch, pretrained = cell_dir(runs, "from-scratch"), cell_dir(runs, "pre-trained")
    assert json.loads((pretrained / "config.json").read_text())["init"] == str(runs / "tiny" / "pretrain" / "src" / "seed-42")
    assert json.loads((pretrained / "pipeline.json").read_text())["cell"] == "Pre-trained"

    test = {name: json.loads((d / "eval.json").read_text())["metrics"]["test"]
            for name, d in (("from-scratch", scratch), ("pre-trained", pretrained))}
    out = runs / "tiny"
    rows = list(csv.reader(io.StringIO((out / "results.csv").read_text())))
    assert rows[0] == ["dataset", "metric", "From scratch", "Pre-trained", "Improv. (%)"]
    assert [r[:2] for r in rows[1:]] == [[NAME, "HR@10"], [NAME, "NDCG@10"]]
    for row, metric in zip(rows[1:], ("HR@10", "NDCG@10")):
        base, main_value = test["from-scratch"][metric], test["pre-trained"][metric]
        assert float(row[2]) == pytest.approx(base * 100, abs=1e-4) and float(row[3]) == pytest.approx(main_value * 100, abs=1e-4)
        expected = "" if base == 0 else f"{(main_value - base) / base * 100:.4f}"
        assert row[4] == expected
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# tiny\n\ntwo cells on the toy data\n") and f"Recipe `{path}`; seeds 42" in markdown
    assert "| Dataset | Metric | From scratch | Pre-trained | Improv. (%) |" in markdown
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def trained_files(runs: Path) -> dict[Path, int]:
    """What training writes, by modification time: a run trained again rewrites its files."""
    return {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.name in ("metrics.jsonl", "COMPLETE", "eval.json")}


def test_a_rerun_skips_every_finished_run(tiny):
    path, runs, _ = tiny
    before = trained_files(runs)
    result = pipeline_cli("run", str(path), "--runs-dir", str(runs))
    assert trained_files(runs) == before  # nothing was trained or evaluated again
    assert result.output.count("skip     ") == 3 and "0 trained, 0 resumed, 0 evaluated, 3 skipped" in result.output
    assert "| toy | HR@10 |" in pipeline_cli("report", str(path), "--runs-dir", str(runs)).output
    listing = pipeline_cli("list", str(path.parent), "--runs-dir", str(runs)).output
    assert "tiny.yaml: recipe 'tiny', 3 runs (3 finished) - two cells on the toy data" in listing


def test_an_unfinished_run_is_resumed_and_only_it(tiny, monkeypatch):
    path, runs, _ = tiny
    scratch = cell_dir(runs, "from-scratch")
    (scratch / "eval.json").unlink()  # as if killed after its last epoch, before the final evaluation
    dry = pipeline_cli("run", str(path), "--runs-dir", str(runs), "--dry-run").output
    assert "[2/3] resume   From scratch / toy / seed 42" in dry and dry.count("finished ") == 2
    calls = []
    real_run = train.run
    monkeypatch.setattr(train, "run", lambda config, **k: calls.append(config) or real_run(config, **k))
    result = pipeline_cli("run", str(path), "--runs-dir", str(runs))
    assert [(c.run_name, c.resume, c.stage) for c in calls] == [("seed-42", True, "finetune")]
    assert Path(calls[0].runs_dir) == scratch.parent
    assert "1 resumed, 0 evaluated, 2 skipped" in result.output and (scratch / "eval.json").is_file()


def test_a_changed_setting_is_named_and_never_reused_silently(tiny, monkeypatch):
    path, runs, _ = tiny
    result = pipeline_cli("run", str(path), "--runs-dir", str(runs), "--set", "defaults.lr=0.5", code=2)
    assert "differing fields" in result.stderr and "lr" in result.stderr and "--force" in result.stderr
    assert str(cell_dir(runs, "from-scratch")) in result.stderr
    dry = pipeline_cli("run", str(path), "--runs-dir", str(runs), "--set", "defaults.lr=0.5", "--dry-run").output
    assert dry.count("changed  ") == 3 and "  lr" in dry


def test_cold_start_evaluation_is_added_to_finished_runs_without_training(tiny):
    path, runs, _ = tiny
    before = trained_files(runs)
    result = pipeline_cli("run", str(path), "--runs-dir", str(runs), "--set", "evaluate=[full_rank,cold_start]",
                          "--set", "cold_start_threshold=9")
    assert trained_files(runs) == before  # cold-start evaluation retrains nothing
    assert "2 evaluated, 1 skipped" in result.output  # the pre-training run is not a table cell
    record = json.loads((cell_dir(runs, "pre-trained") / "eval-cold-start.json").read_text())
    assert record["threshold"] == 9 and record["cases"] > 0  # every toy item occurs < 9 times in training
    rows = list(csv.reader(io.StringIO((runs / "tiny" / "results.csv").read_text())))
    assert [r[1] for r in rows[1:]] == ["HR@10", "NDCG@10", "cold HR@10", "cold NDCG@10"]
    assert float(rows[4][3]) == pytest.approx(record["metrics"]["NDCG@10"] * 100, abs=1e-4)
    states = [run_state(r).state for r in plan(parse_recipe({**yaml.safe_load(path.read_text()),
                                                             "evaluate": ["cold_start"], "cold_start_threshold": 9},
                                                            path), runs)]
    assert states == ["finished"] * 3


def test_force_retrains_a_changed_run_and_the_report_leaves_out_stale_ones(tiny):
    """Last: it leaves the scratch run changed against the recipe file."""
    path, runs, _ = tiny
    result = pipeline_cli("run", str(path), "--runs-dir", str(runs), "--only", "From scratch",
                          "--set", "defaults.lr=0.5", "--force")
    assert "retrain  From scratch / toy / seed 42  (--force; lr differ)" in result.output
    assert "1 runs: 1 trained" in result.output  # --only: the pre-training run is not needed
    assert json.loads((cell_dir(runs, "from-scratch") / "config.json").read_text())["lr"] == 0.5
    report = pipeline_cli("report", str(path), "--runs-dir", str(runs)).output
    assert "note: left out, made with other settings (lr): From scratch / toy / seed 42" in report
    assert "| toy | HR@10 | – |" in report


def test_a_finished_run_trains_on_when_only_its_budget_is_raised(toy, tmp_path):
    path, runs, _ = make_tiny(toy, tmp_path)  # its own grid: this test changes what the runs hold
    scratch = cell_dir(runs, "from-scratch")
    before = read_history(scratch)

    def run(*args: str, code: int = 0):
        return pipeline_cli("run", str(path), "--runs-dir", str(runs), *args, code=code).output

    dry = run("--only", "From scratch", "--set", "defaults.epochs=3", "--dry-run")
    assert "resume   From scratch / toy / seed 42" in dry and "epochs raised: trains on" in dry
    assert "1 resumed" in run("--only", "From scratch", "--set", "defaults.epochs=3")
    after = read_history(scratch)
    assert [r["epoch"] for r in after] == [1, 2, 3] and [learned(r) for r in after[:2]] == [learned(r) for r in before]
    assert json.loads((scratch / "config.json").read_text())["epochs"] == 3
    assert "changed  From scratch / toy / seed 42" in run("--only", "From scratch", "--dry-run")  # 2 < 3 epochs done

    # A run that stopped early stays stopped when only epochs grow, as a run made with them would have.
    checkpoint = scratch / "checkpoints" / "epoch-0003"
    state = json.loads((checkpoint / "train_state.json").read_text())
    (checkpoint / "train_state.json").write_text(json.dumps({**state, "bad_epochs": 5}))  # patience 5 used up
    ckpt.seal(checkpoint, 3)
    dry = run("--only", "From scratch", "--set", "defaults.epochs=4", "--dry-run")
    assert "finished From scratch / toy / seed 42" in dry and "stopped early" in dry

    # A pre-training run that trains on makes its finished cells stale before anything is trained.
    files = trained_files(runs)
    dry = run("--set", "defaults.epochs=3", "--set", "pretrain.src.epochs=2", "--dry-run")
    assert "resume   pretrain src (toy), seed 42" in dry and "changed  Pre-trained / toy / seed 42" in dry
    assert "trains on" in dry.split("changed  Pre-trained")[1].splitlines()[0]
    run("--set", "defaults.epochs=3", "--set", "pretrain.src.epochs=2", code=2)
    assert trained_files(runs) == files  # refused up front: nothing was trained

    shutil.rmtree(scratch / "checkpoints")  # nothing to train on from: it would start over
    dry = run("--only", "From scratch", "--set", "defaults.epochs=4", "--dry-run")
    assert "changed  From scratch / toy / seed 42" in dry and "no checkpoint left" in dry


def test_a_damaged_run_config_is_named_not_a_traceback(tiny, tmp_path):
    path, runs, _ = tiny
    copy = Path(shutil.copytree(runs, tmp_path / "runs"))
    config = cell_dir(copy, "from-scratch") / "config.json"
    config.write_text('{"stage": ')  # truncated by a full disk or a crash
    result = pipeline_cli("run", str(path), "--runs-dir", str(copy), "--dry-run", code=2)
    assert f"error: {config}: damaged" in result.output and "Traceback" not in result.output
