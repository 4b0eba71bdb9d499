"""Session-wide test setup: offline hub, the `slow` marker, and the data every module shares.

The shared fixtures are built once per session and must be treated as read-only: a test that changes
data, a cache or a run copies it into its own `tmp_path` first."""
import os

# Before any transformers import: never let a test wait on hub retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The toy dataset, its tiny BERT and its extracted cache (helpers/toy.py), built once."""
    from helpers.toy import build_toy

    return build_toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    """A data dir holding the full generated demo (data/demo/, 1,320 images), generated once.

    Pass it as `data_dir` with a cache dir of the test's own; resolving the demo only reads it."""
    from pmmcache.data.demo import generate_demo

    data_dir = tmp_path_factory.mktemp("demo-data")
    generate_demo(data_dir / "demo")
    return data_dir


@pytest.fixture(scope="session")
def demo_cache_dir(demo_data_dir, tmp_path_factory) -> Path:
    """The demo extracted as `pmmcache demo` extracts it (text and image, top block trained), once.

    Stage 2 only reads the cache (and adds prepared datasets beside it, the same for every test)."""
    from pmmcache import extract
    from pmmcache.demo_job import DemoJobConfig
    from pmmcache.encoders.config import EncoderConfig

    cache_dir = tmp_path_factory.mktemp("demo-cache")
    extract.run(extract.ExtractConfig(dataset="demo", data_dir=demo_data_dir, cache_dir=cache_dir,
                                      encoders=EncoderConfig(top_blocks=DemoJobConfig().top_blocks)),
                show_progress=False)
    return cache_dir
