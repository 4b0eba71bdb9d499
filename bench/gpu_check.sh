#!/usr/bin/env bash
# The device check of issue 13, as one run writing ONE JSON ($OUT/gpu-check.json):
#   1. `bench step` at the paper's sizes (d 768, 12 blocks, k 2, 32 users x 21 items, bf16): cached vs end
#      to end vs compute only;
#   2. `bench eval`: 100k users x 100k items full-rank, item table included;
#   3. `bench extract`: random XLM-R-base-shaped text + ViT-B/32 (bf16, nvJPEG) on a generated demo of
#      16k JPEG items, end to end vs encoding alone.
# Random weights throughout: speed does not depend on them. Each part has its own time limit; one that
# fails or times out is recorded as such in the JSON (with its log's tail) and the others still run.
# Usage (device machine, repo root):   bash bench/gpu_check.sh          [< 8 minutes on one H100/H200]
# Try it on a CPU (tiny sizes, ~2 minutes):  OUT=/tmp/check PY=.venv/bin/python bash bench/gpu_check.sh --tiny
#   (TINY=1 or SMOKE=1 in the environment do the same)
set -uo pipefail
TINY=${TINY:-${SMOKE:-}}
[ "${1:-}" = "--tiny" ] && TINY=1
OUT=${OUT:-bench/results}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
if [ -z "$TINY" ] && ls .whl/*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-deps .whl/*.whl >/dev/null 2>&1 || echo "wheel install failed"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no build isolation possible offline: run from the tree
W=$(mktemp -d); PARTS="$W/parts"; mkdir -p "$PARTS"
trap 'rm -rf "$W"' EXIT
START=$(date +%s)

# Sizes: the paper's on the GPU; --tiny shrinks everything so that a CPU runs it in minutes.
TEXT_SHAPE="768 12 12"; DEMO="4000 4000 3000 3000"
STEP=(--negatives-batches ""); EVAL=(--catalogue 100000 --users 100000)  # negatives before/after: measured on the CPU (docs/benchmarks.md)
EXTRACT=(--vision-encoder ViT-B-32 --dtype bfloat16 --batch-size 512 --num-workers 8 --rounds 2)
LIMITS=(200 130 170)  # seconds: step, eval, extract
if [ -n "$TINY" ]; then
  TEXT_SHAPE="32 2 4"; DEMO="48 48 60 60"
  TINY_SIZE=(--dim 16 --blocks 2 --heads 2 --text-tokens 8 --image-size 64)
  STEP=("${TINY_SIZE[@]}" --negatives-batches "" --batch-size 4 --positions 5 --steps 1 --rounds 1 --catalogue 50)
  EVAL=("${TINY_SIZE[@]}" --catalogue 300 --users 200 --cache-rows 50)
  EXTRACT=(--vision-encoder pmmcache-tiny-vit --image-size 64 --num-workers 0 --batch-size 32 --rounds 1)
  LIMITS=(150 150 200)
fi

# A random XLM-R-shaped text encoder saved locally (no hub there) and the demo at the size above
# (items per source domain, per target domain, users per source domain, per target domain).
$PY - "$W/xlmr-random" $TEXT_SHAPE "$W/data/demo" $DEMO <<'PY' > "$W/setup.log" 2>&1 || { echo "setup failed:"; tail -20 "$W/setup.log"; }
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer
from helpers.tiny_models import _unigram_vocab
from pmmcache.data.demo import DemoConfig, generate_demo
d, blocks, heads = map(int, sys.argv[2:5])
tok = XLMRobertaTokenizer(vocab=_unigram_vocab())
cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=d, num_hidden_layers=blocks, num_attention_heads=heads,
                       intermediate_size=4 * d, max_position_embeddings=514)
XLMRobertaModel(cfg).save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
source_items, target_items, source_users, target_users = map(int, sys.argv[6:10])
generate_demo(Path(sys.argv[5]), DemoConfig(source_items=source_items, target_items=target_items,
                                            source_users=source_users, target_users=target_users))
PY

run_bench() {  # name, time limit, bench args...: the bench's JSON into $PARTS/<name>.json, its log beside it
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  timeout "$limit" "$PY" -m pmmcache bench "$@" --output "$PARTS/$name.json" > "$PARTS/$name.log" 2>&1
  echo "$?" > "$PARTS/$name.rc"
  echo "bench $name: exit $(cat "$PARTS/$name.rc") after $(( $(date +%s) - t0 )) s"
}
run_bench step "${LIMITS[0]}" step "${STEP[@]}" --work-dir "$W"
run_bench eval "${LIMITS[1]}" eval "${EVAL[@]}" --work-dir "$W"
run_bench extract "${LIMITS[2]}" extract --dataset demo --data-dir "$W/data" --text-encoder "$W/xlmr-random" \
  --vision-weights random --no-reader "${EXTRACT[@]}" --work-dir "$W"

# One JSON: the machine, the headline figures beside their goals, and every bench's own JSON.
$PY - "$PARTS" "$OUT/gpu-check.json" "$(( $(date +%s) - START ))" "${TINY:+tiny}" <<'PY'
import json, subprocess, sys
from pathlib import Path
parts, out, seconds, tiny = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "tiny"

def gpu() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or "no GPU"
    except (OSError, subprocess.SubprocessError):
        return "no GPU"

def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"

benches, failed = {}, {}
for name in ("step", "eval", "extract"):
    rc = int((parts / f"{name}.rc").read_text()) if (parts / f"{name}.rc").is_file() else -1
    try:
        benches[name] = json.loads((parts / f"{name}.json").read_text())
    except (OSError, ValueError):
        log = parts / f"{name}.log"
        failed[name] = {"exit": rc, "timed_out": rc in (124, 137),
                        "log_tail": log.read_text()[-3000:] if log.is_file() else ""}

def figure(name, *path):
    value = benches.get(name)
    for key in path:
        value = value.get(key) if isinstance(value, dict) and key is not None else None
    return value

ms = figure("step", "ms_per_step") or {}
cached = {name: value for name, value in ms.items() if name.startswith("cached_")}
best = min(cached, key=cached.get) if cached else None  # the fastest cached variant (storage, prefetch or not)
summary = {
    "step_ms": {name: ms.get(name) for name in ("end_to_end", best, "compute_only")} if best else None,
    "step_cached_speedup_vs_end_to_end": figure("step", "speedup_vs_end_to_end", best), "goal_step_speedup": ">= 2.2",
    "step_cached_vs_compute_only": figure("step", "cached_vs_compute_only", best), "goal_cached_vs_compute_only": "<= 1.10",
    "extraction_items_per_s_end_to_end": figure("extract", "extraction", "items_per_s"), "goal_extraction": ">= 8000",
    "extraction_end_to_end_vs_encode_only": figure("extract", "extraction", "end_to_end_vs_encode_only"),
    "eval_seconds_total_with_item_table": figure("eval", "seconds", "total"), "goal_eval_seconds": "<= 3 (100k x 100k)",
}
result = {"bench": "gpu-check", "gpu": gpu(), "commit": commit(), "tiny": tiny, "seconds": seconds,
          "command": "bash bench/gpu_check.sh" + (" --tiny" if tiny else ""), "summary": summary,
          "failed": failed, "benches": benches}
out.write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps({"gpu": result["gpu"], "seconds": seconds, **summary, "failed": sorted(failed)}, indent=1))
print(f"wrote {out}")
PY
