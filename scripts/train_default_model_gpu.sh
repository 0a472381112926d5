#!/usr/bin/env bash
# Stage 1 of the bundled model (configs/default-model.toml) on a lent GPU machine that has no network
# and cannot see ../shared/data. It expects, in the repository root:
#   .whl/                  the mvit wheel and the dependencies that machine lacks (pydantic and its own)
#   .devdata/data/         scripts/shrink_datasets.py's copy of ../shared/data (144-px shorter side)
# It first times two epochs, then trains for as many epochs as fit in BUDGET seconds, and writes the
# log, metrics, curves and the best model (float16) to $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-400}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
DATA=$PWD/.devdata/data
ARGS=(--set "datasets.0.root=\"$DATA/ham10000\"" --set "datasets.1.root=\"$DATA/dermmel\"" ${EXTRA:-})

python3 -m mvit train configs/default-model.toml "${ARGS[@]}" --output /tmp/probe --epochs 2 2>&1 | tee "$OUT/probe.log"
EPOCHS=$(python3 - <<PY
import json
seconds = json.loads(open("/tmp/probe/metrics.jsonl").read().splitlines()[-1])["seconds"]
print(max(5, min(300, int($BUDGET / (seconds + 1.0)))))  # + saving the models and state each epoch
PY
)
echo "training for $EPOCHS epochs" | tee "$OUT/train.log"
start=$(date +%s)
python3 -m mvit train configs/default-model.toml "${ARGS[@]}" --output /tmp/run --epochs "$EPOCHS" 2>&1 | tee -a "$OUT/train.log"
echo "wall time of mvit train: $(( $(date +%s) - start )) s" | tee -a "$OUT/train.log"
python3 -c "import mvit; mvit.save(mvit.load('/tmp/run/best.safetensors'), '$OUT/stage1-best.safetensors', half=True)"
cp /tmp/run/metrics.jsonl /tmp/run/curves.png /tmp/run/config.json "$OUT/"
