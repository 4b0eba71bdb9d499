"""Stage 1: run the frozen lower blocks of the text and vision encoders once per item into the cache.

`run(ExtractConfig)` is what `pmmcache extract` calls. Under `accelerate launch` every process encodes
its share of the pending rows and writes them into the same file (each row belongs to one process);
the main process creates the file first and marks it complete last.

Each process runs a pipeline of three overlapped parts: loader processes (`num_workers`; a thread when
0) decode images and tokenise texts a few batches ahead, the main loop runs the lower blocks, and a
writer thread (`pmmcache.write_behind`) writes the previous batch's rows meanwhile. On CUDA, JPEG
bytes skip the loaders' decoding and are decoded on the GPU (nvJPEG, `image_decode`); the loaders
hand over uint8 pixels, normalised on the device.

Rerunning it after items changed re-encodes just those rows (same item keys in the same order, new
text or image bytes); a changed item set (items added or removed) needs `--force`. The main process
holds `<cache>.lock` from start to end, so a second `extract` of the same cache waits (saying for
whom) and then finds the work done.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pmmcache import cache as cache_io
from pmmcache.batches import Prefetcher
from pmmcache.config import to_dict
from pmmcache.data.images import decode_image, decode_jpegs, device_decodable, open_image_store
from pmmcache.data.prepare import PrepareConfig, problem_lines
from pmmcache.data.registry import resolve_dataset
from pmmcache.encoders import TextEncoder, VisionEncoder
from pmmcache.encoders.config import EncoderConfig, encoder_specs
from pmmcache.errors import CacheMismatchError, ConfigError, DataError, PmmcacheError
from pmmcache.files import write_json
from pmmcache.locks import exclusive_lock, lock_timeout
from pmmcache.runtime import check_device, use_cpu
from pmmcache.shards import shard_of
from pmmcache.write_behind import BackgroundWriter

Modality = Literal["text", "image"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of `pmmcache extract`. Encoder fields left as None take the dataset's defaults."""

    dataset: str = "demo"
    data_dir: Path = Path("data")
    cache_dir: Path = Path("cache")
    encoders: EncoderConfig = field(default_factory=EncoderConfig)  # which encoders, split where
    batch_size: int = 64
    num_workers: int = 2  # processes decoding images and tokenising, per extraction process (0: a thread)
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype of the lower blocks
    # How states are stored: float16, or int8 with a float16 scale per token (half the size).
    cache_dtype: Literal["float16", "int8"] = "float16"
    force: bool = False  # rebuild a cache made with other settings
    # How a new cache is laid out: one file, written by every process through memory maps; a shard file
    # per process ("per-process") or N shard files, each written by one process; "auto" = one shard per
    # process when the processes span several machines (no shared memory-mapped writes over a network).
    shards: Literal["auto", "one-file", "per-process"] | int = "auto"
    # Where JPEGs are decoded: auto = on the GPU (nvJPEG) when extracting on CUDA, else by PIL in the loaders.
    image_decode: Literal["auto", "cpu", "nvjpeg"] = "auto"
    data: PrepareConfig = field(default_factory=PrepareConfig)  # k-core etc.: which items the catalogue has

    # Settings that moved into `encoders` (pmmcache before one EncoderConfig); `config.from_dict` names the new key.
    MOVED_SETTINGS: ClassVar[dict[str, str]] = {name: f"encoders.{name}" for name in ("text_encoder", "vision_encoder", "vision_weights", "top_blocks",
                                                   "max_text_length", "image_size", "modalities", "seed")}

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size = {self.batch_size}; must be >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers = {self.num_workers}; must be >= 0")
        if isinstance(self.shards, int) and self.shards < 1:
            raise ConfigError(f"shards = {self.shards}; a number of shard files must be >= 1")
        check_device(self.device)


def build_manifest(dataset: Any, text: TextEncoder | None, vision: VisionEncoder | None,
                   config: ExtractConfig) -> dict[str, Any]:
    """Everything that determines the cached states (compared on reuse), plus informational fields."""
    import transformers

    import pmmcache

    return {
        "format_version": cache_io.FORMAT_VERSION,
        # The dataset as it was when the file was created; rows re-encoded later are tracked by /item_hash.
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint, "num_items": dataset.num_items},
        "item_order": "row i = item index i of the prepared dataset; row 0 = padding",
        "text": cache_io.encoder_entry(text),
        "image": cache_io.encoder_entry(vision),
        "storage_dtype": config.cache_dtype,  # compared on reuse; stage 2 reads either
        "compute_dtype": config.dtype,
        "created_by": {"pmmcache": pmmcache.__version__, "torch": torch.__version__,
                       "transformers": transformers.__version__},
        "extract": to_dict(config),
    }


def image_decoder(setting: str, device: torch.device) -> Literal["cpu", "nvjpeg"]:
    """Where JPEG bytes are decoded for `ExtractConfig.image_decode` on `device`: "nvjpeg" (on the GPU,
    in the extraction process) or "cpu" (PIL, in the loaders). Other formats always go to PIL."""
    if setting == "cpu":
        return "cpu"
    if device.type != "cuda":
        if setting == "nvjpeg":
            raise ConfigError(f"image_decode = 'nvjpeg' needs a CUDA device (extracting on {device}); "
                              "use --image-decode auto or cpu")
        return "cpu"
    return "nvjpeg"


@dataclass
class ItemBatch:
    rows: np.ndarray  # (B,)
    flags: np.ndarray  # (B,) uint8 problem bits
    input_ids: torch.Tensor | None = None  # (B, L)
    attention_mask: torch.Tensor | None = None  # (B, L)
    pixels: torch.Tensor | None = None  # (B, 3, S, S) uint8, resized; zeros where `jpegs` or no image
    jpegs: list[tuple[int, bytes, str]] = field(default_factory=list)  # (position, bytes, where): decode on the device


def decode_or_flag(data: bytes, where: str, min_side: int) -> tuple[Image.Image | None, int]:
    """Image bytes -> (RGB image, 0), or (None, FLAG_IMAGE_UNREADABLE) for bytes PIL cannot decode.
    DataError (too large to decode) passes: the user must act, not a flag in the report."""
    try:
        return decode_image(data, where, min_side), 0
    except DataError:
        raise
    except Exception:  # PIL raises many types for corrupt data; all mean "unreadable"
        return None, cache_io.FLAG_IMAGE_UNREADABLE


class ItemRows(Dataset):
    """Loads one batch of rows per index: tokenised texts and decoded, resized images (uint8).

    Runs in DataLoader worker processes (or a loader thread), so decoding overlaps with encoding.
    `device_jpeg` leaves JPEG bytes undecoded in `ItemBatch.jpegs`, for the GPU to decode.
    """

    def __init__(self, batches: list[np.ndarray], texts: list[str | None], images: list[tuple[int, str | None]],
                 stores: list[dict], text_encoder: TextEncoder | None, vision_encoder: VisionEncoder | None,
                 device_jpeg: bool = False):
        self.batches, self.texts, self.images, self.store_specs = batches, texts, images, stores
        self.text_encoder, self.vision_encoder = text_encoder, vision_encoder
        self.device_jpeg = device_jpeg
        self._stores: dict[int, Any] = {}  # opened lazily, once per worker process

    def __len__(self) -> int:
        return len(self.batches)

    def _image(self, row: int) -> tuple[Image.Image | bytes | None, str, int]:
        """(decoded image, or JPEG bytes left for the device, or None; where it is; problem flag)."""
        store_id, key = self.images[row]
        if store_id < 0 or key is None:
            return None, "", cache_io.FLAG_IMAGE_MISSING
        if store_id not in self._stores:
            self._stores[store_id] = open_image_store(self.store_specs[store_id])
        data = self._stores[store_id].get_bytes(key)
        where = f"{self.store_specs[store_id]['path']}, image {key!r}"
        if data is None:
            return None, where, cache_io.FLAG_IMAGE_MISSING
        if self.device_jpeg and device_decodable(data):
            return data, where, 0
        image, flag = decode_or_flag(data, where, self.vision_encoder.spec.image_size)
        return image, where, flag

    def __getitem__(self, i: int) -> ItemBatch | PmmcacheError:
        """The batch, or the user-facing error that loading it raised: returned rather than raised, since
        DataLoader re-raises a worker's error with the worker's traceback pasted into its message."""
        try:
            return self._load(i)
        except PmmcacheError as err:
            return err

    def _load(self, i: int) -> ItemBatch:
        rows = self.batches[i]
        flags = np.zeros(len(rows), dtype=np.uint8)
        batch = ItemBatch(rows=rows, flags=flags)
        if self.text_encoder is not None:
            texts = []
            for j, row in enumerate(rows):
                text = self.texts[row]
                if row == 0 or text is None or not text.strip():
                    flags[j] |= cache_io.FLAG_TEXT_EMPTY
                    text = ""
                texts.append(text)
            tokens = self.text_encoder.tokenize(texts)
            batch.input_ids, batch.attention_mask = tokens["input_ids"], tokens["attention_mask"]
            flags[np.asarray(tokens["truncated"], dtype=bool)] |= cache_io.FLAG_TEXT_TRUNCATED
        if self.vision_encoder is not None:
            images = []
            blank = Image.new("RGB", (self.vision_encoder.spec.image_size,) * 2)
            for j, row in enumerate(rows):
                img, where, flag = (None, "", cache_io.FLAG_IMAGE_MISSING) if row == 0 else self._image(row)
                flags[j] |= flag
                if isinstance(img, bytes):
                    batch.jpegs.append((j, img, where))
                    img = None
                images.append(img if img is not None else blank)
            batch.pixels = self.vision_encoder.preprocessing.to_uint8(images)
        return batch


def item_loader(rows: ItemRows, num_workers: int) -> Any:
    """The batches of `rows` in order, loaded ahead: by `num_workers` processes, or by one thread for 0
    (PIL's decoding and the fast tokenizers release the GIL, so a thread overlaps with encoding too)."""
    if num_workers == 0:
        return Prefetcher(range(len(rows)), rows.__getitem__, depth=2)
    return DataLoader(rows, batch_size=None, shuffle=False, num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=4)


def shard_count(setting: str | int, num_processes: int) -> int:
    """Shard files of a new cache for `ExtractConfig.shards` (0 = one file, no shards)."""
    if setting == "one-file":
        return 0
    if setting == "per-process":
        return num_processes
    if isinstance(setting, int):
        return setting
    # torchrun (under `accelerate launch`) says how many processes run on this machine
    local = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    return num_processes if local < num_processes else 0


def _process_state(device: str) -> PartialState:
    """This process's place among those of `accelerate launch` (one process alone otherwise)."""
    return PartialState(cpu=use_cpu(device))


def _resolve_device(device: str, state: PartialState) -> torch.device:
    if device == "auto":
        return state.device
    return torch.device(device)


@dataclass
class ExtractResult:
    path: Path
    items: int  # rows encoded by this run (all processes)
    seconds: float
    bytes_written: int
    problems: dict[str, int] = field(default_factory=dict)
    already_complete: bool = False

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


def run(config: ExtractConfig, show_progress: bool = True) -> ExtractResult:
    """Extract (or resume extracting) the cache for `config.dataset`; returns what was done."""
    dataset = resolve_dataset(config.dataset, Path(config.data_dir), Path(config.cache_dir), config.data)
    if _process_state(config.device).is_main_process:
        for line in problem_lines(dataset.report):
            print(f"warning: {line}")
    return extract_dataset(dataset, config, show_progress=show_progress)


def extract_dataset(dataset: Any, config: ExtractConfig, path: Path | None = None, show_progress: bool = True,
                    keep_modalities: bool = False) -> ExtractResult:
    """Extract (or resume extracting) every item of a prepared `dataset` into the cache file `path`
    (default: `config`'s place under cache_dir). `config.dataset` still picks the encoder defaults.
    `keep_modalities` keeps a modality the items lack (flagged missing per item), for a cache that must
    fit a model using it, e.g. new text-only items added to a trained text+image run."""
    state = _process_state(config.device)
    text_spec, vision_spec = encoder_specs(config.encoders, config.dataset)
    if not keep_modalities and text_spec is not None and not any(
            t and t.strip() for t in dataset.items.column("text").to_pylist()):
        text_spec = None  # image-only data: the text modality is simply absent
    if not keep_modalities and vision_spec is not None and not dataset.image_stores:
        vision_spec = None  # text-only data
    if text_spec is None and vision_spec is None:
        raise PmmcacheError(f"dataset {config.dataset!r} has none of the modalities asked for ({','.join(config.encoders.modalities)})")

    device = _resolve_device(config.device, state)
    dtype = DTYPES[config.dtype]
    text = TextEncoder.load(text_spec) if text_spec else None
    vision = VisionEncoder.load(vision_spec) if vision_spec else None
    # The manifest describes the weights as loaded (fp32): their fingerprints must not depend on the
    # compute dtype, which is recorded on its own, or stage 2 (fp32 encoders) would refuse the cache.
    manifest = build_manifest(dataset, text, vision, config)
    text = text.to(device=device, dtype=dtype).eval() if text else None
    vision = vision.to(device=device, dtype=dtype).eval() if vision else None
    path = Path(path) if path is not None else cache_io.cache_path(
        Path(config.cache_dir), config.dataset, cache_io.cache_key(text_spec, vision_spec, config.cache_dtype))

    lock = (exclusive_lock(path.with_name(path.name + ".lock"), f"the cache {path}", lock_timeout())
            if state.is_main_process else nullcontext())
    with lock:
        return _extract_into(path, manifest, dataset, text, vision, config, state, device, show_progress)


def _extract_into(path: Path, manifest: dict, dataset: Any, text: TextEncoder | None, vision: VisionEncoder | None,
                  config: ExtractConfig, state: PartialState, device: torch.device,
                  show_progress: bool) -> ExtractResult:
    if state.is_main_process:
        _prepare_file(path, manifest, dataset, text, vision, force=config.force, states_dtype=config.cache_dtype,
                      shards=shard_count(config.shards, state.num_processes))
    state.wait_for_everyone()
    if cache_io.is_complete(path):
        if state.is_main_process and show_progress:
            print(f"cache already complete: {path}")
        return ExtractResult(path=path, items=0, seconds=0.0, bytes_written=0, already_complete=True)

    maps = cache_io.open_maps(path)  # read-only
    pending, row_bytes = cache_io.pending_rows(maps), _row_bytes(maps)
    del maps
    state.wait_for_everyone()  # all processes split the same pending rows: none may write before all have read
    index = cache_io.read_shards(path)
    if index is None:  # one file: every process writes its share of the rows into it
        mine, my_shards = pending[state.process_index::state.num_processes], None
    else:  # shards: every process writes its own shard files, and only those
        my_shards = list(range(state.process_index, len(index), state.num_processes))
        mine = pending[np.isin(shard_of(index, pending), my_shards)]
    writer = cache_io.CacheWriter(path, shards=my_shards) if len(mine) else None
    batches = [mine[i:i + config.batch_size] for i in range(0, len(mine), config.batch_size)]
    device_jpeg = vision is not None and image_decoder(config.image_decode, device) == "nvjpeg"
    rows = ItemRows(batches, *item_columns(dataset), dataset.image_stores, text, vision, device_jpeg=device_jpeg)
    loader = item_loader(rows, config.num_workers)
    hashes = np.zeros((dataset.num_items + 1, cache_io.ITEM_HASH_BYTES), np.uint8)  # row 0 = padding: zeros
    hashes[1:] = dataset.item_fingerprints()
    progress = tqdm(total=len(pending), unit="item", desc=f"extract {config.dataset}", dynamic_ncols=True,
                    disable=not (show_progress and state.is_main_process))
    start = time.perf_counter()
    background = None
    try:
        loaded = iter(loader)  # loader processes fork here: before the writer thread exists
        if writer is not None:
            background = BackgroundWriter(writer, [""] + dataset.item_keys(), path, row_bytes * len(pending))
        # The file is allocated up front; a disk full here is elsewhere (e.g. the temporary folder).
        with torch.no_grad(), cache_io.explain_disk_full(path, row_bytes * len(pending)):
            for batch in loaded:
                if isinstance(batch, PmmcacheError):  # raised while loading the batch, in a worker or here
                    raise batch
                arrays = _encode(batch, text, vision, device, config.cache_dtype)
                if writer.has("item_hash"):
                    arrays["item_hash"] = hashes[batch.rows]
                background.put(batch.rows, *_to_host(arrays, device))
                progress.update(len(batch.rows) * state.num_processes)
            if background is not None:
                background.finish()
    finally:
        progress.close()
        if isinstance(loader, Prefetcher):  # its thread prepares batches with torch: let it leave before exit
            loader.close(wait=30.0)
        if background is not None:
            background.stop()
        if writer is not None:
            writer.close()
    state.wait_for_everyone()
    seconds = time.perf_counter() - start
    total_done = int((pending > 0).sum())  # row 0 is padding, not an item
    result = ExtractResult(path=path, items=total_done, seconds=seconds, bytes_written=total_done * row_bytes)
    if state.is_main_process:
        result.problems = _finish(path, dataset)
        if show_progress:
            print(_summary_line(result))
    state.wait_for_everyone()
    return result


def _prepare_file(path: Path, manifest: dict, dataset: Any, text: TextEncoder | None, vision: VisionEncoder | None,
                  force: bool, states_dtype: str = "float16", shards: int = 0) -> None:
    """Create the cache (one file, or `shards` shard files and their index), or check that an existing
    one was made with the same settings and mark the rows of items that changed since for re-encoding.
    An existing cache keeps its layout."""
    if path.exists():
        try:
            # The dataset part is checked item by item: changed items are re-encoded, not refused.
            cache_io.check_manifest(path, {key: value for key, value in manifest.items() if key != "dataset"})
            _mark_changed_items(path, dataset)
        except PmmcacheError as err:
            if not force:
                raise CacheMismatchError(f"{err}\nPass --force to rebuild it (the old file is replaced).") from None
            cache_io.remove_cache(path)
        else:
            if not cache_io.is_complete(path):  # made before space was reserved, or resumed after a disk full
                for file in cache_io.cache_files(path):
                    cache_io.reserve_space(file)
            return
    layout = cache_io.cache_layout(
        dataset.num_items + 1,
        (text.spec.max_length, text.d_model) if text else None,
        (vision.num_tokens, vision.d_model) if vision else None,
        states_dtype)
    if shards:
        cache_io.create_sharded_cache(path, manifest, [""] + dataset.item_keys(), layout, shards)
    else:
        cache_io.create_cache(path, manifest, [""] + dataset.item_keys(), layout)


def _mark_changed_items(path: Path, dataset: Any) -> None:
    """Make the rows of items whose text or image changed since extraction pending again.

    CacheMismatchError when the rows no longer line up with the items (items added, removed or
    reordered) or the cache records no item fingerprints (older pmmcache)."""
    keys = cache_io.read_keys(path)[1:]
    current = dataset.item_keys()
    if keys != current:
        raise CacheMismatchError(_item_set_change(path, keys, current, dataset.name))
    maps = cache_io.open_maps(path, names={"item_hash", "done"})  # read-only: an unchanged cache stays untouched
    if "item_hash" not in maps:
        raise CacheMismatchError(f"{path} was made by an older pmmcache: it records no per-item fingerprints "
                                 "or checksums, so items changed since cannot be found")
    done = maps["done"][1:] == 1
    differs = (maps["item_hash"][1:] != dataset.item_fingerprints()).any(axis=1)
    changed = np.flatnonzero(done & differs) + 1  # cache rows
    if len(changed):
        names = [current[row - 1] for row in changed]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        print(f"{len(names)} item(s) changed since they were extracted ({shown}): re-encoding them in {path}")
        writer = cache_io.CacheWriter(path)
        writer.mark_pending(changed)
        writer.close()


def _item_set_change(path: Path, keys: list[str], current: list[str], name: str) -> str:
    before, now = set(keys), set(current)
    added = [k for k in current if k not in before]
    removed = [k for k in keys if k not in now]

    def listed(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    parts = ([f"{len(added)} added ({listed(added)})"] if added else []) + (
        [f"{len(removed)} removed ({listed(removed)})"] if removed else [])
    change = "; ".join(parts) if parts else "the same items in another order"
    return (f"{path}: the item set of dataset {name!r} changed since extraction: {change}. Rows would move, so "
            "the cache cannot be updated in place; `pmmcache extract --force` re-extracts every item")


def item_columns(dataset: Any) -> tuple[list[str | None], list[tuple[int, str | None]]]:
    """What `ItemRows` reads of a prepared dataset: texts and (image store, image key) per cache row;
    row 0 is the padding item."""
    texts = [None] + dataset.items.column("text").to_pylist()
    stores = dataset.items.column("image_store").to_pylist()
    keys = dataset.items.column("image_key").to_pylist()
    return texts, [(-1, None)] + list(zip(stores, keys))


def _states_arrays(name: str, states: torch.Tensor, states_dtype: str) -> dict[str, torch.Tensor]:
    """`name/states` (and `name/scale` for int8) as stored, on the encoding device (int8 is quantised there)."""
    if states_dtype == "int8":
        q, scale = cache_io.quantize_int8(states)
        return {f"{name}/states": q, f"{name}/scale": scale}
    return {f"{name}/states": states.to(torch.float16)}


def device_pixels(batch: ItemBatch, vision: VisionEncoder, device: torch.device) -> torch.Tensor:
    """(B, 3, S, S) float32 on `device`: the loader's uint8 pixels normalised there, after decoding the
    batch's `jpegs` on the device (nvJPEG on CUDA). A JPEG the device cannot decode goes to PIL; one
    PIL cannot decode either is flagged unreadable in `batch.flags` and stays blank."""
    pixels = batch.pixels.to(device, non_blocking=True)
    if batch.jpegs:
        decoded = decode_jpegs([data for _, data, _ in batch.jpegs], device)
        for (j, data, where), image in zip(batch.jpegs, decoded):
            if image is None:
                pil, flag = decode_or_flag(data, where, vision.spec.image_size)
                batch.flags[j] |= flag
                if pil is not None:
                    pixels[j] = vision.preprocessing.to_uint8([pil])[0].to(device)
            else:
                pixels[j] = vision.preprocessing.resize_tensor(image)
    return vision.preprocessing.normalize(pixels)


def model_inputs(batch: ItemBatch, text: TextEncoder | None, vision: VisionEncoder | None,
                 device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(input_ids, attention_mask, pixels) of a loaded batch on `device`, as the lower blocks take them."""
    ids = batch.input_ids.to(device) if text is not None else None
    mask = batch.attention_mask.to(device) if text is not None else None
    pixels = device_pixels(batch, vision, device).to(vision.dtype) if vision is not None else None
    return ids, mask, pixels


def _encode(batch: ItemBatch, text: TextEncoder | None, vision: VisionEncoder | None,
            device: torch.device, states_dtype: str = "float16") -> dict[str, np.ndarray | torch.Tensor]:
    """Lower-block states of one batch as the arrays the cache stores (states still on `device`)."""
    ids, mask, pixels = model_inputs(batch, text, vision, device)  # sets flags of images found unreadable
    flags = batch.flags
    modality = np.zeros((len(batch.rows), 2), dtype=np.uint8)
    out: dict[str, np.ndarray | torch.Tensor] = {"flags": flags, "modality": modality}
    if text is not None:
        out.update(_states_arrays("text", text.lower(ids, mask), states_dtype))  # (B, L, d)
        out["text/mask"] = batch.attention_mask.to(torch.uint8).numpy()
        modality[:, 0] = (flags & cache_io.FLAG_TEXT_EMPTY) == 0
    if vision is not None:
        out.update(_states_arrays("image", vision.lower(pixels), states_dtype))  # (B, P, d)
        modality[:, 1] = (flags & (cache_io.FLAG_IMAGE_MISSING | cache_io.FLAG_IMAGE_UNREADABLE)) == 0
    padding = batch.rows == 0
    if padding.any():  # row 0 is the padding item: all zeros, no modality, no problem flags
        for values in out.values():
            values[torch.from_numpy(padding).to(values.device) if isinstance(values, torch.Tensor) else padding] = 0
    return out


def _to_host(arrays: dict[str, np.ndarray | torch.Tensor],
             device: torch.device) -> tuple[dict[str, np.ndarray], Callable[[], None] | None]:
    """The arrays as numpy, and what the writer thread must wait for before reading them: on CUDA the
    states are copied into pinned host memory asynchronously, so the next batch's encoding is queued
    on the GPU without waiting for this copy."""
    host = {}
    for name, value in arrays.items():
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            pinned = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            value = pinned.copy_(value, non_blocking=True)
        host[name] = value.numpy() if isinstance(value, torch.Tensor) else value
    if device.type != "cuda":
        return host, None
    copied = torch.cuda.Event()
    copied.record()
    return host, copied.synchronize


def _row_bytes(maps: dict[str, Any]) -> int:
    return sum(int(np.prod(mm.shape[1:])) * mm.dtype.itemsize for name, mm in maps.items()
               if name not in ("complete", "done"))


def _finish(path: Path, dataset: Any) -> dict[str, int]:
    """Write the problem report beside the cache and mark the cache complete."""
    writer = cache_io.CacheWriter(path)
    flags = np.array(writer.maps["flags"])
    keys = [""] + dataset.item_keys()
    problems: dict[str, list[str]] = {}
    for bit, name in cache_io.FLAG_NAMES.items():
        rows = np.flatnonzero(flags & bit)
        if len(rows):
            problems[name] = [keys[r] for r in rows]
    report = {"cache": path.name, "items": dataset.num_items, "item_problems": problems,
              "dataset_report": dataset.report}
    report_path = path.with_suffix(".report.json")
    with cache_io.explain_disk_full(report_path, 1 << 20):
        write_json(report_path, report)
    writer.mark_complete()
    writer.close()
    counts = {name: len(keys_) for name, keys_ in problems.items()}
    for name, keys_ in problems.items():
        shown = ", ".join(keys_[:5]) + (f", … ({len(keys_) - 5} more)" if len(keys_) > 5 else "")
        print(f"warning: {len(keys_)} item(s) with {name}: {shown} (see {report_path})")
    return counts


def _summary_line(result: ExtractResult) -> str:
    mb = result.bytes_written / 1e6
    return (f"extracted {result.items} items in {result.seconds:.1f} s "
            f"({result.items_per_second:.0f} items/s), wrote {mb:.1f} MB to {result.path}")
