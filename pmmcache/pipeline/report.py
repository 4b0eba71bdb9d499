"""Results of a recipe: the paper-layout table (Markdown + CSV) and the convergence plot (PNG).

Layout (paper Tables III-VIII): one row per (dataset, metric) of the TEST split, then the cold-start
rows when evaluated; one column per cell, the mean over seeds in % (with "± std" when there are
several seeds); last, "Improv. (%)" = (main - best baseline) / best baseline x 100.
`build_table` is a pure function of run records, so it is tested on hand-made numbers.
"""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pmmcache.pipeline.recipe import Recipe
from pmmcache.pipeline.runner import COLD_START_FILE, PlannedRun, run_state

IMPROVEMENT = "Improv. (%)"
CONVERGENCE_METRIC = "valid_NDCG@10"


@dataclass(frozen=True)
class RunRecord:
    """What the table and the plot need from one finished cell run."""

    cell: str
    dataset: str
    seed: int
    test: dict[str, float]  # test-split metrics of the best epoch (fractions, not %)
    cold: dict[str, float] | None = None  # cold-start metrics, when evaluated
    valid_curve: tuple[float, ...] = ()  # valid NDCG@10 after each epoch


@dataclass(frozen=True)
class Value:
    mean: float  # a fraction; shown in %
    std: float | None  # sample standard deviation over seeds; None for one seed
    n: int  # seeds that contributed


@dataclass(frozen=True)
class Row:
    dataset: str
    metric: str  # "HR@10", or "cold HR@10" for cold-start cases
    values: dict[str, Value]  # cell -> value; cells without a finished run are absent
    improvement: float | None  # in %; None without a main cell, a baseline value, or when it is 0


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]  # cell names in recipe order
    rows: tuple[Row, ...]
    seeds: tuple[int, ...]


def build_table(recipe: Recipe, records: list[RunRecord]) -> Table:
    """The results table of `records` laid out as the recipe says."""
    kinds = [("", "test")] + ([("cold ", "cold")] if recipe.cold_start else [])
    rows = []
    for dataset in recipe.datasets:
        for label, source in kinds:
            for metric in recipe.metrics:
                values = {}
                for cell in recipe.cells:
                    found = [_metric(r, source, metric) for r in records if r.cell == cell.name and r.dataset == dataset]
                    found = [v for v in found if v is not None]
                    if found:
                        values[cell.name] = Value(statistics.fmean(found),
                                                  statistics.stdev(found) if len(found) > 1 else None, len(found))
                rows.append(Row(dataset, label + metric, values, _improvement(recipe, values)))
    return Table(tuple(c.name for c in recipe.cells), tuple(rows), recipe.seeds)


def _metric(record: RunRecord, source: str, metric: str) -> float | None:
    metrics = record.test if source == "test" else (record.cold or {})
    return metrics.get(metric)


def _improvement(recipe: Recipe, values: dict[str, Value]) -> float | None:
    baselines = [values[c.name].mean for c in recipe.cells if c.baseline and c.name in values]
    if recipe.main is None or recipe.main not in values or not baselines or max(baselines) <= 0:
        return None
    best = max(baselines)
    return (values[recipe.main].mean - best) / best * 100.0


def _percent(value: Value, seeds: int) -> str:
    text = f"{value.mean * 100:.2f}"
    if value.std is not None:
        text += f" ± {value.std * 100:.2f}"
    if value.n < seeds:
        text += f" (n={value.n})"
    return text


def format_markdown(table: Table, header: list[str]) -> str:
    """Markdown: header lines, then the table; the best cell of each row is bold, like the paper."""
    columns = ["Dataset", "Metric", *table.columns, IMPROVEMENT]
    lines = [*header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * 2 + "---:|" * (len(columns) - 2)]
    previous = None
    for row in table.rows:
        best = max((v.mean for v in row.values.values()), default=None)
        cells = []
        for name in table.columns:
            value = row.values.get(name)
            text = _percent(value, len(table.seeds)) if value else "–"
            cells.append(f"**{text}**" if value and value.mean == best and len(row.values) > 1 else text)
        improvement = "" if row.improvement is None else f"{row.improvement:+.2f}"
        dataset = row.dataset if row.dataset != previous else ""
        previous = row.dataset
        lines.append("| " + " | ".join([dataset, row.metric, *cells, improvement]) + " |")
    return "\n".join(lines) + "\n"


def format_csv(table: Table) -> str:
    """CSV: dataset, metric, one column per cell (mean in %), Improv. (%); with several seeds also
    `<cell> std` and `<cell> n` columns. Empty fields where a value is missing."""
    several = len(table.seeds) > 1
    header = ["dataset", "metric", *table.columns, IMPROVEMENT]
    if several:
        header += [f"{c} std" for c in table.columns] + [f"{c} n" for c in table.columns]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        values = [row.values.get(c) for c in table.columns]
        line = [row.dataset, row.metric, *[f"{v.mean * 100:.4f}" if v else "" for v in values],
                "" if row.improvement is None else f"{row.improvement:.4f}"]
        if several:
            line += [f"{v.std * 100:.4f}" if v and v.std is not None else "" for v in values]
            line += [str(v.n) if v else "0" for v in values]
        writer.writerow(line)
    return out.getvalue()


# ------------------------------------------------------------------------------------------ from runs


def collect_records(runs: list[PlannedRun]) -> tuple[list[RunRecord], list[str]]:
    """Records of the finished cell runs, and notes on the runs left out (unfinished or changed)."""
    records, notes = [], []
    for run in runs:
        if run.kind != "cell":
            continue
        state = run_state(run)
        if state.state in ("new", "resume"):
            notes.append(f"not finished: {run.label}")
            continue
        if state.state == "changed":
            notes.append(f"left out, made with other settings ({state.detail}): {run.label}")
            continue
        records.append(read_record(run, with_cold_start=state.state == "finished"))
    return records, notes


def read_record(run: PlannedRun, with_cold_start: bool = True) -> RunRecord:
    evaluation = json.loads((run.run_dir / "eval.json").read_text())
    cold_path = run.run_dir / COLD_START_FILE
    cold = json.loads(cold_path.read_text()).get("metrics") if with_cold_start and cold_path.is_file() else None
    history_path = run.run_dir / "metrics.jsonl"
    history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()] \
        if history_path.is_file() else []
    curve = tuple(float(r[CONVERGENCE_METRIC]) for r in history if CONVERGENCE_METRIC in r)
    return RunRecord(run.name, run.dataset, run.seed, evaluation["metrics"]["test"], cold, curve)


def plot_convergence(recipe: Recipe, records: list[RunRecord], path: Path) -> bool:
    """Valid NDCG@10 per epoch (mean over seeds) of the recipe's convergence cells, one panel per
    dataset (paper Fig. 3). Returns False (and writes nothing) when there is nothing to draw."""
    curves = {(d, c): _mean_curve([r.valid_curve for r in records if r.dataset == d and r.cell == c])
              for d in recipe.datasets for c in recipe.convergence}
    curves = {key: curve for key, curve in curves.items() if curve}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    datasets = [d for d in recipe.datasets if any(key[0] == d for key in curves)]
    figure, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.4), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        for cell in recipe.convergence:
            curve = curves.get((dataset, cell))
            if curve:
                axis.plot(range(1, len(curve) + 1), [v * 100 for v in curve], marker="o", label=cell)
        axis.set_title(dataset)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("valid NDCG@10 (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(f"{recipe.name}: convergence (mean over {len(recipe.seeds)} seed(s))")
    figure.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    os.replace(tmp, path)
    return True


def _mean_curve(curves: list[tuple[float, ...]]) -> list[float]:
    """Epoch-wise mean; a seed that stopped early counts only for the epochs it ran."""
    length = max((len(c) for c in curves), default=0)
    return [statistics.fmean([c[e] for c in curves if len(c) > e]) for e in range(length)]


def header_lines(recipe: Recipe, source: str, records: list[RunRecord]) -> list[str]:
    seeds = ", ".join(str(s) for s in recipe.seeds)
    spread = f"mean ± sample std over {len(recipe.seeds)} seeds" if len(recipe.seeds) > 1 else "one seed"
    lines = [f"# {recipe.name}", ""]
    if recipe.description:
        lines += [recipe.description, ""]
    lines.append(f"Recipe `{source}`; seeds {seeds} ({spread}); {len(records)} finished runs; TEST split, "
                 "full ranking over all items; values in %.")
    if recipe.cold_start:
        lines.append(f"`cold` rows: every prefix of a user sequence that ends with a cold item (fewer than "
                     f"{recipe.cold_start_threshold} occurrences in the training data), paper IV-A.")
    if recipe.main:
        baselines = [c.name for c in recipe.cells if c.baseline]
        lines.append(f"{IMPROVEMENT} = ({recipe.main} − best of {', '.join(baselines) or 'no baseline'}) / "
                     "that baseline × 100.")
    lines.append(f"Code {code_version()}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    return lines


def code_version() -> str:
    """`git describe --always --dirty` of the pmmcache source, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"commit {out.stdout.strip()}" if out.returncode == 0 and out.stdout.strip() else "unknown"


@dataclass(frozen=True)
class Report:
    markdown: Path
    csv: Path
    plot: Path | None
    table: Table
    notes: list[str]


def write_report(recipe: Recipe, runs: list[PlannedRun], out_dir: Path, source: str) -> Report:
    """results.md, results.csv and convergence.png under `out_dir`, from the finished runs."""
    records, notes = collect_records(runs)
    table = build_table(recipe, records)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "results.md", out_dir / "results.csv"
    texts = format_markdown(table, header_lines(recipe, source, records)), format_csv(table)
    for path, text in zip(paths, texts):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    plot = out_dir / "convergence.png"
    drawn = plot_convergence(recipe, records, plot)
    return Report(paths[0], paths[1], plot if drawn else None, table, notes)
