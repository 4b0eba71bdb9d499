"""Serving a trained run: `pmmcache recommend`, `add-items` (new items with no retraining) and `export-items`.

The run is a one-epoch fine-tuning run on the tiny toy cache of test_train.py (39 items). The new items
are extracted alone into the run's catalogue: one copies the text and image of the top-ranked item, so
the model must give it that item's score.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pmmcache import cache as cache_io
from pmmcache import train
from pmmcache.cli import main
from pmmcache.errors import PmmcacheError
from pmmcache.evaluate import item_table
from pmmcache.runs import load_run
from pmmcache.recommend import AddItemsConfig, Recommender, add_items, read_registry

from helpers.toy import NAME, NUM_ITEMS, train_config

HISTORY = ["toy/i0", "toy/i5", "toy/i10"]  # a toy user's first items (u0: i0 i5 i10 ...)


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("recommend")
    run_dir = train.run(train_config(toy, root / "runs", "finetune", stage="finetune", epochs=1),
                        show_progress=False).run_dir
    return toy, run_dir


def cli(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, (result.output, result.exception)
    return result


def recommend_json(run_dir: Path, *args: str) -> list[dict]:
    out = cli("recommend", "--run", str(run_dir), "--history", " ".join(HISTORY), "--json", *args)
    return json.loads(out.stdout)["items"]


def reference_scores(run_dir: Path) -> tuple[list[str], torch.Tensor]:
    """The dataset's keys and their scores for HISTORY, from the model loaded the evaluation's way."""
    s, _ = load_run(run_dir)
    table = item_table(s.model, s.store)
    keys = s.dataset.item_keys()
    ids = torch.zeros(1, s.config.max_len, dtype=torch.long)
    ids[0, -len(HISTORY):] = torch.tensor([keys.index(k) + 1 for k in HISTORY])
    with torch.no_grad():
        return keys, (table @ s.model.user_vectors(table[ids], ids == 0)[0])[1:]


# ------------------------------------------------------------------------------- recommend


def test_recommend_prints_the_top_k_by_the_models_scores_without_the_history(trained):
    _, run_dir = trained
    keys, scores = reference_scores(run_dir)
    items = recommend_json(run_dir, "-n", "5")
    ranked = [keys[i] for i in torch.argsort(scores, descending=True).tolist() if keys[i] not in HISTORY]
    assert [item["key"] for item in items] == ranked[:5]
    for item in items:
        assert item["score"] == pytest.approx(float(scores[keys.index(item["key"])]), abs=1e-5)

    table = cli("recommend", "--run", str(run_dir), "--history", " ".join(HISTORY), "--top", "5").stdout.splitlines()
    assert table[0].split() == ["rank", "score", "key", "title"]
    toy = trained[0]
    titles = dict(line.split("\t") for line in (toy.data_dir / NAME / f"{NAME}_items_texts.tsv").read_text().splitlines())
    assert all(item["title"] == titles[item["key"].split("/", 1)[1]] for item in items)  # the item's own text
    assert [line.split() for line in table[1:]] == [[str(r), f"{i['score']:.4f}", i["key"], *i["title"].split()]
                                                    for r, i in enumerate(items, start=1)]


def test_include_history_ranks_every_item_and_k_is_capped_by_the_catalogue(trained):
    _, run_dir = trained
    everything = recommend_json(run_dir, "--top", "100", "--include-history")
    assert len(everything) == NUM_ITEMS and set(HISTORY) <= {i["key"] for i in everything}
    scores = [i["score"] for i in everything]
    assert scores == sorted(scores, reverse=True)
    assert len(recommend_json(run_dir, "--top", "100")) == NUM_ITEMS - len(HISTORY)


def test_unknown_history_keys_are_one_error_naming_each(trained):
    _, run_dir = trained
    result = cli("recommend", "--run", str(run_dir), "--history", "toy/i1 toy/nope i2", code=2)
    assert "unknown item key(s) 'toy/nope', 'i2': not in the run's catalogue of 39 items" in result.stderr
    assert "toy/i1" not in result.stderr


# ------------------------------------------------------------------------------- add-items


@pytest.fixture(scope="module")
def with_new_items(trained, tmp_path_factory):
    """A copy of the run with two new items added by `pmmcache add-items`: `new/copy` has the text and
    image of the run's top recommendation for HISTORY, `new/fresh` its own."""
    toy, run_dir = trained
    root = tmp_path_factory.mktemp("new-items")
    run_copy = root / "run"
    shutil.copytree(run_dir, run_copy)
    top = recommend_json(run_dir, "--top", "1")[0]["key"]
    raw = top.split("/", 1)[1]
    texts = dict(line.split("\t") for line in (toy.data_dir / NAME / f"{NAME}_items_texts.tsv").read_text().splitlines())
    (root / "images").mkdir()
    shutil.copy(toy.data_dir / NAME / f"{NAME}_images" / f"{raw}.png", root / "images" / "copy.png")
    shutil.copy(toy.data_dir / NAME / f"{NAME}_images" / "i7.png", root / "images" / "fresh.png")
    items = root / "new_items.tsv"
    items.write_text(f"copy\t{texts[raw]}\nfresh\tthe best song of the world\n")
    out = cli("add-items", "--run", str(run_copy), "--items", str(items), "--images", str(root / "images"),
              "--device", "cpu")
    return run_copy, items, top, out.stdout


def test_a_new_item_is_extracted_alone_and_becomes_recommendable_with_its_twins_score(with_new_items):
    run_dir, _, top, output = with_new_items
    assert "added 2 items" in output
    [entry] = read_registry(run_dir)
    cache = run_dir / "catalogue" / entry["cache"]
    assert cache_io.read_keys(cache) == ["", "new/copy", "new/fresh"]  # only the new items were extracted
    assert cache_io.read_manifest(cache)["dataset"]["num_items"] == 2

    items = recommend_json(run_dir, "--top", "3")
    scores = {i["key"]: i["score"] for i in items}
    assert {top, "new/copy"} <= set(scores)  # the twin ties with the top item, ahead of the rest
    assert scores["new/copy"] == pytest.approx(scores[top], rel=1e-4, abs=1e-5)
    everything = {i["key"]: i["title"] for i in recommend_json(run_dir, "--top", "100")}
    assert "new/fresh" in everything and len(everything) == NUM_ITEMS + 2 - len(HISTORY)
    assert everything["new/fresh"] == "the best song of the world"  # an added item's title, from its items file
    # A new item can be part of a history too.
    cli("recommend", "--run", str(run_dir), "--history", "toy/i0 new/fresh", "--top", "2")


def test_re_adding_is_a_no_op_and_colliding_keys_are_errors(with_new_items, tmp_path):
    run_dir, items, _, _ = with_new_items
    again = cli("add-items", "--run", str(run_dir), "--items", str(items), "--images",
                str(items.parent / "images"), "--device", "cpu")
    assert "already in the catalogue" in again.stdout and len(read_registry(run_dir)) == 1

    clash = tmp_path / "clash.tsv"
    clash.write_text("copy\tanother copy\n")  # new/copy is an earlier addition's
    result = cli("add-items", "--run", str(run_dir), "--items", str(clash), code=2)
    assert "'new/copy' (in an earlier addition" in result.stderr
    trained_key = tmp_path / "trained.tsv"
    trained_key.write_text("i3\tthe red cat\n")
    result = cli("add-items", "--run", str(run_dir), "--items", str(trained_key), "--source", "toy", code=2)
    assert "'toy/i3' (in the run's dataset)" in result.stderr
    assert len(read_registry(run_dir)) == 1


def test_an_interrupted_add_items_registers_nothing_and_the_rerun_resumes(trained, with_new_items, tmp_path,
                                                                         monkeypatch):
    _, run_dir = trained
    _, items, _, _ = with_new_items
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    config = AddItemsConfig(run=run_copy, items=items, images=items.parent / "images", batch_size=1, device="cpu")
    original_write = cache_io.CacheWriter.write
    written = []

    def write_then_die(self, rows, arrays):
        if len(written) == 2:
            raise KeyboardInterrupt  # killed after two batches: the padding row and one item
        original_write(self, rows, arrays)
        written.extend(rows.tolist())

    monkeypatch.setattr(cache_io.CacheWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        add_items(config, show_progress=False)
    assert read_registry(run_copy) == [] and written == [0, 1]
    monkeypatch.setattr(cache_io.CacheWriter, "write", original_write)
    result = add_items(config, show_progress=False)
    assert result.extracted == 1 and not result.already_added  # only the item still pending
    assert [entry["items"] for entry in read_registry(run_copy)] == [2]


def test_an_id_based_run_cannot_take_new_items(tmp_path):
    run_dir = tmp_path / "sasrec"
    (run_dir / "best").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"model": {"items": "id"}}))
    (run_dir / "best" / "config.json").write_text("{}")
    items = tmp_path / "items.tsv"
    items.write_text("x\tsomething\n")
    with pytest.raises(PmmcacheError, match="ID-based model .* ID embeddings exist only for the items it was trained on"):
        add_items(AddItemsConfig(run=run_dir, items=items))


# ------------------------------------------------------------------------------- export-items


def test_export_holds_every_catalogue_item_with_the_models_vectors_and_the_runs_config(with_new_items, tmp_path):
    run_dir, _, top, _ = with_new_items
    s, _ = load_run(run_dir)
    reference = item_table(s.model, s.store)[1:].numpy()  # the dataset's items, computed the evaluation's way
    config = json.loads((run_dir / "config.json").read_text())

    cli("export-items", "--run", str(run_dir), "--output", str(tmp_path / "items.parquet"))
    table = pq.read_table(tmp_path / "items.parquet")
    keys = table.column("key").to_pylist()
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    vector_type = table.schema.field("vector").type
    assert pa.types.is_fixed_size_list(vector_type) and vector_type.value_type == pa.float32()
    assert vector_type.list_size == reference.shape[1]
    assert keys == s.dataset.item_keys() + ["new/copy", "new/fresh"]
    np.testing.assert_allclose(vectors[:NUM_ITEMS], reference, atol=1e-5)
    np.testing.assert_allclose(vectors[keys.index("new/copy")], vectors[keys.index(top)], atol=1e-4)
    meta = json.loads(table.schema.metadata[b"pmmcache"])
    assert meta["config"] == config and meta["trained_items"] == NUM_ITEMS and meta["added_items"] == 2

    cli("export-items", "--run", str(run_dir), "--output", str(tmp_path / "items.npz"))
    with np.load(tmp_path / "items.npz") as npz:
        assert npz["keys"].tolist() == keys
        np.testing.assert_array_equal(npz["vectors"], vectors)
        assert json.loads(str(npz["metadata"]))["config"] == config
    # The export is what the recommender scores against.
    np.testing.assert_array_equal(Recommender(run_dir).catalogue.table[1:].numpy(), vectors)


def test_a_non_finite_item_is_never_recommended_and_export_refuses_it(trained, tmp_path, monkeypatch):
    from pmmcache import recommend as recommend_module

    _, run_dir = trained
    real_build = recommend_module.build_catalogue

    def corrupt_build(*args, **kwargs):  # one item's vector is NaN, as corrupt cached states make it
        catalogue = real_build(*args, **kwargs)
        catalogue.table[3] = float("nan")
        return catalogue

    monkeypatch.setattr(recommend_module, "build_catalogue", corrupt_build)
    recommender = Recommender(run_dir)
    broken = recommender.catalogue.keys[2]  # row 3
    ranked = recommender.recommend(list(HISTORY), k=len(recommender.catalogue.keys), include_history=True)
    assert broken not in [r.key for r in ranked] and len(ranked) == len(recommender.catalogue.keys) - 1
    assert all(np.isfinite(r.score) for r in ranked)
    with pytest.raises(PmmcacheError, match=f"1 item vector\\(s\\) are not finite \\({broken}\\)"):
        recommend_module.export_items(recommend_module.ExportConfig(run=run_dir, output=tmp_path / "items.npz"))
    assert not (tmp_path / "items.npz").exists()
