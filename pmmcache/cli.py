"""The `pmmcache` command line. Verbs are thin: parse options, build a typed config, call the stage's `run`."""
from __future__ import annotations

import os

# Before transformers/huggingface_hub import: a hub call without this retries for ~46 s offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402
import importlib  # noqa: E402
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


def config_default(config: str, field: str) -> Any:
    """The default of `field` (dotted for nested tables, e.g. encoders.top_blocks) of the config dataclass
    `config` ("module:Class"), read from the dataclass fields."""
    module, _, name = config.partition(":")
    value: Any = getattr(importlib.import_module(module), name)
    for part in field.split("."):
        if not isinstance(value, type):  # a nested config's default instance
            value = getattr(value, part)
            continue
        spec = {f.name: f for f in dataclasses.fields(value)}[part]
        if spec.default is not dataclasses.MISSING:
            value = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            value = spec.default_factory()
        else:
            raise KeyError(f"{config}.{field} has no default")
    return value


def default_text(value: Any) -> str:
    """How --help shows a config default: lists comma-joined, as the option takes them; False flags: nothing."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if value is False or value is None:
        return ""
    return str(value)


class ConfigOption(click.Option):
    """An option that sets a field of a stage's config dataclass.

    Its click default stays None, so a --config file's value stands unless the option is given; --help
    shows the dataclass field's default (or `none_means` for a None default that a stage fills in),
    read when the help is rendered, so the stage's module is imported only then."""

    def __init__(self, *decls: str, config: str, field: str | None = None, none_means: str = "", **kwargs: Any):
        super().__init__(*decls, **kwargs)
        self.config = config
        self.field = field or self.name
        self.none_means = none_means

    def shown_default(self) -> str:
        value = config_default(self.config, self.field)
        return self.none_means if value is None else default_text(value)

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        extra.pop("default", None)
        shown = self.shown_default()
        if shown:
            extra["default"] = shown
        return extra


def config_option(config: str, *decls: str, field: str | None = None, none_means: str = "", **kwargs: Any) -> Any:
    """click.option for a field of `config` ("module:Class"); see ConfigOption."""
    return click.option(*decls, cls=ConfigOption, config=config, field=field, none_means=none_means, **kwargs)


EXTRACT = "pmmcache.extract:ExtractConfig"
TRAIN = "pmmcache.run_config:TrainConfig"
PREPARE = "pmmcache.data.prepare:PrepareConfig"
RECOMMEND = "pmmcache.recommend:RecommendConfig"
ADD_ITEMS = "pmmcache.recommend:AddItemsConfig"
EXPORT = "pmmcache.recommend:ExportConfig"
DEMO = "pmmcache.demo_job:DemoJobConfig"
EVAL = "pmmcache.evaluate:EvalConfig"
IMPORT = "pmmcache.released:ImportConfig"

# One help text per flag name, for the flags several verbs share (tests/test_cli.py holds every verb to it).
HELP = {
    "dataset": "Dataset name(s), comma-separated; 'demo' is the embedded one, 'ml-100k' MovieLens-100k.",
    "data_dir": "Raw datasets root.",
    "cache_dir": "Feature cache root.",
    "runs_dir": "Root of the run directories.",
    "device": "cpu, cuda, cuda:N or auto (CUDA when there is one; under `accelerate launch` the process's own).",
    "batch_size": "Items per encoder batch.",
    "num_workers": "Loader processes decoding images (per extraction process).",
    "stage": "pretrain: DAP+NICL+NID+RCL; finetune: DAP only.",
    "top_blocks": "Top encoder blocks trained in stage 2 (k); the cache holds the input of block n-k.",
    "image_size": "Image side in pixels.",
    "dtype": "Compute dtype of the lower blocks (storage: see --cache-dtype).",
    "cache_dtype": "How states are stored: float16, or int8 with a float16 scale per token (half the size; "
                   "dequantised on read).",
    "catalogue": "Items in the synthetic catalogue.",
    "dim": "Hidden size d.",
    "work_dir": "Scratch directory.  [default: a temporary one]",
    "output_json": "Also write the JSON here.",
    "config": "TOML, YAML or JSON file of settings: the config's fields, as --set names them.",
    "set": "Override one setting of the verb's config, KEY=VALUE, dotted into nested tables (e.g. train's "
           "data.min_core=3); repeatable.",
}


def config_file_options(command: Any) -> Any:
    """--set and --config, for every verb that builds a config."""
    command = click.option("--config", "config_file", type=click.Path(dir_okay=False), help=HELP["config"])(command)
    return click.option("--set", "settings", multiple=True, help=HELP["set"])(command)


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


# Encoder options (click name -> config field) that `extract` and `train` share (train's must match the cache's).
ENCODER_OPTIONS = {"text_encoder": "text_encoder", "vision_encoder": "vision_encoder",
                   "vision_weights": "vision_weights", "top_blocks": "top_blocks",
                   "max_text_length": "max_text_length", "image_size": "image_size", "encoder_seed": "seed"}


def encoder_options(config: str, prefix: str = "", seed: bool = True) -> Any:
    """The encoder options of `config`, whose encoder fields sit under `prefix` (train: "encoders.")."""

    def field(name: str) -> str:
        return prefix + ENCODER_OPTIONS[name]

    options = [
        config_option(config, "--text-encoder", field=field("text_encoder"),
                      none_means="the dataset's: xlm-roberta-base; demo: packaged all-MiniLM-L6-v2",
                      help="Transformers model id or local dir."),
        config_option(config, "--vision-encoder", field=field("vision_encoder"),
                      none_means="the dataset's: ViT-B-32; demo: pmmcache-tiny-vit",
                      help="open_clip architecture (ViT-B-32), a local transformers CLIP dir, or pmmcache-tiny-vit."),
        config_option(config, "--vision-weights", field=field("vision_weights"),
                      none_means="the dataset's: openai; demo: random",
                      help="open_clip pretrained tag (openai), 'random', or a weights file."),
        config_option(config, "-k", "--top-blocks", field=field("top_blocks"), type=int, help=HELP["top_blocks"]),
        config_option(config, "--max-text-length", field=field("max_text_length"), type=int,
                      help="Tokens per text including CLS."),
        config_option(config, "--image-size", field=field("image_size"), type=int, help=HELP["image_size"]),
    ]
    if seed:
        options.append(config_option(config, "--encoder-seed", field=field("encoder_seed"), type=int,
                                     help="Seed of randomly initialised encoders (--vision-weights random)."))

    def decorate(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


# The PMMRec-layout files a dataset folder's detection can be told (PrepareConfig fields; extract/train: data.*).
LAYOUT_OPTIONS = {
    "users": "The dataset's users file (user<TAB>item item ...), in its folder or absolute.",
    "texts": "The dataset's items texts file (item<TAB>title), in its folder or absolute.",
    "images": "The dataset's image store (an LMDB or a folder of <item>.<ext>), in its folder or absolute.",
}


def layout_options(config: str, prefix: str = "") -> Any:
    """--users/--texts/--images of `config`, whose PrepareConfig sits under `prefix` (extract, train: "data.")."""

    def decorate(command: Any) -> Any:
        for name, text in reversed(LAYOUT_OPTIONS.items()):
            command = config_option(config, f"--{name}", field=prefix + name, none_means="found by suffix",
                                    help=text)(command)
        return command

    return decorate


def pop_layout(options: dict[str, Any]) -> None:
    """Move the layout options into options["data"] (how extract's and train's configs nest them)."""
    options["data"] = {name: options.pop(name, None) for name in LAYOUT_OPTIONS}


def extraction_options(command: Any) -> Any:
    """How `extract` (and `bench extract`) encode: batch, loaders, compute and storage dtype."""
    options = [
        config_option(EXTRACT, "--batch-size", type=int, help=HELP["batch_size"]),
        config_option(EXTRACT, "--num-workers", type=int, help=HELP["num_workers"]),
        config_option(EXTRACT, "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help=HELP["dtype"]),
        config_option(EXTRACT, "--cache-dtype", type=click.Choice(["float16", "int8"]), help=HELP["cache_dtype"]),
        config_option(EXTRACT, "--image-decode", type=click.Choice(["auto", "cpu", "nvjpeg"]),
                      help="Where JPEGs are decoded: nvjpeg on the GPU (torchvision.io.decode_jpeg; its resize "
                           "differs from PIL's by about one grey level), cpu by PIL in the loaders; auto = nvjpeg "
                           "when extracting on CUDA. Other formats always go through PIL."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@config_option(EXTRACT, "--dataset", help=HELP["dataset"])
@config_option(EXTRACT, "--data-dir", type=click.Path(file_okay=False), help=HELP["data_dir"])
@config_option(EXTRACT, "--cache-dir", type=click.Path(file_okay=False), help=HELP["cache_dir"])
@layout_options(EXTRACT, prefix="data.")
@encoder_options(EXTRACT, prefix="encoders.")
@config_option(EXTRACT, "--modalities", field="encoders.modalities",
               help="Which modalities to extract: text,image | text | image.")
@extraction_options
@config_option(EXTRACT, "--device", help=HELP["device"])
@config_option(EXTRACT, "--force", is_flag=True, default=None, help="Rebuild a cache that was made with other settings.")
@config_option(EXTRACT, "--shards", metavar="auto|one-file|per-process|N",
               help="Layout of a new cache: one file that every process writes through memory maps, or shard "
                    "files (a shard per process, or N) read as one cache, each written by one process, for "
                    "several machines on a network file system; auto = a shard per process when the processes "
                    "span several machines. An existing cache keeps its layout (delete it to change that).")
@config_file_options
def extract(config_file: str | None, settings: tuple[str, ...], **options: Any) -> None:
    """Stage 1: encode every item's text and image with the frozen lower encoder blocks into an HDF5 cache.

    Resumable: interrupt it at any moment and rerun the same command to continue. Runs under
    `accelerate launch` with several processes writing one cache (one file, or a shard file each).
    """
    from pmmcache import extract as stage

    _quiet_libraries()
    options["encoders"] = {field: options.pop(name, None) for name, field in ENCODER_OPTIONS.items()}
    options["encoders"]["modalities"] = options.pop("modalities", None)
    pop_layout(options)
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
@config_option(EXTRACT, "--dataset", help=HELP["dataset"])  # where extract and train look: the same defaults
@config_option(EXTRACT, "--data-dir", type=click.Path(file_okay=False), help=HELP["data_dir"])
@config_option(EXTRACT, "--cache-dir", type=click.Path(file_okay=False), help=HELP["cache_dir"])
@config_option(PREPARE, "--min-core", type=int, help="k-core filtering threshold (0 = none).")
@config_option(PREPARE, "--max-history", type=int, help="History items kept before each target.")
@config_option(PREPARE, "--truncate", is_flag=True, default=None,
               help="Store only each user's last max-history + 1 items (released code); without it, whole sequences.")
@config_option(PREPARE, "--keep-last", type=int, help="Cut each user's raw sequence to its last N items before "
               "filtering; items then in no sequence leave the catalogue (released code: max_seq_len + 3 = 23; 0 = no cut).")
@config_option(PREPARE, "--lowercase-text", is_flag=True, default=None,
               help="Lower-case every item text (the released code lower-cases titles before tokenising).")
@layout_options(PREPARE)
@config_file_options
def prepare(dataset: str | None, data_dir: str | None, cache_dir: str | None, config_file: str | None,
            settings: tuple[str, ...], **options: Any) -> None:
    """Read a raw dataset, filter, split and index it; print its statistics.

    The same settings reach extract and train as `--set data.min_core=3` (etc.); --config and --set
    here take those PrepareConfig fields (min_core=3, not data.min_core=3)."""
    from pmmcache.data.prepare import PrepareConfig
    from pmmcache.data.registry import resolve_dataset
    from pmmcache.extract import ExtractConfig

    config = build_config(PrepareConfig, config_file, options, settings)
    where = ExtractConfig()
    dataset, data_dir, cache_dir = (dataset or where.dataset, data_dir or str(where.data_dir),
                                    cache_dir or str(where.cache_dir))
    prepared = resolve_dataset(dataset, Path(data_dir), Path(cache_dir), config)
    click.echo(json.dumps(prepared.manifest(), indent=2))


@main.command()
@config_option(TRAIN, "--stage", type=click.Choice(["pretrain", "finetune"]), help=HELP["stage"])
@config_option(TRAIN, "--dataset", help=HELP["dataset"] + " Several are combined (multi-source pre-training), "
               "e.g. demo/kitchen,demo/garden.")
@config_option(TRAIN, "--cache-dataset", none_means="the dataset's base name, e.g. demo",
               help="Which extracted cache holds the items.")
@config_option(TRAIN, "--init", help="Run (name or directory) whose model parts start this one, e.g. a pre-trained "
               "run for fine-tuning.")
@config_option(TRAIN, "--run-name", none_means="<stage>-<dataset>", help="Run directory name under --runs-dir.")
@config_option(TRAIN, "--runs-dir", type=click.Path(file_okay=False), help=HELP["runs_dir"])
@config_option(TRAIN, "--data-dir", type=click.Path(file_okay=False), help=HELP["data_dir"])
@config_option(TRAIN, "--cache-dir", type=click.Path(file_okay=False), help=HELP["cache_dir"])
@layout_options(TRAIN, prefix="data.")
@encoder_options(TRAIN, prefix="encoders.")
@config_option(TRAIN, "--transfer", type=click.Choice(["full", "item", "user"]), help="With --init, what it transfers "
               "(paper III-E): full = item towers + user encoder; item = item towers, user encoder fresh; user = user "
               "encoder, item towers from the original encoders.")
@config_option(TRAIN, "--modalities", type=click.Choice(["text", "image", "text,image"]), none_means="the model's, or "
               "--init's", help="Item modalities: text or image alone is the single-modality setting (PMMRec-T / "
               "PMMRec-V); it needs only that modality's cache.")
@config_option(TRAIN, "--ablation", field="objectives.ablation",
               type=click.Choice(["none", "no-nicl", "vcl-only", "icl-only", "no-nid", "no-rcl"]),
               help="A pre-training ablation of Table VIII.")
@click.option("--baseline", type=click.Choice(["sasrec", "morec++"]), help="Train a baseline in the same loop: sasrec = item-ID embeddings, CE over all items; morec++ = multimodal towers with late (concat) fusion, DAP only. Other options and --set still apply.")
@config_option(TRAIN, "--epochs", type=int, help="Training epochs (fewer with early stopping).")
@config_option(TRAIN, "--batch-size", type=int, help="Users per process.")
@config_option(TRAIN, "--lr", type=float, help="AdamW learning rate.")
@config_option(TRAIN, "--warmup-steps", type=int, help="Linear learning-rate warmup over this many optimizer steps.")
@config_option(TRAIN, "--init-lr", type=float, help="With --init, learning rate of the transferred heads "
               "(projections, fusion, user encoder); 0 = --lr.")
@config_option(TRAIN, "--grad-clip", type=float, help="Max gradient norm, 0 = off.")
@config_option(TRAIN, "--mixed-precision", type=click.Choice(["auto", "no", "fp16", "bf16"]),
               help="auto = bf16 on CUDA, no on CPU.")
@config_option(TRAIN, "--patience", type=int, help="Early stopping patience in epochs.")
@config_option(TRAIN, "--log-with", none_means="off",
               help="Also log losses and epoch metrics to Accelerate trackers, comma-separated: tensorboard "
               "(runs/<run>/trackers/; pip install 'pmmcache[tracking]'), wandb, mlflow, comet_ml, aim, ... or all. "
               "metrics.jsonl is written either way.")
@config_option(TRAIN, "--seed", type=int, help="Training seed (batch order, corruption, initialisation).")
@config_option(TRAIN, "--resume", is_flag=True, default=None, help="Continue the run from its last finished epoch.")
@config_file_options
def train(config_file: str | None, settings: tuple[str, ...], **options: Any) -> None:
    """Stage 2: train top blocks + fusion + user encoder on cached states (pre-train or fine-tune).

    Runs on CPU, one GPU, or many with `accelerate launch -m pmmcache train ...`. Writes
    runs/<run>/ with config.json, metrics.jsonl, per-epoch checkpoints and best/ (safetensors).
    """
    from pmmcache import train as stage
    from pmmcache.run_config import BASELINES, TrainConfig

    _quiet_libraries()
    options["encoders"] = {field: options.pop(name, None) for name, field in ENCODER_OPTIONS.items()}
    pop_layout(options)
    if options.get("modalities"):
        options["modalities"] = options["modalities"].split(",")
    if options.get("log_with") is not None:
        options["log_with"] = [name.strip() for name in options["log_with"].split(",") if name.strip()]
    if options.get("ablation"):
        options["objectives"] = {"ablation": options["ablation"]}
    options.pop("ablation")
    baseline = options.pop("baseline")
    preset = [f"{key}={value}" for key, value in BASELINES[baseline].items()] if baseline else []
    stage.run(build_config(TrainConfig, config_file, options, tuple(preset) + settings))


@main.command("eval")
@click.option("--run", type=click.Path(file_okay=False, exists=True), help="A trained run directory (runs/<run>).")
@config_option(EVAL, "--full-rank", is_flag=True, default=None,
               help="Valid and test split (leave-one-out), every item ranked for every user (the mode when none is given).")
@config_option(EVAL, "--cold-start", is_flag=True, default=None,
               help="Every prefix of a user's sequence that ends with a cold item (paper IV-F2, Table VII).")
@config_option(EVAL, "--cold-threshold", type=click.IntRange(min=1),
               help="Items with fewer training occurrences than this are cold.")
@config_option(EVAL, "--dataset", none_means="the run's",
               help="Evaluate on another dataset than the run's (its items must be in a cache).")
@config_option(EVAL, "--cache-dataset", none_means="the run's; with --dataset, that dataset's own cache",
               help="Which extracted cache holds the items.")
@click.option("--no-mask-history", is_flag=True, default=None,
              help="Do not mask the user's history before ranking (RecBole's default; mask_history=false).")
@config_option(EVAL, "--precision", type=click.Choice(["bf16", "fp32"]),
               help="Autocast of the item tower and user encoder on CUDA (scores stay fp32); a CPU always runs fp32.")
@config_option(EVAL, "--output", type=click.Path(dir_okay=False),
               none_means="<run>/eval-full-rank.json, <run>/eval-cold-start.json",
               help="Write the JSON here (one mode only).")
@config_file_options
def eval_(config_file: str | None, settings: tuple[str, ...], no_mask_history: bool | None, **options: Any) -> None:
    """Evaluate a run's best model with full ranking over all items: HR and NDCG at 10, 20, 50.

    --full-rank (the default) scores valid and test; --cold-start scores the cold-item cases; give both
    for both."""
    from pmmcache import evaluate as stage

    _quiet_libraries()
    if options.get("cold_start") and options.get("full_rank") is None:
        options["full_rank"] = False  # --cold-start alone: only that mode
    if no_mask_history:
        options["mask_history"] = False
    if not (options.get("run") or config_file or any(s.strip().startswith("run=") for s in settings)):
        raise ConfigError("eval needs the run to evaluate: --run runs/<run> (or run = ... in --config)")
    config = build_config(stage.EvalConfig, config_file, options, settings)
    stage.run(config)


_RUN = click.option("--run", required=True, type=click.Path(file_okay=False, exists=True), help="A trained run directory (runs/<run>).")


@main.command()
@_RUN
@click.option("--history", required=True, help="The user's items, oldest first, as keys separated by spaces, e.g. \"toys/toys_i0003 toys/toys_i0008\".")
@config_option(RECOMMEND, "-n", "--top", "k", type=click.IntRange(min=1), help="How many items to recommend.")
@config_option(RECOMMEND, "--include-history", is_flag=True, default=None,
               help="Allow items of the history in the list (left out by default).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@config_file_options
def recommend(run: str, history: str, as_json: bool, config_file: str | None, settings: tuple[str, ...],
              **options: Any) -> None:
    """Top-n item keys with scores for a history of item keys, from a run's best model; the catalogue
    includes items added with `pmmcache add-items`."""
    from pmmcache import recommend as stage

    _quiet_libraries()
    config = build_config(stage.RecommendConfig, config_file, {"run": run, "history": history.split(), **options},
                          settings)
    items = stage.recommend(config)
    if as_json:
        click.echo(json.dumps({"run": run, "history": list(config.history), "k": config.k,
                               "include_history": config.include_history,
                               "items": [{"key": r.key, "score": r.score, "title": r.title} for r in items]},
                              indent=2))
        return
    width = max([len("key")] + [len(item.key) for item in items])
    click.echo(f"{'rank':>4}  {'score':>10}  {'key':<{width}}  title")
    for rank, item in enumerate(items, start=1):
        click.echo(f"{rank:>4}  {item.score:>10.4f}  {item.key:<{width}}  {item.title or ''}".rstrip())


@main.command("add-items")
@_RUN
@click.option("--items", required=True, type=click.Path(dir_okay=False, exists=True), help="New items, `item<TAB>text` per line (PMMRec items-file layout).")
@click.option("--images", type=click.Path(exists=True), help="Their images: a folder of <item>.<ext> files or an LMDB (key = item).")
@config_option(ADD_ITEMS, "--source", help="Keys become <source>/<item>.")
@config_option(ADD_ITEMS, "--batch-size", type=int, help=HELP["batch_size"])
@config_option(ADD_ITEMS, "--num-workers", type=int, help=HELP["num_workers"])
@config_option(ADD_ITEMS, "--device", help=HELP["device"])
@config_file_options
def add_items(config_file: str | None, settings: tuple[str, ...], **options: Any) -> None:
    """Add new items to a trained run's catalogue with no retraining: extract only them with the run's
    encoders (into runs/<run>/catalogue/) and register them. Rerunning resumes or does nothing; a key
    already in the catalogue is an error. Not possible for an ID-based run."""
    from pmmcache import recommend as stage

    _quiet_libraries()
    stage.add_items(build_config(stage.AddItemsConfig, config_file, options, settings))


@main.command("convert-images")
@click.argument("source", type=click.Path(exists=True))
@click.argument("destination", type=click.Path())
def convert_images(source: str, destination: str) -> None:
    """Rewrite an image LMDB of the released PMMRec code (pickled LMDB_Image records of raw pixels) as a
    new LMDB of PNG bytes under the same keys, so the records are unpickled (restricted to that class)
    only once. Encoded images are copied as they are; DESTINATION must not exist."""
    from pmmcache.data.convert import convert_store

    counts = convert_store(Path(source), Path(destination))
    click.echo(f"wrote {destination}: {counts['keys']} keys, {counts['converted']} records re-encoded as PNG "
               f"({counts['bytes'] / 1e6:.1f} MB); point the dataset at it with --images {destination}")


@main.command("import-checkpoint")
@click.argument("checkpoint", type=click.Path(dir_okay=False, exists=True))
@config_option(IMPORT, "--run", type=click.Path(file_okay=False),
               help="The run directory to write (e.g. runs/pmmrec-released); `train --init` takes it.")
@config_option(IMPORT, "--dataset", help=HELP["dataset"])
@config_option(IMPORT, "--data-dir", type=click.Path(file_okay=False), help=HELP["data_dir"])
@config_option(IMPORT, "--cache-dir", type=click.Path(file_okay=False), help=HELP["cache_dir"])
@encoder_options(IMPORT, prefix="encoders.")
@config_option(IMPORT, "--fusion-heads", type=int, help="Attention heads of the released fusion block (not "
               "stored in the checkpoint: its BERT config's).")
@config_option(IMPORT, "--user-heads", type=int, help="Attention heads of the released user encoder (its "
               "num_attention_heads; not stored in the checkpoint).")
@config_file_options
def import_checkpoint(checkpoint: str, config_file: str | None, settings: tuple[str, ...], **options: Any) -> None:
    """Make a run directory from the authors' pre-trained checkpoint (ICDE24/PMMRec epoch-N.pt), read
    with torch.load(weights_only=True): its parameters mapped onto pmmcache's parts (top blocks,
    projections, fusion, user encoder; docs/released-checkpoint.md), every key it could not map
    reported, its lower blocks checked against the encoders the cache is made with (pass the same
    encoder options as to extract). Then: train --init RUN --transfer full|item|user, or eval --run RUN."""
    from pmmcache import released as stage

    _quiet_libraries()
    options["encoders"] = {field: options.pop(name, None) for name, field in ENCODER_OPTIONS.items()}
    stage.run(build_config(stage.ImportConfig, config_file, {"checkpoint": checkpoint, **options}, settings),
              show=click.echo)


@main.command("export-items")
@_RUN
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="items.parquet (key, vector) or items.npz.")
@config_file_options
def export_items(run: str, output: str, config_file: str | None, settings: tuple[str, ...]) -> None:
    """Every catalogue item's key and vector (float32; score = dot product with a user vector), with the
    run's config in the file metadata, for an ANN index."""
    from pmmcache import recommend as stage

    _quiet_libraries()
    path = stage.export_items(build_config(stage.ExportConfig, config_file, {"run": run, "output": output}, settings))
    click.echo(f"wrote {path}")


@main.command()
@config_option(DEMO, "--data-dir", type=click.Path(file_okay=False), help=HELP["data_dir"])
@config_option(DEMO, "--cache-dir", type=click.Path(file_okay=False), help=HELP["cache_dir"])
@config_option(DEMO, "--runs-dir", type=click.Path(file_okay=False), help=HELP["runs_dir"])
@config_option(DEMO, "--target", none_means="the demo's first target domain", help="Target domain to fine-tune on.")
@config_option(DEMO, "--pretrain-epochs", type=int, help="Epochs of pre-training on the source domains.")
@config_option(DEMO, "--finetune-epochs", type=int, help="Epochs of each fine-tuning run on the target domain.")
@config_file_options
def demo(config_file: str | None, settings: tuple[str, ...], **options: Any) -> None:
    """The main job on the embedded dataset: extract -> pre-train on source domains -> fine-tune on a
    target domain from scratch and from the pre-trained run -> full-rank test HR@10 / NDCG@10 beside
    random ranking. Sized for a 2-core CPU (tiny model, one trained block); rerunning resumes."""
    from pmmcache import demo_job

    _quiet_libraries()
    demo_job.run(build_config(demo_job.DemoJobConfig, config_file, options, settings))


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
        click.option("--dim", type=int, help=HELP["dim"] + "  [default: 768 on CUDA, 64 on CPU]"),
        click.option("--blocks", type=int, help="Encoder blocks.  [default: 12 on CUDA, 4 on CPU]"),
        click.option("-k", "--top-blocks", type=int, help=HELP["top_blocks"] + "  [default: 2]"),
        click.option("--heads", type=int, help="Attention heads.  [default: 12 on CUDA, 4 on CPU]"),
        click.option("--text-tokens", type=int, help="Tokens per text.  [default: 50]"),
        click.option("--image-size", type=int, help=HELP["image_size"] + "  [default: 224]"),
        click.option("--device", default="auto", show_default=True, help=HELP["device"]),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="auto: as the real command runs: bf16 on CUDA, fp32 on CPU (eval: bf16 or fp32 only; a CPU evaluates in fp32)."),
        click.option("--work-dir", type=click.Path(file_okay=False), help=HELP["work_dir"]),
        click.option("--output", type=click.Path(dir_okay=False), help=HELP["output_json"]),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """'32,128,256' -> (32, 128, 256); '' -> ()."""
    try:
        sizes = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give batch sizes separated by commas, e.g. 32,128,256") from None
    if any(size < 1 for size in sizes):
        raise click.BadParameter(f"{value!r}: batch sizes must be >= 1")
    return sizes


@bench.command("step")
@click.option("--batch-size", "users", default=32, show_default=True, help="Users per batch.")
@click.option("--positions", default=21, show_default=True, help="Items per user sequence (20 history + target).")
@click.option("--steps", type=int, help="Timed steps per round.  [default: 20 on CUDA, 5 on CPU]")
@click.option("--rounds", default=3, show_default=True, help="Rounds; the variants take turns, the median is reported.")
@click.option("--warmup", type=int, help="Untimed steps per round.  [default: 2 on CUDA, 1 on CPU]")
@click.option("--catalogue", type=int, help=HELP["catalogue"] + "  [default: 4000 on CUDA, 2000 on CPU]")
@click.option("--stage", type=click.Choice(["pretrain", "finetune"]), default="pretrain", show_default=True,
              help=HELP["stage"])
@click.option("--negatives-batches", default="32,128,256", show_default=True, callback=_batch_sizes,
              help="Users per batch at which the compute-only step is timed with in-batch negatives before "
                   "(pairwise (B, N, B*N) mask) and after (per-user bitmap), side by side; '' skips it.")
@click.option("--negatives-steps", type=int, help="Timed steps per round of that comparison.  [default: 5 on CUDA, 2 on CPU]")
@click.option("--catalogue-ways/--no-catalogue-ways", default=True, show_default=True,
              help="Also time the compute-only step with every catalogue item a DAP candidate, the item tower "
                   "run twice per step vs once (objectives.encode_catalogue).")
@click.option("--precision-ways/--no-precision-ways", default=True, show_default=True,
              help="With fp32 precision (a CPU's default), also time the compute-only step in fp32 vs under "
                   "bf16 autocast (--mixed-precision bf16), side by side.")
@size_options
def bench_step(output: str | None, **options: Any) -> None:
    """Training step on cached states (memmap / RAM / GPU, with and without prefetch) vs end to end
    (lower blocks recomputed every step) vs pure compute (states already on the device); then the
    compute-only step at --negatives-batches with in-batch negatives before / after the bitmap, and
    with catalogue negatives, the item tower run twice vs once per step; at fp32, the compute-only
    step in fp32 vs bf16 autocast."""
    from pmmcache import bench as bench_mod

    _quiet_libraries()
    _print_json(bench_mod.run_step_bench(**options), output)


@bench.command("eval")
@click.option("--catalogue", "items", type=int, help=HELP["catalogue"] + "  [default: 100000 on CUDA, 2000 on CPU]")
@click.option("--users", type=int, help="Users evaluated.  [default: 100000 on CUDA, 2000 on CPU]")
@click.option("--cache-rows", type=int, help="Rows of the synthetic cache the items repeat.  [default: 10000 on CUDA, 1000 on CPU]")
@click.option("--item-batch-size", default=1024, show_default=True)
@click.option("--score-batch-size", default=1024, show_default=True, help="Users scored per matmul.")
@click.option("--scoring-items", default=100_000, show_default=True,
              help="Catalogue size of the scoring-only figure (random vectors, --users users; on a CPU too).")
@size_options
def bench_eval(output: str | None, **options: Any) -> None:
    """Full-rank evaluation: item-table items/s, users x items/s scored, and the seconds of a complete
    evaluation (item table + user vectors + scores + ranks) of --users over --catalogue items; then the
    scoring alone over --scoring-items random item vectors."""
    from pmmcache import bench as bench_mod

    _quiet_libraries()
    _print_json(bench_mod.run_eval_bench(**options), output)


@bench.command("extract")
@click.option("--dataset", default="demo", show_default=True, help=HELP["dataset"])
@config_option(EXTRACT, "--data-dir", type=click.Path(file_okay=False), help=HELP["data_dir"])
@click.option("--catalogue", "items", default=4000, show_default=True, help=HELP["catalogue"])
@click.option("--tokens", default=100, show_default=True, help="Text tokens + image tokens per item.")
@click.option("--dim", default=768, show_default=True, help=HELP["dim"])
@click.option("--batch-items", default=672, show_default=True, help="Random items per batch (32 users x 21).")
@click.option("--repeats", default=5, show_default=True, help="Timed reads per reader variant.")
@click.option("--rounds", default=3, show_default=True, help="Rounds; the variants take turns, the median is reported.")
@click.option("--reader/--no-reader", default=True, show_default=True, help="Also run the cache-reader comparison.")
@click.option("--device", default="auto", show_default=True, help=HELP["device"])
@encoder_options(EXTRACT, prefix="encoders.", seed=False)
@extraction_options
@click.option("--work-dir", type=click.Path(file_okay=False), help=HELP["work_dir"])
@click.option("--output", type=click.Path(dir_okay=False), help=HELP["output_json"])
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
    finished ones whose recipe only raised epochs or patience train on from their last checkpoint; then
    results.md, results.csv and convergence.png are written under <runs-dir>/<recipe name>/."""
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
