"""Stage 1 (`pmmcache extract`): the cache holds exactly the lower-block states, resumes, refuses stale
settings, reports bad items, handles one-modality data, runs under `accelerate launch`, and the CLI
fails fast on a missing model."""
from __future__ import annotations

import dataclasses

import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import pmmcache
from pmmcache import cache as cache_io
from pmmcache.config import from_dict
from pmmcache.data.registry import resolve_dataset
from pmmcache.encoders import TextEncoder, TextEncoderSpec, VisionEncoder, VisionEncoderSpec
from pmmcache.encoders.config import EncoderConfig, encoder_specs
from pmmcache.errors import CacheMismatchError, ConfigError, DataError, PmmcacheError
from pmmcache.extract import ExtractConfig, run
from pmmcache.items import find_cache

from helpers.extraction import rewrite_line, write_spy_module
from helpers.tiny_models import save_tiny_bert, save_tiny_hf_clip_vision

REPO = Path(__file__).resolve().parents[1]
NAME = "toy"
NUM_ITEMS = 40
NUM_USERS = 40
MAX_LEN = 16  # text tokens per item
IMAGE_SIZE = 64  # tiny ViT, patch 32: 4 patches + CLS
K = 2  # top blocks of the 4-block tiny encoders
WORDS = "red blue green big small new old best".split()
THINGS = "cat dog movie song game film story video".split()


# ------------------------------------------------------------------------------- dataset and encoders


def title(i: int) -> str:
    return f"the {WORDS[i % 8]} {THINGS[(i // 8) % 8]} {i}"


def sequence(user: int) -> list[str]:
    """8 distinct items per user; every item occurs 8 times overall, so the default 5-core keeps all."""
    return [f"i{(user + 5 * j) % NUM_ITEMS}" for j in range(8)]


def write_image(path: Path, i: int) -> None:
    colour = (i * 6 % 256, (100 + 37 * i) % 256, (200 - 4 * i) % 256)
    image = Image.new("RGB", (40 + i % 3 * 8, 30 + i % 2 * 20), colour)
    image.paste((255 - colour[0], 40, 90), (5, 5, 20, 15))  # some structure, so patches differ
    image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)


def make_toy(data_dir: Path, *, texts: bool = True, images: bool = True) -> Path:
    """The PMMRec layout in `data_dir/toy/`: users tsv, items tsv, one image file per item (png/jpg)."""
    root = data_dir / NAME
    root.mkdir(parents=True)
    with open(root / f"{NAME}_users.tsv", "w") as f:
        for user in range(NUM_USERS):
            f.write(f"u{user}\t{' '.join(sequence(user))}\n")
    if texts:
        with open(root / f"{NAME}_items_texts.tsv", "w") as f:
            for i in range(NUM_ITEMS):
                f.write(f"i{i}\t{title(i)}\n")
    if images:
        (root / f"{NAME}_images").mkdir()
        for i in range(NUM_ITEMS):
            write_image(image_path(data_dir, i), i)
    return root


def image_path(data_dir: Path, i: int) -> Path:
    return data_dir / NAME / f"{NAME}_images" / f"i{i}.{'jpg' if i % 2 else 'png'}"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("models") / "bert")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """A read-only shared data dir; tests that change data copy it first."""
    data_dir = tmp_path_factory.mktemp("data")
    make_toy(data_dir)
    return data_dir


def toy_config(data_dir: Path, cache_dir: Path, bert_dir: Path, **overrides) -> ExtractConfig:
    encoders = EncoderConfig(text_encoder=str(bert_dir), vision_encoder="pmmcache-tiny-vit", vision_weights="random",
                             top_blocks=K, max_text_length=MAX_LEN, image_size=IMAGE_SIZE)
    settings = dict(dataset=NAME, data_dir=data_dir, cache_dir=cache_dir, encoders=encoders, batch_size=8,
                    num_workers=0, device="cpu")
    settings.update(overrides)
    return ExtractConfig(**settings)


def cli_args(data_dir: Path, cache_dir: Path, bert_dir: Path, batch_size: int = 8) -> list[str]:
    return ["extract", "--dataset", NAME, "--data-dir", str(data_dir), "--cache-dir", str(cache_dir),
            "--text-encoder", str(bert_dir), "--vision-encoder", "pmmcache-tiny-vit", "--vision-weights", "random",
            "-k", str(K), "--max-text-length", str(MAX_LEN), "--image-size", str(IMAGE_SIZE),
            "--batch-size", str(batch_size), "--num-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def baseline(toy_data, bert_dir, tmp_path_factory):
    """One uninterrupted extraction of the clean toy data (with DataLoader worker processes)."""
    cache_dir = tmp_path_factory.mktemp("baseline-cache")
    return run(toy_config(toy_data, cache_dir, bert_dir, num_workers=2), show_progress=False)


def all_rows(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        names = [n for n in ("text/states", "text/mask", "image/states", "modality", "flags", "done") if n in f]
        return {name: f[name][:] for name in names}


def assert_same_states(path: Path, reference: Path, atol: float = 1e-3) -> None:
    """Same keys and per-row arrays (states up to fp16 rounding of differently batched float32 compute)."""
    assert cache_io.read_keys(path) == cache_io.read_keys(reference)
    got, want = all_rows(path), all_rows(reference)
    assert got.keys() == want.keys()
    for name in got:
        if name.endswith("states"):
            np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), atol=atol, rtol=1e-3)
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------- 1. round trip


def test_cache_holds_the_lower_block_states_of_every_item_in_dataset_order(baseline, toy_data, bert_dir):
    assert baseline.items == NUM_ITEMS and not baseline.already_complete and baseline.problems == {}
    reader = cache_io.CacheReader(baseline.path, storage="memmap")
    assert reader.num_rows == NUM_ITEMS + 1 and reader.has_text and reader.has_image
    keys = [f"{NAME}/i{i}" for i in range(NUM_ITEMS)]  # items-file order
    assert cache_io.read_keys(baseline.path) == [""] + keys

    text = TextEncoder.load(TextEncoderSpec(name=str(bert_dir), top_blocks=K, max_length=MAX_LEN)).eval()
    vision = VisionEncoder.load(VisionEncoderSpec(name="pmmcache-tiny-vit", weights="random", top_blocks=K,
                                                  image_size=IMAGE_SIZE, seed=0)).eval()
    tokens = text.tokenize([title(i) for i in range(NUM_ITEMS)])
    images = [Image.open(image_path(toy_data, i)).convert("RGB") for i in range(NUM_ITEMS)]
    with torch.no_grad():
        text_states = text.lower(tokens["input_ids"], tokens["attention_mask"])  # (N, L, d)
        image_states = vision.lower(vision.preprocess(images))  # (N, P, d)

    rows = torch.arange(1, NUM_ITEMS + 1).flip(0)  # any order: the reader returns rows as asked
    cached = reader.get(rows)
    order = rows - 1
    assert cached.text.dtype == torch.float16 and cached.text.shape == (NUM_ITEMS, MAX_LEN, 32)
    assert cached.image.shape == (NUM_ITEMS, vision.num_tokens, 64) and vision.num_tokens == 5
    torch.testing.assert_close(cached.text.float(), text_states[order], atol=1e-3, rtol=2e-3)
    torch.testing.assert_close(cached.image.float(), image_states[order], atol=1e-3, rtol=2e-3)
    assert torch.equal(cached.text_mask, tokens["attention_mask"][order].bool())
    assert cached.modality.all()
    assert float(cached.text.float().abs().mean()) > 0.1  # real states, not zeros

    padding = reader.get(torch.tensor([0]))
    assert not padding.text.any() and not padding.image.any() and not padding.text_mask.any()
    assert not padding.modality.any()
    with h5py.File(baseline.path, "r") as f:
        assert not f["flags"][:].any() and f["done"][:].all() and f["complete"][0] == 1

    manifest = reader.manifest
    assert manifest["format_version"] == cache_io.FORMAT_VERSION
    assert manifest["storage_dtype"] == "float16" and manifest["compute_dtype"] == "float32"
    dataset = resolve_dataset(NAME, toy_data, baseline.path.parent.parent)
    assert manifest["dataset"] == {"name": NAME, "fingerprint": dataset.fingerprint, "num_items": NUM_ITEMS}
    assert manifest["text"]["spec"] == {"name": str(bert_dir), "top_blocks": K, "max_length": MAX_LEN}
    assert manifest["text"]["lower_fingerprint"] == text.lower_fingerprint()
    assert manifest["text"]["split_block"] == 4 - K and manifest["text"]["model_type"] == "bert"
    assert manifest["image"]["spec"]["name"] == "pmmcache-tiny-vit" and manifest["image"]["spec"]["weights"] == "random"
    assert manifest["image"]["lower_fingerprint"] == vision.lower_fingerprint()
    assert manifest["image"]["split_block"] == 4 - K and manifest["image"]["num_tokens"] == 5
    assert manifest["image"]["preprocessing"] == vision.preprocessing_description()
    assert manifest["image"]["preprocessing"]["size"] == IMAGE_SIZE
    assert manifest["extract"]["encoders"]["max_text_length"] == MAX_LEN
    # The pmmcache that made it: the installed distribution's version, which is pyproject.toml's.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert manifest["created_by"]["pmmcache"] == pmmcache.__version__ == importlib.metadata.version("pmmcache") \
        == pyproject
    report = json.loads(baseline.path.with_suffix(".report.json").read_text())
    assert report["items"] == NUM_ITEMS and report["item_problems"] == {}


# ------------------------------------------------------------------------------- 2. rerun


def test_rerun_of_a_complete_cache_does_nothing(baseline, toy_data, bert_dir):
    before = file_digest(baseline.path)
    mtime = baseline.path.stat().st_mtime_ns  # any write through the memory map would move it
    result = run(toy_config(toy_data, baseline.path.parent.parent, bert_dir), show_progress=False)
    assert result.already_complete and result.items == 0 and result.path == baseline.path
    assert file_digest(baseline.path) == before and baseline.path.stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------- 3. resume


SLOW_CHILD = """
import sys, time
import pmmcache.cache as cache_io

original = cache_io.CacheWriter.write
calls = []

def slow_write(self, rows, arrays):
    original(self, rows, arrays)
    calls.append(len(rows))
    # After the second batch, wait to be interrupted: however loaded the machine, the signal then always
    # arrives mid-extraction (a fixed short pause let a slow poller see the rows only once it had finished).
    time.sleep(60 if len(calls) == 2 else 0.05)

cache_io.CacheWriter.write = slow_write
from pmmcache.cli import main
main(sys.argv[1:])
"""


def done_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    writer = cache_io.CacheWriter(path)
    try:
        return int(len(writer.maps["done"]) - len(writer.pending_rows()))
    finally:
        writer.close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_extraction_resumes_without_redoing_rows(sig, baseline, toy_data, bert_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    path = cache_dir / NAME / baseline.path.name
    child = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, *cli_args(toy_data, cache_dir, bert_dir, batch_size=4)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 60
    try:
        while done_rows(path) < 8:  # two batches of 4 written; 41 rows need 11
            assert child.poll() is None, f"extraction ended before it was interrupted:\n{child.communicate()[1]}"
            assert time.monotonic() < deadline, "extraction did not start writing within 60 s"
            time.sleep(0.02)
        child.send_signal(sig)
        _, stderr = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if sig == signal.SIGINT:
        assert child.returncode == 130 and "rerun the same command to resume" in stderr, stderr[-3000:]
    else:
        assert child.returncode == -signal.SIGKILL

    assert not cache_io.is_complete(path)
    with pytest.raises(PmmcacheError, match="incomplete"):
        cache_io.CacheReader(path)
    writer = cache_io.CacheWriter(path)
    pending = writer.pending_rows()
    writer.close()
    assert 0 < len(pending) <= NUM_ITEMS + 1 - 8

    result = run(toy_config(toy_data, cache_dir, bert_dir), show_progress=False)
    assert result.path == path and not result.already_complete
    assert result.items == int((pending > 0).sum())  # nothing that was done is encoded again
    assert cache_io.CacheReader(path).num_rows == NUM_ITEMS + 1
    assert_same_states(path, baseline.path)


# ------------------------------------------------------------------------------- 4. mismatch


def test_changed_title_is_re_encoded_alone_and_other_weights_are_refused_until_forced(
        baseline, toy_data, bert_dir, tmp_path):
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(toy_data, data_dir)
    model_dir = shutil.copytree(bert_dir, tmp_path / "bert")
    first = run(toy_config(data_dir, cache_dir, model_dir), show_progress=False)
    assert_same_states(first.path, baseline.path)

    rewrite_line(data_dir / NAME / f"{NAME}_items_texts.tsv", 4, "i3\tthe old cat story, edited")
    refreshed = run(toy_config(data_dir, cache_dir, model_dir), show_progress=False)
    assert refreshed.path == first.path and refreshed.items == 1  # only item i3: row 4 changes, below
    rebuilt = run(toy_config(data_dir, tmp_path / "fresh", model_dir), show_progress=False)
    assert_same_states(refreshed.path, rebuilt.path)  # as if extracted from scratch
    old = cache_io.CacheReader(baseline.path).get(torch.arange(NUM_ITEMS + 1))
    new = cache_io.CacheReader(refreshed.path).get(torch.arange(NUM_ITEMS + 1))
    changed = (new.text.float() - old.text.float()).abs().amax(dim=(1, 2)) > 1e-2  # (N+1,)
    assert changed.nonzero().flatten().tolist() == [4]
    torch.testing.assert_close(new.image, old.image, atol=1e-3, rtol=1e-3)

    save_tiny_bert(model_dir, seed=1)  # other weights at the same path
    with pytest.raises(CacheMismatchError, match="--force") as err:
        run(toy_config(data_dir, cache_dir, model_dir), show_progress=False)
    assert "text.lower_fingerprint" in str(err.value) and "dataset.fingerprint" not in str(err.value)
    forced = run(toy_config(data_dir, cache_dir, model_dir, force=True), show_progress=False)
    assert forced.items == NUM_ITEMS
    other = cache_io.CacheReader(forced.path).get(torch.arange(1, NUM_ITEMS + 1))
    assert (other.text.float() - new.text[1:].float()).abs().max() > 0.1


def test_an_encoder_setting_at_its_old_place_names_where_it_is_now(toy_data, tmp_path):
    from click.testing import CliRunner

    from pmmcache.cli import main

    with pytest.raises(ConfigError, match=r"setting top_blocks is now encoders.top_blocks \(ExtractConfig\)"):
        from_dict(ExtractConfig, {"dataset": NAME, "top_blocks": 1})
    result = CliRunner().invoke(main, ["extract", "--data-dir", str(toy_data), "--cache-dir", str(tmp_path),
                                       "--set", "modalities=[text]"])
    assert result.exit_code == 2 and "setting modalities is now encoders.modalities" in result.stderr


def test_reader_refuses_a_differing_expected_manifest(baseline):
    fingerprint = cache_io.read_manifest(baseline.path)["dataset"]["fingerprint"]
    cache_io.CacheReader(baseline.path, expected={"dataset": {"fingerprint": fingerprint},
                                                 "text": {"spec": {"max_length": MAX_LEN}}})
    with pytest.raises(CacheMismatchError, match=r"text\.spec\.max_length"):
        cache_io.CacheReader(baseline.path, expected={"text": {"spec": {"max_length": MAX_LEN + 1}}})
    with pytest.raises(CacheMismatchError, match=r"dataset\.fingerprint"):
        cache_io.CacheReader(baseline.path, expected={"dataset": {"fingerprint": "0" * 64}})


# ------------------------------------------------------------------------------- 5. bad items


def test_bad_items_are_flagged_reported_and_the_run_completes(toy_data, bert_dir, tmp_path, capsys):
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(toy_data, data_dir)
    root = data_dir / NAME
    image_path(data_dir, 2).unlink()  # i2: missing image
    image_path(data_dir, 3).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")  # i3: unreadable image
    texts = root / f"{NAME}_items_texts.tsv"
    rewrite_line(texts, 5, "i4\t   ")  # i4: empty text
    long_title = " ".join(["the best old movie about love and war"] * 4)  # > MAX_LEN tokens
    rewrite_line(texts, 6, f"i5\t{long_title}")  # i5: over-long text
    rewrite_line(root / f"{NAME}_users.tsv", 1, f"u0\t{' '.join(sequence(0))} ghost")  # unknown item

    result = run(toy_config(data_dir, cache_dir, bert_dir), show_progress=False)
    assert result.items == NUM_ITEMS
    assert result.problems == {"missing image": 1, "unreadable image": 1, "empty text": 1,
                               "over-long text (truncated)": 1}
    assert "warning: 1 item(s) with unreadable image: toy/i3" in capsys.readouterr().out

    report = json.loads(result.path.with_suffix(".report.json").read_text())
    assert report["item_problems"] == {"missing image": ["toy/i2"], "unreadable image": ["toy/i3"],
                                       "empty text": ["toy/i4"], "over-long text (truncated)": ["toy/i5"]}
    problems = report["dataset_report"]["sources"][NAME]["problems"]
    assert problems["counts"] == {"unknown_item": 1} and problems["examples"][0]["item"] == "ghost"
    assert problems["examples"][0]["line"] == 1

    reader = cache_io.CacheReader(result.path)
    states = reader.get(torch.arange(NUM_ITEMS + 1))
    expected_modality = np.ones((NUM_ITEMS + 1, 2), dtype=bool)
    expected_modality[0] = False
    expected_modality[3, 1] = expected_modality[4, 1] = False  # rows = item + 1
    expected_modality[5, 0] = False
    np.testing.assert_array_equal(states.modality.numpy(), expected_modality)
    with h5py.File(result.path, "r") as f:
        flags = f["flags"][:]
    expected_flags = np.zeros(NUM_ITEMS + 1, np.uint8)
    expected_flags[3] = cache_io.FLAG_IMAGE_MISSING
    expected_flags[4] = cache_io.FLAG_IMAGE_UNREADABLE
    expected_flags[5] = cache_io.FLAG_TEXT_EMPTY
    expected_flags[6] = cache_io.FLAG_TEXT_TRUNCATED
    np.testing.assert_array_equal(flags, expected_flags)
    assert states.text_mask[6].all()  # truncated text fills the whole budget and stays usable


@pytest.mark.parametrize("which", ["users", "items_texts"])
def test_malformed_file_fails_fast_naming_file_and_line_and_leaves_the_cache(which, toy_data, bert_dir, tmp_path):
    data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(toy_data, data_dir)
    first = run(toy_config(data_dir, cache_dir, bert_dir), show_progress=False)
    digest = file_digest(first.path)

    bad = data_dir / NAME / f"{NAME}_{which}.tsv"
    rewrite_line(bad, 7, "x7\tone\tcolumn too many")
    with pytest.raises(DataError, match="line 7: expected 2 tab-separated columns") as err:
        run(toy_config(data_dir, cache_dir, bert_dir, force=True), show_progress=False)
    assert err.value.path == bad and err.value.line == 7 and bad.name in str(err.value)
    assert file_digest(first.path) == digest
    assert cache_io.CacheReader(first.path).num_rows == NUM_ITEMS + 1


# ------------------------------------------------------------------------------- 6. one modality


def test_text_only_dataset_has_no_image_states(bert_dir, tmp_path):
    make_toy(tmp_path / "data", images=False)
    result = run(toy_config(tmp_path / "data", tmp_path / "cache", bert_dir), show_progress=False)
    assert result.items == NUM_ITEMS and result.path.name.startswith("text-") and "image" not in result.path.name
    reader = cache_io.CacheReader(result.path)
    assert reader.has_text and not reader.has_image and reader.manifest["image"] is None
    states = reader.get(torch.tensor([1, 2]))
    assert states.image is None and states.modality[:, 0].all() and not states.modality[:, 1].any()


def test_image_only_dataset_has_no_text_states(tmp_path):
    make_toy(tmp_path / "data", texts=False)
    clip_dir = save_tiny_hf_clip_vision(tmp_path / "clip", image_size=IMAGE_SIZE)  # its own weights ("openai")
    config = ExtractConfig(dataset=NAME, data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                           encoders=EncoderConfig(vision_encoder=str(clip_dir), image_size=IMAGE_SIZE), batch_size=16,
                           num_workers=0, device="cpu")
    result = run(config, show_progress=False)
    assert result.items == NUM_ITEMS and not result.path.name.startswith("text")
    reader = cache_io.CacheReader(result.path)
    assert reader.has_image and not reader.has_text and reader.manifest["text"] is None
    assert reader.manifest["image"]["library"] == "transformers" and reader.manifest["image"]["pretrained"]
    states = reader.get(torch.arange(1, NUM_ITEMS + 1))
    assert states.text is None and states.text_mask is None
    assert states.image.shape == (NUM_ITEMS, 17, 32)  # 16 patches + CLS
    assert states.modality[:, 1].all() and not states.modality[:, 0].any()
    # image-only catalogues are ordered by image key: i0, i1, i10, i11, ...
    assert cache_io.read_keys(result.path)[1:] == sorted(f"{NAME}/i{i}" for i in range(NUM_ITEMS))


# ------------------------------------------------------------------------------- 7. several processes


SPY_MODULE = write_spy_module("""
original_pending = cache_io.pending_rows

def late_pending_rows(maps):
    if os.environ["RANK"] == "1":  # the other process may already be writing: the split must not change
        time.sleep(1.0)
    return original_pending(maps)

cache_io.pending_rows = late_pending_rows
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="`accelerate launch --multi_gpu --num_processes 2` on a one-GPU machine; runs on CPU")
def test_two_processes_under_accelerate_launch_write_one_cache(baseline, toy_data, bert_dir, tmp_path):
    spy_dir, logs, cache_dir = tmp_path / "spy", tmp_path / "logs", tmp_path / "cache"
    spy_dir.mkdir()
    logs.mkdir()
    (spy_dir / "spy_extract.py").write_text(SPY_MODULE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SPY_LOG_DIR": str(logs), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(spy_dir), str(REPO), os.environ.get("PYTHONPATH", "")])}
    # accelerate 1.15: `--cpu --num_processes 2` starts ONE process unless MPI is set up; `--multi_gpu` starts
    # two through torchrun, and `--device cpu` makes them form a gloo group (no GPU needed).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "spy_extract",
               *cli_args(toy_data, cache_dir, bert_dir, batch_size=4)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"extracted {NUM_ITEMS} items" in done.stdout

    path = cache_dir / NAME / baseline.path.name
    assert cache_io.is_complete(path)
    assert_same_states(path, baseline.path)
    by_rank = {log.name: [int(r) for r in log.read_text().split()] for log in logs.iterdir()}
    assert sorted(by_rank) == ["rank0.txt", "rank1.txt"] and all(by_rank.values())
    rows = by_rank["rank0.txt"] + by_rank["rank1.txt"]
    assert sorted(rows) == list(range(NUM_ITEMS + 1))  # each row written once, by one process
    assert sorted(p.name for p in path.parent.iterdir() if p.suffix == ".h5") == [path.name]  # no temp files left


# ------------------------------------------------------------------------------- 8. CLI


def test_cli_help_explains_the_options():
    done = subprocess.run([sys.executable, "-m", "pmmcache", "extract", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    for option in ("--dataset", "--text-encoder", "--vision-encoder", "--vision-weights", "--top-blocks",
                   "--max-text-length", "--image-size", "--batch-size", "--force", "accelerate launch", "Resumable"):
        assert option in done.stdout, option


NO_NETWORK_CHILD = """
import os, socket, sys

def no_network(host, *args, **kwargs):
    with open(os.environ["NETWORK_LOG"], "a") as log:
        log.write(f"{host}\\n")
    raise OSError("network disabled in this test")

socket.getaddrinfo = no_network
from pmmcache.cli import main
main(sys.argv[1:])
"""


def test_cli_default_text_model_missing_offline_fails_fast_naming_the_option(toy_data, tmp_path):
    """`--dataset toy` defaults to xlm-roberta-base, which is not in the HF cache: a clear error, and no
    host looked up (hub retries, ~46 s, look one up before each try)."""
    args = ["extract", "--dataset", NAME, "--data-dir", str(toy_data), "--cache-dir", str(tmp_path / "cache"),
            "--vision-weights", "random"]
    log = tmp_path / "hosts.txt"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # the CLI must go offline by itself
    done = subprocess.run([sys.executable, "-c", NO_NETWORK_CHILD, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**env, "NETWORK_LOG": str(log)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert "'xlm-roberta-base' is not available offline" in done.stderr and "--text-encoder PATH" in done.stderr
    assert not log.exists(), f"hosts looked up: {log.read_text()}"
    assert not list((tmp_path / "cache").glob(f"{NAME}/*.h5"))


def test_cli_absent_text_model_dir_is_a_one_line_error(toy_data, tmp_path):
    from click.testing import CliRunner

    from pmmcache.cli import main

    absent = tmp_path / "no-such-model"
    result = CliRunner().invoke(main, ["extract", "--dataset", NAME, "--data-dir", str(toy_data), "--cache-dir",
                                       str(tmp_path / "cache"), "--text-encoder", str(absent)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: text encoder dir {absent} does not exist; "
                                     "pass --text-encoder PATH to a transformers model dir")


def test_reduced_precision_extraction_still_matches_the_fp32_encoders_stage_2_loads(toy_data, bert_dir, tmp_path):
    """Found on a GPU: a bf16 extraction fingerprinted the bf16-cast weights, so stage 2 (which loads the
    encoders in fp32) refused its own cache. The manifest must describe the weights as loaded."""
    from pmmcache.items import expected_manifest

    config = toy_config(toy_data, tmp_path / "cache", bert_dir, dtype="bfloat16")
    result = run(config, show_progress=False)
    text_spec, vision_spec = encoder_specs(config.encoders, config.dataset)
    expected = expected_manifest(TextEncoder.load(text_spec), VisionEncoder.load(vision_spec))
    manifest = cache_io.check_manifest(result.path, expected)  # raises on a mismatch
    assert manifest["compute_dtype"] == "bfloat16" and manifest["text"]["dtype"] == "float32"


# ------------------------------------------------------------------------------- int8 cache


def test_int8_cache_is_half_the_size_reads_as_the_float16_one_and_resumes(baseline, toy_data, bert_dir, tmp_path):
    config = toy_config(toy_data, tmp_path / "cache", bert_dir, cache_dtype="int8")
    result = run(config, show_progress=False)
    assert result.path.name == baseline.path.stem + "+int8.h5"  # beside the float16 cache of the same encoders
    with h5py.File(result.path, "r") as f:
        assert f["text/states"].dtype == np.int8 and f["image/states"].dtype == np.int8
        assert f["text/scale"].shape == f["text/mask"].shape and f["image/scale"].dtype == np.float16
    states_bytes = {path: sum(mm.nbytes for name, mm in cache_io.CacheReader(path)._maps.items()
                              if name.endswith(("states", "scale"))) for path in (result.path, baseline.path)}
    assert states_bytes[result.path] < 0.6 * states_bytes[baseline.path]  # int8 + one scale per 32..64 values

    int8, fp16 = cache_io.CacheReader(result.path), cache_io.CacheReader(baseline.path)
    assert (int8.states_dtype, fp16.states_dtype) == ("int8", "float16")
    assert int8.manifest["storage_dtype"] == "int8"
    rows = torch.arange(NUM_ITEMS + 1)
    got, want = int8.get(rows), fp16.get(rows)
    assert got.text.dtype == torch.float16 and got.text.shape == want.text.shape
    for a, b in ((got.text, want.text), (got.image, want.image)):  # error <= half a step of each token's scale
        step = b.float().abs().amax(-1, keepdim=True) / 127
        assert ((a.float() - b.float()).abs() <= 0.55 * step + 1e-3 * b.float().abs() + 1e-3).all()
    assert torch.equal(got.text_mask, want.text_mask) and torch.equal(got.modality, want.modality)
    # Stage 2 compares the encoders only: a model of the float16 cache's encoders reads the int8 cache.
    cache_io.check_manifest(result.path, {name: fp16.manifest[name] for name in ("text", "image")})
    # Stage 2 finds the int8 cache when it is the only one of these encoders.
    text, vision = encoder_specs(config.encoders, config.dataset)
    encoders = (TextEncoder.load(text), VisionEncoder.load(vision))
    assert find_cache(tmp_path / "cache", NAME, *encoders) == result.path
    # The float16 cache of the same encoders is another file: extracting it leaves the int8 one alone.
    int8_bytes = file_digest(result.path)
    fp16_result = run(toy_config(toy_data, tmp_path / "cache", bert_dir), show_progress=False)
    assert fp16_result.path.name == baseline.path.name and not fp16_result.already_complete
    assert file_digest(result.path) == int8_bytes and cache_io.is_complete(result.path)
    assert find_cache(tmp_path / "cache", NAME, *encoders) == fp16_result.path  # the named one first

    # Resume: forget the last rows and completeness; a rerun encodes only those rows, to the same values.
    before = all_rows(result.path)
    writer = cache_io.CacheWriter(result.path)
    writer.maps["done"][-7:] = 0
    writer.maps["complete"][0] = 0
    writer.close()
    resumed = run(config, show_progress=False)
    assert resumed.items == 7 and not resumed.already_complete  # only the forgotten rows were encoded
    after = all_rows(result.path)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert cache_io.is_complete(result.path)


def test_a_vision_seed_other_than_0_gets_its_own_cache_file(baseline, toy_data, bert_dir, tmp_path):
    """Seeds 0 and 1 of a random vision init give other states: two files, neither refused nor overwritten."""
    cache_dir = tmp_path / "cache"
    shutil.copytree(baseline.path.parent.parent, cache_dir)
    seed1 = toy_config(toy_data, cache_dir, bert_dir)
    seed1 = dataclasses.replace(seed1, encoders=dataclasses.replace(seed1.encoders, seed=1))
    seeded = run(seed1, show_progress=False)
    assert seeded.path.name == baseline.path.name.replace(f"-{IMAGE_SIZE}.h5", f"-{IMAGE_SIZE}-seed1.h5")
    assert not seeded.already_complete and seeded.items == NUM_ITEMS
    seed0 = cache_dir / NAME / baseline.path.name
    assert file_digest(seed0) == file_digest(baseline.path)  # the seed-0 cache is untouched
    again = run(toy_config(toy_data, cache_dir, bert_dir), show_progress=False)
    assert again.path == seed0 and again.already_complete
    assert cache_io.read_manifest(seeded.path)["image"]["lower_fingerprint"] != \
        cache_io.read_manifest(seed0)["image"]["lower_fingerprint"]
    # Stage 2 with the same seed finds its file by name.
    text, vision = encoder_specs(seed1.encoders, seed1.dataset)
    assert find_cache(cache_dir, NAME, TextEncoder.load(text), VisionEncoder.load(vision)) == seeded.path
