"""The embedded demo dataset: layout, determinism, atomic writing, and that its signal is real
(learnable, carried by both modalities, transferable from source to target domains)."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

from pmmcache.config import from_dict, replace, to_dict  # noqa: E402
from pmmcache.data import demo  # noqa: E402
from pmmcache.data.demo import DemoConfig, generate_demo  # noqa: E402
from pmmcache.errors import ConfigError, DataError  # noqa: E402

SMALL = DemoConfig(source_items=60, target_items=50, source_users=40, target_users=30,
                   max_seq_len=12)


@pytest.fixture(scope="module")
def full_root(demo_data_dir: Path) -> Path:
    """The default dataset (generated once per session), for the tests that measure its signal."""
    return demo_data_dir / "demo"


# ---- small readers of the raw layout --------------------------------------------------------

def read_sequences(root: Path, name: str) -> dict[str, list[str]]:
    sequences = {}
    for line in (root / name / f"{name}_users.tsv").read_text().splitlines():
        user, items = line.split("\t")
        sequences[user] = items.split(" ")
    return sequences


def read_titles(root: Path, name: str) -> dict[str, str]:
    return dict(line.split("\t") for line in (root / name / f"{name}_items_texts.tsv").read_text().splitlines())


def read_latent(root: Path, name: str) -> tuple[list[str], np.ndarray]:
    """Item names and their (category, style, brand, image_category) rows."""
    lines = (root / name / f"{name}_items_latent.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["item", "category", "style", "brand", "image_category",
                                    "popularity"]
    names = [line.split("\t")[0] for line in lines[1:]]
    attributes = np.array([[int(v) for v in line.split("\t")[1:5]] for line in lines[1:]])
    return names, attributes


def domain_names(root: Path, role: str) -> list[str]:
    meta = json.loads((root / "demo.json").read_text())
    return [d["name"] for d in meta["domains"] if d["role"] == role]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- layout, format, determinism, atomicity -------------------------------------------------

def test_layout_and_format_match_the_pmmrec_raw_layout(full_root: Path) -> None:
    meta = json.loads((full_root / "demo.json").read_text())
    assert meta["format"] == 1 and meta["generator"] == "pmmcache.data.demo"
    assert from_dict(DemoConfig, meta["config"]) == DemoConfig()
    roles = Counter(d["role"] for d in meta["domains"])
    assert roles == {"source": 2, "target": 2}
    assert sorted(p.name for p in full_root.iterdir()) == sorted(["demo.json", *(d["name"] for d in meta["domains"])])
    for entry in meta["domains"]:
        name = entry["name"]
        titles = read_titles(full_root, name)
        sequences = read_sequences(full_root, name)
        latent_names, _ = read_latent(full_root, name)
        assert list(titles) == latent_names and len(titles) == entry["items"]
        assert len(sequences) == entry["users"]
        assert sum(len(s) for s in sequences.values()) == entry["interactions"]
        images = sorted(p.name for p in (full_root / name / f"{name}_images").iterdir())
        assert images == sorted(f"{item}.jpg" for item in titles)
        for title in titles.values():
            assert 3 <= len(title.split(" ")) <= 12
        for items in sequences.values():
            assert 5 <= len(items) <= 25
            assert len(set(items)) == len(items)  # no repeats
            assert set(items) <= titles.keys()
        # Every user and every item has >= 5 interactions, so 5-core filtering keeps everything.
        counts = Counter(item for items in sequences.values() for item in items)
        assert set(counts) == set(titles) and min(counts.values()) >= 5
    target_sizes = [d["users"] for d in meta["domains"] if d["role"] == "target"]
    source_sizes = [d["users"] for d in meta["domains"] if d["role"] == "source"]
    assert max(target_sizes) < min(source_sizes)


def test_images_are_224_rgb_jpegs(full_root: Path) -> None:
    for name in domain_names(full_root, "source") + domain_names(full_root, "target"):
        paths = sorted((full_root / name / f"{name}_images").iterdir())[:40]
        for path in paths:
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (224, 224)
                pixels = np.asarray(image)
            assert pixels.std() > 10  # a drawn shape, not a blank canvas


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    first = generate_demo(tmp_path / "a", SMALL)
    second = generate_demo(tmp_path / "b", SMALL)
    other = generate_demo(tmp_path / "c", replace(SMALL, seed=1))
    files_a, files_b, files_c = (all_files(tmp_path / d) for d in "abc")
    assert first == second
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    changed = [k for k in files_a if k != "demo.json" and files_a[k] != files_c[k]]
    assert "kitchen/kitchen_users.tsv" in changed and "toys/toys_items_texts.tsv" in changed
    assert sum(k.endswith(".jpg") for k in changed) > 0.9 * sum(k.endswith(".jpg") for k in files_a)
    assert other["config"]["seed"] == 1


def test_generation_that_fails_midway_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_render = demo.render_image
    calls = []

    def render_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > 70:  # inside the second domain, after files were written
            raise RuntimeError("killed")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(demo, "render_image", render_then_fail)
    with pytest.raises(RuntimeError, match="killed"):
        generate_demo(tmp_path / "demo", SMALL)
    assert len(calls) == 71
    assert list(tmp_path.iterdir()) == []  # neither the root nor a partial sibling


def test_existing_root_is_refused_unless_empty(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    root.mkdir()
    (root / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="already exists"):
        generate_demo(root, SMALL)
    assert (root / "mine.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_demo(empty, SMALL)
    assert (empty / "demo.json").is_file()


def test_a_root_completed_meanwhile_by_another_process_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "demo"
    real_write = demo._write_dataset

    def write_while_another_process_finishes(directory: Path, config: DemoConfig) -> dict:
        content = real_write(directory, config)
        monkeypatch.setattr(demo, "_write_dataset", real_write)
        generate_demo(root, replace(config, seed=7))  # the other process wins the race
        return content

    monkeypatch.setattr(demo, "_write_dataset", write_while_another_process_finishes)
    content = generate_demo(root, SMALL)
    assert content["config"]["seed"] == 7  # the complete dataset already there is returned
    assert json.loads((root / "demo.json").read_text())["config"]["seed"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # our partial copy is gone


def test_config_rejects_bad_values_by_name() -> None:
    with pytest.raises(ConfigError, match="at least 2 source and 2 target"):
        DemoConfig(n_target_domains=1)
    with pytest.raises(ConfigError, match="source_items"):
        DemoConfig(source_items=10)
    with pytest.raises(ConfigError, match="noise_fraction"):
        from_dict(DemoConfig, {"noise_fraction": 1.5})
    with pytest.raises(ConfigError, match="'nosie_fraction'"):
        from_dict(DemoConfig, {"nosie_fraction": 0.1})
    assert from_dict(DemoConfig, to_dict(SMALL)) == SMALL


def test_noise_fraction_of_items_shows_another_category_in_the_image(full_root: Path) -> None:
    attributes = np.concatenate([read_latent(full_root, name)[1]
                                 for name in domain_names(full_root, "source") + domain_names(full_root, "target")])
    disagree = np.mean(attributes[:, 0] != attributes[:, 3])
    assert 0.06 < disagree < 0.14  # default noise_fraction 0.1, 1,320 items


# ---- the signal -----------------------------------------------------------------------------

def attribute_predictor_hr10(root: Path, name: str, use_category: bool = True,
                             use_style: bool = True, use_brand: bool = True) -> tuple[float, float]:
    """HR@10 on each user's last item of a count-based predictor over latent attributes, fitted
    on all but the last item: P(next (category, style) | last one) x P(item | its pair), times
    (1 + how often the history has the item's brand). Returns (HR@10, random HR@10)."""
    names, attributes = read_latent(root, name)
    index = {item: j for j, item in enumerate(names)}
    category = attributes[:, 0] if use_category else np.zeros(len(names), dtype=int)
    style = attributes[:, 1] if use_style else np.zeros(len(names), dtype=int)
    brand = attributes[:, 2]
    state = category * demo.N_STYLES + style  # (N,)
    n_states = demo.N_CATEGORIES * demo.N_STYLES
    transitions = np.ones((n_states, n_states))
    item_counts = np.ones(len(names))
    sequences = [[index[i] for i in items] for items in read_sequences(root, name).values()]
    for seq in sequences:
        train = seq[:-1]
        np.add.at(transitions, (state[train[:-1]], state[train[1:]]), 1)
        np.add.at(item_counts, train, 1)
    state_counts = np.bincount(state, weights=item_counts, minlength=n_states)
    hits = 0
    for seq in sequences:
        history, target = seq[:-1], seq[-1]
        row = transitions[state[history[-1]]]
        scores = row[state] / row.sum() * item_counts / state_counts[state]  # (N,)
        if use_brand:
            scores = scores * (1 + np.bincount(brand[history], minlength=demo.N_BRANDS)[brand])
        scores[history] = -np.inf
        hits += target in np.argsort(-scores, kind="stable")[:10]
    return hits / len(sequences), 10 / len(names)


def test_sequences_are_learnable_and_every_attribute_matters(full_root: Path) -> None:
    names = domain_names(full_root, "source") + domain_names(full_root, "target")
    full = {}
    for name in names:
        full[name], random_hr = attribute_predictor_hr10(full_root, name)
        assert full[name] > 8 * random_hr, (name, full[name], random_hr)
    # Dropping any one attribute (category: both modalities; style: image only; brand: text
    # only) loses hits, so a model needs both modalities to reach the top. Averaged over the
    # domains: one target domain alone (600 users) is too noisy for a 0.02 margin.
    mean_full = np.mean(list(full.values()))
    for dropped in ("use_category", "use_style", "use_brand"):
        reduced = np.mean([attribute_predictor_hr10(full_root, n, **{dropped: False})[0] for n in names])
        assert reduced < mean_full - 0.02, (dropped, reduced, mean_full)


def image_features(root: Path, name: str, items: list[str]) -> np.ndarray:
    """Images shrunk to 16x16 RGB, flattened: (N, 768) in [0, 1]."""
    rows = []
    for item in items:
        with Image.open(root / name / f"{name}_images" / f"{item}.jpg") as image:
            rows.append(np.asarray(image.resize((16, 16), Image.BILINEAR), dtype=np.float32).ravel() / 255)
    return np.stack(rows)


def nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Fit class centroids on even rows, classify odd rows by the nearest one."""
    train = np.arange(len(labels)) % 2 == 0
    classes = np.unique(labels)
    centroids = np.stack([features[train & (labels == c)].mean(0) for c in classes])  # (K, D)
    distances = ((features[~train, None, :] - centroids[None]) ** 2).sum(-1)  # (N_test, K)
    return float(np.mean(classes[distances.argmin(1)] == labels[~train]))


def bag_of_words_accuracy(titles: list[str], labels: np.ndarray) -> float:
    """Multinomial naive Bayes on title words, fitted on even rows, tested on odd rows."""
    vocabulary = {w: k for k, w in enumerate(sorted({w for t in titles for w in t.lower().split()}))}
    counts = np.zeros((len(titles), len(vocabulary)))  # (N, V)
    for row, title in enumerate(titles):
        for word in title.lower().split():
            counts[row, vocabulary[word]] += 1
    train = np.arange(len(labels)) % 2 == 0
    classes = np.unique(labels)
    word_counts = np.stack([counts[train & (labels == c)].sum(0) + 1 for c in classes])  # (K, V)
    log_probs = np.log(word_counts / word_counts.sum(1, keepdims=True))
    return float(np.mean(classes[(counts[~train] @ log_probs.T).argmax(1)] == labels[~train]))


def silhouette_features(root: Path, name: str, items: list[str]) -> np.ndarray:
    """Where the image differs from its background, at 56x56 and moved so that the shape's centre
    of mass is in the middle: (N, 3136) in {0, 1}. Colour-blind, so it reads the shape only."""
    rows = []
    for item in items:
        with Image.open(root / name / f"{name}_images" / f"{item}.jpg") as image:
            pixels = np.asarray(image.resize((56, 56), Image.BILINEAR), dtype=np.float32)  # (56, 56, 3)
        # The background is a vertical gradient: estimate each row's colour from the borders.
        background = np.median(np.concatenate([pixels[:, :3], pixels[:, -3:]], 1), axis=1, keepdims=True)
        mask = np.abs(pixels - background).sum(-1) > 60
        ys, xs = np.nonzero(mask)
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        rows.append(np.pad(mask, 28)[cy:cy + 56, cx:cx + 56].ravel().astype(np.float32))
    return np.stack(rows)


def test_image_shows_style_and_category_but_not_brand(full_root: Path) -> None:
    for name in ["garden", "office"]:
        items, attributes = read_latent(full_root, name)
        pixels = image_features(full_root, name, items)
        assert nearest_centroid_accuracy(pixels, attributes[:, 1]) > 0.6  # style; chance 1/6
        assert nearest_centroid_accuracy(pixels, attributes[:, 2]) < 1 / demo.N_BRANDS + 0.1
        shapes = silhouette_features(full_root, name, items)
        assert nearest_centroid_accuracy(shapes, attributes[:, 3]) > 0.6  # drawn category; 1/8
        assert nearest_centroid_accuracy(shapes, attributes[:, 1]) < 1 / demo.N_STYLES + 0.1


def test_title_shows_brand_and_category_but_not_style(full_root: Path) -> None:
    for name in ["garden", "office"]:
        items, attributes = read_latent(full_root, name)
        titles = read_titles(full_root, name)
        text = [titles[item] for item in items]
        assert bag_of_words_accuracy(text, attributes[:, 2]) > 0.9  # brand
        assert bag_of_words_accuracy(text, attributes[:, 0]) > 0.8  # category
        assert bag_of_words_accuracy(text, attributes[:, 1]) < 1 / demo.N_STYLES + 0.12  # style


def category_pairs(root: Path, name: str) -> np.ndarray:
    """(P, 2) consecutive (category, next category) pairs over all users of a domain."""
    items, attributes = read_latent(root, name)
    category = dict(zip(items, attributes[:, 0].tolist()))
    pairs = [(category[a], category[b]) for seq in read_sequences(root, name).values()
             for a, b in zip(seq[:-1], seq[1:])]
    return np.array(pairs)


def test_source_transitions_predict_target_next_category(full_root: Path) -> None:
    source_pairs = np.concatenate([category_pairs(full_root, n) for n in domain_names(full_root, "source")])
    transitions = np.ones((demo.N_CATEGORIES, demo.N_CATEGORIES))
    np.add.at(transitions, (source_pairs[:, 0], source_pairs[:, 1]), 1)
    transitions /= transitions.sum(1, keepdims=True)
    for name in domain_names(full_root, "target"):
        pairs = category_pairs(full_root, name)
        marginal = np.bincount(pairs[:, 1], minlength=demo.N_CATEGORIES) + 1.0
        marginal /= marginal.sum()
        transfer_accuracy = np.mean(transitions[pairs[:, 0]].argmax(1) == pairs[:, 1])
        marginal_accuracy = np.mean(marginal.argmax() == pairs[:, 1])
        assert transfer_accuracy > marginal_accuracy + 0.25, (name, transfer_accuracy, marginal_accuracy)
        # Also per step in likelihood, not only at the top choice.
        transfer_nll = -np.log(transitions[pairs[:, 0], pairs[:, 1]]).mean()
        marginal_nll = -np.log(marginal[pairs[:, 1]]).mean()
        assert transfer_nll < marginal_nll - 0.3


def test_domains_share_structure_but_not_surface(full_root: Path) -> None:
    vocabularies = {}
    for name in domain_names(full_root, "source") + domain_names(full_root, "target"):
        vocabularies[name] = {w.lower() for t in read_titles(full_root, name).values() for w in t.split()}
    names = list(vocabularies)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            overlap = len(vocabularies[a] & vocabularies[b]) / len(vocabularies[a] | vocabularies[b])
            assert overlap < 0.1, (a, b, overlap)
