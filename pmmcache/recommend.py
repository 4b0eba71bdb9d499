"""Serving a trained run: top-k recommendations, new items without retraining, and the item table export.

A run's catalogue is its dataset's items plus the items added to it later with `add_items`. Adding
items is the point of an ID-free recommender: their text and image go through the same frozen lower
blocks as the training items (stage 1, `extract.extract_dataset`, into a cache kept with the run),
then through the run's trained item tower, and they are recommendable at once.

    runs/<run>/catalogue/catalogue.json     registered additions: [{"cache", "source", "items", ...}]
    runs/<run>/catalogue/<source>-<hash>.h5 one cache per added items file (hash of its content)

An addition is registered only once its cache is complete, so an interrupted `add-items` leaves the
catalogue as it was, and rerunning it resumes the extraction where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pmmcache import cache as cache_io
from pmmcache.config import from_dict, load_file, to_dict
from pmmcache.data.images import open_image_path
from pmmcache.data.prepare import ITEM_SCHEMA, USER_SCHEMA, PrepareConfig, PreparedDataset, check_source_name
from pmmcache.data.readers import read_pmmrec_texts
from pmmcache.errors import ConfigError, PmmcacheError
from pmmcache.evaluate import item_table
from pmmcache.extract import ExtractConfig, extract_dataset
from pmmcache.files import write_json
from pmmcache.integrity import check_sample
from pmmcache.items import ItemStore, default_cache_dataset
from pmmcache.runs import load_run
from pmmcache.runtime import check_device

CATALOGUE_DIR = "catalogue"
REGISTRY = "catalogue.json"
REGISTRY_FORMAT = 1


# ------------------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class RecommendConfig:
    """`pmmcache recommend`: top-k items for one history of item keys (oldest first)."""

    run: Path
    history: tuple[str, ...]
    k: int = 10
    include_history: bool = False  # False: items of the history are never recommended (as in evaluation)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if not self.history:
            raise ConfigError("the history is empty; give at least one item key")


@dataclass(frozen=True)
class AddItemsConfig:
    """`pmmcache add-items`: extract new items alone and add them to a run's catalogue."""

    run: Path
    items: Path  # `item \t text` per line (the PMMRec items-file layout)
    images: Path | None = None  # a folder of `<item>.<ext>` files or an LMDB (key = item)
    source: str = "new"  # keys become `<source>/<item>`
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        check_device(self.device)


@dataclass(frozen=True)
class ExportConfig:
    """`pmmcache export-items`: every catalogue item's key and vector, for an ANN index."""

    run: Path
    output: Path  # .parquet (key, vector: fixed-size list of float32) or .npz (keys, vectors, config)

    def __post_init__(self) -> None:
        if self.output.suffix not in (".parquet", ".npz"):
            raise ConfigError(f"--output {self.output}: use a .parquet or .npz file name")


# ------------------------------------------------------------------------------------------ the catalogue


def run_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.json as written by `pmmcache train`."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise PmmcacheError(f"{run_dir} is not a run directory (no config.json)")
    return load_file(path)


def check_content_based(run_dir: Path, config: dict[str, Any]) -> None:
    """New items need an item tower that reads content; an ID-based model has nothing to give them."""
    if (config.get("model") or {}).get("items") == "id":
        raise PmmcacheError(
            f"{run_dir} is an ID-based model (model.items = id): item ID embeddings exist only for the items it was "
            "trained on, so new items cannot be added without retraining; use a PMMRec / MoRec++ run")


def registry_path(run_dir: Path) -> Path:
    return Path(run_dir) / CATALOGUE_DIR / REGISTRY


def read_registry(run_dir: Path) -> list[dict[str, Any]]:
    """The additions registered in a run's catalogue, oldest first ([] when none)."""
    path = registry_path(run_dir)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        if data.get("format") != REGISTRY_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {REGISTRY_FORMAT}")
        return list(data["entries"])
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise PmmcacheError(f"{path}: cannot read the catalogue registry ({err})") from err


def _write_registry(run_dir: Path, entries: list[dict[str, Any]]) -> None:
    write_json(registry_path(run_dir), {"format": REGISTRY_FORMAT, "entries": entries})


def _open_addition(run_dir: Path, entry: dict[str, Any], expected: dict[str, Any],
                   device: torch.device) -> ItemStore:
    """The items of one registered addition, checked against the run's encoders."""
    path = Path(run_dir) / CATALOGUE_DIR / entry["cache"]
    reader = cache_io.CacheReader(path, expected=expected, storage="memmap", device=device)
    check_sample(path)
    return ItemStore(reader, cache_io.read_keys(path)[1:])


@dataclass
class Catalogue:
    """Every item a run can recommend, as vectors of its trained item tower."""

    keys: list[str]  # keys[row - 1] is the key of table row `row`
    table: torch.Tensor  # (N + 1, d) float32, row 0 = padding (zeros)
    trained: int  # rows 1..trained are the run's dataset items; later rows were added after training
    titles: list[str | None] | None = None  # titles[row - 1]: the item's text (None: it has none)

    def rows(self, keys: list[str] | tuple[str, ...]) -> list[int]:
        """Table rows of item keys; an unknown key is an error naming every unknown one."""
        index = self.index
        unknown = [key for key in keys if key not in index]
        if unknown:
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            shown = ", ".join(repr(k) for k in unknown[:10]) + more
            raise PmmcacheError(f"unknown item key(s) {shown}: not in the run's catalogue of {len(self.keys)} items "
                                f"(keys look like {self.keys[0]!r}; `pmmcache export-items` lists them)")
        return [index[key] for key in keys]

    @cached_property
    def index(self) -> dict[str, int]:
        """key -> table row."""
        return {key: row for row, key in enumerate(self.keys, start=1)}


def build_catalogue(run_dir: Path, s: Any) -> Catalogue:
    """The catalogue of a loaded run (`runs.load_run`): its dataset's items, then every addition."""
    was_training = s.model.training
    s.model.eval()
    keys = list(s.dataset.item_keys())
    titles = list(s.dataset.items.column("text").to_pylist())
    parts = [item_table(s.model, s.store)]
    entries = read_registry(run_dir)
    if entries:
        check_content_based(run_dir, to_dict(s.config))
        # added caches need the lower blocks of the cache the run was trained on, for every modality it reads
        expected = cache_io.fitting_manifest(s.store.reader.manifest, tuple(s.config.model.item_tower.modalities))
        for entry in entries:
            store = _open_addition(run_dir, entry, expected, parts[0].device)
            parts.append(item_table(s.model, store)[1:])  # row 0 of each table is padding
            added = cache_io.read_keys(store.reader.path)[1:]
            keys += added
            titles += _addition_titles(entry, added)
    s.model.train(was_training)
    return Catalogue(keys=keys, table=torch.cat(parts), trained=s.dataset.num_items, titles=titles)


def _addition_titles(entry: dict[str, Any], keys: list[str]) -> list[str | None]:
    """The texts of an addition's items, from its items file when it is still there (else none)."""
    path = Path(entry.get("items_file", ""))
    texts = read_pmmrec_texts(path) if path.is_file() else {}
    return [texts.get(key.split("/", 1)[-1]) for key in keys]


# ------------------------------------------------------------------------------------------ recommending


@dataclass(frozen=True)
class Recommendation:
    key: str
    score: float  # dot product of the user vector and the item vector (the ranking score)
    title: str | None = None  # the item's text, to read the list by


class Recommender:
    """A run's best model and its catalogue, loaded once; `recommend` serves any number of histories."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        s, _ = load_run(self.run_dir, storage="memmap")  # each item is read once, for the table
        self.model = s.model
        self.max_len = s.config.max_len
        self.config = run_config(self.run_dir)
        self.catalogue = build_catalogue(self.run_dir, s)

    @torch.no_grad()
    def scores(self, history: list[str] | tuple[str, ...]) -> torch.Tensor:
        """(N + 1,) scores of every catalogue row for a history of item keys (oldest first); row 0 = -inf."""
        if not history:
            raise PmmcacheError("the history is empty; give at least one item key")
        rows = self.catalogue.rows(history)[-self.max_len:]  # the user encoder sees the last max_len items
        table = self.catalogue.table
        ids = torch.zeros(1, self.max_len, dtype=torch.long, device=table.device)  # left-padded, as in evaluation
        ids[0, self.max_len - len(rows):] = torch.tensor(rows, device=table.device)
        user = self.model.user_vectors(table[ids], ids == 0).float()  # (1, d)
        scores = (user @ table.T)[0]  # (N + 1,)
        scores[0] = -torch.inf
        return scores.masked_fill(scores.isnan(), -torch.inf)  # a NaN (a corrupt item state) is never recommended

    def recommend(self, history: list[str] | tuple[str, ...], k: int = 10,
                  include_history: bool = False) -> list[Recommendation]:
        """The top-k items for `history`, best first; history items are left out unless `include_history`."""
        scores = self.scores(history)
        if not include_history:
            scores[self.catalogue.rows(history)] = -torch.inf
        available = int(torch.isfinite(scores).sum())
        top = torch.topk(scores, min(k, available))
        titles = self.catalogue.titles or [None] * len(self.catalogue.keys)
        return [Recommendation(self.catalogue.keys[row - 1], float(score), titles[row - 1])
                for score, row in zip(top.values.tolist(), top.indices.tolist())]


def recommend(config: RecommendConfig) -> list[Recommendation]:
    return Recommender(config.run).recommend(config.history, config.k, config.include_history)


# ------------------------------------------------------------------------------------------ new items


@dataclass
class AddResult:
    cache: Path
    keys: list[str]
    extracted: int  # items encoded by this call (0 when they were already in the catalogue)
    already_added: bool


def new_items_dataset(items_file: Path, images: Path | None, source: str) -> Any:
    """The new items as a prepared dataset without users: what stage 1 extracts."""
    check_source_name(source)
    if not Path(items_file).is_file():
        raise PmmcacheError(f"items file {items_file} not found (expected `item \\t text` per line)")
    texts = read_pmmrec_texts(Path(items_file))
    if not texts:
        raise PmmcacheError(f"{items_file} lists no items")
    store = open_image_path(images) if images is not None else None
    available = store.keys() if store is not None else set()
    ids = list(texts)
    table = pa.table({
        "index": np.arange(1, len(ids) + 1, dtype=np.int32), "key": [f"{source}/{i}" for i in ids],
        "source": [source] * len(ids), "text": [texts[i] for i in ids],
        "image_store": [0 if i in available else -1 for i in ids],
        "image_key": [i if i in available else None for i in ids]}, schema=ITEM_SCHEMA)
    users = pa.table({"key": [], "source": [], "items": []}, schema=USER_SCHEMA)
    return PreparedDataset(name=f"{CATALOGUE_DIR}/{source}", items=table, users=users,
                           image_stores=[store.spec()] if store is not None else [],
                           config=PrepareConfig(min_core=0), report={})


def _addition_name(dataset: Any) -> str:
    """`<source>-<hash>.h5`: the same items (texts, image keys and image store) give the same file."""
    digest = hashlib.sha256((dataset.fingerprint + json.dumps(dataset.image_stores, sort_keys=True)).encode())
    return f"{dataset.sources[0]}-{digest.hexdigest()[:12]}.h5"


def _check_collisions(run_dir: Path, new_keys: list[str], trained_keys: list[str],
                      entries: list[dict[str, Any]], name: str) -> None:
    taken = {key: "the run's dataset" for key in trained_keys}
    for entry in entries:
        if entry["cache"] != name:
            path = Path(run_dir) / CATALOGUE_DIR / entry["cache"]
            taken.update({key: f"an earlier addition ({entry['items_file']})" for key in cache_io.read_keys(path)[1:]})
    clashes = [f"{key!r} (in {taken[key]})" for key in new_keys if key in taken]
    if clashes:
        raise PmmcacheError(f"{len(clashes)} new item key(s) are already in the catalogue: {', '.join(clashes[:10])}"
                            f"{' ...' if len(clashes) > 10 else ''}; give the new items other ids or another --source")


def _extract_config(s: Any, config: AddItemsConfig) -> Any:
    """The run's stage-1 settings: its encoders and cache dataset (config.json), and the compute and
    storage dtypes of the cache it was trained on, so new items get states made the same way."""
    run = s.config
    manifest = s.store.reader.manifest
    data = {"encoders": {**to_dict(run.encoders), "modalities": list(run.model.item_tower.modalities)},
            "dataset": run.cache_dataset or default_cache_dataset(run.dataset), "data_dir": str(run.data_dir),
            "cache_dir": str(run.cache_dir), "batch_size": config.batch_size, "num_workers": config.num_workers,
            "device": config.device, "dtype": manifest.get("compute_dtype", "float32")}
    if "storage_dtype" in manifest:
        data["cache_dtype"] = manifest["storage_dtype"]
    return from_dict(ExtractConfig, data)


def add_items(config: AddItemsConfig, show_progress: bool = True) -> AddResult:
    """Extract only the items of `config.items` with the run's encoders and add them to its catalogue.

    Re-adding the same items file does nothing (or finishes an interrupted extraction); a key that is
    already in the catalogue (the run's dataset or another addition) is an error.
    """

    run_dir = Path(config.run)
    check_content_based(run_dir, run_config(run_dir))
    dataset = new_items_dataset(config.items, config.images, config.source)
    name = _addition_name(dataset)
    entries = read_registry(run_dir)
    s, _ = load_run(run_dir, storage="memmap")
    _check_collisions(run_dir, dataset.item_keys(), s.dataset.item_keys(), entries, name)
    path = run_dir / CATALOGUE_DIR / name
    registered = any(entry["cache"] == name for entry in entries)
    if registered and cache_io.is_complete(path):
        if show_progress:
            print(f"the {dataset.num_items} items of {config.items} are already in the catalogue ({path})")
        return AddResult(cache=path, keys=dataset.item_keys(), extracted=0, already_added=True)
    modalities = tuple(s.config.model.item_tower.modalities)
    if "text" not in modalities and not dataset.image_stores:
        raise PmmcacheError(f"the model of {run_dir} reads images only; pass --images with the new items' images")
    if show_progress and "image" in modalities and config.images is None:
        print("no --images: the new items are encoded from their text alone (image modality marked missing)")
    result = extract_dataset(dataset, _extract_config(s, config), path=path, show_progress=show_progress,
                             keep_modalities=True)
    expected = cache_io.fitting_manifest(s.store.reader.manifest, modalities)
    entry = {"cache": name, "source": config.source, "items": dataset.num_items,
             "items_file": str(Path(config.items).resolve()),
             "images": str(Path(config.images).resolve()) if config.images is not None else None}
    _open_addition(run_dir, entry, expected, torch.device("cpu"))  # it fits the model before it is registered
    if not registered:
        _write_registry(run_dir, entries + [entry])
    if show_progress:
        print(f"added {dataset.num_items} items ({dataset.item_keys()[0]} ...) to the catalogue of {run_dir}; "
              "`pmmcache recommend` and `export-items` now include them")
    return AddResult(cache=path, keys=dataset.item_keys(), extracted=result.items, already_added=False)


# ------------------------------------------------------------------------------------------ export


def export_items(config: ExportConfig) -> Path:
    """Write every catalogue item's key and vector with the run's config, atomically; returns the file."""
    output = Path(config.output)
    try:  # before the catalogue is built: an unwritable --output fails at once
        output.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(output.parent, os.W_OK):
            raise PermissionError(13, "permission denied")
    except OSError as err:
        raise _unwritable(output, err) from err
    recommender = Recommender(config.run)
    catalogue = recommender.catalogue
    vectors = catalogue.table[1:].float().cpu().numpy()  # (N, d)
    broken = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if broken.size:
        names = ", ".join(catalogue.keys[i] for i in broken[:5]) + (f" and {broken.size - 5} more" if broken.size > 5 else "")
        raise PmmcacheError(f"{broken.size} item vector(s) are not finite ({names}): their cached states are "
                            "corrupt; re-extract those items (`pmmcache extract`) before exporting")
    meta = {"run": str(config.run), "config": recommender.config, "items": len(catalogue.keys),
            "trained_items": catalogue.trained, "added_items": len(catalogue.keys) - catalogue.trained,
            "score": "dot product of a user vector and these vectors"}
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}{output.suffix}")
    try:
        if output.suffix == ".npz":
            np.savez(tmp, keys=np.array(catalogue.keys), vectors=vectors, metadata=np.array(json.dumps(meta)))
        else:
            import pyarrow.parquet as pq

            column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
            table = pa.table({"key": pa.array(catalogue.keys, pa.string()), "vector": column})
            table = table.replace_schema_metadata({"pmmcache": json.dumps(meta, sort_keys=True)})
            pq.write_table(table, tmp)
        os.replace(tmp, output)
    except OSError as err:  # e.g. the disk is full; pyarrow's write errors are OSErrors too
        tmp.unlink(missing_ok=True)
        raise _unwritable(output, err) from err
    return output


def _unwritable(output: Path, err: OSError) -> PmmcacheError:
    return PmmcacheError(f"--output {output}: cannot write it ({err.strerror or err})")
