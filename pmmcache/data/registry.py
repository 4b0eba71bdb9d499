"""Dataset registry: a dataset name -> a `PreparedDataset`, prepared once and cached on disk.

Names:
- `<name>`: raw files in `data_dir/<name>/`, layout detected (PMMRec tsv, RecBole atomic, parquet).
  The PMMRec / NineRec layout is found by file suffix whatever the prefix (the released `bili_food/`
  holds `bilibili_food_users.tsv`): `*_users.tsv`, `*_items_texts.tsv`, and `*_items_images.lmdb`,
  `*_images/`, `*.lmdb` or `images/`; `PrepareConfig.users/texts/images` name the files instead.
  More than one candidate for a file is an error listing them.
- `ml-100k`: MovieLens-100k from the installed recbole wheel (data_dir is not used).
- `demo`: the generated multi-domain demo (`data_dir/demo/`, generated on first use), every
  domain combined; `demo/<domain>` is one domain alone. Item keys are `<domain>/<item>` in both,
  so features cached for `demo` serve `demo/<domain>` too.
- `a,b,...`: each name resolved on its own, then combined in memory into one index space.

The prepared copy of a name lives in `cache_dir/<name>/dataset/`. It is rebuilt when missing,
when the PrepareConfig differs, or when a raw file's size or mtime changed (for image folders: the
name, size and mtime of every file in them, so an image overwritten in place counts too; the
preparation then reads every image's bytes into the dataset fingerprint).
Several processes may resolve at once: building and checking happen under an exclusive
`fcntl.flock` on `cache_dir/<name>/.lock`, so one builds and the others then load its copy (a
waiting process prints who holds the lock; PMMCACHE_LOCK_TIMEOUT sets how long it waits).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pmmcache.config import to_dict
from pmmcache.data.images import is_lmdb_dir
from pmmcache.data.prepare import (
    FORMAT_VERSION,
    PrepareConfig,
    PreparedDataset,
    combine,
    prepare,
    read_manifest,
)
from pmmcache.data.readers import (
    PMMREC_IMAGE_NAMES,
    RawDataset,
    read_parquet,
    read_pmmrec,
    read_recbole,
    recbole_example_dir,
)
from pmmcache.errors import DataError, PmmcacheError
from pmmcache.locks import exclusive_lock, lock_timeout

DEMO = "demo"
ML_100K = "ml-100k"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PARQUET_PAIRS = ("{name}_interactions.parquet", "{name}_items.parquet"), ("interactions.parquet", "items.parquet")


@dataclass(frozen=True)
class RawLayout:
    """Where one source's raw files are and how to read them."""

    kind: str  # "pmmrec", "recbole" or "parquet"
    directory: Path
    name: str
    stamped: tuple[Path, ...]  # files/folders whose size+mtime decide whether a rebuild is due
    images: Path | None = None  # pmmrec image store
    tables: tuple[Path, Path] | None = None  # parquet (interactions, items)
    users: Path | None = None  # pmmrec users file
    texts: Path | None = None  # pmmrec items texts file (None: image-only)

    def read(self) -> RawDataset:
        if self.kind == "pmmrec":
            return read_pmmrec(self.directory, self.name, images=self.images, users=self.users,
                               texts=self.texts or self.directory / f"{self.name}_items_texts.tsv")
        if self.kind == "recbole":
            return read_recbole(self.directory, self.name)
        return read_parquet(self.tables[0], self.tables[1], self.name)


@dataclass(frozen=True)
class LayoutFiles:
    """Files of the PMMRec layout named explicitly (`--users/--texts/--images`); None = detected."""

    users: Path | None = None
    texts: Path | None = None
    images: Path | None = None

    @classmethod
    def of(cls, config: PrepareConfig, directory: Path) -> "LayoutFiles":
        """The config's file names, relative to the dataset folder unless absolute."""
        return cls(*(None if value is None else directory / value
                     for value in (config.users, config.texts, config.images)))

    def given(self) -> bool:
        return any(value is not None for value in (self.users, self.texts, self.images))


def _one(directory: Path, pattern: str, what: str, option: str, preferred: Path | None = None) -> Path | None:
    """The single file matching `pattern` in `directory` (`preferred` wins when it exists); None when
    none; PmmcacheError listing the candidates when several match."""
    if preferred is not None and preferred.exists():
        return preferred
    found = sorted(directory.glob(pattern))
    if len(found) > 1:
        raise PmmcacheError(f"{directory}: more than one {what} ({', '.join(p.name for p in found)}); "
                            f"name the one to read with {option}")
    return found[0] if found else None


def _pmmrec_images(directory: Path, prefix: str) -> Path | None:
    """The image store beside `<prefix>_users.tsv`: a known name with that prefix, else the one `*_items_images.lmdb`."""
    for pattern in PMMREC_IMAGE_NAMES:
        candidate = directory / pattern.format(name=prefix)
        if candidate.is_dir() or (candidate.suffix == ".lmdb" and candidate.is_file()):
            return candidate
    return _one(directory, "*_items_images.lmdb", "image LMDB (*_items_images.lmdb)", "--images")


def _pmmrec_layout(directory: Path, name: str, files: LayoutFiles) -> RawLayout | None:
    """The PMMRec layout in `directory` (None when it has no users file), files found by suffix."""
    users = files.users or _one(directory, "*_users.tsv", "users file (*_users.tsv)", "--users",
                                preferred=directory / f"{name}_users.tsv")
    if users is None:
        return None
    if not users.is_file():
        raise DataError("users file not found", users)
    prefix = users.name.removesuffix("_users.tsv") if users.name.endswith("_users.tsv") else name
    texts = files.texts or _one(directory, "*_items_texts.tsv", "items texts file (*_items_texts.tsv)", "--texts",
                                preferred=directory / f"{prefix}_items_texts.tsv")
    if files.texts is not None and not files.texts.is_file():
        raise DataError("items texts file not found", files.texts)
    images = files.images or _pmmrec_images(directory, prefix)
    if files.images is not None and not files.images.exists():
        raise DataError("image store not found", files.images)
    stamped = [users] + ([texts] if texts is not None else [])
    if images is not None:
        stamped.append(images / "data.mdb" if is_lmdb_dir(images) else images)
    return RawLayout("pmmrec", directory, name, tuple(stamped), images=images, users=users, texts=texts)


def detect_layout(directory: Path, name: str, files: LayoutFiles | None = None) -> RawLayout:
    """The raw layout of source `name` in `directory`; PmmcacheError saying what was looked for."""
    directory = Path(directory)
    files = files or LayoutFiles()
    pmmrec = _pmmrec_layout(directory, name, files)
    if pmmrec is not None:
        return pmmrec
    if files.given():
        raise DataError("--texts/--images name files of the PMMRec layout, which needs a users file too (--users)",
                        directory)
    inter, item = directory / f"{name}.inter", directory / f"{name}.item"
    if inter.is_file():
        return RawLayout("recbole", directory, name, (inter, item))
    for interactions_name, items_name in _PARQUET_PAIRS:
        tables = (directory / interactions_name.format(name=name), directory / items_name.format(name=name))
        if tables[0].is_file() and tables[1].is_file():
            stamped = tables + ((directory,) if _has_image_paths(tables[1]) else ())
            return RawLayout("parquet", directory, name, stamped, tables=tables)
    raise PmmcacheError(
        f"no dataset {name!r} found in {directory}; looked for: "
        f"PMMRec *_users.tsv (+ *_items_texts.tsv and/or *_items_images.lmdb, *_images/, *.lmdb, images/); "
        f"RecBole {name}.inter + {name}.item; "
        f"parquet {name}_interactions.parquet + {name}_items.parquet, or interactions.parquet + items.parquet"
    )


def _has_image_paths(items_table: Path) -> bool:
    """Whether a parquet items table names image files (a string image column): those files, under
    the table's folder, then decide a rebuild too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(items_table)
    except (OSError, pa.ArrowException):
        return False  # the reader reports an unreadable table
    return any(schema.field(n).type in (pa.string(), pa.large_string()) for n in schema.names
               if n in ("image", "image_bytes", "image_path"))


def demo_domains(data_dir: Path) -> list[dict[str, Any]]:
    """The domains of the generated demo, from `data_dir/demo/demo.json`: [{"name", "role", ...}]."""
    root = Path(data_dir) / DEMO
    manifest = root / "demo.json"
    if not manifest.is_file():
        raise PmmcacheError(f"{manifest} not found; resolve 'demo' once to generate it")
    try:
        domains = json.loads(manifest.read_text())["domains"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"cannot read the demo's domain list: {err}", manifest) from err
    return list(domains)


def _ensure_demo(data_dir: Path, cache_dir: Path) -> None:
    root = data_dir / DEMO
    if (root / "demo.json").is_file():
        return
    with _exclusive_lock(cache_dir / DEMO / ".generate.lock"):
        if (root / "demo.json").is_file():  # another process generated it while we waited
            return
        try:
            from pmmcache.data.demo import DemoConfig, generate_demo
        except ImportError as err:
            raise PmmcacheError(f"the demo generator pmmcache.data.demo cannot be imported: {err}") from err
        generate_demo(root, DemoConfig())


def _check_demo_domain(domain: str, domains: list[str]) -> None:
    if domain not in domains:
        raise PmmcacheError(f"the demo has no domain {domain!r}; domains: {', '.join(domains)}")


def _layouts(name: str, data_dir: Path, cache_dir: Path, config: PrepareConfig
             ) -> tuple[list[RawLayout], list[Path]]:
    """The raw layouts that make up `name`, and extra files (demo.json) to stamp; `config.users/texts/
    images` name the PMMRec files of a dataset folder (not of the special names)."""
    if LayoutFiles.of(config, data_dir).given() and (name == ML_100K or name == DEMO or name.startswith(DEMO + "/")):
        raise PmmcacheError(f"--users/--texts/--images name the files of a dataset folder; {name!r} has its own")
    if name == ML_100K:
        return [detect_layout(recbole_example_dir(ML_100K), ML_100K)], []
    if name == DEMO or name.startswith(DEMO + "/"):
        domain = name[len(DEMO) + 1 :] if name != DEMO else None
        root = data_dir / DEMO
        if domain is not None and not (root / "demo.json").is_file():  # a typo must not generate the demo first
            from pmmcache.data.demo import DemoConfig, domain_names

            _check_demo_domain(domain, domain_names(DemoConfig()))
        _ensure_demo(data_dir, cache_dir)
        domains = [d["name"] for d in demo_domains(data_dir)]
        if domain is not None:
            _check_demo_domain(domain, domains)
            domains = [domain]
        return [detect_layout(root / d, d) for d in domains], [root / "demo.json"]
    if not _NAME.match(name):
        raise PmmcacheError(
            f"dataset name {name!r} must be letters, digits, '_', '-', '.' (special: demo, demo/<domain>, ml-100k)"
        )
    directory = data_dir / name
    if not directory.is_dir():
        raise PmmcacheError(
            f"dataset folder {directory} does not exist; put the raw files there "
            f"(special names not read from it: {DEMO}, {DEMO}/<domain>, {ML_100K})"
        )
    return [detect_layout(directory, name, LayoutFiles.of(config, directory))], []


def _stamp(path: Path) -> list[Any] | None:
    """[size, mtime] of a file; of a folder, [file count, sha256 of every file's relative name, size
    and mtime] (a folder's own mtime misses a file overwritten in place)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    if not path.is_dir():
        return [stat.st_size, stat.st_mtime_ns]
    digest, count = hashlib.sha256(), 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            try:
                entry = os.stat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            digest.update(f"{os.path.relpath(os.path.join(root, name), path)}\t{entry.st_size}\t"
                          f"{entry.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            count += 1
    return [count, digest.hexdigest()]


def _raw_signature(layouts: list[RawLayout], extra: list[Path]) -> dict[str, Any]:
    """JSON-able record of what the raw inputs were; a changed record means rebuild."""
    files = [p for layout in layouts for p in layout.stamped] + extra
    return {
        "format": FORMAT_VERSION,
        "layouts": [
            {"kind": layout.kind, "name": layout.name, "directory": str(layout.directory.resolve())}
            for layout in layouts
        ],
        "files": {str(p.resolve()): _stamp(p) for p in files},
    }


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Held while one process builds or checks a prepared copy; a waiting process says who builds."""
    with exclusive_lock(path, f"the prepared dataset in {path.parent}", lock_timeout()):
        yield


def _load_if_fresh(directory: Path, signature: dict[str, Any], config: PrepareConfig) -> PreparedDataset | None:
    if not (directory / "dataset.json").is_file():
        return None
    try:
        manifest = read_manifest(directory)
        if manifest.get("config") != to_dict(config):
            return None
        if manifest.get("provenance", {}).get("raw_signature") != signature:
            return None
        return PreparedDataset.load(directory)
    except DataError:
        return None  # damaged or from another version: rebuild


def cached_dataset_dir(name: str, cache_dir: Path) -> Path:
    """Where the prepared copy of `name` lives: `cache_dir/<name>/dataset/`."""
    return Path(cache_dir) / name / "dataset"


def _resolve_one(name: str, data_dir: Path, cache_dir: Path, config: PrepareConfig) -> PreparedDataset:
    target = cached_dataset_dir(name, cache_dir)
    layouts, extra = _layouts(name, data_dir, cache_dir, config)
    with _exclusive_lock(target.parent / ".lock"):
        signature = _raw_signature(layouts, extra)  # stamped before reading: a change mid-read rebuilds next time
        cached = _load_if_fresh(target, signature, config)
        if cached is not None:
            return cached
        parts = [prepare(layout.read(), config) for layout in layouts]
        dataset = parts[0] if len(parts) == 1 else combine(parts, name)
        dataset.name = name
        dataset.provenance = {**dataset.provenance, "raw_signature": signature}
        dataset.save(target)
        return dataset


def resolve_dataset(
    spec: str, data_dir: Path, cache_dir: Path, config: PrepareConfig | None = None
) -> PreparedDataset:
    """The prepared dataset for `spec` (a name, or comma-separated names to combine); see module doc.

    A combined spec `a,b` is named `a+b`; its parts are cached separately and combined in memory.
    """
    config = config or PrepareConfig()
    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise PmmcacheError(f"empty dataset spec {spec!r}")
    if len(set(names)) != len(names):
        raise PmmcacheError(f"dataset spec {spec!r} names a dataset twice")
    if len(names) > 1 and LayoutFiles.of(config, data_dir).given():
        raise PmmcacheError(f"--users/--texts/--images name the files of one dataset; {spec!r} combines {len(names)}")
    parts = [_resolve_one(name, data_dir, cache_dir, config) for name in names]
    return parts[0] if len(parts) == 1 else combine(parts, "+".join(names))
