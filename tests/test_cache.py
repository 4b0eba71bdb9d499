"""The HDF5 cache contract: contiguous memory-mappable datasets, row completion, manifest checks, readers."""
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pmmcache import cache as cache_io
from pmmcache.errors import CacheMismatchError, PmmcacheError

L, P, D = 5, 4, 8


def make_cache(path: Path, n: int = 10, text: bool = True, image: bool = True, complete: bool = True,
               manifest: dict | None = None) -> dict[str, np.ndarray]:
    layout = cache_io.cache_layout(n + 1, (L, D) if text else None, (P, D) if image else None)
    cache_io.create_cache(path, manifest or {"dataset": {"fingerprint": "abc"}, "text": {"k": 2}},
                          [""] + [f"src/{i}" for i in range(1, n + 1)], layout)
    rng = np.random.default_rng(0)
    arrays = {"modality": np.ones((n + 1, 2), np.uint8), "flags": np.zeros(n + 1, np.uint8)}
    if text:
        arrays["text/states"] = rng.standard_normal((n + 1, L, D)).astype(np.float16)
        arrays["text/mask"] = (rng.random((n + 1, L)) > 0.3).astype(np.uint8)
    if image:
        arrays["image/states"] = rng.standard_normal((n + 1, P, D)).astype(np.float16)
    writer = cache_io.CacheWriter(path)
    rows = np.arange(n + 1) if complete else np.arange(n // 2)
    writer.write(rows, {k: v[rows] for k, v in arrays.items()})
    if complete:
        writer.mark_complete()
    writer.close()
    return arrays


def test_datasets_are_contiguous_and_h5py_reads_what_the_memmap_wrote(tmp_path):
    path = tmp_path / "c.h5"
    arrays = make_cache(path)
    with h5py.File(path, "r") as f:
        for name, values in arrays.items():
            assert f[name].chunks is None and f[name].compression is None
            np.testing.assert_array_equal(f[name][:], values)
        assert [k.decode() for k in f["keys"][:3]] == ["", "src/1", "src/2"]
    assert cache_io.read_keys(path)[-1] == "src/10"


def test_partial_cache_is_never_complete_and_reports_pending_rows(tmp_path):
    path = tmp_path / "c.h5"
    make_cache(path, n=10, complete=False)
    assert not cache_io.is_complete(path)
    writer = cache_io.CacheWriter(path)
    np.testing.assert_array_equal(writer.pending_rows(), np.arange(5, 11))
    with pytest.raises(PmmcacheError, match="rows pending"):
        writer.mark_complete()
    with pytest.raises(PmmcacheError, match="incomplete"):
        cache_io.CacheReader(path)


def test_manifest_mismatch_names_each_differing_field(tmp_path):
    path = tmp_path / "c.h5"
    make_cache(path, manifest={"dataset": {"fingerprint": "abc"}, "text": {"k": 2, "name": "m"},
                               "created_by": {"pmmcache": "0.1"}})
    cache_io.check_manifest(path, {"dataset": {"fingerprint": "abc"}, "created_by": {"pmmcache": "9"}})
    with pytest.raises(CacheMismatchError) as err:
        cache_io.CacheReader(path, expected={"dataset": {"fingerprint": "xyz"}, "text": {"k": 3, "name": "m"}})
    message = str(err.value)
    assert "dataset.fingerprint" in message and "text.k" in message and "text.name" not in message


def test_other_format_version_is_refused(tmp_path):
    path = tmp_path / "c.h5"
    make_cache(path)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 999
    with pytest.raises(CacheMismatchError, match="format version 999"):
        cache_io.read_manifest(path)


def test_garbage_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "c.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(PmmcacheError, match="not a readable pmmcache cache"):
        cache_io.read_manifest(path)


@pytest.mark.parametrize("storage", ["memmap", "ram"])
def test_reader_returns_rows_in_request_order_with_any_index_shape(tmp_path, storage):
    path = tmp_path / "c.h5"
    arrays = make_cache(path)
    reader = cache_io.CacheReader(path, storage=storage)
    assert reader.storage == storage
    index = torch.tensor([[3, 1, 3], [0, 10, 2]])
    states = reader.get(index)
    assert states.text.shape == (2, 3, L, D) and states.image.shape == (2, 3, P, D)
    assert states.text_mask.dtype == torch.bool and states.modality.shape == (2, 3, 2)
    flat = index.reshape(-1).numpy()
    np.testing.assert_array_equal(states.text.reshape(-1, L, D).numpy(), arrays["text/states"][flat])
    np.testing.assert_array_equal(states.image.reshape(-1, P, D).numpy(), arrays["image/states"][flat])
    np.testing.assert_array_equal(states.text_mask.reshape(-1, L).numpy(), arrays["text/mask"][flat].astype(bool))


def test_auto_storage_prefers_ram_for_a_small_cache_and_gpu_needs_cuda(tmp_path):
    path = tmp_path / "c.h5"
    make_cache(path)
    assert cache_io.CacheReader(path).storage == "ram"
    assert cache_io.CacheReader(path, ram_fraction=0.0).storage == "memmap"
    if not torch.cuda.is_available():
        with pytest.raises(PmmcacheError, match="CUDA"):
            cache_io.CacheReader(path, storage="gpu")


def test_text_only_cache_has_no_image_fields(tmp_path):
    path = tmp_path / "c.h5"
    make_cache(path, image=False)
    reader = cache_io.CacheReader(path)
    states = reader.get(torch.tensor([1, 2]))
    assert reader.has_text and not reader.has_image and states.image is None and states.text.shape == (2, L, D)


def test_missing_cache_says_to_extract(tmp_path):
    with pytest.raises(PmmcacheError, match="pmmcache extract"):
        cache_io.CacheReader(tmp_path / "absent.h5")


def test_int8_quantisation_round_trip_is_within_half_a_step_per_token():
    rng = np.random.default_rng(3)
    states = torch.from_numpy(rng.standard_normal((6, 9, 48)).astype(np.float32)) * torch.logspace(-3, 2, 9)[:, None]
    states[2, 4] = 0.0  # an all-zero token row (padding)
    q, scale = cache_io.quantize_int8(states)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (6, 9)
    assert int(q.abs().max()) == 127 and scale[2, 4] == 0 and not q[2, 4].any()
    restored = cache_io.dequantize_int8(q, scale)
    assert restored.dtype == torch.float16 and restored.shape == states.shape
    error = (restored.float() - states).abs()
    bound = 0.5 * scale.float()[..., None] * (1 + 1e-3) + states.abs() * 2 ** -10  # rounding to q + float16 output
    assert (error <= bound).all()
    assert float(error.max()) > 0  # it is lossy: the bound is what the test checks


def make_int8_cache(path: Path, n: int = 10) -> dict[str, np.ndarray]:
    layout = cache_io.cache_layout(n + 1, (L, D), (P, D), states_dtype="int8")
    cache_io.create_cache(path, {"storage_dtype": "int8"}, [""] + [f"src/{i}" for i in range(1, n + 1)], layout)
    rng = np.random.default_rng(1)
    arrays = {"modality": np.ones((n + 1, 2), np.uint8), "flags": np.zeros(n + 1, np.uint8),
              "text/mask": (rng.random((n + 1, L)) > 0.3).astype(np.uint8)}
    for name, tokens in (("text", L), ("image", P)):
        q, scale = cache_io.quantize_int8(torch.from_numpy(rng.standard_normal((n + 1, tokens, D)).astype(np.float32)))
        arrays[f"{name}/states"], arrays[f"{name}/scale"] = q.numpy(), scale.numpy()
    writer = cache_io.CacheWriter(path)
    writer.write(np.arange(n + 1), arrays)
    writer.mark_complete()
    writer.close()
    return arrays


def test_int8_cache_reads_dequantised_and_the_same_from_memmap_and_ram(tmp_path):
    path = tmp_path / "c.h5"
    arrays = make_int8_cache(path)
    with h5py.File(path, "r") as f:
        assert f["text/states"].dtype == np.int8 and f["text/scale"].shape == (11, L) and f["text/scale"].chunks is None
    index = torch.tensor([[3, 1, 3], [0, 10, 2]])
    flat = index.reshape(-1).numpy()
    got = {}
    for storage in ("memmap", "ram"):
        reader = cache_io.CacheReader(path, storage=storage)
        assert reader.states_dtype == "int8"
        got[storage] = reader.get(index)
    for states in got.values():
        assert states.text.dtype == torch.float16 and states.text.shape == (2, 3, L, D)
        expected = cache_io.dequantize_int8(torch.from_numpy(arrays["image/states"][flat]),
                                            torch.from_numpy(arrays["image/scale"][flat]))
        assert torch.equal(states.image.reshape(-1, P, D), expected)
        np.testing.assert_array_equal(states.text_mask.reshape(-1, L).numpy(), arrays["text/mask"][flat].astype(bool))
    assert torch.equal(got["memmap"].text, got["ram"].text) and torch.equal(got["memmap"].image, got["ram"].image)
    with pytest.raises(PmmcacheError, match="int4"):
        cache_io.cache_layout(3, (L, D), None, states_dtype="int4")
