"""The `pmmcache` command line. Verbs are thin: parse options, build a typed config, call the stage's `run`."""
from __future__ import annotations

import os

# Before transformers/huggingface_hub import: a hub call without this retries for ~46 s offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402

from pmmcache.config import from_dict, load_file  # noqa: E402
from pmmcache.errors import ConfigError, PmmcacheError  # noqa: E402


def build_config(cls: type, config_file: str | None, overrides: dict[str, Any], settings: tuple[str, ...] = ()) -> Any:
    """Config = defaults < config file < command-line options (only those given) < --set KEY=VALUE.

    An option given as a dict (e.g. `encoders`) is merged into that table of the file, key by key."""
    data = load_file(config_file) if config_file else {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **{k: v for k, v in value.items() if v is not None}}
        elif value is not None:
            data[key] = value
    for setting in settings:
        set_dotted(data, setting)
    return from_dict(cls, data)


def set_dotted(data: dict[str, Any], setting: str) -> None:
    """Apply `a.b.c=value` to nested dicts; the value is parsed as YAML (numbers, true/false, lists)."""
    import yaml

    if "=" not in setting:
        raise ConfigError(f"--set {setting!r}: expected KEY=VALUE, e.g. model.item_tower.d_model=256")
    key, raw = setting.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {setting!r}: {part!r} is not a table of settings")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # YAML 1.1 reads no/yes/on/off as booleans; settings like mixed_precision=no mean the word
    node[parts[-1]] = value


class FriendlyGroup(click.Group):
    """Turns user-fixable errors into one clear line and a non-zero exit, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (PmmcacheError, ConfigError) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\ninterrupted; rerun the same command to resume where it stopped", err=True)
            sys.exit(130)


def _quiet_libraries() -> None:
    """Our own progress bars say what is happening; the libraries' per-load bars are noise."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """pmmcache: PMMRec (ICDE 2024), an ID-free multi-modal transferable recommender, as a two-stage
    offline feature-cache pipeline.

    \b
    Stage 1  pmmcache extract   frozen lower encoder blocks, once per item -> cache/<dataset>/<key>.h5
             pmmcache verify-cache   every row of a cache against its checksums
    Stage 2  pmmcache train     top blocks + fusion + user encoder on cached states
             pmmcache eval      full-ranking evaluation over all items (--cold-start: cold items)
    Serve    pmmcache recommend / add-items / export-items   top-k, new items, the item table

    Datasets live in --data-dir (default ./data/<name>/); `demo` is generated on first use.
    """


ENCODER_OPTIONS = ("text_encoder", "vision_encoder", "vision_weights", "top_blocks", "max_text_length", "image_size")


def encoder_options(command: Any) -> Any:
    """The encoder options `extract` and `train` share (train's must match the cache's)."""
    options = [
        click.option("--text-encoder", help="Transformers model id or local dir.  [default: xlm-roberta-base; demo: packaged all-MiniLM-L6-v2]"),
        click.option("--vision-encoder", help="open_clip architecture (ViT-B-32), a local transformers CLIP dir, or pmmcache-tiny-vit.  [default: ViT-B-32; demo: pmmcache-tiny-vit]"),
        click.option("--vision-weights", help="open_clip pretrained tag (openai), 'random', or a weights file.  [default: openai; demo: random]"),
        click.option("-k", "--top-blocks", type=int, help="Top encoder blocks trained in stage 2; the cache holds the input of block n-k.  [default: 2]"),
        click.option("--max-text-length", type=int, help="Tokens per text including CLS.  [default: 50]"),
        click.option("--image-size", type=int, help="Image side in pixels.  [default: 224]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.option("--dataset", help="Dataset name(s), comma-separated; 'demo' is the embedded default.  [default: demo]")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Raw datasets root.  [default: data]")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache root.  [default: cache]")
@encoder_options
@click.option("--modalities", help="Which modalities to extract: text,image | text | image.  [default: text,image]")
@click.option("--batch-size", type=int, help="Items per encoder batch.  [default: 64]")
@click.option("--num-workers", type=int, help="Loader processes decoding images per extraction process.  [default: 2]")
@click.option("--device", help="cpu, cuda, cuda:1 or auto (the accelerate process's device).  [default: auto]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Compute dtype of the lower blocks (storage: see --cache-dtype).  [default: float32]")
@click.option("--cache-dtype", type=click.Choice(["float16", "int8"]), help="How states are stored: float16, or int8 with a float16 scale per token (half the size; dequantised on read).  [default: float16]")
@click.option("--seed", type=int, help="Seed of randomly initialised encoders.  [default: 0]")
@click.option("--force", is_flag=True, default=None, help="Rebuild a cache that was made with other settings.")
@click.option("--set", "settings", multiple=True, help="Override any setting, e.g. --set data.min_core=3 (as for train).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML/YAML/JSON file of these settings.")
def extract(config_file: str | None, settings: tuple[str, ...], **options: Any) -> None:
    """Stage 1: encode every item's text and image with the frozen lower encoder blocks into an HDF5 cache.

    Resumable: interrupt it at any moment and rerun the same command to continue. Runs under
    `accelerate launch` with several processes writing one cache.
    """
    from pmmcache import extract as stage

    _quiet_libraries()
    options["encoders"] = {k: options.pop(k, None) for k in (*ENCODER_OPTIONS, "modalities", "seed")}
    stage.run(build_config(stage.ExtractConfig, config_file, options, settings))


@main.command("verify-cache")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--reencode", is_flag=True, help="Mark damaged rows for re-encoding: the next `pmmcache extract` with the options that made the cache encodes just those items again.")
def verify_cache(paths: tuple[str, ...], reencode: bool) -> None:
    """Check every row of feature caches (files, or folders of *.h5) against the checksums written at
    extraction and for NaN/inf states; name damaged rows and their items, exit non-zero if any."""
    from pmmcache import integrity as stage

    stage.run(stage.VerifyConfig(paths=tuple(Path(p) for p in paths), reencode=reencode))


@main.command()
@click.option("--dataset", default="demo", show_default=True, help="Dataset name(s), comma-separated.")
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--min-core", type=int, help="k-core filtering threshold.  [default: 5]")
@click.option("--max-history", type=int, help="History items kept before each target.  [default: 20]")
@click.option("--truncate", is_flag=True, default=None, help="Store only each user's last max-history + 1 items (released code).  [default: whole sequences]")
def prepare(dataset: str, data_dir: str, cache_dir: str, **options: Any) -> None:
    """Read a raw dataset, filter, split and index it; print its statistics.

    The same settings reach extract and train as `--set data.min_core=3` (etc.)."""
    from pmmcache.data.prepare import PrepareConfig
    from pmmcache.data.registry import resolve_dataset

    config = from_dict(PrepareConfig, {k: v for k, v in options.items() if v is not None})
    prepared = resolve_dataset(dataset, Path(data_dir), Path(cache_dir), config)
    click.echo(json.dumps(prepared.manifest(), indent=2))


@main.command()
@click.option("--stage", type=click.Choice(["pretrain", "finetune"]), help="pretrain: DAP+NICL+NID+RCL; finetune: DAP only.  [default: pretrain]")
@click.option("--dataset", help="Dataset(s) to train on; comma-separated names are combined (multi-source pre-training), e.g. demo/kitchen,demo/garden.  [default: demo]")
@click.option("--cache-dataset", help="Which extracted cache holds the items.  [default: the dataset's base name, e.g. demo]")
@click.option("--init", help="Run (name or directory) whose model parts start this one, e.g. a pre-trained run for fine-tuning.")
@click.option("--run-name", help="Run directory name under --runs-dir.  [default: <stage>-<dataset>]")
@click.option("--runs-dir", type=click.Path(file_okay=False), help="[default: runs]")
@click.option("--data-dir", type=click.Path(file_okay=False), help="[default: data]")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="[default: cache]")
@encoder_options
@click.option("--transfer", type=click.Choice(["full", "item", "user"]), help="With --init, what it transfers (paper III-E): full = item towers + user encoder; item = item towers, user encoder fresh; user = user encoder, item towers from the original encoders.  [default: full]")
@click.option("--modalities", type=click.Choice(["text", "image", "text,image"]), help="Item modalities: text or image alone is the single-modality setting (PMMRec-T / PMMRec-V); it needs only that modality's cache.  [default: the model's, or --init's]")
@click.option("--ablation", type=click.Choice(["none", "no-nicl", "vcl-only", "icl-only", "no-nid", "no-rcl"]), help="A pre-training ablation of Table VIII.  [default: none]")
@click.option("--baseline", type=click.Choice(["sasrec", "morec++"]), help="Train a baseline in the same loop: sasrec = item-ID embeddings, CE over all items; morec++ = multimodal towers with late (concat) fusion, DAP only. Other options and --set still apply.")
@click.option("--epochs", type=int, help="[default: 5]")
@click.option("--batch-size", type=int, help="Users per process.  [default: 32]")
@click.option("--lr", type=float, help="AdamW learning rate.  [default: 1e-4]")
@click.option("--warmup-steps", type=int, help="Linear learning-rate warmup over this many optimizer steps.  [default: 0]")
@click.option("--init-lr", type=float, help="With --init, learning rate of the transferred heads (projections, fusion, user encoder); 0 = --lr.  [default: 0]")
@click.option("--grad-clip", type=float, help="Max gradient norm, 0 = off.  [default: 0]")
@click.option("--mixed-precision", type=click.Choice(["auto", "no", "fp16", "bf16"]), help="[default: auto = bf16 on CUDA]")
@click.option("--patience", type=int, help="Early stopping patience in epochs.  [default: 3]")
@click.option("--seed", type=int, help="[default: 42]")
@click.option("--resume", is_flag=True, default=None, help="Continue the run from its last finished epoch.")
@click.option("--set", "settings", multiple=True, help="Override any setting, e.g. --set model.item_tower.d_model=256 --set objectives.nid=0.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML/YAML/JSON file of settings (TrainConfig fields).")
def train(config_file: str | None, settings: tuple[str, ...], **options: Any) -> None:
    """Stage 2: train top blocks + fusion + user encoder on cached states (pre-train or fine-tune).

    Runs on CPU, one GPU, or many with `accelerate launch -m pmmcache train ...`. Writes
    runs/<run>/ with config.json, metrics.jsonl, per-epoch checkpoints and best/ (safetensors).
    """
    from pmmcache import train as stage
    from pmmcache.run_config import BASELINES, TrainConfig

    _quiet_libraries()
    options["encoders"] = {k: options.pop(k, None) for k in ENCODER_OPTIONS}
    if options.get("modalities"):
        options["modalities"] = options["modalities"].split(",")
    if options.get("ablation"):
        options["objectives"] = {"ablation": options["ablation"]}
    options.pop("ablation")
    baseline = options.pop("baseline")
    preset = [f"{key}={value}" for key, value in BASELINES[baseline].items()] if baseline else []
    stage.run(build_config(TrainConfig, config_file, options, tuple(preset) + settings))


@main.command("eval")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True), help="A run directory (runs/<run>).")
@click.option("--full-rank", is_flag=True, help="Valid and test split (leave-one-out), every item ranked for every user.  [default when no mode is given]")
@click.option("--cold-start", is_flag=True, help="Every prefix of a user's sequence that ends with a cold item (paper IV-F2, Table VII).")
@click.option("--cold-threshold", type=click.IntRange(min=1), default=10, show_default=True, help="Items with fewer training occurrences than this are cold.")
@click.option("--dataset", help="Evaluate on another dataset than the run's (its items must be in a cache).")
@click.option("--no-mask-history", is_flag=True, help="Do not mask the user's history before ranking (RecBole's default).")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the JSON here (one mode only).  [default: <run>/eval-full-rank.json, <run>/eval-cold-start.json]")
def eval_(run_dir: str, full_rank: bool, cold_start: bool, cold_threshold: int, dataset: str | None,
          no_mask_history: bool, output: str | None) -> None:
    """Evaluate a run's best model with full ranking over all items: HR and NDCG at 10, 20, 50.

    --full-rank (the default) scores valid and test; --cold-start scores the cold-item cases; give both
    for both."""
    from pmmcache import evaluate as stage

    _quiet_libraries()
    stage.run(from_dict(stage.EvalConfig, {
        "run": run_dir, "full_rank": full_rank or not cold_start, "cold_start": cold_start,
        "cold_threshold": cold_threshold, "dataset": dataset, "mask_history": not no_mask_history,
        "output": output}))


_RUN = click.option("--run", required=True, type=click.Path(file_okay=False, exists=True), help="A trained run directory (runs/<run>).")


@main.command()
@_RUN
@click.option("--history", required=True, help="The user's items, oldest first, as keys separated by spaces, e.g. \"toys/toys_i0003 toys/toys_i0008\".")
@click.option("-k", default=10, show_default=True, type=click.IntRange(min=1), help="How many items to recommend.")
@click.option("--include-history", is_flag=True, help="Allow items of the history in the list (left out by default).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def recommend(run: str, history: str, k: int, include_history: bool, as_json: bool) -> None:
    """Top-k item keys with scores for a history of item keys, from a run's best model; the catalogue
    includes items added with `pmmcache add-items`."""
    from pmmcache import recommend as stage

    _quiet_libraries()
    config = from_dict(stage.RecommendConfig, {"run": run, "history": history.split(), "k": k,
                                               "include_history": include_history})
    items = stage.recommend(config)
    if as_json:
        click.echo(json.dumps({"run": run, "history": list(config.history), "k": k,
                               "include_history": include_history,
                               "items": [{"key": r.key, "score": r.score} for r in items]}, indent=2))
        return
    click.echo(f"{'rank':>4}  {'score':>10}  key")
    for rank, item in enumerate(items, start=1):
        click.echo(f"{rank:>4}  {item.score:>10.4f}  {item.key}")


@main.command("add-items")
@_RUN
@click.option("--items", required=True, type=click.Path(dir_okay=False, exists=True), help="New items, `item<TAB>text` per line (PMMRec items-file layout).")
@click.option("--images", type=click.Path(exists=True), help="Their images: a folder of <item>.<ext> files or an LMDB (key = item).")
@click.option("--source", default="new", show_default=True, help="Keys become <source>/<item>.")
@click.option("--batch-size", type=int, help="Items per encoder batch.  [default: 64]")
@click.option("--num-workers", type=int, help="Loader processes decoding images.  [default: 0]")
@click.option("--device", help="cpu, cuda or auto.  [default: auto]")
def add_items(**options: Any) -> None:
    """Add new items to a trained run's catalogue with no retraining: extract only them with the run's
    encoders (into runs/<run>/catalogue/) and register them. Rerunning resumes or does nothing; a key
    already in the catalogue is an error. Not possible for an ID-based run."""
    from pmmcache import recommend as stage

    _quiet_libraries()
    stage.add_items(from_dict(stage.AddItemsConfig, {k: v for k, v in options.items() if v is not None}))


@main.command("export-items")
@_RUN
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="items.parquet (key, vector) or items.npz.")
def export_items(run: str, output: str) -> None:
    """Every catalogue item's key and vector (float32; score = dot product with a user vector), with the
    run's config in the file metadata, for an ANN index."""
    from pmmcache import recommend as stage

    _quiet_libraries()
    path = stage.export_items(from_dict(stage.ExportConfig, {"run": run, "output": output}))
    click.echo(f"wrote {path}")


@main.command()
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--runs-dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--target", help="Target domain to fine-tune on.  [default: the demo's first target domain]")
@click.option("--pretrain-epochs", type=int, help="Epochs of pre-training on the source domains.  [default: 3]")
@click.option("--finetune-epochs", type=int, help="Epochs of each fine-tuning run on the target domain.  [default: 5]")
def demo(**options: Any) -> None:
    """The main job on the embedded dataset: extract -> pre-train on source domains -> fine-tune on a
    target domain from scratch and from the pre-trained run -> full-rank test HR@10 / NDCG@10 beside
    random ranking. Sized for a 2-core CPU (tiny model, one trained block); rerunning resumes."""
    from pmmcache import demo_job

    _quiet_libraries()
    demo_job.run(from_dict(demo_job.DemoJobConfig, {k: v for k, v in options.items() if v is not None}))


@main.group()
def bench() -> None:
    """Benchmarks; each prints one JSON object with figures measured side by side."""


def _print_json(result: dict[str, Any], output: str | None) -> None:
    text = json.dumps(result, indent=2)
    click.echo(text)
    if output:
        Path(output).write_text(text + "\n")


def size_options(command: Any) -> Any:
    """Model-size options shared by `bench step` and `bench eval` (default: full size on CUDA, tiny on CPU)."""
    options = [
        click.option("--dim", type=int, help="Hidden size d of encoders and model.  [default: 768 on CUDA, 64 on CPU]"),
        click.option("--blocks", type=int, help="Encoder blocks.  [default: 12 on CUDA, 4 on CPU]"),
        click.option("--top-blocks", type=int, help="Top blocks trained in stage 2 (k).  [default: 2]"),
        click.option("--heads", type=int, help="Attention heads.  [default: 12 on CUDA, 4 on CPU]"),
        click.option("--text-tokens", type=int, help="Tokens per text.  [default: 50]"),
        click.option("--image-size", type=int, help="Image side in pixels (patch 32).  [default: 224]"),
        click.option("--device", default="auto", show_default=True),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="auto: as the real command runs: train bf16 on CUDA (fp32 on CPU), eval fp32."),
        click.option("--work-dir", type=click.Path(file_okay=False), help="Scratch directory.  [default: a temporary one]"),
        click.option("--output", type=click.Path(dir_okay=False), help="Also write the JSON here."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@bench.command("step")
@click.option("--users", default=32, show_default=True, help="Users per batch.")
@click.option("--positions", default=21, show_default=True, help="Items per user sequence (20 history + target).")
@click.option("--steps", type=int, help="Timed steps per round.  [default: 20 on CUDA, 5 on CPU]")
@click.option("--rounds", default=3, show_default=True, help="Rounds; the variants take turns, the median is reported.")
@click.option("--warmup", type=int, help="Untimed steps per round.  [default: 2 on CUDA, 1 on CPU]")
@click.option("--catalogue", type=int, help="Items in the synthetic cache.  [default: 4000 on CUDA, 2000 on CPU]")
@click.option("--stage", type=click.Choice(["pretrain", "finetune"]), default="pretrain", show_default=True,
              help="pretrain: DAP+NICL+NID+RCL; finetune: DAP.")
@size_options
def bench_step(output: str | None, **options: Any) -> None:
    """Training step on cached states (memmap / RAM / GPU, with and without prefetch) vs end to end
    (lower blocks recomputed every step) vs pure compute (states already on the device)."""
    from pmmcache import bench as bench_mod

    _quiet_libraries()
    _print_json(bench_mod.run_step_bench(**options), output)


@bench.command("eval")
@click.option("--items", type=int, help="Catalogue size N.  [default: 100000 on CUDA, 2000 on CPU]")
@click.option("--users", type=int, help="Users evaluated.  [default: 100000 on CUDA, 2000 on CPU]")
@click.option("--cache-rows", type=int, help="Rows of the synthetic cache the items repeat.  [default: 10000 on CUDA, 1000 on CPU]")
@click.option("--item-batch-size", default=1024, show_default=True)
@click.option("--score-batch-size", default=1024, show_default=True, help="Users scored per matmul.")
@size_options
def bench_eval(output: str | None, **options: Any) -> None:
    """Full-rank evaluation: item-table items/s, users x items/s scored, and the seconds of a complete
    evaluation (item table + user vectors + scores + ranks) of --users over --items."""
    from pmmcache import bench as bench_mod

    _quiet_libraries()
    _print_json(bench_mod.run_eval_bench(**options), output)


@bench.command("extract")
@click.option("--dataset", default="demo", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), help="Raw datasets root.  [default: data]")
@click.option("--items", default=4000, show_default=True, help="Items in the synthetic cache for the reader benchmark.")
@click.option("--tokens", default=100, show_default=True, help="Text tokens + image tokens per item.")
@click.option("--dim", default=768, show_default=True, help="Hidden size d.")
@click.option("--batch-items", default=672, show_default=True, help="Random items per batch (32 users x 21).")
@click.option("--repeats", default=5, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--text-encoder", help="As for `pmmcache extract`.  [default: the dataset's]")
@click.option("--vision-encoder", help="As for `pmmcache extract`.  [default: the dataset's]")
@click.option("--vision-weights", help="As for `pmmcache extract`.  [default: the dataset's]")
@click.option("-k", "--top-blocks", type=int, help="As for `pmmcache extract`.  [default: 2]")
@click.option("--image-size", type=int, help="As for `pmmcache extract`.  [default: 224]")
@click.option("--batch-size", type=int, help="Items per encoder batch.  [default: 64]")
@click.option("--num-workers", type=int, help="Loader processes.  [default: 2]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Compute dtype.  [default: float32]")
@click.option("--cache-dtype", type=click.Choice(["float16", "int8"]), help="Storage dtype.  [default: float16]")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Scratch directory.  [default: a temporary one]")
@click.option("--output", type=click.Path(dir_okay=False), help="Also write the JSON here.")
def bench_extract(output: str | None, **options: Any) -> None:
    """Extraction items/s end to end vs encoding alone, and cache-reader throughput: memmap vs RAM
    (float16 and int8) vs naive h5py fancy indexing."""
    from pmmcache import bench as bench_mod

    _quiet_libraries()
    _print_json(bench_mod.run_extract_bench(**options), output)


@main.group()
def pipeline() -> None:
    """Experiment recipes (files with `recipe: 2`, see docs/pipelines.md): a grid of training runs
    -> a paper-layout results table and convergence plot.

    \b
    pmmcache pipeline list                        the recipes (and plain train configs) in pipelines/
    pmmcache pipeline run pipelines/R.yaml        train, resume or skip every run; then write the report
    pmmcache pipeline report pipelines/R.yaml     rebuild results.md / .csv / convergence.png, no training
    """


def _load_recipe(recipe_file: str, settings: tuple[str, ...]) -> Any:
    from pmmcache.pipeline import parse_recipe, read_recipe_data

    data = read_recipe_data(recipe_file)
    for setting in settings:
        set_dotted(data, setting)
    return parse_recipe(data, recipe_file)


def _pipeline_report(recipe: Any, recipe_file: str, runs_dir: str) -> None:
    from pmmcache.pipeline.report import format_markdown, write_report
    from pmmcache.pipeline.runner import pipeline_dir, plan

    out_dir = pipeline_dir(recipe, Path(runs_dir))
    report = write_report(recipe, plan(recipe, Path(runs_dir), source=recipe_file), out_dir, recipe_file)
    click.echo(format_markdown(report.table, []).strip())
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {report.markdown}, {report.csv}"
               + (f", {report.plot}" if report.plot else " (no convergence plot: no convergence cells with finished runs)"))


_RUNS_DIR = click.option("--runs-dir", default="runs/pipelines", show_default=True, type=click.Path(file_okay=False),
                         help="Root of the pipelines' runs: <runs-dir>/<recipe name>/...")
_RECIPE_SET = click.option("--set", "settings", multiple=True,
                           help="Override a recipe key, e.g. --set defaults.epochs=1 --set seeds=[1,2,3].")


@pipeline.command("run")
@click.argument("recipe_file", type=click.Path(dir_okay=False, exists=True))
@_RUNS_DIR
@click.option("--only", multiple=True, help="Run only this cell (repeatable), with the pre-training runs it needs.")
@_RECIPE_SET
@click.option("--dry-run", is_flag=True, help="List every run and its state (new/resume/evaluate/finished/changed); train nothing.")
@click.option("--force", is_flag=True, help="Delete and retrain finished runs made with other settings than the recipe asks for now.")
@click.option("-v", "--verbose", is_flag=True, help="Show each training run's progress bars and epoch lines.")
def pipeline_run(recipe_file: str, runs_dir: str, only: tuple[str, ...], settings: tuple[str, ...], dry_run: bool,
                 force: bool, verbose: bool) -> None:
    """Run a recipe's grid: finished runs are skipped, unfinished ones resumed (kill and rerun at will),
    then results.md, results.csv and convergence.png are written under <runs-dir>/<recipe name>/."""
    from pmmcache.pipeline import run_pipeline

    _quiet_libraries()
    recipe = _load_recipe(recipe_file, settings)
    run_pipeline(recipe, Path(runs_dir), only=only, force=force, dry_run=dry_run, show_training=verbose,
                 source=recipe_file, echo=click.echo)
    if not dry_run:
        _pipeline_report(recipe, recipe_file, runs_dir)


@pipeline.command("report")
@click.argument("recipe_file", type=click.Path(dir_okay=False, exists=True))
@_RUNS_DIR
@_RECIPE_SET
def pipeline_report(recipe_file: str, runs_dir: str, settings: tuple[str, ...]) -> None:
    """Rebuild results.md, results.csv and convergence.png from the recipe's finished runs (no training)."""
    _pipeline_report(_load_recipe(recipe_file, settings), recipe_file, runs_dir)


@pipeline.command("list")
@click.argument("directory", default="pipelines", type=click.Path(file_okay=False, exists=True))
@_RUNS_DIR
def pipeline_list(directory: str, runs_dir: str) -> None:
    """The recipes in DIRECTORY with their run counts, and which files are plain `train --config` files."""
    from pmmcache.pipeline.recipe import parse_recipe
    from pmmcache.pipeline.runner import plan, run_state

    files = sorted(p for p in Path(directory).iterdir() if p.suffix in (".yaml", ".yml", ".toml", ".json"))
    for path in files:
        data = load_file(path)
        if "recipe" not in data:
            click.echo(f"{path.name}: train config (pmmcache train --config {path})")
            continue
        try:
            recipe = parse_recipe(data, path)
            runs = plan(recipe, Path(runs_dir), source=str(path))
        except PmmcacheError as err:
            click.echo(f"{path.name}: INVALID recipe: {err}")
            continue
        finished = sum(run_state(run).state == "finished" for run in runs)
        click.echo(f"{path.name}: recipe {recipe.name!r}, {len(runs)} runs ({finished} finished)"
                   f"{' - ' + recipe.description if recipe.description else ''}")


if __name__ == "__main__":
    main()
