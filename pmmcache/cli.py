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


def build_config(cls: type, config_file: str | None, overrides: dict[str, Any]) -> Any:
    """Config = defaults < config file < command-line options (only those given)."""
    data = load_file(config_file) if config_file else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data)


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


@main.command()
@click.option("--dataset", help="Dataset name(s), comma-separated; 'demo' is the embedded default.  [default: demo]")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Raw datasets root.  [default: data]")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache root.  [default: cache]")
@click.option("--text-encoder", help="Transformers model id or local dir.  [default: xlm-roberta-base; demo: packaged all-MiniLM-L6-v2]")
@click.option("--vision-encoder", help="open_clip architecture (ViT-B-32), a local transformers CLIP dir, or pmmcache-tiny-vit.  [default: ViT-B-32; demo: pmmcache-tiny-vit]")
@click.option("--vision-weights", help="open_clip pretrained tag (openai), 'random', or a weights file.  [default: openai; demo: random]")
@click.option("-k", "--top-blocks", type=int, help="Blocks left for stage 2 to train; the cache holds the input of block n-k.  [default: 2]")
@click.option("--max-text-length", type=int, help="Tokens per text including CLS.  [default: 50]")
@click.option("--image-size", type=int, help="Image side in pixels.  [default: 224]")
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
def bench_extract(**options: Any) -> None:
    """Extraction items/s, and cache-reader throughput: memmap vs RAM vs naive h5py fancy indexing."""
    from pmmcache import bench as bench_mod

    result = bench_mod.run_extract_bench(**options)
    text = json.dumps(result, indent=2)
    click.echo(text)
    if options.get("output"):
        Path(options["output"]).write_text(text + "\n")


if __name__ == "__main__":
    main()
