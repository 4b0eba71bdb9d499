"""Hostile run directories, settings and inputs of stage 2 and the CLI: each is a clear error (or a
clean fallback), never a traceback, never a restart from scratch, and nothing is ever unpickled.

1. damaged checkpoints and an interrupted replacement of best/
2. a NaN loss: damaged cached states versus a diverging optimisation
3. errors that used to be tracebacks (a DataLoader worker's, damaged model files, bad devices, ...)
4. smaller ones: extract --set, a misspelt demo domain, source names, huge images
5. a malicious pickle in every file of a finished run and of a cache

Runs train on the tiny cache of test_train.py (a 2-block BERT, the tiny ViT, d = 32, 2 steps per epoch).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
from accelerate import Accelerator
import pytest
from click.testing import CliRunner

from pmmcache import cache as cache_io
from pmmcache import files, train
from pmmcache.cli import main
from pmmcache.errors import PmmcacheError

from helpers.toy import NAME, learned, train_cli_args, train_config


@pytest.fixture(scope="module")
def finished(toy, tmp_path_factory) -> train.TrainResult:
    """A finished 3-epoch pre-training run (the reference an uninterrupted run gives)."""
    return train.run(train_config(toy, tmp_path_factory.mktemp("runs"), "finished"), show_progress=False)


def copy_run(result: train.TrainResult, tmp_path: Path) -> Path:
    return Path(shutil.copytree(result.run_dir, tmp_path / "copy"))


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, *named: str) -> str:
    """Exit status 2, a last line `error: ...` naming `named`, no traceback; returns that line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()  # progress bars may come first
    line = next((line for line in lines if line.startswith("error: ")), None)
    assert line is not None and line == lines[-1], result.stderr
    for text in named:
        assert text in line, (text, line)
    return line


def checkpoint(run_dir: Path, epoch: int) -> Path:
    return run_dir / "checkpoints" / f"epoch-{epoch:04d}"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ------------------------------------------------------------------------------- 1. checkpoints and best/


CHANGED = "is not the file that was saved (its checksum differs)"


@pytest.mark.parametrize("damage, reason", [
    (lambda c: truncate(c / "model.safetensors"), f"model.safetensors {CHANGED}"),
    (lambda c: (c / "optimizer.bin").write_bytes(b"\0" * 64), f"optimizer.bin {CHANGED}"),
    (lambda c: (c / "scheduler.bin").unlink(), "scheduler.bin is missing"),
    (lambda c: (c / "COMPLETE").write_bytes(b"\xff\xfe{"), "its COMPLETE record is unreadable"),
])
def test_resume_falls_back_to_the_previous_checkpoint_when_the_last_is_damaged(damage, reason, toy, finished,
                                                                              tmp_path, capsys):
    runs = tmp_path / "runs"
    run_dir = train.run(train_config(toy, runs, "r", epochs=2), show_progress=False).run_dir
    damage(checkpoint(run_dir, 2))
    resumed = train.run(train_config(toy, runs, "r", epochs=3, resume=True), show_progress=False)
    err = capsys.readouterr().err
    assert f"warning: not resuming from {checkpoint(run_dir, 2)}: {reason}" in err
    assert f"resuming from {checkpoint(run_dir, 1)} instead" in err
    # Epoch 2 is trained again from epoch 1's state: the run equals the uninterrupted one.
    assert [learned(r) for r in resumed.history] == [learned(r) for r in finished.history]
    assert resumed.metrics["test"] == pytest.approx(finished.metrics["test"], abs=1e-6)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-0002", "epoch-0003"]
    assert train.resume_point(run_dir / "checkpoints")[0] == checkpoint(run_dir, 3)  # the redone epoch 2 is intact


def test_a_disk_full_while_checkpointing_says_where_and_what_to_do_and_resume_works(toy, finished, tmp_path,
                                                                                    monkeypatch):
    runs = tmp_path / "runs"
    real_save = Accelerator.save_state

    def full_at_epoch_2(self, output_dir, **kwargs):
        if output_dir.endswith("epoch-0002"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_at_epoch_2)
    with pytest.raises(PmmcacheError) as err:
        train.run(train_config(toy, runs, "full", epochs=3), show_progress=False)
    message = str(err.value)
    assert f"disk full while saving the checkpoint {checkpoint(runs / 'full', 2)}" in message
    assert f"The last good checkpoint is {checkpoint(runs / 'full', 1)}" in message and "--resume" in message
    monkeypatch.setattr(Accelerator, "save_state", real_save)  # space freed
    resumed = train.run(train_config(toy, runs, "full", epochs=3, resume=True), show_progress=False)
    assert [learned(r) for r in resumed.history] == [learned(r) for r in finished.history]


def test_an_older_checkpoint_without_checksums_is_checked_by_loading_it(toy, finished, tmp_path, capsys):
    runs = tmp_path / "runs"
    run_dir = train.run(train_config(toy, runs, "old", epochs=2), show_progress=False).run_dir
    for epoch in (1, 2):  # as pmmcache sealed them before checksums: COMPLETE holds the epoch
        (checkpoint(run_dir, epoch) / "COMPLETE").write_text(str(epoch))
    (checkpoint(run_dir, 2) / "optimizer.bin").write_bytes(b"not a torch file")
    resumed = train.run(train_config(toy, runs, "old", epochs=3, resume=True), show_progress=False)
    assert f"not resuming from {checkpoint(run_dir, 2)}: optimizer.bin is unreadable" in capsys.readouterr().err
    assert [learned(r) for r in resumed.history] == [learned(r) for r in finished.history]


def test_an_older_checkpoint_with_malformed_progress_is_passed_over(toy, tmp_path, capsys):
    runs = tmp_path / "runs"
    run_dir = train.run(train_config(toy, runs, "typed", epochs=2), show_progress=False).run_dir
    for epoch in (1, 2):  # unsealed, so only the loading checks stand between the file and the loop
        (checkpoint(run_dir, epoch) / "COMPLETE").write_text(str(epoch))
    state = checkpoint(run_dir, 2) / "train_state.json"
    state.write_text(state.read_text().replace('"epoch": 2', '"epoch": "two"'))
    resumed = train.run(train_config(toy, runs, "typed", epochs=3, resume=True), show_progress=False)
    assert f"{state}: not a training state written by pmmcache ({state}.epoch: expected an integer, got 'two')" \
        in capsys.readouterr().err
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def test_resume_with_every_checkpoint_damaged_is_one_error_naming_each(toy, tmp_path):
    runs = tmp_path / "runs"
    run_dir = train.run(train_config(toy, runs, "dead", epochs=2), show_progress=False).run_dir
    truncate(checkpoint(run_dir, 2) / "model.safetensors")
    (checkpoint(run_dir, 1) / "scheduler.bin").unlink()
    result = cli(*train_cli_args(toy, runs, "dead", epochs=3), "--resume")
    assert_clean_error(result, f"--resume: no usable checkpoint in {run_dir / 'checkpoints'}",
                       "epoch-0002: model.safetensors is not the file that was saved",
                       "epoch-0001: scheduler.bin is missing", "another --run-name")
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_replace_dir_leaves_one_whole_copy_wherever_it_is_interrupted(tmp_path, monkeypatch):
    dest = tmp_path / "best"
    files.replace_dir(dest, lambda d: (d / "v").write_text("1"))
    rename = os.replace

    def crash_on_second_rename(src, dst):
        if Path(src).name == "best.tmp":  # after best -> best.old: the worst moment
            raise OSError("simulated crash")
        rename(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_rename)
    with pytest.raises(OSError, match="simulated crash"):
        files.replace_dir(dest, lambda d: (d / "v").write_text("2"))
    monkeypatch.undo()
    assert not dest.exists() and (files.settled_dir(dest) / "v").read_text() == "2"  # the complete new copy
    files.settle_dir(dest)
    assert (dest / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["best"]

    def disk_full(directory: Path) -> None:
        (directory / "v").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.replace_dir(dest, disk_full)
    assert files.settled_dir(dest) == dest and (dest / "v").read_text() == "2"  # the old copy stays


def test_a_crash_while_best_was_replaced_leaves_a_model_eval_recommend_and_resume_read(toy, tmp_path):
    runs = tmp_path / "runs"
    run_dir = train.run(train_config(toy, runs, "crashed", epochs=2), show_progress=False).run_dir
    # The state a crash between the two renames leaves: best/ moved aside, the new copy not yet in place.
    os.replace(run_dir / "best", run_dir / "best.old")
    shutil.copytree(run_dir / "best.old", run_dir / "best.tmp")
    result = cli("eval", "--run", run_dir)
    assert result.exit_code == 0, result.output
    result = cli("recommend", "--run", run_dir, "--history", f"{NAME}/i1 {NAME}/i2", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["items"]) == 10
    train.run(train_config(toy, runs, "crashed", epochs=3, resume=True), show_progress=False)
    assert (run_dir / "best" / "config.json").is_file()
    assert not (run_dir / "best.old").exists() and not (run_dir / "best.tmp").exists()


# ------------------------------------------------------------------------------- 2. NaN losses


# With the catalogue encoded once the step reads no batch states: the cause reads them itself.
@pytest.mark.parametrize("objectives", [{}, {"negatives": "catalogue", "encode_catalogue": "once"}],
                         ids=["in-batch", "catalogue-once"])
def test_a_nan_loss_from_non_finite_cached_states_names_the_items_and_says_to_re_extract(toy, tmp_path,
                                                                                      monkeypatch, objectives):
    # The start-up check samples a few blocks of rows; in a cache this small it reads every row and
    # refuses the damage at once. Skip it, as a large cache's sample that misses the damaged rows would.
    monkeypatch.setattr("pmmcache.items.check_sample", lambda path: None)
    cache_dir = Path(shutil.copytree(toy.cache_dir, tmp_path / "cache"))
    (path,) = (cache_dir / NAME).glob("*.h5")
    keys = cache_io.read_keys(path)
    damaged = [f"{NAME}/i{i}" for i in range(0, 39, 3)]
    writer = cache_io.CacheWriter(path)
    writer.maps["image/states"][[keys.index(k) for k in damaged]] = np.nan  # e.g. an fp16 overflow
    writer.close()
    config = train_config(toy, tmp_path / "runs", "nan", cache_dir=str(cache_dir), objectives=objectives)
    with pytest.raises(PmmcacheError) as err:
        train.run(config, show_progress=False)
    message = str(err.value)
    assert "loss became nan at epoch 1, step 1" in message
    assert f"The cache {path} holds non-finite values for " in message
    assert "re-extract those items" in message and "pmmcache verify-cache" in message
    assert "lower --lr" not in message
    named = message.split("items: ", 1)[1].split(". No learning rate", 1)[0].split(", ")
    assert named and set(named) <= set(damaged), named


def test_a_nan_loss_with_finite_states_keeps_the_learning_rate_advice_and_names_the_batch(toy, tmp_path,
                                                                                         monkeypatch):
    original_dap = train.dap_loss
    monkeypatch.setattr(train, "dap_loss", lambda *a, **k: original_dap(*a, **k) * float("nan"))
    with pytest.raises(PmmcacheError) as err:
        train.run(train_config(toy, tmp_path / "runs", "diverged"), show_progress=False)
    message = str(err.value)
    assert ("their cached states are finite; their item vectors are finite, so the optimisation diverged; try a "
            "lower --lr") in message
    assert f"items ({NAME}/i" in message and "re-extract" not in message


# ------------------------------------------------------------------------------- 3. tracebacks turned into messages


def test_an_error_in_a_dataloader_worker_is_one_message_without_the_workers_traceback(toy, tmp_path):
    import pickle

    import lmdb

    root = tmp_path / "data" / "lm"
    root.mkdir(parents=True)
    for suffix in ("users.tsv", "items_texts.tsv"):
        shutil.copy(toy.data_dir / NAME / f"{NAME}_{suffix}", root / f"lm_{suffix}")
    env = lmdb.open(str(root / "lm.lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(39):
            value = (toy.data_dir / NAME / f"{NAME}_images" / f"i{i}.png").read_bytes()
            txn.put(f"i{i}".encode(), pickle.dumps({"image": value}) if i == 30 else value)  # read in a worker
    env.close()
    result = cli("extract", "--dataset", "lm", "--data-dir", tmp_path / "data", "--cache-dir", tmp_path / "cache",
                 "--text-encoder", toy.bert_dir, "--vision-encoder", "pmmcache-tiny-vit", "--vision-weights", "random",
                 "-k", "1", "--image-size", "64", "--max-text-length", "16", "--batch-size", "8",
                 "--num-workers", "2", "--device", "cpu")
    assert_clean_error(result, str(root / "lm.lmdb"), "the value for 'i30' is a Python pickle")
    assert "DataLoader worker" not in result.stderr


@pytest.mark.parametrize("part", ["item_tower", "user_encoder"])
def test_a_damaged_best_safetensors_file_is_named(part, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    truncate(run_dir / "best" / f"{part}.safetensors")
    path = run_dir / "best" / f"{part}.safetensors"
    assert_clean_error(cli("eval", "--run", run_dir), f"{path}: not a readable safetensors file")
    assert_clean_error(cli("recommend", "--run", run_dir, "--history", f"{NAME}/i1"), str(path))
    assert_clean_error(cli("export-items", "--run", run_dir, "--output", tmp_path / "items.npz"), str(path))


@pytest.mark.parametrize("text, says", [
    ("{not json", "not readable as JSON"),
    ("[1, 2]", "kind None"),
    ('{"kind": "pmmcache.pmmrec.parts", "config": 3}', "'config' is not a table"),
    ('{"kind": "pmmcache.pmmrec.parts", "config": {"item_tower": 3}}', "item_tower: expected a table"),
])
def test_a_damaged_best_config_json_is_named(text, says, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    (run_dir / "best" / "config.json").write_text(text)
    assert_clean_error(cli("eval", "--run", run_dir), str(run_dir / "best" / "config.json"), says)
    assert_clean_error(cli("recommend", "--run", run_dir, "--history", f"{NAME}/i1"), "best/config.json")


@pytest.mark.parametrize("text", ["{not json", "\xff", "[]", '{"epochs": "many"}'])
def test_a_damaged_run_config_json_is_named_by_eval_recommend_and_resume(text, toy, tmp_path):
    runs = tmp_path / "runs"
    run_dir = train.run(train_config(toy, runs, "conf", epochs=1), show_progress=False).run_dir
    (run_dir / "config.json").write_text(text)
    named = str(run_dir / "config.json")
    assert_clean_error(cli("eval", "--run", run_dir), named)
    assert_clean_error(cli("recommend", "--run", run_dir, "--history", f"{NAME}/i1"), named)
    assert_clean_error(cli(*train_cli_args(toy, runs, "conf", epochs=2), "--resume"), named)


def test_a_damaged_metrics_jsonl_is_named_on_resume(toy, tmp_path):
    runs = tmp_path / "runs"
    run_dir = train.run(train_config(toy, runs, "log", epochs=1), show_progress=False).run_dir
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n{"epo')
    assert_clean_error(cli(*train_cli_args(toy, runs, "log", epochs=2), "--resume"),
                       f"{run_dir / 'metrics.jsonl'}, line 2: not the epoch records pmmcache writes")


@pytest.mark.parametrize("device", ["banana", "cuda:x"])
def test_an_unknown_device_is_a_config_error(device, toy, finished, tmp_path):
    result = cli("extract", "--dataset", NAME, "--data-dir", toy.data_dir, "--cache-dir", tmp_path / "cache",
                 "--text-encoder", toy.bert_dir, "--device", device)
    assert_clean_error(result, f"--device {device!r}")
    run_dir = copy_run(finished, tmp_path)
    items = tmp_path / "new.tsv"
    items.write_text("n1\tthe red cat\n")
    assert_clean_error(cli("add-items", "--run", run_dir, "--items", items, "--device", device), f"--device {device!r}")
    assert not (run_dir / "catalogue").exists()


@pytest.mark.parametrize("name", ["items.parquet", "items.npz"])
def test_an_unwritable_export_path_is_named(name, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    output = run_dir / "config.json" / name  # its folder would have to be a file
    assert_clean_error(cli("export-items", "--run", run_dir, "--output", output), f"--output {output}: cannot write")


def test_a_text_encoder_whose_config_json_is_empty_is_named(toy, tmp_path):
    text_dir = Path(shutil.copytree(toy.bert_dir, tmp_path / "text"))
    (text_dir / "config.json").write_text("{}")
    result = cli("extract", "--dataset", NAME, "--data-dir", toy.data_dir, "--cache-dir", tmp_path / "cache",
                 "--text-encoder", text_dir, "--vision-encoder", "pmmcache-tiny-vit", "--vision-weights", "random",
                 "-k", "1", "--num-workers", "0", "--device", "cpu")
    assert_clean_error(result, f"text encoder {text_dir / 'config.json'} is not a transformers model config")


# Bad objective settings (temperature, weights, fractions) are probed with the other bad settings in
# test_train.py::test_bad_settings_are_config_errors_naming_the_key.


# ------------------------------------------------------------------------------- 4. smaller ones


def test_extract_takes_set_overrides_like_train(monkeypatch):
    from pmmcache import extract

    seen = []
    monkeypatch.setattr(extract, "run", lambda config: seen.append(config))
    result = cli("extract", "--dataset", NAME, "--set", "data.min_core=3", "--set", "batch_size=8")
    assert result.exit_code == 0, result.output
    assert seen[0].data.min_core == 3 and seen[0].batch_size == 8
    assert_clean_error(cli("extract", "--set", "data.min_cor=3"), "'min_cor' for PrepareConfig in data")


@pytest.mark.parametrize("verb", ["extract", "train"])
def test_a_misspelt_demo_domain_is_refused_before_the_demo_is_generated(verb, tmp_path):
    result = cli(verb, "--dataset", "demo/kitchn", "--data-dir", tmp_path / "data", "--cache-dir", tmp_path / "cache")
    assert_clean_error(result, "the demo has no domain 'kitchn'; domains: kitchen, garden")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("source", ["my shop", "tab\there", "a/b"])
def test_a_source_name_that_keys_could_not_name_is_refused(source, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    items = tmp_path / "new.tsv"
    items.write_text("n1\tthe red cat\n")
    result = cli("add-items", "--run", run_dir, "--items", items, "--source", source, "--device", "cpu")
    assert_clean_error(result, f"source name {source!r} must be non-empty, without '/' or spaces")
    assert not (run_dir / "catalogue").exists()


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is `width` x `height` (and holds no pixels): what PIL reads before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_an_image_of_too_many_pixels_is_decoded_reduced_or_refused_by_name(monkeypatch):
    import io

    from PIL import Image

    from pmmcache.data import images
    from pmmcache.errors import DataError

    with pytest.raises(DataError, match="shop, image 'big': the image is 11000 x 11000 pixels, more than"):
        images.decode_image(png_header(11000, 11000), "shop, image 'big'", 224)  # judged from the header
    with pytest.raises(DataError, match="shop, image 'huge': too large to decode"):
        images.decode_image(png_header(20000, 20000), "shop, image 'huge'", 224)  # beyond PIL's own limit
    photo = io.BytesIO()
    Image.new("RGB", (1600, 1200), (200, 30, 30)).save(photo, "JPEG")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1_000_000)
    reduced = images.decode_image(photo.getvalue(), "shop, image 'photo'", 224)
    assert reduced.mode == "RGB" and reduced.size == (400, 300)  # 1/4 scale: still >= 224 on each side
    assert images.decode_image(photo.getvalue(), "x", 224).getpixel((200, 150))[0] > 150
    with pytest.raises(DataError, match="1600 x 1200"):  # 1/2 scale is the most that keeps 700 px
        images.decode_image(photo.getvalue(), "shop, image 'photo'", 700)


def test_extract_names_an_image_of_too_many_pixels(toy, tmp_path):
    data_dir = Path(shutil.copytree(toy.data_dir, tmp_path / "data"))
    (data_dir / NAME / f"{NAME}_images" / "i5.png").write_bytes(png_header(11000, 11000))
    result = cli("extract", "--dataset", NAME, "--data-dir", data_dir, "--cache-dir", tmp_path / "cache",
                 "--text-encoder", toy.bert_dir, "--vision-encoder", "pmmcache-tiny-vit", "--vision-weights", "random",
                 "-k", "1", "--image-size", "64", "--max-text-length", "16", "--num-workers", "0", "--device", "cpu")
    assert_clean_error(result, f"{NAME}_images, image 'i5': the image is 11000 x 11000 pixels")


# ------------------------------------------------------------------------------- 5. a planted pickle everywhere


class Planted:
    """Unpickling this runs code: it creates the marker file named when it was pickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    """Replace `path` by a pickle that creates `marker` when loaded; in torch's format where torch reads the file."""
    import pickle

    import torch

    if path.suffix in (".bin", ".pkl", ".pt"):
        torch.save(Planted(marker), path)
    else:
        path.write_bytes(pickle.dumps(Planted(marker)))


@pytest.fixture(scope="module")
def swept(toy, tmp_path_factory) -> Path:
    """A finished 2-epoch run (evaluated, with added items) on its own copy of the cache, and a
    pristine copy of both under backup/."""
    root = tmp_path_factory.mktemp("swept")
    shutil.copytree(toy.cache_dir, root / "cache")
    run_dir = train.run(train_config(toy, root / "runs", "run", epochs=2, cache_dir=str(root / "cache")),
                        show_progress=False).run_dir
    assert cli("eval", "--run", run_dir).exit_code == 0
    (root / "new.tsv").write_text("n1\tthe red cat\nn2\tthe blue dog\n")
    assert cli("add-items", "--run", run_dir, "--items", root / "new.tsv", "--device", "cpu").exit_code == 0
    for name in ("runs", "cache"):
        shutil.copytree(root / name, root / "backup" / name)
    return root


def sweep_commands(toy, root: Path) -> dict[str, list[str]]:
    """The commands that read a run directory and a cache, as `pmmcache` arguments."""
    resume = train_cli_args(toy, root / "runs", "run", epochs=3) + ["--resume"]
    resume[resume.index("--cache-dir") + 1] = str(root / "cache")
    run_dir = str(root / "runs" / "run")
    return {
        "train --resume": resume,
        "eval": ["eval", "--run", run_dir],
        "recommend": ["recommend", "--run", run_dir, "--history", f"{NAME}/i1 {NAME}/i2 new/n1"],
        "extract": ["extract", "--dataset", NAME, "--data-dir", str(toy.data_dir), "--cache-dir", str(root / "cache"),
                    "--text-encoder", str(toy.bert_dir), "--vision-encoder", "pmmcache-tiny-vit",
                    "--vision-weights", "random", "-k", "1", "--max-text-length", "16", "--image-size", "64",
                    "--batch-size", "16", "--num-workers", "0", "--device", "cpu"],
    }


@pytest.mark.slow
def test_a_pickle_planted_in_any_file_of_a_run_or_cache_is_never_loaded(toy, swept, tmp_path):
    marker = tmp_path / "code-ran"
    backup = swept / "backup"
    planted = sorted(p.relative_to(backup) for p in backup.rglob("*") if p.is_file())
    assert any("checkpoints" in p.parts for p in planted) and any(p.suffix == ".h5" for p in planted)
    commands = sweep_commands(toy, swept)
    outcomes, unclean = {}, []
    for relative in planted:
        for command, args in commands.items():
            if command == "extract" and relative.parts[0] != "cache":
                continue
            for name in ("runs", "cache"):  # every case starts from the finished run and its cache
                shutil.rmtree(swept / name)
                shutil.copytree(backup / name, swept / name)
            plant(swept / relative, marker)
            result = cli(*args)
            assert not marker.exists(), f"`{command}` unpickled {relative}"
            outcomes[relative, command] = result.exit_code
            refused = result.exit_code == 2 and "\nerror: " in "\n" + result.stderr  # a message, not a crash
            if not (result.exit_code == 0 or refused) or "Traceback" in result.stderr:
                unclean.append(f"{command} with {relative}: exit {result.exit_code}, {result.exception!r}")
    assert not unclean, "\n".join(unclean)
    # The planted files that matter were refused, not skipped: e.g. the model parts and the cache;
    # a planted checkpoint file is passed over for the checkpoint before it.
    assert outcomes[Path("runs/run/best/item_tower.safetensors"), "eval"] == 2
    assert outcomes[Path("runs/run/checkpoints/epoch-0002/optimizer.bin"), "train --resume"] == 0
    h5 = next(p for p in planted if p.parts[0] == "cache" and p.suffix == ".h5")
    assert {outcomes[h5, command] for command in commands} == {2}
