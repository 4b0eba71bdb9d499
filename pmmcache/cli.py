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
    Stage 2  pmmcache train     top blocks + fusion + user encoder on cached states
             pmmcache eval      full-ranking evaluation over all items

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
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Compute dtype of the lower blocks (states are stored as float16).  [default: float32]")
@click.option("--seed", type=int, help="Seed of randomly initialised encoders.  [default: 0]")
@click.option("--force", is_flag=True, default=None, help="Rebuild a cache that was made with other settings.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML/YAML/JSON file of these settings.")
def extract(config_file: str | None, **options: Any) -> None:
    """Stage 1: encode every item's text and image with the frozen lower encoder blocks into an HDF5 cache.

    Resumable: interrupt it at any moment and rerun the same command to continue. Runs under
    `accelerate launch` with several processes writing one cache.
    """
    from pmmcache import extract as stage

    _quiet_libraries()
    stage.run(build_config(stage.ExtractConfig, config_file, options))


@main.command()
@click.option("--dataset", default="demo", show_default=True, help="Dataset name(s), comma-separated.")
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--min-core", type=int, help="k-core filtering threshold.  [default: 5]")
@click.option("--max-history", type=int, help="History items kept before each target.  [default: 20]")
def prepare(dataset: str, data_dir: str, cache_dir: str, **options: Any) -> None:
    """Read a raw dataset, filter, split and index it; print its statistics."""
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
@click.option("--epochs", type=int, help="[default: 5]")
@click.option("--batch-size", type=int, help="Users per process.  [default: 32]")
@click.option("--lr", type=float, help="AdamW learning rate.  [default: 1e-4]")
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

    _quiet_libraries()
    options["encoders"] = {k: options.pop(k, None) for k in ENCODER_OPTIONS}
    stage.run(build_config(stage.TrainConfig, config_file, options, settings))


@main.command("eval")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True), help="A run directory (runs/<run>).")
@click.option("--full-rank", is_flag=True, default=True, help="Rank every item for every user (the only mode; kept for clarity).")
@click.option("--dataset", help="Evaluate on another dataset than the run's (its items must be in a cache).")
@click.option("--no-mask-history", is_flag=True, help="Do not mask the user's history before ranking (RecBole's default).")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the JSON here.  [default: <run>/eval-full-rank.json]")
def eval_(run_dir: str, full_rank: bool, dataset: str | None, no_mask_history: bool, output: str | None) -> None:
    """Full-ranking evaluation of a run's best model: HR and NDCG at 10, 20, 50 on valid and test."""
    from pmmcache import evaluate as stage

    _quiet_libraries()
    stage.run_cli(Path(run_dir), dataset=dataset, mask_history=not no_mask_history,
                  output=Path(output) if output else None)


@main.command()
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--runs-dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--target", help="Target domain to fine-tune on.  [default: the demo's first target domain]")
@click.option("--pretrain-epochs", type=int, help="[default: 2]")
@click.option("--finetune-epochs", type=int, help="[default: 4]")
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


@bench.command("extract")
@click.option("--dataset", default="demo", show_default=True)
@click.option("--items", default=4000, show_default=True, help="Items in the synthetic cache for the reader benchmark.")
@click.option("--tokens", default=100, show_default=True, help="Text tokens + image tokens per item.")
@click.option("--dim", default=768, show_default=True, help="Hidden size d.")
@click.option("--batch-items", default=672, show_default=True, help="Random items per batch (32 users x 21).")
@click.option("--repeats", default=5, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False), help="Scratch directory.  [default: a temporary one]")
@click.option("--output", type=click.Path(dir_okay=False), help="Also write the JSON here.")
def bench_extract(output: str | None, **options: Any) -> None:
    """Extraction items/s, and cache-reader throughput: memmap vs RAM vs naive h5py fancy indexing."""
    from pmmcache import bench as bench_mod

    _quiet_libraries()
    result = bench_mod.run_extract_bench(**options)
    text = json.dumps(result, indent=2)
    click.echo(text)
    if output:
        Path(output).write_text(text + "\n")


if __name__ == "__main__":
    main()
