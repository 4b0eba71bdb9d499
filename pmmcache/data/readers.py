"""Readers: raw dataset files -> `RawDataset` (items, optional image store, interactions).

Readers check the format and fail fast on malformed input with a `DataError` naming the file and
line. Softer problems (an item in a sequence that the items file lacks) are counted, recorded as a
`Problem`, and the interaction is dropped. Filtering and splitting happen later, in `prepare`.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pmmcache.data.images import (
    FolderImageStore,
    ImageStore,
    ParquetImageStore,
    open_image_path,
)
from pmmcache.data.lmdb_records import released_key
from pmmcache.errors import DataError, PmmcacheError


@dataclass(frozen=True)
class Problem:
    """A non-fatal defect found while reading; `kind` groups them in reports."""

    kind: str  # "unknown_item", "missing_image", "empty_sequence"
    message: str
    path: str
    line: int | None = None
    item: str | None = None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "message": self.message, "path": self.path, "line": self.line, "item": self.item
        }


@dataclass
class RawDataset:
    """One source as read from disk, before any filtering.

    `items` maps raw item id -> text (None when empty or absent), in file order.
    `image_keys` maps raw item id -> key in `image_store`, for items that have an image.
    `interactions` are (raw user id, raw item id, timestamp or None, row) in file order; `row`
    counts interactions from 0 and breaks timestamp ties. Timestamps are all None or all numbers.
    """

    source: str
    items: dict[str, str | None]
    image_store: ImageStore | None
    image_keys: dict[str, str]
    interactions: list[tuple[str, str, float | None, int]]
    problems: list[Problem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    reader: str = ""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline), skipping blank lines. A UTF-8 byte-order mark
    (as spreadsheet tools write) is dropped, so it never becomes part of the first key or header."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DataError(f"not valid UTF-8 ({err.reason})", path, number) from err
            if line.strip():
                yield number, line


def _text_or_none(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return text or None


def _attach_images(items: dict[str, str | None], store: ImageStore | None) -> dict[str, str]:
    """item -> its key in `store`: the item name itself, else the released code's key (`v12345` -> `12345`)."""
    if store is None:
        return {}
    available = store.keys()
    keys = {}
    for item in items:
        if item in available:
            keys[item] = item
        elif released_key(item) in available:
            keys[item] = released_key(item)
    return keys


# ---------------------------------------------------------------- PMMRec tsv layout


PMMREC_IMAGE_NAMES = ("{name}_items_images.lmdb", "{name}_images", "{name}.lmdb", "images")


def find_pmmrec_images(directory: Path, name: str) -> Path | None:
    """The first of `<name>_items_images.lmdb` (released), `<name>_images/`, `<name>.lmdb`, `images/` in `directory`."""
    for candidate in (directory / pattern.format(name=name) for pattern in PMMREC_IMAGE_NAMES):
        if candidate.is_dir() or (candidate.suffix == ".lmdb" and candidate.is_file()):
            return candidate
    return None


def read_pmmrec(directory: str | Path, name: str, images: str | Path | None = None,
                users: str | Path | None = None, texts: str | Path | None = None) -> RawDataset:
    """Read the released PMMRec layout from `directory`.

    Files: `users` (default `<name>_users.tsv`: `user \\t item item item ...`, oldest first, one line
    per user) and `texts` (default `<name>_items_texts.tsv`: `item \\t text`, exactly two
    tab-separated columns). Images: `images` when given (a folder of `<item>.<ext>` files, or an
    LMDB directory/file); otherwise the first that exists of `<name>_items_images.lmdb`,
    `<name>_images/`, `<name>.lmdb`, `images/` — each is read as an LMDB when it holds `data.mdb`,
    else as a folder. An item's image is under its name or, as the released code stores it, under
    its number (`v12345` -> `12345`). Without a texts file the catalogue is the set of image keys
    (image-only); without images the dataset is text-only.
    """
    directory = Path(directory)
    users_path = Path(users) if users is not None else directory / f"{name}_users.tsv"
    texts_path = Path(texts) if texts is not None else directory / f"{name}_items_texts.tsv"
    if not users_path.is_file():
        raise DataError(f"PMMRec users file {users_path.name} not found", directory)
    image_path = Path(images) if images is not None else find_pmmrec_images(directory, name)
    store = open_image_path(image_path) if image_path is not None else None
    files = [str(users_path.resolve())]

    if texts_path.is_file():
        items = read_pmmrec_texts(texts_path)
        if not items:
            raise DataError("lists no items (expected `item \\t text` per line)", texts_path)
        files.append(str(texts_path.resolve()))
    elif store is not None:
        items = {key: None for key in sorted(store.keys())}
    else:
        raise DataError(
            f"no items: neither {texts_path.name} nor an image store "
            f"({name}_images/, {name}.lmdb, images/) was found",
            directory,
        )
    if store is not None:
        files.append(str(Path(store.spec()["path"])))

    problems: list[Problem] = []
    interactions: list[tuple[str, str, float | None, int]] = []
    seen_users: dict[str, int] = {}
    for number, line in _lines(users_path):
        columns = line.split("\t")
        if len(columns) != 2:
            raise DataError(
                f"expected 2 tab-separated columns (user, items), found {len(columns)}", users_path, number
            )
        user = columns[0].strip()
        if not user:
            raise DataError("empty user id", users_path, number)
        if user in seen_users:
            raise DataError(f"user {user!r} already listed on line {seen_users[user]}", users_path, number)
        seen_users[user] = number
        sequence = columns[1].split()
        if not sequence:
            problems.append(Problem("empty_sequence", f"user {user!r} has no items", str(users_path), number))
        for item in sequence:
            if item not in items:
                message = f"item {item!r} is not in the items file"
                problems.append(Problem("unknown_item", message, str(users_path), number, item))
                continue
            interactions.append((user, item, None, len(interactions)))

    return RawDataset(
        source=name,
        items=items,
        image_store=store,
        image_keys=_attach_images(items, store),
        interactions=interactions,
        problems=problems,
        files=files,
        reader="pmmrec",
    )


def read_pmmrec_texts(path: Path) -> dict[str, str | None]:
    """An items file of the PMMRec layout (`item \\t text` per line): item id -> text (None when empty).
    A malformed line, an empty id or a duplicate item is a DataError naming the file and line."""
    items: dict[str, str | None] = {}
    first_line: dict[str, int] = {}
    for number, line in _lines(path):
        columns = line.split("\t")
        if len(columns) != 2:
            raise DataError(f"expected 2 tab-separated columns (item, text), found {len(columns)}", path, number)
        item = columns[0].strip()
        if not item:
            raise DataError("empty item id", path, number)
        if item in items:
            raise DataError(f"duplicate item {item!r} (first on line {first_line[item]})", path, number)
        items[item] = _text_or_none(columns[1])
        first_line[item] = number
    return items


# ---------------------------------------------------------------- RecBole atomic files


def _atomic_header(path: Path, line: str) -> list[str]:
    names = []
    for column in line.split("\t"):
        field_name, sep, field_type = column.strip().partition(":")
        if not sep or not field_name:
            raise DataError(f"header column {column!r} is not 'name:type'", path, 1)
        if field_type not in ("token", "token_seq", "float", "float_seq"):
            raise DataError(f"header column {column!r} has unknown type {field_type!r}", path, 1)
        names.append(field_name)
    return names


def _atomic_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    lines = _lines(path)
    first = next(lines, None)
    if first is None:
        raise DataError("empty file (expected a 'name:type' header)", path, 1)
    names = _atomic_header(path, first[1])

    def rows():
        for number, line in lines:
            values = line.split("\t")
            if len(values) != len(names):
                raise DataError(f"expected {len(names)} tab-separated columns, found {len(values)}", path, number)
            yield number, values

    return names, rows()


def _column(names: list[str], wanted: str, path: Path) -> int:
    if wanted not in names:
        raise DataError(f"missing column {wanted!r} in header (columns: {', '.join(names)})", path, 1)
    return names.index(wanted)


def recbole_example_dir(name: str = "ml-100k") -> Path:
    """`dataset_example/<name>` inside the installed recbole wheel, found without importing recbole."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise PmmcacheError(
            f"dataset {name!r} is read from the recbole wheel, which is not installed; "
            "run `pip install --no-deps recbole==1.2.1`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "dataset_example" / name
        if (candidate / f"{name}.inter").is_file():
            return candidate
    raise PmmcacheError(f"the recbole wheel has no dataset_example/{name}/{name}.inter")


def read_recbole(
    directory: str | Path,
    name: str,
    text_fields: list[str] | None = None,
    user_field: str = "user_id",
    item_field: str = "item_id",
    time_field: str = "timestamp",
) -> RawDataset:
    """Read RecBole atomic files `<name>.inter` and `<name>.item` (text only, no images).

    Columns are found by header name in any order. `.inter` needs `user_field` and `item_field`;
    `time_field` is used when present (every row must then hold a number); other columns such as
    rating are ignored (every row is an interaction). The item text is the values of
    `text_fields` (default: every `.item` column except the item id, in header order) joined by
    ", ", empty values skipped: ml-100k gives "Toy Story, 1995, Animation Children's Comedy".
    """
    directory = Path(directory)
    inter_path = directory / f"{name}.inter"
    item_path = directory / f"{name}.item"
    for path in (inter_path, item_path):
        if not path.is_file():
            raise DataError(f"RecBole atomic file {path.name} not found", directory)

    names, rows = _atomic_rows(item_path)
    id_col = _column(names, item_field, item_path)
    if text_fields is None:
        text_cols = [i for i, n in enumerate(names) if i != id_col]
    else:
        text_cols = [_column(names, n, item_path) for n in text_fields]
    items: dict[str, str | None] = {}
    first_line: dict[str, int] = {}
    for number, values in rows:
        item = values[id_col].strip()
        if not item:
            raise DataError("empty item id", item_path, number)
        if item in items:
            raise DataError(f"duplicate item {item!r} (first on line {first_line[item]})", item_path, number)
        parts = [values[i].strip() for i in text_cols]
        items[item] = _text_or_none(", ".join(p for p in parts if p))
        first_line[item] = number

    names, rows = _atomic_rows(inter_path)
    user_col = _column(names, user_field, inter_path)
    item_col = _column(names, item_field, inter_path)
    time_col = names.index(time_field) if time_field in names else None
    problems: list[Problem] = []
    interactions: list[tuple[str, str, float | None, int]] = []
    for number, values in rows:
        user, item = values[user_col].strip(), values[item_col].strip()
        if not user or not item:
            raise DataError("empty user or item id", inter_path, number)
        timestamp = None
        if time_col is not None:
            timestamp = _number(values[time_col], inter_path, number, time_field)
        if item not in items:
            message = f"item {item!r} is not in {item_path.name}"
            problems.append(Problem("unknown_item", message, str(inter_path), number, item))
            continue
        interactions.append((user, item, timestamp, len(interactions)))

    return RawDataset(
        source=name,
        items=items,
        image_store=None,
        image_keys={},
        interactions=interactions,
        problems=problems,
        files=[str(inter_path.resolve()), str(item_path.resolve())],
        reader="recbole",
    )


def _number(text: object, path: Path, line: int, column: str) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"{column} {text!r} is not a number", path, line) from None
    if not math.isfinite(value):
        raise DataError(f"{column} {text!r} is not a finite number", path, line)
    return value


# ---------------------------------------------------------------- parquet tables


def _pick(names: list[str], explicit: str | None, defaults: tuple[str, ...], path: Path, what: str) -> str | None:
    if explicit is not None:
        if explicit not in names:
            raise DataError(f"missing {what} column {explicit!r} (columns: {', '.join(names)})", path)
        return explicit
    return next((n for n in defaults if n in names), None)


def read_parquet(
    interactions_path: str | Path,
    items_path: str | Path,
    name: str,
    *,
    user_column: str = "user_id",
    item_column: str = "item_id",
    time_column: str | None = None,
    text_column: str | None = None,
    image_column: str | None = None,
    image_root: str | Path | None = None,
) -> RawDataset:
    """Read an interactions table and an items table from parquet files.

    Interactions: `user_column`, `item_column` and, optionally, a timestamp column (default: the
    first of `timestamp`, `time` present; numeric or an Arrow timestamp, no nulls); file order is
    the tie-break. Items: `item_column`, an optional text column (default `text` or `title`) and an
    optional image column (default `image`, `image_bytes` or `image_path`), which may hold either
    encoded image bytes (binary column; served from the table itself) or paths relative to
    `image_root` (string column; default: the items file's folder). Nulls mean "no text"/"no image".
    Ids of any type are turned into strings. In errors, "line N" is the 1-based table row.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    interactions_path, items_path = Path(interactions_path), Path(items_path)
    for path in (interactions_path, items_path):
        if not path.is_file():
            raise DataError("parquet file not found", path)
    try:
        items_table = pq.read_table(items_path)
        inter_table = pq.read_table(interactions_path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cannot read parquet: {err}", items_path.parent) from err

    item_names = items_table.column_names
    _pick(item_names, item_column, (), items_path, "item")
    text_name = _pick(item_names, text_column, ("text", "title"), items_path, "text")
    image_name = _pick(item_names, image_column, ("image", "image_bytes", "image_path"), items_path, "image")

    item_ids = _ids(items_table.column(item_column), items_path, "item")
    texts = items_table.column(text_name).to_pylist() if text_name else [None] * len(item_ids)
    items: dict[str, str | None] = {}
    for row, (item, text) in enumerate(zip(item_ids, texts), start=1):
        if item in items:
            raise DataError(f"duplicate item {item!r}", items_path, row)
        if text is not None and not isinstance(text, str):
            raise DataError(f"text column {text_name!r} holds {type(text).__name__}, not strings", items_path, row)
        items[item] = _text_or_none(text)

    problems: list[Problem] = []
    store: ImageStore | None = None
    image_keys: dict[str, str] = {}
    files = [str(interactions_path.resolve()), str(items_path.resolve())]
    if image_name is not None:
        image_type = items_table.schema.field(image_name).type
        if pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type):
            store = ParquetImageStore(items_path, item_column, image_name)
            valid = pc.is_valid(items_table.column(image_name)).to_pylist()
            image_keys = {item: item for item, ok in zip(item_ids, valid) if ok}
        elif pa.types.is_string(image_type) or pa.types.is_large_string(image_type):
            root = Path(image_root) if image_root is not None else items_path.parent
            folder = FolderImageStore(root)
            store = folder
            files.append(str(folder.path))
            paths = items_table.column(image_name).to_pylist()
            for row, (item, image) in enumerate(zip(item_ids, paths), start=1):
                if image is None:
                    continue
                key = _relative_image_key(Path(image), folder.path, items_path, row)
                if folder.has(key):
                    image_keys[item] = key
                else:
                    message = f"image file {image!r} not found"
                    problems.append(Problem("missing_image", message, str(items_path), row, item))
        else:
            raise DataError(f"image column {image_name!r} must hold bytes or paths, not {image_type}", items_path)

    inter_names = inter_table.column_names
    _pick(inter_names, user_column, (), interactions_path, "user")
    _pick(inter_names, item_column, (), interactions_path, "item")
    time_name = _pick(inter_names, time_column, ("timestamp", "time"), interactions_path, "timestamp")
    users = _ids(inter_table.column(user_column), interactions_path, "user")
    inter_items = _ids(inter_table.column(item_column), interactions_path, "item")
    times = _timestamps(inter_table.column(time_name), interactions_path, time_name) if time_name else None

    interactions: list[tuple[str, str, float | None, int]] = []
    for row, (user, item) in enumerate(zip(users, inter_items)):
        if item not in items:
            message = f"item {item!r} is not in {items_path.name}"
            problems.append(Problem("unknown_item", message, str(interactions_path), row + 1, item))
            continue
        interactions.append((user, item, times[row] if times is not None else None, len(interactions)))

    return RawDataset(
        source=name,
        items=items,
        image_store=store,
        image_keys=image_keys,
        interactions=interactions,
        problems=problems,
        files=files,
        reader="parquet",
    )


def _ids(column, path: Path, what: str) -> list[str]:
    values = column.to_pylist()
    for row, value in enumerate(values, start=1):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"empty {what} id", path, row)
    return [str(v).strip() if isinstance(v, str) else str(v) for v in values]


def _timestamps(column, path: Path, name: str) -> list[float]:
    import pyarrow as pa

    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        column = column.cast(pa.timestamp("us")).cast(pa.int64())
        values = [None if v is None else v / 1e6 for v in column.to_pylist()]
    else:
        values = column.to_pylist()
    result = []
    for row, value in enumerate(values, start=1):
        if value is None:
            raise DataError(f"missing {name}", path, row)
        result.append(_number(value, path, row, name))
    return result


def _relative_image_key(image: Path, root: Path, items_path: Path, row: int) -> str:
    if image.is_absolute():
        resolved = image.resolve()
        if not resolved.is_relative_to(root):
            raise DataError(f"image path {str(image)!r} is outside the image root {root}", items_path, row)
        image = resolved.relative_to(root)
    return image.as_posix()
