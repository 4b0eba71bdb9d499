"""Stage 1 as a pipeline: loaders, encoding and a writer thread overlapped. A failed write is raised in
the extraction naming its rows and items and loses nothing written before; the choice of where JPEGs
are decoded, and the device-decoding path itself (run here on the CPU, as on CUDA but for the device),
give the states the PIL path gives."""
from __future__ import annotations

import dataclasses
import errno
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pmmcache import cache as cache_io
from pmmcache import extract as extract_module
from pmmcache import integrity
from pmmcache.data import images as images_module
from pmmcache.errors import ConfigError, PmmcacheError
from pmmcache.extract import ExtractConfig, ItemBatch, device_pixels, image_decoder, run
from pmmcache.write_behind import BackgroundWriter

from helpers.toy import NAME, NUM_ITEMS, extract_config


@pytest.fixture(scope="module")
def jpeg_toy(toy, tmp_path_factory):
    """The toy data with every odd item's image stored as a JPEG (the even ones stay PNG)."""
    data_dir = tmp_path_factory.mktemp("jpeg-toy") / "data"
    shutil.copytree(toy.data_dir, data_dir)
    folder = data_dir / NAME / f"{NAME}_images"
    for i in range(1, NUM_ITEMS, 2):
        png = folder / f"i{i}.png"
        Image.open(png).convert("RGB").save(folder / f"i{i}.jpg", quality=95)
        png.unlink()
    return data_dir


def config_for(toy, data_dir, cache_dir, **overrides) -> ExtractConfig:
    return dataclasses.replace(extract_config(toy, cache_dir=cache_dir), data_dir=data_dir, **overrides)


def states_of(path):
    reader = cache_io.CacheReader(path, storage="ram")
    return reader.get(torch.arange(NUM_ITEMS + 1)), cache_io.open_maps(path, names={"flags"})["flags"]


# ------------------------------------------------------------------------------- the writer thread


def test_a_failed_write_names_its_rows_and_items_and_the_rerun_finishes(toy, tmp_path, monkeypatch):
    config = dataclasses.replace(extract_config(toy, cache_dir=tmp_path / "cache"), batch_size=8)
    original = cache_io.CacheWriter.write
    written = []

    def fail_third_batch(self, rows, arrays):
        if len(written) == 2:
            raise OSError(errno.EIO, "Input/output error")
        written.append(list(rows))
        original(self, rows, arrays)

    monkeypatch.setattr(cache_io.CacheWriter, "write", fail_third_batch)
    with pytest.raises(PmmcacheError, match=r"writing 8 cache row\(s\) 16 \(toy/i\d+\), 17 \(toy/i\d+\), 18 .* "
                                            r"and 5 more into .*\.h5 failed: .*Input/output error.*rerun"):
        run(config, show_progress=False)
    monkeypatch.undo()
    path = next((tmp_path / "cache" / NAME).glob("*.h5"))
    check = integrity.check_rows(path)
    assert check.ok and sorted(set(range(NUM_ITEMS + 1)) - set(check.pending)) == sorted(sum(written, []))
    assert run(config, show_progress=False).items == NUM_ITEMS + 1 - 16  # the two batches written are kept
    assert integrity.check_rows(path).ok and cache_io.is_complete(path)


def test_a_disk_full_in_the_writer_thread_says_so(toy, tmp_path, monkeypatch):
    def disk_full(self, rows, arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_io.CacheWriter, "write", disk_full)
    with pytest.raises(PmmcacheError, match=r"cache row\(s\) 0 \(padding\).*disk full while writing .*\.h5 .*needs"):
        run(extract_config(toy, cache_dir=tmp_path / "cache"), show_progress=False)


def test_the_writer_thread_writes_in_order_and_put_never_blocks_after_a_failure(tmp_path):
    path = tmp_path / "c.h5"
    cache_io.create_cache(path, {"m": 1}, ["", "a", "b", "c"], cache_io.cache_layout(4, (2, 3), None))
    writer = cache_io.CacheWriter(path)
    calls = []
    real = writer.write
    writer.write = lambda rows, arrays: (calls.append(list(rows)), real(rows, arrays))[-1]
    background = BackgroundWriter(writer, ["", "a", "b", "c"], path, 1 << 20, depth=1)
    mask = np.ones((1, 2), np.uint8)
    for row in (2, 0, 3):
        background.put(np.array([row]), {"text/mask": mask * row})
    background.finish()
    assert calls == [[2], [0], [3]] and writer.pending_rows().tolist() == [1]
    assert cache_io.open_maps(path, names={"text/mask"})["text/mask"][:, 0].tolist() == [0, 0, 2, 3]

    failing = BackgroundWriter(writer, ["", "a", "b", "c"], path, 1 << 20, depth=1)
    writer.write = lambda rows, arrays: (_ for _ in ()).throw(ValueError("bad values"))
    with pytest.raises(PmmcacheError, match=r"1 cache row\(s\) 1 \(a\) .* failed: bad values"):
        for _ in range(20):  # far more than the queue holds: the thread keeps taking batches
            failing.put(np.array([1]), {"text/mask": mask})
        failing.finish()
    writer.close()


# ------------------------------------------------------------------------------- where JPEGs are decoded


def test_jpegs_go_to_the_gpu_only_when_extracting_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert image_decoder("auto", cuda) == "nvjpeg" and image_decoder("nvjpeg", cuda) == "nvjpeg"
    assert image_decoder("auto", cpu) == "cpu" and image_decoder("cpu", cuda) == "cpu"
    with pytest.raises(ConfigError, match="'nvjpeg' needs a CUDA device"):
        image_decoder("nvjpeg", cpu)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_only_whole_decodable_jpegs_are_left_for_the_device(monkeypatch):
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    jpeg = encoded(image, "JPEG")
    assert images_module.device_decodable(jpeg)
    assert not images_module.device_decodable(encoded(image, "PNG"))
    assert not images_module.device_decodable(images_module.JPEG_MAGIC + b"garbage")
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 40 * 30 - 1)  # too large: PIL decodes it reduced
    assert not images_module.device_decodable(jpeg)


def test_device_decoding_matches_pil_and_a_jpeg_it_cannot_decode_goes_to_pil(toy):
    from pmmcache.encoders import VisionEncoder
    from pmmcache.encoders.vision import VisionEncoderSpec

    vision = VisionEncoder.load(VisionEncoderSpec(name="pmmcache-tiny-vit", weights="random", image_size=64))
    pictures = [Image.new("RGB", (90, 50), (200, 30, 60)), Image.new("RGB", (40, 70), (0, 120, 250))]
    for picture in pictures:
        picture.paste((255, 255, 0), (10, 10, 30, 25))
    jpegs = [encoded(picture, "JPEG") for picture in pictures]
    truncated = jpegs[0][: len(jpegs[0]) // 3]  # a valid header, a body neither decoder can read whole
    batch = ItemBatch(rows=np.array([1, 2, 3]), flags=np.zeros(3, np.uint8),
                      pixels=torch.zeros(3, 3, 64, 64, dtype=torch.uint8),
                      jpegs=[(0, jpegs[0], "a"), (1, jpegs[1], "b"), (2, truncated, "c")])
    got = device_pixels(batch, vision, torch.device("cpu"))
    want = vision.preprocess([Image.open(io.BytesIO(data)) for data in jpegs])
    # torch's antialiased bicubic vs PIL's: within a few grey levels (std of the normalisation ~0.27)
    assert (got[:2] - want).abs().mean() < 2 / 255 / 0.27 and (got[:2] - want).abs().max() < 40 / 255 / 0.27
    assert batch.flags.tolist() == [0, 0, cache_io.FLAG_IMAGE_UNREADABLE]
    assert torch.equal(got[2], vision.preprocessing.normalize(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))[0])


def test_extraction_through_the_device_jpeg_path_matches_the_pil_path(toy, jpeg_toy, tmp_path, monkeypatch):
    pil = run(config_for(toy, jpeg_toy, tmp_path / "pil", num_workers=2), show_progress=False)
    left = []
    real = images_module.decode_jpegs

    def spy(datas, device):
        left.append(len(datas))
        return real(datas, device)

    monkeypatch.setattr(extract_module, "image_decoder", lambda setting, device: "nvjpeg")  # as on CUDA
    monkeypatch.setattr(extract_module, "decode_jpegs", spy)
    device = run(config_for(toy, jpeg_toy, tmp_path / "device"), show_progress=False)
    assert sum(left) == NUM_ITEMS // 2  # every JPEG, and only the JPEGs, decoded in the extraction process
    (a, flags_a), (b, flags_b) = states_of(pil.path), states_of(device.path)
    np.testing.assert_array_equal(flags_a, flags_b)
    torch.testing.assert_close(a.text, b.text)  # texts take the same path
    assert torch.equal(a.modality, b.modality)
    keys = cache_io.read_keys(pil.path)
    jpeg = torch.tensor([bool(key) and int(key.rsplit("i", 1)[1]) % 2 == 1 for key in keys])
    assert torch.equal(a.image[~jpeg], b.image[~jpeg])  # PNGs (and padding): PIL in both, the same bits
    difference = (a.image[jpeg].float() - b.image[jpeg].float()).abs().mean()
    assert 0 < difference < 0.05 * a.image[jpeg].float().abs().mean()
