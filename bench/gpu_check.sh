#!/usr/bin/env bash
# One GPU check: install what the device image lacks (wheels carried in .whl/), run the stage-1 and
# stage-2 paths at full encoder size (d = 768, 12 blocks, random weights: speed does not depend on
# them) on CUDA in bf16, the reader benchmark with GPU storage, then the test suite.
# Usage (on the device machine, from the repo root): bash bench/gpu_check.sh  [writes into $OUT]
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
$PY -m pip install -q --no-deps .whl/*.whl >/dev/null 2>&1 || echo "wheel install failed"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no build isolation possible offline: run from the tree
pmmcache() { "$PY" -m pmmcache "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
W=$(mktemp -d)
# A full-size random XLM-R-base-shaped text encoder (12 x 768), saved locally: no hub access there.
$PY - "$W/xlmr-base-random" <<'PY'
import sys
sys.path.insert(0, "tests")
from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer
from tiny_models import _unigram_vocab
tok = XLMRobertaTokenizer(vocab=_unigram_vocab())
cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, max_position_embeddings=514)
XLMRobertaModel(cfg).save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
PY
ENC="--text-encoder $W/xlmr-base-random --vision-encoder ViT-B-32 --vision-weights random"
cd "$W"
{ time pmmcache extract --dataset demo $ENC --dtype bfloat16 --batch-size 256 --num-workers 8 ; } 2>&1 | tr '\r' '\n' | grep -v "item/s\]" | tail -5 | tee "$OUT/extract.txt"
{ time pmmcache train --stage pretrain --dataset demo/kitchen,demo/garden $ENC --epochs 2 --mixed-precision bf16 ; } 2>&1 | tr '\r' '\n' | grep -v "step/s" | tail -12 | tee "$OUT/train.txt"
cat runs/*/metrics.jsonl > "$OUT/train-metrics.jsonl"
pmmcache eval --full-rank --run runs/pretrain-demo_kitchen+demo_garden 2>&1 | tail -5 | tee "$OUT/eval.txt"
cd - >/dev/null
[ -n "${SKIP_READER:-}" ] || $PY - <<'PY' 2>&1 | tee "$OUT/reader-bench.json"
import json, tempfile, torch
from pathlib import Path
from pmmcache.bench import machine, reader_bench
with tempfile.TemporaryDirectory() as d:
    r = reader_bench(Path(d), 20000, 100, 768, 672, 10, torch.device("cuda"))
print(json.dumps({"bench": "reader", "machine": machine(), "reader": r}, indent=1))
PY
[ -n "${SKIP_TESTS:-}" ] || timeout 240 $PY -m pytest -q -x -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest.txt"
