"""Every shipped file in pipelines/ loads: plain settings files into the config they are written for,
pipeline recipes (`recipe: 2`) into a Recipe whose every run's TrainConfig is built and checked."""
from pathlib import Path

import pytest

from pmmcache.config import from_dict, load_file
from pmmcache.demo_job import DemoJobConfig
from pmmcache.demo_job import train_config as demo_job_train_config
from pmmcache.pipeline import parse_recipe, plan
from pmmcache.run_config import TrainConfig

FILES = sorted((Path(__file__).parent.parent / "pipelines").glob("*.yaml"))
TRAIN_CONFIGS = [p for p in FILES if "recipe" not in load_file(p)]
RECIPES = [p for p in FILES if "recipe" in load_file(p)]


def shipped_recipe(name: str):
    """The recipe `pipelines/<name>.yaml`, parsed."""
    path = Path(__file__).parent.parent / "pipelines" / f"{name}.yaml"
    return parse_recipe(load_file(path), path.name)


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=[p.name for p in TRAIN_CONFIGS])
def test_shipped_train_configs_load(path):
    config = from_dict(TrainConfig, load_file(path))
    assert config.dataset.startswith("demo/")


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_load_and_plan(path, tmp_path):
    recipe = parse_recipe(load_file(path), path)
    runs = plan(recipe, tmp_path, source=str(path))
    cells = sum(len(recipe.cell_datasets(c)) for c in recipe.cells)
    assert len(runs) == (len(recipe.pretrain) + cells) * len(recipe.seeds)


def test_demo_pretrain_file_matches_the_demo_job():
    """The file documents what `pmmcache demo` runs; keep them in step."""
    job = DemoJobConfig()
    config = from_dict(TrainConfig, load_file(Path(__file__).parent.parent / "pipelines" / "demo-pretrain.yaml"))
    assert (config.encoders.top_blocks, config.model.item_tower.d_model, config.model.item_tower.pooling,
            config.model.item_tower.fusion_norm_first, config.lr, config.encoder_lr, config.epochs) == (
        job.top_blocks, job.d_model, job.pooling, job.fusion_norm_first, job.lr, job.encoder_lr, job.pretrain_epochs)
    ran = demo_job_train_config(job, stage="pretrain", dataset="demo/kitchen,demo/garden", run_name="pretrain",
                                epochs=job.pretrain_epochs)
    assert (config.train_windows, config.patience) == (ran.train_windows, ran.patience)


def test_demo_transfer_tuning_recipe_matches_the_grid_it_tunes():
    """The tuning runs are only evidence for demo-transfer.yaml while they share its settings and its
    PMMRec pre-training; every tuning cell differs from a grid cell only in the learning rate it tunes."""
    grid, tune = shipped_recipe("demo-transfer"), shipped_recipe("demo-transfer-tune")
    assert tune.defaults == grid.defaults
    assert tune.pretrain == {"pmmrec": grid.pretrain["pmmrec"]}
    grid_cells = {c.name: c for c in grid.cells}
    for cell in tune.cells:
        base = grid_cells[cell.name.split(" (")[0]]
        tuned = {k: v for k, v in cell.settings.items() if k not in ("lr", "init_lr")}
        assert (cell.init, tuned) == (base.init, base.settings), cell.name


def test_table6_and_table7_recipes_share_the_transfer_grids_budget():
    """Table VI's pre-trainings get the transfer grid's budget, `both` being its PMMRec pre-training, and
    Table VII's cells train with the grid's fine-tuning settings: their tables are read beside the grid's."""
    grid = shipped_recipe("demo-transfer")
    single, cold = shipped_recipe("demo-table6-single-source"), shipped_recipe("demo-table7-cold-start")
    assert single.defaults == grid.defaults
    assert single.pretrain["both"] == grid.pretrain["pmmrec"]
    budget = {k: grid.pretrain["pmmrec"][k] for k in ("stage", "epochs", "patience")}
    for name in ("kitchen", "garden"):
        assert {k: single.pretrain[name][k] for k in budget} == budget, name
    # Table VII trains each cell on its domain with the cell's own objectives, otherwise as the grid fine-tunes.
    assert {**cold.defaults, "stage": grid.defaults["stage"]} == grid.defaults
