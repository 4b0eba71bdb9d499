"""Runs a recipe's grid: plans every run, finds what is already done, trains or resumes the rest.

Each run has a fixed directory, so killing the pipeline and running it again picks up where it was:
    <runs>/<recipe>/pretrain/<pretrain-name>/seed-<s>          named pre-training runs
    <runs>/<recipe>/<cell-slug>/<dataset-slug>/seed-<s>        one table cell on one dataset and seed
A run is finished when it has eval.json (and eval-cold-start.json when the recipe asks for it);
a run directory without them is resumed. A finished run whose saved config differs from what the
recipe asks for now is never reused silently: the runner names the differing fields and stops
(`--force` deletes and retrains such runs).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pmmcache import evaluate, train
from pmmcache.config import from_dict, to_dict
from pmmcache.errors import ConfigError, PmmcacheError
from pmmcache.files import write_json
from pmmcache.pipeline.recipe import PRETRAIN_DIR, Recipe, slug
from pmmcache.run_config import TrainConfig
from pmmcache.runs import RESUMABLE_CHANGES, with_init_model, with_settings_it_predates

COLD_START_FILE = "eval-cold-start.json"
PIPELINE_FILE = "pipeline.json"  # which recipe cell made the run, and from which pre-training run

Echo = Callable[[str], None]


@dataclass(frozen=True)
class PlannedRun:
    kind: Literal["pretrain", "cell"]
    name: str  # the pretrain run's or the cell's name
    dataset: str  # what it trains on: the target dataset of a cell, the sources of a pre-training run
    seed: int
    config: TrainConfig
    init_dir: Path | None = None  # the pre-training run a cell starts from
    cold_start: int | None = None  # the cold-item threshold when the recipe asks for cold-start numbers

    @property
    def run_dir(self) -> Path:
        return Path(self.config.runs_dir) / str(self.config.run_name)

    @property
    def label(self) -> str:
        if self.kind == "pretrain":
            return f"pretrain {self.name} ({self.dataset}), seed {self.seed}"
        return f"{self.name} / {self.dataset} / seed {self.seed}"


@dataclass(frozen=True)
class RunState:
    state: Literal["new", "resume", "evaluate", "finished", "changed"]
    detail: str = ""


def pipeline_dir(recipe: Recipe, runs_root: Path) -> Path:
    return Path(runs_root) / slug(recipe.name)


def plan(recipe: Recipe, runs_root: Path, only: tuple[str, ...] = (), source: str = "recipe") -> list[PlannedRun]:
    """Every run of the grid in execution order: per seed, the pre-training runs the chosen cells
    need, then each cell on each of its datasets. Every config is built (and checked) here."""
    names = [c.name for c in recipe.cells]
    unknown = [o for o in only if o not in names]
    if unknown:
        raise ConfigError(f"--only {', '.join(unknown)}: not a cell of {source} (cells: {', '.join(names)})")
    cells = [c for c in recipe.cells if not only or c.name in only]
    needed = [p for p in recipe.pretrain if any(c.init == p for c in cells)] if only else list(recipe.pretrain)
    root = pipeline_dir(recipe, runs_root)
    runs: list[PlannedRun] = []
    for seed in recipe.seeds:
        pretrain_dirs: dict[str, Path] = {}
        for name in needed:
            settings = recipe.pretrain[name]
            config = _config(recipe, settings, {"runs_dir": root / PRETRAIN_DIR / slug(name), "seed": seed},
                             source, f"pretrain.{name}")
            runs.append(PlannedRun("pretrain", name, config.dataset, seed, config))
            pretrain_dirs[name] = runs[-1].run_dir
        for cell in cells:
            init_dir = pretrain_dirs.get(cell.init) if cell.init else None
            for dataset in recipe.cell_datasets(cell):
                fields = {"dataset": dataset, "seed": seed, "runs_dir": root / slug(cell.name) / slug(dataset),
                          **({"init": str(init_dir)} if init_dir else {})}
                config = _config(recipe, cell.settings, fields, source, f"cell {cell.name!r} on {dataset}")
                _check_metrics(recipe, config, f"{source}: cell {cell.name!r}")
                runs.append(PlannedRun("cell", cell.name, dataset, seed, config, init_dir,
                                       recipe.cold_start_threshold if recipe.cold_start else None))
    return runs


def _config(recipe: Recipe, settings: dict[str, Any], fields: dict[str, Any], source: str,
            where: str) -> TrainConfig:
    """defaults < the run's settings (nested tables merged) < what the runner sets."""
    data = deep_merge(deep_merge(recipe.defaults, settings), {**fields, "run_name": f"seed-{fields['seed']}"})
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {_blame(recipe, str(err), where)}: {err}") from err


def _blame(recipe: Recipe, message: str, where: str) -> str:
    """`defaults` when the defaults alone fail the same way (a typo there), else the run's own place."""
    try:
        from_dict(TrainConfig, recipe.defaults)
    except ConfigError as err:
        if str(err) == message:
            return "defaults"
    return where


def _check_metrics(recipe: Recipe, config: TrainConfig, where: str) -> None:
    missing = [m for m in recipe.metrics if int(m.split("@")[1]) not in config.ks]
    if missing:
        raise ConfigError(f"{where}: metrics {', '.join(missing)} are not evaluated (ks = {list(config.ks)})")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`; nested tables are merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ------------------------------------------------------------------------------------------ run states


def run_state(run: PlannedRun) -> RunState:
    """What the run directory holds, judged against the config the recipe asks for now."""
    run_dir = run.run_dir
    if not (run_dir / "config.json").is_file():
        return RunState("new")
    saved = with_settings_it_predates(_read_json(run_dir / "config.json"))
    differences = config_differences(saved, to_dict(_as_train_saves_it(run.config)))
    finished = (run_dir / "eval.json").is_file()
    if run.init_dir is not None and finished:
        recorded = _read_json(run_dir / PIPELINE_FILE).get("init_fingerprint")
        if recorded is not None and recorded != init_fingerprint(run.init_dir):
            differences.append(f"init (the pre-training run {run.init_dir} was retrained or is unfinished)")
    extendable = all(d.split(".")[0] in RESUMABLE_CHANGES for d in differences)
    if differences and finished and extendable and _budget_not_lowered(saved, to_dict(run.config)):
        # Only the budget (or how the run is watched) differs: train on if the new budget lets it.
        trains_on = _trains_on(run_dir, run.config)
        if trains_on is None:
            return RunState("changed", f"{', '.join(differences)} (no checkpoint left to train on from)")
        if trains_on:
            return RunState("resume", f"(finished; {', '.join(differences)} raised: trains on)")
        return RunState("finished", f"({', '.join(differences)} raised; it had stopped early, as it would now)")
    if differences and (finished or not extendable):
        return RunState("changed", ", ".join(differences))
    if not finished:
        return RunState("resume", f"({', '.join(differences)} changed)" if differences else "")
    if run.cold_start is not None:
        cold = _read_json(run_dir / COLD_START_FILE)
        if not cold:
            return RunState("evaluate", "cold-start evaluation missing")
        if cold.get("threshold") != run.cold_start:
            return RunState("evaluate", f"cold-start threshold {cold.get('threshold')} -> {run.cold_start}")
    return RunState("finished")


def _budget_not_lowered(saved: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Epochs and patience not lowered: resuming the finished run then trains exactly what a run made with
    the new budget would have (resume equals the uninterrupted run; an early stop stays one unless the
    patience grew). A lowered budget would keep epochs that the recipe no longer asks for."""
    defaults = to_dict(TrainConfig())
    return all(wanted[key] >= saved.get(key, defaults[key]) for key in ("epochs", "patience"))


def _trains_on(run_dir: Path, config: TrainConfig) -> bool | None:
    """Whether resuming the run (from the checkpoint `train.resume_point` picks) under `config`'s epochs
    and patience would train more epochs; None if it has no usable checkpoint (resuming would start it over)."""
    try:
        start = train.resume_point(run_dir / "checkpoints", warn=False)
    except PmmcacheError:  # every checkpoint damaged
        return None
    if start is None:
        return None
    _, state = start
    return state.epoch < config.epochs and state.bad_epochs < config.patience


def _as_train_saves_it(config: TrainConfig) -> TrainConfig:
    """train.run saves the config as `with_init_model` resolves it (the init run's architecture, the
    NID head only when NID is trained); compare like with like."""
    try:
        return with_init_model(config)
    except PmmcacheError:  # the init run is not there (yet): compare the config as asked
        return config


_MISSING = object()


def config_differences(saved: Any, current: Any, defaults: Any = _MISSING, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ (`resume` is how a run was started, not what it is).

    A setting missing from the saved config counts as its default: a TrainConfig field added later
    does not invalidate runs made before it existed, as long as the recipe leaves it at its default."""
    if defaults is _MISSING:
        defaults = to_dict(TrainConfig())
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(saved.keys() | current.keys()):
            if not prefix and key == "resume":
                continue
            default = defaults.get(key, _MISSING) if isinstance(defaults, dict) else _MISSING
            found += config_differences(saved.get(key, default), current.get(key, _MISSING), default,
                                        f"{prefix}{key}.")
        return found
    return [] if saved == current else [prefix.rstrip(".")]


def init_fingerprint(init_dir: Path) -> str | None:
    """Identifies one training of a pre-training run (its final eval.json); None if unfinished."""
    path = Path(init_dir) / "eval.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    """A run file's JSON object ({} when absent); a damaged one is an error naming it."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise PmmcacheError(f"{path}: damaged ({err}); delete the run directory {path.parent} to retrain it") from err
    if not isinstance(data, dict):
        raise PmmcacheError(f"{path}: a JSON {type(data).__name__}, not the object pmmcache writes; delete the run "
                            f"directory {path.parent} to retrain it")
    return data


# ------------------------------------------------------------------------------------------ execution


@dataclass
class PipelineSummary:
    runs: list[PlannedRun]
    counts: dict[str, int]  # trained / resumed / evaluated / skipped


def run_pipeline(recipe: Recipe, runs_root: Path, *, only: tuple[str, ...] = (), force: bool = False,
                 dry_run: bool = False, show_training: bool = False, source: str = "recipe",
                 echo: Echo = print) -> PipelineSummary:
    """Train, resume or skip every run of the grid, in order; with dry_run, only list them."""
    runs = plan(recipe, runs_root, only, source)
    states = [run_state(run) for run in runs]
    # A finished pre-training run that trains on changes the model its finished cells started from.
    training_on = {run.run_dir for run, state in zip(runs, states) if state.state == "resume"}
    states = [RunState("changed", f"init (the pre-training run {run.init_dir} trains on)")
              if run.init_dir in training_on and state.state != "new" else state
              for run, state in zip(runs, states)]
    if dry_run:
        for index, (run, state) in enumerate(zip(runs, states), 1):
            echo(f"[{index}/{len(runs)}] {state.state:<8} {run.label}  {run.run_dir}"
                 f"{'  ' + state.detail if state.detail else ''}")
        return PipelineSummary(runs, _count(s.state for s in states))
    changed = [(run, state) for run, state in zip(runs, states) if state.state == "changed"]
    if changed and not force:
        raise PmmcacheError(_changed_message(changed))
    done: list[str] = []
    for index, run in enumerate(runs, 1):
        state = run_state(run)  # again: a pre-training run retrained above changes its cells' state
        prefix = f"[{index}/{len(runs)}]"
        if state.state == "changed":
            if not force:
                raise PmmcacheError(_changed_message([(run, state)]))
            echo(f"{prefix} retrain  {run.label}  (--force; {state.detail} differ)")
            shutil.rmtree(run.run_dir)
            state = RunState("new")
        if state.state == "finished":
            echo(f"{prefix} skip     {run.label}  (finished)")
            done.append("skipped")
            continue
        start = time.perf_counter()
        if state.state in ("new", "resume"):
            echo(f"{prefix} {'resume' if state.state == 'resume' else 'train':<8} {run.label}  {run.run_dir}"
                 f"{'  ' + state.detail if state.detail else ''}")
            _train(run, resume=state.state == "resume", show_progress=show_training)
        if run.cold_start is not None:
            _evaluate_cold_start(run)
        if run.kind == "cell":
            write_json(run.run_dir / PIPELINE_FILE, {
                "recipe": recipe.name, "cell": run.name, "dataset": run.dataset, "seed": run.seed,
                "init": str(run.init_dir) if run.init_dir else None,
                "init_fingerprint": init_fingerprint(run.init_dir) if run.init_dir else None})
        echo(f"{prefix} done     {run.label}  {_test_line(run.run_dir, recipe.metrics)}  "
             f"{time.perf_counter() - start:.1f} s")
        done.append({"new": "trained", "resume": "resumed", "evaluate": "evaluated"}[state.state])
    counts = _count(done)
    echo(f"{len(runs)} runs: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("trained", "resumed", "evaluated", "skipped")))
    return PipelineSummary(runs, counts)


def _train(run: PlannedRun, resume: bool, show_progress: bool) -> None:
    if not resume and run.run_dir.exists():  # a directory without config.json holds nothing to keep
        shutil.rmtree(run.run_dir)
    train.run(from_dict(TrainConfig, {**to_dict(run.config), "resume": resume}), show_progress=show_progress)


def _evaluate_cold_start(run: PlannedRun) -> None:
    evaluate.run(evaluate.EvalConfig(run=run.run_dir, full_rank=False, cold_start=True, cold_threshold=run.cold_start,
                                     mask_history=run.config.mask_history, output=run.run_dir / COLD_START_FILE),
                 show=False)


def _test_line(run_dir: Path, metrics: tuple[str, ...]) -> str:
    test = _read_json(run_dir / "eval.json").get("metrics", {}).get("test", {})
    return "  ".join(f"test {m} {test[m]:.4f}" for m in metrics if m in test)


def _changed_message(changed: list[tuple[PlannedRun, RunState]]) -> str:
    lines = [f"  {run.run_dir}: {state.detail}" for run, state in changed]
    return ("the recipe asks for other settings than these runs were made with (differing fields):\n"
            + "\n".join(lines) + "\ndelete those run directories, or pass --force to retrain them")


def _count(states: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return counts
