"""Pipeline recipes: a typed, strictly checked description of an experiment grid (see docs/pipelines.md).

A recipe names target datasets (the table's rows), seeds, shared TrainConfig settings (`defaults`),
named pre-training runs, and cells (the table's columns). `recipe: 2` at the top marks a file as a
recipe; the other files in `pipelines/` are plain `pmmcache train --config` files.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pmmcache.config import from_dict, load_file
from pmmcache.errors import ConfigError

RECIPE_FORMAT = 2
# Fields the runner sets for every run; a recipe that sets them would be silently overridden.
RUNNER_FIELDS = ("runs_dir", "run_name", "resume", "seed")
PRETRAIN_DIR = "pretrain"  # <runs>/<recipe>/pretrain/<name>/seed-<s>; no cell may use this directory
METRIC_PATTERN = re.compile(r"^(HR|NDCG)@\d+$")


@dataclass(frozen=True)
class Cell:
    """One column of the results table: a training setting run on every target dataset and seed."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields, merged over `defaults`
    init: str | None = None  # name of a `pretrain` run: this cell fine-tunes from that seed's run
    baseline: bool = False  # a reference the "Improv. (%)" column compares `main` against
    datasets: tuple[str, ...] = ()  # a subset of the recipe's datasets; empty = all of them


@dataclass(frozen=True)
class Recipe:
    recipe: Literal[2]
    name: str
    datasets: tuple[str, ...]
    cells: tuple[Cell, ...]
    description: str = ""
    seeds: tuple[int, ...] = (42,)
    metrics: tuple[str, ...] = ("HR@10", "NDCG@10")  # test-split metrics shown in the table
    defaults: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields of every run
    pretrain: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> TrainConfig fields
    main: str | None = None  # the cell whose improvement over the best baseline is reported
    evaluate: tuple[Literal["full_rank", "cold_start"], ...] = ("full_rank",)
    cold_start_threshold: int = 10  # items with fewer training occurrences are cold (paper IV-A)
    convergence: tuple[str, ...] = ()  # cells drawn in convergence.png (valid NDCG@10 per epoch)

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)

    def cell_datasets(self, cell: Cell) -> tuple[str, ...]:
        return cell.datasets or self.datasets

    @property
    def cold_start(self) -> bool:
        return "cold_start" in self.evaluate


def slug(text: str) -> str:
    """A directory name for a cell or dataset: 'PMMRec w. PT' -> 'pmmrec-w-pt', 'demo/toys' -> 'demo_toys'."""
    text = text.replace("/", "_").replace(",", "+")
    return re.sub(r"[^a-z0-9_+]+", "-", text.lower()).strip("-") or "x"


def read_recipe_data(path: str | Path) -> dict[str, Any]:
    """The raw table of a recipe file (YAML/TOML/JSON), refusing a plain train config with a pointer."""
    data = load_file(path)
    if "recipe" not in data:
        raise ConfigError(f"{path} is not a pipeline recipe (no `recipe: {RECIPE_FORMAT}` key); a plain settings "
                          f"file runs with `pmmcache train --config {path}`")
    return data


def parse_recipe(data: dict[str, Any], source: str | Path) -> Recipe:
    """A checked Recipe from a raw table; every error names `source` and the offending key."""
    try:
        recipe = from_dict(Recipe, data)
        _check(recipe)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(read_recipe_data(path), path)


def _check(recipe: Recipe) -> None:
    """Cross-field rules that the types alone do not express."""
    if recipe.recipe != RECIPE_FORMAT:
        raise ConfigError(f"recipe: format {recipe.recipe!r} is not supported (expected {RECIPE_FORMAT})")
    for key, values in (("datasets", recipe.datasets), ("seeds", recipe.seeds), ("cells", recipe.cells)):
        if not values:
            raise ConfigError(f"{key}: must list at least one entry")
        if len(set(values if key != "cells" else [c.name for c in values])) != len(values):
            raise ConfigError(f"{key}: entries must be unique")
    for metric in recipe.metrics:
        if not METRIC_PATTERN.match(metric):
            raise ConfigError(f"metrics: {metric!r} is not HR@k or NDCG@k")
    if not isinstance(recipe.pretrain, dict):
        raise ConfigError(f"pretrain: expected a table of named runs, got {recipe.pretrain!r}")
    _check_settings("defaults", recipe.defaults, forbidden=RUNNER_FIELDS + ("dataset", "init"))
    for name, settings in recipe.pretrain.items():
        _check_settings(f"pretrain.{name}", settings, forbidden=RUNNER_FIELDS)
        if "dataset" not in settings:
            raise ConfigError(f"pretrain.{name}: needs a `dataset` (the source domains, comma-separated)")
    slugs: dict[str, str] = {}
    for index, cell in enumerate(recipe.cells):
        where = f"cells[{index}] ({cell.name!r})"
        _check_settings(f"{where}.settings", cell.settings, forbidden=RUNNER_FIELDS + ("dataset", "init"))
        if cell.init is not None and cell.init not in recipe.pretrain:
            raise ConfigError(f"{where}.init: {cell.init!r} is not a pretrain run (known: "
                              f"{', '.join(recipe.pretrain) or 'none'})")
        unknown = [d for d in cell.datasets if d not in recipe.datasets]
        if unknown:
            raise ConfigError(f"{where}.datasets: {', '.join(unknown)} not in the recipe's datasets")
        if slug(cell.name) == PRETRAIN_DIR:
            raise ConfigError(f"{where}: the name {cell.name!r} is reserved for the pre-training runs' directory")
        other = slugs.setdefault(slug(cell.name), cell.name)
        if other != cell.name:
            raise ConfigError(f"{where}: name {cell.name!r} and {other!r} share the directory {slug(cell.name)!r}")
    names = [c.name for c in recipe.cells]
    if recipe.main is not None:
        if recipe.main not in names:
            raise ConfigError(f"main: {recipe.main!r} is not a cell (cells: {', '.join(names)})")
        if recipe.cell(recipe.main).baseline:
            raise ConfigError(f"main: {recipe.main!r} is marked baseline; the improvement compares main against baselines")
    for name in recipe.convergence:
        if name not in names:
            raise ConfigError(f"convergence: {name!r} is not a cell (cells: {', '.join(names)})")
    if recipe.cold_start_threshold < 1:
        raise ConfigError("cold_start_threshold: must be >= 1")


def _check_settings(where: str, settings: Any, forbidden: tuple[str, ...]) -> None:
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: expected a table of TrainConfig settings, got {settings!r}")
    clash = [key for key in forbidden if key in settings]
    if clash:
        raise ConfigError(f"{where}: {', '.join(clash)} cannot be set here: the runner sets runs_dir, run_name, "
                          "resume and seed (from `seeds`); a cell's dataset comes from `datasets` and its "
                          "pre-trained start from `init`")
