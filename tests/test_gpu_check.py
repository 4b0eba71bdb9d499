"""bench/gpu_check.sh, the device check, run at its tiny size on the CPU: one JSON with every bench and
the headline figures beside their goals (no figure is judged here: this machine is not the device)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # three benchmarks and a generated demo: ~40 s on 2 cores
def test_the_gpu_check_writes_one_json_with_every_figure(tmp_path):
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--tiny"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OUT": str(tmp_path), "PY": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["gpu-check.json"]
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert result["tiny"] and not result["failed"] and set(result["benches"]) == {"step", "eval", "extract"}
    summary = result["summary"]
    assert set(summary["step_ms"]) >= {"end_to_end", "compute_only"} and all(summary["step_ms"].values())
    for figure in ("step_cached_speedup_vs_end_to_end", "step_cached_vs_compute_only", "extraction_items_per_s_end_to_end",
                   "extraction_end_to_end_vs_encode_only", "eval_seconds_total_with_item_table"):
        assert summary[figure] > 0, figure
    assert result["benches"]["extract"]["extraction"]["items"] == 4 * 48  # the generated demo, every item
