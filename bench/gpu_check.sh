#!/usr/bin/env bash
# One device check: the three benchmarks at full size (d = 768, 12 blocks, random weights: speed does not
# depend on them) on the GPU in bf16, then the test suite. Each bench writes its JSON into $OUT.
# Usage (device machine, repo root):  bash bench/gpu_check.sh      [about 8 minutes on one H100/H200]
# CPU smoke test of the script itself:  OUT=/tmp/check SMOKE=1 PY=.venv/bin/python bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
if [ -z "${SMOKE:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-deps .whl/*.whl >/dev/null 2>&1 || echo "wheel install failed"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no build isolation possible offline: run from the tree
pmmcache() { "$PY" -m pmmcache "$@"; }
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no GPU: CPU run"; git rev-parse HEAD 2>/dev/null; } | tee "$OUT/gpu.txt"
W=$(mktemp -d)
# Sizes: full on the GPU; SMOKE=1 shrinks everything so the script can be tried on a CPU.
TEXT_SHAPE="768 12 12"; STEP=(); EVAL=(--catalogue 100000 --users 100000); EXTRACT=(--vision-encoder ViT-B-32 --dtype bfloat16 --batch-size 256 --num-workers 8)
if [ -n "${SMOKE:-}" ]; then
  TEXT_SHAPE="32 2 4"; TINY=(--dim 16 --blocks 2 --heads 2 --text-tokens 8 --image-size 64)
  STEP=("${TINY[@]}" --batch-size 4 --positions 5 --steps 1 --rounds 1 --catalogue 50)
  EVAL=("${TINY[@]}" --catalogue 300 --users 200 --cache-rows 50)
  EXTRACT=(--vision-encoder pmmcache-tiny-vit --image-size 64 --num-workers 0 --catalogue 200 --dim 32 --tokens 8 --batch-items 32)
fi
# A random XLM-R-shaped text encoder saved locally (no hub access there): d, blocks, heads.
$PY - "$W/xlmr-random" $TEXT_SHAPE <<'PY'
import sys
sys.path.insert(0, "tests")
from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer
from tiny_models import _unigram_vocab
d, blocks, heads = map(int, sys.argv[2:5])
tok = XLMRobertaTokenizer(vocab=_unigram_vocab())
cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=d, num_hidden_layers=blocks, num_attention_heads=heads,
                       intermediate_size=4 * d, max_position_embeddings=514)
XLMRobertaModel(cfg).save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
PY
run_bench() {  # name, timeout, args...: JSON into $OUT/<name>.json, the log's tail on screen
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PY" -m pmmcache bench "$@" --output "$OUT/$name.json" > "$OUT/$name.log" 2>&1 \
    || echo "bench $name failed or timed out (see $name.log)"
  "$PY" - "$OUT/$name.json" <<'PY' 2>/dev/null || tail -4 "$OUT/$name.log"
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("ms_per_step", "speedup_vs_end_to_end", "cached_vs_compute_only", "gpu_peak_mb", "seconds",
        "item_table_items_per_s", "scoring_user_items_per_s", "extraction")
print(r["bench"], json.dumps({k: r[k] for k in keys if k in r}))
PY
}
run_bench step 240 step "${STEP[@]}" --work-dir "$W"
run_bench eval 150 eval "${EVAL[@]}" --work-dir "$W"  # fp32, as `pmmcache eval` runs today
run_bench eval-bf16 150 eval "${EVAL[@]}" --precision bf16 --work-dir "$W"
run_bench extract 240 extract --data-dir "$W/data" --text-encoder "$W/xlmr-random" --vision-weights random "${EXTRACT[@]}" --work-dir "$W"
[ -n "${SKIP_TESTS:-}" ] || timeout 240 $PY -m pytest -q -x -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest.txt"
rm -rf "$W"
