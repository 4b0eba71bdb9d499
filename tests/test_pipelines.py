"""Every shipped config file loads into the config it is written for, with no unknown or mistyped key."""
from pathlib import Path

import pytest

from pmmcache.config import from_dict, load_file
from pmmcache.demo_job import DemoJobConfig
from pmmcache.train import TrainConfig

PIPELINES = sorted((Path(__file__).parent.parent / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_shipped_train_configs_load(path):
    config = from_dict(TrainConfig, load_file(path))
    assert config.dataset.startswith("demo/")


def test_demo_pretrain_file_matches_the_demo_job():
    """The file documents what `pmmcache demo` runs; keep them in step."""
    job = DemoJobConfig()
    config = from_dict(TrainConfig, load_file(Path(__file__).parent.parent / "pipelines" / "demo-pretrain.yaml"))
    assert (config.encoders.top_blocks, config.model.item_tower.d_model, config.model.item_tower.pooling,
            config.model.item_tower.fusion_norm_first, config.lr, config.encoder_lr, config.epochs) == (
        job.top_blocks, job.d_model, job.pooling, job.fusion_norm_first, job.lr, job.encoder_lr, job.pretrain_epochs)
