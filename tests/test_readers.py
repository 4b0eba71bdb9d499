"""Readers: PMMRec tsv, RecBole atomic files, parquet tables, and the image stores behind them."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io
import pickle

import lmdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pmmcache.data.images import FolderImageStore, LmdbImageStore, open_image_store
from pmmcache.data.readers import read_parquet, read_pmmrec, read_recbole, recbole_example_dir
from pmmcache.errors import DataError, PmmcacheError


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pmmrec(directory, name="shop", users=None, texts=None):
    directory.mkdir(parents=True, exist_ok=True)
    users = users if users is not None else "u1\ta b c\nu2\tc x b\n\nu3\ta\n"
    (directory / f"{name}_users.tsv").write_text(users)
    if texts is not None:
        (directory / f"{name}_items_texts.tsv").write_text(texts)
    return directory


# ---------------------------------------------------------------- PMMRec


def test_pmmrec_text_and_folder_images(tmp_path):
    write_pmmrec(tmp_path, texts="a\tRed mug\nb\t  \nc\tBlue plate\n")
    images = tmp_path / "shop_images"
    images.mkdir()
    (images / "a.jpg").write_bytes(png_bytes((255, 0, 0)))
    (images / "c.PNG").write_bytes(png_bytes((0, 0, 255)))
    (images / "notes.txt").write_text("not an image")

    raw = read_pmmrec(tmp_path, "shop")

    assert raw.items == {"a": "Red mug", "b": None, "c": "Blue plate"}  # blank text kept as None
    assert raw.image_keys == {"a": "a", "c": "c"}
    assert raw.image_store.spec() == {"kind": "folder", "path": str(images.resolve())}
    assert raw.image_store.get_bytes("c") == png_bytes((0, 0, 255))
    assert raw.image_store.get_bytes("b") is None
    # x is unknown: dropped from u2's sequence, counted with file and line
    assert raw.interactions == [
        ("u1", "a", None, 0), ("u1", "b", None, 1), ("u1", "c", None, 2),
        ("u2", "c", None, 3), ("u2", "b", None, 4), ("u3", "a", None, 5),
    ]
    [problem] = raw.problems
    assert (problem.kind, problem.line, problem.item) == ("unknown_item", 2, "x")
    assert problem.path.endswith("shop_users.tsv")


def test_a_byte_order_mark_does_not_become_part_of_the_first_key(tmp_path):
    write_pmmrec(tmp_path, users="\ufeffu1\ta b\nu2\tb a\n", texts="\ufeffa\tRed mug\nb\tBlue plate\n")
    raw = read_pmmrec(tmp_path, "shop")
    assert raw.items == {"a": "Red mug", "b": "Blue plate"}
    assert raw.interactions == [("u1", "a", None, 0), ("u1", "b", None, 1), ("u2", "b", None, 2), ("u2", "a", None, 3)]
    assert raw.problems == []


def test_pmmrec_text_only_and_image_only(tmp_path):
    text_only = read_pmmrec(write_pmmrec(tmp_path / "t", texts="a\tA\nb\tB\nc\tC\n"), "shop")
    assert text_only.image_store is None and text_only.image_keys == {}
    assert len(text_only.interactions) == 6

    directory = write_pmmrec(tmp_path / "i")
    (directory / "images").mkdir()
    for key in ("a", "b", "c"):
        (directory / "images" / f"{key}.webp").write_bytes(png_bytes((1, 2, 3)))
    image_only = read_pmmrec(directory, "shop")
    assert image_only.items == {"a": None, "b": None, "c": None}
    assert image_only.image_keys == {"a": "a", "b": "b", "c": "c"}

    with pytest.raises(DataError, match="no items"):
        read_pmmrec(write_pmmrec(tmp_path / "none"), "shop")


def make_lmdb(path, entries):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key.encode("utf-8"), value)
    env.close()


def test_pmmrec_lmdb_images_and_store_across_processes(tmp_path):
    directory = write_pmmrec(tmp_path, texts="a\tA\nb\tB\nc\tC\n")
    make_lmdb(directory / "shop.lmdb", {"a": png_bytes((9, 9, 9)), "c": png_bytes((7, 7, 7)), "zzz": b"x"})

    raw = read_pmmrec(directory, "shop")

    store = raw.image_store
    assert isinstance(store, LmdbImageStore)
    assert raw.image_keys == {"a": "a", "c": "c"}  # only catalogue items with an image
    assert store.get_bytes("a") == png_bytes((9, 9, 9))
    assert store.get_bytes("b") is None
    clone = pickle.loads(pickle.dumps(store))  # pickles as its spec, reopens lazily
    assert clone.get_bytes("c") == png_bytes((7, 7, 7))
    assert open_image_store(store.spec()).get_bytes("zzz") == b"x"

    # a forked child must open its own environment and still read the same bytes
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            ok = store.get_bytes("a") == png_bytes((9, 9, 9)) and clone.get_bytes("c") == png_bytes((7, 7, 7))
            os.write(write_end, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write_end)  # so that the read below ends (empty) if the child fails
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1"
    os.close(read_end)
    assert store.get_bytes("c") == png_bytes((7, 7, 7))  # the parent's handle still works
    store.close()
    clone.close()


def test_lmdb_pickled_values_are_refused(tmp_path):
    make_lmdb(tmp_path / "db", {"a": pickle.dumps({"pixels": b"..."})})
    with pytest.raises(DataError, match="pickle"):
        LmdbImageStore(tmp_path / "db").get_bytes("a")


def test_explicit_image_path_wins_over_discovery(tmp_path):
    directory = write_pmmrec(tmp_path, texts="a\tA\nb\tB\nc\tC\n")
    (directory / "shop_images").mkdir()
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "b.jpeg").write_bytes(b"jpeg")
    raw = read_pmmrec(directory, "shop", images=other)
    assert raw.image_keys == {"b": "b"}
    assert raw.image_store.get_bytes("b") == b"jpeg"


@pytest.mark.parametrize(
    "users, texts, file, line, message",
    [
        ("u1\ta b\nu2 a b\n", "a\tA\nb\tB\n", "shop_users.tsv", 2, "expected 2 tab-separated columns"),
        ("u1\ta b\n\nu1\tb\n", "a\tA\nb\tB\n", "shop_users.tsv", 3, "already listed on line 1"),
        ("u1\ta b\n", "a\tA\nb\tB\na\tagain\n", "shop_items_texts.tsv", 3, "duplicate item 'a'"),
        ("u1\ta b\n", "a\tA\nb\tB\textra\n", "shop_items_texts.tsv", 2, "found 3"),
        ("u1\ta b\n", "a\tA\nb\n", "shop_items_texts.tsv", 2, "found 1"),
    ],
)
def test_pmmrec_malformed_names_file_and_line(tmp_path, users, texts, file, line, message):
    write_pmmrec(tmp_path, users=users, texts=texts)
    with pytest.raises(DataError, match=message) as info:
        read_pmmrec(tmp_path, "shop")
    assert info.value.line == line
    assert str(info.value).startswith(f"{tmp_path / file}, line {line}: ")


def test_pmmrec_invalid_utf8_names_line(tmp_path):
    write_pmmrec(tmp_path, texts="a\tA\nb\tB\n")
    (tmp_path / "shop_items_texts.tsv").write_bytes(b"a\tA\nb\t\xff\xfe\n")
    with pytest.raises(DataError, match="line 2: not valid UTF-8"):
        read_pmmrec(tmp_path, "shop")


def test_folder_store_rejects_ambiguous_names_and_escapes(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"1")
    (tmp_path / "imgs" / "sub").mkdir()
    (tmp_path / "imgs" / "sub" / "deep.png").write_bytes(b"2")
    (tmp_path / "secret.png").write_bytes(b"3")
    store = FolderImageStore(tmp_path / "imgs")
    assert store.keys() == {"a"}
    assert store.get_bytes("sub/deep.png") == b"2"  # relative path inside the folder
    assert store.get_bytes("../secret.png") is None  # never outside it
    (tmp_path / "imgs" / "a.png").write_bytes(b"4")
    with pytest.raises(DataError, match="two images for item 'a'"):
        FolderImageStore(tmp_path / "imgs").keys()
    with pytest.raises(DataError, match="unknown image store kind"):
        open_image_store({"kind": "zip", "path": str(tmp_path)})


# ---------------------------------------------------------------- RecBole


def write_recbole(directory, inter, item, name="mini"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.inter").write_text(inter)
    (directory / f"{name}.item").write_text(item)
    return directory


ITEM_FILE = "genre:token_seq\titem_id:token\ttitle:token_seq\tyear:float\nA B\t1\tFirst\t1999\n\t2\tSecond\t\nC\t3\t\t\n"


def test_recbole_columns_by_name_and_text(tmp_path):
    inter = "timestamp:float\trating:float\titem_id:token\tuser_id:token\n30\t5\t1\tu\n10\t4\t9\tu\n20\t3\t2\tv\n"
    raw = read_recbole(write_recbole(tmp_path, inter, ITEM_FILE), "mini")
    assert raw.items == {"1": "A B, First, 1999", "2": "Second", "3": "C"}
    assert raw.interactions == [("u", "1", 30.0, 0), ("v", "2", 20.0, 1)]
    [problem] = raw.problems
    assert (problem.kind, problem.line, problem.item) == ("unknown_item", 3, "9")

    chosen = read_recbole(tmp_path, "mini", text_fields=["title"])
    assert chosen.items == {"1": "First", "2": "Second", "3": None}


@pytest.mark.parametrize(
    "inter, item, file, line, message",
    [
        ("user_id:token\titem_id:token\ttimestamp:float\nu\t1\t5\nu\t2\tsoon\n", ITEM_FILE, "mini.inter", 3, "timestamp 'soon' is not a number"),
        ("user_id:token\ttimestamp:float\nu\t5\n", ITEM_FILE, "mini.inter", 1, "missing column 'item_id'"),
        ("user_id:token\titem_id:token\nu\t1\nu\t2\textra\n", ITEM_FILE, "mini.inter", 3, "expected 2 tab-separated columns, found 3"),
        ("user_id:token\titem_id\nu\t1\n", ITEM_FILE, "mini.inter", 1, "is not 'name:type'"),
        ("user_id:token\titem_id:token\nu\t1\n", "item_id:token\ttitle:token_seq\n1\tA\n1\tB\n", "mini.item", 3, "duplicate item '1'"),
    ],
)
def test_recbole_malformed_names_file_and_line(tmp_path, inter, item, file, line, message):
    write_recbole(tmp_path, inter, item)
    with pytest.raises(DataError, match=message) as info:
        read_recbole(tmp_path, "mini")
    assert str(info.value).startswith(f"{tmp_path / file}, line {line}: ")


def test_recbole_ml100k_from_the_wheel():
    directory = recbole_example_dir("ml-100k")
    assert directory.parts[-2:] == ("dataset_example", "ml-100k")
    raw = read_recbole(directory, "ml-100k")
    assert len(raw.items) == 1682
    assert len(raw.interactions) == 100_000
    assert len({user for user, _, _, _ in raw.interactions}) == 943
    assert raw.items["1"] == "Toy Story, 1995, Animation Children's Comedy"
    assert raw.interactions[0] == ("196", "242", 881250949.0, 0)
    assert raw.problems == [] and raw.image_store is None


# ---------------------------------------------------------------- parquet


def test_parquet_with_image_bytes_and_int_ids(tmp_path):
    pq.write_table(pa.table({"user_id": [7, 7, 8, 8], "item_id": [1, 2, 1, 5], "timestamp": [3.0, 1.0, 2, 2]}), tmp_path / "inter.parquet")
    pq.write_table(
        pa.table({"item_id": [1, 2], "title": ["One", ""], "image": pa.array([b"img1", None], pa.binary())}),
        tmp_path / "items.parquet",
    )
    raw = read_parquet(tmp_path / "inter.parquet", tmp_path / "items.parquet", "pq")
    assert raw.items == {"1": "One", "2": None}
    assert raw.interactions == [("7", "1", 3.0, 0), ("7", "2", 1.0, 1), ("8", "1", 2.0, 2)]
    assert [(p.kind, p.line, p.item) for p in raw.problems] == [("unknown_item", 4, "5")]
    assert raw.image_keys == {"1": "1"}
    assert pickle.loads(pickle.dumps(raw.image_store)).get_bytes("1") == b"img1"
    assert raw.image_store.get_bytes("2") is None


def test_parquet_with_image_paths(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "one.png").write_bytes(b"p1")
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["a"]}), tmp_path / "inter.parquet")
    pq.write_table(
        pa.table({"item_id": ["a", "b"], "text": ["A", "B"], "image_path": ["pics/one.png", "pics/missing.png"]}),
        tmp_path / "items.parquet",
    )
    raw = read_parquet(tmp_path / "inter.parquet", tmp_path / "items.parquet", "pq")
    assert raw.image_keys == {"a": "pics/one.png"}
    assert raw.image_store.get_bytes("pics/one.png") == b"p1"
    assert [(p.kind, p.line, p.item) for p in raw.problems] == [("missing_image", 2, "b")]
    assert raw.interactions == [("u", "a", None, 0)]


def test_parquet_malformed(tmp_path):
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": ["a", "b", "a"], "text": ["A", "B", "C"]}), items)
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["a"]}), tmp_path / "inter.parquet")
    with pytest.raises(DataError, match="line 3: duplicate item 'a'"):
        read_parquet(tmp_path / "inter.parquet", items, "pq")

    pq.write_table(pa.table({"item_id": ["a"], "text": ["A"]}), items)
    pq.write_table(pa.table({"user_id": ["u", "u"], "item_id": ["a", "a"], "time": [1.0, None]}), tmp_path / "inter.parquet")
    with pytest.raises(DataError, match="inter.parquet, line 2: missing time"):
        read_parquet(tmp_path / "inter.parquet", items, "pq")
    with pytest.raises(DataError, match="missing text column 'caption'"):
        read_parquet(tmp_path / "inter.parquet", items, "pq", text_column="caption")


def test_missing_recbole_wheel_dataset_is_a_clear_error():
    with pytest.raises(PmmcacheError, match="dataset_example/no-such"):
        recbole_example_dir("no-such")
